//! The one SQLite writer of this process: a dedicated thread that owns its own connection to
//! the database file and commits everything the tenant writers handed it since its last commit
//! in **one** transaction (one fsync), as soon as the previous commit ends, with no timer.
//!
//! The connection and what a commit needs are one [`Engine`] behind a mutex. When the gateway
//! is quiet (one append in flight, the writer idle), the tenant writer that hands in takes the
//! engine and commits its part on its own thread, as the leader of a group commit does, instead
//! of waking the writer thread and being woken by it ([`SqliteCommitter::commit_here`]).
//!
//! The thread runs every statement of a batch itself, with statements prepared once and kept
//! (`prepare_cached`): a batch costs one hop from the async world and one back, not one per
//! statement through sqlx's SQLite worker. Inside the transaction it reads every head, applies
//! the approval writes, decides every budget debit in queue order against the counters it read
//! under the write lock, hashes each tenant's events onto its own chain, inserts them (many
//! rows a statement: [`ROWS_PER_INSERT`]), writes the outbox rows and due checkpoints, and
//! moves every head with a compare-and-set. After each commit it rings the thread that enters
//! the events in the audit query's lookup tables (`facet_writer.rs`), which runs beside it on
//! a file of its own: no commit of callers' events carries those entries. A part whose stored
//! head is unusable (a malformed hash) is refused alone, before anything of it is written; any
//! failure of a statement or of the commit refuses every part of the batch.
//!
//! The connection commits with `synchronous=NORMAL` (no sync at commit); a committed batch is
//! answered only once `durable.rs` has synced the log: on the committing thread when no other
//! part waits, else on the sync thread while the writer commits the next batch. (A store left
//! in SQLite's rollback journal has no log to sync beside the writer: there it keeps `FULL`.)
//!
//! This module must never answer a part before the transaction holding it committed, and never
//! commit a part it could not write whole.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::commit::{
    CHECKPOINT_INSERT, Committed, Entry, HEAD_INSERT, HEAD_SELECT, HEAD_UPDATE, NewRow, plan,
};
use super::durable::{Committing, Durability};
use super::facet_writer::FacetWriter;
use super::key::hex;
use super::log::{Appended, GENESIS, Shared};
use super::wal::{WRITER_AUTOCHECKPOINT, WalCopier};
use super::{AuditError, charges, time};

/// A tenant writer's batch handed to the [`SqliteCommitter`]; the entries come back with the
/// answer (settling may have rewritten some as refusals).
struct Part {
    tenant: String,
    entries: Vec<Entry>,
    force: bool,
    /// Committed in a transaction of its own (late records, which the store may refuse for
    /// what they hold: they must not take other tenants' calls down with them).
    alone: bool,
    reply: oneshot::Sender<(Vec<Entry>, Result<Committed, AuditError>)>,
}

/// The one SQLite writer of this process. Cheap to clone.
#[derive(Clone)]
pub(crate) struct SqliteCommitter {
    parts: mpsc::Sender<Part>,
    engine: Arc<Mutex<Engine>>,
    counters: Arc<super::log::Counters>,
}

/// Parts waiting for the committer. Each tenant writer waits for its answer before it hands in
/// its next part, so this bounds only how many tenants wait at once, and a full queue makes a
/// writer wait (its callers' deadline still applies).
const PARTS_QUEUE: usize = 1024;

/// The writer's page cache (negative: KiB), 1,024 pages of 4 KiB: the hot set is the chain
/// heads and the right-hand leaves of each tenant's indexes. Kept small on purpose: a commit
/// whose B-tree balance swapped page numbers (SQLite parks a page at the lock-byte page's
/// number meanwhile) ends with a scan of the cache's whole hash table, a division per slot,
/// whose size follows the cache's. At 32 MiB that scan was 3-5 % of the writer's time with
/// 16 tenants, whose inserts land mid-index and balance often (`BENCHMARKS.md`, session 20).
const WRITER_CACHE_KIB: i64 = -4096;

/// Columns of an event's row, bound by position.
const EVENT_COLUMNS: usize = 14;

/// Rows one `INSERT` statement carries, largest first: a tenant's part is written in as few
/// statements as these sizes add up to (8 rows: one statement; 13: three). Per statement, not
/// per row, SQLite opens a cursor on the table and on each of its indexes, and reads and
/// rewrites the `AUTOINCREMENT` counter; per row it pays only the B-tree inserts.
const ROWS_PER_INSERT: [usize; 6] = [32, 16, 8, 4, 2, 1];

/// The head of every event `INSERT`. `OR ROLLBACK`: a statement of several rows that broke a
/// constraint half-way would otherwise have to be undone alone, so SQLite would copy every page
/// it touches to a statement journal first (that copy more than doubled the writer's time with
/// 16 tenants). A broken constraint (`UNIQUE (tenant, seq)`: a forked chain) fails the whole
/// batch in any case, so rolling back the whole transaction at once loses nothing.
const INSERT_PREFIX: &str = "INSERT OR ROLLBACK INTO audit_events (tenant, seq, ts_ms, event, \
     decision, check_name, agent_id, tool, jti, root_jti, elevation_id, body, prev_hash, hash) ";

