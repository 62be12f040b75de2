//! The transaction of a batch: for each tenant, read (and lock) its chain head, settle the
//! batch's budget debits ([`charges`]), hash the events onto the chain, insert them, sign a
//! checkpoint when due, and move the head with a compare-and-set.
//!
//! PostgreSQL commits each tenant writer's batch in its own transaction (`postgres.rs`):
//! writers run in parallel on separate connections, and a head row lock orders replicas.
//! SQLite has one writer at a time: its committer thread (`committer.rs`) commits every
//! tenant's batch in one transaction on its own connection, with the chain arithmetic
//! ([`plan`]) and the SQL text of this module.
//!
//! This module must never commit a part it could not write whole, and never answer a part
//! before the transaction holding it committed.

use super::charges::Debit;
use super::checkpoint::{Checkpoint, origin_for};
use super::event::CanonicalOpen;
use super::key::hex;
use super::log::{Appended, link_hash};
use super::{AuditConfig, AuditError, AuditEvent, LogKey};
use crate::approvals::ApprovalWrite;

/// An event in a batch, with the debits to settle in its transaction.
pub(crate) struct Entry {
    pub(crate) event: AuditEvent,
    /// The event's canonical text without its position, prepared by the caller (off the serial
    /// writer); `None` when the event changed after (a refusal) or for late records.
    pub(crate) canonical: Option<CanonicalOpen>,
    pub(crate) debits: Vec<Debit>,
    /// Set when a debit refused the entry (or by an approval write
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
