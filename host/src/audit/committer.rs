//! The one SQLite writer of this process: every tenant writer hands it its batch, and it
//! commits everything handed to it since its last commit in **one** transaction (one fsync),
//! as soon as the previous commit ends, with no timer.
//!
//! A batch is a fixed handful of statements whatever the number of tenants in it (each one a
//! hop to sqlx's SQLite thread): one read of every head, the budget debits of every part
//! settled together, one multi-row insert of every tenant's events, one update of every head
//! (a compare-and-set on the head read, under the transaction's write lock). A part whose
//! stored head is unusable (a malformed hash) is refused alone, before anything of it is
//! written; any failure of a statement or of the commit refuses every part of the batch.
//!
//! This module must never answer a part before the transaction holding it committed, and never
//! commit a part it could not write whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sqlx::{Sqlite, SqliteConnection};
use tokio::sync::{mpsc, oneshot};

use super::charges;
use super::commit::{
    CHECKPOINT_INSERT, Committed, Entry, Head, INSERT_PREFIX, NewRow, plan, push_row,
};
use super::key::hex;
use super::log::{Appended, GENESIS, Shared};
use super::{AuditError, time};

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

/// Rows per insert statement (14 parameters each, well under SQLite's 32,766).
const ROWS_PER_INSERT: usize = 1000;

impl SqliteCommitter {
    /// Starts the committer task; it ends when every handle is dropped.
    pub(crate) fn start(pool: sqlx::SqlitePool, shared: Shared) -> Self {
        let (parts, rx) = mpsc::channel(PARTS_QUEUE);
        tokio::spawn(run(pool, shared, rx));
        Self { parts }
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
            // The committer ended mid-commit (runtime shutdown): the entries are lost with it,
            // and their callers are refused.
            Err(_) => (Vec::new(), Err(AuditError::Unavailable)),
        }
    }
}

async fn run(pool: sqlx::SqlitePool, shared: Shared, mut rx: mpsc::Receiver<Part>) {
    let mut parts: Vec<Part> = Vec::new();
    // A second part of a tenant already in the batch waits for the next one (its writer hands
    // in one part at a time, so this is only a guard).
    let mut deferred: Vec<Part> = Vec::new();
    loop {
        if parts.is_empty() && deferred.is_empty() {
            match rx.recv().await {
                Some(first) => parts.push(first),
                None => return,
            }
        }
        parts.append(&mut deferred);
        // The tenant writers answered by the last commit were woken together; the first to
        // hand in its next part wakes this task at once (tokio runs the woken task next). Let
        // the others run first, for as long as they keep handing in parts: one transaction
        // then carries every tenant's part instead of one each. No timer is involved.
        while let Ok(more) = rx.try_recv() {
            parts.push(more);
        }
        loop {
            tokio::task::yield_now().await;
            let before = parts.len();
            while let Ok(more) = rx.try_recv() {
                parts.push(more);
            }
            if parts.len() == before {
                break;
            }
        }
        let mut seen = std::collections::HashSet::new();
        let mut batch = Vec::with_capacity(parts.len());
        for part in parts.drain(..) {
            if seen.insert(part.tenant.clone()) {
                batch.push(part);
            } else {
                deferred.push(part);
            }
        }
        let results = commit_batch(&pool, &shared, &mut batch).await;
        for (part, result) in batch.into_iter().zip(results) {
            let _ = part.reply.send((part.entries, result));
        }
    }
}

/// One transaction for every part.
async fn commit_batch(
    pool: &sqlx::SqlitePool,
    shared: &Shared,
    parts: &mut [Part],
) -> Vec<Result<Committed, AuditError>> {
    let all_fail = |e: AuditError, n: usize| {
        let e = Arc::new(e);
        (0..n)
            .map(|_| Err(AuditError::CommitFailed(e.clone())))
            .collect::<Vec<_>>()
    };
    let mut tx = match pool.begin_with("BEGIN IMMEDIATE").await {
        Ok(tx) => tx,
        Err(e) => return all_fail(e.into(), parts.len()),
    };
    let results = match write_batch(&mut tx, shared, parts).await {
        Ok(r) => r,
        Err(e) => {
            let _ = tx.rollback().await;
            return all_fail(e, parts.len());
        }
    };
    if let Err(e) = tx.commit().await {
        return all_fail(e.into(), parts.len());
    }
    for done in results.iter().flatten() {
        if done.checkpointed {
            shared.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
        }
        if done.outboxed {
            shared.outbox.ring();
        }
    }
    results
}

