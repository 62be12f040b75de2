-- Plugin components and check bundles (owned by host/src/bundles; see host/src/bundles/mod.rs).
-- PostgreSQL flavour; migrations/sqlite/0003_bundles.sql is the same schema for SQLite.
-- Every timestamp is unix seconds (BIGINT). Idempotent: safe to run on an existing database.
-- Never edit an applied migration: sqlx checksums it. Add a new numbered file instead.
-- Swaps are announced with pg_notify('intentgate_bundles', tenant) in the same transaction.

CREATE TABLE IF NOT EXISTS plugin_components (
    digest      TEXT    NOT NULL PRIMARY KEY,
    name        TEXT    NOT NULL,
    world       TEXT    NOT NULL,
    size        BIGINT  NOT NULL,
    wasm        BYTEA   NOT NULL,
    created_by  TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL
);

CREATE TABLE IF NOT EXISTS bundles (
    tenant      TEXT    NOT NULL,
    digest      TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    spec        TEXT    NOT NULL,
    created_by  TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,
    deleted_at  BIGINT,
    PRIMARY KEY (tenant, digest)
);

CREATE TABLE IF NOT EXISTS bundle_pointers (
    tenant           TEXT    NOT NULL PRIMARY KEY,
    active_digest    TEXT    NOT NULL,
    previous_digest  TEXT,
    seq              BIGINT  NOT NULL,
    updated_by       TEXT    NOT NULL,
    updated_at       BIGINT  NOT NULL
);
