//! The MCP endpoint (`POST /v1/mcp`) and the plain JSON-RPC endpoint (`POST /v1/tool-call`):
//! the service built at start-up ([`McpService`]) and the phases of one request, in order, in
//! [`handle`]:
//!
//! read (`Host`/`Origin`, routing headers, the bounded body) → frame ([`crate::mcp::jsonrpc`])
//! → era (and the headers' agreement with the body, [`crate::mcp::classify`]) → authenticate
//! (the capability token, and a presented session, `lifecycle.rs`) → decode (a `tools/call`
//! into one [`crate::mcp::call::Invocation`], a resource, prompt or completion into a
//! [`target::Target`]) → decide ([`crate::pipeline`], which returns a `Permit` or a `Denial`,
//! mapped to JSON-RPC here) → forward (with the permit, [`crate::upstream`]) → shape (the
//! result for the client's revision, [`crate::mcp::translate`], with the decision headers).
//!
//! The methods: `tools/call` and `initialize` (`tools.rs`), lists and targets (`methods.rs`);
//! an escalated call held for its approval (`hold.rs`); a handshake-era call whose upstream
//! asks the client something on its event stream (`streamed.rs`, `ask.rs`); a stateless
//! client's `subscriptions/listen` stream (`listen.rs`). The protocol
//! itself is [`crate::mcp`]'s; this module is where it meets authentication, the pipeline and
//! the upstreams. It must never let an unauthenticated request reach the upstream, never
//! decide from a header, never run a check on a request whose headers disagree with its body,
//! and never forward what the pipeline did not permit.

mod ask;
mod cancel;
pub mod denial;
mod hold;
mod lifecycle;
mod listen;
pub(crate) use lifecycle::{opened_by, presented_session_as};
mod methods;
pub mod step_up;
mod streamed;
pub mod target;
mod tools;

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::header::{HOST, HeaderValue, ORIGIN};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use crate::capability::Grant;
use crate::http::{self, Body};
use crate::mcp::discover::UpstreamProfile;
use crate::mcp::era::{self, Era, HeaderEra};
use crate::mcp::headers::Routing;
use crate::mcp::jsonrpc::{self, Id, Incoming as Message, Request as RpcRequest, RpcError, code};
use crate::mcp::raw::ResultBody;
use crate::mcp::{
    DECISION_HEADER, EVENT_ID_HEADER, SESSION_HEADER, accepts_event_stream, bad_request, classify,
    discover, method_not_allowed, method_not_found, origin, passthrough_error, rpc_response,
    set_level, translate,
};
use crate::upstream::UpstreamError;

/// Which endpoint a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/mcp`: the full MCP method set.
    Mcp,
    /// `/v1/tool-call`: `tools/call` only, no sessions.
    ToolCall,
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

/// What the MCP endpoints read of the configuration.
#[derive(Debug, Clone)]
pub struct McpSettings {
    /// The listener's address: a loopback listener accepts only loopback `Host` names.
    pub listen_ip: std::net::IpAddr,
    pub allowed_hosts: Vec<String>,
    pub allowed_origins: Vec<String>,
    pub max_body_bytes: usize,
    pub body_timeout: std::time::Duration,
    pub max_json_depth: usize,
    /// `_intentgate` in forwarded results.
    pub annotate_results: bool,
}

impl McpSettings {
    pub fn of(config: &crate::config::Config) -> Self {
        Self {
            listen_ip: config.addr.ip(),
            allowed_hosts: config.allowed_hosts.clone(),
            allowed_origins: config.allowed_origins.clone(),
            max_body_bytes: config.max_body_bytes,
            body_timeout: config.body_timeout,
            max_json_depth: config.max_json_depth,
            annotate_results: config.annotate_results,
        }
    }
}

