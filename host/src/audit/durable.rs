//! Makes the SQLite writer's commits durable, on the writer's thread or beside it.
//!
//! The writer (`committer.rs`) commits with `synchronous=NORMAL`: SQLite writes the
//! transaction's frames to the write-ahead log and does not sync it. The commit is then made
//! durable here, by `fdatasync` of the log file, before any part of it is answered:
//! - when nothing else is waiting for the writer, on its own thread, at once (one call in
//!   flight pays what `synchronous=FULL` paid, no thread hop more);
//! - when more parts are waiting, on the sync thread, while the writer commits the next batch:
//!   the device flush of one commit overlaps the B-tree work of the next, and one sync covers
//!   every commit that reached the log before it.
//!
//! An `fdatasync` of the log covers every frame written to it before the call, whichever
//! descriptor wrote them (the same inode). The log's name is made durable once, by syncing its
//! directory, when this module first opens it: SQLite would do that at its own first sync of a
//! new log, which `NORMAL` defers to the first checkpoint.
//!
//! Every sync is timed for `/metrics` (`intentgate_audit_sync_duration_seconds`): under load it
//! is about half of a commit's time, and the first thing a slow disk shows.
//!
//! A failed sync leaves commits in the log that are visible and may not be durable: the writer
//! cannot tell what the device kept. So a failure is final for the process: every waiting part
//! and every later one is refused (fail closed) until the gateway is restarted and SQLite
//! recovers the log from what the disk holds.
//!
//! The two may sync at once, and the kernel reports a writeback error to one `fdatasync` of
//! the descriptor only: a sync that returned success beside one that failed proves nothing.
//! So every sync takes a ticket, and a batch is answered only once every sync begun before its
//! own ended has ended without failing; the writer never waits for that, it leaves such a
//! batch to the sync thread.
//!
//! This module must never answer a part before a sync that began after its commit returned,
//! and never answer anything after a failed sync but a refusal.

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use super::AuditError;
use super::commit::{Committed, Entry};
use super::log::Counters;

/// A part's answer: its entries (settling may have rewritten some) and what came of them.
pub(super) type Answer = (Vec<Entry>, Result<Committed, AuditError>);
/// Where a part's answer goes.
pub(super) type Reply = oneshot::Sender<Answer>;

/// How far the writer's commits are durable, for a reader that must not act on a commit a
/// power cut could still take back: the outbox delivers a row only once the commit that wrote
/// it is durable ([`DurableMark::covering`]). On PostgreSQL no commit is begun here, and every
/// wait passes at once. Cheap to clone.
#[derive(Clone, Default)]
pub struct DurableMark {
    inner: Arc<MarkInner>,
}

#[derive(Default)]
struct MarkInner {
    /// Commits begun (numbered from 1, in order).
    begun: AtomicU64,
    /// Every commit up to this number is durable.
    synced: AtomicU64,
    failed: AtomicBool,
    moved: tokio::sync::Notify,
}

