//! The transaction of one tenant writer's batch on PostgreSQL, in as few round trips as the
//! chain allows.
//!
//! A batch needs the tenant's chain head before its events can be hashed, and the counters it
//! charges before its debits can be decided, so two reads come first; everything else is one
//! statement. That is four round trips, whatever the batch's size:
//! 1. `BEGIN`;
//! 2. one statement that locks and reads the head (`SELECT … FOR UPDATE`: writers of the tenant
//!    on other replicas wait here) and then the counters the batch debits (an upsert with a
//!    no-op update, rows in key order, so writers cannot deadlock); every debit is then decided
//!    in memory, in queue order;
//! 3. one statement with data-modifying `WITH` parts: the counters' new values, the events, and
//!    the head moved with a compare-and-set on the head read in step 2;
//! 4. `COMMIT`.
//!
//! Every writer takes the head's lock before any counter's. A tenant's first batch finds no
//! head to lock in step 2: it rolls back and starts again, creating the head before it locks
//! the counters.
//!
//! A tenant writer keeps its connection from one batch to the next while batches follow
//! (up to [`HOLD_IDLE`] apart, and at most half the pool across writers): a connection taken
//! from the pool costs sqlx's liveness ping before `BEGIN` and another when it goes back.
//!
//! Approval writes and outbox rows, when a batch has any, and a due checkpoint add their own
//! statements in the same transaction. Every variable-length list is bound as an array
//! (`UNNEST`), so each statement's text is the same for every batch size and stays prepared
//! on its connection.
//!
//! This module must never commit a part it could not write whole (a head that moved under the
//! lock fails the batch), and never build SQL from input.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::{Connection, PgConnection, Postgres};
use tokio::sync::OwnedSemaphorePermit;

use super::charges::{self, Slot};
use super::commit::{CHECKPOINT_INSERT, Committed, Entry, HEAD_INSERT, Head, NewRow, plan};
use super::key::hex;
use super::log::{Appended, GENESIS, Shared};
use super::{AuditError, time};

const HEAD_LOCK: &str =
    "SELECT seq, hash, checkpoint_size FROM audit_chain_heads WHERE tenant = $1 FOR UPDATE";

/// Locks and reads the head of tenant `$1`, then the counters `$2`/`$3` (keys and windows, in
/// key order). The head comes first (the `UNION ALL` reads its parts in order), as in every
/// writer, so two writers never take the same locks in opposite orders. Rows: the head with a
/// `NULL` key, then one row per counter.
const HEAD_AND_COUNTERS_LOCK: &str = "WITH h AS ( \
       SELECT seq, hash, checkpoint_size FROM audit_chain_heads WHERE tenant = $1 FOR UPDATE \
     ), l AS ( \
       INSERT INTO counters (key, window_start, value, updated_at) \
       SELECT k, w, 0::bigint, $4::bigint \
       FROM UNNEST($2::text[], $3::bigint[]) WITH ORDINALITY AS t(k, w, n) ORDER BY n \
       ON CONFLICT (key, window_start) DO UPDATE SET value = counters.value \
       RETURNING key, window_start, value \
     ) \
     SELECT NULL::text, seq, hash, checkpoint_size FROM h \
     UNION ALL SELECT key, window_start, NULL::text, value FROM l";

/// Locks and reads the counters `$1`/`$2` alone, once the head is held (a tenant's first batch).
const COUNTERS_LOCK: &str = "INSERT INTO counters (key, window_start, value, updated_at) \
     SELECT k, w, 0::bigint, $3::bigint \
     FROM UNNEST($1::text[], $2::bigint[]) WITH ORDINALITY AS t(k, w, n) ORDER BY n \
     ON CONFLICT (key, window_start) DO UPDATE SET value = counters.value \
     RETURNING key, window_start, value";

/// The write of a batch with events: counters, events and the head's compare-and-set.
/// Returns one row per event (`id`, `seq`) and, on each, how many head rows moved.
const BATCH_WRITE: &str = "WITH c AS ( \
       INSERT INTO counters (key, window_start, value, updated_at) \
       SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[]) AS t(k, w, v) CROSS JOIN (SELECT $4::bigint) AS u \
       ON CONFLICT (key, window_start) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at \
     ), e AS ( \
       INSERT INTO audit_events (tenant, seq, ts_ms, event, decision, check_name, agent_id, tool, \
         jti, root_jti, elevation_id, body, prev_hash, hash) \
       SELECT $5::text, * FROM UNNEST($6::bigint[], $7::bigint[], $8::text[], $9::text[], $10::text[], \
         $11::text[], $12::text[], $13::text[], $14::text[], $15::text[], $16::text[], $17::text[], \
         $18::text[]) \
       RETURNING id, seq \
     ), h AS ( \
       UPDATE audit_chain_heads SET seq = $19, hash = $20, checkpoint_size = $21, \
         event_id = (SELECT max(id) FROM e), ts_ms = $22 \
       WHERE tenant = $5 AND seq = $23 AND hash = $24 \
       RETURNING 1 \
     ) \
     SELECT id, seq, (SELECT count(*) FROM h) FROM e";