/// The `INSERT` of each size of [`ROWS_PER_INSERT`], built once (the statement cache is keyed
/// by the text).
static EVENT_INSERTS: std::sync::LazyLock<[String; 6]> = std::sync::LazyLock::new(|| {
    ROWS_PER_INSERT.map(|rows| {
        let values: Vec<String> = (0..rows)
            .map(|r| {
                let cols: Vec<String> = (1..=EVENT_COLUMNS)
                    .map(|c| format!("?{}", r * EVENT_COLUMNS + c))
                    .collect();
                format!("({})", cols.join(", "))
            })
            .collect();
        format!("{INSERT_PREFIX}VALUES {}", values.join(", "))
    })
});

impl SqliteCommitter {
    /// Opens the writer's own connection to the file behind `pool` and starts its thread; the
    /// thread ends when every handle is dropped.
    pub(crate) fn start(pool: &sqlx::SqlitePool, shared: Shared) -> Result<Self, AuditError> {
        let options = pool.connect_options();
        let path = options.get_filename();
        let conn = open(path)?;
        // On a filesystem that cannot do WAL the store keeps SQLite's rollback journal: there
        // is no log to sync beside the writer, and SQLite's own sync at commit stays.
        let journal: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
        let mark = shared.outbox.durable().clone();
        let mark_for_facets = mark.clone();
        let durable = if journal.eq_ignore_ascii_case("wal") {
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            Durability::start(path, mark, Arc::clone(&shared.counters))?
        } else {
            Durability::by_sqlite(mark, Arc::clone(&shared.counters))
        };
        let wal = WalCopier::start(open(path)?)?;
        let facets = FacetWriter::start(
            path,
            mark_for_facets,
            shared.cfg.writer_batch,
            Arc::clone(&shared.counters),
        )?;
        let (parts, rx) = mpsc::channel(PARTS_QUEUE);
        let counters = Arc::clone(&shared.counters);
        let cfg = shared.cfg.clone();
        let engine = Arc::new(Mutex::new(Engine {
            conn,
            wal,
            durable,
            facets,
            store: pool.clone(),
            shared,
        }));
        let for_thread = Arc::clone(&engine);
        std::thread::Builder::new()
            .name("intentgate-audit-writer".into())
            .spawn(move || run(for_thread, rx, &cfg))
            .map_err(|e| AuditError::Config(format!("cannot start the audit writer: {e}")))?;
        Ok(Self {
            parts,
            engine,
            counters,
        })
    }

    /// Commits `entries` of `tenant` with whatever other tenants hand in meanwhile.
    pub(crate) async fn commit(
        &self,
        tenant: &str,
        entries: Vec<Entry>,
        force: bool,
    ) -> (Vec<Entry>, Result<Committed, AuditError>) {
        self.commit_part(tenant, entries, force, false).await
    }

    /// Commits `entries` of `tenant` in a transaction no other tenant's part shares.
    pub(crate) async fn commit_alone(
        &self,
        tenant: &str,
        entries: Vec<Entry>,
    ) -> (Vec<Entry>, Result<Committed, AuditError>) {
        self.commit_part(tenant, entries, false, true).await
    }

    async fn commit_part(
        &self,
        tenant: &str,
        entries: Vec<Entry>,
        force: bool,
        alone: bool,
    ) -> (Vec<Entry>, Result<Committed, AuditError>) {
        let (reply, answer) = oneshot::channel();
        let part = Part {
            tenant: tenant.to_owned(),
            entries,
            force,
            alone,
            reply,
        };
        let part = match self.commit_here(part) {
            Some(part) => part,
            None => return answered(answer).await,
        };
        if let Err(mpsc::error::SendError(part)) = self.parts.send(part).await {
            return (part.entries, Err(AuditError::Unavailable));
        }
        answered(answer).await
    }

