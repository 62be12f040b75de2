//! The decision for one tool call, read top to bottom as its phases:
//! throttle → capability → intent → policy → budget → charge + audit (one commit) → [`Permit`].
//!
//! The throttle (`throttle.rs`) refuses, before any check runs, the calls of a token or tenant
//! that keeps being denied; those refusals are audited as one aggregated event per token and
//! window (with their count) rather than one row each, so denials cannot flood the chain.
//!
//! Only this module can construct a [`Permit`], and forwarding a `tools/call` needs one, so no
//! code path forwards without a recorded decision. Every phase fails closed: an error in a
//! check, in the counters or in the audit store is a denial. A denial is audited too, and if the
//! audit store cannot record it the caller still gets a denial. This module must never forward,
//! and must never answer before the decision's audit event is durable.

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use crate::approvals::{self, Approval, ApprovalConfig, ApprovalWrite};
use crate::audit::{self, ArgValuesMode, AuditEvent, AuditLog, Debit, Decision};
use crate::bundles::{Registry, Snapshot};
use crate::capability::{CallContext, CapabilityError, Grant};
use crate::plugins::{
    Charge, CheckInput, Counters, MemoryCounters, PluginError, Stage, TokenInput, Usage, Verdict,
    VerdictKind,
};

mod kind;
mod permit;
mod throttle;

pub use kind::{CallKind, is_reserved_tool_name};
pub use permit::{Cleared, NotDecided, Permit};
pub use throttle::{DenialLimits, Scope as ThrottleScope, THROTTLED_KIND, Throttled};

/// Why a call was refused. Mapped once, at the edge, to a JSON-RPC error
/// (`crate::proxy::denial`); this module never knows the wire.
#[derive(Debug, thiserror::Error)]
pub enum Denial {
    #[error("{0}")]
    Capability(#[from] CapabilityError),
    #[error("{0}")]
    Intent(String),
    #[error("{0}")]
    Policy(String),
    /// A check escalated (or the policy asked for a step-up the token does not carry): the
    /// call is for a person to decide. Becomes [`Denial::ApprovalPending`] once its approval is
    /// queued with its event.
    #[error("{}", .0.reason)]
    Escalated(Escalation),
    #[error("{0}")]
    Budget(String),
    /// A check plugin failed (trap, timeout, bad result): the call is refused by that stage.
    #[error("{stage} check failed closed: {error}")]
    CheckFailed { stage: Stage, error: PluginError },
    /// The decision could not be made durable; nothing was forwarded.
    #[error("audit log unavailable: {0}")]
    Audit(String),
    /// A check escalated: the call waits for a person in the approval queue, under this
    /// pending id.
    #[error("approval required: {}", .0.reason)]
    ApprovalPending(Pending),
    /// The approval the call resumed (`X-IntentGate-Approval-Id`) does not let it run: unknown,
    /// not approved, already used, expired, or issued for another call.
    #[error("{0}")]
    Approval(String),
    /// A held call's approval was rejected by a person.
    #[error("approval rejected{}", .note.as_deref().map(|n| format!(": {n}")).unwrap_or_default())]
    ApprovalRejected {
        pending_id: String,
        note: Option<String>,
    },
    /// A held call's approval was not decided in time.
    #[error("approval timed out")]
    ApprovalTimedOut { pending_id: String },
    /// Too many denied calls of this token or tenant in the current window: refused before
    /// any check ran (audited in aggregate, see `throttle.rs`).
    #[error(
        "too many denied calls for this {}: refused for {} s (limit {} denials per window)",
        .0.scope.as_str(), .0.retry_after_secs, .0.limit
    )]
    Throttled(Throttled),
}

impl Denial {
    /// The check that refused, as audit events name it.
    pub fn check(&self) -> &'static str {
        match self {
            Self::Capability(_) => "capability",
            Self::Intent(_) => "intent",
            Self::Policy(_) => "policy",
            Self::Escalated(e) => e.check,
            Self::Budget(_) => "budget",
            Self::CheckFailed { stage, .. } => stage.as_str(),
            Self::Audit(_) => "audit",
            Self::Throttled(_) => "throttle",
            Self::ApprovalPending(p) => p.check,
            Self::Approval(_) | Self::ApprovalRejected { .. } | Self::ApprovalTimedOut { .. } => {
                "approval"
            }
        }
    }

    /// Whether this denial is the caller's doing and counts toward the denial throttle: not
    /// our own store failing, not an approval being awaited.
    fn counts_toward_throttle(&self) -> bool {
        match self {
            Self::Capability(_)
            | Self::Intent(_)
            | Self::Policy(_)
            | Self::Budget(_)
            | Self::CheckFailed { .. } => true,
            Self::Escalated(_) => false,
            Self::Approval(_) => true,
            Self::Audit(_)
            | Self::Throttled(_)
            | Self::ApprovalPending(_)
            | Self::ApprovalRejected { .. }
            | Self::ApprovalTimedOut { .. } => false,
        }
    }
}

