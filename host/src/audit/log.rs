//! [`AuditLog`]: durable-before-forward appends through one group-commit writer per tenant.
//!
//! `append` puts the event on the tenant's bounded queue (`try_send`: a full queue answers
//! [`AuditError::Overloaded`] at once, it never blocks unboundedly) and waits for the writer's
//! answer. The writer takes everything queued (up to `max_batch`) and commits it in **one**
//! transaction (`commit.rs`): read the chain head (SQLite: under `BEGIN IMMEDIATE`, the
//! database write lock, with every other tenant's pending batch in the same transaction;
//! PostgreSQL: `SELECT … FOR UPDATE` on the tenant's head row, so writers on other replicas
//! wait), settle the calls' budget debits ([`AuditLog::append_charged`], `charges.rs`), hash
//! each event onto the head, insert the rows, move the head with a compare-and-set `UPDATE`,
//! and, when due, sign a checkpoint in the same transaction. Only after `COMMIT` returns does
//! any waiter hear `Ok`. If the transaction fails, every waiter of the batch hears the error
//! and nothing of the batch is stored (no charge either); the next batch re-reads the head.
//! `UNIQUE (tenant, seq)` makes any logic error that would fork a chain fail loudly.
//!
//! **Deadline.** `append` waits at most [`AuditConfig::deadline`] for its answer; then it
//! answers [`AuditError::DeadlineExceeded`] and the caller refuses (a stalled disk or a
//! black-holed database must not hang calls and admin actions until TCP gives up). The event
//! is still in the writer's hands, so the writer records the outcome when the store returns:
//! an event committed after its caller gave up is followed by a refusal event pointing at it
//! (`call_id`, `check: "audit"`, decision `block`), and an event that could not be committed at
//! all is written in its refused form. These late records are retried, in commits of their
//! own, until the store takes them (`late.rs`: bounded, and one the store keeps refusing while
//! it takes everything else is dropped; either drop is logged and counted).
//!
//! This module must never answer `Ok` before the commit, never skip or reuse a chain position,
//! never wait on a full queue, and never leave a caller waiting past the deadline.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};

use super::charges::Debit;
use super::commit::{Committed, Entry};
use super::committer::SqliteCommitter;
use super::late::Late;
use super::postgres::{HOLD_IDLE, Held, commit_postgres};
use super::{AuditConfig, AuditError, AuditEvent, Db, LogKey, Verifier, time};
use crate::approvals::ApprovalWrite;

/// Where an appended event landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Row id (global, increasing): the keyset cursor and the id `verify` reports.
    pub id: i64,
    /// Position in the tenant's chain, from 1.
    pub seq: u64,
    /// Chain hash after this event, lowercase hex.
    pub hash: String,
    /// Set when one of the call's debits ([`AuditLog::append_charged`]) would have passed its
    /// limit: the event was recorded as this budget refusal instead, and nothing was charged.
    pub refused: Option<String>,
    /// The check that refused it when [`Appended::refused`] is set: `budget`, or `approval`
    /// when the approval the call resumed was already used or expired.
    pub refused_check: String,
}

/// The chain link: `SHA-256(prev_hash || canonical_event)`.
pub fn link_hash(prev: &[u8; 32], canonical_event: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(canonical_event);
    h.finalize().into()
}

/// `prev_hash` of a tenant's first event.
pub const GENESIS: [u8; 32] = [0; 32];

/// Most single-record late commits a writer makes between two fresh batches.
const LATE_SINGLES_A_TURN: usize = 8;
/// How long a closing writer keeps trying to write its late records.
const LATE_AT_SHUTDOWN: std::time::Duration = std::time::Duration::from_secs(5);
/// How soon a writer retries its late records when no new event arrives.
const LATE_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

struct Job {
    entry: Entry,
    enqueued: Instant,
    reply: oneshot::Sender<Result<Appended, AuditError>>,
}

