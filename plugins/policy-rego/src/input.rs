//! The Rego input document of one call, built per evaluation.
//!
//! [`input_document`] is the document's definition, as JSON: `tool`, `kind`, `target`, `args`,
//! `agent_id`, `tenant`, `intent_prompt`, `capability`, `agent`, `usage` and `intent` (when the
//! intent stage produced one). [`input_value`] builds the same document directly as a regorus value, the way
//! the policy sees it, with its keys allocated once per instance ([`InputKeys`]) and only the
//! top-level fields the policy's modules can reach ([`Fields::used_by`]): a field no module
//! names cannot change a decision, so it is not built.
//!
//! This module must never change what a field holds: `input_value` with every field equals
//! `Value::from(input_document(..))` (tested), and a pruned document equals the full one minus
//! the pruned fields.

use intentgate_plugin_sdk::serde_json::{self, Value as Json, json};
use intentgate_plugin_sdk::{IntentRecord, ToolCall};
use regorus::Value;
use regorus::unstable::{Lexer, TokenKind};
use std::collections::BTreeMap;

/// The kind of MCP target a call reaches and its name, from the host's qualified `tool`
/// (`resource:<uri>`, `prompt:<name>`, `completion:prompt:<name>`,
/// `completion:resource:<uri template>`, `sampling:<tool>` / `elicitation:<tool>` for a request
/// the upstream sends the agent while that tool runs; a plain name is a tool). The host never passes a tool
/// whose name starts with one of these prefixes.
pub fn kind_and_target(tool: &str) -> (&'static str, &str) {
    for kind in [
        "resource",
        "prompt",
        "completion",
        "sampling",
        "elicitation",
        "roots",
    ] {
        if let Some(target) = tool
            .strip_prefix(kind)
            .and_then(|rest| rest.strip_prefix(':'))
        {
            return (kind, target);
        }
    }
    ("tool", tool)
}

/// The input document for one call, as JSON (the definition [`input_value`] follows): `tool`,
/// `args`, `agent_id`, `intent` (when the intent stage produced one), `capability`, and the
/// agent's recent usage as `agent.calls_today_for_tool` / `agent.calls_today_total` (also under
/// `usage`); `kind` (`tool`, `resource`, `prompt`, `completion`) and `target` (the tool's name,
/// the resource's URI, the prompt's name, or for a completion `prompt:<name>` /
/// `resource:<uri template>`).
pub fn input_document(call: &ToolCall, intent: Option<&IntentRecord>) -> Json {
    let args: Json = serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}));
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

/// The top-level fields of the input document.
const FIELDS: [&str; 11] = [
    "tool",
    "args",
    "agent_id",
    "tenant",
    "intent_prompt",
    "capability",
    "agent",
    "usage",
    "intent",
    "kind",
    "target",
];

/// Which top-level fields of the input document to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fields(u16);

impl Fields {
    /// Every field.
    pub const ALL: Fields = Fields((1 << FIELDS.len()) - 1);

    fn bit(name: &str) -> Option<u16> {
        FIELDS.iter().position(|f| *f == name).map(|i| 1 << i)
    }

    /// Whether `name` (one of the document's top-level fields) is built.
    pub fn has(self, name: &str) -> bool {
        Self::bit(name).is_some_and(|b| self.0 & b != 0)
    }

    /// The fields the Rego `modules` can reach. The input document is reachable only through
    /// the root reference `input`; every `input` token must be followed by `.field`, else (bare
    /// `input`, `input[key]`, `import input`, `with input as`, a lexing error) every field is
    /// built. Over-approximate by design: an `input` token that is not the root reference
    /// (`x.input`) only adds fields.
    pub fn used_by<'a>(modules: impl IntoIterator<Item = &'a str>) -> Fields {
        let mut used = 0u16;
        for source in modules {
            match fields_in(source) {
                Some(bits) => used |= bits,
                None => return Fields::ALL,
            }
        }
        Fields(used)
    }
}

