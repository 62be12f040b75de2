//! The decision for one tool call, read top to bottom as its phases:
//! capability → intent → policy → budget → charge → audit → [`Permit`].
//!
//! Only this module can construct a [`Permit`], and forwarding a `tools/call` needs one, so no
//! code path forwards without a recorded decision. Every phase fails closed: an error in a
//! check, in the counters or in the audit store is a denial. A denial is audited too, and if the
//! audit store cannot record it the caller still gets a denial. This module must never forward,
//! and must never answer before the decision's audit event is durable.

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use crate::audit::{self, ArgValuesMode, AuditEvent, AuditLog, Decision};
use crate::capability::{CallContext, CapabilityError, Grant};
use crate::mcp::jsonrpc::{RpcError, code};
use crate::store::{ChargeOutcome, Store};

/// Proof that a tool call was decided `allow` and its audit event is durable.
#[derive(Debug)]
pub struct Permit {
    /// The id of the decision's audit event.
    pub event_id: i64,
    pub bundle_digest: String,
    pub started: Instant,
    _sealed: (),
}

/// Why a call was refused. Mapped once to a JSON-RPC error in [`Denial::to_rpc`].
#[derive(Debug, thiserror::Error)]
pub enum Denial {
    #[error("{0}")]
    Capability(#[from] CapabilityError),
    #[error("{0}")]
    Intent(String),
    #[error("{reason}")]
    Policy {
        reason: String,
        escalate: bool,
        requires_step_up: bool,
    },
    #[error("{0}")]
    Budget(String),
    /// The counters store failed: a budget that cannot be checked is not granted.
    #[error("budget store unavailable: {0}")]
    BudgetStore(String),
    /// The decision could not be made durable; nothing was forwarded.
    #[error("audit log unavailable: {0}")]
    Audit(String),
}

impl Denial {
    /// The check that refused, as audit events name it.
    pub fn check(&self) -> &'static str {
        match self {
            Self::Capability(_) => "capability",
            Self::Intent(_) => "intent",
            Self::Policy { .. } => "policy",
            Self::Budget(_) | Self::BudgetStore(_) => "budget",
            Self::Audit(_) => "audit",
        }
    }

    /// The typed JSON-RPC error the caller sees (WIRE.md codes).
    pub fn to_rpc(&self) -> RpcError {
        let (code, message) = match self {
            Self::Capability(_) => (code::CAPABILITY, "capability check failed"),
            Self::Intent(_) => (code::INTENT, "intent check failed"),
            Self::Policy { escalate: true, .. } => (code::APPROVAL_PENDING, "approval required"),
            Self::Policy { .. } => (code::POLICY, "policy check failed"),
            Self::Budget(_) | Self::BudgetStore(_) => (code::BUDGET, "budget check failed"),
            Self::Audit(_) => (code::AUDIT_UNAVAILABLE, "audit log unavailable"),
        };
        RpcError::new(code, message).with_data(Value::from(self.to_string()))
    }
}

/// One tool call as the pipeline sees it, after the token was authenticated.
pub struct ToolCall<'a> {
    pub grant: &'a Grant,
    pub tool: &'a str,
    pub arguments: &'a Value,
    pub intent_prompt: Option<&'a str>,
    /// The agent identity the request asserts (`X-IntentGate-Agent`), if any.
    pub agent: Option<&'a str>,
    pub remote_ip: String,
    pub session_id: Option<&'a str>,
}

/// The ordered checks and what they need.
pub struct Pipeline {
    store: Arc<dyn Store>,
    audit: AuditLog,
    arg_values: ArgValuesMode,
    upstream_name: String,
}

