-- Core tables of the store (owned by host/src/store; see host/src/store/mod.rs).
-- PostgreSQL flavour; migrations/sqlite/0001_core.sql is the same schema for SQLite.
-- Every timestamp is unix seconds (BIGINT). Idempotent: safe to run on an existing database.
-- Never edit an applied migration: sqlx checksums it. Add a new numbered file instead.

-- Tenants that have been seen (minted into, revoked in). Names follow config::valid_tenant_name.
CREATE TABLE IF NOT EXISTS tenants (
    name        TEXT   NOT NULL PRIMARY KEY,
    created_at  BIGINT NOT NULL
);

-- Revoked token ids. `seq` is the feed position that revocations_since pages on. An identity
-- column alone can commit out of order (tx A takes 5, tx B takes 6, B commits first, a reader
-- sees 6 and moves past 5 forever), so every insert takes a SHARE ROW EXCLUSIVE lock on this
-- table first (see store/postgres.rs): seq order is then commit order.
CREATE TABLE IF NOT EXISTS revocations (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant      TEXT   NOT NULL REFERENCES tenants (name),
    jti         TEXT   NOT NULL,
    reason      TEXT   NOT NULL,
    revoked_by  TEXT   NOT NULL,
    revoked_at  BIGINT NOT NULL,
    UNIQUE (tenant, jti)
);

CREATE INDEX IF NOT EXISTS revocations_tenant_seq ON revocations (tenant, seq);

-- Budget and rate counters shared by every replica: one row per (key, window).
CREATE TABLE IF NOT EXISTS counters (
    key           TEXT   NOT NULL,
    window_start  BIGINT NOT NULL,
    value         BIGINT NOT NULL CHECK (value >= 0),
    updated_at    BIGINT NOT NULL,
    PRIMARY KEY (key, window_start)
);

CREATE INDEX IF NOT EXISTS counters_window ON counters (window_start);

-- Handshake-era MCP sessions, so a session opened on one replica is known to the others.
CREATE TABLE IF NOT EXISTS mcp_sessions (
    id                TEXT   NOT NULL PRIMARY KEY,
    tenant            TEXT   NOT NULL,
    token_jti         TEXT   NOT NULL,
    upstream_session  TEXT,
    protocol_version  TEXT   NOT NULL,
    created_at        BIGINT NOT NULL,
    expires_at        BIGINT NOT NULL
);

CREATE INDEX IF NOT EXISTS mcp_sessions_expires ON mcp_sessions (expires_at);