/// A batch without events (a checkpoint alone): the head moves to cover it, nothing else.
const HEAD_COVER: &str = "UPDATE audit_chain_heads SET checkpoint_size = $1 \
     WHERE tenant = $2 AND seq = $3 AND hash = $4";

/// A pooled connection a tenant writer keeps between batches, with its share of the pool and
/// the time it was taken.
pub(crate) type Held = (PoolConnection<Postgres>, OwnedSemaphorePermit, Instant);

/// How long a tenant writer keeps its connection when no batch follows.
pub(crate) const HOLD_IDLE: Duration = Duration::from_millis(100);
/// How long a tenant writer keeps one connection at most, so the pool's lifetime limits apply.
const HOLD_MAX: Duration = Duration::from_secs(60);

/// Commits one tenant's batch in its own PostgreSQL transaction, on the connection `held` from
/// the last batch or on one from the pool, which it then keeps when a share of the pool is free
/// (`Shared::held`). A connection taken from the pool is pinged first; a kept one is not, so a
/// kept connection whose `BEGIN` fails (the server restarted) is replaced by one from the pool
/// (nothing of the batch was sent). A connection that failed is given back, never kept.
pub(crate) async fn commit_postgres(
    pool: &sqlx::PgPool,
    held: &mut Option<Held>,
    shared: &Shared,
    tenant: &str,
    entries: &mut [Entry],
    force: bool,
) -> Result<Committed, AuditError> {
    let (mut conn, mut permit, mut since) = match held.take() {
        Some((conn, permit, since)) => (conn, Some(permit), since),
        None => (pool.acquire().await?, None, Instant::now()),
    };
    let done = loop {
        match commit_on(&mut conn, shared, tenant, entries, force).await {
            Ok(done) => break done,
            Err(Failed::Begin(e)) if permit.is_some() => {
                tracing::info!(tenant, error = %e, "audit: a kept PostgreSQL connection failed; taking another");
                (conn, permit, since) = (pool.acquire().await?, None, Instant::now());
            }
            Err(Failed::Begin(e)) => return Err(e.into()),
            Err(Failed::Batch(e)) => return Err(e),
            Err(Failed::Commit(e, done)) => {
                // The connection is not kept: it failed at COMMIT.
                return match committed_after_all(pool, tenant, &done).await {
                    Ok(true) => {
                        tracing::warn!(tenant, error = %e, "audit: COMMIT reported a failure, but the batch is in the chain: answered as committed");
                        committed(shared, &done);
                        Ok(*done)
                    }
                    Ok(false) => Err(e.into()),
                    Err(unknown) => {
                        tracing::error!(tenant, error = %e, check = %unknown, "audit: COMMIT failed and whether it took effect cannot be read; its refunds are not retried");
                        drop_refunds(entries);
                        Err(e.into())
                    }
                };
            }
        }
    };
    if since.elapsed() < HOLD_MAX {
        let permit = permit.or_else(|| Arc::clone(&shared.held).try_acquire_owned().ok());
        *held = permit.map(|permit| (conn, permit, since));
    }
    Ok(done)
}

/// Why [`commit_on`] failed: before anything was sent, in the batch, or at `COMMIT` (whose
/// outcome the server may know and the client not: the batch may be in the chain).
enum Failed {
    Begin(sqlx::Error),
    Batch(AuditError),
    Commit(sqlx::Error, Box<Committed>),
}

/// Whether a batch whose `COMMIT` failed is in the chain after all: its last event's position
/// holds its hash (read on another connection). Answering such a batch as failed would refuse
/// calls that were charged, and retrying its late records would give their refunds twice.
async fn committed_after_all(
    pool: &sqlx::PgPool,
    tenant: &str,
    done: &Committed,
) -> Result<bool, sqlx::Error> {
    let Some(last) = done.appended.last() else {
        return Ok(false);
    };
    // The failed transaction holds its tenant's head lock until the server has committed or
    // aborted it: taking the lock first waits for that, so the read cannot run before a
    // commit still landing. A server that has not yet noticed the lost connection holds it
    // longer; past the timeout the outcome stays unknown.
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL lock_timeout = '5s'")
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT 1 FROM audit_chain_heads WHERE tenant = $1 FOR UPDATE")
        .bind(tenant)
        .fetch_optional(&mut *tx)
        .await?;
    let stored: Option<String> =
        sqlx::query_scalar("SELECT hash FROM audit_events WHERE tenant = $1 AND seq = $2")
            .bind(tenant)
            .bind(last.seq as i64)
            .fetch_optional(&mut *tx)
            .await?;
    tx.rollback().await?;
    Ok(stored.as_deref() == Some(last.hash.as_str()))
}