impl DurableMark {
    /// Numbers a commit about to run (before it can be seen by any reader).
    pub(super) fn begin(&self) -> u64 {
        self.inner.begun.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Every commit up to `n` is durable.
    pub(super) fn reached(&self, n: u64) {
        self.inner.synced.fetch_max(n, Ordering::SeqCst);
        self.inner.moved.notify_waiters();
    }

    /// Commits begun so far: every commit a read made before this call saw is among them.
    pub(super) fn begun(&self) -> u64 {
        self.inner.begun.load(Ordering::SeqCst)
    }

    /// Whether every commit up to `n` is durable; `Err` once a sync failed (nothing is known
    /// to be).
    pub(super) fn reached_by(&self, n: u64) -> Result<bool, ()> {
        if self.inner.failed.load(Ordering::SeqCst) {
            return Err(());
        }
        Ok(self.inner.synced.load(Ordering::SeqCst) >= n)
    }

    fn fail(&self) {
        self.inner.failed.store(true, Ordering::SeqCst);
        self.inner.moved.notify_waiters();
    }

    /// Whether a sync failed: the gateway refuses every call until it is restarted
    /// (`/healthz` answers 503).
    pub fn failed(&self) -> bool {
        self.inner.failed.load(Ordering::SeqCst)
    }

    /// Waits until every commit begun before this call is durable: what a read made before it
    /// saw is then kept by a power cut. `Err` once a sync failed (nothing is known to be).
    pub async fn covering(&self) -> std::io::Result<()> {
        let target = self.inner.begun.load(Ordering::SeqCst);
        loop {
            let moved = self.inner.moved.notified();
            let mut moved = std::pin::pin!(moved);
            moved.as_mut().enable();
            if self.inner.failed.load(Ordering::SeqCst) {
                return Err(std::io::Error::other(
                    "a sync of the audit log's write-ahead log failed",
                ));
            }
            if self.inner.synced.load(Ordering::SeqCst) >= target {
                return Ok(());
            }
            moved.await;
        }
    }
}

/// A committed batch waiting to be made durable: each part's reply, entries and result.
pub(super) struct Committing {
    /// Its number ([`DurableMark::begin`]).
    pub(super) seq: u64,
    pub(super) answers: Vec<(Reply, Vec<Entry>, Result<Committed, AuditError>)>,
    /// Rung once the batch is durable (outbox rows were committed in it).
    pub(super) then: Option<Box<dyn FnOnce() + Send>>,
}

/// The writer's handle on durability.
pub(super) struct Durability {
    /// The log to sync; `None` when SQLite syncs at commit itself (no WAL: the rollback
    /// journal a filesystem without shared memory leaves the store with).
    wal: Option<PathBuf>,
    file: Option<Arc<File>>,
    mark: DurableMark,
    behind: mpsc::Sender<Behind>,
    counters: Arc<Counters>,
    /// The syncs in progress, here and on the sync thread ([`ticketed_sync`]).
    syncs: Arc<Syncs>,
}

impl Durability {
    /// Starts the sync thread for the log of the database file `db`; it ends with the handle.
    pub(super) fn start(
        db: &Path,
        mark: DurableMark,
        counters: Arc<Counters>,
    ) -> Result<Self, AuditError> {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        let (behind, queued) = mpsc::channel();
        let syncs = Arc::new(Syncs::default());
        let (m, c, g) = (mark.clone(), Arc::clone(&counters), Arc::clone(&syncs));
        std::thread::Builder::new()
            .name("intentgate-wal-sync".into())
            .spawn(move || run(queued, m, &c, &g))
            .map_err(|e| AuditError::Config(format!("cannot start the WAL sync thread: {e}")))?;
        Ok(Self {
            wal: Some(PathBuf::from(wal)),
            file: None,
            mark,
            behind,
            counters,
            syncs,
        })
    }

    /// For a writer whose connection syncs at every commit (`synchronous=FULL`): a batch is
    /// durable when its transaction has ended.
    pub(super) fn by_sqlite(mark: DurableMark, counters: Arc<Counters>) -> Self {
        // No thread: nothing is ever handed to it.
        let (behind, _) = mpsc::channel();
        Self {
            wal: None,
            file: None,
            mark,
            behind,
            counters,
            syncs: Arc::new(Syncs::default()),
        }
    }

    /// Whether a sync failed: nothing may be committed or answered but refusals.
    pub(super) fn failed(&self) -> bool {
        self.mark.inner.failed.load(Ordering::SeqCst)
    }

