-- The audit query's token filter (`jti`: the token's own events and, for a root token, its
-- whole delegation tree) reads a lookup table filled in slices, like the agent, tool and time
-- filters since 0008 (host/src/audit/facets.rs), instead of the partial indexes on jti and
-- root_jti. Agents call with long-lived tokens, so concurrent calls name many tokens, and an
-- index on jti put each event of a commit on its own token's leaf: one page rewritten per
-- event, in every commit. The table holds, for each event, its jti and (for a delegated
-- token) its root_jti, written once per slice; the query reads the events above
-- `audit_facets_mark.upto` from audit_events directly, so every event is still found as soon
-- as it commits. Entries are copied up to the mark only: the rest are entered when the
-- writer next moves the mark, in that transaction.
--
-- Entered by a trigger on the mark, not by the writer's own statements: a binary from before
-- this migration, run again after a rollback, moves the mark without knowing this table, and
-- the trigger keeps the table up all the same, so no event below the mark lacks its entries.

DROP INDEX IF EXISTS audit_events_jti;
DROP INDEX IF EXISTS audit_events_delegated_root_jti;

CREATE TABLE IF NOT EXISTS audit_token_facet (
    value     TEXT    NOT NULL, -- jti, or root_jti when it differs from jti
    scope     TEXT    NOT NULL, -- tenant
    event_id  INTEGER NOT NULL, -- audit_events.id
    PRIMARY KEY (value, scope, event_id)
) WITHOUT ROWID;

INSERT OR IGNORE INTO audit_token_facet (value, scope, event_id)
    SELECT jti, tenant, id FROM audit_events
    WHERE jti <> '' AND id <= (SELECT upto FROM audit_facets_mark)
    UNION ALL
    SELECT root_jti, tenant, id FROM audit_events
    WHERE root_jti <> '' AND root_jti <> jti AND id <= (SELECT upto FROM audit_facets_mark)
    ORDER BY 1, 2, 3;

CREATE TRIGGER IF NOT EXISTS audit_token_facet_follows_mark
AFTER UPDATE OF upto ON audit_facets_mark
WHEN NEW.upto > OLD.upto
BEGIN
    INSERT OR IGNORE INTO audit_token_facet (value, scope, event_id)
        SELECT jti, tenant, id FROM audit_events
        WHERE id > OLD.upto AND id <= NEW.upto AND jti <> ''
        UNION ALL
        SELECT root_jti, tenant, id FROM audit_events
        WHERE id > OLD.upto AND id <= NEW.upto AND root_jti <> '' AND root_jti <> jti;
END;
