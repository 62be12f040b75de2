//! The WebAssembly check runtime: one wasmtime engine, components compiled off the hot path,
//! pre-linked (`InstancePre`) and pooled instances, and every call under an epoch deadline and
//! a memory limit.
//!
//! A trap, a timeout, a memory blow-up or a malformed result becomes a typed [`PluginError`]
//! (the caller turns it into a fail-closed decision); the instance is thrown away and the
//! gateway keeps serving. Plugins get only logging, a clock and read-only budget counters: no
//! filesystem, network or environment, and no way to wait in the host. On the request path a
//! call runs asynchronously and yields to the tokio runtime at every epoch tick, so a slow
//! plugin delays only its own call. This module must never decide allow on an error.
//!
//! # Layout
//!
//! | module | what |
//! |---|---|
//! | [`runtime`] | the engine, linkers, limits, epoch ticker, compile cache, world validation |
//! | [`check`] | a compiled check component, and the per-(tenant, bundle, stage) instance pool |
//! | `host_state` | what a plugin may reach: log, clock, counters, an empty WASI context |
//! | [`counters`] | the counters view the budget plugin reads |
//! | [`siem`] | SIEM formatter components |
//! | [`artifacts`] | the built-in and test components built by `build.rs` |
//! | [`scaffold`] | `intentgate plugin new` / `plugin check` |

pub mod artifacts;
mod bindings;
pub mod check;
pub mod counters;
mod host_state;
pub mod runtime;
pub mod scaffold;
pub mod siem;

pub use check::{CheckComponent, CheckPool};
pub use counters::{Counters, MemoryCounters};
pub use runtime::{Limits, Runtime, World};

use serde::{Deserialize, Serialize};
use std::fmt;

use bindings::check::intentgate::plugin::types as wit;

/// The fixed stages of the pipeline that run plugins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Classifies what the agent is trying to do.
    Intent,
    /// The operator's rules (Rego by default).
    Policy,
    /// Ceilings on calls and cost.
    Budget,
    /// A SIEM formatter (not a check stage; used to label its errors).
    Siem,
}

impl Stage {
    /// All stages in pipeline order.
    pub const ALL: [Stage; 3] = [Stage::Intent, Stage::Policy, Stage::Budget];

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Intent => "intent",
            Stage::Policy => "policy",
            Stage::Budget => "budget",
            Stage::Siem => "siem",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a plugin produced no usable answer. Every variant means "deny" to the caller.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PluginError {
    /// The bytes are not a component wasmtime can compile.
    #[error("not a valid WebAssembly component: {0}")]
    InvalidComponent(String),
    /// The component does not implement the expected world (or imports what the host won't give).
    #[error("component does not implement world {world}: {detail}")]
    WrongWorld {
        /// The world that was expected.
        world: &'static str,
        /// What did not match.
        detail: String,
    },
    /// The plugin refused its configuration (or trapped while configuring).
    #[error("{stage} plugin refused its configuration: {message}")]
    Configure {
        /// Stage.
        stage: Stage,
        /// The plugin's message.
        message: String,
    },
    /// No instance could be created (pool exhausted, link failure).
    #[error("{stage} plugin could not be instantiated: {detail}")]
    Instantiate {
        /// Stage.
        stage: Stage,
        /// Why.
        detail: String,
    },
    /// The call ran past its epoch deadline.
    #[error("{stage} plugin exceeded its {deadline_ms} ms deadline")]
    Timeout {
        /// Stage.
        stage: Stage,
        /// The deadline.
        deadline_ms: u64,
    },
    /// The plugin tried to grow its memory beyond the limit.
    #[error("{stage} plugin exceeded its memory limit")]
    OutOfMemory {
        /// Stage.
        stage: Stage,
    },
    /// The plugin trapped.
    #[error("{stage} plugin trapped: {detail}")]
    Trap {
        /// Stage.
        stage: Stage,
        /// The trap.
        detail: String,
    },
    /// The plugin returned something the host does not accept.
    #[error("{stage} plugin returned a malformed result: {detail}")]
    Malformed {
        /// Stage.
        stage: Stage,
        /// What was wrong.
        detail: String,
    },
    /// Every instance slot is in use: shed load rather than wait.
    #[error("plugin capacity exhausted ({0} live instances)")]
    Busy(usize),
    /// The tenant holds as many live instances as it may: its own calls are refused, the other
    /// tenants keep their share of the pool.
    #[error(
        "tenant {tenant} holds {limit} plugin instances, its quota (INTENTGATE_MAX_INSTANCES_PER_TENANT)"
    )]
    TenantQuota {
        /// Tenant.
        tenant: String,
        /// The quota.
        limit: usize,
    },
    /// The checks of one call did not all answer within the call's deadline.
    #[error(
        "the checks of this call missed their {deadline_ms} ms deadline (INTENTGATE_CALL_CHECKS_DEADLINE_MS); the {stage} stage was still running"
    )]
    CallDeadline {
        /// The stage still running.
        stage: Stage,
        /// The deadline.
        deadline_ms: u64,
    },
}