/// After a `COMMIT` whose outcome is unknown, the entries' refunds are dropped: a late record
/// retried later must not give back twice what the lost commit may already have given back
/// (a refund too few only counts a call that was refused; one too many would allow a call past
/// its limit), and so are approvals given back.
fn drop_refunds(entries: &mut [Entry]) {
    for e in entries {
        e.debits.retain(|d| d.amount >= 0);
        // Giving a consumed approval back twice could let it run a second call.
        if matches!(
            e.approval,
            Some(crate::approvals::ApprovalWrite::Restore { .. })
        ) {
            e.approval = None;
        }
    }
}

impl From<sqlx::Error> for Failed {
    fn from(e: sqlx::Error) -> Self {
        Failed::Batch(e.into())
    }
}

impl From<AuditError> for Failed {
    fn from(e: AuditError) -> Self {
        Failed::Batch(e)
    }
}

async fn commit_on(
    conn: &mut PgConnection,
    shared: &Shared,
    tenant: &str,
    entries: &mut [Entry],
    force: bool,
) -> Result<Committed, Failed> {
    let mut tx = conn.begin().await.map_err(Failed::Begin)?;
    let mut done = write(&mut tx, shared, tenant, entries, force, true).await?;
    if done.is_none() {
        // The tenant has no head yet: start again and create it before any counter is locked,
        // so that every writer takes the head's lock before the counters'.
        tx.rollback().await?;
        tx = conn.begin().await?;
        done = write(&mut tx, shared, tenant, entries, force, false).await?;
    }
    let done =
        done.ok_or_else(|| AuditError::Integrity(format!("chain head of {tenant:?} vanished")))?;
    if let Err(e) = tx.commit().await {
        return Err(Failed::Commit(e, Box::new(done)));
    }
    committed(shared, &done);
    Ok(done)
}

/// What follows a commit: its checkpoint counted, the outbox rung for its rows.
fn committed(shared: &Shared, done: &Committed) {
    if done.checkpointed {
        shared.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
    }
    if done.outboxed {
        shared.outbox.ring();
    }
}