/// Every tenant's head as stored, made (at the genesis) for tenants that have none, in two
/// statements at most.
async fn read_heads(
    conn: &mut SqliteConnection,
    tenants: &[&str],
) -> Result<HashMap<String, Head>, AuditError> {
    let mut qb = sqlx::QueryBuilder::<Sqlite>::new(
        "SELECT tenant, seq, hash, checkpoint_size FROM audit_chain_heads WHERE tenant IN (",
    );
    let mut list = qb.separated(", ");
    for t in tenants {
        list.push_bind(*t);
    }
    qb.push(")");
    let rows: Vec<(String, i64, String, i64)> = qb.build_query_as().fetch_all(&mut *conn).await?;
    let mut heads: HashMap<String, Head> = rows
        .into_iter()
        .map(|(t, seq, hash, checkpoint_size)| {
            let head = Head {
                seq,
                hash,
                checkpoint_size,
            };
            (t, head)
        })
        .collect();
    let new: Vec<&str> = (tenants.iter().copied())
        .filter(|t| !heads.contains_key(*t))
        .collect();
    if !new.is_empty() {
        let genesis = hex::encode(&GENESIS);
        let mut qb = sqlx::QueryBuilder::<Sqlite>::new(
            "INSERT INTO audit_chain_heads (tenant, seq, hash, checkpoint_size, event_id, ts_ms) ",
        );
        qb.push_values(new.iter(), |mut b, t| {
            b.push_bind(*t)
                .push_bind(0i64)
                .push_bind(genesis.as_str())
                .push_bind(0i64)
                .push_bind(0i64)
                .push_bind(0i64);
        });
        // The write lock is held: no other writer can have made one since the read.
        qb.build().execute(&mut *conn).await?;
        for t in new {
            let head = Head {
                seq: 0,
                hash: genesis.clone(),
                checkpoint_size: 0,
            };
            heads.insert(t.to_owned(), head);
        }
    }
    Ok(heads)
}

/// One planned part: its rows, the head it moves from and to, its checkpoint.
struct Planned {
    part: usize,
    rows: Vec<NewRow>,
    old: Head,
    new: Head,
    checkpoint: Option<(super::checkpoint::Checkpoint, String)>,
}

/// A head to move: the tenant, from, to, and the last event's id and time (none for a
/// checkpoint alone).
type Move<'a> = (&'a str, &'a Head, &'a Head, Option<(i64, i64)>);

/// Moves every head in one statement, each only from the head the batch was planned on.
const HEADS_UPDATE_PREFIX: &str = "WITH v(tenant, seq, hash, checkpoint_size, event_id, ts_ms, \
     old_seq, old_hash) AS (";
const HEADS_UPDATE_SUFFIX: &str = ") UPDATE audit_chain_heads SET seq = v.seq, hash = v.hash, \
     checkpoint_size = v.checkpoint_size, \
     event_id = COALESCE(v.event_id, audit_chain_heads.event_id), \
     ts_ms = COALESCE(v.ts_ms, audit_chain_heads.ts_ms) \
     FROM v WHERE audit_chain_heads.tenant = v.tenant AND audit_chain_heads.seq = v.old_seq \
     AND audit_chain_heads.hash = v.old_hash";

