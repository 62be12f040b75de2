//! Built-in policy check: Rego evaluated by `regorus` inside the component.
//!
//! The Rego source is this check's configuration: it is parsed, compiled (entry point
//! `data.intentgate.policy.decision`) and its tests run once per instance in `configure`, never
//! per call. The decision object is `{allow: bool, reason: string, escalate?: bool,
//! requires_step_up?: bool}`: `escalate` wins; a missing, undefined or non-boolean `allow` blocks
//! (fail closed).
//!
//! Configuration: either raw Rego text, or JSON
//! `{"modules": {"policy.rego": "..."}, "tests": {"policy_test.rego": "..."}, "data": {...}}`.
//! Tests are rules named `test_*` in the test modules; every one must evaluate to `true`, or the
//! configuration is refused.
//!
//! The input document (see WIRE.md) is built by [`input_document`].

use intentgate_plugin_sdk::serde_json::{Value as Json, json};
use intentgate_plugin_sdk::{Check, CheckResult, IntentRecord, ToolCall, Verdict};
use regorus::{CompiledPolicy, Engine, Value};
use serde::Deserialize;
use std::collections::BTreeMap;

/// Where the decision lives.
pub const ENTRYPOINT: &str = "data.intentgate.policy.decision";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    modules: BTreeMap<String, String>,
    #[serde(default)]
    tests: BTreeMap<String, String>,
    #[serde(default)]
    data: Option<Json>,
}

/// The loaded policy.
pub struct Policy {
    compiled: CompiledPolicy,
}

impl Check for Policy {
    fn configure(config: &str) -> Result<Self, String> {
        let config = parse_config(config)?;
        Policy::load(&config)
    }

    fn evaluate(&self, call: &ToolCall, intent: Option<&IntentRecord>) -> CheckResult {
        // Straight from the JSON tree: printing it and parsing the text again cost more than
        // the evaluation itself.
        let input = Value::from(input_document(call, intent));
        match self.compiled.eval_with_input(input) {
            Ok(decision) => decide(&decision).into(),
            Err(e) => Verdict::block(format!("policy evaluation failed: {e}")).into(),
        }
    }
}

fn parse_config(config: &str) -> Result<Config, String> {
    let trimmed = config.trim_start();
    if trimmed.starts_with('{') {
        let config: Config = intentgate_plugin_sdk::serde_json::from_str(config)
            .map_err(|e| format!("policy configuration: {e}"))?;
        if config.modules.is_empty() {
            return Err("policy configuration has no Rego modules".into());
        }
        Ok(config)
    } else {
        Ok(Config {
            modules: BTreeMap::from([("policy.rego".to_string(), config.to_string())]),
            tests: BTreeMap::new(),
            data: None,
        })
    }
}

impl Policy {
    fn load(config: &Config) -> Result<Self, String> {
        let mut engine = Engine::new();
        for (name, source) in &config.modules {
            engine
                .add_policy(name.clone(), source.clone())
                .map_err(|e| format!("{name}: {e}"))?;
        }
        if let Some(data) = &config.data {
            let data = Value::from_json_str(&data.to_string()).map_err(|e| format!("data: {e}"))?;
            engine.add_data(data).map_err(|e| format!("data: {e}"))?;
        }
        if !config.tests.is_empty() {
            run_tests(engine.clone(), &config.tests)?;
        }
        let entry: regorus::Rc<str> = ENTRYPOINT.into();
        let compiled = engine
            .compile_with_entrypoint(&entry)
            .map_err(|e| format!("compiling {ENTRYPOINT}: {e}"))?;
        Ok(Self { compiled })
    }
}

