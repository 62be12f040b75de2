//! The transaction of a batch: for each tenant, read (and lock) its chain head, settle the
//! batch's budget debits ([`charges`]), hash the events onto the chain, insert them, sign a
//! checkpoint when due, and move the head with a compare-and-set.
//!
//! PostgreSQL commits each tenant writer's batch in its own transaction ([`commit_postgres`]):
//! writers run in parallel on separate connections, and a head row lock orders replicas.
//! SQLite has one writer at a time: its committer thread (`committer.rs`) commits every
//! tenant's batch in one transaction on its own connection, with the chain arithmetic
//! ([`plan`]) and the SQL text of this module.
//!
//! This module must never commit a part it could not write whole, and never answer a part
//! before the transaction holding it committed.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::charges::{self, Debit};
use super::checkpoint::{Checkpoint, origin_for};
use super::event::CanonicalOpen;
use super::key::hex;
use super::log::{Appended, GENESIS, Shared, link_hash};
use super::{AuditConfig, AuditError, AuditEvent, LogKey, time};
use crate::approvals::ApprovalWrite;

/// An event in a batch, with the debits to settle in its transaction.
pub(crate) struct Entry {
    pub(crate) event: AuditEvent,
    /// The event's canonical text without its position, prepared by the caller (off the serial
    /// writer); `None` when the event changed after (a refusal) or for late records.
    pub(crate) canonical: Option<CanonicalOpen>,
    pub(crate) debits: Vec<Debit>,
    /// Set by [`charges::settle`] when a debit refused the entry (or by an approval write
    /// whose condition failed).
    pub(crate) refused: Option<String>,
    /// A change to the approval queue recorded by this event (`crate::approvals::record`).
    pub(crate) approval: Option<ApprovalWrite>,
    /// The approval write's condition held (a consumed approval a debit then refused is given
    /// back in the same transaction).
    pub(crate) approval_applied: bool,
}

impl Entry {
    pub(crate) fn new(event: AuditEvent, debits: Vec<Debit>) -> Self {
        Self {
            event,
            canonical: None,
            debits,
            refused: None,
            approval: None,
            approval_applied: false,
        }
    }

    /// Rewrites the entry as a refusal by `check` (an approval write whose condition failed):
    /// it charges nothing.
    pub(crate) fn refuse_with(&mut self, check: &str, reason: &str) {
        self.event.decision = Some(super::Decision::Block);
        self.event.check = check.to_owned();
        self.event.reason = reason.to_owned();
        self.canonical = None;
        self.debits.clear();
        self.refused = Some(reason.to_owned());
    }

    /// Rewrites the entry as the budget refusal of its debit `i`: it charges nothing.
    pub(crate) fn refuse(&mut self, i: usize) {
        let reason = self.debits[i].refusal();
        self.event.decision = Some(super::Decision::Block);
        self.event.check = "budget".to_owned();
        self.event.reason = reason.clone();
        self.canonical = None;
        self.refused = Some(reason);
    }
}

/// The head row of a tenant's chain.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub(super) seq: i64,
    pub(super) hash: String,
    pub(super) checkpoint_size: i64,
}

/// A row about to be inserted.
pub(crate) struct NewRow {
    pub(super) seq: i64,
    pub(super) ts_ms: i64,
    pub(super) kind: String,
    pub(super) decision: &'static str,
    pub(super) check: String,
    pub(super) agent_id: String,
    pub(super) tool: String,
    pub(super) jti: String,
    pub(super) root_jti: String,
    pub(super) elevation_id: String,
    pub(super) body: String,
    pub(super) prev_hash: String,
    pub(super) hash: String,
}

/// What a committed batch did.
#[derive(Debug)]
pub(crate) struct Committed {
    pub(crate) appended: Vec<Appended>,
    /// The head is beyond the newest checkpoint.
    pub(crate) uncovered: bool,
    /// A checkpoint was signed in the batch.
    pub(crate) checkpointed: bool,
    /// Outbox rows were written in the batch (ring the delivery worker after the commit).
    pub(crate) outboxed: bool,
}

/// Rows to insert, the new head, and the checkpoint (with its signed note) to store.
pub(super) type Plan = (Vec<NewRow>, Head, Option<(Checkpoint, String)>);

