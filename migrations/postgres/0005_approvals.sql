-- The approval queue (owned by host/src/approvals; see its module docs): one row per call a
-- policy escalated (or that needs a step-up). Rows are written only in the audit batch
-- transaction of the event that records each step (created, decided, consumed, expired), so
-- the queue and the chain never disagree. PostgreSQL flavour; migrations/sqlite/0005_approvals.sql
-- is the same schema for SQLite. Idempotent: safe to run on an existing database.
--
-- status: pending -> approved | rejected | expired; approved -> consumed | expired.
-- Times are unix milliseconds.

CREATE TABLE IF NOT EXISTS approvals (
    tenant                    TEXT    NOT NULL,
    pending_id                TEXT    NOT NULL,
    capability_token_id       TEXT    NOT NULL,
    root_capability_token_id  TEXT    NOT NULL,
    agent_id                  TEXT    NOT NULL,
    tool                      TEXT    NOT NULL,
    -- The arguments under the audit's argument-persistence setting (JSON; NULL when off).
    args                      TEXT,
    args_digest               TEXT    NOT NULL,
    bundle_digest             TEXT    NOT NULL,
    intent_summary            TEXT    NOT NULL DEFAULT '',
    reason                    TEXT    NOT NULL DEFAULT '',
    status                    TEXT    NOT NULL,
    requires_step_up          BIGINT NOT NULL DEFAULT 0,
    created_ms                BIGINT NOT NULL,
    expires_ms                BIGINT NOT NULL,
    decided_ms                BIGINT,
    decided_by                TEXT,
    decide_note               TEXT,
    consumed_ms               BIGINT,
    PRIMARY KEY (tenant, pending_id)
);

CREATE INDEX IF NOT EXISTS approvals_by_status ON approvals (tenant, status, created_ms);
CREATE INDEX IF NOT EXISTS approvals_by_expiry ON approvals (status, expires_ms);
