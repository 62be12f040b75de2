//! The SQLite store's lookup tables for the audit query's token, agent, tool and time filters,
//! kept in a file of their own beside the database (`<database>-facets`, attached read-only to
//! every connection of the store's pool as [`SCHEMA`]) and entered by a thread of their own
//! (`facet_writer.rs`), the only connection that writes it.
//!
//! An index on `(tenant, agent_id)` rewrites one leaf per tenant in every commit, and an index
//! on `jti` one leaf per token: agents call with long-lived tokens of their own, so each event
//! of a commit landed on its own page. These tables hold the same entries, entered many events
//! at a time, so each leaf is written once per slice instead of once per commit. SQLite's
//! write lock is per file: with the tables in a file of their own, entering them never holds
//! the lock the audit writer commits under, so the callers' commits never carry them (in the
//! database file itself, migrations 0008 and 0009, a slice cost the commit crossing it about
//! 530 page writes with 256 tokens).
//!
//! `audit_facets_mark.upto` is the last event id entered; a query takes the events above it
//! from `audit_events` itself (read by id), and the rest through the tables, so an event is
//! found by its token, agent, tool or time as soon as it commits, as through an index. The
//! mark keeps the hash of the last event it covers: a database file restored from a backup,
//! or a store that lost events the tables had entered, no longer holds that event, and the
//! tables are then emptied and entered again from the start ([`prepare`]).
//!
//! The tables are a cache of `audit_events`, nothing more: every query also applies its
//! conditions to the event row itself, and the file can be deleted (with its `-wal` and
//! `-shm`) while the gateway is stopped: it is entered again. The tables of migrations 0008 and 0009 in the database file
//! are left as they were, so a binary from before this file still finds them after a
//! rollback; the first start copies them here instead of entering everything again.
//!
//! This module must never enter an event the audit writer has not made durable (a power cut
//! could take it back and its id be reused), never move the mark past an event it did not
//! enter, and never write the database file. PostgreSQL keeps ordinary indexes.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension};

use super::AuditError;
use super::query::AuditFilter;

/// The name the lookup file is attached under on every connection to the database.
pub(crate) const SCHEMA: &str = "facets";

/// The last event id the tables cover, as a scalar subquery (read once per statement, from the
/// statement's snapshot: both halves of a query see the same mark).
pub(crate) const MARK: &str = "(SELECT upto FROM facets.audit_facets_mark)";

/// The lookup file of the database at `db`: `<db>-facets` (an in-memory database keeps its
/// tables in memory too).
pub(crate) fn path_of(db: &Path) -> PathBuf {
    if db.as_os_str() == ":memory:" {
        return db.to_path_buf();
    }
    let mut name = db.as_os_str().to_owned();
    name.push("-facets");
    PathBuf::from(name)
}

/// The lookup file as a URI opening it read-only (how the store's pool attaches it; an
/// in-memory database attaches an in-memory file).
pub(crate) fn read_only_uri(db: &Path) -> String {
    let file = path_of(db);
    if file.as_os_str() == ":memory:" {
        return ":memory:".into();
    }
    let mut uri = String::from("file:");
    for b in file.to_string_lossy().bytes() {
        match b {
            b'?' | b'#' | b'%' => uri.push_str(&format!("%{b:02X}")),
            _ => uri.push(b as char),
        }
    }
    uri.push_str("?mode=ro");
    uri
}