/// Writes every part inside the open transaction. `Err` refuses the whole batch; a part
/// refused alone has its `Err` among the results.
async fn write_batch(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    shared: &Shared,
    parts: &mut [Part],
) -> Result<Vec<Result<Committed, AuditError>>, AuditError> {
    let conn: &mut SqliteConnection = &mut *tx;
    let n = parts.len();
    let mut refused: Vec<Option<AuditError>> = (0..n).map(|_| None).collect();
    let mut olds: Vec<Option<Head>> = (0..n).map(|_| None).collect();
    let tenants: Vec<&str> = parts.iter().map(|p| p.tenant.as_str()).collect();
    let mut heads = read_heads(conn, &tenants).await?;
    for (i, part) in parts.iter().enumerate() {
        let Some(head) = heads.remove(&part.tenant) else {
            return Err(AuditError::Integrity(format!(
                "chain head of {:?} vanished",
                part.tenant
            )));
        };
        if hex::decode32(&head.hash).is_none() {
            refused[i] = Some(AuditError::Integrity(format!(
                "chain head of {:?} holds a malformed hash",
                part.tenant
            )));
        } else {
            olds[i] = Some(head);
        }
    }
    let live: Vec<usize> = (0..n).filter(|i| refused[*i].is_none()).collect();

    // Approval writes, then every part's budget debits together, before the chains: a refusal
    // rewrites its event before it is hashed; a consumed approval whose call a debit refused
    // is given back.
    for &i in &live {
        let part = &mut parts[i];
        crate::approvals::record::apply!(conn, &part.tenant, &mut part.entries[..])?;
    }
    let mut all: Vec<Entry> = Vec::new();
    let mut lens = Vec::with_capacity(live.len());
    for &i in &live {
        let entries = std::mem::take(&mut parts[i].entries);
        lens.push(entries.len());
        all.extend(entries);
    }
    let settled: Result<(), AuditError> = charges::settle!(Sqlite, conn, &mut all[..]);
    let mut back = all.into_iter();
    for (&i, &len) in live.iter().zip(&lens) {
        parts[i].entries = back.by_ref().take(len).collect();
    }
    settled?;
    for &i in &live {
        let part = &parts[i];
        crate::approvals::record::restore!(conn, &part.tenant, &part.entries)?;
    }

    let mut planned = Vec::with_capacity(live.len());
    for &i in &live {
        let part = &parts[i];
        let Some(old) = olds[i].take() else { continue };
        let (rows, new, checkpoint) = plan(
            &old,
            &part.tenant,
            &part.entries,
            &shared.key,
            &shared.cfg,
            part.force,
        )?;
        planned.push(Planned {
            part: i,
            rows,
            old,
            new,
            checkpoint,
        });
    }

    // Every tenant's events in as few inserts as the parameter limit allows.
    let flat: Vec<(&str, &NewRow)> = planned
        .iter()
        .flat_map(|p| {
            let tenant = parts[p.part].tenant.as_str();
            p.rows.iter().map(move |r| (tenant, r))
        })
        .collect();
    let mut ids: HashMap<(String, i64), i64> = HashMap::with_capacity(flat.len());
    for chunk in flat.chunks(ROWS_PER_INSERT) {
        let mut qb = sqlx::QueryBuilder::<Sqlite>::new(INSERT_PREFIX);
        qb.push_values(chunk.iter(), |b, (tenant, r)| push_row!(b, *tenant, r));
        qb.push(" RETURNING tenant, seq, id");
        let got: Vec<(String, i64, i64)> = qb.build_query_as().fetch_all(&mut *conn).await?;
        ids.extend(got.into_iter().map(|(t, seq, id)| ((t, seq), id)));
    }

    let mut done: Vec<Option<Committed>> = (0..n).map(|_| None).collect();
    let mut moves: Vec<Move> = Vec::new();
    for p in &planned {
        let tenant = parts[p.part].tenant.as_str();
        let mut appended = Vec::with_capacity(p.rows.len());
        let mut last = None;
        for r in &p.rows {
            let id = *ids.get(&(tenant.to_owned(), r.seq)).ok_or_else(|| {
                AuditError::Integrity(format!("insert returned no id for seq {}", r.seq))
            })?;
            last = Some((last.map_or(id, |(l, _): (i64, i64)| l.max(id)), r.ts_ms));
            appended.push(Appended {
                id,
                seq: r.seq as u64,
                hash: r.hash.clone(),
                refused: None,
                refused_check: String::new(),
            });
        }
        let entries = &parts[p.part].entries;
        let outboxed = crate::outbox::store::enqueue!(
            Sqlite,
            conn,
            &shared.outbox,
            tenant,
            entries,
            &appended
        )?;
        if let Some((cp, note)) = &p.checkpoint {
            sqlx::query(CHECKPOINT_INSERT)
                .bind(tenant)
                .bind(cp.size as i64)
                .bind(hex::encode(&cp.root_hash))
                .bind(shared.key.name())
                .bind(note.as_str())
                .bind(time::now_ms())
                .execute(&mut *conn)
                .await?;
        }
        if !p.rows.is_empty() || p.checkpoint.is_some() {
            moves.push((tenant, &p.old, &p.new, last));
        }
        done[p.part] = Some(Committed {
            appended,
            uncovered: p.new.seq > p.new.checkpoint_size,
            checkpointed: p.checkpoint.is_some(),
            outboxed,
        });
    }
    if !moves.is_empty() {
        let mut qb = sqlx::QueryBuilder::<Sqlite>::new(HEADS_UPDATE_PREFIX);
        qb.push_values(moves.iter(), |mut b, (tenant, old, new, last)| {
            b.push_bind(*tenant)
                .push_bind(new.seq)
                .push_bind(new.hash.as_str())
                .push_bind(new.checkpoint_size)
                .push_bind(last.map(|(id, _)| id))
                .push_bind(last.map(|(_, ts)| ts))
                .push_bind(old.seq)
                .push_bind(old.hash.as_str());
        });
        qb.push(HEADS_UPDATE_SUFFIX);
        let moved = qb.build().execute(&mut *conn).await?.rows_affected();
        if moved != moves.len() as u64 {
            return Err(AuditError::Integrity(format!(
                "{} of {} chain heads moved under the writer",
                moves.len() as u64 - moved.min(moves.len() as u64),
                moves.len()
            )));
        }
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