/// The audit log. Cheap to clone; every clone shares the writers.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Shared,
    writers: ArcSwap<HashMap<String, mpsc::Sender<Job>>>,
    spawn_lock: Mutex<()>,
    /// The writers' tasks, awaited at shutdown ([`AuditLog::shutdown`]).
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// What a writer task needs (it holds no sender, so dropping every `AuditLog` ends the writers
/// once their queues are drained).
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) db: Db,
    pub(crate) key: LogKey,
    pub(crate) cfg: AuditConfig,
    pub(crate) counters: Arc<Counters>,
    /// SQLite has one writer at a time: the tenants' writers of this process hand their
    /// batches to this one committer, which commits all of them in one transaction, instead
    /// of colliding on the database lock (whose busy handler sleeps) and paying one fsync per
    /// tenant. `None` on PostgreSQL, and in the committer's own copy.
    sqlite: Option<SqliteCommitter>,
    /// Where committed events go next: the outbox routing table (empty: no destination).
    pub(crate) outbox: crate::outbox::Router,
    /// PostgreSQL: how many tenant writers may keep a pooled connection between batches
    /// (`postgres.rs`); at most half the pool, so other queries always find one.
    pub(crate) held: Arc<tokio::sync::Semaphore>,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) events: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) transactions: AtomicU64,
    pub(crate) failed_batches: AtomicU64,
    pub(crate) overloaded: AtomicU64,
    /// Late records dropped (too many held, refused by the store, or unwritten at shutdown).
    pub(crate) late_dropped: AtomicU64,
    pub(crate) checkpoints: AtomicU64,
    /// SQLite: events above the lookup tables' mark when the lookup writer last looked.
    pub(crate) lookup_lag: AtomicU64,
    /// SQLite: the lookup writer's failed attempts.
    pub(crate) lookup_failures: AtomicU64,
    /// Batch sizes and commit latency (`/metrics`).
    pub(crate) commits: crate::metrics::audit::AuditCommits,
    /// Appends waiting for their answer now, in every tenant: the SQLite writer commits a
    /// lone one on its caller's thread (`committer.rs`).
    pub(crate) appending: InFlight,
    /// SQLite: transactions committed on a caller's thread (the gateway was quiet).
    pub(crate) caller_commits: AtomicU64,
}