/// The MCP endpoints' service, built once at start-up ([`crate::gateway`]): exactly the shared
/// parts a request on `/v1/mcp` or `/v1/tool-call` uses.
pub struct McpService {
    pub settings: McpSettings,
    /// Checks capability tokens against the master key.
    pub verifier: crate::capability::Verifier,
    pub revocations: std::sync::Arc<crate::capability::RevocationSet>,
    /// Where ended sessions are listed (every replica reads it).
    pub store: std::sync::Arc<dyn crate::store::Store>,
    pub pipeline: std::sync::Arc<crate::pipeline::Pipeline>,
    /// Every upstream by name (none, one, or several behind this one endpoint).
    pub upstreams: std::sync::Arc<crate::upstreams::Upstreams>,
    /// Wakes held requests when their approval is decided (here or on another replica).
    pub approvals: crate::approvals::Waiters,
    /// Upstream requests relayed to agents, waiting for their replies.
    pub relays: std::sync::Arc<crate::mcp::relay::Relays>,
    /// Client sessions' `GET /v1/mcp` streams and resource subscriptions.
    pub streams: std::sync::Arc<crate::streams::Hub>,
    /// Signs session ids and round states.
    pub sessions: crate::mcp::session::SessionKeys,
    /// Tool calls in flight that their client may cancel.
    pub in_flight: cancel::InFlight,
    /// Which tokens' `step_up` caveats their mint recorded (the others count for nothing).
    pub step_ups: step_up::StepUps,
}

impl McpService {
    /// Authenticates a bearer capability token (signature, time, revocation; no tool yet).
    pub fn authenticate(&self, token: &str) -> Result<Grant, crate::capability::CapabilityError> {
        let started = std::time::Instant::now();
        let grant = self.verifier.authenticate(
            token,
            crate::audit::time::now_ms() / 1000,
            &self.revocations,
        );
        (self.metrics().stages).since(crate::metrics::Stage::Token, started);
        grant
    }

    /// The metrics this endpoint's decisions are counted in.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        self.pipeline.metrics()
    }
}

/// A response that ends the request early (a refusal, or a reply taken as it is).
type Answered = Box<Response<Body>>;

/// Handles one HTTP request on an MCP endpoint: the phases in order, each ending the request
/// early with its own typed answer when it must.
pub async fn handle(
    svc: &std::sync::Arc<McpService>,
    req: Request<Incoming>,
    remote: SocketAddr,
    endpoint: Endpoint,
) -> Response<Body> {
    match phases(svc, req, remote, endpoint).await {
        Ok(resp) => resp,
        Err(early) => *early,
    }
}

async fn phases(
    svc: &std::sync::Arc<McpService>,
    req: Request<Incoming>,
    remote: SocketAddr,
    endpoint: Endpoint,
) -> Result<Response<Body>, Answered> {
    // 1. read
    let (routing, header_era) = read_head(svc, &req)?;
    match (req.method(), header_era) {
        (&Method::POST, _) => {}
        (&Method::DELETE, HeaderEra::Handshake) if endpoint == Endpoint::Mcp => {
            return Ok(Box::pin(lifecycle::end_session(svc, req.headers())).await);
        }
        // A handshake-era session's own stream (`crate::streams`); none in the stateless era.
        (&Method::GET, HeaderEra::Handshake) if endpoint == Endpoint::Mcp => {
            return Ok(Box::pin(crate::streams::listen::open(svc, req.headers())).await);
        }
        (m, _) => return Err(Box::new(method_not_allowed(m))),
    }
    let (parts, body) = req.into_parts();
    // Authenticated from the header before the body is read (decode, HMAC chain, revocation
    // set: microseconds), so that an unauthenticated body is read no further than needed.
    let auth = http::bearer(&parts.headers)
        .ok_or(None)
        .and_then(|t| svc.authenticate(t).map_err(Some));
    let bytes = read_body(svc, body, &auth).await?;
    // 2. frame
    let rpc = frame(svc, &bytes, &auth)?;
    // 3. era: the revision, and the headers' agreement with the body, before anything else
    // looks at it.
    let era = classify(&routing, header_era, &rpc)
        .map_err(|e| Box::new(bad_request(rpc.id.as_ref(), &e)))?;
    // 4. authenticate: every method, notifications included, and a presented session.
    let mut grant = authenticated(svc, auth, &rpc)?;
    svc.step_ups.confirm(&mut grant).await;
    let session = session_of(svc, &parts.headers, endpoint, &era, &rpc, &grant).await?;
    if rpc.is_notification() {
        if rpc.method == "notifications/cancelled" {
            cancel::requested(svc, &grant, &rpc.params);
        }
        return Ok(http::status(StatusCode::ACCEPTED));
    }
    // 5.–8. decode → decide → forward → shape.
    Ok(method(
        svc,
        parts.headers,
        remote,
        endpoint,
        era,
        grant,
        session,
        rpc,
    )
    .await)
}

