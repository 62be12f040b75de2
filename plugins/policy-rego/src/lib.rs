//! Built-in policy check: Rego evaluated by `regorus` inside the component.
//!
//! The Rego source is this check's configuration: it is parsed, compiled (entry point
//! `data.intentgate.policy.decision`) and its tests run once per instance in `configure`, never
//! per call. The decision object is `{allow: bool, reason: string, escalate?: bool,
//! requires_step_up?: bool, approval_mode?: "sync" | "async"}`: `escalate` wins; a missing, undefined or non-boolean `allow` blocks
//! (fail closed).
//!
//! Configuration: either raw Rego text, or JSON
//! `{"modules": {"policy.rego": "..."}, "tests": {"policy_test.rego": "..."}, "data": {...}}`.
//! Tests are rules named `test_*` in the test modules; every one must evaluate to `true`, or the
//! configuration is refused.
//!
//! The input document is defined by [`input::input_document`] and built per call, directly as a
//! regorus value and with only the fields the policy can reach, by [`input::input_value`].

pub mod input;

/// Inside the component: free lists per small size class before dlmalloc (a third of an
/// evaluation went to dlmalloc before).
#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: intentgate_plugin_alloc::SizeClasses =
    intentgate_plugin_alloc::SizeClasses::new();

pub use input::{Fields, InputKeys, input_document, input_value, kind_and_target};
use intentgate_plugin_sdk::serde_json::Value as Json;
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
    /// The input fields the modules can reach.
    fields: Fields,
    keys: InputKeys,
    decision: DecisionKeys,
}

/// The decision object's keys, allocated once.
struct DecisionKeys {
    allow: Value,
    reason: Value,
    escalate: Value,
    requires_step_up: Value,
    approval_mode: Value,
}

impl Default for DecisionKeys {
    fn default() -> Self {
        Self {
            allow: Value::from("allow"),
            reason: Value::from("reason"),
            escalate: Value::from("escalate"),
            requires_step_up: Value::from("requires_step_up"),
            approval_mode: Value::from("approval_mode"),
        }
    }
}

impl Check for Policy {
    fn configure(config: &str) -> Result<Self, String> {
        let config = parse_config(config)?;
        Policy::load(&config)
    }

