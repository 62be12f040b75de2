-- The audit query's token filter (`jti`: the token's own events and, for a root token, its
-- whole delegation tree) finds a root token's own events through audit_events_jti, where
-- jti = root_jti. Indexing them a second time under root_jti cost every commit of a root
-- token's call (what most calls carry) one more b-tree page and WAL frame; the index now holds
-- only the events of delegated tokens. query.rs names both conditions in its SQL so that the
-- planner may use these partial indexes. Idempotent.

DROP INDEX IF EXISTS audit_events_root_jti;
CREATE INDEX IF NOT EXISTS audit_events_delegated_root_jti ON audit_events (root_jti)
    WHERE root_jti <> '' AND root_jti <> jti;
