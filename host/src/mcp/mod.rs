//! The MCP endpoint (`POST /v1/mcp`) and the plain JSON-RPC endpoint (`POST /v1/tool-call`),
//! for both MCP revisions: the handshake era (2025-11-25 and older: `initialize`,
//! `Mcp-Session-Id`) and the stateless era (2026-07-28: `server/discover`, a `_meta` envelope
//! on every request, no sessions).
//!
//! One request goes: framing ([`jsonrpc`]) → era and header/body agreement ([`era`],
//! [`headers`]) → authentication → the method. Either revision's `tools/call` is decoded into
//! the same [`call::Invocation`] before the [`crate::pipeline`], so no check knows which
//! revision it serves, and the result is shaped for the client's revision after
//! ([`translate`]); `server/discover`/`initialize` are answered by [`discover`]; multi-round
//! calls are linked by [`rounds`]. Every method is authenticated with the capability token;
//! lists are filtered to what the token allows. This module must never let an unauthenticated
//! request reach the upstream, never decide from a header, and never run a check on a request
//! whose headers disagree with its body.

pub mod call;
pub mod discover;
pub mod era;
pub mod headers;
pub mod jsonrpc;
pub mod rounds;
pub mod session;
pub mod translate;

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::header::{ALLOW, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Map, Value, json};

use crate::capability::Grant;
use crate::http::{self, Body};
use crate::pipeline::{Round, ToolCall, decision_summary};
use crate::server::Gateway;
use crate::upstream::{Reply, UpstreamError};
use call::Invocation;
use discover::UpstreamProfile;
use era::{Era, HeaderEra};
use headers::Routing;
use jsonrpc::{Id, Incoming as Message, Request as RpcRequest, RpcError, code};
use rounds::{RoundSeal, RoundState};
use session::SessionClaims;

/// Handshake-era revisions this gateway speaks, newest first.
pub const SUPPORTED_VERSIONS: &[&str] = era::HANDSHAKE_VERSIONS;

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

/// A refusal before the method runs: HTTP 400 with the JSON-RPC error.
fn bad_request(id: Option<&Id>, err: &RpcError) -> Response<Body> {
    rpc_response(StatusCode::BAD_REQUEST, id, err)
}

fn method_not_allowed() -> Response<Body> {
    let mut resp = http::status(StatusCode::METHOD_NOT_ALLOWED);
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static("POST"));
    resp
}

/// The most of a body read from a request that is not authenticated (enough for any JSON-RPC
/// envelope whose id the refusal echoes).
const UNAUTHENTICATED_BODY_BYTES: usize = 16 << 10;

/// Why a request was not authenticated, as the `-32010` refusal's data says it.
fn refusal_reason(e: Option<&crate::capability::CapabilityError>) -> String {
    e.map_or_else(
        || "missing bearer capability token".to_owned(),
        |e| e.to_string(),
    )
}