/// The batch inside the open transaction `tx`; it does not commit. With `together`, the head
/// and the counters are locked in one statement, and `None` (nothing written, nothing decided)
/// says the tenant has no head yet.
async fn write(
    tx: &mut PgConnection,
    shared: &Shared,
    tenant: &str,
    entries: &mut [Entry],
    force: bool,
    together: bool,
) -> Result<Option<Committed>, AuditError> {
    let Some((head, counters)) = lock(tx, tenant, entries, together).await? else {
        return Ok(None);
    };
    // Approval writes, then budget debits, before the chain: a refusal rewrites its event
    // before it is hashed; a consumed approval whose call a debit then refused is given back.
    crate::approvals::record::apply!(tx, tenant, entries)?;
    let changed = settle(counters, entries);
    crate::approvals::record::restore!(tx, tenant, entries)?;
    let (rows, new_head, checkpoint) =
        plan(&head, tenant, entries, &shared.key, &shared.cfg, force)?;
    if let Some((cp, note)) = &checkpoint {
        sqlx::query(CHECKPOINT_INSERT)
            .bind(tenant)
            .bind(cp.size as i64)
            .bind(hex::encode(&cp.root_hash))
            .bind(shared.key.name())
            .bind(note.as_str())
            .bind(time::now_ms())
            .execute(&mut *tx)
            .await?;
    }
    let moved_away =
        || AuditError::Integrity(format!("chain head of {tenant:?} moved under a held lock"));
    let mut appended = Vec::with_capacity(rows.len());
    if rows.is_empty() {
        if !changed.is_empty() {
            // Debits without events cannot happen (every debit belongs to an entry).
            return Err(AuditError::Integrity(
                "counter changes without events".into(),
            ));
        }
        if checkpoint.is_some() {
            let done = sqlx::query(HEAD_COVER)
                .bind(new_head.checkpoint_size)
                .bind(tenant)
                .bind(head.seq)
                .bind(head.hash.as_str())
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                return Err(moved_away());
            }
        }
    } else {
        let now = time::now_ms() / 1000;
        let (keys, windows, values): (Vec<&str>, Vec<i64>, Vec<i64>) = changed
            .iter()
            .map(|((k, w), v)| (k.as_str(), *w, *v))
            .collect();
        let col = |f: fn(&NewRow) -> &str| rows.iter().map(f).collect::<Vec<&str>>();
        let last_ts = rows.last().map_or(0, |r| r.ts_ms);
        let ids: Vec<(i64, i64, i64)> = sqlx::query_as(BATCH_WRITE)
            .bind(keys)
            .bind(windows)
            .bind(values)
            .bind(now)
            .bind(tenant)
            .bind(rows.iter().map(|r| r.seq).collect::<Vec<i64>>())
            .bind(rows.iter().map(|r| r.ts_ms).collect::<Vec<i64>>())
            .bind(col(|r| r.kind.as_str()))
            .bind(col(|r| r.decision))
            .bind(col(|r| r.check.as_str()))
            .bind(col(|r| r.agent_id.as_str()))
            .bind(col(|r| r.tool.as_str()))
            .bind(col(|r| r.jti.as_str()))
            .bind(col(|r| r.root_jti.as_str()))
            .bind(col(|r| r.elevation_id.as_str()))
            .bind(col(|r| r.body.as_str()))
            .bind(col(|r| r.prev_hash.as_str()))
            .bind(col(|r| r.hash.as_str()))
            .bind(new_head.seq)
            .bind(new_head.hash.as_str())
            .bind(new_head.checkpoint_size)
            .bind(last_ts)
            .bind(head.seq)
            .bind(head.hash.as_str())
            .fetch_all(&mut *tx)
            .await?;
        if ids.len() != rows.len() || ids.iter().any(|(_, _, moved)| *moved != 1) {
            return Err(moved_away());
        }
        let by_seq: HashMap<i64, i64> = ids.into_iter().map(|(id, seq, _)| (seq, id)).collect();
        for r in &rows {
            let id = *by_seq.get(&r.seq).ok_or_else(|| {
                AuditError::Integrity(format!("insert returned no id for seq {}", r.seq))
            })?;
            appended.push(Appended {
                id,
                seq: r.seq as u64,
                hash: r.hash.clone(),
                refused: None,
                refused_check: String::new(),
            });
        }
    }
    // The outbox rows of the events, in their transaction (see crate::outbox).
    let outboxed = crate::outbox::store::enqueue!(
        sqlx::Postgres,
        tx,
        &shared.outbox,
        tenant,
        entries,
        &appended
    )?;
    Ok(Some(Committed {
        appended,
        uncovered: new_head.seq > new_head.checkpoint_size,
        checkpointed: checkpoint.is_some(),
        outboxed,
    }))
}

/// The tenant's chain head and the counters the entries debit, locked until the transaction
/// ends, the head's lock always taken first. With `together` (one round trip) a missing head is
/// `None`; without, the head is created at genesis if the tenant has none yet.
async fn lock(
    tx: &mut PgConnection,
    tenant: &str,
    entries: &[Entry],
    together: bool,
) -> Result<Option<(Head, BTreeMap<Slot, i64>)>, AuditError> {
    let slots = charges::slots(entries.iter().map(|e| e.debits.as_slice()));
    let (keys, windows): (Vec<&str>, Vec<i64>) =
        slots.iter().map(|(k, w)| (k.as_str(), *w)).unzip();
    let now = time::now_ms() / 1000;
    let mut head = None;
    let mut counters = BTreeMap::new();
    if together && !slots.is_empty() {
        let rows: Vec<(Option<String>, i64, Option<String>, i64)> =
            sqlx::query_as(HEAD_AND_COUNTERS_LOCK)
                .bind(tenant)
                .bind(keys)
                .bind(windows)
                .bind(now)
                .fetch_all(&mut *tx)
                .await?;
        for (key, a, hash, b) in rows {
            match (key, hash) {
                (Some(key), None) => {
                    counters.insert((key, a), b);
                }
                (None, Some(hash)) => head = Some((a, hash, b)),
                _ => {
                    return Err(AuditError::Integrity(
                        "unexpected row locking a batch".into(),
                    ));
                }
            }
        }
        if head.is_none() {
            return Ok(None);
        }
    } else {
        head = sqlx::query_as(HEAD_LOCK)
            .bind(tenant)
            .fetch_optional(&mut *tx)
            .await?;
        if head.is_none() {
            sqlx::query(HEAD_INSERT)
                .bind(tenant)
                .bind(hex::encode(&GENESIS))
                .execute(&mut *tx)
                .await?;
            head = sqlx::query_as(HEAD_LOCK)
                .bind(tenant)
                .fetch_optional(&mut *tx)
                .await?;
        }
        if !slots.is_empty() {
            let rows: Vec<(String, i64, i64)> = sqlx::query_as(COUNTERS_LOCK)
                .bind(keys)
                .bind(windows)
                .bind(now)
                .fetch_all(&mut *tx)
                .await?;
            counters = rows.into_iter().map(|(k, w, v)| ((k, w), v)).collect();
        }
    }
    let (seq, hash, checkpoint_size) =
        head.ok_or_else(|| AuditError::Integrity(format!("chain head of {tenant:?} vanished")))?;
    let head = Head {
        seq,
        hash,
        checkpoint_size,
    };
    Ok(Some((head, counters)))
}