/// Counters of this process's writers since `open` (for metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuditStats {
    /// Events committed.
    pub events: u64,
    /// Tenant batches committed: what one tenant's writer handed in at once (events / batches
    /// = events per tenant batch).
    pub batches: u64,
    /// Write transactions committed (events / transactions = the group-commit factor). On
    /// SQLite one transaction carries every tenant's batch handed in while the last one ran,
    /// so with several tenants there are fewer transactions than batches; on PostgreSQL each
    /// batch is its own transaction.
    pub transactions: u64,
    /// Tenant batches that failed (their events were refused).
    pub failed_batches: u64,
    /// Appends refused because a queue was full or an event waited too long.
    pub overloaded: u64,
    /// Late records (refusals of callers that gave up at the deadline) dropped unwritten:
    /// too many held, refused by the store while it took everything else, or unwritten at
    /// shutdown. Each is logged at error level.
    pub late_dropped: u64,
    /// Checkpoints signed.
    pub checkpoints: u64,
    /// SQLite: events the audit query's lookup tables lagged behind when their writer last
    /// looked (a filtered query reads those from the audit table itself); 0 on PostgreSQL.
    pub lookup_lag: u64,
    /// SQLite: the lookup tables' writer's failed attempts (each logged, retried later).
    pub lookup_failures: u64,
    /// SQLite: transactions committed on the appending caller's own thread, because it was
    /// the only append in flight and the writer was idle (no hand-off to the writer thread).
    pub caller_commits: u64,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("key", &self.inner.shared.key)
            .field("cfg", &self.inner.shared.cfg)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the log over a migrated database. Refuses a SQLite database whose connections do not
    /// sync on commit (`synchronous` below FULL): acknowledged events must survive power loss.
    pub async fn open(db: Db, key: LogKey, cfg: AuditConfig) -> Result<Self, AuditError> {
        cfg.validate()?;
        let missing = |e: sqlx::Error| {
            AuditError::Config(format!("audit tables missing (run migrations): {e}"))
        };
        match &db {
            Db::Sqlite(pool) => {
                sqlx::query("SELECT 1 FROM audit_chain_heads LIMIT 1")
                    .fetch_optional(pool)
                    .await
                    .map_err(missing)?;
                let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
                    .fetch_one(pool)
                    .await?;
                if sync < 2 {
                    return Err(AuditError::Config(format!(
                        "SQLite synchronous is {sync}; the audit log needs FULL (2) or EXTRA (3)"
                    )));
                }
                let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
                    .fetch_one(pool)
                    .await?;
                if !mode.eq_ignore_ascii_case("wal") && !mode.eq_ignore_ascii_case("memory") {
                    tracing::warn!(journal_mode = %mode, "SQLite is not in WAL mode; audit group commit will be slower");
                }
            }
            Db::Postgres(pool) => {
                sqlx::query("SELECT 1 FROM audit_chain_heads LIMIT 1")
                    .fetch_optional(pool)
                    .await
                    .map_err(missing)?;
            }
        }
        let mut shared = Shared {
            db,
            key,
            cfg,
            counters: Arc::default(),
            sqlite: None,
            outbox: crate::outbox::Router::default(),
            held: Arc::new(tokio::sync::Semaphore::new(
                crate::store::PG_MAX_CONNECTIONS as usize / 2,
            )),
        };
        if let Db::Sqlite(pool) = &shared.db {
            shared.sqlite = Some(SqliteCommitter::start(pool, shared.clone())?);
        }
        Ok(AuditLog {
            inner: Arc::new(Inner {
                shared,
                writers: ArcSwap::from_pointee(HashMap::new()),
                spawn_lock: Mutex::new(()),
                tasks: Mutex::new(Vec::new()),
            }),
        })
    }

    pub fn db(&self) -> &Db {
        &self.inner.shared.db
    }

    pub fn key(&self) -> &LogKey {
        &self.inner.shared.key
    }

    /// The public log key (served by the admin API).
    pub fn verifier(&self) -> Verifier {
        self.inner.shared.key.verifier()
    }

    pub fn config(&self) -> &AuditConfig {
        &self.inner.shared.cfg
    }

    /// The outbox routing table the commits read: [`crate::outbox::Outbox`] installs the
    /// destinations in it, and every batch writes its events' outbox rows from it.
    pub fn outbox_router(&self) -> &crate::outbox::Router {
        &self.inner.shared.outbox
    }

    /// Batch sizes and commit latency of this process's writers since `open`.
    pub fn commits(&self) -> &crate::metrics::audit::AuditCommits {
        &self.inner.shared.counters.commits
    }

    /// Counters since `open`.
    pub fn stats(&self) -> AuditStats {
        let c = &self.inner.shared.counters;
        AuditStats {
            events: c.events.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            transactions: c.transactions.load(Ordering::Relaxed),
            failed_batches: c.failed_batches.load(Ordering::Relaxed),
            overloaded: c.overloaded.load(Ordering::Relaxed),
            late_dropped: c.late_dropped.load(Ordering::Relaxed),
            checkpoints: c.checkpoints.load(Ordering::Relaxed),
            lookup_lag: c.lookup_lag.load(Ordering::Relaxed),
            lookup_failures: c.lookup_failures.load(Ordering::Relaxed),
            caller_commits: c.caller_commits.load(Ordering::Relaxed),
        }
    }

    /// Appends `event` to its tenant's chain. Resolves only after the transaction holding the
    /// event committed. Errors mean the event was **not** stored (with one exception: if the
    /// caller's future is dropped while waiting, the event may still be committed) and the
    /// caller must fail closed.
    pub async fn append(&self, event: AuditEvent) -> Result<Appended, AuditError> {
        self.append_charged(event, Vec::new()).await
    }

    /// Appends an allowed call's event together with its budget debits, decided in order and
    /// written in the same transaction (see [`charges`]). If a debit would pass its limit,
    /// nothing of the call is charged and the event is recorded as that budget refusal
    /// ([`Appended::refused`]). An error means neither the event nor any charge was stored
    /// (a caller that gave up at the deadline is refunded by its late record).
    pub async fn append_charged(
        &self,
        event: AuditEvent,
        debits: Vec<Debit>,
    ) -> Result<Appended, AuditError> {
        self.append_with(event, debits, None).await
    }

    /// [`Self::append_charged`] with a change to the approval queue written in the same
    /// transaction (`crate::approvals::record`). A conditional change whose condition fails
    /// records the event as that refusal ([`Appended::refused`], `refused_check: "approval"`)
    /// and charges nothing.
    pub async fn append_with(
        &self,
        mut event: AuditEvent,
        debits: Vec<Debit>,
        approval: Option<ApprovalWrite>,
    ) -> Result<Appended, AuditError> {
        event.fit_indexed_columns();
        for d in &debits {
            d.validate()?;
        }
        if let Some(field) = event.column_with_nul() {
            return Err(AuditError::Unstorable(field));
        }
        let tenant = event.tenant.clone();
        let (reply, answer) = oneshot::channel();
        // The canonical text (the arguments' share of the hashing work) is made here, on the
        // caller's task, so the one writer of the chain does only the sequential part.
        let mut entry = Entry::new(event, debits);
        entry.approval = approval;
        entry.canonical = entry.event.canonical_open();
        let mut job = Job {
            entry,
            enqueued: Instant::now(),
            reply,
        };
        let deadline = self.inner.shared.cfg.deadline;
        let _appending = Appending::new(&self.inner.shared.counters);
        for _attempt in 0..2 {
            let sender = self.sender(&tenant);
            match sender.try_send(job) {
                Ok(()) => return wait_for(answer, deadline).await,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.inner
                        .shared
                        .counters
                        .overloaded
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(AuditError::Overloaded {
                        tenant,
                        detail: "writer queue full",
                    });
                }
                Err(mpsc::error::TrySendError::Closed(j)) => {
                    // The writer ended (it only does when its task was aborted): start a new one.
                    self.forget(&tenant, &sender);
                    job = j;
                }
            }
        }
        Err(AuditError::Unavailable)
    }

    fn sender(&self, tenant: &str) -> mpsc::Sender<Job> {
        // (The writer task is spawned on first use of a tenant.)
        if let Some(s) = self.inner.writers.load().get(tenant) {
            return s.clone();
        }
        let _guard = self
            .inner
            .spawn_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = self.inner.writers.load_full();
        if let Some(s) = current.get(tenant) {
            return s.clone();
        }
        let (tx, rx) = mpsc::channel(self.inner.shared.cfg.queue_capacity);
        let writer = Writer {
            shared: self.inner.shared.clone(),
            tenant: tenant.to_owned(),
            held: None,
        };
        let task = tokio::spawn(writer.run(rx));
        let mut tasks = self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
        drop(tasks);
        let mut next = HashMap::clone(&current);
        next.insert(tenant.to_owned(), tx.clone());
        self.inner.writers.store(Arc::new(next));
        tx
    }

    /// Ends the writers, once the server stopped taking calls: each records what is still
    /// late (refusals of callers that stopped waiting) and signs its final checkpoint, then
    /// ends; waited for at most `within`. Without it the runtime's end would cancel them at
    /// their next await and those records would be lost. An append after it starts a writer
    /// anew.
    pub async fn shutdown(&self, within: std::time::Duration) {
        let tasks: Vec<_> = {
            let _guard = self
                .inner
                .spawn_lock
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            // The map holds each writer's last long-lived sender: dropped, its queue closes
            // once the appends in flight are in it.
            self.inner.writers.store(Arc::new(HashMap::new()));
            let mut tasks = self
                .inner
                .tasks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            std::mem::take(&mut *tasks)
        };
        let all = async {
            for t in tasks {
                let _ = t.await;
            }
        };
        if tokio::time::timeout(within, all).await.is_err() {
            tracing::warn!(
                "audit: writers still busy {} s after the shutdown began; their late records may be lost",
                within.as_secs()
            );
        }
    }

    fn forget(&self, tenant: &str, dead: &mpsc::Sender<Job>) {
        let _guard = self
            .inner
            .spawn_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = self.inner.writers.load_full();
        if current.get(tenant).is_some_and(|s| s.same_channel(dead)) {
            let mut next = HashMap::clone(&current);
            next.remove(tenant);
            self.inner.writers.store(Arc::new(next));
        }
    }

    /// Signs a checkpoint of `tenant`'s current head unless the newest checkpoint already covers
    /// it, and returns the newest checkpoint note (`None` when the chain is empty).
    pub async fn checkpoint_now(&self, tenant: &str) -> Result<Option<String>, AuditError> {
        let mut writer = Writer {
            shared: self.inner.shared.clone(),
            tenant: tenant.to_owned(),
            held: None,
        };
        writer.checkpoint().await?;
        Ok(
            super::query::latest_checkpoint(&self.inner.shared.db, tenant)
                .await?
                .map(|c| c.note),
        )
    }
}

