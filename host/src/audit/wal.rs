//! Copies the SQLite write-ahead log back into the database file on a thread of its own, so
//! the audit writer (`committer.rs`) never does it inside a commit.
//!
//! SQLite's automatic checkpoint runs in the connection whose commit crosses the threshold:
//! the writer thread would stop committing while it copies a thousand pages and syncs the
//! file. Here the writer rings after every [`RING_EVERY_COMMITS`] commits or
//! [`RING_EVERY_EVENTS`] events, and this thread runs a `PASSIVE` checkpoint on its own
//! connection beside the writer's next commits (a passive checkpoint never blocks a writer). The writer keeps SQLite's own checkpoint at a much
//! higher threshold ([`WRITER_AUTOCHECKPOINT`]) as a bound on the log should this thread fall
//! behind.
//!
//! This module must never block the writer, and never be the only bound on the log's size.

use std::sync::mpsc;

use rusqlite::Connection;

use super::AuditError;

/// Commits, or events, between two rings: a copy syncs the database file, so rings are spaced
/// by what the log grew (a small commit adds a few pages, a batch of many tenants tens).
pub(crate) const RING_EVERY_COMMITS: u32 = 128;
pub(crate) const RING_EVERY_EVENTS: usize = 2048;

/// The writer's own automatic checkpoint, in pages: only when this thread falls far behind.
pub(crate) const WRITER_AUTOCHECKPOINT: i64 = 16_000;

/// The writer's handle: rings the copy thread without waiting for it.
pub(crate) struct WalCopier {
    bell: mpsc::SyncSender<()>,
    commits: u32,
    events: usize,
}

impl WalCopier {
    /// Starts the thread on its own connection to the database file; it ends with the handle.
    pub(crate) fn start(conn: Connection) -> Result<Self, AuditError> {
        // One ring may wait while a copy runs; more would only repeat it.
        let (bell, rung) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("intentgate-wal-copy".into())
            .spawn(move || run(conn, rung))
            .map_err(|e| AuditError::Config(format!("cannot start the WAL copier: {e}")))?;
        Ok(Self {
            bell,
            commits: 0,
            events: 0,
        })
    }

    /// Counts a commit of `events` events; asks for a copy when enough were written since the
    /// last ring (never waits).
    pub(crate) fn committed(&mut self, events: usize) {
        self.commits += 1;
        self.events += events;
        if self.commits >= RING_EVERY_COMMITS || self.events >= RING_EVERY_EVENTS {
            self.commits = 0;
            self.events = 0;
            let _ = self.bell.try_send(());
        }
    }
}

fn run(conn: Connection, rung: mpsc::Receiver<()>) {
    while rung.recv().is_ok() {
        let copied = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
            ))
        });
        if let Err(e) = copied {
            // The writer's own automatic checkpoint still bounds the log.
            tracing::warn!(error = %e, "SQLite WAL checkpoint failed; retrying at the next ring");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the writer committed with its own checkpoint off reaches the database file only
    /// through the copier, once rung.
    #[test]
    fn a_ring_copies_the_log_into_the_database_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.db");
        let writer = Connection::open(&path).expect("open");
        let mode: String = writer
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .expect("wal");
        assert_eq!(mode, "wal");
        writer
            .pragma_update(None, "wal_autocheckpoint", 0)
            .expect("autocheckpoint off");
        writer
            .execute_batch("CREATE TABLE t (b BLOB)")
            .expect("table");
        for _ in 0..400 {
            writer
                .execute("INSERT INTO t (b) VALUES (zeroblob(2048))", [])
                .expect("insert");
        }
        let db_len = || std::fs::metadata(&path).expect("metadata").len();
        assert!(
            db_len() < 64 * 1024,
            "nothing copied back yet: {}",
            db_len()
        );

        let mut copier = WalCopier::start(Connection::open(&path).expect("open")).expect("copier");
        copier.committed(1);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(db_len() < 64 * 1024, "one small commit does not ring");
        copier.committed(RING_EVERY_EVENTS);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while db_len() < 800 * 1024 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(
            db_len() >= 800 * 1024,
            "the log was copied back: {}",
            db_len()
        );
    }
}