/// Decides each entry's debits in queue order against the locked `counters`, marks the refused
/// entries, and returns the counters whose value changed (written by the batch's write
/// statement).
fn settle(before: BTreeMap<Slot, i64>, entries: &mut [Entry]) -> BTreeMap<Slot, i64> {
    let mut values = before.clone();
    let refused = charges::decide(&mut values, entries.iter().map(|e| e.debits.as_slice()));
    for (entry, refused) in entries.iter_mut().zip(refused) {
        if let Some(i) = refused {
            entry.refuse(i);
        }
    }
    values.retain(|slot, v| before.get(slot) != Some(v));
    values
}

#[cfg(test)]
mod commit_outcome_tests {
    use super::*;
    use crate::audit::{AuditConfig, AuditEvent, AuditLog, Debit, LogKey, kinds};
    use crate::store::{self, Db, StoreConfig};

    /// After a `COMMIT` that reported a failure, the batch is found in the chain exactly when
    /// its last event's position holds its hash: then its callers are answered as committed
    /// and its late records are not retried (their refunds would be given twice).
    #[tokio::test]
    async fn a_failed_commit_is_found_in_the_chain_only_when_it_is_there() {
        let server = tokio::task::spawn_blocking(crate::testkit::PgServer::shared)
            .await
            .expect("join")
            .expect("a PostgreSQL server");
        let url = server.fresh_database().expect("database");
        let db = store::connect(&StoreConfig::Postgres { url })
            .await
            .expect("store")
            .db();
        let Db::Postgres(pool) = db.clone() else {
            panic!("a PostgreSQL store");
        };
        let key = LogKey::from_seed("test-gw", [7; 32]).expect("key");
        let log = AuditLog::open(db, key, AuditConfig::default())
            .await
            .expect("log");
        let appended = log
            .append(AuditEvent::new(kinds::TOOL_CALL, "acme"))
            .await
            .expect("append");
        let done = |a: Appended| Committed {
            appended: vec![a],
            uncovered: false,
            checkpointed: false,
            outboxed: false,
        };
        let found = |a: Appended| {
            let pool = pool.clone();
            async move { committed_after_all(&pool, "acme", &done(a)).await }
        };
        assert!(found(appended.clone()).await.expect("read"), "it is there");
        let mut forked = appended.clone();
        forked.hash = "00".repeat(32);
        assert!(
            !found(forked).await.expect("read"),
            "another event at that seq"
        );
        let mut later = appended.clone();
        later.seq += 1;
        assert!(!found(later).await.expect("read"), "nothing at that seq");
        assert!(
            !committed_after_all(&pool, "other", &done(appended))
                .await
                .expect("read"),
            "another tenant's chain"
        );
    }

    /// When the outcome cannot be read, a late record keeps its refusal and loses its refunds
    /// and given-back approval; charges of other entries stay.
    #[test]
    fn an_unknown_outcome_drops_refunds_and_restores_only() {
        let debit = Debit {
            key: "acme/calls".into(),
            window: 0,
            amount: 1,
            limit: 10,
        };
        let mut late = Entry::new(
            AuditEvent::new(kinds::TOOL_CALL, "acme"),
            vec![debit.refund()],
        );
        late.approval = Some(crate::approvals::ApprovalWrite::Restore { id: "p1".into() });
        let call = Entry::new(
            AuditEvent::new(kinds::TOOL_CALL, "acme"),
            vec![debit.clone()],
        );
        let mut entries = [late, call];
        drop_refunds(&mut entries);
        assert!(entries[0].debits.is_empty());
        assert!(entries[0].approval.is_none());
        assert_eq!(entries[1].debits, [debit]);
    }
}
