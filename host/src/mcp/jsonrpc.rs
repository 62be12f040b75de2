//! JSON-RPC 2.0 framing: parse one request object, build results and typed errors.
//!
//! Parsing never panics and never trusts shape: a body that is not one well-formed request
//! object becomes a [`RpcError`] with the spec's code. Batches are refused (MCP dropped them).

use serde_json::{Map, Value, json};

/// JSON-RPC and IntentGate error codes (WIRE.md).
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    pub const CAPABILITY: i64 = -32010;
    pub const INTENT: i64 = -32011;
    pub const POLICY: i64 = -32012;
    pub const BUDGET: i64 = -32013;
    pub const PROVENANCE: i64 = -32014;
    pub const AUDIT_UNAVAILABLE: i64 = -32016;
    pub const UPSTREAM_UNAVAILABLE: i64 = -32018;
    pub const APPROVAL_PENDING: i64 = -32019;
    pub const HEADER_MISMATCH: i64 = -32020;
    pub const MISSING_CAPABILITY: i64 = -32021;
    pub const UNSUPPORTED_VERSION: i64 = -32022;
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }

    pub fn with_data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    fn to_value(&self) -> Value {
        let mut e = Map::new();
        e.insert("code".into(), Value::from(self.code));
        e.insert("message".into(), Value::from(self.message.clone()));
        if let Some(d) = &self.data {
            e.insert("data".into(), d.clone());
        }
        Value::Object(e)
    }
}

/// The `id` of a request: echoed in the response as received.
pub type Id = Value;

/// One parsed JSON-RPC message from a client.
#[derive(Debug, Clone)]
pub struct Request {
    /// `None` for a notification.
    pub id: Option<Id>,
    pub method: String,
    /// Always an object (absent params become `{}`).
    pub params: Map<String, Value>,
}

impl Request {
    pub fn is_notification(&self) -> bool {
        self.id.is_none()
    }

    /// A string parameter, when present.
    pub fn param_str(&self, name: &str) -> Option<&str> {
        self.params.get(name).and_then(Value::as_str)
    }
}

/// What a client sent on the MCP endpoint.
#[derive(Debug)]
pub enum Incoming {
    Request(Request),
    /// A response or error from the client: its reply to a request the upstream sent it
    /// through the gateway (`relay.rs`), the whole message.
    Response(Value),
}

/// Parses a body into one JSON-RPC message. `id` of the error is `null` when unknown.
pub fn parse(body: &[u8]) -> Result<Incoming, (Option<Id>, RpcError)> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        (
            None,
            RpcError::new(code::PARSE_ERROR, "Parse error").with_data(Value::from(e.to_string())),
        )
    })?;
    let mut obj = match value {
        Value::Object(o) => o,
        Value::Array(_) => {
            return Err((
                None,
                RpcError::new(code::INVALID_REQUEST, "Invalid Request")
                    .with_data(Value::from("batch requests are not supported")),
            ));
        }
        _ => {
            return Err((
                None,
                RpcError::new(code::INVALID_REQUEST, "Invalid Request")
                    .with_data(Value::from("expected a JSON-RPC object")),
            ));
        }
    };
    let id = match obj.get("id") {
        None => None,
        // An integer past u64 is read as a float, and would be echoed as another number than
        // the client sent: its answer would match no request.
        Some(Value::Number(n)) if n.as_f64().is_some_and(|f| n.is_f64() && f.abs() >= 9.0e15) => {
            return Err((
                None,
                RpcError::new(code::INVALID_REQUEST, "Invalid Request")
                    .with_data(Value::from("id is a number too large to be echoed exactly")),
            ));
        }
        Some(v @ (Value::String(_) | Value::Number(_) | Value::Null)) => Some(v.clone()),
        Some(_) => {
            return Err((
                None,
                RpcError::new(code::INVALID_REQUEST, "Invalid Request")
                    .with_data(Value::from("id must be a string, number or null")),
            ));
        }
    };
    let invalid = |why: &str| {
        Err((
            id.clone(),
            RpcError::new(code::INVALID_REQUEST, "Invalid Request").with_data(Value::from(why)),
        ))
    };
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return invalid("jsonrpc must be \"2.0\"");
    }
    // The members are taken out of the parsed object, not cloned: `params` holds the
    // arguments, the largest part of a call.
    let method = match obj.remove("method") {
        // MCP: a request's id must not be null (null is for errors without a request).
        Some(Value::String(_)) if id == Some(Value::Null) => {
            return invalid("a request's id must be a string or a number, not null");
        }
        Some(Value::String(m)) if !m.is_empty() => m,
        Some(_) => return invalid("method must be a non-empty string"),
        None if id.is_some() && (obj.contains_key("result") || obj.contains_key("error")) => {
            return Ok(Incoming::Response(Value::Object(obj)));
        }
        None => return invalid("method is missing"),
    };
    let params = match obj.remove("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p,
        Some(_) => {
            return Err((
                id,
                RpcError::new(code::INVALID_PARAMS, "Invalid params")
                    .with_data(Value::from("params must be an object")),
            ));
        }
    };
    Ok(Incoming::Request(Request { id, method, params }))
}