/// Phase 1, before the body: `Host`/`Origin` (DNS rebinding: a page whose name resolves to
/// this gateway is refused before anything) and the routing headers.
fn read_head(svc: &McpService, req: &Request<Incoming>) -> Result<(Routing, HeaderEra), Answered> {
    let host = http::header_str(req.headers(), HOST.as_str())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    origin::check(
        svc.settings.listen_ip,
        &svc.settings.allowed_hosts,
        &svc.settings.allowed_origins,
        host,
        http::header_str(req.headers(), ORIGIN.as_str()),
    )
    .map_err(|e| Box::new(rpc_response(StatusCode::FORBIDDEN, None, &e)))?;
    let routing = Routing::read(req.headers()).map_err(|e| Box::new(bad_request(None, &e)))?;
    let header_era = era::era_of_header(routing.version.as_deref());
    Ok((routing, header_era))
}

/// Phase 1, the body: bounded (a request that is not authenticated — no token, or a token
/// that does not verify — gets no more of its body read than it takes to echo the request's
/// id in the refusal; a larger one is refused at once, unread), with a deadline, and no deeper
/// than the nesting limit.
async fn read_body(
    svc: &McpService,
    body: Incoming,
    auth: &Result<Grant, Option<crate::capability::CapabilityError>>,
) -> Result<bytes::Bytes, Answered> {
    let limit = if auth.is_ok() {
        svc.settings.max_body_bytes
    } else {
        svc.settings.max_body_bytes.min(UNAUTHENTICATED_BODY_BYTES)
    };
    let bytes = match http::read_body_within(body, limit, svc.settings.body_timeout).await {
        Ok(b) => b,
        Err(http::BodyError::TooLarge { .. }) if auth.is_err() => {
            let err = RpcError::new(code::CAPABILITY, "capability check failed").with_data(
                Value::from(refusal_reason(auth.as_ref().err().and_then(Option::as_ref))),
            );
            return Err(Box::new(rpc_response(StatusCode::UNAUTHORIZED, None, &err)));
        }
        Err(e @ http::BodyError::Timeout(_)) => {
            let err = RpcError::new(code::INVALID_REQUEST, "Invalid Request")
                .with_data(Value::from(e.to_string()));
            return Err(Box::new(rpc_response(
                StatusCode::REQUEST_TIMEOUT,
                None,
                &err,
            )));
        }
        Err(e @ http::BodyError::TooLarge { .. }) => {
            let err = RpcError::new(code::INVALID_REQUEST, "Invalid Request")
                .with_data(Value::from(e.to_string()));
            return Err(Box::new(rpc_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                None,
                &err,
            )));
        }
        Err(e) => {
            let err = RpcError::new(code::PARSE_ERROR, "Parse error")
                .with_data(Value::from(e.to_string()));
            return Err(Box::new(bad_request(None, &err)));
        }
    };
    if !http::json_depth_within(&bytes, svc.settings.max_json_depth) {
        let err = RpcError::new(code::INVALID_REQUEST, "Invalid Request").with_data(Value::from(
            format!("JSON nesting deeper than {}", svc.settings.max_json_depth),
        ));
        return Err(Box::new(bad_request(None, &err)));
    }
    Ok(bytes)
}

