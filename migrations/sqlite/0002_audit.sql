-- Audit chain (owned by the audit module; see host/src/audit/mod.rs).
-- One hash chain per tenant: audit_events holds the events (body = the RFC 8785 canonical JSON
-- that was hashed; the other columns are indexes derived from it and checked against it by
-- verify), audit_chain_heads the per-tenant head that every append moves under the write lock,
-- audit_checkpoints the history of signed checkpoints. Idempotent.

CREATE TABLE IF NOT EXISTS audit_events (
    id            INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused, even after a deleted tail
    tenant        TEXT    NOT NULL,
    seq           INTEGER NOT NULL CHECK (seq >= 1), -- position in the tenant's chain
    ts_ms         INTEGER NOT NULL,
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
    UNIQUE (tenant, seq)                              -- two writers can never fork a chain
);

CREATE INDEX IF NOT EXISTS audit_events_tenant_ts ON audit_events (tenant, ts_ms);
CREATE INDEX IF NOT EXISTS audit_events_tenant_agent ON audit_events (tenant, agent_id);
CREATE INDEX IF NOT EXISTS audit_events_tenant_tool ON audit_events (tenant, tool);
CREATE INDEX IF NOT EXISTS audit_events_jti ON audit_events (jti) WHERE jti <> '';
CREATE INDEX IF NOT EXISTS audit_events_root_jti ON audit_events (root_jti) WHERE root_jti <> '';
CREATE INDEX IF NOT EXISTS audit_events_elevation ON audit_events (elevation_id) WHERE elevation_id <> '';

CREATE TABLE IF NOT EXISTS audit_chain_heads (
    tenant           TEXT    PRIMARY KEY,
    seq              INTEGER NOT NULL CHECK (seq >= 0), -- events in the chain
    hash             TEXT    NOT NULL,                  -- hash of event `seq` (zeros when empty)
    checkpoint_size  INTEGER NOT NULL DEFAULT 0,        -- size of the newest signed checkpoint
    event_id         INTEGER NOT NULL DEFAULT 0,        -- id of event `seq`
    ts_ms            INTEGER NOT NULL DEFAULT 0         -- time of event `seq`
);

CREATE TABLE IF NOT EXISTS audit_checkpoints (
    tenant      TEXT    NOT NULL,
    size        INTEGER NOT NULL CHECK (size >= 1),
    root_hash   TEXT    NOT NULL, -- hex of the chain hash at `size`
    key_name    TEXT    NOT NULL,
    note        TEXT    NOT NULL, -- the signed note (C2SP tlog-checkpoint)
    created_ms  INTEGER NOT NULL,
    PRIMARY KEY (tenant, size)
);
