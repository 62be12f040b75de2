-- Plugin components and check bundles (owned by host/src/bundles; see host/src/bundles/mod.rs).
-- SQLite flavour; migrations/postgres/0003_bundles.sql is the same schema for PostgreSQL.
-- Every timestamp is unix seconds (INTEGER). Idempotent: safe to run on an existing database.
-- Never edit an applied migration: sqlx checksums it. Add a new numbered file instead.

-- Uploaded WebAssembly components, content-addressed: digest = 'sha256:' || hex(sha256(wasm)).
-- Validated against the worlds at upload; `world` is 'check-plugin' or 'siem-formatter'.
CREATE TABLE IF NOT EXISTS plugin_components (
    digest      TEXT    NOT NULL PRIMARY KEY,
    name        TEXT    NOT NULL,
    world       TEXT    NOT NULL,
    size        INTEGER NOT NULL,
    wasm        BLOB    NOT NULL,
    created_by  TEXT    NOT NULL,
    created_at  INTEGER NOT NULL
) STRICT;

-- Bundles (drafts and every bundle ever active) per tenant. `spec` is the BundleSpec JSON;
-- `digest` is its content digest, so a row is immutable once written.
CREATE TABLE IF NOT EXISTS bundles (
    tenant      TEXT    NOT NULL,
    digest      TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    spec        TEXT    NOT NULL,
    created_by  TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    deleted_at  INTEGER,
    PRIMARY KEY (tenant, digest)
) STRICT;

-- The active bundle pointer per tenant and the rollback target. `seq` increases on every swap:
-- replicas polling (SQLite) or woken by NOTIFY (PostgreSQL) reload when it moved.
CREATE TABLE IF NOT EXISTS bundle_pointers (
    tenant           TEXT    NOT NULL PRIMARY KEY,
    active_digest    TEXT    NOT NULL,
    previous_digest  TEXT,
    seq              INTEGER NOT NULL,
    updated_by       TEXT    NOT NULL,
    updated_at       INTEGER NOT NULL
) STRICT;
