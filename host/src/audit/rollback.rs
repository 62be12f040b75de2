//! Prepares a SQLite database for a rollback to a binary from before the lookup file
//! (`facets.rs`): `intentgate audit prepare-rollback`.
//!
//! Such a binary keeps the audit query's token, agent, tool and time tables in the database file
//! itself (migrations 0008 and 0009) and enters them inside the audit writer's commits. This
//! binary leaves those tables where they stood when it first started, so after a rollback the
//! older binary's first commit would enter every event written since, in one transaction that
//! holds the write lock: on a busy store, minutes in which calls wait for their audit and are
//! refused at the deadline. This command enters them beforehand, a bounded slice per short
//! transaction, beside a running gateway; what the gateway writes between its end and the
//! rollback is left to the older binary's first slice.
//!
//! The entries are exactly those the older binary would make (the same statements as migration
//! 0008, and the 0009 trigger fills the token table as the mark moves). Each slice commits with
//! `synchronous=FULL`: its sync also covers every event it entered (an event a power cut could
//! take back is taken back with its entries).
//!
//! This module must never write anything but those tables and their mark, never move the mark
//! past an event it did not enter, and never hold the write lock longer than one slice.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use super::AuditError;

/// Events entered per transaction: a few milliseconds of the write lock each.
pub const SLICE: i64 = 4096;

/// The pause between slices, so the audit writer's commits go first.
const BETWEEN_SLICES: Duration = Duration::from_millis(20);

/// What a run entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prepared {
    /// The mark before the run: the last event the tables covered.
    pub from: i64,
    /// The mark after it: every event up to this id is entered.
    pub upto: i64,
    /// Transactions committed.
    pub slices: u64,
}

/// Migration 0008's entries, for a range of ids. Deliberately not `facets.rs`'s statements with
/// another schema name: these must stay what the older binary makes, whatever the lookup file
/// becomes (the tests compare them with the migration's own statements).
const ENTER: [&str; 3] = [
    "INSERT OR IGNORE INTO main.audit_agent_facet (value, scope, event_id) \
     SELECT agent_id, tenant, id FROM main.audit_events \
     WHERE id > ?1 AND id <= ?2 AND agent_id <> ''",
    "INSERT OR IGNORE INTO main.audit_tool_facet (value, scope, event_id) \
     SELECT tool, tenant, id FROM main.audit_events \
     WHERE id > ?1 AND id <= ?2 AND tool <> ''",
    "INSERT OR IGNORE INTO main.audit_time_facet (scope, value, event_id) \
     SELECT tenant, ts_ms, id FROM main.audit_events WHERE id > ?1 AND id <= ?2",
];

/// Enters every event of the database at `db` in its own lookup tables, `slice` events per
/// transaction; `progress` hears the mark after each one.
pub fn prepare(
    db: &Path,
    slice: i64,
    mut progress: impl FnMut(i64, i64),
) -> Result<Prepared, AuditError> {
    let conn = open(db)?;
    let (from, _) = bounds(&conn)?;
    let mut done = Prepared {
        from,
        upto: from,
        slices: 0,
    };
    loop {
        let (mark, last) = bounds(&conn)?;
        if mark >= last {
            done.upto = mark;
            return Ok(done);
        }
        let to = last.min(mark + slice.max(1));
        enter(&conn, mark, to)?;
        done.slices += 1;
        progress(to, last);
        std::thread::sleep(BETWEEN_SLICES);
    }
}

fn open(db: &Path) -> Result<Connection, AuditError> {
    if !db.is_file() {
        return Err(AuditError::Config(format!(
            "{}: no SQLite database there (give the gateway's --data-dir, or --database)",
            db.display()
        )));
    }
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| AuditError::Config(format!("{}: {e}", db.display())))?;
    conn.busy_timeout(crate::store::SQLITE_BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let tables: i64 = conn.query_row(
        "SELECT COUNT(*) FROM main.sqlite_master WHERE type = 'table' AND name IN \
         ('audit_facets_mark', 'audit_agent_facet', 'audit_tool_facet', 'audit_time_facet', \
          'audit_token_facet')",
        [],
        |r| r.get(0),
    )?;
    if tables != 5 {
        return Err(AuditError::Config(format!(
            "{}: not an IntentGate database at migration 0009 or later (its lookup tables are missing)",
            db.display()
        )));
    }
    Ok(conn)
}

