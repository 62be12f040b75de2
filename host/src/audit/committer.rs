//! The one SQLite writer of this process: a dedicated thread that owns its own connection to
//! the database file and commits everything the tenant writers handed it since its last commit
//! in **one** transaction (one fsync), as soon as the previous commit ends, with no timer.
//!
//! The thread runs every statement of a batch itself, with statements prepared once and kept
//! (`prepare_cached`): a batch costs one hop from the async world and one back, not one per
//! statement through sqlx's SQLite worker. Inside the transaction it reads every head, applies
//! the approval writes, decides every budget debit in queue order against the counters it read
//! under the write lock, hashes each tenant's events onto its own chain, inserts them, writes
//! the outbox rows and due checkpoints, and moves every head with a compare-and-set. A part
//! whose stored head is unusable (a malformed hash) is refused alone, before anything of it is
//! written; any failure of a statement or of the commit refuses every part of the batch.
//!
//! The connection commits with `synchronous=NORMAL` (no sync at commit); a committed batch is
//! answered only once `durable.rs` has synced the log: on this thread when no other part waits,
//! else on the sync thread while this one commits the next batch. (A store left in SQLite's
//! rollback journal has no log to sync beside the writer: there it keeps `FULL`.)
//!
//! This module must never answer a part before the transaction holding it committed, and never
//! commit a part it could not write whole.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::commit::{
    CHECKPOINT_INSERT, Committed, Entry, HEAD_INSERT, HEAD_SELECT, HEAD_UPDATE, INSERT_PREFIX,
    NewRow, plan,
};
use super::durable::{Committing, Durability};
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
    reply: oneshot::Sender<(Vec<Entry>, Result<Committed, AuditError>)>,
}