impl Pipeline {
    pub fn new(
        store: Arc<dyn Store>,
        audit: AuditLog,
        arg_values: ArgValuesMode,
        upstream_name: String,
    ) -> Self {
        Self {
            store,
            audit,
            arg_values,
            upstream_name,
        }
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// Decides one call. `Ok` only when every check allowed and the event is durable.
    pub async fn decide(&self, call: &ToolCall<'_>) -> Result<Permit, Denial> {
        let started = Instant::now();
        let bundle_digest = String::new();
        let outcome = self.run_checks(call).await;
        let mut event = self.event_for(call, &bundle_digest);
        event.latency_ms = Some(started.elapsed().as_millis() as u64);
        match &outcome {
            Ok(()) => {
                event.decision = Some(Decision::Allow);
            }
            Err(denial) => {
                event.decision = Some(match denial {
                    Denial::Policy { escalate: true, .. } => Decision::Escalate,
                    _ => Decision::Block,
                });
                event.check = denial.check().to_owned();
                event.reason = denial.to_string();
                if let Denial::Policy {
                    requires_step_up, ..
                } = denial
                {
                    event.requires_step_up = *requires_step_up;
                }
            }
        }
        let appended = self.audit.append(event).await;
        match (outcome, appended) {
            (Ok(()), Ok(a)) => Ok(Permit {
                event_id: a.id,
                bundle_digest,
                started,
                _sealed: (),
            }),
            (Ok(()), Err(e)) => {
                // Charged but never forwarded: give the budget back, then refuse.
                self.refund(call).await;
                Err(Denial::Audit(e.to_string()))
            }
            (Err(denial), _) => Err(denial),
        }
    }

    async fn run_checks(&self, call: &ToolCall<'_>) -> Result<(), Denial> {
        // 1. capability: the token's static caveats for this tool, server and agent.
        call.grant.authorize(&CallContext {
            tool: call.tool,
            agent: call.agent,
            server: Some(&self.upstream_name),
            callee: None,
            risk: None,
        })?;
        // 2-4. intent, policy and budget plugins run here (see the plugins module).
        // 5. charge the token's own limits, only now that every check allowed.
        self.charge(call).await
    }

    fn limits(&self, grant: &Grant) -> Vec<(String, i64, i64)> {
        let mut out = Vec::new();
        if let Some(max) = grant.max_calls {
            out.push((format!("calls:{}", grant.jti), 0, max as i64));
        }
        if let Some(per_min) = grant.rate_per_min {
            let minute = audit::time::now_ms() / 60_000 * 60;
            out.push((format!("rate:{}", grant.jti), minute, per_min as i64));
        }
        out
    }

    async fn charge(&self, call: &ToolCall<'_>) -> Result<(), Denial> {
        let limits = self.limits(call.grant);
        for (i, (key, window, limit)) in limits.iter().enumerate() {
            let outcome = self.store.charge(key, *window, 1, *limit).await;
            let refused = match outcome {
                Ok(ChargeOutcome::Charged { .. }) => continue,
                Ok(ChargeOutcome::Exceeded { .. }) => {
                    let what = if key.starts_with("calls:") {
                        "max_calls"
                    } else {
                        "rate_limit"
                    };
                    Denial::Budget(format!("token {what} of {limit} reached"))
                }
                Err(e) => Denial::BudgetStore(e.to_string()),
            };
            for (key, window, _) in &limits[..i] {
                let _ = self.store.charge(key, *window, -1, i64::MAX).await;
            }
            return Err(refused);
        }
        Ok(())
    }

    async fn refund(&self, call: &ToolCall<'_>) {
        for (key, window, _) in self.limits(call.grant) {
            if let Err(e) = self.store.charge(&key, window, -1, i64::MAX).await {
                tracing::warn!(error = %e, "could not refund a budget charge");
            }
        }
    }

    fn event_for(&self, call: &ToolCall<'_>, bundle_digest: &str) -> AuditEvent {
        let g = call.grant;
        let mut e = AuditEvent::new(audit::kinds::TOOL_CALL, g.tenant.clone())
            .with_arguments(self.arg_values, call.arguments);
        e.agent_id = g.subject.clone();
        e.tool = call.tool.to_owned();
        e.jti = g.jti.clone();
        e.root_jti = g.root_jti.clone();
        e.caveat_count = Some(g.caveat_count as u32);
        e.bundle_digest = bundle_digest.to_owned();
        e.remote_ip = call.remote_ip.clone();
        e.session_id = call.session_id.unwrap_or_default().to_owned();
        e
    }

    /// Records the upstream's failure for a permitted call as its own event (the decision event
    /// was committed before forwarding, so it cannot hold the outcome).
    pub async fn record_upstream_failure(
        &self,
        call: &ToolCall<'_>,
        permit: &Permit,
        status: u16,
        detail: &str,
    ) {
        let mut e = self.event_for(call, &permit.bundle_digest);
        e.kind = "intentgate.upstream_result".to_owned();
        e.check = "upstream".to_owned();
        e.reason = detail.chars().take(256).collect();
        e.upstream_status = Some(status);
        e.latency_ms = Some(permit.started.elapsed().as_millis() as u64);
        if let Err(err) = self.audit.append(e).await {
            tracing::error!(error = %err, "could not record an upstream failure in the audit log");
        }
    }
}

/// The summary forwarded to the caller in the `_intentgate` member of a result.
pub fn decision_summary(permit: &Permit) -> Value {
    serde_json::json!({
        "decision": "allow",
        "reason": "all checks passed",
        "latency_ms": permit.started.elapsed().as_millis() as u64,
        "event_id": permit.event_id,
        "bundle_digest": permit.bundle_digest,
    })
}