/// A check's escalation of a call, before its approval is queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Escalation {
    /// The check that escalated, as audit events name it: `intent`, `policy` or `budget`.
    pub check: &'static str,
    pub reason: String,
    /// The policy asked for a step-up the token does not carry.
    pub requires_step_up: bool,
    /// How the escalation is answered, when the check said.
    pub approval_mode: Option<approvals::Mode>,
}

impl Escalation {
    /// The escalation of `check`'s verdict.
    fn of(check: &'static str, verdict: &Verdict) -> Self {
        Self {
            check,
            reason: verdict.reason.clone(),
            // Any stage's check may ask for one (the SDK's `with_step_up`).
            requires_step_up: verdict.requires_step_up,
            approval_mode: mode_of(verdict),
        }
    }
}

/// A call waiting in the approval queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The check that escalated it.
    pub check: &'static str,
    pub pending_id: String,
    pub reason: String,
    pub requires_step_up: bool,
    pub expires_ms: i64,
    /// How the policy asked the escalation to be answered, if it did.
    pub mode: Option<approvals::Mode>,
}

impl Pending {
    /// The `data` of the `-32019` answer: what the agent needs to resume.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "pending_id": self.pending_id,
            "status": "pending",
            "resume_header": approvals::RESUME_HEADER,
            "reason": self.reason,
            "requires_step_up": self.requires_step_up,
            "expires_at": audit::time::format_rfc3339_ms(self.expires_ms),
        })
    }
}

/// One call as the pipeline sees it, after the token was authenticated: a tool call, or a
/// resource read/subscription, prompt get or completion ([`CallKind`]).
pub struct ToolCall<'a> {
    pub grant: &'a Grant,
    /// What the call reaches; checks and audit see `tool` qualified by it ([`ToolCall::name`]).
    pub kind: CallKind,
    /// The tool's name, the resource's URI, the prompt's name (for a completion: its prompt's
    /// name or its resource template's URI template).
    pub tool: &'a str,
    pub arguments: &'a Value,
    pub intent_prompt: Option<&'a str>,
    /// The agent identity the request asserts (`X-IntentGate-Agent`), if any.
    pub agent: Option<&'a str>,
    pub remote_ip: String,
    pub session_id: Option<&'a str>,
    /// A later round of a multi-round call (MCP 2026-07-28): decided again, never charged again.
    pub round: Option<Round>,
    /// The approval this call resumes (`X-IntentGate-Approval-Id`): matched to the call, then
    /// consumed with the call's event.
    pub approval_id: Option<&'a str>,
    /// The upstream the call goes to ([`crate::upstreams`]), the server and callee that
    /// `mcp_allow`/`callee_allow` match; `None`: the configured `INTENTGATE_UPSTREAM_NAME`.
    pub upstream: Option<&'a str>,
}

impl ToolCall<'_> {
    /// The name checks and audit events see: the tool's, or the target qualified by its kind.
    pub fn name(&self) -> std::borrow::Cow<'_, str> {
        self.kind.qualified(self.tool)
    }
}

/// Which call a later round continues: the first round's audit event and this round's number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    pub call_event: i64,
    /// 2 for the first retry.
    pub number: u32,
}

/// The ordered checks and what they need.
pub struct Pipeline {
    audit: AuditLog,
    registry: Registry,
    /// This replica's view of usage and budget counters, read by plugins; the store's
    /// conditional charges are the authority across replicas.
    local_counters: Arc<MemoryCounters>,
    arg_values: ArgValuesMode,
    upstream_name: String,
    /// The namespacing's separator, with several upstreams ([`Pipeline::with_namespacing`]).
    separator: Option<String>,
    throttle: Arc<throttle::Throttle>,
    metrics: Arc<crate::metrics::Metrics>,
    approvals: ApprovalConfig,
    /// The revocations every decision checks again (see [`Pipeline::with_revocations`]).
    revocations: Option<Arc<crate::capability::RevocationSet>>,
}

/// What the checks concluded, for the audit event.
#[derive(Default)]
struct Findings {
    intent_summary: String,
    requires_step_up: bool,
    charges: Vec<Debit>,
}

impl Pipeline {
    pub fn new(
        audit: AuditLog,
        registry: Registry,
        local_counters: Arc<MemoryCounters>,
        arg_values: ArgValuesMode,
        upstream_name: String,
    ) -> Self {
        let throttle = throttle::Throttle::new(DenialLimits::default(), audit.clone());
        let metrics = Arc::new(crate::metrics::Metrics::new(&upstream_name));
        Self {
            audit,
            registry,
            local_counters,
            arg_values,
            upstream_name,
            separator: None,
            throttle,
            metrics,
            approvals: ApprovalConfig::default(),
            revocations: None,
        }
    }

