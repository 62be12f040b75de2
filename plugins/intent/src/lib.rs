//! Built-in intent check: turns the agent's `X-Intent-Prompt` and the call into an intent record
//! (summary, allowed and forbidden tools, confidence, rationale) using keyword rules from its
//! configuration, and a verdict on whether the call fits that intent.
//!
//! It never calls out (no model, no network): classification is deterministic and microseconds.
//!
//! Configuration (JSON, every field optional):
//! ```json
//! {"rules": [{"name": "invoices", "keywords": ["invoice", "billing"], "summary": "invoice work",
//!             "allowed_tools": ["read_invoice"], "forbidden_tools": ["delete_*"], "confidence": 0.9}],
//!  "require_prompt": false, "on_forbidden": "block", "on_outside_allowed": "allow",
//!  "min_confidence": 0.5}
//! ```

/// Inside the component: free lists per small size class before dlmalloc.
#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: intentgate_plugin_alloc::SizeClasses =
    intentgate_plugin_alloc::SizeClasses::new();

use intentgate_plugin_sdk::{Check, CheckResult, IntentRecord, ToolCall, Verdict, glob_match};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    rules: Vec<Rule>,
    #[serde(default)]
    require_prompt: bool,
    #[serde(default = "block")]
    on_forbidden: Action,
    #[serde(default = "allow")]
    on_outside_allowed: Action,
    #[serde(default = "half")]
    min_confidence: f32,
}

