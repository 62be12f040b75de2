-- The audit query's agent, tool and time filters find a tenant's events through three lookup
-- tables that the writer fills in slices (host/src/audit/facets.rs), not through indexes that
-- every commit must update. An index on (tenant, agent_id), (tenant, tool) or (tenant, ts_ms)
-- is rewritten one leaf per tenant per commit: with 16 tenants that was about a quarter of
-- the writer's time each (BENCHMARKS.md, session 22). The tables hold the same entries, written once per slice of
-- events; `audit_facets_mark.upto` is the last event id they cover, and a query reads the
-- events above it from audit_events directly, so every event is found as soon as it commits.
-- Entries are written in the transaction that moves the mark: the tables and the mark can never
-- disagree. Empty values are not entered (no filter asks for them).

DROP INDEX IF EXISTS audit_events_tenant_ts;
DROP INDEX IF EXISTS audit_events_tenant_agent;
DROP INDEX IF EXISTS audit_events_tenant_tool;

CREATE TABLE IF NOT EXISTS audit_agent_facet (
    value     TEXT    NOT NULL, -- agent_id
    scope     TEXT    NOT NULL, -- tenant
    event_id  INTEGER NOT NULL, -- audit_events.id
    PRIMARY KEY (value, scope, event_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS audit_tool_facet (
    value     TEXT    NOT NULL, -- tool
    scope     TEXT    NOT NULL, -- tenant
    event_id  INTEGER NOT NULL, -- audit_events.id
    PRIMARY KEY (value, scope, event_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS audit_time_facet (
    scope     TEXT    NOT NULL, -- tenant
    value     INTEGER NOT NULL, -- ts_ms
    event_id  INTEGER NOT NULL, -- audit_events.id
    PRIMARY KEY (scope, value, event_id)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS audit_facets_mark (
    only  INTEGER PRIMARY KEY CHECK (only = 1),
    upto  INTEGER NOT NULL CHECK (upto >= 0)
);

INSERT INTO audit_agent_facet (value, scope, event_id)
    SELECT agent_id, tenant, id FROM audit_events WHERE agent_id <> '' ORDER BY 1, 2, 3;
INSERT INTO audit_tool_facet (value, scope, event_id)
    SELECT tool, tenant, id FROM audit_events WHERE tool <> '' ORDER BY 1, 2, 3;
INSERT INTO audit_time_facet (scope, value, event_id)
    SELECT tenant, ts_ms, id FROM audit_events ORDER BY 1, 2, 3;
INSERT INTO audit_facets_mark (only, upto)
    SELECT 1, COALESCE(MAX(id), 0) FROM audit_events;