/// Phase 2: one JSON-RPC request. An agent's reply to a request the upstream sent it during a
/// call (`crate::mcp::relay`) is taken here, only from the token it was relayed to.
fn frame(
    svc: &McpService,
    bytes: &[u8],
    auth: &Result<Grant, Option<crate::capability::CapabilityError>>,
) -> Result<RpcRequest, Answered> {
    match jsonrpc::parse(bytes) {
        Ok(Message::Request(r)) => Ok(r),
        Ok(Message::Response(reply)) => {
            let Ok(grant) = auth else {
                let err = RpcError::new(code::CAPABILITY, "capability check failed")
                    .with_data(Value::from("missing or invalid capability token"));
                return Err(Box::new(rpc_response(StatusCode::UNAUTHORIZED, None, &err)));
            };
            if svc.relays.deliver(&grant.tenant, &grant.token_key(), reply) {
                return Err(Box::new(http::status(StatusCode::ACCEPTED)));
            }
            let err = RpcError::new(code::INVALID_REQUEST, "Invalid Request").with_data(
                Value::from("no request of this token waits for a reply with this id"),
            );
            Err(Box::new(rpc_response(StatusCode::NOT_FOUND, None, &err)))
        }
        Err((id, err)) => Err(Box::new(bad_request(id.as_ref(), &err))),
    }
}

/// Phase 4: the token verified before the body was read, or the refusal (era and framing
/// errors answer first, as they always did).
fn authenticated(
    svc: &McpService,
    auth: Result<Grant, Option<crate::capability::CapabilityError>>,
    rpc: &RpcRequest,
) -> Result<Grant, Answered> {
    auth.map_err(|e| {
        if crate::metrics::decisions::is_decided_method(&rpc.method) {
            svc.metrics().decisions.record_unauthenticated();
        }
        let err = RpcError::new(code::CAPABILITY, "capability check failed")
            .with_data(Value::from(refusal_reason(e.as_ref())));
        let status = if rpc.is_notification() {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::OK
        };
        Box::new(rpc_response(status, rpc.id.as_ref(), &err))
    })
}

/// Phase 4, the session: a presented id must be ours, belong to this token and not have
/// ended; the stateless era and `/v1/tool-call` have none.
async fn session_of(
    svc: &McpService,
    headers: &hyper::HeaderMap,
    endpoint: Endpoint,
    era: &Era,
    rpc: &RpcRequest,
    grant: &Grant,
) -> Result<Option<String>, Answered> {
    match http::header_str(headers, SESSION_HEADER) {
        _ if era.is_modern() || endpoint == Endpoint::ToolCall => Ok(None),
        Some(id) if rpc.method != "initialize" => {
            match lifecycle::presented_session(svc, id, grant).await {
                Ok(()) => Ok(Some(id.to_owned())),
                Err((status, err)) => Err(Box::new(rpc_response(status, rpc.id.as_ref(), &err))),
            }
        }
        _ => Ok(None),
    }
}

