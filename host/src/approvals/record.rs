//! The approval queue's writes, applied inside the audit batch transaction of the event that
//! records each one ([`apply`], called by the audit commit before the budget debits are settled).
//!
//! The conditional writes (decide, consume, expire) are one `UPDATE … WHERE status = …` each: on
//! PostgreSQL the row lock orders replicas, on SQLite the transaction holds the write lock, so
//! exactly one of two racing consumers wins. A write whose condition fails refuses its own
//! entry only: its event is rewritten (before hashing) as the refusal, and it charges nothing.
//!
//! This module must never write a row of another tenant than the batch's, and never leave an
//! approval consumed by a call that was refused in the same transaction ([`restore`]).

use super::{Approval, Status};

/// One change to the queue, carried by an audit entry.
#[derive(Debug, Clone, PartialEq)]
pub enum ApprovalWrite {
    /// A new pending approval (with the event of the escalated call).
    Create(Box<Approval>),
    /// pending → approved | rejected, if still pending and not expired. An approval may then be
    /// resumed until `resume_until_ms`.
    Decide {
        id: String,
        approve: bool,
        by: String,
        note: String,
        at_ms: i64,
        resume_until_ms: i64,
    },
    /// approved → consumed, if approved and not expired (with the event of the resumed call).
    Consume { id: String, at_ms: i64 },
    /// A resumed call escalated again at a later check: its approval is consumed (it answered
    /// its question once; left approved, it could run the call a second time once the later
    /// check's answer is used), and, when `next` is given, the new pending approval that
    /// answers both questions is created. Refused as a whole when the approval is no longer
    /// approved.
    Supersede {
        id: String,
        at_ms: i64,
        next: Option<Box<Approval>>,
    },
    /// pending | approved → expired (the sweep, or a held request that timed out). Only a
    /// pending row when `pending_only`; an approved row only when it is past its expiry at
    /// `at_ms` (an approval decided after the sweep read it overdue has a new expiry).
    Expire {
        id: String,
        pending_only: bool,
        at_ms: i64,
    },
    /// consumed → approved: the late refusal of a resumed call whose caller gave up at the audit
    /// deadline gives its approval back (unconditional; nothing to give back is no refusal).
    Restore { id: String },
    /// Deletes the tenant's final approvals (rejected, expired, consumed) whose every time is
    /// before `before_ms`: retention (`super::retention`). Unconditional: none to delete is no
    /// refusal. Never a pending or approved row, however old.
    Purge { before_ms: i64 },
}

impl ApprovalWrite {
    /// What the caller is told when this write's condition fails.
    pub fn refusal(&self) -> &'static str {
        match self {
            Self::Create(_) => "approval could not be created",
            Self::Decide { .. } => "approval already decided or expired",
            Self::Consume { .. } | Self::Supersede { .. } => {
                "approval already used, not approved, or expired"
            }
            Self::Expire { .. } => "approval already decided",
            Self::Restore { .. } => "approval could not be restored",
            Self::Purge { .. } => "approvals could not be deleted",
        }
    }

    /// Whether the write must change exactly one row, its entry being refused otherwise.
    pub fn conditional(&self) -> bool {
        !matches!(self, Self::Restore { .. } | Self::Purge { .. })
    }
}

pub(crate) const INSERT: &str = "INSERT INTO approvals (tenant, pending_id, capability_token_id, \
     root_capability_token_id, agent_id, tool, args, args_digest, bundle_digest, intent_summary, \
     reason, status, requires_step_up, created_ms, expires_ms, escalated_by) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)";
pub(crate) const DECIDE: &str = "UPDATE approvals SET status = $1, decided_ms = $2, decided_by = $3, \
     decide_note = $4, expires_ms = $5 \
     WHERE tenant = $6 AND pending_id = $7 AND status = 'pending' AND expires_ms > $2";
pub(crate) const CONSUME: &str = "UPDATE approvals SET status = 'consumed', consumed_ms = $1 \
     WHERE tenant = $2 AND pending_id = $3 AND status = 'approved' AND expires_ms > $1";
pub(crate) const EXPIRE: &str = "UPDATE approvals SET status = 'expired' \
     WHERE tenant = $1 AND pending_id = $2 \
     AND (status = 'pending' OR (status = 'approved' AND $3 = 0 AND expires_ms <= $4))";
