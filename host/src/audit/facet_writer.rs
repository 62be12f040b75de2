//! The thread that enters audit events in the query's lookup tables (`facets.rs`), beside the
//! audit writer and never in its way.
//!
//! The tables live in a file of their own, so this thread takes only that file's write lock:
//! the audit writer (`committer.rs`) commits callers' events meanwhile, and no caller ever
//! waits for an entry. The writer rings after every commit; the thread enters what has
//! gathered once [`SLICE`] events have, or once any has waited [`LINGER`], in one transaction
//! of at most [`MOST`] events. Under load it enters larger slices by itself (what gathered
//! while it entered the last one), each leaf of a table written once per slice.
//!
//! It enters an event only once the audit writer's sync covers the commit that wrote it
//! ([`DurableMark`]): the writer commits with `synchronous=NORMAL` and syncs the log
//! afterwards, so a commit is visible before it is durable, and a power cut in between would
//! take the event back while this file kept an entry for its id.
//!
//! The lookup file itself is written with `synchronous=NORMAL`: a power cut may take back its
//! last transactions, and the mark with them (they are entered again), never leave it
//! inconsistent.
//!
//! This module must never write the database file, never take its write lock, and never make
//! a caller wait: a failure is logged, retried later, and refuses nobody (the queries read the
//! events above the mark from `audit_events` itself).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};

use super::durable::DurableMark;
use super::log::Counters;
use super::{AuditError, facets};

/// Events gathered before the thread enters them: the most a query reads past the tables
/// (plus what arrives while a slice is entered), and the batch over which each leaf is written
/// once.
pub(crate) const SLICE: i64 = 4096;

/// The longest an event waits to be entered under a light load.
pub(crate) const LINGER: Duration = Duration::from_millis(200);

/// The most events one transaction enters (entering a whole store again, after a restore).
pub(crate) const MOST: i64 = 65_536;

/// How often the thread looks again while fewer than a slice gathered: it does not wake at
/// every commit under load.
const POLL: Duration = Duration::from_millis(10);

/// The longest the thread waits for the audit writer's sync of what it read.
const SYNC_WAIT: Duration = Duration::from_secs(5);

/// The lookup file's page cache (negative: KiB): the last leaf of each token's, agent's and
/// tool's run, and each tenant's time leaf.
const CACHE_KIB: i64 = -16_384;

/// The audit writer's handle: rings the thread without waiting for it. The thread ends with
/// the handle.
pub(crate) struct FacetWriter {
    bell: mpsc::SyncSender<()>,
}

impl FacetWriter {
    /// Opens the thread's own connection to the database at `path` (the lookup file attached)
    /// and starts it.
    pub(crate) fn start(
        path: &Path,
        durable: DurableMark,
        writer_batch: bool,
        counters: Arc<Counters>,
    ) -> Result<Self, AuditError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| {
            AuditError::Config(format!(
                "the audit lookup writer cannot open {}: {e}",
                path.display()
            ))
        })?;
        conn.busy_timeout(crate::store::SQLITE_BUSY_TIMEOUT)?;
        facets::attach(&conn, path)?;
        let file = Some(rusqlite::DatabaseName::Attached(facets::SCHEMA));
        conn.pragma_update(file, "synchronous", "NORMAL")?;
        conn.pragma_update(file, "cache_size", CACHE_KIB)?;
        conn.set_prepared_statement_cache_capacity(16);
        // Without a write-ahead log, this thread's read of the database holds its shared lock,
        // which the audit writer's commit waits for: one slice at a time, never a long catch-up.
        let journal: String = conn.query_row("PRAGMA main.journal_mode", [], |r| r.get(0))?;
        let most = if journal.eq_ignore_ascii_case("wal") {
            MOST
        } else {
            SLICE
        };
        // What an earlier process committed and left unsynced (killed before its sync) is
        // visible now, and this process's durable mark knows nothing of it: sync it first.
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        match std::fs::File::open(&wal) {
            Ok(f) => f.sync_data()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        // One ring may wait while a slice is entered; more would only repeat it.
        let (bell, rung) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("intentgate-lookup".into())
            .spawn(move || {
                if writer_batch && let Err(e) = super::priority::batch_current_thread() {
                    tracing::debug!(error = %e, "the audit lookup writer keeps its scheduling class");
                }
                run(conn, &durable, &rung, &counters, most)
            })
            .map_err(|e| {
                AuditError::Config(format!("cannot start the audit lookup writer: {e}"))
            })?;
        Ok(Self { bell })
    }

    /// A commit ended: there may be events to enter (never waits).
    pub(crate) fn ring(&self) {
        let _ = self.bell.try_send(());
    }
}

fn run(
    mut conn: Connection,
    durable: &DurableMark,
    rung: &mpsc::Receiver<()>,
    counters: &Counters,
    most: i64,
) {
    let lag = |n: i64| {
        counters
            .lookup_lag
            .store(n.max(0) as u64, Ordering::Relaxed)
    };
    let failed = || counters.lookup_failures.fetch_add(1, Ordering::Relaxed);
    let mut since = Instant::now();
    let mut failures = 0u32;
    loop {
        let (mark, last) = match facets::lag(&conn) {
            Ok(lag) => lag,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the audit lookup tables' mark; retrying");
                failed();
                failures += 1;
                if !pause(rung, backoff(failures)) {
                    return;
                }
                continue;
            }
        };
        let pending = last - mark;
        lag(pending);
        if pending >= SLICE || (pending > 0 && since.elapsed() >= LINGER) {
            // Every commit this read saw was begun before now: once the sync covers them all,
            // every event up to `last` is durable.
            let begun = durable.begun();
            match wait_durable(durable, begun, rung) {
                Waited::Durable => {}
                Waited::Later => continue,
                Waited::Stop => return,
            }
            let to = last.min(mark + most);
            match facets::enter(&mut conn, mark, to) {
                Ok(()) => {
                    lag(last - to);
                    failures = 0;
                    since = Instant::now();
                }
                Err(e) => {
                    failed();
                    failures += 1;
                    tracing::warn!(error = %e, from = mark, to, "cannot enter audit events in the query's lookup tables; the queries read them from the audit table meanwhile");
                    if !pause(rung, backoff(failures)) {
                        return;
                    }
                }
            }
            continue;
        }
        if pending <= 0 {
            // Idle: asleep until a commit rings.
            if rung.recv().is_err() {
                return;
            }
            since = Instant::now();
        } else {
            std::thread::sleep(POLL);
            if let Err(TryRecvError::Disconnected) = rung.try_recv() {
                return;
            }
        }
    }
}