fn block() -> Action {
    Action::Block
}
fn allow() -> Action {
    Action::Allow
}
fn half() -> f32 {
    0.5
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum Action {
    Allow,
    Block,
    Escalate,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    name: String,
    keywords: Vec<String>,
    #[serde(default)]
    summary: Option<String>,
    #[serde(default)]
    allowed_tools: Vec<String>,
    #[serde(default)]
    forbidden_tools: Vec<String>,
    #[serde(default = "default_confidence")]
    confidence: f32,
}

/// The gateway's bounds on an intent record (`host/src/plugins/check.rs`).
const MAX_TOOLS: usize = 256;
const MAX_TOOL_BYTES: usize = 256;
const MAX_SUMMARY_BYTES: usize = 1024;

fn default_confidence() -> f32 {
    0.9
}

struct Intent {
    config: Config,
}

impl Check for Intent {
    fn configure(config: &str) -> Result<Self, String> {
        let config: Config = if config.trim().is_empty() {
            Config {
                rules: Vec::new(),
                require_prompt: false,
                on_forbidden: Action::Block,
                on_outside_allowed: Action::Allow,
                min_confidence: 0.5,
            }
        } else {
            serde_json::from_str(config).map_err(|e| format!("intent configuration: {e}"))?
        };
        if !(0.0..=1.0).contains(&config.min_confidence) {
            return Err("min_confidence must be in [0, 1]".into());
        }
        for rule in &config.rules {
            if rule.keywords.is_empty() {
                return Err(format!("intent rule {:?} has no keywords", rule.name));
            }
            if !(0.0..=1.0).contains(&rule.confidence) {
                return Err(format!(
                    "intent rule {:?}: confidence must be in [0, 1]",
                    rule.name
                ));
            }
            // The gateway refuses an intent record past these bounds: a rule that could only
            // produce such a record would fail every call it matches, so it is refused here.
            let lists = [&rule.allowed_tools, &rule.forbidden_tools];
            if lists
                .iter()
                .any(|l| l.len() > MAX_TOOLS || l.iter().any(|t| t.len() > MAX_TOOL_BYTES))
            {
                return Err(format!(
                    "intent rule {:?}: at most {MAX_TOOLS} allowed and forbidden tools, each at most {MAX_TOOL_BYTES} bytes",
                    rule.name
                ));
            }
            if rule
                .summary
                .as_ref()
                .is_some_and(|s| s.len() > MAX_SUMMARY_BYTES)
            {
                return Err(format!(
                    "intent rule {:?}: summary longer than {MAX_SUMMARY_BYTES} bytes",
                    rule.name
                ));
            }
        }
        Ok(Self { config })
    }

    fn evaluate(&self, call: &ToolCall, _intent: Option<&IntentRecord>) -> CheckResult {
        let prompt = call.intent_prompt.as_deref().unwrap_or("").trim();
        if prompt.is_empty() && self.config.require_prompt {
            let record = IntentRecord {
                summary: "no intent given".into(),
                allowed_tools: vec![],
                forbidden_tools: vec![],
                confidence: 0.0,
                rationale: "X-Intent-Prompt is required by configuration".into(),
            };
            return CheckResult::from(Verdict::block("intent prompt required")).with_intent(record);
        }
        let (record, rule) = self.classify(prompt);
        let verdict = match rule {
            None => Verdict::allow("no intent rule matched; left to policy"),
            Some(_)
                if record
                    .forbidden_tools
                    .iter()
                    .any(|g| glob_match(g, &call.tool)) =>
            {
                verdict(
                    self.config.on_forbidden,
                    format!(
                        "tool {} is forbidden for intent \"{}\"",
                        call.tool, record.summary
                    ),
                )
            }
            Some(_)
                if !record.allowed_tools.is_empty()
                    && !record
                        .allowed_tools
                        .iter()
                        .any(|g| glob_match(g, &call.tool))
                    && record.confidence >= self.config.min_confidence =>
            {
                verdict(
                    self.config.on_outside_allowed,
                    format!(
                        "tool {} is outside intent \"{}\"",
                        call.tool, record.summary
                    ),
                )
            }
            Some(_) => Verdict::allow(format!("consistent with intent \"{}\"", record.summary)),
        };
        CheckResult::from(verdict).with_intent(record)
    }
}

fn verdict(action: Action, reason: String) -> Verdict {
    match action {
        Action::Allow => Verdict::allow(reason),
        Action::Block => Verdict::block(reason),
        Action::Escalate => Verdict::escalate(reason),
    }
}

impl Intent {
    /// Pick the rule with the most keyword hits (first wins ties).
    fn classify(&self, prompt: &str) -> (IntentRecord, Option<&Rule>) {
        let lower = prompt.to_lowercase();
        let mut best: Option<(&Rule, usize)> = None;
        for rule in &self.config.rules {
            let hits = rule
                .keywords
                .iter()
                .filter(|k| lower.contains(&k.to_lowercase()))
                .count();
            if hits > 0 && best.is_none_or(|(_, h)| hits > h) {
                best = Some((rule, hits));
            }
        }
        match best {
            None => (
                IntentRecord {
                    summary: if prompt.is_empty() {
                        "no intent given".into()
                    } else {
                        "unclassified".into()
                    },
                    allowed_tools: vec![],
                    forbidden_tools: vec![],
                    confidence: 0.0,
                    rationale: "no rule keyword found in the prompt".into(),
                },
                None,
            ),
            Some((rule, hits)) => {
                let share = hits as f32 / rule.keywords.len() as f32;
                let confidence = (rule.confidence * (0.5 + 0.5 * share)).clamp(0.0, 1.0);
                let matched: Vec<&str> = rule
                    .keywords
                    .iter()
                    .filter(|k| lower.contains(&k.to_lowercase()))
                    .map(String::as_str)
                    .collect();
                (
                    IntentRecord {
                        summary: rule.summary.clone().unwrap_or_else(|| rule.name.clone()),
                        allowed_tools: rule.allowed_tools.clone(),
                        forbidden_tools: rule.forbidden_tools.clone(),
                        confidence,
                        rationale: format!("rule {} matched keywords {:?}", rule.name, matched),
                    },
                    Some(rule),
                )
            }
        }
    }
}

intentgate_plugin_sdk::export_check!(Intent);

#[cfg(test)]
mod tests {
    use super::*;
    use intentgate_plugin_sdk::VerdictKind;
    use intentgate_plugin_sdk::testing::{Harness, call};

    const CONFIG: &str = r#"{"rules": [{"name": "invoices", "keywords": ["invoice", "billing"],
        "summary": "invoice work", "allowed_tools": ["read_invoice", "send_email_internal"],
        "forbidden_tools": ["delete_*"]}], "on_outside_allowed": "escalate"}"#;

    #[test]
    fn classifies_and_judges() {
        let h = Harness::<Intent>::new(CONFIG).expect("configure");
        let r = h.evaluate(
            &call("read_invoice")
                .prompt("Summarize the March invoice")
                .build(),
            None,
        );
        assert_eq!(r.verdict.kind, VerdictKind::Allow);
        let intent = r.intent.expect("intent");
        assert_eq!(intent.summary, "invoice work");
        assert!(intent.confidence > 0.5);
        let r = h.evaluate(
            &call("delete_invoice").prompt("invoice cleanup").build(),
            None,
        );
        assert_eq!(r.verdict.kind, VerdictKind::Block);
        let r = h.evaluate(
            &call("transfer_funds").prompt("invoice and billing").build(),
            None,
        );
        assert_eq!(r.verdict.kind, VerdictKind::Escalate);
        let r = h.evaluate(&call("transfer_funds").prompt("weather").build(), None);
        assert_eq!(r.verdict.kind, VerdictKind::Allow);
        assert_eq!(r.intent.expect("intent").summary, "unclassified");
    }

    #[test]
    fn bad_configuration_is_refused() {
        assert!(Harness::<Intent>::new("{\"rules\": 3}").is_err());
        assert!(Harness::<Intent>::new(r#"{"rules":[{"name":"x","keywords":[]}]}"#).is_err());
        assert!(Harness::<Intent>::new("").is_ok());
        // What the gateway would refuse in every record the rule makes is refused at once.
        assert!(Harness::<Intent>::new(r#"{"min_confidence": 1.5}"#).is_err());
        let many: Vec<String> = (0..300).map(|n| format!("t{n}")).collect();
        let too_many = serde_json::json!({"rules": [{"name": "x", "keywords": ["k"],
                                                      "allowed_tools": many}]});
        assert!(Harness::<Intent>::new(&too_many.to_string()).is_err());
        let long = serde_json::json!({"rules": [{"name": "x", "keywords": ["k"],
                                                  "summary": "s".repeat(2000)}]});
        assert!(Harness::<Intent>::new(&long.to_string()).is_err());
    }
}
