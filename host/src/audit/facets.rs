//! The SQLite store's lookup tables for the audit query's agent, tool, time and token filters
//! (`audit_agent_facet`, `audit_tool_facet`, `audit_time_facet`, migration 0008;
//! `audit_token_facet`, migration 0009), filled by the writer in slices.
//!
//! An index on `(tenant, agent_id)` rewrites one leaf per tenant in every commit: with sixteen
//! tenants each such index cost the writer about a quarter of its time. An index on `jti` is
//! worse: agents call with long-lived tokens of their own, so each event of a commit lands on
//! its own token's leaf. These tables hold the
//! same entries, but the writer enters them only once [`SLICE`] events have gathered since the
//! last time, in the transaction of the commit that crosses it, so each leaf is written
//! once per slice instead of once per commit. `audit_facets_mark.upto` is the last
//! event id entered; a query takes the events above it from `audit_events` itself (at most
//! about a slice, read by id), and the rest through the table. So an event is found by its
//! token, agent, tool or time as soon as it commits, as through an index.
//!
//! The token table is entered by a trigger on the mark (migration 0009), not by [`CATCH_UP`]:
//! a binary from before 0009, run again after a rollback, moves the mark without knowing the
//! table, and the trigger keeps the table up all the same, so an upgrade after it finds no
//! hole below the mark.
//!
//! This module must never move the mark past an event it did not enter, nor enter one in a
//! transaction other than the one that moves the mark. PostgreSQL keeps ordinary indexes.

use rusqlite::Transaction;

use super::AuditError;
use super::query::AuditFilter;

/// Events gathered before the writer enters them: the most a query reads past the tables, and
/// the batch over which each table leaf is written once.
pub(crate) const SLICE: i64 = 1024;

/// Events gathered before a writer with nothing else to do enters them in a transaction of
/// their own. Nobody waits for that transaction, and it needs no sync of its own (lost in a
/// crash, the mark is simply lower): under a light load the tables keep up without a commit
/// that carries callers' events ever growing by a slice's entries.
pub(crate) const IDLE_SLICE: i64 = 128;

/// The most events the commit before an idle step may have carried: more, and the load is
/// heavy, the writer is only between two rounds of callers, and the slice is left to the
/// commit that crosses [`SLICE`]. Under a closed loop the writer finds nothing waiting after
/// almost every commit (the callers it just answered have not handed in again yet), so
/// without this bound the tables were entered 128 events at a time under any load, each
/// token's and agent's leaf written eight times as often as a slice writes it.
pub(crate) const LIGHT_COMMIT: usize = 8;

/// The last event id the tables cover, as a scalar subquery (read once per statement, from the
/// statement's snapshot: both halves of a query see the same mark).
pub(crate) const MARK: &str = "(SELECT upto FROM audit_facets_mark)";

/// Enters every event above the mark, then moves the mark to the last event (which enters the
/// token entries: the trigger of migration 0009). In id order, not
/// sorted by key: a slice's entries land on a few leaves per tenant, all in the cache, and
/// sorting them first cost more than it saved (3.0 against 2.4 µs an event).
const CATCH_UP: [&str; 4] = [
    "INSERT OR IGNORE INTO audit_agent_facet (value, scope, event_id) \
     SELECT agent_id, tenant, id FROM audit_events \
     WHERE id > (SELECT upto FROM audit_facets_mark) AND agent_id <> ''",
    "INSERT OR IGNORE INTO audit_tool_facet (value, scope, event_id) \
     SELECT tool, tenant, id FROM audit_events \
     WHERE id > (SELECT upto FROM audit_facets_mark) AND tool <> ''",
    "INSERT OR IGNORE INTO audit_time_facet (scope, value, event_id) \
     SELECT tenant, ts_ms, id FROM audit_events \
     WHERE id > (SELECT upto FROM audit_facets_mark)",
    "UPDATE audit_facets_mark SET upto = (SELECT COALESCE(MAX(id), 0) FROM audit_events) \
     WHERE only = 1",
];

