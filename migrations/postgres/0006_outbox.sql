-- The delivery outbox (owned by host/src/outbox; see host/src/outbox/mod.rs). SQLite flavour;
-- migrations/postgres/0006_outbox.sql is the same schema for SQLite. Idempotent.
--
-- outbox: one row per (audit event, destination) still to deliver, inserted in the transaction
--   that records the event (so an event is delivered if and only if it was recorded), deleted
--   once delivered; `dead_ms` <> 0 marks a dead letter (kept until re-driven).
-- outbox_lanes: one row per (destination, tenant): the unit of ordering, of back-off and of
--   work sharing between replicas (PostgreSQL: `FOR UPDATE SKIP LOCKED`), with its health.
-- outbox_destinations: the destinations configured through the admin API (the secret is
--   write-only: never returned by the API).

CREATE TABLE IF NOT EXISTS outbox (
    id          BIGSERIAL PRIMARY KEY,
    destination TEXT    NOT NULL,
    tenant      TEXT    NOT NULL,
    event_id    BIGINT  NOT NULL, -- audit_events.id
    created_ms  BIGINT  NOT NULL,
    attempts    BIGINT  NOT NULL DEFAULT 0,
    dead_ms     BIGINT  NOT NULL DEFAULT 0,
    last_error  TEXT    NOT NULL DEFAULT ''
);

CREATE INDEX IF NOT EXISTS outbox_lane ON outbox (destination, tenant, dead_ms, id);

CREATE TABLE IF NOT EXISTS outbox_lanes (
    destination     TEXT    NOT NULL,
    tenant          TEXT    NOT NULL,
    next_ms         BIGINT  NOT NULL DEFAULT 0, -- no attempt before (back-off)
    failures        BIGINT  NOT NULL DEFAULT 0, -- consecutive failed attempts
    delivered       BIGINT  NOT NULL DEFAULT 0,
    last_success_ms BIGINT  NOT NULL DEFAULT 0,
    last_error      TEXT    NOT NULL DEFAULT '',
    last_error_ms   BIGINT  NOT NULL DEFAULT 0,
    PRIMARY KEY (destination, tenant)
);

CREATE TABLE IF NOT EXISTS outbox_destinations (
    id         TEXT    PRIMARY KEY, -- "<tenant>/<name>", or "*/<name>" for a global destination
    tenant     TEXT    NOT NULL,    -- '' for a global destination (every tenant's events)
    name       TEXT    NOT NULL,
    kind       TEXT    NOT NULL,
    url        TEXT    NOT NULL,
    settings   TEXT    NOT NULL,    -- JSON: filters and formatter settings (no secret)
    secret     TEXT    NOT NULL DEFAULT '',
    formatter  TEXT    NOT NULL DEFAULT '', -- digest of an uploaded formatter ('' = built-in)
    updated_ms BIGINT  NOT NULL
);