    /// Makes `batch` durable and answers it: here when `now` (nothing else waits for the
    /// writer), else on the sync thread. The batch's transaction has ended (committed or
    /// not: a sync of a failed one costs little and keeps the mark in order).
    pub(super) fn settle(&mut self, batch: Committing, now: bool) {
        if self.wal.is_none() {
            self.mark.reached(batch.seq);
            return answer(batch);
        }
        let file = match self.file() {
            Ok(f) => f,
            Err(e) => return fail(&self.mark, vec![batch], e),
        };
        let behind = if now {
            match ticketed_sync(&self.syncs, &file, &self.mark, &self.counters) {
                Err(e) => return fail(&self.mark, vec![batch], e),
                // Nothing ran beside this sync: the batch is durable.
                Ok(horizon) if !self.syncs.any_before(horizon) => {
                    return match cleared(&self.syncs, horizon, &self.mark) {
                        Ok(()) => {
                            self.mark.reached(batch.seq);
                            answer(batch);
                        }
                        Err(e) => fail(&self.mark, vec![batch], e),
                    };
                }
                // The sync thread's sync ran beside it: the sync thread answers the batch once
                // that one has ended, and the writer goes on committing meanwhile.
                Ok(horizon) => Behind::Synced(batch, horizon),
            }
        } else {
            Behind::Sync(file, batch)
        };
        if let Err(mpsc::SendError(Behind::Sync(_, batch) | Behind::Synced(batch, _))) =
            self.behind.send(behind)
        {
            fail(
                &self.mark,
                vec![batch],
                std::io::Error::other("the WAL sync thread is gone"),
            );
        }
    }

    /// The log, opened (and its name made durable) at the first commit, when it exists.
    fn file(&mut self) -> std::io::Result<Arc<File>> {
        if let Some(f) = &self.file {
            return Ok(Arc::clone(f));
        }
        let Some(wal) = &self.wal else {
            return Err(std::io::Error::other("no write-ahead log to sync"));
        };
        let f = Arc::new(File::open(wal)?);
        if let Some(dir) = wal.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        self.file = Some(Arc::clone(&f));
        Ok(f)
    }
}

/// One `fdatasync` of the log, timed.
fn sync(file: &File, counters: &Counters) -> std::io::Result<()> {
    let started = std::time::Instant::now();
    let synced = file.sync_data();
    counters.commits.synced(started.elapsed());
    synced
}

/// The syncs of the log in progress, by ticket.
#[derive(Default)]
struct Syncs {
    state: Mutex<SyncTickets>,
    ended: Condvar,
}

#[derive(Default)]
struct SyncTickets {
    next: u64,
    running: BTreeSet<u64>,
}

impl Syncs {
    fn lock(&self) -> MutexGuard<'_, SyncTickets> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn begin(&self) -> u64 {
        let mut s = self.lock();
        let ticket = s.next;
        s.next += 1;
        s.running.insert(ticket);
        ticket
    }

    /// Ends `ticket`; returns the first ticket begun after it ended.
    fn end(&self, ticket: u64) -> u64 {
        let mut s = self.lock();
        s.running.remove(&ticket);
        self.ended.notify_all();
        s.next
    }

    /// Whether a sync begun before `horizon` is still running.
    fn any_before(&self, horizon: u64) -> bool {
        self.lock().running.first().is_some_and(|&t| t < horizon)
    }

