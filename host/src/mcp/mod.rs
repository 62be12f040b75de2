//! The MCP endpoint (`POST /v1/mcp`) and the plain JSON-RPC endpoint (`POST /v1/tool-call`).
//!
//! Streamable HTTP framing: one JSON-RPC message per POST, answered with one JSON body
//! (notifications and client responses with 202). Every method is authenticated with the
//! capability token; `tools/list` is filtered to what the token allows; `tools/call` goes
//! through the [`crate::pipeline`] and only a [`crate::pipeline::Permit`] forwards it. This module
//! must never let an unauthenticated request reach the upstream, and never trust a header over
//! the body.

pub mod jsonrpc;
pub mod session;

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::header::{ALLOW, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Map, Value, json};

use crate::capability::Grant;
use crate::http::{self, Body};
use crate::pipeline::{ToolCall, decision_summary};
use crate::server::Gateway;
use crate::upstream::{Reply, UpstreamError};
use jsonrpc::{Id, Incoming as Message, Request as RpcRequest, RpcError, code};
use session::SessionClaims;

/// Protocol revisions of the handshake era this gateway speaks, newest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

const SESSION_HEADER: &str = "mcp-session-id";

/// Which endpoint a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/mcp`: the full MCP method set.
    Mcp,
    /// `/v1/tool-call`: `tools/call` only, no sessions.
    ToolCall,
}

fn rpc_response(status: StatusCode, id: Option<&Id>, err: &RpcError) -> Response<Body> {
    http::json_bytes(status, jsonrpc::error(id, err))
}

/// Handles one HTTP request on an MCP endpoint.
pub async fn handle(
    gw: &Gateway,
    req: Request<Incoming>,
    remote: SocketAddr,
    endpoint: Endpoint,
) -> Response<Body> {
    match *req.method() {
        Method::POST => {}
        Method::DELETE if endpoint == Endpoint::Mcp => {
            // Sessions are self-contained; there is nothing to tear down.
            return http::status(StatusCode::NO_CONTENT);
        }
        _ => {
            let mut resp = http::status(StatusCode::METHOD_NOT_ALLOWED);
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST"));
            return resp;
        }
    }
    let (parts, body) = req.into_parts();
    let bytes = match http::read_body(body, gw.config.max_body_bytes).await {
        Ok(b) => b,
        Err(e @ http::BodyError::TooLarge { .. }) => {
            let err = RpcError::new(code::INVALID_REQUEST, "Invalid Request")
                .with_data(Value::from(e.to_string()));
            return rpc_response(StatusCode::PAYLOAD_TOO_LARGE, None, &err);
        }
        Err(e) => {
            let err = RpcError::new(code::PARSE_ERROR, "Parse error")
                .with_data(Value::from(e.to_string()));
            return rpc_response(StatusCode::BAD_REQUEST, None, &err);
        }
    };
    if !http::json_depth_within(&bytes, gw.config.max_json_depth) {
        let err = RpcError::new(code::INVALID_REQUEST, "Invalid Request").with_data(Value::from(
            format!("JSON nesting deeper than {}", gw.config.max_json_depth),
        ));
        return rpc_response(StatusCode::BAD_REQUEST, None, &err);
    }
    let rpc = match jsonrpc::parse(&bytes) {
        Ok(Message::Request(r)) => r,
        Ok(Message::Response) => return http::status(StatusCode::ACCEPTED),
        Err((id, err)) => return rpc_response(StatusCode::BAD_REQUEST, id.as_ref(), &err),
    };

    // Every method, notifications included, is authenticated.
    let grant = match http::bearer(&parts.headers)
        .ok_or(None)
        .and_then(|t| gw.authenticate(t).map_err(Some))
    {
        Ok(g) => g,
        Err(e) => {
            let reason = e.map_or_else(
                || "missing bearer capability token".to_owned(),
                |e| e.to_string(),
            );
            let err = RpcError::new(code::CAPABILITY, "capability check failed")
                .with_data(Value::from(reason));
            let status = if rpc.is_notification() {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::OK
            };
            return rpc_response(status, rpc.id.as_ref(), &err);
        }
    };

    // A session id must be ours and belong to this token; an unknown one is 404 so the
    // client opens a new session, as the transport specifies.
    let session = match http::header_str(&parts.headers, SESSION_HEADER) {
        Some(_) if endpoint == Endpoint::ToolCall => None,
        Some(id) if rpc.method != "initialize" => match gw.sessions.verify(id) {
            Some(c) if c.tenant == grant.tenant && c.jti == grant.jti => Some(id.to_owned()),
            _ => {
                let err = RpcError::new(-32001, "Session not found");
                return rpc_response(StatusCode::NOT_FOUND, rpc.id.as_ref(), &err);
            }
        },
        _ => None,
    };

    if rpc.is_notification() {
        return http::status(StatusCode::ACCEPTED);
    }
    let id = rpc.id.clone().unwrap_or(Value::Null);
    let ctx = CallContext {
        gw,
        grant: &grant,
        headers: &parts.headers,
        remote,
        session: session.as_deref(),
    };
    let outcome = match (endpoint, rpc.method.as_str()) {
        (_, "tools/call") => ctx.tools_call(&rpc).await,
        (Endpoint::Mcp, "initialize") => return ctx.initialize(&rpc, &id),
        (Endpoint::Mcp, "ping") => Ok(json!({})),
        (Endpoint::Mcp, "tools/list") => ctx.tools_list(&rpc).await,
        (_, other) => Err(RpcError::new(code::METHOD_NOT_FOUND, "Method not found")
            .with_data(Value::from(format!("method {other:?} is not supported")))),
    };
    match outcome {
        Ok(result) => http::json_bytes(StatusCode::OK, jsonrpc::result(&id, result)),
        Err(err) => rpc_response(StatusCode::OK, Some(&id), &err),
    }
}