    /// The same pipeline checking, at every decision, that the call's token has not expired or
    /// been revoked since its request authenticated it: a call held for its approval, a long
    /// poll or an upstream's request during a long call is decided later than that.
    #[must_use]
    pub fn with_revocations(mut self, revocations: Arc<crate::capability::RevocationSet>) -> Self {
        self.revocations = Some(revocations);
        self
    }

    /// The same pipeline counting forwarded calls per upstream (`names`, configuration order).
    #[must_use]
    pub fn with_upstream_names(mut self, names: &[&str]) -> Self {
        if !names.is_empty() {
            self.metrics = Arc::new(crate::metrics::Metrics::with_upstreams(names));
        }
        self
    }

    /// The same pipeline in front of several upstreams, whose names are namespaced with
    /// `separator` ([`crate::upstreams`]): a deny caveat is matched against a call's name as
    /// its upstream knows it too.
    #[must_use]
    pub fn with_namespacing(mut self, separator: &str) -> Self {
        self.separator = Some(separator.to_owned());
        self
    }

    /// The same pipeline with other approval settings.
    #[must_use]
    pub fn with_approvals(mut self, approvals: ApprovalConfig) -> Self {
        self.approvals = approvals;
        self
    }

    /// The approval queue's settings.
    pub fn approvals(&self) -> &ApprovalConfig {
        &self.approvals
    }

    /// The same pipeline with other denial throttle limits.
    #[must_use]
    pub fn with_denial_limits(mut self, limits: DenialLimits) -> Self {
        self.throttle = throttle::Throttle::new(limits, self.audit.clone());
        self
    }

    /// The denial throttle's limits.
    pub fn denial_limits(&self) -> DenialLimits {
        self.throttle.limits()
    }