/// Makes the lookup file of the database at `db` exist, in WAL mode, before anything attaches
/// it. A file SQLite cannot read as a database (damaged, or deleted without its `-wal`, whose
/// frames SQLite then replays onto an empty file) is removed with its `-wal` and `-shm` and made
/// anew: it is a cache, entered again.
pub(crate) fn create(db: &Path) -> Result<(), AuditError> {
    let file = path_of(db);
    if file.as_os_str() == ":memory:" {
        return Ok(());
    }
    let open = || -> Result<(), rusqlite::Error> {
        let conn = Connection::open(&file)?;
        conn.busy_timeout(crate::store::SQLITE_BUSY_TIMEOUT)?;
        let _: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
            r.get::<_, i64>(0)
        })?;
        Ok(())
    };
    match open() {
        Ok(()) => Ok(()),
        Err(e) if is_damaged(&e) => {
            tracing::warn!(file = %file.display(), error = %e, "the audit lookup file is damaged; making it anew (its tables are entered again)");
            for suffix in ["", "-wal", "-shm"] {
                let mut name = file.as_os_str().to_owned();
                name.push(suffix);
                match std::fs::remove_file(&name) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
                    _ => {}
                }
            }
            Ok(open()?)
        }
        Err(e) => Err(e.into()),
    }
}

fn is_damaged(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
    )
}