/// Handles one HTTP request on an MCP endpoint.
pub async fn handle(
    gw: &Gateway,
    req: Request<Incoming>,
    remote: SocketAddr,
    endpoint: Endpoint,
) -> Response<Body> {
    let routing = match Routing::read(req.headers()) {
        Ok(r) => r,
        Err(e) => return bad_request(None, &e),
    };
    let header_era = era::era_of_header(routing.version.as_deref());
    match (req.method(), header_era) {
        (&Method::POST, _) => {}
        // Handshake sessions are self-contained; there is nothing to tear down.
        (&Method::DELETE, HeaderEra::Handshake) if endpoint == Endpoint::Mcp => {
            return http::status(StatusCode::NO_CONTENT);
        }
        // No GET stream in either era here; none at all in the stateless one.
        _ => return method_not_allowed(),
    }
    let (parts, body) = req.into_parts();
    // Authenticate from the header before reading the body (decode, HMAC chain, revocation
    // set: microseconds). A request that is not authenticated — no token, or a token that
    // does not verify — gets no more of its body read than it takes to echo the request's id
    // in the refusal below; a larger body is refused at once, unread. Every read has a deadline.
    let auth = http::bearer(&parts.headers)
        .ok_or(None)
        .and_then(|t| gw.authenticate(t).map_err(Some));
    let limit = if auth.is_ok() {
        gw.config.max_body_bytes
    } else {
        gw.config.max_body_bytes.min(UNAUTHENTICATED_BODY_BYTES)
    };
    let bytes = match http::read_body_within(body, limit, gw.config.body_timeout).await {
        Ok(b) => b,
        Err(http::BodyError::TooLarge { .. }) if auth.is_err() => {
            let err = RpcError::new(code::CAPABILITY, "capability check failed").with_data(
                Value::from(refusal_reason(auth.as_ref().err().and_then(Option::as_ref))),
            );
            return rpc_response(StatusCode::UNAUTHORIZED, None, &err);
        }
        Err(e @ http::BodyError::Timeout(_)) => {
            let err = RpcError::new(code::INVALID_REQUEST, "Invalid Request")
                .with_data(Value::from(e.to_string()));
            return rpc_response(StatusCode::REQUEST_TIMEOUT, None, &err);
        }
        Err(e @ http::BodyError::TooLarge { .. }) => {
            let err = RpcError::new(code::INVALID_REQUEST, "Invalid Request")
                .with_data(Value::from(e.to_string()));
            return rpc_response(StatusCode::PAYLOAD_TOO_LARGE, None, &err);
        }
        Err(e) => {
            let err = RpcError::new(code::PARSE_ERROR, "Parse error")
                .with_data(Value::from(e.to_string()));
            return bad_request(None, &err);
        }
    };
    if !http::json_depth_within(&bytes, gw.config.max_json_depth) {
        let err = RpcError::new(code::INVALID_REQUEST, "Invalid Request").with_data(Value::from(
            format!("JSON nesting deeper than {}", gw.config.max_json_depth),
        ));
        return bad_request(None, &err);
    }
    let rpc = match jsonrpc::parse(&bytes) {
        Ok(Message::Request(r)) => r,
        Ok(Message::Response) => return http::status(StatusCode::ACCEPTED),
        Err((id, err)) => return bad_request(id.as_ref(), &err),
    };

    // The era, and the headers' agreement with the body, before anything else looks at it.
    let era = match classify(&routing, header_era, &rpc) {
        Ok(e) => e,
        Err(err) => return bad_request(rpc.id.as_ref(), &err),
    };

    // Every method, notifications included, is authenticated (the token was verified above,
    // before the body was read; era and framing errors still answer first, as they always did).
    let grant = match auth {
        Ok(g) => g,
        Err(e) => {
            if rpc.method == "tools/call" {
                gw.metrics().decisions.record_unauthenticated();
            }
            let err = RpcError::new(code::CAPABILITY, "capability check failed")
                .with_data(Value::from(refusal_reason(e.as_ref())));
            let status = if rpc.is_notification() {
                StatusCode::UNAUTHORIZED
            } else {
                StatusCode::OK
            };
            return rpc_response(status, rpc.id.as_ref(), &err);
        }
    };

    // A session id must be ours and belong to this token; an unknown one is 404 so the
    // client opens a new session, as the transport specifies. The stateless era has none.
    let session = match http::header_str(&parts.headers, SESSION_HEADER) {
        _ if era.is_modern() || endpoint == Endpoint::ToolCall => None,
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
        era: &era,
    };
    let modern = era.is_modern();
    let outcome = match (endpoint, modern, rpc.method.as_str()) {
        (_, _, "tools/call") => ctx.tools_call(&rpc).await,
        (Endpoint::Mcp, false, "initialize") => return ctx.initialize(&rpc, &id).await,
        (Endpoint::Mcp, false, "ping") => Ok(json!({})),
        (Endpoint::Mcp, true, "server/discover") => {
            Ok(discover::discover_result(&ctx.upstream_profile().await))
        }
        (Endpoint::Mcp, _, "tools/list") => ctx.tools_list(&rpc).await,
        (_, _, other) => Err(RpcError::new(code::METHOD_NOT_FOUND, "Method not found")
            .with_data(Value::from(format!("method {other:?} is not supported")))),
    };
    match outcome {
        Ok(result) => http::json_bytes(StatusCode::OK, jsonrpc::result(&id, result)),
        Err(err) => {
            let status = if modern {
                StatusCode::from_u16(era::modern_status(err.code)).unwrap_or(StatusCode::OK)
            } else {
                StatusCode::OK
            };
            rpc_response(status, Some(&id), &err)
        }
    }
}