/// The fields one module names after `input.`, or `None` when it uses `input` another way.
fn fields_in(source: &str) -> Option<u16> {
    let source = regorus::Source::from_contents("policy.rego".into(), source.into()).ok()?;
    let mut lexer = Lexer::new(&source);
    let mut tokens = Vec::new();
    loop {
        let token = lexer.next_token().ok()?;
        if matches!(token.0, TokenKind::Eof) {
            break;
        }
        tokens.push(token);
    }
    let mut used = 0u16;
    for (i, token) in tokens.iter().enumerate() {
        if !matches!(token.0, TokenKind::Ident) || token.1.text() != "input" {
            continue;
        }
        let dot = tokens.get(i + 1)?;
        let field = tokens.get(i + 2)?;
        if !matches!(dot.0, TokenKind::Symbol) || dot.1.text() != "." {
            return None;
        }
        if !matches!(field.0, TokenKind::Ident) {
            return None;
        }
        // A name that is not a field of the document is undefined either way.
        used |= Fields::bit(field.1.text()).unwrap_or(0);
    }
    Some(used)
}

/// The document's keys, allocated once per instance: building the document then costs one
/// reference-count increment per key instead of a string allocation.
pub struct InputKeys {
    top: [Value; FIELDS.len()],
    tenant: Value,
    subject: Value,
    zone: Value,
    step_up_at: Value,
    max_calls: Value,
    max_cents: Value,
    jti: Value,
    root_jti: Value,
    caveat_count: Value,
    id: Value,
    calls_today_for_tool: Value,
    calls_today_total: Value,
    calls_today_tool: Value,
    summary: Value,
    allowed_tools: Value,
    forbidden_tools: Value,
    confidence: Value,
    rationale: Value,
}

impl Default for InputKeys {
    fn default() -> Self {
        let k = Value::from;
        Self {
            top: FIELDS.map(Value::from),
            tenant: k("tenant"),
            subject: k("subject"),
            zone: k("zone"),
            step_up_at: k("step_up_at"),
            max_calls: k("max_calls"),
            max_cents: k("max_cents"),
            jti: k("jti"),
            root_jti: k("root_jti"),
            caveat_count: k("caveat_count"),
            id: k("id"),
            calls_today_for_tool: k("calls_today_for_tool"),
            calls_today_total: k("calls_today_total"),
            calls_today_tool: k("calls_today_tool"),
            summary: k("summary"),
            allowed_tools: k("allowed_tools"),
            forbidden_tools: k("forbidden_tools"),
            confidence: k("confidence"),
            rationale: k("rationale"),
        }
    }
}

fn object<const N: usize>(entries: [(&Value, Value); N]) -> Value {
    Value::from(
        entries
            .into_iter()
            .map(|(key, value)| (key.clone(), value))
            .collect::<BTreeMap<Value, Value>>(),
    )
}

fn string(s: &str) -> Value {
    Value::from(s)
}

fn opt_u64(v: Option<u64>) -> Value {
    v.map_or(Value::Null, Value::from)
}

/// The fields `fields` of [`input_document`], built directly as a regorus value.
pub fn input_value(
    k: &InputKeys,
    fields: Fields,
    call: &ToolCall,
    intent: Option<&IntentRecord>,
) -> Value {
    if !fields.has("args")
        && may_spell_private_number(&call.arguments)
        && converted_args(&call.arguments).is_none()
    {
        // The full document would be undefined: so is this one.
        return Value::Undefined;
    }
    let mut top = BTreeMap::new();
    for (i, key) in k.top.iter().enumerate() {
        if fields.0 & (1 << i) == 0 {
            continue;
        }
        let value = match FIELDS[i] {
            "tool" => string(&call.tool),
            "kind" => string(kind_and_target(&call.tool).0),
            "target" => string(kind_and_target(&call.tool).1),
            "args" => match args(&call.arguments) {
                Some(args) => args,
                None => return Value::Undefined,
            },
            "agent_id" => string(&call.agent_id),
            "tenant" => string(&call.tenant),
            "intent_prompt" => call.intent_prompt.as_deref().map_or(Value::Null, string),
            "capability" => capability(k, call),
            "agent" => object([
                (&k.id, string(&call.agent_id)),
                (
                    &k.calls_today_for_tool,
                    Value::from(call.usage.calls_today_tool),
                ),
                (
                    &k.calls_today_total,
                    Value::from(call.usage.calls_today_total),
                ),
            ]),
            "usage" => object([
                (
                    &k.calls_today_tool,
                    Value::from(call.usage.calls_today_tool),
                ),
                (
                    &k.calls_today_total,
                    Value::from(call.usage.calls_today_total),
                ),
            ]),
            "intent" => match intent {
                Some(intent) => intent_value(k, intent),
                None => continue,
            },
            _ => continue,
        };
        top.insert(key.clone(), value);
    }
    Value::from(top)
}