    /// Commits `part` on this thread when the gateway is quiet: it is the only append in
    /// flight, no part waits for the writer and the writer is idle. Then the two thread
    /// hand-offs (to the writer thread and back, each a sleeping thread woken) are most of
    /// what a commit costs beyond its sync: one call in flight answered 31 µs sooner at the
    /// median, for 25 µs less CPU, and switched threads 4.7 times a call instead of 10.6
    /// (`BENCHMARKS.md`, session 27). Under load the part goes to the writer
    /// thread, which batches; `None`: committed here, and answered.
    ///
    /// This blocks the runtime worker for the commit and its sync, which the call waits for
    /// anyway. No other call is in the audit stage then, and the worker's other tasks are
    /// stolen by the other workers (nothing can be in its LIFO slot: this task fills it only
    /// with its answer, after the commit). Handing the worker's core over (`block_in_place`)
    /// cost more than it saved here. A runtime with one worker (current-thread, or a host of
    /// one CPU) has no other worker: there the part always goes to the writer thread, or a
    /// task holding SQLite's write lock between two awaits (the outbox's acknowledgement)
    /// could not be polled to release it while this commit waits for it in the busy handler.
    fn commit_here(&self, part: Part) -> Option<Part> {
        let quiet = self.counters.appending.now() <= 1
            && self.parts.capacity() == self.parts.max_capacity()
            && tokio::runtime::Handle::try_current().is_ok_and(|h| {
                h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
                    && h.metrics().num_workers() >= 2
            });
        if !quiet {
            return Some(part);
        }
        // Busy (the writer thread is committing) or poisoned (a commit panicked: the thread
        // has ended, and the hand-in fails closed).
        let Ok(mut engine) = self.engine.try_lock() else {
            return Some(part);
        };
        // A part handed in meanwhile waits for the engine: then the sync goes to the sync
        // thread, so that the writer commits that part beside it.
        engine.commit(vec![part], || {
            self.parts.capacity() == self.parts.max_capacity()
        });
        self.counters.caller_commits.fetch_add(1, Ordering::Relaxed);
        None
    }
}

async fn answered(answer: oneshot::Receiver<super::durable::Answer>) -> super::durable::Answer {
    match answer.await {
        Ok(done) => done,
        // The writer thread ended mid-commit (a panic): the entries are lost with it, and
        // their callers are refused.
        Err(_) => (Vec::new(), Err(AuditError::Unavailable)),
    }
}

/// A connection of the writer or of its WAL copier, syncing at every commit as the store's pool
/// does (WAL is a property of the file, set by the store; `synchronous` is per connection, and
/// the writer lowers its own to `NORMAL` when [`Durability`] syncs the log instead).
fn open(path: &Path) -> Result<Connection, AuditError> {
    let name = path.to_string_lossy();
    if name.is_empty() || name == ":memory:" {
        return Err(AuditError::Config(
            "the audit log needs a SQLite file, not an in-memory database".into(),
        ));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| {
        AuditError::Config(format!(
            "the audit writer cannot open {}: {e}",
            path.display()
        ))
    })?;
    conn.busy_timeout(crate::store::SQLITE_BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB)?;
    conn.pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// What a commit needs, owned by whichever thread commits: the writer thread, or a caller that
/// found the gateway quiet ([`SqliteCommitter::commit`]). Behind a mutex, so commits stay one
/// at a time and in the order they take it.
struct Engine {
    conn: Connection,
    wal: WalCopier,
    durable: Durability,
    facets: FacetWriter,
    store: sqlx::SqlitePool,
    shared: Shared,
}

impl Engine {
    /// Commits `batch` (one part per tenant) in one transaction and answers every part once
    /// it is durable: here when `alone()` says, once the transaction has ended, that nothing
    /// else waits for the writer; else beside the next commit, on the sync thread.
    fn commit(&mut self, mut batch: Vec<Part>, alone: impl FnOnce() -> bool) {
        // The store was closed (shutdown): nothing more is written, as through its pool. After
        // a failed sync nothing is: what the log holds is unknown until SQLite recovers it.
        let refusal = if self.store.is_closed() {
            Some(AuditError::Store(sqlx::Error::PoolClosed))
        } else if self.durable.failed() {
            Some(AuditError::Io(std::io::Error::other(
                "an earlier sync of the write-ahead log failed; restart the gateway",
            )))
        } else {
            None
        };
        if let Some(e) = refusal {
            let e = Arc::new(e);
            for part in batch {
                let refused = Err(AuditError::CommitFailed(Arc::clone(&e)));
                let _ = part.reply.send((part.entries, refused));
            }
            return;
        }
        let seq = self.shared.outbox.durable().begin();
        let results = commit_batch(&mut self.conn, &self.shared, &mut batch);
        let events = results.iter().flatten().map(|c| c.appended.len()).sum();
        self.wal.committed(events);
        let outboxed = results.iter().flatten().any(|c| c.outboxed);
        let answers = batch
            .into_iter()
            .zip(results)
            .map(|(part, result)| (part.reply, part.entries, result))
            .collect();
        let outbox = self.shared.outbox.clone();
        let then: Option<Box<dyn FnOnce() + Send>> = if outboxed {
            Some(Box::new(move || outbox.ring()))
        } else {
            None
        };
        let batch = Committing { seq, answers, then };
        // Asked now, not before the transaction: what was handed in while it ran is better
        // committed beside this sync than after it.
        self.durable.settle(batch, alone());
        if events > 0 {
            self.facets.ring();
        }
    }
}

/// The writer thread. It takes the engine only to commit parts it was handed: a caller that
/// finds the gateway quiet must find the engine free.
fn run(engine: Arc<Mutex<Engine>>, mut rx: mpsc::Receiver<Part>, cfg: &super::AuditConfig) {
    if cfg.writer_batch
        && let Err(e) = super::priority::batch_current_thread()
    {
        tracing::warn!(error = %e, "cannot move the audit writer to SCHED_BATCH; its wake-ups preempt requests");
    }
    let nice = cfg.writer_nice;
    match super::priority::lower_current_thread(nice) {
        Ok(now) => tracing::debug!(nice = now, "audit writer priority"),
        Err(e) => {
            tracing::warn!(nice, error = %e, "cannot lower the audit writer's priority; it keeps the process's")
        }
    }
    let mut parts: Vec<Part> = Vec::new();
    // A second part of a tenant already in the batch waits for the next one (its writer hands
    // in one part at a time, so this is only a guard).
    let mut deferred: Vec<Part> = Vec::new();
    loop {
        if parts.is_empty() && deferred.is_empty() {
            match rx.blocking_recv() {
                Some(first) => parts.push(first),
                None => return,
            }
        }
        // A caller committing its own part holds the engine meanwhile; a poisoned engine
        // (a commit panicked) refuses everything: the parts' replies drop unanswered.
        let Ok(mut engine) = engine.lock() else {
            return;
        };
        parts.append(&mut deferred);
        // Everything handed in while the last commit ran (here or on a caller's thread) goes
        // into this one. (Giving up the core for parts still on their way, as the async
        // committer did, only delayed commits on this thread: the runtime's threads hand in
        // while it commits.)
        while let Ok(more) = rx.try_recv() {
            parts.push(more);
        }
        let mut seen = HashSet::new();
        let mut batch = Vec::with_capacity(parts.len());
        // A part that must commit alone takes a transaction of its own (the first part always
        // goes in: every round commits something).
        let mut closed = false;
        for part in parts.drain(..) {
            let fits = !closed && (!part.alone || batch.is_empty()) && !seen.contains(&part.tenant);
            if fits {
                seen.insert(part.tenant.clone());
                closed = part.alone;
                batch.push(part);
            } else {
                deferred.push(part);
            }
        }
        // Alone: synced here at once. Others waiting: synced beside the next commit.
        engine.commit(batch, || rx.is_empty() && deferred.is_empty());
    }
}

/// One transaction for every part.
fn commit_batch(
    conn: &mut Connection,
    shared: &Shared,
    parts: &mut [Part],
) -> Vec<Result<Committed, AuditError>> {
    let all_fail = |e: AuditError, n: usize| {
        let e = Arc::new(e);
        (0..n)
            .map(|_| Err(AuditError::CommitFailed(e.clone())))
            .collect::<Vec<_>>()
    };
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => return all_fail(e.into(), parts.len()),
    };
    // A failed statement drops `tx`, which rolls the transaction back.
    let results = match write_batch(&tx, shared, parts) {
        Ok(r) => r,
        Err(e) => return all_fail(e, parts.len()),
    };
    if let Err(e) = tx.commit() {
        return all_fail(e.into(), parts.len());
    }
    shared.counters.transactions.fetch_add(1, Ordering::Relaxed);
    for done in results.iter().flatten() {
        if done.checkpointed {
            shared.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
        }
    }
    results
}

