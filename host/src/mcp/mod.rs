//! The MCP protocol codec, for both revisions: the handshake era (2025-11-25 and older:
//! `initialize`, `Mcp-Session-Id`) and the stateless era (2026-07-28: `server/discover`, a
//! `_meta` envelope on every request, no sessions).
//!
//! - framing: JSON-RPC 2.0 messages ([`jsonrpc`]) and their HTTP answers (below);
//! - eras: which revision a request speaks and whether its headers agree with its body
//!   ([`era`], [`headers`], [`classify`]), `Mcp-Param-*` headers ([`params`]);
//! - translation: a call decoded into one [`call::Invocation`] whatever the revision, results
//!   shaped for the client's ([`translate`]), `server/discover`/`initialize` answers
//!   ([`discover`]);
//! - sessions and rounds: signed session ids ([`session`]), sessions ended on every replica
//!   ([`ended`]), sealed multi-round state ([`rounds`]), upstream requests waiting for an
//!   agent's reply ([`relay`]);
//! - `Host`/`Origin` validation ([`origin`]).
//!
//! The endpoint that uses it (authentication, the pipeline, forwarding) is [`crate::proxy`].
//! This module must never import the server, the pipeline or the upstream: it turns bytes and
//! headers into values and values into bytes, and decides nothing.

pub mod call;
pub mod discover;
pub mod ended;
pub mod era;
pub mod headers;
pub mod jsonrpc;
pub mod origin;
pub mod params;
pub mod raw;
pub mod relay;
pub mod rounds;
pub mod session;
pub mod translate;

use hyper::header::{ALLOW, HeaderValue};
use hyper::{Method, Response, StatusCode};
use serde_json::{Value, json};

use crate::http::{self, Body};
use era::{Era, HeaderEra};
use headers::Routing;
use jsonrpc::{Id, Request as RpcRequest, RpcError, code};

/// Handshake-era revisions this gateway speaks, newest first.
pub const SUPPORTED_VERSIONS: &[&str] = era::HANDSHAKE_VERSIONS;

/// The handshake-era session header.
pub const SESSION_HEADER: &str = "mcp-session-id";

pub fn rpc_response(status: StatusCode, id: Option<&Id>, err: &RpcError) -> Response<Body> {
    http::json_bytes(status, jsonrpc::error(id, err))
}

/// A refusal before the method runs: HTTP 400 with the JSON-RPC error.
pub fn bad_request(id: Option<&Id>, err: &RpcError) -> Response<Body> {
    rpc_response(StatusCode::BAD_REQUEST, id, err)
}

/// `405` for a GET stream or a DELETE where the revision has no session, with a typed
/// JSON-RPC error like every other refusal.
pub fn method_not_allowed(method: &Method) -> Response<Body> {
    let err = RpcError::new(code::INVALID_REQUEST, "Method not allowed").with_data(Value::from(
        format!("{method} is not served on this endpoint in this revision; use POST"),
    ));
    let mut resp = rpc_response(StatusCode::METHOD_NOT_ALLOWED, None, &err);
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static("POST"));
    resp
}

/// The era of a request, validated: in the stateless era the envelope ladder (shape → header
/// agreement → version), in the handshake era the optional headers' agreement.
pub fn classify(
    routing: &Routing,
    header_era: HeaderEra,
    rpc: &RpcRequest,
) -> Result<Era, RpcError> {
    match header_era {
        HeaderEra::Handshake => {
            routing.agree_with(rpc, HeaderEra::Handshake)?;
            Ok(Era::Handshake)
        }
        HeaderEra::Modern if rpc.is_notification() => {
            // Notifications carry no envelope requirement; the version must still be served,
            // and a method header must name the body's.
            routing.agree_on_notification(rpc)?;
            let v = routing.version.as_deref().unwrap_or_default();
            if !era::MODERN_VERSIONS.contains(&v) {
                return Err(era::unsupported_version(v));
            }
            Ok(Era::Modern(era::Envelope {
                version: v.to_owned(),
                client_capabilities: json!({}),
                client_info: None,
                log_level: None,
            }))
        }
        HeaderEra::Modern => {
            let meta = era::envelope_shape(&rpc.params)?;
            routing.agree_with(rpc, HeaderEra::Modern)?;
            Ok(Era::Modern(era::envelope_version(meta)?))
        }
    }
}

/// The pipeline's decision on a request that reached it (`allow`, `block`, `escalate`).
pub const DECISION_HEADER: &str = "x-intentgate-decision";
/// The audit event of an allowed call's decision.
pub const EVENT_ID_HEADER: &str = "x-intentgate-event-id";

pub fn accepts_event_stream(headers: &hyper::HeaderMap) -> bool {
    headers
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("text/event-stream"))
}

/// The `-32601` refusal of a method this endpoint or revision does not serve.
pub fn method_not_found(method: &str) -> RpcError {
    RpcError::new(code::METHOD_NOT_FOUND, "Method not found")
        .with_data(Value::from(format!("method {method:?} is not supported")))
}

/// `logging/setLevel` (handshake era): the level is checked and acknowledged by the gateway
/// itself. It is not forwarded: toward a handshake-era upstream the gateway's one session is
/// shared by every agent, so one agent's level would become everyone's. Log messages the
/// upstream sends with an answer are relayed at the upstream's own level.
pub fn set_level(rpc: &RpcRequest) -> Result<Value, RpcError> {
    const LEVELS: &[&str] = &[
        "debug",
        "info",
        "notice",
        "warning",
        "error",
        "critical",
        "alert",
        "emergency",
    ];
    match rpc.param_str("level") {
        Some(l) if LEVELS.contains(&l) => Ok(json!({})),
        _ => Err(
            RpcError::new(code::INVALID_PARAMS, "Invalid params").with_data(Value::from(format!(
                "params.level must be one of {LEVELS:?}"
            ))),
        ),
    }
}

/// An upstream JSON-RPC error, passed on with its code and message.
pub fn passthrough_error(e: Value) -> RpcError {
    let code = e
        .get("code")
        .and_then(Value::as_i64)
        .unwrap_or(code::INTERNAL_ERROR);
    let message = e
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("upstream error")
        .to_owned();
    let err = RpcError::new(code, message);
    match e.get("data") {
        Some(d) => err.with_data(d.clone()),
        None => err,
    }
}