/// The lookup file's schema. The tables of migrations 0008 and 0009, and the mark with the
/// hash of the event it covers.
const CREATE: [&str; 5] = [
    "CREATE TABLE IF NOT EXISTS facets.audit_agent_facet (
        value TEXT NOT NULL, scope TEXT NOT NULL, event_id INTEGER NOT NULL,
        PRIMARY KEY (value, scope, event_id)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS facets.audit_tool_facet (
        value TEXT NOT NULL, scope TEXT NOT NULL, event_id INTEGER NOT NULL,
        PRIMARY KEY (value, scope, event_id)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS facets.audit_time_facet (
        scope TEXT NOT NULL, value INTEGER NOT NULL, event_id INTEGER NOT NULL,
        PRIMARY KEY (scope, value, event_id)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS facets.audit_token_facet (
        value TEXT NOT NULL, scope TEXT NOT NULL, event_id INTEGER NOT NULL,
        PRIMARY KEY (value, scope, event_id)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS facets.audit_facets_mark (
        only INTEGER PRIMARY KEY CHECK (only = 1),
        upto INTEGER NOT NULL CHECK (upto >= 0),
        upto_hash TEXT NOT NULL)",
];

const TABLES: [&str; 4] = [
    "audit_agent_facet",
    "audit_tool_facet",
    "audit_time_facet",
    "audit_token_facet",
];

/// Enters the events with `?1 < id <= ?2` (in id order, not sorted by key: a slice's entries
/// land on a few leaves per value, all in the cache), then moves the mark to `?2`. A token's
/// event is entered under its own id and, for a delegated token, under its root's too.
const ENTER: [&str; 6] = [
    "INSERT OR IGNORE INTO facets.audit_agent_facet (value, scope, event_id) \
     SELECT agent_id, tenant, id FROM main.audit_events \
     WHERE id > ?1 AND id <= ?2 AND agent_id <> ''",
    "INSERT OR IGNORE INTO facets.audit_tool_facet (value, scope, event_id) \
     SELECT tool, tenant, id FROM main.audit_events \
     WHERE id > ?1 AND id <= ?2 AND tool <> ''",
    "INSERT OR IGNORE INTO facets.audit_time_facet (scope, value, event_id) \
     SELECT tenant, ts_ms, id FROM main.audit_events WHERE id > ?1 AND id <= ?2",
    "INSERT OR IGNORE INTO facets.audit_token_facet (value, scope, event_id) \
     SELECT jti, tenant, id FROM main.audit_events WHERE id > ?1 AND id <= ?2 AND jti <> ''",
    "INSERT OR IGNORE INTO facets.audit_token_facet (value, scope, event_id) \
     SELECT root_jti, tenant, id FROM main.audit_events \
     WHERE id > ?1 AND id <= ?2 AND root_jti <> '' AND root_jti <> jti",
    "UPDATE facets.audit_facets_mark SET upto = ?2, upto_hash = \
     COALESCE((SELECT hash FROM main.audit_events WHERE id <= ?2 ORDER BY id DESC LIMIT 1), '') \
     WHERE only = 1 AND upto = ?1",
];

/// The hash of the last event at or below `upto` ('' when there is none): what the mark keeps.
const HASH_AT: &str = "SELECT COALESCE(\
     (SELECT hash FROM main.audit_events WHERE id <= ?1 ORDER BY id DESC LIMIT 1), '')";

/// Attaches the lookup file of the database at `db` to `conn` as [`SCHEMA`].
pub(crate) fn attach(conn: &Connection, db: &Path) -> Result<(), AuditError> {
    let file = path_of(db);
    conn.execute(
        "ATTACH DATABASE ?1 AS facets",
        [file.to_string_lossy().as_ref()],
    )?;
    Ok(())
}

/// At start-up, before anything queries or enters the tables: creates the lookup file (in WAL
/// mode), and checks its mark against the database. A new file is filled from the tables of
/// migrations 0008 and 0009 up to their mark; a mark whose event is gone or different (a
/// restored backup, a power cut that took back events the tables held) empties the tables and
/// fills them again the same way; the lookup writer enters the rest. `conn` is a connection to
/// the migrated database with the file attached ([`attach`]); nothing else may write the file
/// meanwhile.
pub(crate) fn prepare(conn: &mut Connection) -> Result<(), AuditError> {
    let mode: String = conn.query_row("PRAGMA facets.journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") && !mode.eq_ignore_ascii_case("memory") {
        tracing::warn!(journal_mode = %mode, "the audit lookup file is not in WAL mode");
    }
    for sql in CREATE {
        conn.execute_batch(sql)?;
    }
    // Deferred: the database file is only read, and its write lock never taken.
    let tx = conn.transaction()?;
    let mark: Option<(i64, String)> = tx
        .query_row(
            "SELECT upto, upto_hash FROM facets.audit_facets_mark",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let hash_at = |upto: i64| -> Result<String, AuditError> {
        Ok(tx.query_row(HASH_AT, [upto], |r| r.get(0))?)
    };
    // The tables of 0008 and 0009 in the database file hold every entry up to their mark,
    // consistent with its events whatever happened to this file (in key order: the copy
    // appends). Returns the mark they reach.
    let copy = || -> Result<i64, AuditError> {
        let upto: i64 =
            tx.query_row("SELECT upto FROM main.audit_facets_mark", [], |r| r.get(0))?;
        for table in TABLES {
            tx.execute(
                &format!(
                    "INSERT OR IGNORE INTO facets.{table} SELECT * FROM main.{table} \
                     WHERE event_id <= ?1"
                ),
                [upto],
            )?;
        }
        Ok(upto)
    };
    match mark {
        None => {
            let upto = copy()?;
            tx.execute(
                "INSERT INTO facets.audit_facets_mark (only, upto, upto_hash) VALUES (1, ?1, ?2)",
                rusqlite::params![upto, hash_at(upto)?],
            )?;
        }
        Some((upto, hash)) if hash_at(upto)? != hash => {
            tracing::warn!(
                upto,
                "the audit lookup tables cover events this database does not hold (restored from a backup, or events lost with power); entering them again"
            );
            for table in TABLES {
                tx.execute(&format!("DELETE FROM facets.{table}"), [])?;
            }
            let upto = copy()?;
            tx.execute(
                "UPDATE facets.audit_facets_mark SET upto = ?1, upto_hash = ?2 WHERE only = 1",
                rusqlite::params![upto, hash_at(upto)?],
            )?;
        }
        Some(_) => {}
    }
    tx.commit()?;
    Ok(())
}

/// The mark and the last event id now: what is left to enter.
pub(crate) fn lag(conn: &Connection) -> Result<(i64, i64), AuditError> {
    Ok(conn.query_row(
        "SELECT (SELECT upto FROM facets.audit_facets_mark), \
         (SELECT COALESCE(MAX(id), 0) FROM main.audit_events)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?)
}

/// Enters the events with `from < id <= to` in one transaction of the lookup file, the mark
/// being at `from`. The caller has made sure that every one is durable.
pub(crate) fn enter(conn: &mut Connection, from: i64, to: i64) -> Result<(), AuditError> {
    // Deferred: it reads the database file and writes only the lookup file, so it takes only
    // the lookup file's write lock (`BEGIN IMMEDIATE` would take every attached file's).
    let tx = conn.transaction()?;
    for sql in &ENTER[..ENTER.len() - 1] {
        tx.prepare_cached(sql)?.execute([from, to])?;
    }
    let moved = tx
        .prepare_cached(ENTER[ENTER.len() - 1])?
        .execute([from, to])?;
    if moved != 1 {
        // Someone else moved the mark: nothing of this is kept.
        return Err(AuditError::Integrity(format!(
            "the audit lookup tables' mark is no longer at {from}"
        )));
    }
    tx.commit()?;
    Ok(())
}

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
            Facet::Token(_) => "facets.audit_token_facet",
            Facet::Agent(_) => "facets.audit_agent_facet",
            Facet::Tool(_) => "facets.audit_tool_facet",
            Facet::Time => "facets.audit_time_facet",
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A migrated in-memory store, its lookup tables attached and prepared, with `n` events
    /// of tenant `t`, alternating two agents, three tools and four root tokens (every third
    /// call by a token delegated from one), none entered.
    fn store_with(n: i64) -> Connection {
        let mut conn = Connection::open_in_memory().expect("sqlite");
        for migration in MIGRATIONS {
            conn.execute_batch(migration).expect("migration");
        }
        attach(&conn, Path::new(":memory:")).expect("attach");
        prepare(&mut conn).expect("prepare");
        append(&conn, 1, n);
        conn
    }

    pub(crate) const MIGRATIONS: [&str; 4] = [
        include_str!("../../../migrations/sqlite/0002_audit.sql"),
        include_str!("../../../migrations/sqlite/0007_audit_token_index.sql"),
        include_str!("../../../migrations/sqlite/0008_audit_facets.sql"),
        include_str!("../../../migrations/sqlite/0009_audit_token_facet.sql"),
    ];

    fn append(conn: &Connection, from: i64, to: i64) {
        for i in from..=to {
            let root = format!("tok-{}", i % 4);
            let jti = if i % 3 == 0 {
                format!("child-{i}")
            } else {
                root.clone()
            };
            conn.execute(
                "INSERT INTO main.audit_events (tenant, seq, ts_ms, event, agent_id, tool, jti, root_jti, body, prev_hash, hash) \
                 VALUES ('t', ?1, ?1, 'tool_call', ?2, ?3, ?4, ?5, '{}', '', printf('h%d', ?1))",
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

    /// Agent, tool and token entries, and the mark, of the tables in `schema` (`facets`, or
    /// `main`: those of migrations 0008 and 0009).
    fn counts(conn: &Connection, schema: &str) -> (i64, i64, i64, i64) {
        conn.query_row(
            &format!(
                "SELECT (SELECT count(*) FROM {schema}.audit_agent_facet), \
                 (SELECT count(*) FROM {schema}.audit_tool_facet), \
                 (SELECT count(*) FROM {schema}.audit_token_facet), \
                 (SELECT upto FROM {schema}.audit_facets_mark)"
            ),
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .expect("counts")
    }

    fn mark_hash(conn: &Connection) -> String {
        conn.query_row("SELECT upto_hash FROM facets.audit_facets_mark", [], |r| {
            r.get(0)
        })
        .expect("mark")
    }

    #[test]
    fn entering_a_slice_enters_every_event_of_it_and_moves_the_mark() {
        let mut conn = store_with(30);
        assert_eq!(counts(&conn, "facets"), (0, 0, 0, 0));
        assert_eq!(lag(&conn).expect("lag"), (0, 30));
        enter(&mut conn, 0, 20).expect("enter");
        assert_eq!(counts(&conn, "facets"), (20, 20, tokens(20), 20));
        assert_eq!(mark_hash(&conn), "h20", "the mark keeps its event's hash");
        enter(&mut conn, 20, 30).expect("enter");
        assert_eq!(counts(&conn, "facets"), (30, 30, tokens(30), 30));
        assert_eq!(lag(&conn).expect("lag"), (30, 30));
        assert_eq!(
            counts(&conn, "main"),
            (0, 0, 0, 0),
            "the database file's tables are left as they were"
        );
        let entered: i64 = conn
            .query_row(
                "SELECT count(*) FROM facets.audit_tool_facet f JOIN audit_events e ON e.id = f.event_id \
                 WHERE f.value = e.tool AND f.scope = e.tenant",
                [],
                |r| r.get(0),
            )
            .expect("joined");
        assert_eq!(
            entered, 30,
            "each entry names its own event's tool and tenant"
        );
        let under_root: i64 = conn
            .query_row(
                "SELECT count(*) FROM facets.audit_token_facet f JOIN audit_events e ON e.id = f.event_id \
                 WHERE f.value = e.root_jti AND e.root_jti <> e.jti AND f.scope = e.tenant",
                [],
                |r| r.get(0),
            )
            .expect("joined");
        assert_eq!(
            under_root, 10,
            "a delegated token's event is entered under its root too"
        );
        let times: i64 = conn
            .query_row("SELECT count(*) FROM facets.audit_time_facet", [], |r| {
                r.get(0)
            })
            .expect("times");
        assert_eq!(times, 30);
    }

    /// Entering from a mark that is not the stored one (another writer moved it) keeps
    /// nothing.
    #[test]
    fn entering_from_a_mark_that_moved_keeps_nothing() {
        let mut conn = store_with(30);
        enter(&mut conn, 0, 10).expect("enter");
        assert!(enter(&mut conn, 0, 20).is_err(), "the mark is at 10, not 0");
        assert_eq!(counts(&conn, "facets"), (10, 10, tokens(10), 10));
    }

    /// A new lookup file starts from the tables that migrations 0008 and 0009 filled in the
    /// database file, up to their mark, instead of entering every event again.
    #[test]
    fn a_new_lookup_file_starts_from_the_database_files_tables() {
        let mut conn = Connection::open_in_memory().expect("sqlite");
        for migration in &MIGRATIONS[..2] {
            conn.execute_batch(migration).expect("migration");
        }
        append(&conn, 1, 30);
        conn.execute("UPDATE audit_events SET agent_id = '' WHERE seq = 7", [])
            .expect("blank agent");
        for migration in &MIGRATIONS[2..] {
            conn.execute_batch(migration).expect("migration");
        }
        append(&conn, 31, 35);
        assert_eq!(
            counts(&conn, "main"),
            (29, 30, tokens(30), 30),
            "empty values are not entered; the migrations enter up to the mark"
        );
        attach(&conn, Path::new(":memory:")).expect("attach");
        prepare(&mut conn).expect("prepare");
        assert_eq!(counts(&conn, "facets"), (29, 30, tokens(30), 30));
        assert_eq!(mark_hash(&conn), "h30");
        assert_eq!(lag(&conn).expect("lag"), (30, 35));
        enter(&mut conn, 30, 35).expect("enter");
        assert_eq!(counts(&conn, "facets"), (34, 35, tokens(35), 35));

        // Contradicted (another event at the mark): filled again from the same tables.
        conn.execute("UPDATE audit_events SET hash = 'other' WHERE id = 35", [])
            .expect("another event at the mark");
        prepare(&mut conn).expect("again");
        assert_eq!(counts(&conn, "facets"), (29, 30, tokens(30), 30));
        assert_eq!(mark_hash(&conn), "h30");
    }

    /// A mark whose event the database no longer holds, or holds with another hash (a backup
    /// restored, events a power cut took back), empties the tables, entered again (here from
    /// the first event: the database file's own tables are empty); an intact mark is kept.
    #[test]
    fn a_mark_the_database_contradicts_empties_the_tables() {
        let mut conn = store_with(30);
        enter(&mut conn, 0, 20).expect("enter");
        prepare(&mut conn).expect("again");
        assert_eq!(
            counts(&conn, "facets"),
            (20, 20, tokens(20), 20),
            "intact: kept"
        );

        conn.execute("DELETE FROM audit_events WHERE id > 15", [])
            .expect("lose events");
        prepare(&mut conn).expect("again");
        assert_eq!(counts(&conn, "facets"), (0, 0, 0, 0), "its event is gone");
        assert_eq!(mark_hash(&conn), "");
        enter(&mut conn, 0, 15).expect("enter again");
        assert_eq!(counts(&conn, "facets"), (15, 15, tokens(15), 15));

        conn.execute("UPDATE audit_events SET hash = 'other' WHERE id = 15", [])
            .expect("another event at the mark");
        prepare(&mut conn).expect("again");
        assert_eq!(
            counts(&conn, "facets"),
            (0, 0, 0, 0),
            "another event at the mark"
        );
    }

    /// The store's pool attaches the lookup file read-only: a write transaction of the pool
    /// (`BEGIN IMMEDIATE`: a revocation, a bundle, the outbox) takes only the database's write
    /// lock, and never waits for the lookup file's, which its writer holds while it enters a
    /// slice (waiting for it, the pool held the database's lock and stalled the audit writer).
    #[tokio::test]
    async fn a_pool_write_never_waits_for_the_lookup_writer() {
        let (dir, pool) = super::super::committer::tests::migrated(
            "w.sqlite3",
            sqlx::sqlite::SqliteJournalMode::Wal,
        )
        .await;
        let lookup = Connection::open(path_of(&dir.path().join("w.sqlite3"))).expect("open");
        lookup
            .execute_batch("BEGIN IMMEDIATE; UPDATE audit_facets_mark SET upto = upto")
            .expect("the lookup writer's lock");
        let started = std::time::Instant::now();
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.expect("begin");
        sqlx::query("INSERT INTO tenants (name, created_at) VALUES ('w', 0)")
            .execute(&mut *tx)
            .await
            .expect("write");
        tx.commit().await.expect("commit");
        assert!(
            started.elapsed() < crate::store::SQLITE_BUSY_TIMEOUT,
            "waited for the lookup file"
        );
        let refused = sqlx::query("UPDATE facets.audit_facets_mark SET upto = 0")
            .execute(&pool)
            .await;
        assert!(refused.is_err(), "the pool can write the lookup file");
        lookup.execute_batch("ROLLBACK").expect("release");
    }

    /// A lookup file SQLite cannot read (damaged, or deleted without its `-wal`) is made anew
    /// at start, and entered again: the store opens.
    #[tokio::test]
    async fn a_damaged_lookup_file_is_made_anew() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("d.sqlite3");
        std::fs::write(
            path_of(&db),
            b"not a database, not at all: 64 bytes of it at least...",
        )
        .expect("garbage");
        let store = crate::store::SqliteStore::open(&db).await.expect("opens");
        let mark: i64 = sqlx::query_scalar("SELECT upto FROM facets.audit_facets_mark")
            .fetch_one(store.pool())
            .await
            .expect("mark");
        assert_eq!(mark, 0);
    }

    /// The database file's token table follows its mark through migration 0009's trigger,
    /// whatever moves it: a binary from before 0009 (after a rollback) moves the mark with its
    /// own statements, and an upgrade after it must find no event below the mark without its
    /// entries. Events without a token (an administrator's) are not entered.
    #[test]
    fn the_token_table_follows_the_mark_whatever_moves_it() {
        let conn = store_with(20);
        conn.execute(
            "INSERT INTO audit_events (tenant, seq, ts_ms, event, body, prev_hash, hash) \
             VALUES ('t', 21, 21, 'admin', '{}', '', '')",
            [],
        )
        .expect("an event without a token");
        conn.execute(
            "UPDATE main.audit_facets_mark SET upto = 12 WHERE only = 1",
            [],
        )
        .expect("move");
        assert_eq!(counts(&conn, "main").2, tokens(12));
        conn.execute(
            "UPDATE main.audit_facets_mark SET upto = 21 WHERE only = 1",
            [],
        )
        .expect("move");
        assert_eq!(
            counts(&conn, "main").2,
            tokens(20),
            "the tokenless event has no entry"
        );
        let own: i64 = conn
            .query_row(
                "SELECT count(*) FROM main.audit_token_facet f JOIN audit_events e ON e.id = f.event_id \
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
                    "INSERT INTO audit_events (tenant, seq, ts_ms, event, decision, agent_id, tool, jti, root_jti, body, prev_hash, hash) \
                     VALUES (?1, ?2, ?2, 'tool_call', CASE WHEN ?2 % 7 < 4 THEN 'allow' ELSE 'block' END, ?3, ?4, ?5, ?6, '{}', '', '')",
                    rusqlite::params![tenant, i, format!("agent-{}", i % 3), format!("tool-{}", i % 5), jti, root],
                )
                .expect("insert");
            }
        };
        insert(&conn, 1, 1300);
        attach(&conn, &file).expect("attach");
        enter(&mut conn, 0, 1300).expect("enter");
        insert(&conn, 1301, 2000);
        assert_eq!(counts(&conn, "facets").3, 1300);

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
                vec![
                    ("tenant", "a"),
                    ("agent_id", "agent-1"),
                    ("after_id", "600"),
                ],
                "tenant = 'a' AND agent_id = 'agent-1' AND id > 600",
            ),
            (
                vec![("tenant", "a"), ("tool", "tool-3"), ("decision", "allow")],
                "tenant = 'a' AND tool = 'tool-3' AND decision = 'allow'",
            ),
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
        // How the table's half finds a page. `Chosen`: the filter is all in the table's key,
        // so the page's ids are chosen from its entries first (a co-routine), and only those
        // events are read. `InOrder`: other conditions need the events, read in `event_id`
        // order (one value of one tenant), so the page stops after its rows: no sort of every
        // entry joined first.
        #[derive(Clone, Copy)]
        enum Half {
            Chosen,
            InOrder,
        }
        let by_table = |plan: &str, search: &str, half: Half| {
            let shaped = match half {
                Half::Chosen => plan.contains("CO-ROUTINE"),
                Half::InOrder => !plan.contains("TEMP B-TREE") && !plan.contains("CO-ROUTINE"),
            };
            assert!(
                plan.contains(search)
                    && plan.contains("SEARCH audit_events USING INTEGER PRIMARY KEY (rowid>?)")
                    && plan.contains("SEARCH audit_events USING INTEGER PRIMARY KEY (rowid=?)")
                    && !plan.contains("SCAN audit_events")
                    && !plan.contains("audit_events_tenant")
                    && shaped,
                "not read through its table as expected:\n{plan}"
            );
        };
        by_table(
            &plan_of(&[("tenant", "a"), ("agent_id", "agent-1")]),
            "SEARCH facets.audit_agent_facet USING PRIMARY KEY (value=? AND scope=? AND event_id",
            Half::Chosen,
        );
        by_table(
            &plan_of(&[
                ("tenant", "a"),
                ("agent_id", "agent-1"),
                ("decision", "allow"),
            ]),
            "SEARCH facets.audit_agent_facet USING PRIMARY KEY (value=? AND scope=? AND event_id",
            Half::InOrder,
        );
        by_table(
            &plan_of(&[("tenant", "a"), ("from", "1970-01-01T00:00:00.500Z")]),
            "SEARCH facets.audit_time_facet USING PRIMARY KEY (scope=? AND value>?)",
            Half::Chosen,
        );
        by_table(
            &plan_of(&[("jti", "root-3")]),
            "SEARCH facets.audit_token_facet USING PRIMARY KEY (value=?",
            Half::Chosen,
        );
        by_table(
            &plan_of(&[("tenant", "a"), ("jti", "root-3"), ("tool", "tool-1")]),
            "SEARCH facets.audit_token_facet USING PRIMARY KEY (value=? AND scope=? AND event_id",
            Half::InOrder,
        );
    }
}