/// The verified capability token as the checks see it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInput {
    /// Token id.
    pub jti: String,
    /// Root token id (revoking it revokes the tree).
    pub root_jti: String,
    /// Subject (the agent).
    pub subject: String,
    /// Zone.
    pub zone: String,
    /// Number of caveats.
    pub caveat_count: u32,
    /// Effective `max_calls` (minimum along the chain).
    pub max_calls: Option<u64>,
    /// Effective `max_cost` in cents (minimum along the chain).
    #[serde(default)]
    pub max_cents: Option<u64>,
    /// `step_up` threshold.
    pub step_up_at: Option<u64>,
}

/// The agent's recent usage; the host fills it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Calls of this tool by this agent today (UTC).
    pub calls_today_tool: u64,
    /// Calls of any tool by this agent today (UTC).
    pub calls_today_total: u64,
}

/// One tool call after the capability check, as every check stage sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckInput {
    /// Tenant.
    pub tenant: String,
    /// The token subject.
    pub agent_id: String,
    /// Tool name.
    pub tool: String,
    /// Arguments as JSON text.
    pub arguments: String,
    /// `X-Intent-Prompt`.
    pub intent_prompt: Option<String>,
    /// The verified token.
    pub token: TokenInput,
    /// Recent usage.
    pub usage: Usage,
}

/// What the intent stage concluded.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IntentRecord {
    /// One-line summary.
    pub summary: String,
    /// Tools that fit the intent (globs).
    pub allowed_tools: Vec<String>,
    /// Tools that contradict it (globs).
    pub forbidden_tools: Vec<String>,
    /// In [0, 1].
    pub confidence: f32,
    /// Why.
    pub rationale: String,
}

/// Verdict kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerdictKind {
    /// Go on.
    Allow,
    /// Stop.
    Block,
    /// Ask a human.
    Escalate,
}

/// One check's verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Allow, block or escalate.
    pub kind: VerdictKind,
    /// Why (bounded length).
    pub reason: String,
    /// A step-up is required.
    pub requires_step_up: bool,
    /// How an escalation is answered, when the check said (`hints.approval-mode`: `sync` or
    /// `async`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_mode: Option<String>,
}

impl Verdict {
    /// An allow.
    pub fn allow(reason: impl Into<String>) -> Self {
        Self {
            kind: VerdictKind::Allow,
            reason: reason.into(),
            requires_step_up: false,
            approval_mode: None,
        }
    }

    /// True for allow.
    pub fn is_allow(&self) -> bool {
        self.kind == VerdictKind::Allow
    }
}

/// A budget charge the pipeline applies (atomically, conditionally) after every check allowed:
/// `counter[key, window_start] + amount <= limit`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Charge {
    /// Counter key, namespaced by tenant (`"<tenant>/<plugin key>"`).
    pub key: String,
    /// Window start, seconds since the Unix epoch (0: no window).
    pub window_start: u64,
    /// Amount to add.
    pub amount: u64,
    /// Ceiling.
    pub limit: u64,
}

/// The intent stage's output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IntentOutcome {
    /// The record handed to the policy stage.
    pub record: IntentRecord,
    /// The intent stage's own verdict.
    pub verdict: Verdict,
}

/// The budget stage's output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetOutcome {
    /// The verdict (a block carries no charges).
    pub verdict: Verdict,
    /// Charges to apply when every check allowed.
    pub charges: Vec<Charge>,
}

/// A check's raw result after validation.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckOutput {
    /// Verdict.
    pub verdict: Verdict,
    /// Intent record (intent stage).
    pub intent: Option<IntentRecord>,
    /// Charges (budget stage), keys not yet namespaced.
    pub charges: Vec<Charge>,
}

impl CheckInput {
    pub(crate) fn to_wit(&self) -> wit::ToolCall {
        wit::ToolCall {
            tenant: self.tenant.clone(),
            agent_id: self.agent_id.clone(),
            tool: self.tool.clone(),
            arguments: self.arguments.clone(),
            intent_prompt: self.intent_prompt.clone(),
            token: wit::TokenInfo {
                jti: self.token.jti.clone(),
                root_jti: self.token.root_jti.clone(),
                subject: self.token.subject.clone(),
                zone: self.token.zone.clone(),
                caveat_count: self.token.caveat_count,
                max_calls: self.token.max_calls,
                max_cents: self.token.max_cents,
                step_up_at: self.token.step_up_at,
            },
            usage: wit::Usage {
                calls_today_tool: self.usage.calls_today_tool,
                calls_today_total: self.usage.calls_today_total,
            },
        }
    }
}

impl IntentRecord {
    pub(crate) fn to_wit(&self) -> wit::IntentRecord {
        wit::IntentRecord {
            summary: self.summary.clone(),
            allowed_tools: self.allowed_tools.clone(),
            forbidden_tools: self.forbidden_tools.clone(),
            confidence: self.confidence,
            rationale: self.rationale.clone(),
        }
    }
}