/// The tables' mark and the newest event id.
fn bounds(conn: &Connection) -> Result<(i64, i64), AuditError> {
    Ok(conn.query_row(
        "SELECT COALESCE((SELECT upto FROM main.audit_facets_mark), 0), \
                COALESCE((SELECT MAX(id) FROM main.audit_events), 0)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?)
}

/// One slice: the entries of the events in `(from, to]`, and the mark moved to `to` only if it
/// still stood at `from` (the 0009 trigger enters the token table as it moves).
fn enter(conn: &Connection, from: i64, to: i64) -> Result<(), AuditError> {
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    for sql in ENTER {
        tx.execute(sql, [from, to])?;
    }
    let moved = tx.execute(
        "UPDATE main.audit_facets_mark SET upto = ?2 WHERE only = 1 AND upto = ?1",
        [from, to],
    )?;
    if moved != 1 {
        // Another run (or the older binary) moved it meanwhile: nothing of this slice stays.
        return Err(AuditError::Config(
            "the lookup tables' mark moved during the slice; run the command again".into(),
        ));
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database at migration 0009 whose tables cover `covered` of `events` events: the
    /// migrations enter every event, as the older binary would have, then the entries above
    /// `covered` are taken out again.
    fn database(dir: &Path, events: i64, covered: i64) -> std::path::PathBuf {
        let path = dir.join("intentgate.sqlite3");
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE audit_events (id INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL,
               ts_ms INTEGER NOT NULL, agent_id TEXT NOT NULL DEFAULT '', tool TEXT NOT NULL DEFAULT '',
               jti TEXT NOT NULL DEFAULT '', root_jti TEXT NOT NULL DEFAULT '');",
        )
        .expect("events table");
        for i in 1..=events {
            conn.execute(
                "INSERT INTO audit_events (tenant, ts_ms, agent_id, tool, jti, root_jti) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                rusqlite::params![
                    format!("t{}", i % 3),
                    1_000 + i,
                    if i % 5 == 0 {
                        String::new()
                    } else {
                        format!("agent-{}", i % 7)
                    },
                    format!("tool-{}", i % 4),
                    format!("jti-{}", i % 11),
                    if i % 3 == 0 {
                        format!("jti-{}", i % 11)
                    } else {
                        format!("root-{}", i % 2)
                    },
                ],
            )
            .expect("event");
        }
        for f in ["0008_audit_facets.sql", "0009_audit_token_facet.sql"] {
            let file = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../migrations/sqlite")
                .join(f);
            let sql = std::fs::read_to_string(file).expect("migration");
            conn.execute_batch(&sql).expect("migration 0008 or 0009");
        }
        for t in TABLES {
            conn.execute(&format!("DELETE FROM {t} WHERE event_id > ?1"), [covered])
                .expect("entries above the mark");
        }
        conn.execute("UPDATE audit_facets_mark SET upto = ?1", [covered])
            .expect("mark");
        path
    }

    const TABLES: [&str; 4] = [
        "audit_agent_facet",
        "audit_tool_facet",
        "audit_time_facet",
        "audit_token_facet",
    ];

    /// Every entry of the four tables, in key order.
    fn entries(conn: &Connection) -> Vec<(String, String, String, i64)> {
        let mut all = Vec::new();
        for t in TABLES {
            let mut q = conn
                .prepare(&format!(
                    "SELECT '{t}', CAST(value AS TEXT), scope, event_id FROM {t} ORDER BY 2, 3, 4"
                ))
                .expect("select");
            let rows = q
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .expect("rows");
            all.extend(rows.map(|r| r.expect("row")));
        }
        all
    }

    #[test]
    fn slices_enter_what_the_older_binary_would_have_entered() {
        // The reference: the same events entered in one go by the older binary's statements
        // (the 0009 trigger, as its mark moves from 0).
        let dir = tempfile::tempdir().expect("dir");
        let whole = database(dir.path(), 1_000, 1_000);
        let expected = entries(&Connection::open(&whole).expect("open"));
        for t in TABLES {
            assert!(expected.iter().any(|e| e.0 == t), "{t} has entries");
        }

        let behind = tempfile::tempdir().expect("dir");
        let db = database(behind.path(), 1_000, 100);
        assert_ne!(entries(&Connection::open(&db).expect("open")), expected);
        let mut seen = Vec::new();
        let done = prepare(&db, 128, |upto, last| seen.push((upto, last))).expect("prepare");
        assert_eq!((done.from, done.upto), (100, 1_000));
        // 900 events, 128 a transaction: 8 slices, the mark moving through each.
        assert_eq!(done.slices, 8);
        assert_eq!(seen.first(), Some(&(228, 1_000)));
        assert_eq!(seen.last(), Some(&(1_000, 1_000)));
        let conn = Connection::open(&db).expect("open");
        assert_eq!(entries(&conn), expected);
        // Nothing left to do: a second run enters nothing.
        let again = prepare(&db, 128, |_, _| {}).expect("again");
        assert_eq!((again.from, again.upto, again.slices), (1_000, 1_000, 0));
    }

    #[test]
    fn a_file_that_is_not_a_gateway_database_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let missing = prepare(&dir.path().join("none.sqlite3"), SLICE, |_, _| {});
        assert!(matches!(missing, Err(AuditError::Config(m)) if m.contains("no SQLite database")));
        let other = dir.path().join("other.sqlite3");
        Connection::open(&other)
            .expect("open")
            .execute_batch("CREATE TABLE t (x)")
            .expect("table");
        let refused = prepare(&other, SLICE, |_, _| {});
        assert!(matches!(refused, Err(AuditError::Config(m)) if m.contains("migration 0009")));
    }

    #[test]
    fn a_mark_moved_meanwhile_keeps_nothing_of_the_slice() {
        let dir = tempfile::tempdir().expect("dir");
        let db = database(dir.path(), 50, 10);
        let conn = open(&db).expect("open");
        let before = entries(&conn);
        let moved = enter(&conn, 5, 50);
        assert!(matches!(moved, Err(AuditError::Config(m)) if m.contains("moved")));
        assert_eq!(entries(&conn), before);
        // From where it stands, the same slice goes through.
        enter(&conn, 10, 50).expect("slice");
        assert!(entries(&conn).len() > before.len());
    }
}