/// The era of a request, validated: in the stateless era the envelope ladder (shape → header
/// agreement → version), in the handshake era the optional headers' agreement.
fn classify(routing: &Routing, header_era: HeaderEra, rpc: &RpcRequest) -> Result<Era, RpcError> {
    match header_era {
        HeaderEra::Handshake => {
            routing.agree_with(rpc, HeaderEra::Handshake)?;
            Ok(Era::Handshake)
        }
        HeaderEra::Modern if rpc.is_notification() => {
            // Notifications carry no envelope requirement; the version must still be served.
            let v = routing.version.as_deref().unwrap_or_default();
            if !era::MODERN_VERSIONS.contains(&v) {
                return Err(era::unsupported_version(v));
            }
            Ok(Era::Modern(era::Envelope {
                version: v.to_owned(),
                client_capabilities: json!({}),
                client_info: None,
            }))
        }
        HeaderEra::Modern => {
            let meta = era::envelope_shape(&rpc.params)?;
            routing.agree_with(rpc, HeaderEra::Modern)?;
            Ok(Era::Modern(era::envelope_version(meta)?))
        }
    }
}

struct CallContext<'a> {
    gw: &'a Gateway,
    grant: &'a Grant,
    headers: &'a hyper::HeaderMap,
    remote: SocketAddr,
    session: Option<&'a str>,
    era: &'a Era,
}

fn upstream_rpc_error(e: &UpstreamError) -> RpcError {
    match e {
        UpstreamError::NotConfigured
        | UpstreamError::Unavailable(_)
        | UpstreamError::Timeout(_) => {
            RpcError::new(code::UPSTREAM_UNAVAILABLE, "upstream unavailable")
                .with_data(json!({"upstream_status": e.status(), "detail": e.to_string()}))
        }
        _ => RpcError::new(code::INTERNAL_ERROR, "upstream failure")
            .with_data(json!({"upstream_status": e.status(), "detail": e.to_string()})),
    }
}

fn now_secs() -> i64 {
    crate::audit::time::now_ms() / 1000
}