/// Phases 5–8 of one method: decode → decide → forward → shape ([`CallContext::dispatch`]:
/// the params decoded, decided by the pipeline into a permit or a denial mapped by
/// [`denial`], forwarded with the permit, the result shaped for the client's revision).
#[allow(clippy::too_many_arguments)]
async fn method(
    svc: &std::sync::Arc<McpService>,
    headers: hyper::HeaderMap,
    remote: SocketAddr,
    endpoint: Endpoint,
    era: Era,
    grant: Grant,
    session: Option<String>,
    rpc: RpcRequest,
) -> Response<Body> {
    let id = rpc.id.clone().unwrap_or(Value::Null);
    // A handshake-era tool call whose client takes an event stream: the upstream may ask that
    // client something while it works (sampling, elicitation), relayed on the stream.
    if endpoint == Endpoint::Mcp
        && !era.is_modern()
        && rpc.method == "tools/call"
        && accepts_event_stream(&headers)
        && !svc.upstreams.is_empty()
    {
        let call = streamed::Owned {
            svc: std::sync::Arc::clone(svc),
            grant,
            headers,
            remote,
            session,
            era,
            endpoint,
            rpc,
        };
        return streamed::call(call).await;
    }
    // A stateless client's subscription stream (`listen.rs`): its own long-lived answer.
    if endpoint == Endpoint::Mcp && era.is_modern() && rpc.method == "subscriptions/listen" {
        let listen = listen::Owned {
            svc: std::sync::Arc::clone(svc),
            grant,
            headers,
            remote,
            era,
            rpc,
        };
        return Box::pin(listen::open(listen)).await;
    }
    let ctx = CallContext::new(svc, &grant, &headers, remote, session.as_deref(), &era);
    if endpoint == Endpoint::Mcp && !era.is_modern() && rpc.method == "initialize" {
        return Box::pin(ctx.initialize(&rpc, &id)).await;
    }
    // Boxed, as every large future on a request's path: nested inline it would size this
    // function's future, which its callers copy (see `crate::telemetry::trace::scope`).
    let outcome = Box::pin(ctx.dispatch(endpoint, &rpc)).await;
    // An escalated call waits for its approval here when the client asked to wait (or sync is
    // the gateway's mode); otherwise `-32019` tells it how to resume.
    if outcome.is_err()
        && let Some(pending) = ctx.take_pending()
        && let Some(slot) = hold::wanted(svc, &headers, &grant.tenant, pending.mode)
            .then(|| svc.streams.hold(&grant.tenant))
            .flatten()
    {
        let held = hold::Held {
            svc: std::sync::Arc::clone(svc),
            grant: grant.clone(),
            headers: headers.clone(),
            remote,
            session: session.clone(),
            era: era.clone(),
            endpoint,
            rpc,
            pending,
            _slot: slot,
        };
        return Box::pin(held.respond(accepts_event_stream(&headers))).await;
    }
    ctx.respond(&headers, &id, outcome)
}

impl<'a> CallContext<'a> {
    fn new(
        svc: &'a McpService,
        grant: &'a Grant,
        headers: &'a hyper::HeaderMap,
        remote: SocketAddr,
        session: Option<&'a str>,
        era: &'a Era,
    ) -> Self {
        CallContext {
            svc,
            grant,
            headers,
            remote,
            session,
            era,
            notifications: std::sync::Mutex::new(Vec::new()),
            approval: None,
            pending: std::sync::Mutex::new(None),
            decided: std::sync::Mutex::new(None),
            to_client: None,
            owner: None,
        }
    }

    /// Runs one method (not `initialize`, which answers with its own headers).
    async fn dispatch(&self, endpoint: Endpoint, rpc: &RpcRequest) -> Result<ResultBody, RpcError> {
        if rpc.method == "tools/call" {
            return self.tools_call(rpc).await;
        }
        self.dispatch_other(endpoint, rpc)
            .await
            .map(ResultBody::from)
    }

