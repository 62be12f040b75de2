//! A [`Denial`] as the typed JSON-RPC error the agent sees (WIRE.md codes): the one mapping of
//! the pipeline's refusals to the wire, at the proxy's edge. The pipeline decides and never
//! knows the wire. This module must never put a store's error text in front of an agent (it
//! goes to the log), and never map two denials an agent must tell apart to one code.

use serde_json::Value;

use crate::mcp::jsonrpc::{RpcError, code};
use crate::pipeline::Denial;
use crate::plugins::Stage;

/// The JSON-RPC error of `denial`.
pub fn rpc_error(denial: &Denial) -> RpcError {
    let (code, message) = match denial {
        Denial::Capability(_) => (code::CAPABILITY, "capability check failed"),
        Denial::Intent(_) => (code::INTENT, "intent check failed"),
        Denial::Escalated(_) => (code::APPROVAL_PENDING, "approval required"),
        Denial::Policy(_) => (code::POLICY, "policy check failed"),
        Denial::Budget(_) => (code::BUDGET, "budget check failed"),
        Denial::CheckFailed { stage, .. } => match stage {
            Stage::Intent => (code::INTENT, "intent check failed"),
            Stage::Budget => (code::BUDGET, "budget check failed"),
            _ => (code::POLICY, "policy check failed"),
        },
        Denial::Audit(_) => (code::AUDIT_UNAVAILABLE, "audit log unavailable"),
        // Rate limiting is a budget refusal on the wire, as a `rate_limit` caveat's is.
        Denial::Throttled(_) => (code::BUDGET, "rate limited"),
        Denial::ApprovalPending(_) => (code::APPROVAL_PENDING, "approval required"),
        Denial::Approval(_) => (code::POLICY, "approval not valid for this call"),
        Denial::ApprovalRejected { .. } => (code::POLICY, "approval rejected"),
        Denial::ApprovalTimedOut { .. } => (code::POLICY, "approval timed out"),
    };
    // Store errors carry database text (names, addresses): it goes to the log, not to the
    // agent, which learns only that the dependency is down.
    let data = match denial {
        Denial::Audit(detail) => {
            tracing::error!(check = denial.check(), %detail, "call refused: store unavailable");
            Value::from("audit log unavailable")
        }
        Denial::ApprovalPending(p) => p.to_json(),
        Denial::ApprovalRejected { pending_id, note } => serde_json::json!({
            "pending_id": pending_id,
            "status": "rejected",
            "reason": denial.to_string(),
            "note": note,
        }),
        Denial::ApprovalTimedOut { pending_id } => serde_json::json!({
            "pending_id": pending_id,
            "status": "expired",
            "reason": denial.to_string(),
        }),
        _ => Value::from(denial.to_string()),
    };
    RpcError::new(code, message).with_data(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_text_stays_in_the_log_and_escalations_are_pending() {
        let e = rpc_error(&Denial::Audit("connection to 10.0.0.7 refused".into()));
        assert_eq!(e.code, code::AUDIT_UNAVAILABLE);
        assert_eq!(e.data, Some(Value::from("audit log unavailable")));
        let escalated = |check| {
            Denial::Escalated(crate::pipeline::Escalation {
                check,
                reason: "no".into(),
                requires_step_up: false,
                approval_mode: None,
            })
        };
        for check in ["intent", "policy", "budget"] {
            assert_eq!(rpc_error(&escalated(check)).code, code::APPROVAL_PENDING);
        }
        assert_eq!(rpc_error(&Denial::Policy("no".into())).code, code::POLICY);
        assert_eq!(rpc_error(&Denial::Budget("over".into())).code, code::BUDGET);
    }
}