/// A tenant's head as stored, made at the genesis when it has none (the write lock is held: no
/// other writer can make one meanwhile).
fn read_head(tx: &Transaction<'_>, tenant: &str) -> Result<super::commit::Head, AuditError> {
    let mut select = tx.prepare_cached(HEAD_SELECT)?;
    let read = |r: &rusqlite::Row<'_>| Ok((r.get(0)?, r.get(1)?, r.get(2)?));
    if let Some((seq, hash, checkpoint_size)) = select.query_row([tenant], read).optional()? {
        return Ok(super::commit::Head {
            seq,
            hash,
            checkpoint_size,
        });
    }
    let genesis = hex::encode(&GENESIS);
    tx.prepare_cached(HEAD_INSERT)?
        .execute(rusqlite::params![tenant, genesis])?;
    Ok(super::commit::Head {
        seq: 0,
        hash: genesis,
        checkpoint_size: 0,
    })
}

/// Writes every part inside the open transaction. `Err` refuses the whole batch; a part
/// refused alone has its `Err` among the results.
fn write_batch(
    tx: &Transaction<'_>,
    shared: &Shared,
    parts: &mut [Part],
) -> Result<Vec<Result<Committed, AuditError>>, AuditError> {
    let n = parts.len();
    let mut refused: Vec<Option<AuditError>> = (0..n).map(|_| None).collect();
    let mut olds = Vec::with_capacity(n);
    for (i, part) in parts.iter().enumerate() {
        let head = read_head(tx, &part.tenant)?;
        if hex::decode32(&head.hash).is_none() {
            refused[i] = Some(AuditError::Integrity(format!(
                "chain head of {:?} holds a malformed hash",
                part.tenant
            )));
            olds.push(None);
        } else {
            olds.push(Some(head));
        }
    }
    let live: Vec<usize> = (0..n).filter(|i| refused[*i].is_none()).collect();

    // Approval writes, then every part's budget debits together, before the chains: a refusal
    // rewrites its event before it is hashed; a consumed approval whose call a debit refused
    // is given back.
    for &i in &live {
        let part = &mut parts[i];
        crate::approvals::record::apply_sqlite(tx, &part.tenant, &mut part.entries)?;
    }
    let mut all: Vec<&mut Entry> = Vec::new();
    for (i, part) in parts.iter_mut().enumerate() {
        if refused[i].is_none() {
            all.extend(part.entries.iter_mut());
        }
    }
    charges::settle_sqlite(tx, &mut all)?;
    for &i in &live {
        let part = &parts[i];
        crate::approvals::record::restore_sqlite(tx, &part.tenant, &part.entries)?;
    }

    let mut done: Vec<Option<Committed>> = (0..n).map(|_| None).collect();
    for &i in &live {
        let part = &parts[i];
        let tenant = part.tenant.as_str();
        let Some(old) = olds[i].take() else { continue };
        let (rows, new, checkpoint) = plan(
            &old,
            tenant,
            &part.entries,
            &shared.key,
            &shared.cfg,
            part.force,
        )?;
        let last_ts = rows.last().map(|r| r.ts_ms);
        let appended = insert_rows(tx, tenant, rows)?;
        let last = appended.last().map(|a| a.id).zip(last_ts);
        let outboxed = crate::outbox::store::enqueue_sqlite(
            tx,
            &shared.outbox,
            tenant,
            &part.entries,
            &appended,
        )?;
        if let Some((cp, note)) = &checkpoint {
            tx.prepare_cached(CHECKPOINT_INSERT)?
                .execute(rusqlite::params![
                    tenant,
                    cp.size as i64,
                    hex::encode(&cp.root_hash),
                    shared.key.name(),
                    note,
                    time::now_ms(),
                ])?;
        }
        if !appended.is_empty() || checkpoint.is_some() {
            let moved = tx.prepare_cached(HEAD_UPDATE)?.execute(rusqlite::params![
                new.seq,
                new.hash,
                new.checkpoint_size,
                last.map(|(id, _)| id),
                last.map(|(_, ts)| ts),
                tenant,
                old.seq,
                old.hash,
            ])?;
            if moved != 1 {
                return Err(AuditError::Integrity(format!(
                    "chain head of {tenant:?} moved under the writer"
                )));
            }
        }
        done[i] = Some(Committed {
            appended,
            uncovered: new.seq > new.checkpoint_size,
            checkpointed: checkpoint.is_some(),
            outboxed,
        });
    }
    let results = (0..n)
        .map(|i| match (refused[i].take(), done[i].take()) {
            (Some(e), _) => Err(e),
            (None, Some(d)) => Ok(d),
            (None, None) => Err(AuditError::Integrity("part not written".into())),
        })
        .collect();
    Ok(results)
}