/// The chain arithmetic of one batch, shared by both backends: the rows to insert, the new head,
/// and the checkpoint to sign (if due).
pub(super) fn plan(
    head: &Head,
    tenant: &str,
    entries: &[Entry],
    key: &LogKey,
    cfg: &AuditConfig,
    force_checkpoint: bool,
) -> Result<Plan, AuditError> {
    let mut prev = hex::decode32(&head.hash).ok_or_else(|| {
        AuditError::Integrity(format!("chain head of {tenant:?} holds a malformed hash"))
    })?;
    let mut seq = head.seq;
    let mut rows = Vec::with_capacity(entries.len());
    for entry in entries {
        let e = &entry.event;
        seq += 1;
        let body = match &entry.canonical {
            Some(open) => open.at(seq as u64),
            None => e.canonical(seq as u64),
        };
        let hash = link_hash(&prev, body.as_bytes());
        rows.push(NewRow {
            seq,
            ts_ms: e.ts_ms,
            kind: e.kind.clone(),
            decision: e.decision.map(|d| d.as_str()).unwrap_or(""),
            check: e.check.clone(),
            agent_id: e.agent_id.clone(),
            tool: e.tool.clone(),
            jti: e.jti.clone(),
            root_jti: e.root_jti.clone(),
            elevation_id: e.elevation_id.clone(),
            body,
            prev_hash: hex::encode(&prev),
            hash: hex::encode(&hash),
        });
        prev = hash;
    }
    let due = seq > head.checkpoint_size
        && (force_checkpoint || (seq - head.checkpoint_size) as u64 >= cfg.checkpoint_every);
    let checkpoint = due.then(|| {
        let cp = Checkpoint {
            origin: origin_for(key.name(), tenant),
            size: seq as u64,
            root_hash: prev,
        };
        let note = cp.sign(key);
        (cp, note)
    });
    let new_head = Head {
        seq,
        hash: hex::encode(&prev),
        checkpoint_size: if due { seq } else { head.checkpoint_size },
    };
    Ok((rows, new_head, checkpoint))
}

pub(super) const HEAD_SELECT: &str =
    "SELECT seq, hash, checkpoint_size FROM audit_chain_heads WHERE tenant = $1";
pub(super) const HEAD_INSERT: &str = "INSERT INTO audit_chain_heads (tenant, seq, hash, checkpoint_size, event_id, ts_ms) \
     VALUES ($1, 0, $2, 0, 0, 0) ON CONFLICT (tenant) DO NOTHING";
pub(super) const HEAD_UPDATE: &str = "UPDATE audit_chain_heads SET seq = $1, hash = $2, checkpoint_size = $3, \
     event_id = COALESCE($4, event_id), ts_ms = COALESCE($5, ts_ms) \
     WHERE tenant = $6 AND seq = $7 AND hash = $8";
pub(super) const CHECKPOINT_INSERT: &str = "INSERT INTO audit_checkpoints (tenant, size, root_hash, key_name, note, created_ms) \
     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (tenant, size) DO NOTHING";
pub(super) const INSERT_PREFIX: &str = "INSERT INTO audit_events (tenant, seq, ts_ms, event, decision, check_name, \
     agent_id, tool, jti, root_jti, elevation_id, body, prev_hash, hash) ";

/// Binds one row of [`INSERT_PREFIX`]'s columns in a PostgreSQL query builder.
macro_rules! push_row {
    ($b:expr, $tenant:expr, $r:expr) => {{
        let r: &NewRow = $r;
        let mut b = $b;
        b.push_bind($tenant)
            .push_bind(r.seq)
            .push_bind(r.ts_ms)
            .push_bind(r.kind.as_str())
            .push_bind(r.decision)
            .push_bind(r.check.as_str())
            .push_bind(r.agent_id.as_str())
            .push_bind(r.tool.as_str())
            .push_bind(r.jti.as_str())
            .push_bind(r.root_jti.as_str())
            .push_bind(r.elevation_id.as_str())
            .push_bind(r.body.as_str())
            .push_bind(r.prev_hash.as_str())
            .push_bind(r.hash.as_str());
    }};
}

