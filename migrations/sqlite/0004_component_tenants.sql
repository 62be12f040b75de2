-- The tenants that uploaded each plugin component (owned by host/src/bundles; see
-- host/src/bundles/persist.rs). A tenant lists, and builds bundles from, the built-in components
-- and the ones it uploaded itself. SQLite flavour; migrations/postgres/0004_component_tenants.sql
-- is the same schema for PostgreSQL. Idempotent: safe to run on an existing database.

CREATE TABLE IF NOT EXISTS plugin_component_tenants (
    digest      TEXT    NOT NULL,
    tenant      TEXT    NOT NULL,
    created_by  TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (digest, tenant)
);
