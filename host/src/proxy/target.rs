//! The target of a `resources/read`, `resources/subscribe`, `prompts/get` or
//! `completion/complete` (either revision), decoded from the request body into what the
//! pipeline decides: its kind, its name or URI, and the arguments the checks see.
//!
//! The arguments the checks see are `{"operation": "read" | "subscribe"}` for a resource, the
//! prompt's arguments for a prompt, and `{"ref", "argument", "context"}` for a completion; the
//! body forwarded upstream holds only these members and `_meta` (`methods::renamed`), so what
//! is forwarded is what was decided.
//! This module only decodes; it must never accept a target it cannot name (a missing, empty or
//! non-string name or URI is `-32602`).

use serde_json::{Map, Value, json};

use crate::capability::Kind;
use crate::mcp::jsonrpc::{RpcError, code};
use crate::pipeline::CallKind;

/// One decoded target.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub kind: CallKind,
    /// The resource's URI, the prompt's name, or the completed prompt's name / resource
    /// template's URI template.
    pub name: String,
    /// What the checks see as the call's arguments (always an object).
    pub arguments: Value,
}

fn invalid(why: &str) -> RpcError {
    RpcError::new(code::INVALID_PARAMS, "Invalid params").with_data(Value::from(why))
}

fn non_empty(params: &Map<String, Value>, key: &str, what: &str) -> Result<String, RpcError> {
    match params.get(key) {
        Some(Value::String(s)) if crate::mcp::call::has_control(s) => Err(invalid(&format!(
            "{what} must not contain control characters"
        ))),
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(invalid(&format!("{what} must be a non-empty string"))),
    }
}

fn object_or_empty(params: &Map<String, Value>, key: &str) -> Result<Value, RpcError> {
    match params.get(key) {
        None | Some(Value::Null) => Ok(json!({})),
        Some(v @ Value::Object(_)) => Ok(v.clone()),
        Some(_) => Err(invalid(&format!("params.{key} must be an object"))),
    }
}

impl Target {
    /// Decodes the target of `method` from its `params`; `None` for a method without one.
    pub fn decode(method: &str, params: &Map<String, Value>) -> Option<Result<Target, RpcError>> {
        Some(match method {
            "resources/read" | "resources/subscribe" => {
                non_empty(params, "uri", "params.uri").map(|uri| Target {
                    kind: CallKind::Resource,
                    name: uri,
                    arguments: json!({"operation": method.trim_start_matches("resources/")}),
                })
            }
            "prompts/get" => non_empty(params, "name", "params.name").and_then(|name| {
                let arguments = object_or_empty(params, "arguments")?;
                crate::mcp::call::decidable("params.arguments", &arguments)?;
                Ok(Target {
                    kind: CallKind::Prompt,
                    name,
                    arguments,
                })
            }),
            "completion/complete" => Self::completion(params),
            _ => return None,
        })
    }

    fn completion(params: &Map<String, Value>) -> Result<Target, RpcError> {
        let Some(Value::Object(reference)) = params.get("ref") else {
            return Err(invalid("params.ref must be an object"));
        };
        let (kind, name) = match reference.get("type").and_then(Value::as_str) {
            Some("ref/prompt") => (
                Kind::Prompt,
                non_empty(reference, "name", "params.ref.name")?,
            ),
            Some("ref/resource") => (
                Kind::Resource,
                non_empty(reference, "uri", "params.ref.uri")?,
            ),
            _ => {
                return Err(invalid(
                    "params.ref.type must be \"ref/prompt\" or \"ref/resource\"",
                ));
            }
        };
        let argument = match params.get("argument") {
            Some(a @ Value::Object(_)) => a.clone(),
            _ => return Err(invalid("params.argument must be an object")),
        };
        let mut arguments = json!({"ref": reference, "argument": argument});
        // What is forwarded is what the checks saw: a context they could not see is refused.
        match params.get("context") {
            None | Some(Value::Null) => {}
            Some(c @ Value::Object(_)) => arguments["context"] = c.clone(),
            Some(_) => return Err(invalid("params.context must be an object")),
        }
        crate::mcp::call::decidable("params", &arguments)?;
        Ok(Target {
            kind: CallKind::Completion(kind),
            name,
            arguments,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(method: &str, params: Value) -> Result<Target, RpcError> {
        let p = params.as_object().cloned().expect("object");
        Target::decode(method, &p).expect("a target method")
    }

    #[test]
    fn each_kind_decodes() {
        let r = decode("resources/read", json!({"uri": "file:///a", "_meta": {}})).expect("read");
        assert_eq!((r.kind, r.name.as_str()), (CallKind::Resource, "file:///a"));
        assert_eq!(r.arguments, json!({"operation": "read"}));
        let s = decode("resources/subscribe", json!({"uri": "file:///a"})).expect("subscribe");
        assert_eq!(s.arguments, json!({"operation": "subscribe"}));
        let p = decode(
            "prompts/get",
            json!({"name": "greet", "arguments": {"who": "x"}}),
        )
        .expect("prompt");
        assert_eq!(
            (p.kind, p.arguments),
            (CallKind::Prompt, json!({"who": "x"}))
        );
        let c = decode(
            "completion/complete",
            json!({"ref": {"type": "ref/resource", "uri": "db://{table}"},
                   "argument": {"name": "table", "value": "in"},
                   "context": {"arguments": {}}}),
        )
        .expect("completion");
        assert_eq!(c.kind, CallKind::Completion(Kind::Resource));
        assert_eq!(c.name, "db://{table}");
        assert_eq!(c.arguments["argument"]["value"], "in");
        assert!(c.arguments["context"].is_object());
        assert!(Target::decode("resources/list", &Map::new()).is_none());
    }

    #[test]
    fn unnamed_targets_are_refused() {
        for (method, params) in [
            ("resources/read", json!({})),
            ("resources/read", json!({"uri": ""})),
            ("resources/read", json!({"uri": "file:///a\u{0}"})),
            ("prompts/get", json!({"name": "greet\r"})),
            (
                "prompts/get",
                json!({"name": "greet", "arguments": {"$serde_json::private::Number": "1"}}),
            ),
            ("resources/subscribe", json!({"uri": 5})),
            ("prompts/get", json!({"name": "p", "arguments": []})),
            ("prompts/get", json!({})),
            (
                "completion/complete",
                json!({"ref": {"type": "ref/prompt"}, "argument": {}}),
            ),
            (
                "completion/complete",
                json!({"ref": {"type": "ref/tool", "name": "x"},
                                           "argument": {}}),
            ),
            (
                "completion/complete",
                json!({"ref": {"type": "ref/prompt", "name": "x"}}),
            ),
            (
                "completion/complete",
                json!({"ref": {"type": "ref/prompt", "name": "x"}, "argument": {},
                       "context": "not an object"}),
            ),
        ] {
            let e = decode(method, params.clone()).expect_err("refused");
            assert_eq!(e.code, code::INVALID_PARAMS, "{method} {params}");
        }
    }
}
