//! The approval queue: a call the policy escalates (or that needs a step-up the token does not
//! carry) waits for a person.
//!
//! - [`record`]: the queue's writes. Each one rides in the audit batch of the event that records
//!   it (the escalation, the decision, the consumption, the expiry), so the queue and the
//!   chain are durable together or not at all, and the conditional ones (decide, consume,
//!   expire) are decided in that transaction: an approval is single-use on every replica.
//! - [`query`]: reads (one approval, a page of the queue).
//! - [`sweep`] expires overdue approvals; [`retention`] deletes final ones past the retention,
//!   each deletion with its event.
//! - [`wait`]: how a held request learns of a decision: an in-process broadcast, PostgreSQL
//!   `NOTIFY` from other replicas, and a slow poll as the fallback.
//!
//! Two modes ([`Mode`]): `async` answers `-32019` with the pending id at once, and the agent
//! resumes with `X-IntentGate-Approval-Id`; `sync` holds the request until a decision or the
//! timeout. A resumed call must match the approval's tenant, agent, token tree, tool, arguments
//! digest and bundle digest, and is decided again (a policy block still wins; budgets are still
//! charged).
//!
//! This module must never let an approval run a call twice, run a call that does not match it,
//! or run the call of a client that has gone; never change a row outside the transaction of the
//! audit event that records the change.

pub mod query;
pub mod queue;
pub mod record;
pub mod retention;
pub mod sweep;
pub mod wait;

use std::time::Duration;

use serde_json::{Value, json};

pub use record::ApprovalWrite;
pub use wait::Waiters;

/// The header an agent resumes an approved call with.
pub const RESUME_HEADER: &str = "X-IntentGate-Approval-Id";

/// The PostgreSQL channel a decision is announced on, so a replica holding the request wakes.
pub const CHANNEL: &str = "intentgate_approvals";

/// How a pending approval is answered to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// `-32019` with the pending id at once; the agent resumes with [`RESUME_HEADER`].
    #[default]
    Async,
    /// The request is held until a decision or the timeout.
    Sync,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "async" => Ok(Self::Async),
            "sync" => Ok(Self::Sync),
            other => Err(format!(
                "approval mode must be sync or async, not {other:?}"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Async => "async",
            Self::Sync => "sync",
        }
    }
}

/// The queue's settings (`INTENTGATE_APPROVAL_MODE`, `_TIMEOUT_S`, `_KEEPALIVE_MS`, `_POLL_MS`).
#[derive(Debug, Clone, Copy)]
pub struct ApprovalConfig {
    pub mode: Mode,
    /// How long a pending approval waits for a decision, and how long an approved one may be
    /// resumed after its decision.
    pub timeout: Duration,
    /// How often a held request that streams its answer sends an SSE comment.
    pub keepalive: Duration,
    /// How often a held request re-reads its approval when nothing woke it: the bound on how
    /// late a decision whose announcement was lost (a dropped `LISTEN` connection) releases it.
    pub poll: Duration,
    /// How long a final approval's row is kept (`None`: for ever; [`retention`]).
    pub retention_days: Option<u64>,
}

impl Default for ApprovalConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Async,
            timeout: Duration::from_secs(300),
            keepalive: Duration::from_secs(15),
            poll: wait::POLL,
            retention_days: Some(30),
        }
    }
}

/// Where an approval is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Approved,
    Rejected,
    Expired,
    Consumed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Consumed => "consumed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "approved" => Self::Approved,
            "rejected" => Self::Rejected,
            "expired" => Self::Expired,
            "consumed" => Self::Consumed,
            _ => return None,
        })
    }
}

/// One approval row.
#[derive(Debug, Clone, PartialEq)]
pub struct Approval {
    pub tenant: String,
    pub pending_id: String,
    pub capability_token_id: String,
    pub root_capability_token_id: String,
    pub agent_id: String,
    pub tool: String,
    /// The arguments as the audit's argument-persistence setting keeps them (`None`: off).
    pub args: Option<Value>,
    pub args_digest: String,
    pub bundle_digest: String,
    pub intent_summary: String,
    pub reason: String,
    /// The checks whose escalations this approval answers, comma-separated in pipeline order:
    /// the one that escalated the call, after those a previous approval of the same call
    /// answered (`intent,policy`: a person approved the intent check's question, then this
    /// one the policy's). Never another check's.
    pub escalated_by: String,
    pub status: Status,
    pub requires_step_up: bool,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub decided_ms: Option<i64>,
    pub decided_by: Option<String>,
    pub decide_note: Option<String>,
    pub consumed_ms: Option<i64>,
}