/// Inserts a tenant's rows, in order, in as few statements as [`ROWS_PER_INSERT`] allows, and
/// returns each row's appended form.
///
/// A statement's rows take consecutive ids: under the write lock nothing else inserts, and
/// `AUTOINCREMENT` numbers each row one past the last. The statement's last id and its count of
/// changes are checked, so a statement that inserted fewer rows fails the batch.
fn insert_rows(
    tx: &Transaction<'_>,
    tenant: &str,
    mut rows: Vec<NewRow>,
) -> Result<Vec<Appended>, AuditError> {
    let mut out = Vec::with_capacity(rows.len());
    let mut at = 0;
    while at < rows.len() {
        let left = rows.len() - at;
        let size = ROWS_PER_INSERT
            .iter()
            .position(|k| *k <= left)
            .unwrap_or(ROWS_PER_INSERT.len() - 1);
        let k = ROWS_PER_INSERT[size];
        let mut insert = tx.prepare_cached(&EVENT_INSERTS[size])?;
        for (j, r) in rows[at..at + k].iter().enumerate() {
            bind_row(&mut insert, j * EVENT_COLUMNS, tenant, r)?;
        }
        let inserted = insert.raw_execute()?;
        if inserted != k {
            return Err(AuditError::Integrity(format!(
                "an insert of {k} events of {tenant:?} stored {inserted}"
            )));
        }
        let last = tx.last_insert_rowid();
        for (j, r) in rows[at..at + k].iter_mut().enumerate() {
            out.push(Appended {
                id: last - (k - 1 - j) as i64,
                seq: r.seq as u64,
                hash: std::mem::take(&mut r.hash),
                refused: None,
                refused_check: String::new(),
            });
        }
        at += k;
    }
    Ok(out)
}