    /// The methods other than `tools/call`, whose results the gateway builds as trees.
    async fn dispatch_other(
        &self,
        endpoint: Endpoint,
        rpc: &RpcRequest,
    ) -> Result<Value, RpcError> {
        let ctx = self;
        let modern = self.era.is_modern();
        // Each revision's methods: the stateless one has no initialize, ping, logging/setLevel
        // or subscribe pair (its subscriptions are a `subscriptions/listen` stream, answered
        // before dispatch by `listen.rs`).
        match (endpoint, modern, rpc.method.as_str()) {
            (Endpoint::ToolCall, _, other) => Err(method_not_found(other)),
            (_, false, "ping") => Ok(json!({})),
            (_, false, "logging/setLevel") => set_level(rpc),
            (_, true, "server/discover") => {
                Ok(discover::discover_result(&ctx.upstream_profile().await))
            }
            (_, _, m) if methods::is_list(m) => ctx.list(rpc).await,
            (_, _, "resources/read" | "prompts/get" | "completion/complete")
            | (_, false, "resources/subscribe") => ctx.target(rpc).await,
            (_, false, "resources/unsubscribe") => ctx.forward_plain(rpc).await,
            (_, _, other) => Err(method_not_found(other)),
        }
    }

    /// The HTTP answer of a method's outcome, with the upstream's relayed notifications.
    fn respond(
        &self,
        headers: &hyper::HeaderMap,
        id: &Id,
        outcome: Result<ResultBody, RpcError>,
    ) -> Response<Body> {
        respond_parts(
            headers,
            id,
            self.era.is_modern(),
            outcome,
            self.take_notifications(),
            self.decided(),
        )
    }

    fn decided(&self) -> Option<Decided> {
        self.decided.lock().ok().and_then(|d| *d)
    }

    /// The permit's summary in the result as `_intentgate`, when the operator asked for it
    /// (`INTENTGATE_ANNOTATE_RESULTS`); the response headers carry the decision either way.
    fn annotate(&self, result: &mut impl translate::Members, permit: &crate::pipeline::Permit) {
        if self.svc.settings.annotate_results {
            result.set("_intentgate", crate::pipeline::decision_summary(permit));
        }
    }

    /// The approval a held call was waiting for, once the pipeline asked for one.
    fn take_pending(&self) -> Option<crate::pipeline::Pending> {
        self.pending.lock().ok().and_then(|mut p| p.take())
    }

    /// The approval this request resumes: the held call's own, or the agent's header.
    fn approval_id(&self) -> Option<&str> {
        self.approval
            .as_deref()
            .or_else(|| http::header_str(self.headers, "x-intentgate-approval-id"))
    }
}

struct CallContext<'a> {
    svc: &'a McpService,
    grant: &'a Grant,
    headers: &'a hyper::HeaderMap,
    remote: SocketAddr,
    session: Option<&'a str>,
    era: &'a Era,
    /// The upstream's notifications for this request, to relay with the answer.
    notifications: std::sync::Mutex<Vec<Value>>,
    /// The approval a held call resumes once it was approved (overrides the header).
    approval: Option<String>,
    /// Set when the pipeline put the call in the approval queue.
    pending: std::sync::Mutex<Option<crate::pipeline::Pending>>,
    /// The pipeline's decision on this request and its audit event, for the response headers.
    decided: std::sync::Mutex<Option<Decided>>,
    /// Where requests of the upstream for this call's client go (`relay.rs`), when the client
    /// takes an event stream.
    to_client: Option<tokio::sync::mpsc::Sender<Value>>,
    /// The gateway, owned, for what outlives a borrow of this request (the relayed requests'
    /// handler, `relay.rs`); set where the call runs in its own task.
    owner: Option<std::sync::Arc<McpService>>,
}

/// What the `X-IntentGate-Decision` and `X-IntentGate-Event-Id` response headers say.
#[derive(Debug, Clone, Copy)]
struct Decided {
    decision: &'static str,
    event_id: Option<i64>,
}

impl Decided {
    fn of(result: &Result<crate::pipeline::Permit, crate::pipeline::Denial>) -> Self {
        use crate::pipeline::Denial;
        match result {
            Ok(p) => Self {
                decision: "allow",
                event_id: Some(p.event_id),
            },
            Err(Denial::ApprovalPending(_) | Denial::Escalated(_)) => Self {
                decision: "escalate",
                event_id: None,
            },
            Err(_) => Self {
                decision: "block",
                event_id: None,
            },
        }
    }