impl Approval {
    /// The status as of `now_ms`: a pending or approved row past its expiry is expired, whether
    /// or not the sweep has recorded it yet.
    pub fn status_at(&self, now_ms: i64) -> Status {
        match self.status {
            Status::Pending | Status::Approved if self.expires_ms <= now_ms => Status::Expired,
            s => s,
        }
    }

    /// The admin API's view (the original's `GET /v1/admin/approvals` fields, and ours).
    pub fn to_json(&self, now_ms: i64) -> Value {
        let ts = |ms: i64| crate::audit::time::format_rfc3339_ms(ms);
        json!({
            "pending_id": self.pending_id,
            "tenant": self.tenant,
            "capability_token_id": self.capability_token_id,
            "root_capability_token_id": self.root_capability_token_id,
            "agent_id": self.agent_id,
            "tool": self.tool,
            "args": self.args,
            "args_digest": self.args_digest,
            "bundle_digest": self.bundle_digest,
            "intent_summary": self.intent_summary,
            "reason": self.reason,
            "escalated_by": self.escalated_by.split(',').collect::<Vec<_>>(),
            "status": self.status_at(now_ms).as_str(),
            "requires_step_up": self.requires_step_up,
            "created_at": ts(self.created_ms),
            "expires_at": ts(self.expires_ms),
            "decided_at": self.decided_ms.map(ts),
            "decided_by": self.decided_by,
            "decide_note": self.decide_note,
            "consumed_at": self.consumed_ms.map(ts),
        })
    }
}

/// A pending approval of `tenant`'s agent `agent` for `delete_records`, for tests.
#[cfg(test)]
pub(crate) fn sample(tenant: &str, created_ms: i64, expires_ms: i64) -> Approval {
    Approval {
        tenant: tenant.into(),
        pending_id: new_id(),
        capability_token_id: "jti".into(),
        root_capability_token_id: "root".into(),
        agent_id: "agent".into(),
        tool: "delete_records".into(),
        args: None,
        args_digest: "d".into(),
        bundle_digest: "b".into(),
        intent_summary: String::new(),
        reason: "needs a person".into(),
        escalated_by: "policy".into(),
        status: Status::Pending,
        requires_step_up: false,
        created_ms,
        expires_ms,
        decided_ms: None,
        decided_by: None,
        decide_note: None,
        consumed_ms: None,
    }
}

/// A fresh pending id: `pa_` and 128 random bits.
pub fn new_id() -> String {
    let mut bytes = [0u8; 16];
    // getrandom failing is the OS failing; an all-zero id would then collide and the insert fail
    // closed (primary key), never reuse another call's approval.
    let _ = getrandom::fill(&mut bytes);
    let mut s = String::with_capacity(35);
    s.push_str("pa_");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Whether `id` has the shape of a pending id (checked before it reaches SQL).
pub fn valid_id(id: &str) -> bool {
    id.len() == 35 && id.starts_with("pa_") && id[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// The digest a resumed call's arguments must match.
pub fn args_digest(arguments: &Value) -> String {
    crate::mcp::rounds::args_digest(arguments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_fresh_and_checked() {
        let (a, b) = (new_id(), new_id());
        assert_ne!(a, b);
        assert!(valid_id(&a), "{a}");
        assert!(!valid_id("pa_x"));
        assert!(!valid_id(&a.replace("pa_", "pb_")));
        assert!(!valid_id(&format!("{}'", &a[..34])));
    }

    #[test]
    fn expiry_is_read_from_the_clock() {
        let a = Approval {
            tenant: "t".into(),
            pending_id: new_id(),
            capability_token_id: "j".into(),
            root_capability_token_id: "r".into(),
            agent_id: "a".into(),
            tool: "delete".into(),
            args: None,
            args_digest: "d".into(),
            bundle_digest: "b".into(),
            intent_summary: String::new(),
            reason: String::new(),
            escalated_by: "policy".into(),
            status: Status::Approved,
            requires_step_up: false,
            created_ms: 0,
            expires_ms: 100,
            decided_ms: None,
            decided_by: None,
            decide_note: None,
            consumed_ms: None,
        };
        assert_eq!(a.status_at(99), Status::Approved);
        assert_eq!(a.status_at(100), Status::Expired);
        let consumed = Approval {
            status: Status::Consumed,
            ..a
        };
        assert_eq!(consumed.status_at(1000), Status::Consumed);
    }
}