    fn evaluate(&self, call: &ToolCall, intent: Option<&IntentRecord>) -> CheckResult {
        if input::spells_private_number(&call.arguments) {
            return Verdict::block(format!(
                "the arguments use the key {:?}, which the policy's input cannot hold as sent",
                input::PRIVATE_NUMBER_KEY
            ))
            .into();
        }
        let input = input_value(&self.keys, self.fields, call, intent);
        match self.compiled.eval_with_input(input) {
            Ok(decision) => decide(&self.decision, &decision).into(),
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
        Ok(Self {
            compiled,
            fields: Fields::used_by(config.modules.values().map(String::as_str)),
            keys: InputKeys::default(),
            decision: DecisionKeys::default(),
        })
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
            // Indented heads count too: a test skipped for its indentation would let a
            // policy whose test fails be promoted.
            let Some(rest) = line.trim_start().strip_prefix("test_") else {
                continue;
            };
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let after = rest[name.len()..].trim_start();
            let is_head = after.starts_with("if")
                || after.starts_with('{')
                || after.starts_with(":=")
                || (after.starts_with('=') && !after.starts_with("=="));
            if is_head {
                names.push(format!("{package}.test_{name}"));
            }
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

/// Map a decision value to a verdict, failing closed on anything malformed.
fn decide(k: &DecisionKeys, decision: &Value) -> Verdict {
    let Ok(obj) = decision.as_object() else {
        return Verdict::block("policy produced no decision (deny by default)");
    };
    let reason = match obj.get(&k.reason) {
        Some(Value::String(s)) => s.to_string(),
        _ => String::new(),
    };
    let flag = |key: &Value| matches!(obj.get(key), Some(Value::Bool(true)));
    let step_up = flag(&k.requires_step_up);
    if flag(&k.escalate) {
        // `approval_mode: "sync" | "async"` chooses how this escalation is answered.
        if let Some(Value::String(mode)) = obj.get(&k.approval_mode) {
            intentgate_plugin_sdk::host::approval_mode(mode);
        }
        let v = Verdict::escalate(if reason.is_empty() {
            "policy escalated".into()
        } else {
            reason
        });
        return if step_up { v.with_step_up() } else { v };
    }
    let verdict = match obj.get(&k.allow) {
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
    use intentgate_plugin_sdk::serde_json::json;
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

decision := {"allow": false, "escalate": true, "reason": "wait", "approval_mode": "sync"} if input.tool == "wire"
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
        assert_eq!(
            h.take_approval_mode(),
            None,
            "no mode unless the decision names one"
        );
        let r = h.evaluate(&call("wire").build(), None);
        assert_eq!(r.verdict.kind, VerdictKind::Escalate);
        assert_eq!(h.take_approval_mode().as_deref(), Some("sync"));
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

    /// serde_json's private number key in the arguments would make the policy decide on
    /// another value than the one forwarded (a number for the object, or an undefined input a
    /// default-allow policy allows): such a call is blocked before evaluation.
    #[test]
    fn the_private_number_key_cannot_change_what_the_policy_sees() {
        const OPEN: &str = r#"
package intentgate.policy

default decision := {"allow": true, "reason": "allowed by default"}

decision := {"allow": false, "escalate": true, "reason": "big"} if {
  input.tool == "pay"
  input.args.amount > 100
}

decision := {"allow": false, "reason": "never"} if input.tool == "delete_db"
"#;
        let h = Harness::<Policy>::new(OPEN).expect("configure");
        for (tool, args) in [
            (
                "pay",
                r#"{"amount":5000,"$serde_json::private::Number":"1"}"#,
            ),
            ("delete_db", r#"{"o":{"$serde_json::private::Number":"x"}}"#),
            (
                "delete_db",
                r#"{"o":[{"$serde_json::private::Number":"x"}]}"#,
            ),
        ] {
            let mut c = call(tool).build();
            c.arguments = args.into();
            let r = h.evaluate(&c, None);
            assert_eq!(r.verdict.kind, VerdictKind::Block, "{tool} {args}");
            assert!(
                r.verdict.reason.contains("private::Number"),
                "{}",
                r.verdict.reason
            );
        }
        // A dollar elsewhere is an ordinary key.
        let mut c = call("pay").build();
        c.arguments = r#"{"amount":5000,"$note":"x"}"#.into();
        assert_eq!(h.evaluate(&c, None).verdict.kind, VerdictKind::Escalate);
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
        // An indented failing test is run too, and a reference to a test in a rule's body is
        // not taken for one.
        let indented = json!({"modules": {"p.rego": POLICY}, "tests": {"p_test.rego":
            "package intentgate.policy_test\n\ntest_read if data.intentgate.policy.decision.allow with input as {\"tool\": \"read_invoice\"}\n\n    test_indented if data.intentgate.policy.decision.allow with input as {\"tool\": \"other\"}\n\nboth if {\n    test_read\n}\n"}});
        let err = Harness::<Policy>::new(&indented.to_string())
            .err()
            .expect("the indented test fails");
        assert!(err.contains("test_indented"), "{err}");
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

    /// Every policy shipped in `policies/`, evaluated on a matrix of calls, with the input
    /// pruned to the fields it names and with every field: the verdicts are the same.
    #[test]
    fn pruning_the_input_never_changes_a_verdict() {
        let policies = [
            include_str!("../../../policies/default.rego"),
            include_str!("../../../policies/examples/token_scope.rego"),
            include_str!("../../../policies/examples/runbook.rego"),
            include_str!("../../../policies/examples/intent_aware.rego"),
        ];
        let intent = |allowed: &[&str], forbidden: &[&str], confidence: f32| IntentRecord {
            summary: "s".into(),
            allowed_tools: allowed.iter().map(|t| t.to_string()).collect(),
            forbidden_tools: forbidden.iter().map(|t| t.to_string()).collect(),
            confidence,
            rationale: "r".into(),
        };
        let intents = [
            None,
            Some(intent(&["read_*"], &[], 0.9)),
            Some(intent(&["pay"], &["delete_*"], 0.9)),
            Some(intent(&[], &[], 0.2)),
        ];
        let mut pruned_some = false;
        for source in policies {
            let pruned = Policy::configure(source).expect("loads");
            let mut full = Policy::configure(source).expect("loads");
            full.fields = Fields::ALL;
            pruned_some |= pruned.fields != Fields::ALL;
            for tool in [
                "read_invoice",
                "delete_records",
                "send_email_internal",
                "pay",
                "resource:file:///public/a",
            ] {
                for subject in ["", "agent-1"] {
                    for usage in [0, 49, 50] {
                        for args in [
                            r#"{"amount":500}"#,
                            "not json",
                            r#"{"$serde_json::private::Number":"x"}"#,
                        ] {
                            let mut c = call(tool).usage(usage, usage).build();
                            c.token.subject = subject.into();
                            c.arguments = args.into();
                            for i in &intents {
                                let (a, b) = (
                                    pruned.evaluate(&c, i.as_ref()),
                                    full.evaluate(&c, i.as_ref()),
                                );
                                assert_eq!(
                                    (a.verdict.kind, a.verdict.reason, a.verdict.requires_step_up),
                                    (b.verdict.kind, b.verdict.reason, b.verdict.requires_step_up),
                                    "{tool} {subject:?} {usage} {args} {i:?}\n{source}"
                                );
                            }
                        }
                    }
                }
            }
        }
        assert!(pruned_some);
    }

    /// `policies/examples/token_scope.rego` ends its `else` chain in the denial instead of a
    /// `default` rule (faster in regorus). On any input, of any shape, it decides exactly what
    /// the `default` form did (kept in `tests/token_scope_with_default.rego`).
    #[test]
    fn token_scope_decides_what_its_default_form_decided() {
        let compile = |source: &str| {
            let mut engine = Engine::new();
            engine
                .add_policy("p.rego".into(), source.into())
                .expect("parses");
            engine
                .compile_with_entrypoint(&ENTRYPOINT.into())
                .expect("compiles")
        };
        let now = compile(include_str!("../../../policies/examples/token_scope.rego"));
        let before = compile(include_str!("../tests/token_scope_with_default.rego"));
        let tools = [
            r#""read_invoice""#,
            r#""delete_records""#,
            r#""delete_""#,
            r#""""#,
            "7",
            "null",
            "true",
            r#"["delete_x"]"#,
            r#"{"a":1}"#,
            "undefined",
        ];
        let capabilities = [
            r#"{"subject":"a"}"#,
            r#"{"subject":""}"#,
            r#"{"subject":7}"#,
            r#"{"subject":null}"#,
            "{}",
            "null",
            r#""cap""#,
            "[]",
            "undefined",
        ];
        let mut inputs = vec![
            "null".to_string(),
            "7".into(),
            r#""x""#.into(),
            "[]".into(),
            "{}".into(),
        ];
        for tool in tools {
            for capability in capabilities {
                let mut fields = Vec::new();
                if tool != "undefined" {
                    fields.push(format!(r#""tool":{tool}"#));
                }
                if capability != "undefined" {
                    fields.push(format!(r#""capability":{capability}"#));
                }
                inputs.push(format!("{{{}}}", fields.join(",")));
            }
        }
        // An error is compared by its message, without the source location.
        let outcome = |policy: &CompiledPolicy, input: &Value| {
            policy.eval_with_input(input.clone()).map_err(|e| {
                let e = e.to_string();
                e.rsplit("error: ").next().unwrap_or_default().to_string()
            })
        };
        for input in &inputs {
            let input = Value::from_json_str(input).expect("json");
            assert_eq!(
                outcome(&now, &input),
                outcome(&before, &input),
                "input {input}"
            );
        }
        assert_eq!(
            outcome(&now, &Value::Undefined),
            outcome(&before, &Value::Undefined)
        );
    }

    /// The Rego tests beside each shipped policy pass against it, and fail against a policy
    /// that allows everything (so they test something).
    #[test]
    fn shipped_policies_pass_their_rego_tests() {
        let cases = [
            (
                include_str!("../../../policies/default.rego"),
                include_str!("../../../policies/default_test.rego"),
            ),
            (
                include_str!("../../../policies/examples/token_scope.rego"),
                include_str!("../../../policies/examples/token_scope_test.rego"),
            ),
            (
                include_str!("../../../policies/examples/runbook.rego"),
                include_str!("../../../policies/examples/runbook_test.rego"),
            ),
            (
                include_str!("../../../policies/examples/intent_aware.rego"),
                include_str!("../../../policies/examples/intent_aware_test.rego"),
            ),
        ];
        let wrong =
            "package intentgate.policy\n\ndecision := {\"allow\": true, \"reason\": \"x\"}\n";
        for (module, tests) in cases {
            let config = |module: &str| {
                json!({"modules": {"p.rego": module}, "tests": {"p_test.rego": tests}}).to_string()
            };
            if let Err(e) = Harness::<Policy>::new(&config(module)) {
                panic!("{e}\n{module}");
            }
            let err = Harness::<Policy>::new(&config(wrong))
                .err()
                .expect("must fail");
            assert!(err.contains("Rego tests failed"), "{err}");
        }
    }
}
