//! A native test harness: run a [`Check`] in `cargo test` with a fake clock, fake counters and
//! captured logs, exactly as the gateway would call it (configure once, evaluate per call).
//!
//! It never talks to a real gateway and is not compiled into components.

use crate::host::Level;
use crate::{Check, CheckResult, IntentRecord, TokenInfo, ToolCall, Usage};
use std::cell::RefCell;
use std::collections::HashMap;

#[derive(Default)]
pub(crate) struct HarnessState {
    pub(crate) now_ms: u64,
    pub(crate) counters: HashMap<(String, u64), u64>,
    pub(crate) logs: Vec<(Level, String)>,
    pub(crate) approval_mode: Option<String>,
}

thread_local! {
    pub(crate) static STATE: RefCell<HarnessState> = RefCell::new(HarnessState::default());
}

/// A configured check plus the fake host around it (per test thread).
pub struct Harness<T: Check> {
    check: T,
}

impl<T: Check> Harness<T> {
    /// Configure the check as the gateway would, resetting the fake host.
    pub fn new(config: &str) -> Result<Self, String> {
        STATE.with(|s| {
            *s.borrow_mut() = HarnessState {
                now_ms: 1_700_000_000_000,
                ..Default::default()
            }
        });
        Ok(Self {
            check: T::configure(config)?,
        })
    }

    /// What the check last told the host through [`crate::host::approval_mode`] (taken).
    pub fn take_approval_mode(&self) -> Option<String> {
        STATE.with(|s| s.borrow_mut().approval_mode.take())
    }

    /// Set the host clock (ms since the Unix epoch).
    pub fn set_now_ms(&self, now_ms: u64) -> &Self {
        STATE.with(|s| s.borrow_mut().now_ms = now_ms);
        self
    }

    /// Set a host counter.
    pub fn set_counter(&self, key: &str, window_start: u64, value: u64) -> &Self {
        STATE.with(|s| {
            s.borrow_mut()
                .counters
                .insert((key.to_string(), window_start), value)
        });
        self
    }

    /// Apply charges the way the gateway does after every check allowed: conditionally.
    /// Returns false (and applies nothing) when any charge would exceed its limit.
    pub fn apply_charges(&self, result: &CheckResult) -> bool {
        STATE.with(|s| {
            let mut s = s.borrow_mut();
            let fits = result.charges.iter().all(|c| {
                let current = s
                    .counters
                    .get(&(c.key.clone(), c.window_start))
                    .copied()
                    .unwrap_or(0);
                current.saturating_add(c.amount) <= c.limit
            });
            if fits {
                for c in &result.charges {
                    *s.counters
                        .entry((c.key.clone(), c.window_start))
                        .or_insert(0) += c.amount;
                }
            }
            fits
        })
    }

    /// Evaluate one call.
    pub fn evaluate(&self, call: &ToolCall, intent: Option<&IntentRecord>) -> CheckResult {
        self.check.evaluate(call, intent)
    }

    /// The log lines written so far.
    pub fn logs(&self) -> Vec<(Level, String)> {
        STATE.with(|s| s.borrow().logs.clone())
    }
}

/// Build a [`ToolCall`] for tests: `call("send_email").arg("to", "a@b").prompt("...").build()`.
pub fn call(tool: &str) -> CallBuilder {
    CallBuilder {
        call: ToolCall {
            tenant: "default".into(),
            agent_id: "agent-test".into(),
            tool: tool.into(),
            arguments: "{}".into(),
            intent_prompt: None,
            token: TokenInfo {
                jti: "jti-test".into(),
                root_jti: "jti-test".into(),
                subject: "agent-test".into(),
                zone: "default".into(),
                caveat_count: 1,
                max_calls: None,
                max_cents: None,
                step_up_at: None,
            },
            usage: Usage {
                calls_today_tool: 0,
                calls_today_total: 0,
            },
        },
        args: serde_json::Map::new(),
    }
}

/// See [`call`].
pub struct CallBuilder {
    call: ToolCall,
    args: serde_json::Map<String, serde_json::Value>,
}