/// Waits for the writer's answer until `deadline`. After it, the receiver is closed first, so
/// the writer either delivered its answer before (and it is used: the event is durable in time)
/// or learns that its caller is gone (and records the refusal): never both, never neither.
async fn wait_for(
    mut answer: oneshot::Receiver<Result<Appended, AuditError>>,
    deadline: std::time::Duration,
) -> Result<Appended, AuditError> {
    match tokio::time::timeout(deadline, &mut answer).await {
        Ok(reply) => reply.map_err(|_| AuditError::Unavailable)?,
        Err(_elapsed) => {
            answer.close();
            match answer.try_recv() {
                Ok(reply) => reply,
                Err(_) => Err(AuditError::DeadlineExceeded {
                    ms: deadline.as_millis() as u64,
                }),
            }
        }
    }
}

/// The record of an event whose caller gave up at the deadline. `committed` is the id of the
/// event when it was committed after all (then the refusal points at it), `None` when it was
/// not written (then the event is written in its refused form). A denial needs no such record
/// once it is written: the caller was refused either way.
fn late_record(entry: &Entry, committed: Option<i64>) -> Option<Entry> {
    let event = &entry.event;
    // A change the commit itself makes (an approval decided or expired, old approvals
    // purged) took effect when the commit landed late, and its event says so; so does a record
    // made after the fact (an upstream's failure, a throttle's summary). Neither was an answer
    // a caller waited for. An operator's action that runs only once its event is recorded (a
    // revoke, a mint) did not run: its late record says it was refused.
    let in_commit = matches!(
        entry.approval,
        Some(
            ApprovalWrite::Decide { .. }
                | ApprovalWrite::Expire { .. }
                | ApprovalWrite::Purge { .. }
                | ApprovalWrite::Restore { .. }
        )
    );
    if in_commit
        || matches!(
            event.kind.as_str(),
            "intentgate.upstream_result" | "intentgate.denials_throttled"
        )
    {
        return None;
    }
    // A resumed call that escalated again used its approval up in that commit: its caller,
    // refused, never learned the next approval's id, so the approval is given back.
    if let (Some(ApprovalWrite::Supersede { id, .. }), Some(committed)) =
        (&entry.approval, committed)
        && entry.approval_applied
    {
        let mut late = event.clone();
        late.ts_ms = time::now_ms();
        late.decision = Some(super::Decision::Block);
        late.check = "audit".to_owned();
        late.reason = format!(
            "event {committed} became durable only after its caller stopped waiting (audit deadline): approval {id} is given back"
        );
        late.call_id = Some(committed);
        late.pending_id = id.clone();
        let mut record = Entry::new(late, Vec::new());
        record.approval = Some(ApprovalWrite::Restore { id: id.clone() });
        return Some(record);
    }
    let refused = matches!(
        event.decision,
        Some(super::Decision::Block | super::Decision::Escalate)
    );
    if refused && committed.is_some() {
        return None;
    }
    // What was charged with a committed event is given back with its refusal; an event that
    // was not committed charged nothing.
    let refunds = match committed {
        Some(_) => entry.debits.iter().map(Debit::refund).collect(),
        None => Vec::new(),
    };
    let mut late = event.clone();
    late.ts_ms = time::now_ms();
    if !refused {
        late.decision = Some(super::Decision::Block);
        late.check = "audit".to_owned();
        late.reason = match committed {
            Some(id) => format!(
                "event {id} became durable only after its caller stopped waiting (audit deadline): the caller was answered with a refusal"
            ),
            None => "the audit store did not record this event before its caller stopped waiting (audit deadline): the caller was answered with a refusal".to_owned(),
        };
        late.call_id = committed.or(event.call_id);
    }
    let mut record = Entry::new(late, refunds);
    match (&entry.approval, committed) {
        // A resumed call that was committed gives its approval back with its refusal.
        (Some(ApprovalWrite::Consume { id, .. }), Some(_)) if entry.approval_applied => {
            record.approval = Some(ApprovalWrite::Restore { id: id.clone() });
        }
        // An escalation that was not written created no approval: its record names none.
        (Some(ApprovalWrite::Create(_)), None) => record.event.pending_id.clear(),
        // Nor did a supersession: the record names the approval the call used.
        (Some(ApprovalWrite::Supersede { id, .. }), None) => record.event.pending_id = id.clone(),
        _ => {}
    }
    Some(record)
}