/// One of the filters answered through a table. The token, agent and tool tables are keyed
/// `(value, scope, event_id)` (a value is found in every tenant, or in one); the time table
/// `(scope, value, event_id)` (a tenant's window).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Facet<'a> {
    /// A token id: the events of that token and of every token delegated from it.
    Token(&'a str),
    Agent(&'a str),
    Tool(&'a str),
    /// A tenant's time window (the tenant is the filter's).
    Time,
}

impl<'a> Facet<'a> {
    pub(crate) fn table(self) -> &'static str {
        match self {
            Facet::Token(_) => "audit_token_facet",
            Facet::Agent(_) => "audit_agent_facet",
            Facet::Tool(_) => "audit_tool_facet",
            Facet::Time => "audit_time_facet",
        }
    }

    /// The facet that drives a query with `filter`: its token (the narrowest: one agent's
    /// grant), else its agent, else its tool, else a tenant's time window; the other filters
    /// are then ordinary conditions. `None`: no table serves (the query reads `audit_events` by
    /// its own indexes, as on PostgreSQL).
    pub(crate) fn driving(filter: &'a AuditFilter) -> Option<Self> {
        if let Some(jti) = &filter.jti {
            return Some(Facet::Token(jti));
        }
        if let Some(agent) = &filter.agent_id {
            return Some(Facet::Agent(agent));
        }
        if let Some(tool) = &filter.tool {
            return Some(Facet::Tool(tool));
        }
        let window = filter.from_ms.is_some() || filter.to_ms.is_some();
        (filter.tenant.is_some() && window).then_some(Facet::Time)
    }
}

/// How many events the writer has appended above the mark.
#[derive(Debug)]
pub(crate) struct Lag {
    pending: i64,
    /// An idle catch-up failed: the next is left to the commit that crosses a slice (which
    /// refuses its callers if it fails too), so a broken store is not retried, and warned
    /// about, after every commit.
    idle_failed: bool,
}

impl Lag {
    /// The lag of the store as it is now (at start-up: what an earlier process left).
    pub(crate) fn read(conn: &rusqlite::Connection) -> Result<Self, AuditError> {
        let pending: i64 = conn.query_row(
            "SELECT COALESCE(MAX(id), 0) - (SELECT upto FROM audit_facets_mark) FROM audit_events",
            [],
            |r| r.get(0),
        )?;
        Ok(Self {
            pending: pending.max(0),
            idle_failed: false,
        })
    }

    /// Counts `appended` events of the open transaction and, once a slice has gathered, enters
    /// them all in it. Returns the lag to keep once the transaction commits (the caller keeps
    /// the old one if it does not).
    pub(crate) fn settle(&self, tx: &Transaction<'_>, appended: usize) -> Result<Self, AuditError> {
        let pending = self.pending + appended as i64;
        if pending < SLICE {
            return Ok(Self {
                pending,
                idle_failed: self.idle_failed,
            });
        }
        catch_up(tx)?;
        Ok(Self {
            pending: 0,
            idle_failed: false,
        })
    }

    /// With the writer idle after a commit of `committed` events: enters what has gathered,
    /// in a transaction of its own, once [`IDLE_SLICE`] events have and the commit was light
    /// ([`LIGHT_COMMIT`]). A failure keeps the lag, refuses no caller, and leaves the next
    /// attempt to the commit that crosses a slice.
    pub(crate) fn idle(
        &mut self,
        conn: &mut rusqlite::Connection,
        committed: usize,
    ) -> Result<(), AuditError> {
        if self.pending < IDLE_SLICE || self.idle_failed || committed > LIGHT_COMMIT {
            return Ok(());
        }
        let entered = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(AuditError::from)
            .and_then(|tx| {
                catch_up(&tx)?;
                Ok(tx.commit()?)
            });
        match entered {
            Ok(()) => self.pending = 0,
            Err(_) => self.idle_failed = true,
        }
        entered
    }
}

fn catch_up(tx: &Transaction<'_>) -> Result<(), AuditError> {
    for sql in CATCH_UP {
        tx.prepare_cached(sql)?.raw_execute()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A migrated in-memory store with `n` events of tenant `t`, alternating two agents,
    /// three tools and four root tokens (every third call by a token delegated from one), none
    /// entered (the mark left at 0).
    fn store_with(n: i64) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open_in_memory().expect("sqlite");
        for migration in MIGRATIONS {
            conn.execute_batch(migration).expect("migration");
        }
        append(&conn, 1, n);
        conn
    }

    pub(crate) const MIGRATIONS: [&str; 4] = [
        include_str!("../../../migrations/sqlite/0002_audit.sql"),
        include_str!("../../../migrations/sqlite/0007_audit_token_index.sql"),
        include_str!("../../../migrations/sqlite/0008_audit_facets.sql"),
        include_str!("../../../migrations/sqlite/0009_audit_token_facet.sql"),
    ];

    fn append(conn: &rusqlite::Connection, from: i64, to: i64) {
        for i in from..=to {
            let root = format!("tok-{}", i % 4);
            let jti = if i % 3 == 0 {
                format!("child-{i}")
            } else {
                root.clone()
            };
            conn.execute(
                "INSERT INTO audit_events (tenant, seq, ts_ms, event, agent_id, tool, jti, root_jti, body, prev_hash, hash) \
                 VALUES ('t', ?1, ?1, 'tool_call', ?2, ?3, ?4, ?5, '{}', '', '')",
                rusqlite::params![i, format!("agent-{}", i % 2), format!("tool-{}", i % 3), jti, root],
            )
            .expect("insert");
        }
    }

    /// Token entries for events 1..=n of [`append`]: each its own token, and every third
    /// (a delegated token's) its root as well.
    fn tokens(n: i64) -> i64 {
        n + n / 3
    }

    /// Agent, tool and token entries, and the mark.
    fn counts(conn: &rusqlite::Connection) -> (i64, i64, i64, i64) {
        conn.query_row(
            "SELECT (SELECT count(*) FROM audit_agent_facet), (SELECT count(*) FROM audit_tool_facet), \
             (SELECT count(*) FROM audit_token_facet), (SELECT upto FROM audit_facets_mark)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .expect("counts")
    }

    #[test]
    fn the_writer_enters_events_once_a_slice_has_gathered() {
        let mut conn = store_with(SLICE - 1);
        let lag = Lag::read(&conn).expect("lag");
        assert_eq!(lag.pending, SLICE - 1);
        let tx = conn.transaction().expect("tx");
        let lag = lag.settle(&tx, 0).expect("settle");
        tx.commit().expect("commit");
        assert_eq!(
            counts(&conn),
            (0, 0, 0, 0),
            "under a slice, nothing is entered"
        );

        append(&conn, SLICE, SLICE + 9);
        let tx = conn.transaction().expect("tx");
        let lag = lag.settle(&tx, 10).expect("settle");
        tx.commit().expect("commit");
        assert_eq!(lag.pending, 0);
        let n = SLICE + 9;
        assert_eq!(
            counts(&conn),
            (n, n, tokens(n), n),
            "every event entered, the mark at the last"
        );
        let entered: i64 = conn
            .query_row(
                "SELECT count(*) FROM audit_tool_facet f JOIN audit_events e ON e.id = f.event_id \
                 WHERE f.value = e.tool AND f.scope = e.tenant",
                [],
                |r| r.get(0),
            )
            .expect("joined");
        assert_eq!(
            entered, n,
            "each entry names its own event's tool and tenant"
        );
        let under_root: i64 = conn
            .query_row(
                "SELECT count(*) FROM audit_token_facet f JOIN audit_events e ON e.id = f.event_id \
                 WHERE f.value = e.root_jti AND e.root_jti <> e.jti AND f.scope = e.tenant",
                [],
                |r| r.get(0),
            )
            .expect("joined");
        assert_eq!(
            under_root,
            n / 3,
            "a delegated token's event is entered under its root too"
        );
    }

    #[test]
    fn an_idle_writer_enters_a_smaller_slice_on_its_own() {
        let mut conn = store_with(IDLE_SLICE - 1);
        let mut lag = Lag::read(&conn).expect("lag");
        lag.idle(&mut conn, 1).expect("idle");
        assert_eq!(
            counts(&conn),
            (0, 0, 0, 0),
            "under an idle slice, nothing is entered"
        );
        append(&conn, IDLE_SLICE, IDLE_SLICE);
        lag.pending += 1;
        lag.idle(&mut conn, 1).expect("idle");
        let n = IDLE_SLICE;
        assert_eq!(counts(&conn), (n, n, tokens(n), n));
        assert_eq!(lag.pending, 0);
        assert_eq!(Lag::read(&conn).expect("lag").pending, 0);
    }

    /// The token table follows the mark through migration 0009's trigger, whatever moves it:
    /// a binary from before 0009 (after a rollback) moves the mark with its own statements,
    /// and an upgrade after it must find no event below the mark without its entries. Events
    /// without a token (an administrator's) are not entered.
    #[test]
    fn the_token_table_follows_the_mark_whatever_moves_it() {
        let conn = store_with(20);
        conn.execute(
            "INSERT INTO audit_events (tenant, seq, ts_ms, event, body, prev_hash, hash) \
             VALUES ('t', 21, 21, 'admin', '{}', '', '')",
            [],
        )
        .expect("an event without a token");
        conn.execute("UPDATE audit_facets_mark SET upto = 12 WHERE only = 1", [])
            .expect("move");
        assert_eq!(counts(&conn).2, tokens(12));
        conn.execute("UPDATE audit_facets_mark SET upto = 21 WHERE only = 1", [])
            .expect("move");
        assert_eq!(
            counts(&conn).2,
            tokens(20),
            "the tokenless event has no entry"
        );
        let own: i64 = conn
            .query_row(
                "SELECT count(*) FROM audit_token_facet f JOIN audit_events e ON e.id = f.event_id \
                 WHERE f.scope = e.tenant AND (f.value = e.jti OR f.value = e.root_jti)",
                [],
                |r| r.get(0),
            )
            .expect("joined");
        assert_eq!(
            own,
            tokens(20),
            "each entry names its own event's token or root"
        );
    }

    /// After a heavy commit the writer is only between two rounds of callers: it leaves the
    /// gathered events to the commit that crosses a slice.
    #[test]
    fn a_writer_between_heavy_commits_leaves_the_slice_to_them() {
        let mut conn = store_with(IDLE_SLICE * 2);
        let mut lag = Lag::read(&conn).expect("lag");
        lag.idle(&mut conn, LIGHT_COMMIT + 1).expect("idle");
        assert_eq!(counts(&conn), (0, 0, 0, 0), "entered after a heavy commit");
        assert_eq!(lag.pending, IDLE_SLICE * 2);
        lag.idle(&mut conn, LIGHT_COMMIT).expect("idle");
        let n = IDLE_SLICE * 2;
        assert_eq!(
            counts(&conn),
            (n, n, tokens(n), n),
            "a light commit's idle step enters"
        );
    }

    /// A failed idle catch-up keeps the lag and is not retried at every idle moment; the
    /// commit that crosses a slice tries again.
    #[test]
    fn a_failed_idle_catch_up_waits_for_the_next_slice() {
        let mut conn = store_with(IDLE_SLICE);
        let mut lag = Lag::read(&conn).expect("lag");
        conn.execute_batch("ALTER TABLE audit_tool_facet RENAME TO elsewhere")
            .expect("break");
        assert!(lag.idle(&mut conn, 1).is_err());
        assert!(lag.idle_failed);
        assert_eq!(lag.pending, IDLE_SLICE, "the lag is kept");
        conn.execute_batch("ALTER TABLE elsewhere RENAME TO audit_tool_facet")
            .expect("mend");
        lag.idle(&mut conn, 1).expect("not tried");
        assert_eq!(counts(&conn), (0, 0, 0, 0), "not retried while idle");
        append(&conn, IDLE_SLICE + 1, SLICE);
        let tx = conn.transaction().expect("tx");
        let lag = lag
            .settle(&tx, (SLICE - IDLE_SLICE) as usize)
            .expect("settle");
        tx.commit().expect("commit");
        assert!(!lag.idle_failed && lag.pending == 0);
        assert_eq!(counts(&conn), (SLICE, SLICE, tokens(SLICE), SLICE));
    }

    #[test]
    fn a_transaction_rolled_back_enters_nothing() {
        let mut conn = store_with(SLICE);
        let lag = Lag::read(&conn).expect("lag");
        {
            let tx = conn.transaction().expect("tx");
            lag.settle(&tx, 0).expect("settle");
            // dropped: rolled back
        }
        assert_eq!(counts(&conn), (0, 0, 0, 0));
        assert_eq!(Lag::read(&conn).expect("lag").pending, SLICE);
    }

    #[test]
    fn the_migration_enters_the_events_already_stored() {
        let mut conn = rusqlite::Connection::open_in_memory().expect("sqlite");
        for migration in &MIGRATIONS[..2] {
            conn.execute_batch(migration).expect("migration");
        }
        append(&conn, 1, 30);
        conn.execute("UPDATE audit_events SET agent_id = '' WHERE seq = 7", [])
            .expect("blank agent");
        conn.execute_batch(MIGRATIONS[2]).expect("0008");
        // Events stored after 0008 and before 0009 are above the mark: 0009 leaves them to
        // the writer's next slice.
        append(&conn, 31, 35);
        conn.execute_batch(MIGRATIONS[3]).expect("0009");
        assert_eq!(
            counts(&conn),
            (29, 30, tokens(30), 30),
            "empty values are not entered; the token table up to the mark"
        );
        assert_eq!(Lag::read(&conn).expect("lag").pending, 5);
        let tx = conn.transaction().expect("tx");
        Lag {
            pending: SLICE,
            idle_failed: false,
        }
        .settle(&tx, 0)
        .expect("settle");
        tx.commit().expect("commit");
        assert_eq!(counts(&conn), (34, 35, tokens(35), 35));
    }

    /// The token, agent, tool and time filters find through the API exactly what the plain
    /// conditions find, on events below the mark, above it, and across it, page by page both
    /// ways; and their plans read the lookup table and the events above the mark by id, never
    /// a tenant's events whole.
    #[tokio::test]
    async fn filters_find_the_same_events_below_and_above_the_mark() {
        use crate::audit::query::{self, AuditFilter};
        let (dir, pool) = super::super::committer::tests::migrated(
            "f.sqlite3",
            sqlx::sqlite::SqliteJournalMode::Wal,
        )
        .await;
        let file = dir.path().join("f.sqlite3");
        // 2,000 events of two tenants; the first 1,300 entered, the rest above the mark.
        let mut conn = rusqlite::Connection::open(&file).expect("open");
        let insert = |conn: &rusqlite::Connection, from: i64, to: i64| {
            for i in from..=to {
                let tenant = if i % 4 == 0 { "b" } else { "a" };
                // Seven root tokens; every third call by a token delegated from one.
                let root = format!("root-{}", i % 7);
                let jti = if i % 3 == 0 {
                    format!("child-{}", i % 11)
                } else {
                    root.clone()
                };
                conn.execute(
                    "INSERT INTO audit_events (tenant, seq, ts_ms, event, agent_id, tool, jti, root_jti, body, prev_hash, hash) \
                     VALUES (?1, ?2, ?2, 'tool_call', ?3, ?4, ?5, ?6, '{}', '', '')",
                    rusqlite::params![tenant, i, format!("agent-{}", i % 3), format!("tool-{}", i % 5), jti, root],
                )
                .expect("insert");
            }
        };
        insert(&conn, 1, 1300);
        let tx = conn.transaction().expect("tx");
        let lag = Lag {
            pending: SLICE,
            idle_failed: false,
        }
        .settle(&tx, 0)
        .expect("settle");
        tx.commit().expect("commit");
        assert_eq!(lag.pending, 0);
        insert(&conn, 1301, 2000);
        assert_eq!(counts(&conn).3, 1300);

        let db = crate::audit::Db::Sqlite(pool);
        // Each filter, and the plain conditions that find the same events (`ts_ms` = `seq`).
        let filters = [
            (
                vec![("tenant", "a"), ("agent_id", "agent-1")],
                "tenant = 'a' AND agent_id = 'agent-1'",
            ),
            (
                vec![("tenant", "a"), ("tool", "tool-2")],
                "tenant = 'a' AND tool = 'tool-2'",
            ),
            (
                vec![("tenant", "b"), ("agent_id", "agent-2"), ("tool", "tool-4")],
                "tenant = 'b' AND agent_id = 'agent-2' AND tool = 'tool-4'",
            ),
            (vec![("tool", "tool-0")], "tool = 'tool-0'"),
            (
                vec![("tenant", "a"), ("agent_id", "nobody")],
                "tenant = 'a' AND agent_id = 'nobody'",
            ),
            (
                vec![
                    ("tenant", "a"),
                    ("from", "1970-01-01T00:00:00.500Z"),
                    ("to", "1970-01-01T00:00:01.700Z"),
                ],
                "tenant = 'a' AND ts_ms >= 500 AND ts_ms <= 1700",
            ),
            (
                vec![("tenant", "b"), ("from", "1970-01-01T00:00:01.250Z")],
                "tenant = 'b' AND ts_ms >= 1250",
            ),
            (
                vec![
                    ("tenant", "a"),
                    ("to", "1970-01-01T00:00:00.100Z"),
                    ("tool", "tool-1"),
                ],
                "tenant = 'a' AND ts_ms <= 100 AND tool = 'tool-1'",
            ),
            (
                vec![("tenant", "a"), ("jti", "root-3")],
                "tenant = 'a' AND (jti = 'root-3' OR root_jti = 'root-3')",
            ),
            (
                vec![("tenant", "b"), ("jti", "child-5"), ("agent_id", "agent-0")],
                "tenant = 'b' AND jti = 'child-5' AND agent_id = 'agent-0'",
            ),
            (
                vec![("jti", "root-6"), ("from", "1970-01-01T00:00:01.000Z")],
                "(jti = 'root-6' OR root_jti = 'root-6') AND ts_ms >= 1000",
            ),
        ];
        for (pairs, plain) in filters {
            let f = AuditFilter::from_params(pairs.iter().copied()).expect("filter");
            let plain = format!("SELECT id FROM audit_events WHERE {plain}");
            let mut want: Vec<i64> = {
                let mut stmt = conn
                    .prepare(&format!("{plain} ORDER BY id DESC"))
                    .expect("plain");
                stmt.query_map([], |r| r.get(0))
                    .expect("rows")
                    .collect::<Result<_, _>>()
                    .expect("ids")
            };
            let mut newest_first = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let page = query::list(&db, &f, cursor.as_deref(), 37)
                    .await
                    .expect("list");
                newest_first.extend(page.items.iter().map(|r| r.id));
                match page.next_cursor {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            assert_eq!(newest_first, want, "list {pairs:?}");
            let mut oldest_first = Vec::new();
            let mut after = 0;
            loop {
                let rows = query::scan(&db, &f, after, 1900, 41).await.expect("scan");
                let Some(last) = rows.last() else { break };
                after = last.id;
                oldest_first.extend(rows.iter().map(|r| r.id));
            }
            want.retain(|id| *id <= 1900);
            want.reverse();
            assert_eq!(oldest_first, want, "scan {pairs:?}");
        }

        // The plans of a tenant's agent filter and of its time window.
        let plan_of = |pairs: &[(&str, &str)]| -> String {
            let f = AuditFilter::from_params(pairs.iter().copied()).expect("f");
            let mut values = Vec::new();
            let sql = query::records_sql_for_test(&db, &f, &mut values);
            let mut stmt = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .expect("plan");
            // By name: `$n` is the n-th value, wherever the text first names it.
            for (i, v) in values.iter().enumerate() {
                if let Some(at) = stmt.parameter_index(&format!("${}", i + 1)).expect("name") {
                    stmt.raw_bind_parameter(at, v).expect("bind");
                }
            }
            let mut plan = Vec::new();
            let mut rows = stmt.raw_query();
            while let Some(row) = rows.next().expect("row") {
                plan.push(row.get::<_, String>(3).expect("detail"));
            }
            plan.join("\n")
        };
        let by_table = |plan: &str, search: &str| {
            assert!(
                plan.contains(search)
                    && plan.contains("SEARCH audit_events USING INTEGER PRIMARY KEY (rowid>?)")
                    && plan.contains("SEARCH audit_events USING INTEGER PRIMARY KEY (rowid=?)")
                    && !plan.contains("SCAN audit_events")
                    && !plan.contains("audit_events_tenant"),
                "not read through its table:\n{plan}"
            );
        };
        by_table(
            &plan_of(&[("tenant", "a"), ("agent_id", "agent-1")]),
            "SEARCH audit_agent_facet USING PRIMARY KEY (value=? AND scope=? AND event_id",
        );
        by_table(
            &plan_of(&[("tenant", "a"), ("from", "1970-01-01T00:00:00.500Z")]),
            "SEARCH audit_time_facet USING PRIMARY KEY (scope=? AND value>?)",
        );
        by_table(
            &plan_of(&[("tenant", "a"), ("jti", "root-3")]),
            "SEARCH audit_token_facet USING PRIMARY KEY (value=? AND scope=? AND event_id",
        );
    }
}