struct CallContext<'a> {
    gw: &'a Gateway,
    grant: &'a Grant,
    headers: &'a hyper::HeaderMap,
    remote: SocketAddr,
    session: Option<&'a str>,
}

fn upstream_rpc_error(e: &UpstreamError) -> RpcError {
    match e {
        UpstreamError::NotConfigured | UpstreamError::Unavailable(_) | UpstreamError::Timeout(_) => {
            RpcError::new(code::UPSTREAM_UNAVAILABLE, "upstream unavailable")
                .with_data(json!({"upstream_status": e.status(), "detail": e.to_string()}))
        }
        _ => RpcError::new(code::INTERNAL_ERROR, "upstream failure")
            .with_data(json!({"upstream_status": e.status(), "detail": e.to_string()})),
    }
}

impl CallContext<'_> {
    fn initialize(&self, rpc: &RpcRequest, id: &Id) -> Response<Body> {
        let requested = rpc.param_str("protocolVersion").unwrap_or_default();
        let version = SUPPORTED_VERSIONS
            .iter()
            .find(|v| **v == requested)
            .copied()
            .unwrap_or(SUPPORTED_VERSIONS[0]);
        let result = json!({
            "protocolVersion": version,
            "capabilities": {"tools": {"listChanged": false}},
            "serverInfo": {"name": "intentgate", "version": env!("CARGO_PKG_VERSION")},
            "instructions": "Tool calls are authorized by IntentGate; tools outside your token's scope are hidden.",
        });
        let session_id = self.gw.sessions.issue(&SessionClaims {
            tenant: self.grant.tenant.clone(),
            jti: self.grant.jti.clone(),
            protocol_version: version.to_owned(),
            issued_at: crate::audit::time::now_ms() / 1000,
        });
        let mut resp = http::json_bytes(StatusCode::OK, jsonrpc::result(id, result));
        if let Ok(v) = HeaderValue::from_str(&session_id) {
            resp.headers_mut().insert(SESSION_HEADER, v);
        }
        resp
    }

    async fn tools_list(&self, rpc: &RpcRequest) -> Result<Value, RpcError> {
        let Some(upstream) = self.gw.upstream.as_ref() else {
            return Ok(json!({"tools": []}));
        };
        let reply = upstream
            .list_tools(rpc.params.get("cursor"))
            .await
            .map_err(|e| upstream_rpc_error(&e))?;
        let mut result = match reply {
            Reply::Result(Value::Object(r)) => r,
            Reply::Result(_) => {
                return Err(upstream_rpc_error(&UpstreamError::Malformed(
                    "tools/list result is not an object".into(),
                )));
            }
            Reply::Error(e) => return Err(passthrough_error(e)),
        };
        let tools = match result.remove("tools") {
            Some(Value::Array(tools)) => tools,
            _ => Vec::new(),
        };
        let visible: Vec<Value> = tools
            .into_iter()
            .filter(|t| {
                t.get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| self.grant.allows_tool(n))
            })
            .collect();
        result.insert("tools".into(), Value::Array(visible));
        Ok(Value::Object(result))
    }

    async fn tools_call(&self, rpc: &RpcRequest) -> Result<Value, RpcError> {
        let Some(tool) = rpc.param_str("name").filter(|n| !n.is_empty()) else {
            return Err(RpcError::new(code::INVALID_PARAMS, "Invalid params")
                .with_data(Value::from("params.name must be a non-empty string")));
        };
        let empty = Value::Object(Map::new());
        let arguments = match rpc.params.get("arguments") {
            None | Some(Value::Null) => &empty,
            Some(a @ Value::Object(_)) => a,
            Some(_) => {
                return Err(RpcError::new(code::INVALID_PARAMS, "Invalid params")
                    .with_data(Value::from("params.arguments must be an object")));
            }
        };
        let call = ToolCall {
            grant: self.grant,
            tool,
            arguments,
            intent_prompt: http::header_str(self.headers, "x-intent-prompt"),
            agent: http::header_str(self.headers, "x-intentgate-agent"),
            remote_ip: self.remote.ip().to_string(),
            session_id: self.session,
        };
        let permit = self
            .gw
            .pipeline
            .decide(&call)
            .await
            .map_err(|d| d.to_rpc())?;
        let Some(upstream) = self.gw.upstream.as_ref() else {
            let e = UpstreamError::NotConfigured;
            self.gw
                .pipeline
                .record_upstream_failure(&call, &permit, 0, &e.to_string())
                .await;
            return Err(upstream_rpc_error(&e));
        };
        let mut forward = Map::new();
        forward.insert("name".into(), Value::from(tool));
        forward.insert("arguments".into(), arguments.clone());
        if let Some(meta) = rpc.params.get("_meta") {
            forward.insert("_meta".into(), meta.clone());
        }
        match upstream.call_tool(&permit, Value::Object(forward)).await {
            Ok(Reply::Result(Value::Object(mut result))) => {
                result.insert("_intentgate".into(), decision_summary(&permit));
                Ok(Value::Object(result))
            }
            Ok(Reply::Result(other)) => Ok(other),
            Ok(Reply::Error(e)) => Err(passthrough_error(e)),
            Err(e) => {
                self.gw
                    .pipeline
                    .record_upstream_failure(&call, &permit, e.status(), &e.to_string())
                    .await;
                Err(upstream_rpc_error(&e))
            }
        }
    }
}

/// An upstream JSON-RPC error, passed on with its code and message.
fn passthrough_error(e: Value) -> RpcError {
    let code = e.get("code").and_then(Value::as_i64).unwrap_or(code::INTERNAL_ERROR);
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