/// Run every `test_*` rule of the test modules; all must be `true`.
fn run_tests(mut engine: Engine, tests: &BTreeMap<String, String>) -> Result<(), String> {
    let mut names = Vec::new();
    for (file, source) in tests {
        let package = engine
            .add_policy(file.clone(), source.clone())
            .map_err(|e| format!("{file}: {e}"))?;
        for line in source.lines() {
            let Some(rest) = line.strip_prefix("test_") else {
                continue;
            };
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            names.push(format!("{package}.test_{name}"));
        }
    }
    if names.is_empty() {
        return Err("test modules define no test_ rules".into());
    }
    names.dedup();
    let mut failed = Vec::new();
    for rule in &names {
        match engine.eval_rule(rule.clone()) {
            Ok(Value::Bool(true)) => {}
            Ok(other) => failed.push(format!(
                "{rule} = {}",
                other.to_json_str().unwrap_or_default()
            )),
            Err(e) => failed.push(format!("{rule}: {e}")),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("Rego tests failed: {}", failed.join("; ")))
    }
}

/// The kind of MCP target a call reaches and its name, from the host's qualified `tool`
/// (`resource:<uri>`, `prompt:<name>`, `completion:prompt:<name>`,
/// `completion:resource:<uri template>`; a plain name is a tool). The host never passes a tool
/// whose name starts with one of these prefixes.
pub fn kind_and_target(tool: &str) -> (&'static str, &str) {
    for kind in ["resource", "prompt", "completion"] {
        if let Some(target) = tool
            .strip_prefix(kind)
            .and_then(|rest| rest.strip_prefix(':'))
        {
            return (kind, target);
        }
    }
    ("tool", tool)
}

/// The Rego input document for one call (WIRE.md): `tool`, `args`, `agent_id`, `intent`
/// (when the intent stage produced one), `capability`, and the agent's recent usage as
/// `agent.calls_today_for_tool` / `agent.calls_today_total` (also under `usage`); `kind`
/// (`tool`, `resource`, `prompt`, `completion`) and `target` (the tool's name, the resource's
/// URI, the prompt's name, or for a completion `prompt:<name>` / `resource:<uri template>`).
pub fn input_document(call: &ToolCall, intent: Option<&IntentRecord>) -> Json {
    let args: Json =
        intentgate_plugin_sdk::serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}));
    let (kind, target) = kind_and_target(&call.tool);
    let mut input = json!({
        "tool": call.tool,
        "kind": kind,
        "target": target,
        "args": args,
        "agent_id": call.agent_id,
        "tenant": call.tenant,
        "intent_prompt": call.intent_prompt,
        "capability": {
            "subject": call.token.subject,
            "tenant": call.tenant,
            "zone": call.token.zone,
            "step_up_at": call.token.step_up_at,
            "max_calls": call.token.max_calls,
            "max_cents": call.token.max_cents,
            "jti": call.token.jti,
            "root_jti": call.token.root_jti,
            "caveat_count": call.token.caveat_count,
        },
        "agent": {
            "id": call.agent_id,
            "calls_today_for_tool": call.usage.calls_today_tool,
            "calls_today_total": call.usage.calls_today_total,
        },
        "usage": {
            "calls_today_tool": call.usage.calls_today_tool,
            "calls_today_total": call.usage.calls_today_total,
        },
    });
    if let (Some(intent), Some(obj)) = (intent, input.as_object_mut()) {
        obj.insert(
            "intent".into(),
            json!({
                "summary": intent.summary,
                "allowed_tools": intent.allowed_tools,
                "forbidden_tools": intent.forbidden_tools,
                "confidence": intent.confidence,
                "rationale": intent.rationale,
            }),
        );
    }
    input
}

/// Map a decision value to a verdict, failing closed on anything malformed.
fn decide(decision: &Value) -> Verdict {
    let Ok(obj) = decision.as_object() else {
        return Verdict::block("policy produced no decision (deny by default)");
    };
    let field = |name: &str| obj.get(&Value::from(name));
    let reason = match field("reason") {
        Some(Value::String(s)) => s.to_string(),
        _ => String::new(),
    };
    let flag = |name: &str| matches!(field(name), Some(Value::Bool(true)));
    let step_up = flag("requires_step_up");
    if flag("escalate") {
        let v = Verdict::escalate(if reason.is_empty() {
            "policy escalated".into()
        } else {
            reason
        });
        return if step_up { v.with_step_up() } else { v };
    }
    let verdict = match field("allow") {
        Some(Value::Bool(true)) => Verdict::allow(if reason.is_empty() {
            "allowed by policy".into()
        } else {
            reason
        }),
        Some(Value::Bool(false)) => Verdict::block(if reason.is_empty() {
            "denied by policy".into()
        } else {
            reason
        }),
        _ => Verdict::block("policy decision has no boolean allow (fail closed)"),
    };
    if step_up {
        verdict.with_step_up()
    } else {
        verdict
    }
}