    fn stamp(self, resp: &mut Response<Body>) {
        let h = resp.headers_mut();
        h.insert(DECISION_HEADER, HeaderValue::from_static(self.decision));
        if let Some(id) = self.event_id
            && let Ok(v) = HeaderValue::from_str(&id.to_string())
        {
            h.insert(EVENT_ID_HEADER, v);
        }
    }
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
    /// Decides `call` and returns its permit with the upstream to forward to. Without an
    /// upstream, the failure is recorded against the decision and the call refused.
    async fn decide(
        &self,
        call: &crate::pipeline::ToolCall<'_>,
    ) -> Result<(crate::pipeline::Permit, &crate::upstream::Upstream), RpcError> {
        let decided = self.svc.pipeline.decide(call).await;
        if let Ok(mut slot) = self.decided.lock() {
            *slot = Some(Decided::of(&decided));
        }
        let permit = decided.map_err(|d| {
            if let crate::pipeline::Denial::ApprovalPending(p) = &d
                && let Ok(mut slot) = self.pending.lock()
            {
                *slot = Some(p.clone());
            }
            denial::rpc_error(&d)
        })?;
        let Some(upstream) = call.upstream.and_then(|n| self.svc.upstreams.get(n)) else {
            let e = UpstreamError::NotConfigured;
            self.svc.metrics().upstream.error_at(call.upstream, &e);
            self.svc
                .pipeline
                .record_upstream_failure(call, &permit, 0, &e.to_string())
                .await;
            return Err(upstream_rpc_error(&e));
        };
        Ok((permit, upstream))
    }

    /// The answer of a forwarded request, its relayable notifications kept for the client.
    fn relay_notifications(
        &self,
        relayed: crate::upstream::Relayed,
        params: &serde_json::Map<String, Value>,
    ) -> crate::upstream::Reply {
        let token = params.get("_meta").and_then(|m| m.get("progressToken"));
        let keep = translate::relayable(relayed.notifications, token);
        if let Ok(mut n) = self.notifications.lock() {
            n.extend(keep);
        }
        relayed.reply
    }

    fn take_notifications(&self) -> Vec<Value> {
        self.notifications
            .lock()
            .map(|mut n| std::mem::take(&mut *n))
            .unwrap_or_default()
    }

    /// What the upstreams this token reaches say about themselves (their union; the others'
    /// names and instructions stay hidden, as everywhere else); when none can be asked, the
    /// gateway answers alone.
    async fn upstream_profile(&self) -> UpstreamProfile {
        let grant = self.grant;
        self.svc.upstreams.profile(|name| grant.reaches(name)).await
    }
}

/// The HTTP answer of a method's outcome, with the upstream's relayed notifications and the
/// decision headers.
fn respond_parts(
    headers: &hyper::HeaderMap,
    id: &Id,
    modern: bool,
    outcome: Result<ResultBody, RpcError>,
    notifications: Vec<Value>,
    decided: Option<Decided>,
) -> Response<Body> {
    let mut resp = match outcome {
        // Notifications the upstream sent before its answer go first, as events of one SSE
        // stream, to a client that accepts one (in the upstream's order, after the answer
        // arrived: they are not streamed as they come yet).
        Ok(result) if !notifications.is_empty() && accepts_event_stream(headers) => {
            translate::event_stream(&notifications, &jsonrpc::result(id, &result))
        }
        Ok(result) => http::json_bytes(StatusCode::OK, jsonrpc::result(id, &result)),
        Err(err) => {
            let status = if modern {
                StatusCode::from_u16(era::modern_status(err.code)).unwrap_or(StatusCode::OK)
            } else {
                StatusCode::OK
            };
            rpc_response(status, Some(id), &err)
        }
    };
    if let Some(d) = decided {
        d.stamp(&mut resp);
    }
    resp
}