/// The one SQLite writer of this process. Cheap to clone.
#[derive(Clone)]
pub(crate) struct SqliteCommitter {
    parts: mpsc::Sender<Part>,
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

/// Each event's insert, its 14 columns bound by position.
const EVENT_INSERT: &str = "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";

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
        let durable = if journal.eq_ignore_ascii_case("wal") {
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            Durability::start(path, mark, Arc::clone(&shared.counters))?
        } else {
            Durability::by_sqlite(mark, Arc::clone(&shared.counters))
        };
        let wal = WalCopier::start(open(path)?)?;
        let (parts, rx) = mpsc::channel(PARTS_QUEUE);
        let store = pool.clone();
        std::thread::Builder::new()
            .name("intentgate-audit-writer".into())
            .spawn(move || run(conn, wal, durable, store, shared, rx))
            .map_err(|e| AuditError::Config(format!("cannot start the audit writer: {e}")))?;
        Ok(Self { parts })
    }

    /// Commits `entries` of `tenant` with whatever other tenants hand in meanwhile.
    pub(crate) async fn commit(
        &self,
        tenant: &str,
        entries: Vec<Entry>,
        force: bool,
    ) -> (Vec<Entry>, Result<Committed, AuditError>) {
        let (reply, answer) = oneshot::channel();
        let part = Part {
            tenant: tenant.to_owned(),
            entries,
            force,
            reply,
        };
        if let Err(mpsc::error::SendError(part)) = self.parts.send(part).await {
            return (part.entries, Err(AuditError::Unavailable));
        }
        match answer.await {
            Ok(done) => done,
            // The writer thread ended mid-commit (a panic): the entries are lost with it, and
            // their callers are refused.
            Err(_) => (Vec::new(), Err(AuditError::Unavailable)),
        }
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

fn run(
    mut conn: Connection,
    mut wal: WalCopier,
    mut durable: Durability,
    store: sqlx::SqlitePool,
    shared: Shared,
    mut rx: mpsc::Receiver<Part>,
) {
    if shared.cfg.writer_batch
        && let Err(e) = super::priority::batch_current_thread()
    {
        tracing::warn!(error = %e, "cannot move the audit writer to SCHED_BATCH; its wake-ups preempt requests");
    }
    let nice = shared.cfg.writer_nice;
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
        parts.append(&mut deferred);
        // Everything handed in while the last commit ran goes into this one. (Giving up the
        // core for parts still on their way, as the async committer did, only delayed commits
        // on this thread: the runtime's threads hand in while it commits.)
        while let Ok(more) = rx.try_recv() {
            parts.push(more);
        }
        let mut seen = HashSet::new();
        let mut batch = Vec::with_capacity(parts.len());
        for part in parts.drain(..) {
            if seen.insert(part.tenant.clone()) {
                batch.push(part);
            } else {
                deferred.push(part);
            }
        }
        // The store was closed (shutdown): nothing more is written, as through its pool. After
        // a failed sync nothing is: what the log holds is unknown until SQLite recovers it.
        let refusal = if store.is_closed() {
            Some(AuditError::Store(sqlx::Error::PoolClosed))
        } else if durable.failed() {
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
            continue;
        }
        let seq = shared.outbox.durable().begin();
        let results = commit_batch(&mut conn, &shared, &mut batch);
        let events = results.iter().flatten().map(|c| c.appended.len()).sum();
        wal.committed(events);
        let outboxed = results.iter().flatten().any(|c| c.outboxed);
        let answers = batch
            .into_iter()
            .zip(results)
            .map(|(part, result)| (part.reply, part.entries, result))
            .collect();
        let outbox = shared.outbox.clone();
        let then: Option<Box<dyn FnOnce() + Send>> = if outboxed {
            Some(Box::new(move || outbox.ring()))
        } else {
            None
        };
        let batch = Committing { seq, answers, then };
        // Alone: synced here at once. Others waiting: synced beside the next commit.
        let alone = rx.is_empty() && deferred.is_empty();
        durable.settle(batch, alone);
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
    let mut insert = tx.prepare_cached(&format!("{INSERT_PREFIX}{EVENT_INSERT}"))?;
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
        let mut appended = Vec::with_capacity(rows.len());
        let mut last = None;
        for r in rows {
            insert_row(&mut insert, tenant, &r)?;
            let id = tx.last_insert_rowid();
            last = Some((id, r.ts_ms));
            appended.push(Appended {
                id,
                seq: r.seq as u64,
                hash: r.hash,
                refused: None,
                refused_check: String::new(),
            });
        }
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

fn insert_row(
    insert: &mut rusqlite::CachedStatement<'_>,
    tenant: &str,
    r: &NewRow,
) -> Result<(), AuditError> {
    insert.execute(rusqlite::params![
        tenant,
        r.seq,
        r.ts_ms,
        r.kind,
        r.decision,
        r.check,
        r.agent_id,
        r.tool,
        r.jti,
        r.root_jti,
        r.elevation_id,
        r.body,
        r.prev_hash,
        r.hash,
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use sqlx::sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
    };

    use crate::audit::{AuditConfig, AuditEvent, AuditLog, Db, LogKey, kinds};

    /// A migrated store in a temporary directory (kept alive by the returned guard), syncing
    /// at every commit, in `journal` mode.
    async fn migrated(
        file: &str,
        journal: SqliteJournalMode,
    ) -> (tempfile::TempDir, sqlx::SqlitePool) {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join(file))
            .create_if_missing(true)
            .journal_mode(journal)
            .synchronous(SqliteSynchronous::Full);
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .expect("pool");
        sqlx::migrate!("../migrations/sqlite")
            .run(&pool)
            .await
            .expect("schema");
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
        let (_dir, pool) = migrated("t.sqlite3", SqliteJournalMode::Wal).await;
        let key = LogKey::from_seed("gw", [7; 32]).expect("key");
        let log = AuditLog::open(Db::Sqlite(pool.clone()), key, AuditConfig::default())
            .await
            .expect("audit");
        // Another connection holds the write lock: the writer's first transaction waits in
        // SQLite's busy handler while the other tenants hand in their batches.
        let mut blocker = pool.acquire().await.expect("connection");
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *blocker)
            .await
            .expect("lock");
        let append = |tenant: &'static str| {
            let log = log.clone();
            tokio::spawn(async move { log.append(AuditEvent::new(kinds::TOOL_CALL, tenant)).await })
        };
        let first = append("a");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let rest: Vec<_> = ["b", "c", "d"].into_iter().map(append).collect();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        sqlx::query("COMMIT")
            .execute(&mut *blocker)
            .await
            .expect("unlock");
        for task in std::iter::once(first).chain(rest) {
            task.await.expect("task").expect("committed");
        }
        let stats = log.stats();
        assert_eq!((stats.events, stats.batches), (4, 4), "{stats:?}");
        assert_eq!(
            stats.transactions, 2,
            "tenant a alone, then b, c and d together: {stats:?}"
        );
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