impl CallBuilder {
    /// Add one argument.
    pub fn arg(mut self, name: &str, value: impl Into<serde_json::Value>) -> Self {
        self.args.insert(name.into(), value.into());
        self
    }

    /// Set the intent prompt.
    pub fn prompt(mut self, prompt: &str) -> Self {
        self.call.intent_prompt = Some(prompt.into());
        self
    }

    /// Set tenant.
    pub fn tenant(mut self, tenant: &str) -> Self {
        self.call.tenant = tenant.into();
        self
    }

    /// Set the agent (token subject).
    pub fn agent(mut self, agent: &str) -> Self {
        self.call.agent_id = agent.into();
        self.call.token.subject = agent.into();
        self
    }

    /// Set the token's effective max_calls.
    pub fn max_calls(mut self, max_calls: u64) -> Self {
        self.call.token.max_calls = Some(max_calls);
        self
    }

    /// Set the token's effective max_cents (its `max_cost` caveat).
    pub fn max_cents(mut self, max_cents: u64) -> Self {
        self.call.token.max_cents = Some(max_cents);
        self
    }

    /// Set the root token id (children of one root share it, and its per-token counters).
    pub fn root_jti(mut self, root_jti: &str) -> Self {
        self.call.token.root_jti = root_jti.into();
        self
    }

    /// Set usage counters.
    pub fn usage(mut self, calls_today_tool: u64, calls_today_total: u64) -> Self {
        self.call.usage = Usage {
            calls_today_tool,
            calls_today_total,
        };
        self
    }

    /// Finish.
    pub fn build(mut self) -> ToolCall {
        self.call.arguments = serde_json::Value::Object(self.args).to_string();
        self.call
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Verdict, VerdictKind};

    struct DenyDeletes {
        prefix: String,
    }

    impl Check for DenyDeletes {
        fn configure(config: &str) -> Result<Self, String> {
            if config.is_empty() {
                return Err("empty config".into());
            }
            Ok(Self {
                prefix: config.to_string(),
            })
        }

        fn evaluate(&self, call: &ToolCall, _intent: Option<&IntentRecord>) -> CheckResult {
            crate::host::log(Level::Info, &format!("checking {}", call.tool));
            if call.tool.starts_with(&self.prefix) {
                Verdict::block("deletes are off").with_step_up().into()
            } else {
                Verdict::allow(format!("at {}", crate::host::now_unix_ms())).into()
            }
        }
    }

    #[test]
    fn harness_configures_evaluates_and_captures_logs() {
        assert!(Harness::<DenyDeletes>::new("").is_err());
        let h = Harness::<DenyDeletes>::new("delete_").expect("configure");
        h.set_now_ms(42);
        let r = h.evaluate(&call("delete_user").arg("id", 7).build(), None);
        assert_eq!(r.verdict.kind, VerdictKind::Block);
        assert!(r.verdict.requires_step_up);
        let r = h.evaluate(&call("read_user").build(), None);
        assert!(r.verdict.is_allow());
        assert_eq!(r.verdict.reason, "at 42");
        assert_eq!(h.logs().len(), 2);
    }

    #[test]
    fn globs() {
        assert!(crate::glob_match("delete_*", "delete_user"));
        assert!(crate::glob_match("*", ""));
        assert!(crate::glob_match("a?c", "abc"));
        assert!(!crate::glob_match("delete_*", "read_user"));
        assert!(crate::glob_match("*_internal", "send_email_internal"));
    }

    #[test]
    fn typed_arguments() {
        let c = call("t").arg("n", 3).arg("s", "x").build();
        assert_eq!(c.arg::<u32>("n"), Some(3));
        assert_eq!(c.arg_str("s").as_deref(), Some("x"));
        assert_eq!(c.arg_str("n"), None);
    }

    #[test]
    fn charges_apply_conditionally() {
        let h = Harness::<DenyDeletes>::new("x").expect("configure");
        let charge = crate::Charge {
            key: "k".into(),
            window_start: 0,
            amount: 1,
            limit: 2,
        };
        let r = CheckResult::from(Verdict::allow("ok")).with_charges(vec![charge]);
        assert!(h.apply_charges(&r));
        assert!(h.apply_charges(&r));
        assert!(!h.apply_charges(&r));
    }
}