intentgate_plugin_sdk::export_check!(Policy);

#[cfg(test)]
mod tests {
    use super::*;
    use intentgate_plugin_sdk::VerdictKind;
    use intentgate_plugin_sdk::testing::{Harness, call};

    const POLICY: &str = r#"
package intentgate.policy

default decision := {"allow": false, "reason": "denied by default"}

decision := {"allow": true, "reason": "read"} if input.tool == "read_invoice"

decision := {"allow": false, "escalate": true, "reason": "big", "requires_step_up": true} if {
  input.tool == "pay"
  input.args.amount > 100
}

decision := {"allow": "yes"} if input.tool == "weird"
"#;

    #[test]
    fn decisions() {
        let h = Harness::<Policy>::new(POLICY).expect("configure");
        assert_eq!(
            h.evaluate(&call("read_invoice").build(), None).verdict.kind,
            VerdictKind::Allow
        );
        let r = h.evaluate(&call("pay").arg("amount", 500).build(), None);
        assert_eq!(r.verdict.kind, VerdictKind::Escalate);
        assert!(r.verdict.requires_step_up);
        let r = h.evaluate(&call("other").build(), None);
        assert_eq!(
            (r.verdict.kind, r.verdict.reason.as_str()),
            (VerdictKind::Block, "denied by default")
        );
        assert_eq!(
            h.evaluate(&call("weird").build(), None).verdict.kind,
            VerdictKind::Block
        );
    }

    #[test]
    fn tests_run_at_configure() {
        let ok = json!({"modules": {"p.rego": POLICY}, "tests": {"p_test.rego":
            "package intentgate.policy_test\n\ntest_read if data.intentgate.policy.decision.allow with input as {\"tool\": \"read_invoice\"}\n"}});
        assert!(Harness::<Policy>::new(&ok.to_string()).is_ok());
        let bad = json!({"modules": {"p.rego": POLICY}, "tests": {"p_test.rego":
            "package intentgate.policy_test\n\ntest_other if data.intentgate.policy.decision.allow with input as {\"tool\": \"other\"}\n"}});
        let err = Harness::<Policy>::new(&bad.to_string())
            .err()
            .expect("must fail");
        assert!(err.contains("test_other"), "{err}");
    }

    #[test]
    fn kinds_reach_the_policy_input() {
        const KINDS: &str = r#"
package intentgate.policy

default decision := {"allow": false, "reason": "denied by default"}

decision := {"allow": true, "reason": "public resource"} if {
  input.kind == "resource"
  startswith(input.target, "file:///public/")
}

decision := {"allow": true, "reason": "prompt"} if {
  input.kind == "prompt"
  input.target == "summarize"
}
"#;
        let h = Harness::<Policy>::new(KINDS).expect("configure");
        let kind = |tool: &str| h.evaluate(&call(tool).build(), None).verdict.kind;
        assert_eq!(kind("resource:file:///public/a"), VerdictKind::Allow);
        assert_eq!(kind("resource:file:///etc/passwd"), VerdictKind::Block);
        assert_eq!(kind("prompt:summarize"), VerdictKind::Allow);
        assert_eq!(kind("completion:prompt:summarize"), VerdictKind::Block);
        // A tool named like the URI is a tool, not a resource.
        assert_eq!(kind("file:///public/a"), VerdictKind::Block);
        assert_eq!(kind_and_target("read_invoice"), ("tool", "read_invoice"));
        assert_eq!(
            kind_and_target("completion:resource:db://{t}"),
            ("completion", "resource:db://{t}")
        );
    }

    #[test]
    fn syntax_errors_are_refused() {
        assert!(Harness::<Policy>::new("package x\n decision := {").is_err());
    }
}