enum Waited {
    Durable,
    /// Not yet (a slow disk): look again.
    Later,
    /// A sync failed, or the writer is gone: nothing is known to be durable.
    Stop,
}

fn wait_durable(durable: &DurableMark, begun: u64, rung: &mpsc::Receiver<()>) -> Waited {
    let until = Instant::now() + SYNC_WAIT;
    // A sync takes about a millisecond; a stalled disk is looked at less and less often.
    let mut wait = Duration::from_millis(1);
    loop {
        match durable.reached_by(begun) {
            Err(()) => {
                tracing::warn!("a sync of the audit log failed: the lookup tables stop here");
                return Waited::Stop;
            }
            Ok(true) => return Waited::Durable,
            Ok(false) if Instant::now() >= until => return Waited::Later,
            Ok(false) => {
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_millis(50));
                if let Err(TryRecvError::Disconnected) = rung.try_recv() {
                    return Waited::Stop;
                }
            }
        }
    }
}

fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64 << failures.min(8)).min(Duration::from_secs(30))
}

/// Sleeps `d` (woken early by nothing: a failing file is not retried at every commit).
/// `false`: the writer is gone.
fn pause(rung: &mpsc::Receiver<()>, d: Duration) -> bool {
    let until = Instant::now() + d;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        match rung.recv_timeout(left) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    async fn mark(pool: &sqlx::SqlitePool) -> i64 {
        sqlx::query_scalar("SELECT upto FROM facets.audit_facets_mark")
            .fetch_one(pool)
            .await
            .expect("mark")
    }

    /// An event committed but not yet synced is not entered, however long it waits: a power
    /// cut could still take it back. Once the sync covers its commit, it is.
    #[tokio::test]
    async fn nothing_is_entered_before_the_sync_covers_it() {
        let (dir, pool) = crate::audit::committer::tests::migrated(
            "d.sqlite3",
            sqlx::sqlite::SqliteJournalMode::Wal,
        )
        .await;
        let durable = DurableMark::default();
        let commit = durable.begin();
        for seq in 1..=5 {
            sqlx::query(
                "INSERT INTO audit_events (tenant, seq, ts_ms, event, agent_id, body, prev_hash, hash) \
                 VALUES ('t', ?1, 0, 'tool_call', 'a', '{}', '', '')",
            )
            .bind(seq)
            .execute(&pool)
            .await
            .expect("insert");
        }
        let counters = Arc::new(Counters::default());
        let writer = FacetWriter::start(
            &dir.path().join("d.sqlite3"),
            durable.clone(),
            false,
            Arc::clone(&counters),
        )
        .expect("start");
        writer.ring();
        tokio::time::sleep(LINGER * 3).await;
        assert_eq!(
            mark(&pool).await,
            0,
            "entered before its commit was durable"
        );

        durable.reached(commit);
        writer.ring();
        let until = Instant::now() + Duration::from_secs(10);
        while mark(&pool).await < 5 {
            assert!(Instant::now() < until, "not entered once durable");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let entered: i64 = sqlx::query_scalar("SELECT count(*) FROM facets.audit_agent_facet")
            .fetch_one(&pool)
            .await
            .expect("count");
        assert_eq!(entered, 5);
        assert_eq!(counters.lookup_lag.load(Ordering::Relaxed), 0);
        assert_eq!(counters.lookup_failures.load(Ordering::Relaxed), 0);
    }

    /// More than a slice at once (a store entered again from its first event) is entered in
    /// transactions of at most [`MOST`] events, every one of them.
    #[tokio::test]
    async fn a_long_lag_is_entered_whole() {
        let (dir, pool) = crate::audit::committer::tests::migrated(
            "l.sqlite3",
            sqlx::sqlite::SqliteJournalMode::Wal,
        )
        .await;
        let n = MOST + SLICE + 7;
        sqlx::query(
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?1) \
             INSERT INTO audit_events (tenant, seq, ts_ms, event, tool, jti, body, prev_hash, hash) \
             SELECT 't', i, i, 'tool_call', 'tool-' || (i % 3), 'tok-' || (i % 50), '{}', '', '' FROM s",
        )
        .bind(n)
        .execute(&pool)
        .await
        .expect("insert");
        let durable = DurableMark::default();
        let writer = FacetWriter::start(
            &dir.path().join("l.sqlite3"),
            durable,
            false,
            Default::default(),
        )
        .expect("start");
        writer.ring();
        let until = Instant::now() + Duration::from_secs(60);
        while mark(&pool).await < n {
            assert!(Instant::now() < until, "not entered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (tools, tokens): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM facets.audit_tool_facet), \
             (SELECT count(*) FROM facets.audit_token_facet)",
        )
        .fetch_one(&pool)
        .await
        .expect("count");
        assert_eq!((tools, tokens), (n, n));
    }
}
