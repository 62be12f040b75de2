-- Step-ups recorded at mint (see host/src/capability/step_up.rs): a `step_up` caveat is one a
-- token's holder can append without the master key, so it counts as evidence of a fresh
-- second factor only for a token tree whose mint recorded one here. Idempotent.
CREATE TABLE IF NOT EXISTS step_ups (
    tenant      TEXT    NOT NULL,
    root_jti    TEXT    NOT NULL,
    step_up_at  BIGINT  NOT NULL, -- unix seconds of the factor, as minted
    PRIMARY KEY (tenant, root_jti)
);