/// A count every append moves twice, on its own cache line: beside the other counters, each
/// move would take their line from the core that last wrote one of them.
#[derive(Default)]
#[repr(align(128))]
pub(crate) struct InFlight(std::sync::atomic::AtomicUsize);

impl InFlight {
    pub(crate) fn now(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counts an append in [`Counters::appending`] while it waits.
struct Appending<'a>(&'a Counters);

impl<'a> Appending<'a> {
    fn new(counters: &'a Counters) -> Self {
        counters.appending.0.fetch_add(1, Ordering::Relaxed);
        Self(counters)
    }
}

impl Drop for Appending<'_> {
    fn drop(&mut self) {
        self.0.appending.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One tenant's writer.
struct Writer {
    shared: Shared,
    tenant: String,
    /// PostgreSQL: the connection kept from the last batch while more follow.
    held: Option<Held>,
}

impl Writer {
    /// Commits a batch; the entries come back (settling may have rewritten some as refusals;
    /// they are lost only if the SQLite committer itself is gone).
    async fn commit(
        &mut self,
        mut entries: Vec<Entry>,
        force: bool,
    ) -> (Vec<Entry>, Result<Committed, AuditError>) {
        match (&self.shared.db, &self.shared.sqlite) {
            (Db::Sqlite(_), Some(committer)) => {
                committer.commit(&self.tenant, entries, force).await
            }
            (Db::Sqlite(_), None) => (entries, Err(AuditError::Unavailable)),
            (Db::Postgres(pool), _) => {
                let done = commit_postgres(
                    pool,
                    &mut self.held,
                    &self.shared,
                    &self.tenant,
                    &mut entries,
                    force,
                )
                .await;
                if done.is_ok() {
                    (self.shared.counters.transactions).fetch_add(1, Ordering::Relaxed);
                }
                (entries, done)
            }
        }
    }

    /// [`Self::commit`] in a transaction no other tenant's batch shares (on PostgreSQL every
    /// tenant's batch is its own transaction anyway).
    async fn commit_alone(
        &mut self,
        entries: Vec<Entry>,
    ) -> (Vec<Entry>, Result<Committed, AuditError>) {
        match (&self.shared.db, &self.shared.sqlite) {
            (Db::Sqlite(_), Some(committer)) => committer.commit_alone(&self.tenant, entries).await,
            _ => self.commit(entries, false).await,
        }
    }

    /// Signs a checkpoint of the current head if it is not covered yet.
    async fn checkpoint(&mut self) -> Result<bool, AuditError> {
        self.commit(Vec::new(), true).await.1.map(|c| !c.uncovered)
    }

    /// Keeps a late record for a later commit (bounded).
    fn keep_late(&self, late: &mut Late, record: Option<Entry>) {
        let Some(record) = record else { return };
        if late.keep(record).is_err() {
            self.shared
                .counters
                .late_dropped
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(tenant = %self.tenant, "audit: too many late records held; dropping the refusal of a caller that gave up at the deadline");
        }
    }

    /// Commits late records (up to a batch) in transactions of their own: all together, or
    /// one per transaction while the one the store refuses is looked for. Returns whether the
    /// chain's head is now uncovered by a checkpoint.
    async fn write_late(&mut self, late: &mut Late) -> bool {
        // While searching one record at a time, a few commits a turn: fresh calls wait
        // behind each.
        let mut budget = if late.searching() {
            LATE_SINGLES_A_TURN
        } else {
            self.shared.cfg.max_batch
        };
        let mut uncovered = false;
        while budget > 0 && !late.is_empty() {
            let records = late.take(budget);
            let (n, committing) = (records.len(), std::time::Instant::now());
            let (records, done) = self.commit_alone(records).await;
            (self.shared.counters.commits).record(n, committing.elapsed(), done.is_ok());
            match done {
                Ok(done) => {
                    let c = &self.shared.counters;
                    c.events
                        .fetch_add(done.appended.len() as u64, Ordering::Relaxed);
                    c.batches.fetch_add(1, Ordering::Relaxed);
                    late.committed();
                    uncovered = done.uncovered;
                    budget = budget.saturating_sub(n);
                }
                Err(e) => {
                    self.lost_late(n, records.len());
                    if late.failed(records) {
                        tracing::warn!(tenant = %self.tenant, records = n, error = %e, "audit: late refusal records not written yet; retrying");
                    }
                    break;
                }
            }
        }
        uncovered
    }

    /// Counts and says late records a failed commit did not give back (the SQLite writer
    /// thread ended with them).
    fn lost_late(&self, taken: usize, returned: usize) {
        if returned < taken {
            let lost = (taken - returned) as u64;
            (self.shared.counters.late_dropped).fetch_add(lost, Ordering::Relaxed);
            tracing::error!(tenant = %self.tenant, records = lost, "audit: late refusal records lost with the audit writer");
        }
    }

    /// A fresh commit succeeded: a late commit that failed before it failed for what it
    /// carried.
    fn store_is_up(&self, late: &mut Late) {
        if let Some(dropped) = late.store_is_up() {
            self.shared
                .counters
                .late_dropped
                .fetch_add(1, Ordering::Relaxed);
            let e = &dropped.event;
            tracing::error!(
                tenant = %self.tenant,
                tool = %e.tool,
                agent = %e.agent_id,
                ts_ms = e.ts_ms,
                strikes = super::late::STRIKES,
                "audit: dropping a late refusal record the store keeps refusing while it takes every other commit"
            );
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let cfg = self.shared.cfg.clone();
        let mut batch: Vec<Job> = Vec::with_capacity(cfg.max_batch);
        // When set: the head is not covered by a checkpoint, sign one by then.
        let mut checkpoint_due: Option<tokio::time::Instant> = None;
        // Records of callers that gave up at the deadline, written in commits of their own.
        let mut late = Late::default();
        loop {
            let now = tokio::time::Instant::now();
            let late_due = (!late.is_empty()).then(|| now + LATE_RETRY);
            // A connection kept for the next batch goes back to the pool when none comes.
            let release_due = self.held.is_some().then(|| now + HOLD_IDLE);
            let wake = [checkpoint_due, late_due, release_due]
                .into_iter()
                .flatten()
                .min();
            let first = match wake {
                Some(due) => tokio::select! {
                    biased;
                    job = rx.recv() => match job {
                        Some(job) => Some(job),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(due), if release_due == Some(due) => {
                        self.held = None;
                        continue;
                    }
                    _ = tokio::time::sleep_until(due), if late_due == Some(due) => None,
                    _ = tokio::time::sleep_until(due) => {
                        checkpoint_due = match self.checkpoint().await {
                            Ok(_) => None,
                            Err(e) => {
                                tracing::warn!(tenant = %self.tenant, error = %e, "audit checkpoint failed; retrying");
                                Some(tokio::time::Instant::now() + std::time::Duration::from_secs(1))
                            }
                        };
                        continue;
                    }
                },
                None => match rx.recv().await {
                    Some(job) => Some(job),
                    None => break,
                },
            };
            batch.extend(first);
            while batch.len() < cfg.max_batch {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            // Refuse what waited too long: its caller is better told now than after a late write.
            let now = Instant::now();
            let (fresh, stale): (Vec<Job>, Vec<Job>) = batch
                .drain(..)
                .partition(|j| now.duration_since(j.enqueued) <= cfg.max_queue_wait);
            for job in stale {
                self.shared
                    .counters
                    .overloaded
                    .fetch_add(1, Ordering::Relaxed);
                let refused = job.reply.send(Err(AuditError::Overloaded {
                    tenant: self.tenant.clone(),
                    detail: "event waited too long for the writer",
                }));
                if let Err(_gone) = refused {
                    // Its caller gave up at the deadline: record the refusal it was told.
                    self.keep_late(&mut late, late_record(&job.entry, None));
                }
            }
            // Late records go in commits of their own, after this batch's (its callers are
            // still waiting; a late record's caller is not), so that one the store refuses
            // cannot refuse these calls.
            if fresh.is_empty() {
                if !late.is_empty() && self.write_late(&mut late).await && checkpoint_due.is_none()
                {
                    checkpoint_due = Some(tokio::time::Instant::now() + cfg.checkpoint_interval);
                }
                continue;
            }
            let mut events: Vec<Entry> = Vec::with_capacity(fresh.len());
            let mut replies = Vec::with_capacity(fresh.len());
            for j in fresh {
                events.push(j.entry);
                replies.push(j.reply);
            }
            let force = checkpoint_due.is_some_and(|d| d <= tokio::time::Instant::now());
            let (batch, committing) = (events.len(), std::time::Instant::now());
            let (events, committed) = self.commit(events, force).await;
            (self.shared.counters.commits).record(batch, committing.elapsed(), committed.is_ok());
            match committed {
                Ok(done) => {
                    let c = &self.shared.counters;
                    c.events
                        .fetch_add(done.appended.len() as u64, Ordering::Relaxed);
                    c.batches.fetch_add(1, Ordering::Relaxed);
                    self.store_is_up(&mut late);
                    let own = events.iter().zip(&done.appended);
                    for (reply, (entry, appended)) in replies.into_iter().zip(own) {
                        let id = appended.id;
                        let answer = Appended {
                            refused: entry.refused.clone(),
                            refused_check: if entry.refused.is_some() {
                                entry.event.check.clone()
                            } else {
                                String::new()
                            },
                            ..appended.clone()
                        };
                        if reply.send(Ok(answer)).is_err() {
                            // Committed after its caller was refused at the deadline.
                            self.keep_late(&mut late, late_record(entry, Some(id)));
                        }
                    }
                    let uncovered = done.uncovered | self.write_late(&mut late).await;
                    if !uncovered {
                        checkpoint_due = None;
                    } else if checkpoint_due.is_none() {
                        checkpoint_due =
                            Some(tokio::time::Instant::now() + cfg.checkpoint_interval);
                    }
                }
                Err(e) => {
                    tracing::error!(tenant = %self.tenant, events = replies.len(), error = %e, "audit batch failed to commit; refusing its calls");
                    self.shared
                        .counters
                        .failed_batches
                        .fetch_add(1, Ordering::Relaxed);
                    let e = match e {
                        AuditError::CommitFailed(inner) => inner,
                        e => Arc::new(e),
                    };
                    for (reply, entry) in replies.into_iter().zip(events) {
                        if reply
                            .send(Err(AuditError::CommitFailed(e.clone())))
                            .is_err()
                        {
                            // Nothing of it was stored (if its debits refused it, the record
                            // says so; it is a refusal either way).
                            self.keep_late(&mut late, late_record(&entry, None));
                        }
                    }
                }
            }
        }
        // Queue closed: every AuditLog handle is gone. Record what is still late (all at once;
        // after a failure one at a time, so a record the store refuses loses only itself;
        // for at most a few seconds), then cover the tail before leaving.
        if !late.is_empty() {
            let until = Instant::now() + LATE_AT_SHUTDOWN;
            let mut records = late.take_all();
            let mut one_by_one = false;
            while !records.is_empty() && Instant::now() < until {
                let take = if one_by_one { 1 } else { records.len() };
                let part: Vec<Entry> = records.drain(..take).collect();
                let n = part.len();
                let (mut back, done) = self.commit_alone(part).await;
                match done {
                    Ok(done) => {
                        checkpoint_due =
                            checkpoint_due.or(done.uncovered.then(tokio::time::Instant::now));
                    }
                    Err(e) if !one_by_one && n > 1 => {
                        tracing::warn!(tenant = %self.tenant, error = %e, "audit: late refusal records refused together at shutdown; trying one at a time");
                        self.lost_late(n, back.len());
                        back.append(&mut records);
                        records = back;
                        one_by_one = true;
                    }
                    Err(e) => {
                        (self.shared.counters.late_dropped).fetch_add(n as u64, Ordering::Relaxed);
                        tracing::error!(tenant = %self.tenant, events = n, error = %e, "audit: late refusal record lost at shutdown");
                    }
                }
            }
            if !records.is_empty() {
                let n = records.len() as u64;
                (self.shared.counters.late_dropped).fetch_add(n, Ordering::Relaxed);
                tracing::error!(tenant = %self.tenant, events = n, "audit: late refusal records lost at shutdown (out of time)");
            }
        }
        if checkpoint_due.is_some()
            && let Err(e) = self.checkpoint().await
        {
            tracing::warn!(tenant = %self.tenant, error = %e, "final audit checkpoint failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An approval decided whose caller stopped waiting took effect when it was committed: it
    /// gets no record calling it refused (the queue says approved; the chain must agree). A
    /// call's allow committed late does.
    #[test]
    fn only_a_calls_decision_gets_a_late_refusal() {
        let mut decided =
            super::super::AuditEvent::new(super::super::kinds::APPROVAL_DECIDED, "acme");
        decided.decision = Some(super::super::Decision::Allow);
        let mut entry = Entry::new(decided, Vec::new());
        entry.approval = Some(ApprovalWrite::Decide {
            id: "pa_1".into(),
            approve: true,
            by: "ops".into(),
            note: String::new(),
            at_ms: 1,
            resume_until_ms: 2,
        });
        assert!(late_record(&entry, Some(7)).is_none());
        assert!(late_record(&entry, None).is_none());
        // A revoke runs only once its event is recorded: committed late, it did not run.
        let mut revoked = super::super::AuditEvent::new("admin/revoke", "acme");
        revoked.decision = Some(super::super::Decision::Allow);
        let late = late_record(&Entry::new(revoked, Vec::new()), Some(8)).expect("a record");
        assert_eq!(late.event.decision, Some(super::super::Decision::Block));

        // A supersession committed late gives the approval it used back.
        let mut escalated = super::super::AuditEvent::new(super::super::kinds::TOOL_CALL, "acme");
        escalated.decision = Some(super::super::Decision::Escalate);
        let mut entry = Entry::new(escalated, Vec::new());
        entry.approval = Some(ApprovalWrite::Supersede {
            id: "pa_used".into(),
            at_ms: 1,
            next: None,
        });
        entry.approval_applied = true;
        let late = late_record(&entry, Some(10)).expect("a record");
        assert!(
            matches!(&late.approval, Some(ApprovalWrite::Restore { id }) if id == "pa_used"),
            "{:?}",
            late.approval
        );
        entry.approval_applied = false;
        assert!(late_record(&entry, Some(10)).is_none(), "nothing used up");

        let mut call = super::super::AuditEvent::new(super::super::kinds::TOOL_CALL, "acme");
        call.decision = Some(super::super::Decision::Allow);
        let late = late_record(&Entry::new(call, Vec::new()), Some(9)).expect("a record");
        assert_eq!(late.event.decision, Some(super::super::Decision::Block));
        assert_eq!(late.event.call_id, Some(9));
    }
}