/// The call's arguments as [`input_document`] holds them, converted: `{}` when they are not
/// JSON; `None` when the conversion fails, which made the whole converted document undefined.
///
/// Parsed straight into a regorus value, except when the text could spell serde_json's private
/// number key (`"$serde_json::private::Number"`, which the conversion of a JSON tree turns into
/// a number, or an error, depending on the tree's key order): then, and on any parse error, it
/// takes the original path (JSON tree, then conversion), so the result is always the same.
fn args(text: &str) -> Option<Value> {
    if !may_spell_private_number(text)
        && let Ok(v) = Value::from_json_str(text)
    {
        return Some(v);
    }
    converted_args(text)
}

/// The original path: a JSON tree, converted.
fn converted_args(text: &str) -> Option<Value> {
    match serde_json::from_str::<Json>(text) {
        Ok(json) => serde_json::from_value::<Value>(json).ok(),
        Err(_) => Some(Value::new_object()),
    }
}

/// A key spelled `$serde_json::private::Number` needs a `$` or an escape.
fn may_spell_private_number(text: &str) -> bool {
    text.contains(['$', '\\'])
}

/// serde_json's private number key, which regorus's conversion reads as "this object is a
/// number" (or as an error): an object holding it turns into another value than the one the
/// tool receives.
pub const PRIVATE_NUMBER_KEY: &str = "$serde_json::private::Number";

/// Whether the arguments hold [`PRIVATE_NUMBER_KEY`] as a key at any depth: the policy would
/// decide on another value than the one forwarded (a number for an object, or an undefined
/// input that a default-allow policy allows), so such a call is refused before evaluation.
pub fn spells_private_number(text: &str) -> bool {
    fn walk(v: &Json) -> bool {
        match v {
            Json::Object(m) => m.iter().any(|(k, v)| k == PRIVATE_NUMBER_KEY || walk(v)),
            Json::Array(a) => a.iter().any(walk),
            _ => false,
        }
    }
    may_spell_private_number(text) && serde_json::from_str::<Json>(text).is_ok_and(|v| walk(&v))
}

fn capability(k: &InputKeys, call: &ToolCall) -> Value {
    let t = &call.token;
    object([
        (&k.subject, string(&t.subject)),
        (&k.tenant, string(&call.tenant)),
        (&k.zone, string(&t.zone)),
        (&k.step_up_at, opt_u64(t.step_up_at)),
        (&k.max_calls, opt_u64(t.max_calls)),
        (&k.max_cents, opt_u64(t.max_cents)),
        (&k.jti, string(&t.jti)),
        (&k.root_jti, string(&t.root_jti)),
        (&k.caveat_count, Value::from(t.caveat_count)),
    ])
}