/// Every time a row records is before `$2`, and it can change no more.
pub(crate) const PURGE: &str = "DELETE FROM approvals WHERE tenant = $1 \
     AND status IN ('rejected', 'expired', 'consumed') AND created_ms < $2 AND expires_ms < $2 \
     AND COALESCE(decided_ms, 0) < $2 AND COALESCE(consumed_ms, 0) < $2";
pub(crate) const RESTORE: &str = "UPDATE approvals SET status = 'approved', consumed_ms = NULL \
     WHERE tenant = $1 AND pending_id = $2 AND status = 'consumed'";

/// A value bound to an approval statement.
pub(crate) enum Arg<'a> {
    Text(&'a str),
    MaybeText(Option<String>),
    Int(i64),
}

impl rusqlite::ToSql for Arg<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Arg::Text(v) => v.to_sql(),
            Arg::MaybeText(v) => v.to_sql(),
            Arg::Int(v) => v.to_sql(),
        }
    }
}

/// Free text (a policy's reason, an intent summary, an operator's note) as PostgreSQL's text
/// columns can hold it: a NUL would fail the whole audit batch carrying the write, so it is
/// stored as U+FFFD (the audit event keeps the exact text).
fn free(v: &str) -> Arg<'_> {
    if v.contains('\0') {
        Arg::MaybeText(Some(v.replace('\0', "\u{FFFD}")))
    } else {
        Arg::Text(v)
    }
}

/// The statements that apply `write` to `tenant`'s queue, in order, each with its values in
/// placeholder order (one place for the columns, whichever backend binds them). Of a
/// conditional write, each must change one row, or the rest are not run.
pub(crate) fn statements<'a>(
    write: &'a ApprovalWrite,
    tenant: &'a str,
) -> Vec<(&'static str, Vec<Arg<'a>>)> {
    use Arg::{Int, Text};
    let consume =
        |id: &'a str, at_ms: &'a i64| (CONSUME, vec![Int(*at_ms), Text(tenant), Text(id)]);
    match write {
        ApprovalWrite::Create(a) => vec![insert(a, tenant)],
        ApprovalWrite::Supersede { id, at_ms, next } => {
            let mut out = vec![consume(id, at_ms)];
            out.extend(next.as_deref().map(|a| insert(a, tenant)));
            out
        }
        ApprovalWrite::Decide {
            id,
            approve,
            by,
            note,
            at_ms,
            resume_until_ms,
        } => vec![(
            DECIDE,
            vec![
                Text(decided_status(*approve).as_str()),
                Int(*at_ms),
                free(by),
                free(note),
                Int(*resume_until_ms),
                Text(tenant),
                Text(id),
            ],
        )],
        ApprovalWrite::Consume { id, at_ms } => vec![consume(id, at_ms)],
        ApprovalWrite::Expire {
            id,
            pending_only,
            at_ms,
        } => vec![(
            EXPIRE,
            vec![
                Text(tenant),
                Text(id),
                Int(i64::from(*pending_only)),
                Int(*at_ms),
            ],
        )],
        ApprovalWrite::Restore { id } => vec![(RESTORE, vec![Text(tenant), Text(id)])],
        ApprovalWrite::Purge { before_ms } => vec![(PURGE, vec![Text(tenant), Int(*before_ms)])],
    }
}

fn insert<'a>(a: &'a Approval, tenant: &'a str) -> (&'static str, Vec<Arg<'a>>) {
    use Arg::{Int, MaybeText, Text};
    (
        INSERT,
        vec![
            Text(tenant),
            Text(&a.pending_id),
            Text(&a.capability_token_id),
            Text(&a.root_capability_token_id),
            free(&a.agent_id),
            free(&a.tool),
            MaybeText(a.args.as_ref().map(|v| v.to_string())),
            Text(&a.args_digest),
            Text(&a.bundle_digest),
            free(&a.intent_summary),
            free(&a.reason),
            Text(a.status.as_str()),
            Int(i64::from(a.requires_step_up)),
            Int(a.created_ms),
            Int(a.expires_ms),
            Text(&a.escalated_by),
        ],
    )
}

