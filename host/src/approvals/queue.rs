//! What an escalation finds in the queue before it adds to it: the same call already waiting
//! (an agent that sends the call again joins its approval instead of queueing it twice), or
//! its token tree already holding [`MAX_PENDING_PER_TOKEN`] waiting approvals (then it is
//! refused: one agent must not bury the queue an operator reads).
//!
//! Must never join an approval of another agent, token tree, tool, arguments or bundle: a
//! joined approval is the one the resumed call is matched against.

use super::{Approval, query};
use crate::store::Db;

/// Most approvals one token tree may have waiting at once.
pub const MAX_PENDING_PER_TOKEN: usize = 100;

/// What an escalation finds.
#[derive(Debug)]
pub enum Found {
    /// The same call waits already: its approval is the one to resume.
    Same(Box<Approval>),
    /// Nothing alike, and room for one more.
    Room,
    /// The token tree already has [`MAX_PENDING_PER_TOKEN`] waiting.
    Full,
}

/// The call being escalated, as an approval matches it.
pub struct Escalated<'a> {
    pub tenant: &'a str,
    pub root_jti: &'a str,
    pub agent_id: &'a str,
    pub tool: &'a str,
    pub args_digest: &'a str,
    pub bundle_digest: &'a str,
    /// The checks its approval would answer ([`Approval::escalated_by`]): an approval waiting
    /// on another check's question is not this one's.
    pub escalated_by: &'a str,
}

/// Looks through the token tree's waiting approvals for `call`.
pub async fn find(db: &Db, call: &Escalated<'_>, now_ms: i64) -> Result<Found, query::QueryError> {
    let limit = MAX_PENDING_PER_TOKEN as i64 + 1;
    let waiting = query::pending_of_token(db, call.tenant, call.root_jti, now_ms, limit).await?;
    Ok(decide(waiting, call))
}

fn decide(waiting: Vec<Approval>, call: &Escalated<'_>) -> Found {
    let n = waiting.len();
    let same = waiting.into_iter().find(|a| {
        a.agent_id == call.agent_id
            && a.root_capability_token_id == call.root_jti
            && a.tool == call.tool
            && a.args_digest == call.args_digest
            && a.bundle_digest == call.bundle_digest
            && a.escalated_by == call.escalated_by
    });
    match same {
        Some(a) => Found::Same(Box::new(a)),
        None if n >= MAX_PENDING_PER_TOKEN => Found::Full,
        None => Found::Room,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::approvals::Status;

    fn waiting(tool: &str, args: &str) -> Approval {
        Approval {
            tenant: "acme".into(),
            pending_id: crate::approvals::new_id(),
            capability_token_id: "child".into(),
            root_capability_token_id: "root".into(),
            agent_id: "agent".into(),
            tool: tool.into(),
            args: None,
            args_digest: args.into(),
            bundle_digest: "b1".into(),
            intent_summary: String::new(),
            reason: String::new(),
            escalated_by: "policy".into(),
            status: Status::Pending,
            requires_step_up: false,
            created_ms: 0,
            expires_ms: 1,
            decided_ms: None,
            decided_by: None,
            decide_note: None,
            consumed_ms: None,
        }
    }

    fn call<'a>(tool: &'a str, args: &'a str, bundle: &'a str) -> Escalated<'a> {
        Escalated {
            tenant: "acme",
            root_jti: "root",
            agent_id: "agent",
            tool,
            args_digest: args,
            bundle_digest: bundle,
            escalated_by: "policy",
        }
    }

    /// The same call joins its waiting approval; another tool, other arguments, another bundle
    /// or another check's question do not; a full token tree refuses what is not already waiting.
    #[test]
    fn the_same_call_joins_and_a_full_tree_refuses() {
        let one = vec![waiting("delete", "a1"), waiting("drop", "a2")];
        let id = one[1].pending_id.clone();
        match decide(one.clone(), &call("drop", "a2", "b1")) {
            Found::Same(a) => assert_eq!(a.pending_id, id),
            other => panic!("{other:?}"),
        }
        let asked_by_intent = Escalated {
            escalated_by: "intent",
            ..call("drop", "a2", "b1")
        };
        for other in [
            call("drop", "a3", "b1"),
            call("drop", "a2", "b2"),
            call("wipe", "a2", "b1"),
            asked_by_intent,
        ] {
            assert!(matches!(decide(one.clone(), &other), Found::Room));
        }
        let full: Vec<Approval> = (0..MAX_PENDING_PER_TOKEN)
            .map(|i| waiting("delete", &format!("d{i}")))
            .collect();
        assert!(matches!(
            decide(full.clone(), &call("delete", "new", "b1")),
            Found::Full
        ));
        assert!(matches!(
            decide(full, &call("delete", "d7", "b1")),
            Found::Same(_)
        ));
    }
}