fn intent_value(k: &InputKeys, intent: &IntentRecord) -> Value {
    let list = |l: &[String]| Value::from(l.iter().map(|t| string(t)).collect::<Vec<_>>());
    // As `serde_json::json!` does: the f32 widened to f64, a non-finite one as null.
    let confidence = Value::from(f64::from(intent.confidence));
    object([
        (&k.summary, string(&intent.summary)),
        (&k.allowed_tools, list(&intent.allowed_tools)),
        (&k.forbidden_tools, list(&intent.forbidden_tools)),
        (&k.confidence, confidence),
        (&k.rationale, string(&intent.rationale)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use intentgate_plugin_sdk::testing::call;

    fn intent(confidence: f32) -> IntentRecord {
        IntentRecord {
            summary: "pay the invoice".into(),
            allowed_tools: vec!["pay".into(), "read_invoice".into()],
            forbidden_tools: vec!["delete_*".into()],
            confidence,
            rationale: "the prompt asks to pay".into(),
        }
    }

    /// Argument texts, the ordinary and the awkward.
    const ARGS: &[&str] = &[
        r#"{}"#,
        r#"{"text":"hello","n":3,"neg":-7,"f":1.5,"big":18446744073709551616,"exp":1e300}"#,
        r#"{"nested":{"a":[1,{"b":null}],"t":true,"s":"é\u00e9\n"},"dup":1,"dup":2}"#,
        r#"[1,2,3]"#,
        r#""just a string""#,
        r#"12"#,
        r#"null"#,
        r#"{"#,
        r#""#,
        r#"{"x":1e400}"#,
        r#"{"$serde_json::private::Number":"12"}"#,
        r#"{"$serde_json::private::Number":"x"}"#,
        r#"{"a":1,"$serde_json::private::Number":"12"}"#,
        r#"{"$serde_json::private::Number":"12","a":1}"#,
        r#"{"\u0024serde_json::private::Number":"12","a":1}"#,
        r#"{"o":{"$serde_json::private::Number":"x"}}"#,
        r#"{"price":"$5","path":"C:\\dir"}"#,
    ];

    fn calls() -> Vec<ToolCall> {
        let mut calls = Vec::new();
        for (i, args) in ARGS.iter().enumerate() {
            let tool = ["pay", "resource:file:///a", "completion:prompt:p"][i % 3];
            let mut c = call(tool)
                .agent("agent-7")
                .tenant("acme")
                .usage(i as u64, 40 + i as u64)
                .build();
            c.arguments = (*args).into();
            if i % 2 == 0 {
                c.token.max_calls = Some(10);
                c.token.step_up_at = Some(500);
                c.intent_prompt = Some("pay invoice 7".into());
            } else {
                c.token.max_cents = Some(u64::MAX);
            }
            calls.push(c);
        }
        calls
    }

    #[test]
    fn the_full_value_is_the_converted_json_document() {
        let k = InputKeys::default();
        for c in calls() {
            for i in [None, Some(intent(0.8)), Some(intent(f32::NAN))] {
                let want = Value::from(input_document(&c, i.as_ref()));
                let got = input_value(&k, Fields::ALL, &c, i.as_ref());
                assert_eq!(got, want, "arguments {}", c.arguments);
                assert_eq!(got.to_json_str().ok(), want.to_json_str().ok());
            }
        }
        // The one argument text that makes the converted document undefined.
        let mut c = call("pay").build();
        c.arguments = r#"{"$serde_json::private::Number":"x"}"#.into();
        assert_eq!(input_value(&k, Fields::ALL, &c, None), Value::Undefined);
    }

    #[test]
    fn a_pruned_value_is_the_full_one_without_the_pruned_fields() {
        let k = InputKeys::default();
        let some = Fields::used_by(["package p\nx if input.tool == input.capability.subject"]);
        for fields in [some, Fields(0), Fields(1 << 1), Fields(1 << 8)] {
            for c in calls() {
                let i = intent(0.5);
                let full = input_value(&k, Fields::ALL, &c, Some(&i));
                let pruned = input_value(&k, fields, &c, Some(&i));
                let Ok(full) = full.as_object() else {
                    assert_eq!(pruned, Value::Undefined, "arguments {}", c.arguments);
                    continue;
                };
                let want: BTreeMap<Value, Value> = full
                    .iter()
                    .filter(|(key, _)| fields.has(key.as_string().map(|s| &**s).unwrap_or("")))
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect();
                assert_eq!(pruned, Value::from(want), "arguments {}", c.arguments);
            }
        }
    }

    fn names(f: Fields) -> Vec<&'static str> {
        FIELDS.iter().copied().filter(|n| f.has(n)).collect()
    }

    #[test]
    fn fields_are_what_the_modules_name_after_input_dot() {
        let used = |src: &str| names(Fields::used_by([src]));
        let token_scope = include_str!("../../../policies/examples/token_scope.rego");
        assert_eq!(used(token_scope), ["tool", "capability"]);
        assert_eq!(
            used(
                "package p\n# input.args in a comment\nx := \"input.usage\" if input . agent.id == 1"
            ),
            ["agent"]
        );
        assert_eq!(
            used("package p\nimport input.intent as i\nx if i.summary"),
            ["intent"]
        );
        assert_eq!(
            used("package p\nx if input.no_such_field"),
            Vec::<&str>::new()
        );
        assert_eq!(used("package p\nx if data.y.input.tool"), ["tool"]);
        // Any other use of `input` reaches every field.
        for src in [
            "package p\nx := input",
            "package p\nx if input[\"tool\"]",
            "package p\nx if { k := \"tool\"; input[k] }",
            "package p\nimport input\nx if input.tool",
            "package p\nx if y with input as {}\ny if input.tool",
            "package p\nx if { some v in input; v }",
            "package p\nx := input",
        ] {
            assert_eq!(Fields::used_by([src]), Fields::ALL, "{src}");
        }
        // Over several modules, the union; one module using all of `input` makes it all.
        assert_eq!(
            names(Fields::used_by([
                "package a\nx if input.tool",
                "package b\ny if input.usage"
            ])),
            ["tool", "usage"]
        );
        assert_eq!(
            Fields::used_by(["package a\nx if input.tool", "package b\ny := input"]),
            Fields::ALL
        );
    }
}
