//! The one call value both revisions decode into before the pipeline, and encode from after.
//!
//! A `tools/call` of the handshake era and one of the stateless era differ only in their
//! envelope (`_meta` keys, multi-round fields); [`Invocation`] holds what the call *is* (tool,
//! arguments, passed-on `_meta`, the client's answers to an earlier round), so the pipeline and
//! every check see the same thing whichever revision the agent or the tool server speaks. This
//! module must never keep a hop-specific envelope key: those describe one connection, and the
//! gateway writes its own for the next hop.

use serde_json::{Map, Value};

use super::era::meta;
use super::jsonrpc::{RpcError, code};

/// One decoded `tools/call`.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    pub name: String,
    /// Always an object.
    pub arguments: Value,
    /// `params._meta` without the envelope keys (progress tokens and user keys are passed on).
    pub meta: Map<String, Value>,
    /// A later round of a multi-round call: the client's answers to the input requests.
    pub input_responses: Option<Value>,
    /// A later round: the `requestState` the client echoed (the gateway's sealed form).
    pub request_state: Option<String>,
}

/// Whether a name or URI holds a control character. None belongs in one (RFC 3986 has none
/// in a URI, MCP's tool names are printable), and a NUL cannot be stored by PostgreSQL's text
/// columns: it would fail the audit batch that carries the call.
pub fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// serde_json's private number key: a check that converts the arguments through serde (the
/// Rego plugin's regorus values, a plugin author's own types) reads an object holding it as a
/// number, so the check would decide on another value than the one forwarded.
pub const PRIVATE_NUMBER_KEY: &str = "$serde_json::private::Number";

/// Whether `v` holds [`PRIVATE_NUMBER_KEY`] as a key at any depth (bounded by the parser's
/// nesting limit).
pub fn has_private_number_key(v: &Value) -> bool {
    match v {
        Value::Object(m) => m
            .iter()
            .any(|(k, v)| k == PRIVATE_NUMBER_KEY || has_private_number_key(v)),
        Value::Array(a) => a.iter().any(has_private_number_key),
        _ => false,
    }
}

/// Refuses arguments a check could read as another value than the one forwarded.
pub fn decidable(what: &str, v: &Value) -> Result<(), RpcError> {
    if has_private_number_key(v) {
        return Err(invalid(&format!(
            "{what} must not use the key {PRIVATE_NUMBER_KEY:?} (reserved by the JSON library the checks read them with)"
        )));
    }
    Ok(())
}

fn invalid(why: &str) -> RpcError {
    RpcError::new(code::INVALID_PARAMS, "Invalid params").with_data(Value::from(why))
}

impl Invocation {
    /// Decodes `params` of a `tools/call` of either revision.
    pub fn decode(params: &Map<String, Value>) -> Result<Invocation, RpcError> {
        let name = match params.get("name") {
            Some(Value::String(n)) if !n.is_empty() => n.clone(),
            _ => return Err(invalid("params.name must be a non-empty string")),
        };
        if has_control(&name) {
            return Err(invalid("params.name must not contain control characters"));
        }
        let arguments = match params.get("arguments") {
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(a @ Value::Object(_)) => a.clone(),
            Some(_) => return Err(invalid("params.arguments must be an object")),
        };
        decidable("params.arguments", &arguments)?;
        let meta = match params.get("_meta") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m
                .iter()
                .filter(|(k, _)| !meta::ENVELOPE.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            Some(_) => return Err(invalid("params._meta must be an object")),
        };
        let input_responses = match params.get("inputResponses") {
            None | Some(Value::Null) => None,
            Some(r @ Value::Object(_)) => Some(r.clone()),
            Some(_) => return Err(invalid("params.inputResponses must be an object")),
        };
        let request_state = match params.get("requestState") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(invalid("params.requestState must be a string")),
        };
        Ok(Invocation {
            name,
            arguments,
            meta,
            input_responses,
            request_state,
        })
    }

    /// The `params` to forward, with `request_state` as the upstream minted it (the gateway's
    /// seal removed). Envelope keys are added by the upstream client for its own hop.
    pub fn forward_params(&self, upstream_state: Option<&str>) -> Map<String, Value> {
        let mut p = Map::new();
        p.insert("name".into(), Value::from(self.name.clone()));
        p.insert("arguments".into(), self.arguments.clone());
        if !self.meta.is_empty() {
            p.insert("_meta".into(), Value::Object(self.meta.clone()));
        }
        if let Some(r) = &self.input_responses {
            p.insert("inputResponses".into(), r.clone());
        }
        if let Some(s) = upstream_state {
            p.insert("requestState".into(), Value::from(s));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("object")
    }

    #[test]
    fn both_revisions_decode_to_the_same_call() {
        let handshake = params(json!({"name": "echo", "arguments": {"text": "hi"},
                                      "_meta": {"progressToken": 7}}));
        let modern = params(json!({"name": "echo", "arguments": {"text": "hi"},
            "_meta": {"progressToken": 7, meta::PROTOCOL_VERSION: "2026-07-28",
                      meta::CLIENT_CAPABILITIES: {}, meta::CLIENT_INFO: {"name": "c"}}}));
        let a = Invocation::decode(&handshake).expect("handshake");
        let b = Invocation::decode(&modern).expect("modern");
        assert_eq!(a, b);
        assert_eq!(a.meta.get("progressToken"), Some(&json!(7)));
        let fwd = a.forward_params(None);
        assert_eq!(fwd["_meta"], json!({"progressToken": 7}));
        assert!(!fwd.contains_key("requestState"));
    }

    #[test]
    fn rounds_and_bad_shapes() {
        let r = Invocation::decode(&params(json!({"name": "t", "inputResponses": {"q": {}},
                                                  "requestState": "s"})))
        .expect("round");
        assert_eq!(r.request_state.as_deref(), Some("s"));
        assert_eq!(r.arguments, json!({}));
        let fwd = r.forward_params(Some("inner"));
        assert_eq!(fwd["requestState"], "inner");
        assert_eq!(fwd["inputResponses"], json!({"q": {}}));
        for bad in [
            json!({}),
            json!({"name": ""}),
            json!({"name": "echo\u{0}"}),
            json!({"name": "echo\n"}),
            json!({"name": "t", "arguments": {"a": [{"$serde_json::private::Number": "1"}]}}),
            json!({"name": "t", "arguments": [1]}),
            json!({"name": "t", "_meta": "x"}),
            json!({"name": "t", "requestState": 5}),
            json!({"name": "t", "inputResponses": []}),
        ] {
            assert_eq!(
                Invocation::decode(&params(bad.clone()))
                    .expect_err("refused")
                    .code,
                code::INVALID_PARAMS,
                "{bad}"
            );
        }
    }
}
