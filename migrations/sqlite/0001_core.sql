-- Core tables of the store (owned by host/src/store; see host/src/store/mod.rs).
-- SQLite flavour; migrations/postgres/0001_core.sql is the same schema for PostgreSQL.
-- Every timestamp is unix seconds (INTEGER). Idempotent: safe to run on an existing database.
-- Never edit an applied migration: sqlx checksums it. Add a new numbered file instead.

-- Tenants that have been seen (minted into, revoked in). Names follow config::valid_tenant_name.
CREATE TABLE IF NOT EXISTS tenants (
    name        TEXT    NOT NULL PRIMARY KEY,
    created_at  INTEGER NOT NULL
) STRICT;

-- Revoked token ids. `seq` is the feed position that revocations_since pages on: SQLite has one
-- writer at a time, so seq order is commit order. AUTOINCREMENT: a seq is never reused.
CREATE TABLE IF NOT EXISTS revocations (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant      TEXT    NOT NULL REFERENCES tenants (name),
    jti         TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    revoked_by  TEXT    NOT NULL,
    revoked_at  INTEGER NOT NULL,
    UNIQUE (tenant, jti)
) STRICT;

CREATE INDEX IF NOT EXISTS revocations_tenant_seq ON revocations (tenant, seq);

-- Budget and rate counters shared by every replica: one row per (key, window).
CREATE TABLE IF NOT EXISTS counters (
    key           TEXT    NOT NULL,
    window_start  INTEGER NOT NULL,
    value         INTEGER NOT NULL CHECK (value >= 0),
    updated_at    INTEGER NOT NULL,
    PRIMARY KEY (key, window_start)
) STRICT, WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS counters_window ON counters (window_start);

-- Handshake-era MCP sessions, so a session opened on one replica is known to the others.
CREATE TABLE IF NOT EXISTS mcp_sessions (
    id                TEXT    NOT NULL PRIMARY KEY,
    tenant            TEXT    NOT NULL,
    token_jti         TEXT    NOT NULL,
    upstream_session  TEXT,
    protocol_version  TEXT    NOT NULL,
    created_at        INTEGER NOT NULL,
    expires_at        INTEGER NOT NULL
) STRICT;

CREATE INDEX IF NOT EXISTS mcp_sessions_expires ON mcp_sessions (expires_at);