/// One tenant's batch (or a checkpoint, with no events) inside the open transaction `$tx`
/// (PostgreSQL; `$lock` is appended to the head read). It does not commit.
macro_rules! write_part {
    ($db:ty, $tx:expr, $lock:expr, $shared:expr, $tenant:expr, $events:expr, $force:expr) => {{
        let shared: &Shared = $shared;
        let tenant: &str = $tenant;
        let tx: &mut <$db as sqlx::Database>::Connection = &mut **$tx;
        let select = format!("{HEAD_SELECT}{}", $lock);
        let mut head: Option<(i64, String, i64)> = sqlx::query_as(&select)
            .bind(tenant)
            .fetch_optional(&mut *tx)
            .await?;
        if head.is_none() {
            sqlx::query(HEAD_INSERT)
                .bind(tenant)
                .bind(hex::encode(&GENESIS))
                .execute(&mut *tx)
                .await?;
            head = sqlx::query_as(&select)
                .bind(tenant)
                .fetch_optional(&mut *tx)
                .await?;
        }
        let (seq, hash, checkpoint_size) = head
            .ok_or_else(|| AuditError::Integrity(format!("chain head of {tenant:?} vanished")))?;
        let head = Head {
            seq,
            hash,
            checkpoint_size,
        };
        // Approval writes, then budget debits, before the chain: a refusal rewrites its event
        // before it is hashed; a consumed approval whose call a debit refused is given back.
        crate::approvals::record::apply!(tx, tenant, $events)?;
        charges::settle!($db, tx, $events)?;
        crate::approvals::record::restore!(tx, tenant, $events)?;
        let (rows, new_head, checkpoint) =
            plan(&head, tenant, $events, &shared.key, &shared.cfg, $force)?;
        let mut appended = Vec::with_capacity(rows.len());
        let mut last_id = 0i64;
        let mut last_ts = 0i64;
        if !rows.is_empty() {
            let mut qb = sqlx::QueryBuilder::<$db>::new(INSERT_PREFIX);
            qb.push_values(rows.iter(), |b, r| push_row!(b, tenant, r));
            qb.push(" RETURNING id, seq");
            let ids: Vec<(i64, i64)> = qb.build_query_as().fetch_all(&mut *tx).await?;
            let by_seq: HashMap<i64, i64> = ids.into_iter().map(|(id, seq)| (seq, id)).collect();
            for r in &rows {
                let id = *by_seq.get(&r.seq).ok_or_else(|| {
                    AuditError::Integrity(format!("insert returned no id for seq {}", r.seq))
                })?;
                last_id = last_id.max(id);
                last_ts = r.ts_ms;
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
        let outboxed =
            crate::outbox::store::enqueue!($db, tx, &shared.outbox, tenant, $events, &appended)?;
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
        if !rows.is_empty() || checkpoint.is_some() {
            let mut update = sqlx::query(HEAD_UPDATE)
                .bind(new_head.seq)
                .bind(new_head.hash.as_str())
                .bind(new_head.checkpoint_size);
            update = if rows.is_empty() {
                // Checkpoint only: keep the head's event id and time.
                update.bind(None::<i64>).bind(None::<i64>)
            } else {
                update.bind(Some(last_id)).bind(Some(last_ts))
            };
            let done = update
                .bind(tenant)
                .bind(head.seq)
                .bind(head.hash.as_str())
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() != 1 {
                return Err(AuditError::Integrity(format!(
                    "chain head of {tenant:?} moved under a held lock"
                )));
            }
        }
        Ok(Committed {
            appended,
            uncovered: new_head.seq > new_head.checkpoint_size,
            checkpointed: checkpoint.is_some(),
            outboxed,
        })
    }};
}

/// Commits one tenant's batch in its own PostgreSQL transaction.
pub(crate) async fn commit_postgres(
    pool: &sqlx::PgPool,
    shared: &Shared,
    tenant: &str,
    entries: &mut [Entry],
    force: bool,
) -> Result<Committed, AuditError> {
    let mut tx = pool.begin().await?;
    let written: Result<Committed, AuditError> = async {
        write_part!(
            sqlx::Postgres,
            &mut tx,
            " FOR UPDATE",
            shared,
            tenant,
            entries,
            force
        )
    }
    .await;
    let done = written?;
    tx.commit().await?;
    if done.checkpointed {
        shared.counters.checkpoints.fetch_add(1, Ordering::Relaxed);
    }
    if done.outboxed {
        shared.outbox.ring();
    }
    Ok(done)
}