impl CallContext<'_> {
    /// What the upstream says about itself; when it cannot be asked, the gateway answers alone.
    async fn upstream_profile(&self) -> UpstreamProfile {
        match self.gw.upstream.as_ref() {
            Some(up) => up.profile().await.unwrap_or_else(|e| {
                tracing::debug!(error = %e, "upstream profile unavailable; answering locally");
                UpstreamProfile::default()
            }),
            None => UpstreamProfile::default(),
        }
    }

    async fn initialize(&self, rpc: &RpcRequest, id: &Id) -> Response<Body> {
        let requested = rpc.param_str("protocolVersion").unwrap_or_default();
        let version = discover::negotiate_handshake(requested);
        let result = discover::initialize_result(version, &self.upstream_profile().await);
        let session_id = self.gw.sessions.issue(&SessionClaims {
            tenant: self.grant.tenant.clone(),
            jti: self.grant.jti.clone(),
            protocol_version: version.to_owned(),
            issued_at: now_secs(),
        });
        self.gw.metrics().server.session_issued();
        let mut resp = http::json_bytes(StatusCode::OK, jsonrpc::result(id, result));
        if let Ok(v) = HeaderValue::from_str(&session_id) {
            resp.headers_mut().insert(SESSION_HEADER, v);
        }
        resp
    }

    async fn tools_list(&self, rpc: &RpcRequest) -> Result<Value, RpcError> {
        let modern = self.era.is_modern();
        let Some(upstream) = self.gw.upstream.as_ref() else {
            return Ok(translate::list_for_client(
                Map::from_iter([("tools".to_owned(), json!([]))]),
                modern,
            ));
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
        Ok(translate::list_for_client(result, modern))
    }

    /// What binds the rounds of this call (everything but the links themselves).
    fn round_binding(&self, inv: &Invocation) -> RoundState {
        RoundState {
            tenant: self.grant.tenant.clone(),
            jti: self.grant.jti.clone(),
            tool: inv.name.clone(),
            args_digest: rounds::args_digest(&inv.arguments),
            call_event: 0,
            round: 0,
            issued_at: now_secs(),
            inner: None,
        }
    }

    async fn tools_call(&self, rpc: &RpcRequest) -> Result<Value, RpcError> {
        let inv = Invocation::decode(&rpc.params)?;
        let modern = self.era.is_modern();
        let seal = RoundSeal::new(&self.gw.sessions);
        // A later round of a multi-round call: the state must be one the gateway sealed for
        // this very call; it names the call's first audit event and the round.
        let previous = match &inv.request_state {
            Some(s) => Some(
                seal.open(s, &self.round_binding(&inv), now_secs())
                    .map_err(|e| {
                        RpcError::new(code::INVALID_PARAMS, "Invalid or expired requestState")
                            .with_data(Value::from(e.to_string()))
                    })?,
            ),
            None => None,
        };
        let call = ToolCall {
            grant: self.grant,
            tool: &inv.name,
            arguments: &inv.arguments,
            intent_prompt: http::header_str(self.headers, "x-intent-prompt"),
            agent: http::header_str(self.headers, "x-intentgate-agent"),
            remote_ip: self.remote.ip().to_string(),
            session_id: self.session,
            round: previous.as_ref().map(|p| Round {
                call_event: p.call_event,
                number: p.round.saturating_add(1),
            }),
        };
        // Every round is decided again; only the first is charged.
        let permit = self
            .gw
            .pipeline
            .decide(&call)
            .await
            .map_err(|d| d.to_rpc())?;
        let Some(upstream) = self.gw.upstream.as_ref() else {
            let e = UpstreamError::NotConfigured;
            self.gw.metrics().upstream.error(&e);
            self.gw
                .pipeline
                .record_upstream_failure(&call, &permit, 0, &e.to_string())
                .await;
            return Err(upstream_rpc_error(&e));
        };
        let relay = match self.era {
            Era::Modern(env) => Some(env),
            Era::Handshake => None,
        };
        let params = inv.forward_params(previous.as_ref().and_then(|p| p.inner.as_deref()));
        let forwarding = std::time::Instant::now();
        let reply = upstream.call_tool(&permit, params, relay).await;
        self.gw.metrics().forwarded(forwarding, &reply);
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                self.gw
                    .pipeline
                    .record_upstream_failure(&call, &permit, e.status(), &e.to_string())
                    .await;
                return Err(upstream_rpc_error(&e));
            }
        };
        let mut result = match reply {
            Reply::Result(Value::Object(r)) => r,
            Reply::Result(other) => return Ok(other),
            Reply::Error(e) => return Err(passthrough_error(e)),
        };
        if modern && translate::is_input_required(&result) {
            // Hand out the gateway's seal instead of the upstream's state.
            let mut next = self.round_binding(&inv);
            next.call_event = previous.as_ref().map_or(permit.event_id, |p| p.call_event);
            next.round = call.round.as_ref().map_or(1, |r| r.number);
            next.inner = result
                .get("requestState")
                .and_then(Value::as_str)
                .map(str::to_owned);
            result.insert("requestState".into(), Value::from(seal.seal(&next)));
        }
        let mut result = translate::call_for_client(result, modern)?;
        result.insert("_intentgate".into(), decision_summary(&permit));
        Ok(Value::Object(result))
    }
}

/// An upstream JSON-RPC error, passed on with its code and message.
fn passthrough_error(e: Value) -> RpcError {
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
