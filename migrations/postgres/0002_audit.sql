-- Audit chain (owned by the audit module; see host/src/audit/mod.rs).
-- One hash chain per tenant: audit_events holds the events (body = the RFC 8785 canonical JSON
-- that was hashed; the other columns are indexes derived from it and checked against it by
-- verify), audit_chain_heads the per-tenant head row that every append locks
-- (SELECT ... FOR UPDATE) and moves, so replicas cannot fork a chain, audit_checkpoints the
-- history of signed checkpoints. Idempotent.

CREATE TABLE IF NOT EXISTS audit_events (
    id            BIGSERIAL PRIMARY KEY,
    tenant        TEXT    NOT NULL,
    seq           BIGINT  NOT NULL CHECK (seq >= 1),
    ts_ms         BIGINT  NOT NULL,
    event         TEXT    NOT NULL,
    decision      TEXT    NOT NULL DEFAULT '',
    check_name    TEXT    NOT NULL DEFAULT '',
    agent_id      TEXT    NOT NULL DEFAULT '',
    tool          TEXT    NOT NULL DEFAULT '',
    jti           TEXT    NOT NULL DEFAULT '',
    root_jti      TEXT    NOT NULL DEFAULT '',
    elevation_id  TEXT    NOT NULL DEFAULT '',
    body          TEXT    NOT NULL,
    prev_hash     TEXT    NOT NULL,
    hash          TEXT    NOT NULL,
    CONSTRAINT audit_events_tenant_seq UNIQUE (tenant, seq)
);

CREATE INDEX IF NOT EXISTS audit_events_tenant_ts ON audit_events (tenant, ts_ms);
CREATE INDEX IF NOT EXISTS audit_events_tenant_agent ON audit_events (tenant, agent_id);
CREATE INDEX IF NOT EXISTS audit_events_tenant_tool ON audit_events (tenant, tool);
CREATE INDEX IF NOT EXISTS audit_events_jti ON audit_events (jti) WHERE jti <> '';
CREATE INDEX IF NOT EXISTS audit_events_root_jti ON audit_events (root_jti) WHERE root_jti <> '';
CREATE INDEX IF NOT EXISTS audit_events_elevation ON audit_events (elevation_id) WHERE elevation_id <> '';

CREATE TABLE IF NOT EXISTS audit_chain_heads (
    tenant           TEXT    PRIMARY KEY,
    seq              BIGINT  NOT NULL CHECK (seq >= 0),
    hash             TEXT    NOT NULL,
    checkpoint_size  BIGINT  NOT NULL DEFAULT 0,
    event_id         BIGINT  NOT NULL DEFAULT 0,
    ts_ms            BIGINT  NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS audit_checkpoints (
    tenant      TEXT    NOT NULL,
    size        BIGINT  NOT NULL CHECK (size >= 1),
    root_hash   TEXT    NOT NULL,
    key_name    TEXT    NOT NULL,
    note        TEXT    NOT NULL,
    created_ms  BIGINT  NOT NULL,
    PRIMARY KEY (tenant, size)
);