/// Encodes a success response.
pub fn result<T: serde::Serialize + ?Sized>(id: &Id, result: &T) -> Vec<u8> {
    /// The envelope written around the result as it is (an upstream's text stays its text).
    #[derive(serde::Serialize)]
    struct Envelope<'a, T: ?Sized> {
        jsonrpc: &'static str,
        id: &'a Id,
        result: &'a T,
    }
    let envelope = Envelope {
        jsonrpc: "2.0",
        id,
        result,
    };
    serde_json::to_vec(&envelope).unwrap_or_default()
}

/// Encodes an error response.
pub fn error(id: Option<&Id>, err: &RpcError) -> Vec<u8> {
    let id = id.cloned().unwrap_or(Value::Null);
    serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": id, "error": err.to_value()}))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: &str) -> Request {
        match parse(body.as_bytes()) {
            Ok(Incoming::Request(r)) => r,
            other => panic!("expected request, got {other:?}"),
        }
    }

    fn err_code(body: &str) -> i64 {
        match parse(body.as_bytes()) {
            Err((_, e)) => e.code,
            other => panic!("expected error, got {other:?}"),
        }
    }

    #[test]
    fn parses_requests_and_notifications() {
        let r = req(r#"{"jsonrpc":"2.0","id":7,"method":"tools/list"}"#);
        assert_eq!(r.id, Some(Value::from(7)));
        assert!(r.params.is_empty());
        let n = req(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        assert!(n.is_notification());
        assert!(matches!(
            parse(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#),
            Ok(Incoming::Response(_))
        ));
    }

    #[test]
    fn rejects_bad_shapes_with_spec_codes() {
        assert_eq!(err_code("{not json"), code::PARSE_ERROR);
        assert_eq!(err_code("[]"), code::INVALID_REQUEST);
        assert_eq!(err_code("42"), code::INVALID_REQUEST);
        assert_eq!(err_code(r#"{"id":1,"method":"x"}"#), code::INVALID_REQUEST);
        assert_eq!(
            err_code(r#"{"jsonrpc":"1.0","id":1,"method":"x"}"#),
            code::INVALID_REQUEST
        );
        assert_eq!(
            err_code(r#"{"jsonrpc":"2.0","id":{},"method":"x"}"#),
            code::INVALID_REQUEST
        );
        assert_eq!(
            err_code(r#"{"jsonrpc":"2.0","id":1,"method":5}"#),
            code::INVALID_REQUEST
        );
        assert_eq!(
            err_code(r#"{"jsonrpc":"2.0","id":1,"method":"x","params":[1]}"#),
            code::INVALID_PARAMS
        );
        assert_eq!(
            err_code(r#"{"jsonrpc":"2.0","id":null,"method":"tools/call"}"#),
            code::INVALID_REQUEST
        );
        assert_eq!(
            err_code(r#"{"jsonrpc":"2.0","id":18446744073709551616,"method":"tools/list"}"#),
            code::INVALID_REQUEST
        );
        // The largest integers still echo exactly; a null id stays fine on an error response.
        let r = req(r#"{"jsonrpc":"2.0","id":18446744073709551615,"method":"tools/list"}"#);
        assert_eq!(r.id, Some(Value::from(u64::MAX)));
        assert!(matches!(
            parse(br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"x"}}"#),
            Ok(Incoming::Response(_))
        ));
    }

    #[test]
    fn error_echoes_id() {
        let out = error(
            Some(&Value::from("a")),
            &RpcError::new(code::POLICY, "policy check failed"),
        );
        let v: Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["id"], "a");
        assert_eq!(v["error"]["code"], -32012);
    }
}