/// Binds one row's columns after the first `base` parameters.
fn bind_row(
    insert: &mut rusqlite::CachedStatement<'_>,
    base: usize,
    tenant: &str,
    r: &NewRow,
) -> Result<(), AuditError> {
    let values: [&dyn rusqlite::ToSql; EVENT_COLUMNS] = [
        &tenant,
        &r.seq,
        &r.ts_ms,
        &r.kind,
        &r.decision,
        &r.check,
        &r.agent_id,
        &r.tool,
        &r.jti,
        &r.root_jti,
        &r.elevation_id,
        &r.body,
        &r.prev_hash,
        &r.hash,
    ];
    for (c, v) in values.into_iter().enumerate() {
        insert.raw_bind_parameter(base + c + 1, v)?;
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};

    use crate::audit::{AuditConfig, AuditEvent, AuditLog, Db, LogKey, kinds};

    /// A migrated store in a temporary directory (kept alive by the returned guard), syncing
    /// at every commit, in `journal` mode.
    pub(in crate::audit) async fn migrated(
        file: &str,
        journal: SqliteJournalMode,
    ) -> (tempfile::TempDir, sqlx::SqlitePool) {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join(file))
            .create_if_missing(true)
            .journal_mode(journal)
            .synchronous(SqliteSynchronous::Full);
        crate::store::sqlite::create_facets(&dir.path().join(file))
            .await
            .expect("lookup file");
        let pool = crate::store::sqlite::pool_options(&dir.path().join(file))
            .max_connections(2)
            .connect_with(options)
            .await
            .expect("pool");
        sqlx::migrate!("../migrations/sqlite")
            .run(&pool)
            .await
            .expect("schema");
        crate::store::sqlite::prepare_facets(&dir.path().join(file))
            .await
            .expect("lookup file");
        (dir, pool)
    }

    /// The writer thread runs in `SCHED_BATCH` at the configured nice value
    /// (`INTENTGATE_AUDIT_WRITER_NICE`), and only that thread: the test's own stays where it was.
    #[tokio::test]
    async fn the_writer_thread_runs_at_its_configured_priority() {
        let (_dir, pool) = migrated("n.sqlite3", SqliteJournalMode::Wal).await;
        let base = rustix::process::getpriority_process(None).expect("own nice");
        // A value no other test's writer uses, so that the thread found is this test's.
        let cfg = AuditConfig {
            writer_nice: 13,
            ..AuditConfig::default()
        };
        let key = LogKey::from_seed("gw", [7; 32]).expect("key");
        let log = AuditLog::open(Db::Sqlite(pool), key, cfg)
            .await
            .expect("audit");
        log.append(AuditEvent::new(kinds::TOOL_CALL, "acme"))
            .await
            .expect("committed");
        let writers: Vec<(i32, u32)> = std::fs::read_dir("/proc/self/task")
            .expect("tasks")
            .filter_map(|t| {
                let (name, nice, policy) =
                    crate::audit::priority::scheduling_of(&t.ok()?.path().join("stat"))?;
                (name == "intentgate-audi").then_some((nice, policy))
            })
            .collect();
        // In the batch class (3) by default, at the configured nice value.
        assert!(
            writers.contains(&(base.max(13), 3)),
            "no batch writer thread at nice {}: {writers:?}",
            base.max(13)
        );
        assert_eq!(
            rustix::process::getpriority_process(None).expect("own nice"),
            base
        );
    }

    /// The batches of several tenants handed in while a commit waits are written in one
    /// transaction, and the counters say so: four tenant batches, two transactions.
    #[tokio::test]
    async fn tenants_handed_in_meanwhile_share_one_transaction() {
        let (_dir, pool, log) = opened("t.sqlite3").await;
        // Another connection holds the write lock: the writer's first transaction waits in
        // SQLite's busy handler while the other tenants hand in their batches.
        a_then_three_while_locked(&pool, &log).await;
        let stats = log.stats();
        assert_eq!((stats.events, stats.batches), (4, 4), "{stats:?}");
        assert_eq!(
            stats.transactions, 2,
            "tenant a alone, then b, c and d together: {stats:?}"
        );
    }

    /// With one append in flight and the writer idle, the caller commits its own part (no
    /// hand-off to the writer thread), and is answered only once the commit is durable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_append_commits_on_its_callers_thread() {
        let (_dir, pool, log) = opened("l.sqlite3").await;
        for n in 1..=3u64 {
            let a = log
                .append(AuditEvent::new(kinds::TOOL_CALL, "acme"))
                .await
                .expect("committed");
            let mark = log.outbox_router().durable();
            assert_eq!(
                mark.reached_by(mark.begun()),
                Ok(true),
                "answered before durable"
            );
            let stats = log.stats();
            assert_eq!(
                (stats.transactions, stats.caller_commits),
                (n, n),
                "{stats:?}"
            );
            let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_events WHERE id = ?")
                .bind(a.id)
                .fetch_one(&pool)
                .await
                .expect("read");
            assert_eq!(stored, 1);
        }
    }

    /// A runtime of one worker never commits on the caller's thread: a task of that worker
    /// holding SQLite's write lock between two awaits could not run to release it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_lone_append_on_a_runtime_of_one_worker_goes_to_the_writer() {
        let (_dir, pool, log) = opened("one.sqlite3").await;
        // The lock held across an await on this runtime's only worker, as the outbox's
        // acknowledgement holds it: the append must still be committed once it is released.
        let mut holder = pool.acquire().await.expect("connection");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *holder)
            .await
            .expect("lock");
        let release = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            sqlx::query("COMMIT")
                .execute(&mut *holder)
                .await
                .expect("release");
        });
        log.append(AuditEvent::new(kinds::TOOL_CALL, "acme"))
            .await
            .expect("committed once the lock is released");
        release.await.expect("released");
        let stats = log.stats();
        assert_eq!(
            (stats.transactions, stats.caller_commits),
            (1, 0),
            "committed by the writer thread: {stats:?}"
        );
    }

    /// Appends in flight together go to the writer thread, which commits them in one
    /// transaction: only a lone append is committed by its caller.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_in_flight_together_go_to_the_writer() {
        let (_dir, pool, log) = opened("w.sqlite3").await;
        // Tenant a, alone, commits on its caller's thread, and waits there in SQLite's busy
        // handler for the lock held meanwhile; b, c and d, handed in meanwhile, wait for the
        // writer thread, which takes them together once a's commit gives the engine back.
        a_then_three_while_locked(&pool, &log).await;
        let stats = log.stats();
        assert_eq!(stats.events, 4, "{stats:?}");
        assert_eq!(
            (stats.transactions, stats.caller_commits),
            (2, 1),
            "a on its caller's thread, then b, c and d together on the writer's: {stats:?}"
        );
    }

    /// A migrated WAL store in a temporary directory and the audit log over it.
    async fn opened(file: &str) -> (tempfile::TempDir, sqlx::SqlitePool, AuditLog) {
        let (dir, pool) = migrated(file, SqliteJournalMode::Wal).await;
        let key = LogKey::from_seed("gw", [7; 32]).expect("key");
        let log = AuditLog::open(Db::Sqlite(pool.clone()), key, AuditConfig::default())
            .await
            .expect("audit");
        (dir, pool, log)
    }

    /// Appends one event of tenant a, then, 300 ms later, one each of b, c and d, all while
    /// another connection holds the write lock; returns once every one is committed.
    async fn a_then_three_while_locked(pool: &sqlx::SqlitePool, log: &AuditLog) {
        let append = |tenant: &'static str| {
            let log = log.clone();
            tokio::spawn(async move { log.append(AuditEvent::new(kinds::TOOL_CALL, tenant)).await })
        };
        let (first, rest) = while_locked(pool, async || {
            let first = append("a");
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let rest: Vec<_> = ["b", "c", "d"].into_iter().map(append).collect();
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            (first, rest)
        })
        .await;
        for task in std::iter::once(first).chain(rest) {
            task.await.expect("task").expect("committed");
        }
    }

    /// Holds the store's write lock on another connection while `during` hands in appends,
    /// so that everything handed in meanwhile reaches the writer together.
    async fn while_locked<T>(pool: &sqlx::SqlitePool, during: impl AsyncFnOnce() -> T) -> T {
        let mut blocker = pool.acquire().await.expect("connection");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *blocker)
            .await
            .expect("lock");
        let out = during().await;
        sqlx::query("COMMIT")
            .execute(&mut *blocker)
            .await
            .expect("unlock");
        out
    }

    /// A tenant's batch of 45 events is inserted in statements of 32, 8, 4 and 1 rows: every
    /// event is answered with the id of its own row, in chain order.
    #[tokio::test]
    async fn a_large_batch_answers_each_event_with_its_own_row() {
        let (_dir, pool, log) = opened("m.sqlite3").await;
        log.append(AuditEvent::new(kinds::TOOL_CALL, "acme"))
            .await
            .expect("first");
        let tasks = while_locked(&pool, async || {
            let tasks: Vec<_> = (0..45)
                .map(|i| {
                    let log = log.clone();
                    let mut e = AuditEvent::new(kinds::TOOL_CALL, "acme");
                    e.tool = format!("tool-{i}");
                    tokio::spawn(async move { log.append(e).await })
                })
                .collect();
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            tasks
        })
        .await;
        let mut appended = Vec::new();
        for t in tasks {
            appended.push(t.await.expect("task").expect("committed"));
        }
        // The first event's transaction, then one for the first of the 45 (handed to the
        // writer before the lock was seen), then the 44 others together.
        assert!(log.stats().transactions <= 3, "{:?}", log.stats());
        appended.sort_by_key(|a| a.seq);
        let seqs: Vec<u64> = appended.iter().map(|a| a.seq).collect();
        assert_eq!(seqs, (2..=46).collect::<Vec<u64>>());
        for a in &appended {
            let (seq, hash): (i64, String) = sqlx::query_as(
                "SELECT seq, hash FROM audit_events WHERE id = ?1 AND tenant = 'acme'",
            )
            .bind(a.id)
            .fetch_one(&pool)
            .await
            .expect("the answered id is a stored row");
            assert_eq!((seq as u64, hash.as_str()), (a.seq, a.hash.as_str()));
        }
        let ids: Vec<i64> = appended.iter().map(|a| a.id).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids follow the chain: {ids:?}"
        );
    }

    /// Calls one at a time: the lookup writer enters each event within its linger, with no
    /// later commit needed, and never in the database file's own tables (a rollback's binary
    /// keeps those).
    #[tokio::test]
    async fn the_lookup_writer_enters_events_beside_the_writer() {
        let (_dir, pool, log) = opened("i.sqlite3").await;
        let mark = async || -> i64 {
            sqlx::query_scalar("SELECT upto FROM facets.audit_facets_mark")
                .fetch_one(&pool)
                .await
                .expect("mark")
        };
        let mut last = 0;
        for i in 0..5 {
            let mut e = AuditEvent::new(kinds::TOOL_CALL, "acme");
            e.agent_id = format!("agent-{}", i % 2);
            last = log.append(e).await.expect("append").id;
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while mark().await < last {
            assert!(
                std::time::Instant::now() < deadline,
                "the events were not entered"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let entered: i64 = sqlx::query_scalar("SELECT count(*) FROM facets.audit_agent_facet")
            .fetch_one(&pool)
            .await
            .expect("count");
        assert_eq!(entered, 5);
        let db = Db::Sqlite(pool.clone());
        assert_eq!(
            crate::audit::query::lookup_lag(&db).await.expect("lag"),
            Some(0)
        );
        let in_db_file: (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM main.audit_agent_facet), (SELECT upto FROM main.audit_facets_mark)",
        )
        .fetch_one(&pool)
        .await
        .expect("count");
        assert_eq!(in_db_file, (0, 0));
    }

    /// A row that breaks `UNIQUE (tenant, seq)` half-way through a batch's insert fails the
    /// whole batch and leaves nothing of it: the head stays, no row before the broken one is
    /// kept, and the writer goes on once the conflict is gone.
    #[tokio::test]
    async fn a_broken_constraint_rolls_back_the_whole_batch() {
        let (_dir, pool, log) = opened("c.sqlite3").await;
        let first = log
            .append(AuditEvent::new(kinds::TOOL_CALL, "acme"))
            .await
            .expect("first");
        // A stray row where the batch's 3rd event (seq 4) would go.
        sqlx::query(
            "INSERT INTO audit_events (tenant, seq, ts_ms, event, body, prev_hash, hash) \
             VALUES ('acme', 4, 0, 'stray', '{}', '', '')",
        )
        .execute(&pool)
        .await
        .expect("plant");
        let tasks = while_locked(&pool, async || {
            let tasks: Vec<_> = (0..6)
                .map(|_| {
                    let log = log.clone();
                    tokio::spawn(async move {
                        log.append(AuditEvent::new(kinds::TOOL_CALL, "acme")).await
                    })
                })
                .collect();
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            tasks
        })
        .await;
        let mut failed = 0;
        for t in tasks {
            if t.await.expect("task").is_err() {
                failed += 1;
            }
        }
        assert!(
            failed >= 5,
            "the batch that met the stray row failed whole: {failed}"
        );
        let stored: Vec<(i64, String)> = sqlx::query_as(
            "SELECT seq, event FROM audit_events WHERE tenant = 'acme' ORDER BY seq",
        )
        .fetch_all(&pool)
        .await
        .expect("rows");
        let seqs: Vec<i64> = stored.iter().map(|r| r.0).collect();
        assert!(
            seqs == vec![1, 4] || seqs == vec![1, 2, 4],
            "only the first event (and one handed in alone before the lock) and the stray row: {stored:?}"
        );
        sqlx::query("DELETE FROM audit_events WHERE event = 'stray'")
            .execute(&pool)
            .await
            .expect("remove");
        let next = log
            .append(AuditEvent::new(kinds::TOOL_CALL, "acme"))
            .await
            .expect("the writer goes on");
        assert_eq!(next.seq, seqs.len() as u64);
        assert!(next.id > first.id);
    }

    /// A file left in SQLite's rollback journal (a filesystem without WAL) has no log to sync
    /// beside the writer: its commits are answered on SQLite's own sync, not refused for want
    /// of a `-wal` file.
    #[tokio::test]
    async fn a_store_without_wal_still_commits() {
        let (dir, pool) = migrated("j.sqlite3", SqliteJournalMode::Delete).await;
        let key = LogKey::from_seed("gw", [7; 32]).expect("key");
        let log = AuditLog::open(Db::Sqlite(pool), key, AuditConfig::default())
            .await
            .expect("audit");
        for n in 1..=3u64 {
            let appended = log
                .append(AuditEvent::new(kinds::TOOL_CALL, "acme"))
                .await
                .expect("committed on SQLite's own sync");
            assert_eq!(appended.seq, n);
        }
        assert!(
            !dir.path().join("j.sqlite3-wal").exists(),
            "no WAL was made"
        );
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            log.outbox_router().durable().covering(),
        )
        .await
        .expect("the mark moved")
        .expect("not failed");
    }
}