    /// Writes the aggregated audit events of throttled calls now (a background task does so
    /// at the end of each window); returns how many events were written.
    pub async fn flush_throttled(&self) -> usize {
        self.throttle.flush().await
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The metrics this pipeline's decisions are counted in.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// Decides one call. `Ok` only when every check allowed and the event is durable.
    pub async fn decide(&self, call: &ToolCall<'_>) -> Result<Permit, Denial> {
        let started = Instant::now();
        let decided = self.decide_unmetered(call).await;
        self.metrics.decided(&call.grant.tenant, started, &decided);
        crate::telemetry::trace::decided(call, &decided);
        // Off at the default level (`INTENTGATE_LOG=intentgate=debug` turns it on); never the
        // reason, which may quote the call.
        match &decided {
            Ok(p) => {
                tracing::debug!(event_id = p.event_id, tenant = %call.grant.tenant, "call allowed")
            }
            Err(d) => {
                tracing::debug!(tenant = %call.grant.tenant, check = d.check(), "call refused")
            }
        }
        decided
    }

    async fn decide_unmetered(&self, call: &ToolCall<'_>) -> Result<Permit, Denial> {
        let started = Instant::now();
        // 0. throttle: a token or tenant that keeps being denied is refused before any check
        // runs; the refusal is counted into an aggregated audit event, not written alone.
        let g = call.grant;
        let now = audit::time::now_ms();
        self.throttle
            .admit(
                &g.tenant,
                &g.root_jti,
                || (g.subject.clone(), g.jti.clone()),
                now,
            )
            .map_err(Denial::Throttled)?;
        // One snapshot for the whole call: a promotion mid-call does not mix bundles.
        let snapshot = self.registry.snapshot(&call.grant.tenant);
        let mut findings = Findings::default();
        // A resumed approval is matched to this call before any check runs.
        let resumed = self.resumed(call, snapshot.digest()).await;
        let answered = resumed.as_ref().ok().cloned().flatten();
        let mut outcome = match resumed {
            Ok(_) => {
                self.run_checks(call, &snapshot, &mut findings, answered.as_deref())
                    .await
            }
            Err(denial) => Err(denial),
        };
        // The checks an escalation's approval answers: the one escalating now, after those the
        // call's approval already answered (a person approved each question in turn).
        let escalated_by = match &outcome {
            Err(Denial::Escalated(e)) => match answered.as_deref() {
                Some(a) if !a.is_empty() => format!("{a},{}", e.check),
                _ => e.check.to_owned(),
            },
            _ => String::new(),
        };
        // An escalation joins the same call's waiting approval, or is refused when its token
        // tree has too many waiting (`approvals::queue`).
        let mut joined = None;
        if let Err(Denial::Escalated(_)) = &outcome {
            match self.queued(call, snapshot.digest(), &escalated_by).await {
                Ok(approvals::queue::Found::Same(a)) => joined = Some(a),
                Ok(approvals::queue::Found::Room) => {}
                Ok(approvals::queue::Found::Full) => {
                    outcome = Err(Denial::Approval(format!(
                        "too many approvals waiting for this token ({}): wait for a decision \
                         before escalating more calls",
                        approvals::queue::MAX_PENDING_PER_TOKEN
                    )));
                }
                Err(denial) => outcome = Err(denial),
            }
        }
        if let Err(denial) = &outcome
            && denial.counts_toward_throttle()
        {
            self.throttle.note_denial(&g.tenant, &g.root_jti, now);
        }
        let mut event = self.event_for(call, snapshot.digest());
        event.latency_ms = Some(started.elapsed().as_millis() as u64);
        event.intent_summary = findings.intent_summary;
        event.requires_step_up = findings.requires_step_up;
        event.pending_id = call.approval_id.unwrap_or_default().to_owned();
        match &outcome {
            Ok(()) => event.decision = Some(Decision::Allow),
            Err(denial) => {
                event.decision = Some(match denial {
                    Denial::Escalated(_) => Decision::Escalate,
                    _ => Decision::Block,
                });
                event.check = denial.check().to_owned();
                event.reason = denial.to_string();
            }
        }
        // 5. charge and audit in one commit: the debits are decided in the transaction that
        // records the event, so the charges and the decision are durable together or not at
        // all (a failed commit charged nothing; nothing is refunded here).
        let debits = match &outcome {
            Ok(()) => std::mem::take(&mut findings.charges),
            Err(_) => Vec::new(),
        };
        // The approval queue's change rides in the same commit: the escalation creates its
        // pending approval, a resumed call consumes its approval (single-use on every replica).
        let approval = match &outcome {
            Ok(()) => call.approval_id.map(|id| ApprovalWrite::Consume {
                id: id.to_owned(),
                at_ms: audit::time::now_ms(),
            }),
            Err(Denial::Escalated(e)) => {
                // A resumed call escalating at a later check uses its approval up: it answered
                // its question once, and the approval of the next question answers both.
                let used = answered
                    .as_ref()
                    .and(call.approval_id)
                    .map(|id| id.to_owned());
                let next = match &joined {
                    // The same call waits already: this event names its approval.
                    Some(a) => {
                        event.pending_id = a.pending_id.clone();
                        None
                    }
                    None => {
                        let pending = self.pending_for(call, &event, e, &escalated_by);
                        event.pending_id = pending.pending_id.clone();
                        Some(Box::new(pending))
                    }
                };
                match (used, next) {
                    (Some(id), next) => Some(ApprovalWrite::Supersede {
                        id,
                        at_ms: audit::time::now_ms(),
                        next,
                    }),
                    (None, next) => next.map(ApprovalWrite::Create),
                }
            }
            Err(_) => None,
        };
        let committing = Instant::now();
        let appended = self
            .audit
            .append_with(event, debits.clone(), approval.clone())
            .await;
        (self.metrics.stages).since(crate::metrics::Stage::Audit, committing);
        match (outcome, appended) {
            // The approval the call used was used meanwhile, or is no longer approved.
            (_, Ok(a)) if a.refused.is_some() && a.refused_check == "approval" => {
                self.throttle.note_denial(&g.tenant, &g.root_jti, now);
                Err(Denial::Approval(a.refused.unwrap_or_default()))
            }
            (Err(Denial::Escalated(e)), Ok(_)) => {
                let a = match (approval, joined) {
                    (
                        Some(
                            ApprovalWrite::Create(a)
                            | ApprovalWrite::Supersede { next: Some(a), .. },
                        ),
                        _,
                    )
                    | (_, Some(a)) => a,
                    _ => return Err(Denial::Audit("escalation without its approval".into())),
                };
                Err(Denial::ApprovalPending(Pending {
                    check: e.check,
                    pending_id: a.pending_id,
                    reason: e.reason,
                    requires_step_up: e.requires_step_up,
                    expires_ms: a.expires_ms,
                    mode: e.approval_mode,
                }))
            }
            (Ok(()), Ok(a)) => match a.refused {
                None => {
                    self.note_usage(call, &debits);
                    Ok(Permit::new(
                        a.id,
                        snapshot.digest().to_owned(),
                        started,
                        call,
                    ))
                }
                Some(reason) => {
                    self.throttle.note_denial(&g.tenant, &g.root_jti, now);
                    Err(Denial::Budget(reason))
                }
            },
            // An escalation that is not recorded created no approval: no pending id to give.
            (Ok(()) | Err(Denial::Escalated(_)), Err(e)) => Err(Denial::Audit(e.to_string())),
            (Err(denial), _) => Err(denial),
        }
    }

    /// The checks whose escalations the call's approval answers (comma-separated, see
    /// [`Approval::escalated_by`]): `Ok(None)` without an approval, `Ok(Some(checks))` when it
    /// matches an approved, unexpired approval (consumed with the
    /// call's event), else the refusal. Matched on tenant, agent, token tree, tool, arguments
    /// and bundle.
    async fn resumed(
        &self,
        call: &ToolCall<'_>,
        bundle_digest: &str,
    ) -> Result<Option<String>, Denial> {
        let Some(id) = call.approval_id else {
            // A later round of a call is the same call: what a person approved of its first
            // round stays answered (asked again each round, the call could never finish).
            return match call.round {
                Some(r) => {
                    self.answered_in_first_round(call, r.call_event, bundle_digest)
                        .await
                }
                None => Ok(None),
            };
        };
        let g = call.grant;
        let found = approvals::query::get(self.audit.db(), Some(&g.tenant), id)
            .await
            .map_err(|e| Denial::Audit(e.to_string()))?;
        let Some(a) = found else {
            return Err(Denial::Approval(format!("unknown approval id {id:?}")));
        };
        let refuse = |what: &str| Err(Denial::Approval(format!("approval {id} {what}")));
        match a.status_at(audit::time::now_ms()) {
            approvals::Status::Approved => {}
            approvals::Status::Pending => return refuse("is still pending"),
            approvals::Status::Rejected => return refuse("was rejected"),
            approvals::Status::Expired => return refuse("has expired"),
            approvals::Status::Consumed => return refuse("was already used"),
        }
        if a.agent_id != g.subject {
            return refuse("was issued to another agent");
        }
        if a.root_capability_token_id != g.root_jti {
            return refuse("was issued to another token");
        }
        if a.tool != call.name() {
            return refuse("was issued for another tool");
        }
        if a.args_digest != approvals::args_digest(call.arguments) {
            return refuse("was issued for other arguments");
        }
        if a.bundle_digest != bundle_digest {
            return refuse("was issued under another policy bundle");
        }
        Ok(Some(a.escalated_by))
    }

    /// The checks the approval its first round used answers (`first_event`, the round's
    /// sealed or own call event): `None` when it used none, or the approval is not this call's
    /// (another agent, token tree, tool, arguments or bundle). Nothing is consumed: the first
    /// round consumed it.
    async fn answered_in_first_round(
        &self,
        call: &ToolCall<'_>,
        first_event: i64,
        bundle_digest: &str,
    ) -> Result<Option<String>, Denial> {
        let g = call.grant;
        let store = |e: String| Denial::Audit(e);
        let filter = audit::AuditFilter {
            tenant: Some(g.tenant.clone()),
            id: Some(first_event),
            ..audit::AuditFilter::default()
        };
        let page = audit::query::list(self.audit.db(), &filter, None, 1)
            .await
            .map_err(|e| store(e.to_string()))?;
        let Some(first) = page.items.first() else {
            return Ok(None);
        };
        let event = first.body_value();
        let used = event["pending_id"].as_str().unwrap_or_default();
        if used.is_empty() || event["decision"] != "allow" {
            return Ok(None);
        }
        let found = approvals::query::get(self.audit.db(), Some(&g.tenant), used)
            .await
            .map_err(|e| store(e.to_string()))?;
        Ok(found
            .filter(|a| {
                a.status == approvals::Status::Consumed
                    && a.agent_id == g.subject
                    && a.root_capability_token_id == g.root_jti
                    && a.tool == call.name()
                    && a.args_digest == approvals::args_digest(call.arguments)
                    && a.bundle_digest == bundle_digest
            })
            .map(|a| a.escalated_by))
    }

    /// What an escalated call finds in the approval queue (a store that cannot say refuses).
    async fn queued(
        &self,
        call: &ToolCall<'_>,
        bundle_digest: &str,
        escalated_by: &str,
    ) -> Result<approvals::queue::Found, Denial> {
        let g = call.grant;
        let tool = call.name();
        let args_digest = approvals::args_digest(call.arguments);
        let escalated = approvals::queue::Escalated {
            tenant: &g.tenant,
            root_jti: &g.root_jti,
            agent_id: &g.subject,
            tool: &tool,
            args_digest: &args_digest,
            bundle_digest,
            escalated_by,
        };
        approvals::queue::find(self.audit.db(), &escalated, audit::time::now_ms())
            .await
            .map_err(|e| Denial::Audit(e.to_string()))
    }

    /// The pending approval an escalated call creates.
    fn pending_for(
        &self,
        call: &ToolCall<'_>,
        event: &AuditEvent,
        e: &Escalation,
        escalated_by: &str,
    ) -> Approval {
        let g = call.grant;
        let now = audit::time::now_ms();
        Approval {
            tenant: g.tenant.clone(),
            pending_id: approvals::new_id(),
            capability_token_id: g.jti.clone(),
            root_capability_token_id: g.root_jti.clone(),
            agent_id: g.subject.clone(),
            tool: call.name().into_owned(),
            args: event.arg_values.clone(),
            args_digest: approvals::args_digest(call.arguments),
            bundle_digest: event.bundle_digest.clone(),
            intent_summary: event.intent_summary.clone(),
            reason: e.reason.clone(),
            escalated_by: escalated_by.to_owned(),
            status: approvals::Status::Pending,
            requires_step_up: e.requires_step_up,
            created_ms: now,
            expires_ms: now.saturating_add(self.approvals.timeout.as_millis() as i64),
            decided_ms: None,
            decided_by: None,
            decide_note: None,
            consumed_ms: None,
        }
    }

    async fn run_checks(
        &self,
        call: &ToolCall<'_>,
        snapshot: &Snapshot,
        findings: &mut Findings,
        answered: Option<&str>,
    ) -> Result<(), Denial> {
        let authorizing = (self.metrics.stages).timer(crate::metrics::Stage::Capability);
        // 1. capability: the token is still good now (it may have waited since its request
        // authenticated it), and its static caveats for this tool, server and agent.
        if let Some(revocations) = &self.revocations {
            let now = audit::time::now_ms() / 1000;
            call.grant.still_valid(now, revocations)?;
        }
        let upstream = call.upstream.unwrap_or(&self.upstream_name);
        let kind = call.kind.capability_kind();
        // With several upstreams the name as the upstream knows it, for the deny caveats.
        let own_name = self.separator.as_deref().and_then(|separator| {
            let rest = call.tool.strip_prefix(upstream)?;
            if kind == crate::capability::Kind::Resource {
                rest.strip_prefix(crate::upstreams::URI_SEPARATOR)
            } else {
                rest.strip_prefix(separator)
            }
        });
        call.grant.authorize(&CallContext {
            kind,
            tool: call.tool,
            own_name,
            agent: call.agent,
            server: Some(upstream),
            // The callee is the upstream server the call is forwarded to; its zone is not known.
            callee: Some((upstream, None)),
            // No risk score is computed: a risk_max caveat is refused as not evaluated.
            risk: None,
            template: call.kind == CallKind::Completion(crate::capability::Kind::Resource),
        })?;
        drop(authorizing);
        let input = self.check_input(call);
        // One deadline for all the checks together: a bundle of many slow checks is denied
        // when it runs out, whatever each check's own deadline.
        let limit = self.registry.runtime().limits().call_checks_deadline;
        let deadline = tokio::time::Instant::now() + limit;
        // 2. intent: what the agent says it wants, against the call.
        let intent = checks_within(
            &self.metrics,
            deadline,
            limit,
            Stage::Intent,
            snapshot.intent_async(&input),
        )
        .await?;
        findings.intent_summary = intent.record.summary.clone();
        let stepped_up = call.grant.step_up_at.is_some();
        findings.requires_step_up = intent.verdict.requires_step_up;
        decided_with_step_up(
            "intent",
            &intent.verdict,
            stepped_up,
            answered,
            Denial::Intent,
        )?;
        // 3. policy: the operator's Rego.
        let policy = snapshot.policy_async(&input, &intent.record);
        let policy = checks_within(&self.metrics, deadline, limit, Stage::Policy, policy).await?;
        findings.requires_step_up |= policy.requires_step_up;
        decided_with_step_up("policy", &policy, stepped_up, answered, Denial::Policy)?;
        // A later round of a multi-round call was charged with its first round; its sealed
        // state is single-use (a conditional counter of 1 in the shared store, so a replay is
        // refused on every replica), or a replayed state would be a free call. It is charged
        // with the round's event, so a round whose decision is not durable may be retried.
        // A request the upstream sends the agent during a call is decided (and audited), never
        // charged: the call that caused it was.
        if call.kind.is_server_request() {
            return Ok(());
        }
        if let Some(r) = call.round {
            findings.charges = vec![Debit {
                key: format!("round:{}:{}", r.call_event, r.number),
                window: 0,
                amount: 1,
                limit: 1,
            }];
            return Ok(());
        }
        // 4. budget: the bundle's ceilings, then the token's own limits; charged with the
        // event (see `decide`).
        let budget = snapshot.budget_async(&input);
        let budget = checks_within(&self.metrics, deadline, limit, Stage::Budget, budget).await?;
        findings.requires_step_up |= budget.verdict.requires_step_up;
        decided_with_step_up(
            "budget",
            &budget.verdict,
            stepped_up,
            answered,
            Denial::Budget,
        )?;
        findings.charges = self.charges_for(call.grant, &budget.charges);
        Ok(())
    }

    fn check_input(&self, call: &ToolCall<'_>) -> CheckInput {
        let g = call.grant;
        let day = day_start();
        let agent_key = format!("usage/{}/{}", g.tenant, g.subject);
        CheckInput {
            tenant: g.tenant.clone(),
            agent_id: g.subject.clone(),
            tool: call.name().into_owned(),
            arguments: call.arguments.to_string(),
            intent_prompt: call.intent_prompt.map(str::to_owned),
            token: TokenInput {
                jti: g.jti.clone(),
                root_jti: g.root_jti.clone(),
                subject: g.subject.clone(),
                zone: g.zone.clone(),
                caveat_count: g.caveat_count as u32,
                max_calls: g.max_calls,
                max_cents: g.max_cents,
                step_up_at: g.step_up_at.and_then(|t| u64::try_from(t).ok()),
            },
            usage: Usage {
                calls_today_tool: self
                    .local_counters
                    .get(&format!("{agent_key}/{}", call.name()), day),
                calls_today_total: self.local_counters.get(&agent_key, day),
            },
        }
    }

    /// The bundle's charges plus the token's `max_calls` and `rate_limit`.
    fn charges_for(&self, grant: &Grant, bundle: &[Charge]) -> Vec<Debit> {
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut out: Vec<Debit> = bundle
            .iter()
            .map(|c| Debit {
                key: c.key.clone(),
                window: int(c.window_start),
                // Clamped one by one, a charge over its limit could come out at the limit and
                // pass: such a charge stays one that never passes.
                amount: if c.amount > c.limit { 1 } else { int(c.amount) },
                limit: if c.amount > c.limit { 0 } else { int(c.limit) },
            })
            .collect();
        if let Some(max) = grant.max_calls {
            out.push(Debit {
                key: format!("calls:{}", grant.jti),
                window: 0,
                amount: 1,
                limit: int(max),
            });
        }
        if let Some(per_min) = grant.rate_per_min {
            out.push(Debit {
                key: format!("rate:{}", grant.jti),
                window: audit::time::now_ms() / 60_000 * 60,
                amount: 1,
                limit: int(per_min),
            });
        }
        out
    }

    /// Counts an allowed call in this replica's usage view (what policies see as usage).
    fn note_usage(&self, call: &ToolCall<'_>, debits: &[Debit]) {
        if call.round.is_some() || call.kind.is_server_request() {
            return; // counted with the call's first round, or with the call that asked
        }
        let day = day_start();
        let agent_key = format!("usage/{}/{}", call.grant.tenant, call.grant.subject);
        let unit = |key: String| Charge {
            key,
            window_start: day,
            amount: 1,
            limit: u64::MAX,
        };
        let mut seen = vec![
            unit(format!("{agent_key}/{}", call.name())),
            unit(agent_key),
        ];
        // Mirror the bundle's charges so the budget plugin's reads see this replica's usage.
        seen.extend(debits.iter().map(|d| Charge {
            key: d.key.clone(),
            window_start: u64::try_from(d.window).unwrap_or(0),
            amount: u64::try_from(d.amount).unwrap_or(0),
            limit: u64::MAX,
        }));
        let _ = self.local_counters.charge_all(&seen);
    }

    fn event_for(&self, call: &ToolCall<'_>, bundle_digest: &str) -> AuditEvent {
        let g = call.grant;
        let mut e = AuditEvent::new(audit::kinds::TOOL_CALL, g.tenant.clone())
            .with_arguments(self.arg_values, call.arguments);
        e.agent_id = g.subject.clone();
        e.tool = call.name().into_owned();
        e.jti = g.jti.clone();
        e.root_jti = g.root_jti.clone();
        e.caveat_count = Some(g.caveat_count as u32);
        e.bundle_digest = bundle_digest.to_owned();
        e.remote_ip = call.remote_ip.clone();
        e.session_id = call.session_id.unwrap_or_default().to_owned();
        e.upstream = call.upstream.unwrap_or_default().to_owned();
        if let Some(r) = call.round {
            e.call_id = Some(r.call_event);
            e.round = Some(r.number);
        }
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

/// A stage's checks, bounded by the call's deadline for all checks: an error or the deadline
/// is that stage failing closed (the future is dropped, abandoning the plugin call).
async fn checks_within<T>(
    metrics: &crate::metrics::Metrics,
    deadline: tokio::time::Instant,
    limit: std::time::Duration,
    stage: Stage,
    checks: impl std::future::Future<Output = Result<T, PluginError>>,
) -> Result<T, Denial> {
    let started = Instant::now();
    let finished = tokio::time::timeout_at(deadline, checks).await;
    metrics.stages.since(stage.into(), started);
    match finished {
        Ok(result) => result.map_err(|error| Denial::CheckFailed { stage, error }),
        Err(_) => Err(Denial::CheckFailed {
            stage,
            error: PluginError::CallDeadline {
                stage,
                deadline_ms: limit.as_millis() as u64,
            },
        }),
    }
}

/// What `check`'s verdict makes of the call: on its way, refused by `deny`, or escalated to a
/// person. The escalation of the check whose question a person approved for this very call
/// (`answered`, see `resumed`) is answered: the call goes on to the next check, which may still
/// refuse it, or escalate a question of its own that nobody has answered yet.
fn decided_by(
    check: &'static str,
    verdict: &Verdict,
    answered: Option<&str>,
    deny: fn(String) -> Denial,
) -> Result<(), Denial> {
    match verdict.kind {
        VerdictKind::Allow => Ok(()),
        VerdictKind::Escalate if answers(answered, check) => Ok(()),
        VerdictKind::Escalate => Err(Denial::Escalated(Escalation::of(check, verdict))),
        VerdictKind::Block => Err(deny(verdict.reason.clone())),
    }
}

/// [`decided_by`], and a step-up the check asks for that the token does not carry is asked of
/// a person, bound to the call: a check of any stage may ask for one.
fn decided_with_step_up(
    check: &'static str,
    verdict: &Verdict,
    stepped_up: bool,
    answered: Option<&str>,
    deny: fn(String) -> Denial,
) -> Result<(), Denial> {
    if verdict.kind == VerdictKind::Allow && verdict.requires_step_up && !stepped_up {
        if answers(answered, check) {
            return Ok(());
        }
        let mut e = Escalation::of(check, verdict);
        e.reason = format!("step-up required: {}", verdict.reason);
        e.requires_step_up = true;
        return Err(Denial::Escalated(e));
    }
    decided_by(check, verdict, answered, deny)
}

/// Whether the checks a call's approval answers (comma-separated) include `check`.
fn answers(answered: Option<&str>, check: &str) -> bool {
    answered.is_some_and(|a| a.split(',').any(|c| c == check))
}

/// The approval mode a policy verdict asked for, if any.
fn mode_of(verdict: &Verdict) -> Option<approvals::Mode> {
    verdict
        .approval_mode
        .as_deref()
        .and_then(|m| approvals::Mode::parse(m).ok())
}

fn day_start() -> u64 {
    (audit::time::now_ms() / 86_400_000 * 86_400) as u64
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

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(kind: VerdictKind, step_up: bool) -> Verdict {
        Verdict {
            kind,
            reason: "why".into(),
            requires_step_up: step_up,
            approval_mode: Some("sync".into()),
        }
    }

    /// Every check's escalation goes to a person, named by its check, and is answered by an
    /// approval of that check's question only; a block stays its check's own refusal even when
    /// approved.
    #[test]
    fn every_checks_escalation_is_a_persons_and_an_approval_answers_it() {
        type Deny = fn(String) -> Denial;
        let cases: [(&'static str, Deny); 3] = [
            ("intent", Denial::Intent),
            ("policy", Denial::Policy),
            ("budget", Denial::Budget),
        ];
        for (check, deny) in cases {
            let escalate = verdict(VerdictKind::Escalate, true);
            match decided_by(check, &escalate, None, deny) {
                Err(Denial::Escalated(e)) => {
                    assert_eq!(e.check, check);
                    assert_eq!(e.reason, "why");
                    assert_eq!(e.approval_mode, Some(approvals::Mode::Sync));
                    // Any stage's check may ask for a step-up.
                    assert!(e.requires_step_up, "{check}");
                }
                other => panic!("{check}: {other:?}"),
            }
            assert!(
                decided_by(check, &escalate, Some(check), deny).is_ok(),
                "{check}"
            );
            let all = Some("intent,policy,budget");
            assert!(decided_by(check, &escalate, all, deny).is_ok(), "{check}");
            for other in ["intent", "policy", "budget"]
                .into_iter()
                .filter(|c| *c != check)
            {
                let e = decided_by(check, &escalate, Some(other), deny);
                assert_eq!(
                    e.map_err(|d| d.check()),
                    Err(check),
                    "{check} after {other}"
                );
            }
            for answered in [None, Some(check)] {
                let block = decided_by(check, &verdict(VerdictKind::Block, false), answered, deny);
                assert_eq!(block.map_err(|d| d.check()), Err(check), "{check}");
            }
            let allow = verdict(VerdictKind::Allow, false);
            assert!(decided_by(check, &allow, None, deny).is_ok());
        }
    }
}