    /// Waits until every sync begun before `horizon` has ended.
    fn wait_before(&self, horizon: u64) {
        let mut s = self.lock();
        while s.running.first().is_some_and(|&t| t < horizon) {
            s = self.ended.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// One sync, refused once any sync failed; on success, the first ticket begun after it ended
/// (its horizon). A writeback error is reported to one sync only (once per open file): a sync
/// beside a failing one can return success for a log whose earlier frames the disk lost, and
/// SQLite's recovery stops at the first lost frame, so a later commit would be answered and
/// gone. A failing sync marks the failure before it ends, so a batch is answered only once
/// every sync begun before its own ended has ended too, and the mark shows no failure
/// ([`cleared`]).
fn ticketed_sync(
    syncs: &Syncs,
    file: &File,
    mark: &DurableMark,
    counters: &Counters,
) -> std::io::Result<u64> {
    if mark.failed() {
        return Err(std::io::Error::other("an earlier sync failed"));
    }
    let ticket = syncs.begin();
    let synced = sync(file, counters);
    if let Err(e) = &synced {
        mark_failed(mark, e);
    }
    let horizon = syncs.end(ticket);
    synced.map(|()| horizon)
}

/// Waits for every sync begun before `horizon`, then whether any sync failed.
fn cleared(syncs: &Syncs, horizon: u64, mark: &DurableMark) -> std::io::Result<()> {
    syncs.wait_before(horizon);
    if mark.failed() {
        return Err(std::io::Error::other("a sync beside this one failed"));
    }
    Ok(())
}

/// What the writer hands the sync thread.
enum Behind {
    /// A batch to sync (with the log to sync).
    Sync(Arc<File>, Committing),
    /// A batch synced on the writer's thread beside another sync: answered once the syncs
    /// begun before the horizon have ended ([`cleared`]).
    Synced(Committing, u64),
}

fn run(queued: mpsc::Receiver<Behind>, mark: DurableMark, counters: &Counters, syncs: &Syncs) {
    while let Ok(first) = queued.recv() {
        // One sync for everything committed before it.
        let mut to_sync: Vec<Committing> = Vec::new();
        let mut synced: Vec<(Committing, u64)> = Vec::new();
        let mut file = None;
        for item in std::iter::once(first).chain(std::iter::from_fn(|| queued.try_recv().ok())) {
            match item {
                Behind::Sync(f, batch) => {
                    file = Some(f);
                    to_sync.push(batch);
                }
                Behind::Synced(batch, horizon) => synced.push((batch, horizon)),
            }
        }
        if let Some(file) = file {
            match ticketed_sync(syncs, &file, &mark, counters)
                .and_then(|horizon| cleared(syncs, horizon, &mark))
            {
                Ok(()) => {
                    let last = to_sync.iter().map(|b| b.seq).max().unwrap_or(0);
                    mark.reached(last);
                    to_sync.into_iter().for_each(answer);
                }
                Err(e) => fail(&mark, to_sync, e),
            }
        }
        for (batch, horizon) in synced {
            match cleared(syncs, horizon, &mark) {
                Ok(()) => {
                    mark.reached(batch.seq);
                    answer(batch);
                }
                Err(e) => fail(&mark, vec![batch], e),
            }
        }
    }
}

fn answer(batch: Committing) {
    for (reply, entries, result) in batch.answers {
        let _ = reply.send((entries, result));
    }
    if let Some(then) = batch.then {
        then();
    }
}

/// Marks the log failed: every later sync, commit and answer is a refusal.
fn mark_failed(mark: &DurableMark, e: &std::io::Error) {
    if !mark.inner.failed.swap(true, Ordering::SeqCst) {
        tracing::error!(error = %e, "the audit log's write-ahead log could not be synced: every call is refused until the gateway is restarted");
    }
    mark.fail();
}

/// Refuses every part of `batches` and every later one.
fn fail(mark: &DurableMark, batches: Vec<Committing>, e: std::io::Error) {
    mark_failed(mark, &e);
    let e = Arc::new(AuditError::Io(e));
    for batch in batches {
        for (reply, entries, _) in batch.answers {
            let _ = reply.send((entries, Err(AuditError::CommitFailed(Arc::clone(&e)))));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn batch(seq: u64) -> (Committing, oneshot::Receiver<Answer>) {
        let (reply, answer) = oneshot::channel();
        let committed = Committed {
            appended: Vec::new(),
            uncovered: false,
            checkpointed: false,
            outboxed: false,
        };
        let b = Committing {
            seq,
            answers: vec![(reply, Vec::new(), Ok(committed))],
            then: None,
        };
        (b, answer)
    }

    /// A reader of the mark, waiting on its own task.
    fn reader(mark: &DurableMark) -> tokio::task::JoinHandle<std::io::Result<()>> {
        let mark = mark.clone();
        tokio::spawn(async move { mark.covering().await })
    }

    /// The reader passed (within 5 s) and saw no failure.
    async fn passes(waiting: tokio::task::JoinHandle<std::io::Result<()>>, what: &str) {
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect(what)
            .expect("task")
            .expect("not failed");
    }

    /// A reader waits for every commit begun before it, and only those, whichever way each
    /// is synced; none begun: it passes at once.
    #[tokio::test]
    async fn the_mark_waits_for_the_commits_begun_before_the_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("a.db");
        std::fs::write(dir.path().join("a.db-wal"), b"").expect("log");
        let mark = DurableMark::default();
        tokio::time::timeout(Duration::from_secs(1), mark.covering())
            .await
            .expect("nothing begun")
            .expect("not failed");

        let counters = Arc::new(Counters::default());
        let mut d = Durability::start(&db, mark.clone(), Arc::clone(&counters)).expect("start");
        let first = mark.begin();
        let second = mark.begin();
        let waiting = reader(&mark);
        let (b1, a1) = batch(first);
        d.settle(b1, true);
        a1.await.expect("answered").1.expect("committed");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "the second commit is not synced yet"
        );

        let (b2, a2) = batch(second);
        d.settle(b2, false);
        a2.await
            .expect("answered by the sync thread")
            .1
            .expect("committed");
        passes(waiting, "passes once both are synced").await;
        let third = mark.begin();
        assert_eq!(third, 3);
        // Each sync was timed, on the writer's thread and on the sync thread alike.
        assert_eq!(counters.commits.syncs(), 2);
    }

    /// Without a log (SQLite syncs at commit), a batch is answered, and the mark moves, as soon
    /// as it is settled; nothing fails for want of a file.
    #[tokio::test]
    async fn without_a_log_sqlite_s_own_sync_stands() {
        let mark = DurableMark::default();
        let counters = Arc::new(Counters::default());
        let mut d = Durability::by_sqlite(mark.clone(), Arc::clone(&counters));
        let seq = mark.begin();
        let waiting = reader(&mark);
        let (b, a) = batch(seq);
        d.settle(b, false);
        a.await.expect("answered").1.expect("committed");
        assert!(!d.failed());
        passes(waiting, "the mark moved").await;
        assert_eq!(
            counters.commits.syncs(),
            0,
            "SQLite synced at commit: nothing to time here"
        );
    }

    /// A sync that succeeds beside a failing one is not trusted: a writeback error is reported
    /// to one sync only, so a batch whose sync ran beside another is answered only once that
    /// one has ended, and refused when it failed, though its own `fdatasync` returned success.
    /// Meanwhile the writer is not held.
    #[tokio::test]
    async fn a_batch_synced_beside_a_failing_sync_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("a.db");
        std::fs::write(dir.path().join("a.db-wal"), b"").expect("log");
        let mark = DurableMark::default();
        let mut d =
            Durability::start(&db, mark.clone(), Arc::new(Counters::default())).expect("start");
        // Another sync is running (begun, not ended) when this batch is synced here.
        let other = d.syncs.begin();
        let (b, mut a) = batch(mark.begin());
        // The writer syncs and goes on (it does not wait for the other sync): the sync thread
        // answers the batch once that sync has ended.
        d.settle(b, true);
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            a.try_recv().is_err(),
            "answered while a sync beside it was running"
        );
        // That sync fails: the error was reported to it, not to this batch's sync.
        mark_failed(
            &mark,
            &std::io::Error::other("EIO reported to the other sync"),
        );
        d.syncs.end(other);
        let refused = a.await.expect("answered").1;
        assert!(
            matches!(refused, Err(AuditError::CommitFailed(_))),
            "{refused:?}"
        );
        assert!(mark.covering().await.is_err());
    }

    /// A log that cannot be synced (here: it does not exist) refuses the batch, every later
    /// one, and every reader of the mark.
    #[tokio::test]
    async fn a_failed_sync_refuses_everything_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("missing.db");
        let mark = DurableMark::default();
        let counters = Arc::new(Counters::default());
        let mut d = Durability::start(&db, mark.clone(), counters).expect("start");
        let (b, a) = batch(mark.begin());
        d.settle(b, true);
        let refused = a.await.expect("answered").1;
        assert!(
            matches!(refused, Err(AuditError::CommitFailed(_))),
            "{refused:?}"
        );
        assert!(d.failed());
        assert!(mark.covering().await.is_err());
        // The file appears: it is too late, the failure stands.
        std::fs::write(dir.path().join("missing.db-wal"), b"").expect("log");
        let (b, a) = batch(mark.begin());
        d.settle(b, false);
        assert!(a.await.expect("answered").1.is_err());
    }
}