/// Applies the approval writes of `$entries` (a `&mut [Entry]` of tenant `$tenant`) inside the
/// open transaction `$tx`, in queue order; an entry whose conditional write fails is refused
/// (and its debits dropped). Evaluates to `Result<(), AuditError>`.
macro_rules! apply {
    ($tx:expr, $tenant:expr, $entries:expr) => {{
        use $crate::approvals::record;
        let tenant: &str = $tenant;
        let entries: &mut [Entry] = $entries;
        let mut result = Ok::<(), AuditError>(());
        for entry in entries.iter_mut() {
            let Some(write) = entry.approval.as_ref() else {
                continue;
            };
            let mut refused = false;
            for (sql, args) in record::statements(write, tenant) {
                let mut query = sqlx::query(sql);
                for arg in args {
                    query = match arg {
                        record::Arg::Text(v) => query.bind(v),
                        record::Arg::MaybeText(v) => query.bind(v),
                        record::Arg::Int(v) => query.bind(v),
                    };
                }
                match query.execute(&mut *$tx).await {
                    Ok(r) if write.conditional() && r.rows_affected() != 1 => {
                        refused = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        result = Err(e.into());
                        break;
                    }
                }
            }
            if result.is_err() {
                break;
            }
            record::settle(entry, refused);
        }
        result
    }};
}
pub(crate) use apply;

/// Gives back, in the same transaction, the approvals consumed by entries that a budget debit
/// then refused: a refused call must not use up its approval. Evaluates to
/// `Result<(), AuditError>`.
macro_rules! restore {
    ($tx:expr, $tenant:expr, $entries:expr) => {{
        use $crate::approvals::record::{self, ApprovalWrite};
        let tenant: &str = $tenant;
        let mut result = Ok::<(), AuditError>(());
        for entry in $entries.iter() {
            if let (Some(ApprovalWrite::Consume { id, .. }), Some(_), true) = (
                entry.approval.as_ref(),
                entry.refused.as_ref(),
                entry.approval_applied,
            ) {
                if let Err(e) = sqlx::query(record::RESTORE)
                    .bind(tenant)
                    .bind(id.as_str())
                    .execute(&mut *$tx)
                    .await
                {
                    result = Err(e.into());
                    break;
                }
            }
        }
        result
    }};
}
pub(crate) use restore;

/// [`apply!`] on the SQLite writer's own connection (`crate::audit::committer`).
pub(crate) fn apply_sqlite(
    tx: &rusqlite::Transaction<'_>,
    tenant: &str,
    entries: &mut [crate::audit::Entry],
) -> Result<(), crate::audit::AuditError> {
    for entry in entries.iter_mut() {
        let Some(write) = entry.approval.as_ref() else {
            continue;
        };
        let mut refused = false;
        for (sql, args) in statements(write, tenant) {
            let changed = tx
                .prepare_cached(sql)?
                .execute(rusqlite::params_from_iter(args))?;
            if write.conditional() && changed != 1 {
                refused = true;
                break;
            }
        }
        settle(entry, refused);
    }
    Ok(())
}

/// Marks `entry`'s conditional approval write applied, or its entry refused by it. A refused
/// supersession names the approval it could not use, not the one it did not create.
pub(crate) fn settle(entry: &mut crate::audit::Entry, refused: bool) {
    let Some(write) = entry.approval.as_ref() else {
        return;
    };
    if !write.conditional() {
        return;
    }
    if !refused {
        entry.approval_applied = true;
        return;
    }
    let why = write.refusal();
    if let ApprovalWrite::Supersede { id, .. } = write {
        entry.event.pending_id = id.clone();
    }
    entry.refuse_with("approval", why);
}

/// [`restore!`] on the SQLite writer's own connection (`crate::audit::committer`).
pub(crate) fn restore_sqlite(
    tx: &rusqlite::Transaction<'_>,
    tenant: &str,
    entries: &[crate::audit::Entry],
) -> Result<(), crate::audit::AuditError> {
    for entry in entries {
        if let (Some(ApprovalWrite::Consume { id, .. }), Some(_), true) = (
            entry.approval.as_ref(),
            entry.refused.as_ref(),
            entry.approval_applied,
        ) {
            tx.prepare_cached(RESTORE)?
                .execute(rusqlite::params![tenant, id])?;
        }
    }
    Ok(())
}

/// The status a [`ApprovalWrite::Decide`] leaves.
pub fn decided_status(approve: bool) -> Status {
    if approve {
        Status::Approved
    } else {
        Status::Rejected
    }
}
