//! Forwarding to the upstream MCP server (streamable HTTP; JSON or SSE responses), in whichever
//! revision it speaks.
//!
//! An upstream whose revision is pinned (`"revision"` in the upstreams document, see
//! [`crate::config::UpstreamRevision`]) is never probed: the gateway speaks that revision to it
//! and nothing else, and asks its `server/discover` only for what it says about itself.
//! Otherwise the gateway learns the upstream's revision once: it probes `server/discover` at the newest
//! stateless revision (2026-07-28); a result that offers that revision means "stateless", and
//! anything short of that positive evidence — a handshake-only server answers HTTP 400
//! `-32600` "Missing session ID", others 404 or `-32601` — means "handshake era". The verdict
//! is cached, forgotten when the upstream fails or answers as the other era would, and learned
//! again. Toward a stateless upstream there is no session: each request carries its own
//! `_meta` envelope and routing headers computed from the body being sent. Toward a
//! handshake-era upstream there is one shared session, opened lazily and reopened when the
//! upstream forgets it, so calls do not pay a handshake each. One pooled HTTP client (http, or
//! https with the TLS client configuration built once at start-up, see [`crate::tls`]); every
//! exchange is bounded in time and size; failures are [`UpstreamError`]s, distinct from
//! authorization denials, that name their cause (a TLS failure says which check failed). This
//! module must never forward a `tools/call` without a [`crate::pipeline::Permit`], never send
//! a header taken from the agent's request (the W3C `traceparent` is computed for the hop by
//! [`crate::telemetry::trace`]; only the agent's `tracestate` is carried on), and never show the URL's userinfo or query (they
//! may carry credentials): logs use [`Upstream::redacted_uri`], errors are scrubbed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Map, Value, json};

use crate::config::UpstreamRevision;
use crate::mcp::discover::UpstreamProfile;
use crate::mcp::era::{Envelope, LATEST_MODERN, MODERN_VERSIONS, meta};
use crate::mcp::jsonrpc::code;
use crate::mcp::{headers, params};
use crate::pipeline::Cleared;

mod listen;
mod message;
mod session_stream;
pub use listen::{ACKNOWLEDGED, ListenFrame, UpstreamListen};
use message::{
    Events, Message, find_json_response, find_sse_response, is_notification, keep,
    sse_event_message,
};
pub use message::{MAX_NOTIFICATIONS, Reply};

/// The protocol revision the gateway asks a handshake-era upstream for.
pub const HANDSHAKE_VERSION: &str = "2025-11-25";

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream configured")]
    NotConfigured,
    #[error("upstream unreachable: {0}")]
    Unavailable(String),
    #[error("upstream timed out after {0:?}")]
    Timeout(Duration),
    #[error("upstream answered HTTP {status}")]
    Status { status: u16, detail: String },
    #[error("upstream response exceeds {0} bytes")]
    TooLarge(usize),
    #[error("upstream response is not a JSON-RPC answer: {0}")]
    Malformed(String),
    /// The upstream took the request (its answer had begun), then the exchange failed: the
    /// request may have run, so it is never sent again.
    #[error("the upstream took the request, then the exchange failed: {0}")]
    Interrupted(String),
    /// The body about to be sent is not the one the pipeline decided (a gateway defect; the
    /// call is refused, never sent).
    #[error("refused to forward a body that is not the one decided")]
    NotDecided,
}

impl UpstreamError {
    /// The HTTP status to record in the audit event (0 when none was received).
    pub fn status(&self) -> u16 {
        match self {
            Self::Status { status, .. } => *status,
            _ => 0,
        }
    }
}

/// An answer with the notifications the upstream sent before it in the same response (SSE
/// events or NDJSON lines: progress, log messages), in order, at most [`MAX_NOTIFICATIONS`].
#[derive(Debug, Clone)]
pub struct Relayed {
    pub reply: Reply,
    pub notifications: Vec<Value>,
}

/// The revision the upstream was found to speak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamEra {
    /// Stateless, at this revision.
    Modern(String),
    Handshake,
}

/// What the probe learned (or the configuration pinned).
enum Peer {
    /// Stateless at `version`; `discover` is the upstream's `server/discover` result (`None`
    /// when the revision is pinned and it was not asked yet).
    Modern {
        version: String,
        discover: Option<Value>,
    },
    Handshake,
}

struct Session {
    id: Option<HeaderValue>,
    protocol_version: HeaderValue,
    initialize_result: Value,
}

/// One HTTP exchange: the status, the JSON-RPC answer if the body held one, the session header.
struct Answer {
    status: StatusCode,
    reply: Option<Reply>,
    session_id: Option<HeaderValue>,
    detail: String,
    notifications: Vec<Value>,
}

impl Answer {
    fn error_code(&self) -> Option<i64> {
        match &self.reply {
            Some(Reply::Error(e)) => e.get("code").and_then(Value::as_i64),
            _ => None,
        }
    }

    /// A stateless upstream answering as if it no longer spoke that revision (a handshake-only
    /// server's "Missing session ID", an unsupported version, a routing-header refusal), or
    /// not answering the method at all at the HTTP level. Refused before dispatch, so the
    /// request can be sent again in the other era.
    fn wrong_era(&self) -> bool {
        match self.status.as_u16() {
            400 => matches!(
                self.error_code(),
                Some(code::INVALID_REQUEST | code::UNSUPPORTED_VERSION | code::HEADER_MISMATCH)
            ),
            404..=406 => self.reply.is_none(),
            _ => false,
        }
    }

    /// The reply a caller gets: a JSON-RPC answer is passed on whatever the HTTP status (a
    /// stateless server maps its errors to 400/404); anything else is an HTTP failure.
    fn settle(self) -> Result<Reply, UpstreamError> {
        self.settle_relayed().map(|r| r.reply)
    }

    /// [`Answer::settle`] with the notifications that came before the answer.
    fn settle_relayed(self) -> Result<Relayed, UpstreamError> {
        let notifications = self.notifications;
        let reply = match self.reply {
            Some(r @ Reply::Result(_)) if self.status == StatusCode::OK => Ok(r),
            Some(e @ Reply::Error(_)) => Ok(e),
            _ => Err(UpstreamError::Status {
                status: self.status.as_u16(),
                detail: self.detail,
            }),
        }?;
        Ok(Relayed {
            reply,
            notifications,
        })
    }
}

fn client_info() -> Value {
    json!({"name": "intentgate", "version": env!("CARGO_PKG_VERSION")})
}

/// How the gateway talks to one upstream (from its [`crate::config::NamedUpstream`]).
#[derive(Debug, Clone)]
pub struct Options {
    /// Bound on one exchange.
    pub timeout: Duration,
    /// Bound on opening a connection.
    pub connect_timeout: Duration,
    /// Largest answer read.
    pub max_response: usize,
    /// The revision spoken: learned by a probe, or pinned (never probed).
    pub revision: UpstreamRevision,
    /// The name an https upstream's certificate is checked against, instead of the URL's host.
    pub server_name: Option<rustls::pki_types::ServerName<'static>>,
}

impl Options {
    /// `timeout` for connecting too, the revision learned, the certificate checked against
    /// the URL's host.
    pub fn new(timeout: Duration, max_response: usize) -> Self {
        Self {
            timeout,
            connect_timeout: timeout,
            max_response,
            revision: UpstreamRevision::Auto,
            server_name: None,
        }
    }
}

/// The pooled client for one upstream server.
pub struct Upstream {
    uri: Uri,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    max_response: usize,
    revision: UpstreamRevision,
    next_id: AtomicU64,
    peer: ArcSwapOption<Peer>,
    learning: tokio::sync::Mutex<()>,
    session: ArcSwapOption<Session>,
    opening: tokio::sync::Mutex<()>,
    /// Each tool's `x-mcp-header` arguments, learned from its `tools/list` (SEP-2243), so the
    /// `Mcp-Param-*` headers of a forwarded call are computed from its arguments.
    marked: arc_swap::ArcSwap<std::collections::HashMap<String, Arc<params::Marked>>>,
    /// When the tool list was last read to learn a tool not seen yet (unix ms).
    marked_refreshed: std::sync::atomic::AtomicI64,
    /// A stateless upstream that refused a handshake-era session (see `request_with`).
    no_session: std::sync::atomic::AtomicBool,
    /// An upstream that sends its session stream's headers only with the stream's first
    /// message (Node's `http` does, for the TypeScript SDK): a new session no longer waits for
    /// them (see `session`).
    stream_headers_late: std::sync::atomic::AtomicBool,
    /// The calls in flight in the shared session, for the requests the upstream sends on the
    /// session's own stream (`session_stream.rs`).
    session_calls: Arc<session_stream::Calls>,
    /// The shared session was ended ([`Upstream::end_session`], at shutdown): none is opened
    /// again, or the upstream would keep one nobody ends.
    ended: std::sync::atomic::AtomicBool,
}

/// Answers a request the upstream sends while it works on a call (`sampling/createMessage`,
/// `elicitation/create`, `roots/list`): given the request message, the reply's `result` or
/// `error` member, as an object. It is also handed the call's notifications as they arrive
/// (its answer to those is ignored).
pub type AskClient =
    dyn Fn(Value) -> crate::store::BoxFuture<'static, Map<String, Value>> + Send + Sync;

/// Who answers what the upstream asks during one call: the call's token (its tenant and token
/// id, so the session's own stream can tell one agent's calls from another's) and the
/// [`AskClient`] that decides and relays.
pub struct ServerRequests {
    owner: String,
    ask: Box<AskClient>,
}

impl ServerRequests {
    pub fn new(
        tenant: &str,
        token: &str,
        ask: impl Fn(Value) -> crate::store::BoxFuture<'static, Map<String, Value>>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self {
            // Length-prefixed, so no two (tenant, token) pairs give one owner. The token's own
            // key (`Grant::token_key`), not its id: a token attenuated from another shares
            // its id, and must not be asked what the other's call asked.
            owner: format!("{}:{tenant}{token}", tenant.len()),
            ask: Box::new(ask),
        }
    }

    /// Whose call this is: one value per tenant and token.
    pub(super) fn owner(&self) -> &str {
        &self.owner
    }

    #[cfg(test)]
    pub(crate) fn owner_for_tests(&self) -> String {
        self.owner.clone()
    }

    pub(super) fn ask(
        &self,
        request: Value,
    ) -> crate::store::BoxFuture<'static, Map<String, Value>> {
        (self.ask)(request)
    }
}

/// What a call carries beyond its body toward the upstream.
#[derive(Clone, Copy, Default)]
struct Extras<'a> {
    /// The called tool's `x-mcp-header` arguments (a stateless upstream's routing headers).
    marked: Option<&'a params::Marked>,
    /// Who answers the upstream's requests during the call (a handshake-era upstream's
    /// server-to-client requests); without it they are refused.
    server_requests: Option<&'a Arc<ServerRequests>>,
}

/// The client capabilities declared toward a stateless upstream for a handshake-era client
/// whose requests can be relayed (its input requests are asked on the client's event stream).
fn relayable_capabilities() -> Value {
    json!({"sampling": {}, "elicitation": {"form": {}, "url": {}}, "roots": {}})
}

/// How long the upstream may go silent while it works on a call that relays server requests
/// (a person may be answering an elicitation).
const RELAYED_CALL_IDLE: Duration = Duration::from_secs(300);
/// How long the first call of a new handshake-era session waits for the session's own stream
/// to open (it goes on without it after that, and later sessions do not wait).
const STREAM_OPEN_WAIT: Duration = Duration::from_secs(2);

/// Most server requests one call may relay.
const MAX_SERVER_REQUESTS: usize = 32;

/// Most tools whose marked arguments are remembered.
const MAX_MARKED_TOOLS: usize = 10_000;
/// A tool not seen in any listing makes the gateway read the list at most this often.
const MARKED_REFRESH_MS: i64 = 10_000;

impl Upstream {
    /// `tls` is used when the URI is https (the configuration is built once, at start-up); an
    /// http URI never negotiates TLS.
    pub fn new(
        uri: Uri,
        timeout: Duration,
        max_response: usize,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        Self::with_options(uri, Options::new(timeout, max_response), tls)
    }

    /// [`Upstream::new`] with every setting of its own ([`Options`]).
    pub fn with_options(uri: Uri, options: Options, tls: Arc<rustls::ClientConfig>) -> Self {
        let Options {
            timeout,
            connect_timeout,
            max_response,
            revision,
            server_name,
        } = options;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(false);
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(Arc::unwrap_or_clone(tls))
            .https_or_http();
        let builder = match server_name {
            Some(name) => {
                builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
            }
            None => builder,
        };
        let connector = builder.enable_http1().wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector);
        Self {
            uri,
            client,
            timeout,
            max_response,
            revision,
            next_id: AtomicU64::new(1),
            peer: ArcSwapOption::empty(),
            learning: tokio::sync::Mutex::new(()),
            session: ArcSwapOption::empty(),
            opening: tokio::sync::Mutex::new(()),
            marked: arc_swap::ArcSwap::from_pointee(std::collections::HashMap::new()),
            marked_refreshed: std::sync::atomic::AtomicI64::new(0),
            no_session: std::sync::atomic::AtomicBool::new(false),
            stream_headers_late: std::sync::atomic::AtomicBool::new(false),
            session_calls: Arc::default(),
            ended: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Where the notifications the upstream sends outside any call go (resource updates, list
    /// changes, on its session's own stream). Set once, at start-up.
    pub fn on_notifications(&self, sink: Arc<session_stream::Notifications>) {
        self.session_calls.set_sink(sink);
    }

    /// Remembers the marked arguments of the tools of a `tools/list` result page.
    fn learn_tools(&self, result: &Value) {
        let Some(tools) = result.get("tools").and_then(Value::as_array) else {
            return;
        };
        let mut next = std::collections::HashMap::clone(&self.marked.load());
        for t in tools {
            let (Some(name), Some(schema)) =
                (t.get("name").and_then(Value::as_str), t.get("inputSchema"))
            else {
                continue;
            };
            let m = params::marked(schema);
            if m.is_empty() {
                next.remove(name);
            } else if next.len() < MAX_MARKED_TOOLS || next.contains_key(name) {
                next.insert(name.to_owned(), Arc::new(m));
            }
        }
        self.marked.store(Arc::new(next));
    }

    /// The `x-mcp-header` arguments of `tool` (empty when it marks none). A tool not seen in a
    /// listing yet has the upstream's list read (all pages, at most every 10 s).
    pub async fn marked_arguments(&self, tool: &str) -> Arc<params::Marked> {
        if let Some(m) = self.marked.load().get(tool) {
            return Arc::clone(m);
        }
        let now = crate::audit::time::now_ms();
        let last = self.marked_refreshed.load(Ordering::Relaxed);
        if now - last >= MARKED_REFRESH_MS
            && self
                .marked_refreshed
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let mut cursor: Option<Value> = None;
            for _page in 0..20 {
                let listed = self.list_tools(cursor.as_ref()).await;
                let Some(r) = listed.ok().as_ref().and_then(Reply::result_tree) else {
                    break;
                };
                cursor = r.get("nextCursor").filter(|c| !c.is_null()).cloned();
                if cursor.is_none() {
                    break;
                }
            }
        }
        self.marked.load().get(tool).cloned().unwrap_or_default()
    }

    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The revision configured: learned (`auto`) or pinned.
    pub fn revision(&self) -> UpstreamRevision {
        self.revision
    }

    /// The URI as it may be shown: without userinfo or query (they may carry credentials).
    pub fn redacted_uri(&self) -> String {
        crate::config::redact_url(&self.uri)
    }

    /// An error as it may leave this module: any text that echoes the URL's credentials (a
    /// client library's message, an upstream's error page) has them removed.
    fn scrubbed(&self, e: UpstreamError) -> UpstreamError {
        let scrub = |t: String| crate::config::scrub_url_secrets(&t, &self.uri);
        match e {
            UpstreamError::Unavailable(t) => UpstreamError::Unavailable(scrub(t)),
            UpstreamError::Status { status, detail } => UpstreamError::Status {
                status,
                detail: scrub(detail),
            },
            UpstreamError::Malformed(t) => UpstreamError::Malformed(scrub(t)),
            UpstreamError::Interrupted(t) => UpstreamError::Interrupted(scrub(t)),
            other => other,
        }
    }

    /// The revision the upstream speaks (probing it if not known yet).
    pub async fn era(&self) -> Result<UpstreamEra, UpstreamError> {
        Ok(match &*self.peer().await.map_err(|e| self.scrubbed(e))? {
            Peer::Modern { version, .. } => UpstreamEra::Modern(version.clone()),
            Peer::Handshake => UpstreamEra::Handshake,
        })
    }

    /// What the upstream says about itself: its `server/discover` result when stateless, its
    /// `initialize` result otherwise (opening the shared session if needed).
    pub async fn profile(&self) -> Result<UpstreamProfile, UpstreamError> {
        self.describe().await.map_err(|e| self.scrubbed(e))
    }

    async fn describe(&self) -> Result<UpstreamProfile, UpstreamError> {
        let peer = self.peer().await?;
        let described = match &*peer {
            Peer::Modern {
                discover: Some(d), ..
            } => d.clone(),
            Peer::Modern {
                version,
                discover: None,
            } => self.discover_pinned(&peer, version).await?,
            Peer::Handshake => self.session().await?.initialize_result.clone(),
        };
        Ok(UpstreamProfile {
            capabilities: described.get("capabilities").cloned(),
            instructions: described
                .get("instructions")
                .and_then(Value::as_str)
                .map(str::to_owned),
        })
    }

    /// Lists tools (one page; `cursor` as the client sent it).
    pub async fn list_tools(&self, cursor: Option<&Value>) -> Result<Reply, UpstreamError> {
        let mut params = Map::new();
        if let Some(c) = cursor {
            params.insert("cursor".into(), c.clone());
        }
        self.request("tools/list", params, None)
            .await
            .map(|r| r.reply)
            .map_err(|e| self.scrubbed(e))
    }

    /// Forwards a method that needs no decision of its own (lists, `resources/unsubscribe`):
    /// the agent was authenticated and the result is filtered by the caller. A method that
    /// reaches a target (see [`needs_permit`]) is refused here: it goes through
    /// [`Upstream::forward_permitted`].
    pub async fn forward(
        &self,
        method: &str,
        params: Map<String, Value>,
        relay: Option<&Envelope>,
    ) -> Result<Reply, UpstreamError> {
        if needs_permit(method) {
            return Err(UpstreamError::Malformed(format!(
                "{method} needs a permit to be forwarded"
            )));
        }
        self.request(method, params, relay)
            .await
            .map(|r| r.reply)
            .map_err(|e| self.scrubbed(e))
    }

    /// Forwards a `resources/read`, `resources/subscribe`, `prompts/get` or
    /// `completion/complete` that the pipeline permitted (`params` as decided).
    pub async fn forward_permitted(
        &self,
        cleared: Cleared<'_>,
        method: &str,
        params: Map<String, Value>,
        relay: Option<&Envelope>,
    ) -> Result<Relayed, UpstreamError> {
        sends_what_was_cleared(cleared, method, &params)?;
        self.request(method, params, relay)
            .await
            .map_err(|e| self.scrubbed(e))
    }

    /// Forwards a `tools/call` that the pipeline permitted. `relay` is the envelope of a
    /// stateless-era client, whose capabilities a stateless upstream may use (input requests
    /// travel back to that client); otherwise the gateway declares none.
    pub async fn call_tool(
        &self,
        cleared: Cleared<'_>,
        params: Map<String, Value>,
        relay: Option<&Envelope>,
    ) -> Result<Relayed, UpstreamError> {
        self.call_tool_relaying(cleared, params, relay, None).await
    }

    /// [`Self::call_tool`] with `server_requests` answering what a handshake-era upstream asks
    /// the client while it works on the call (see [`ServerRequests`]).
    pub async fn call_tool_relaying(
        &self,
        cleared: Cleared<'_>,
        params: Map<String, Value>,
        relay: Option<&Envelope>,
        server_requests: Option<&Arc<ServerRequests>>,
    ) -> Result<Relayed, UpstreamError> {
        sends_what_was_cleared(cleared, "tools/call", &params)?;
        self.call_tool_with(params, relay, server_requests).await
    }

    /// [`Self::call_tool_relaying`] in a task of its own, so the call can outlive the request
    /// that made it: a handshake-era upstream's call held open while a 2026-07-28 client
    /// answers, in later requests, what the upstream asks it (`mcp/relay.rs`).
    pub fn spawn_call_tool(
        self: &Arc<Self>,
        cleared: Cleared<'_>,
        params: Map<String, Value>,
        relay: Option<Envelope>,
        server_requests: Arc<ServerRequests>,
    ) -> Result<tokio::task::JoinHandle<Result<Relayed, UpstreamError>>, UpstreamError> {
        sends_what_was_cleared(cleared, "tools/call", &params)?;
        let me = Arc::clone(self);
        Ok(tokio::spawn(crate::telemetry::trace::propagate(
            async move {
                me.call_tool_with(params, relay.as_ref(), Some(&server_requests))
                    .await
            },
        )))
    }

    async fn call_tool_with(
        &self,
        params: Map<String, Value>,
        relay: Option<&Envelope>,
        server_requests: Option<&Arc<ServerRequests>>,
    ) -> Result<Relayed, UpstreamError> {
        // A stateless upstream validates the `Mcp-Param-*` headers of the arguments its
        // schema marks; they are computed from the forwarded arguments.
        let peer = self.peer().await.map_err(|e| self.scrubbed(e))?;
        let modern = matches!(&*peer, Peer::Modern { .. });
        let marked = match params.get("name").and_then(Value::as_str) {
            Some(tool) if modern => Some(self.marked_arguments(tool).await),
            _ => None,
        };
        let extras = Extras {
            marked: marked.as_deref(),
            server_requests,
        };
        self.request_with("tools/call", params, relay, extras)
            .await
            .map_err(|e| self.scrubbed(e))
    }

    /// Sends one request in the upstream's revision; when the upstream answers as the other
    /// revision would (refused before dispatch), learns its revision again and sends once more.
    async fn request(
        &self,
        method: &str,
        params: Map<String, Value>,
        relay: Option<&Envelope>,
    ) -> Result<Relayed, UpstreamError> {
        self.request_with(method, params, relay, Extras::default())
            .await
    }

    /// [`Self::request`] with what the call carries beyond its body ([`Extras`]).
    async fn request_with(
        &self,
        method: &str,
        params: Map<String, Value>,
        relay: Option<&Envelope>,
        extras: Extras<'_>,
    ) -> Result<Relayed, UpstreamError> {
        let peer = self.peer().await?;
        // A handshake-era client that can be asked things during the call is served through
        // the upstream's session when the upstream speaks that era too: its requests then come
        // as they would to that client (a stateless-only upstream asks through input-required
        // results instead, relayed by the caller).
        if extras.server_requests.is_some()
            && matches!(&*peer, Peer::Modern { .. })
            && self.revision == UpstreamRevision::Auto
            && !self.no_session.load(Ordering::Relaxed)
        {
            match self
                .send_in_session(method, &params, extras.server_requests)
                .await
            {
                Ok(answer) if !answer.wrong_era() => return self.settled(method, answer),
                Ok(_) | Err(UpstreamError::Status { .. } | UpstreamError::Malformed(_)) => {
                    tracing::info!(upstream = %self.redacted_uri(), "upstream has no handshake-era session; relaying through input-required results");
                    self.no_session.store(true, Ordering::Relaxed);
                    self.session.store(None);
                }
                Err(e) => return Err(e),
            }
        }
        match self.send_as(&peer, method, &params, relay, extras).await {
            Ok(answer) if !answer.wrong_era() => return self.settled(method, answer),
            // A pinned revision is never learned again: the answer is what it is.
            Ok(answer) if self.revision != UpstreamRevision::Auto => {
                return self.settled(method, answer);
            }
            Err(e) if self.revision != UpstreamRevision::Auto => {
                self.forget(&peer);
                return Err(e);
            }
            Ok(_) | Err(UpstreamError::Status { .. }) => {
                tracing::info!(upstream = %self.redacted_uri(), "upstream answered as another MCP revision; probing again");
            }
            Err(e) => {
                // Unreachable or broken: it may come back as another server; learn again then.
                self.forget(&peer);
                return Err(e);
            }
        }
        self.forget(&peer);
        let fresh = self.peer().await?;
        let answer = self.send_as(&fresh, method, &params, relay, extras).await;
        if answer.is_err() {
            self.forget(&fresh);
        }
        self.settled(method, answer?)
    }

    /// An answer settled (an error's text without the URL's secrets), with what a `tools/list` teaches about the tools' marked arguments.
    fn settled(&self, method: &str, answer: Answer) -> Result<Relayed, UpstreamError> {
        let mut relayed = answer.settle_relayed()?;
        // An upstream's error may quote the URL it was called at: the credentials in the
        // configured URL's userinfo or query are the gateway's, never the agent's to read.
        if let Reply::Error(e) = &mut relayed.reply
            && (self.uri.query().is_some()
                || self
                    .uri
                    .authority()
                    .is_some_and(|a| a.as_str().contains('@')))
        {
            scrub_strings(e, &self.uri);
        }
        if method == "tools/list"
            && let Some(r) = relayed.reply.result_tree()
        {
            self.learn_tools(&r);
        }
        Ok(relayed)
    }

    async fn send_as(
        &self,
        peer: &Peer,
        method: &str,
        params: &Map<String, Value>,
        relay: Option<&Envelope>,
        extras: Extras<'_>,
    ) -> Result<Answer, UpstreamError> {
        match peer {
            // Its `_meta` is rewritten into this hop's envelope: the one copy of the params.
            Peer::Modern { version, .. } => {
                self.send_modern(version, method, params.clone(), relay, extras)
                    .await
            }
            Peer::Handshake => {
                self.send_in_session(method, params, extras.server_requests)
                    .await
            }
        }
    }

    fn forget(&self, peer: &Arc<Peer>) {
        self.peer.compare_and_swap(&Some(Arc::clone(peer)), None);
        self.session.store(None);
    }

    // --- learning the revision ----------------------------------------------------------------

    async fn peer(&self) -> Result<Arc<Peer>, UpstreamError> {
        if let Some(p) = self.peer.load_full() {
            return Ok(p);
        }
        let pinned = match self.revision {
            UpstreamRevision::Auto => None,
            UpstreamRevision::Handshake => Some(Peer::Handshake),
            UpstreamRevision::Stateless(version) => Some(Peer::Modern {
                version: version.to_owned(),
                discover: None,
            }),
        };
        if let Some(p) = pinned {
            let p = Arc::new(p);
            self.peer.store(Some(Arc::clone(&p)));
            return Ok(p);
        }
        let _guard = self.learning.lock().await;
        if let Some(p) = self.peer.load_full() {
            return Ok(p);
        }
        let p = Arc::new(self.probe().await?);
        self.peer.store(Some(Arc::clone(&p)));
        Ok(p)
    }

    /// `server/discover` at the newest stateless revision. Only a result offering a revision
    /// the gateway speaks is stateless; any other answer is the handshake era. No answer at all
    /// (unreachable, timeout, 5xx) is no verdict: the error is returned and nothing is cached.
    async fn probe(&self) -> Result<Peer, UpstreamError> {
        let answer = match self
            .send_modern(
                LATEST_MODERN,
                "server/discover",
                Map::new(),
                None,
                Extras::default(),
            )
            .await
        {
            Ok(a) => a,
            Err(UpstreamError::Malformed(_) | UpstreamError::TooLarge(_)) => {
                return Ok(Peer::Handshake);
            }
            Err(e) => return Err(e),
        };
        if answer.status.is_server_error() {
            return Err(UpstreamError::Status {
                status: answer.status.as_u16(),
                detail: answer.detail,
            });
        }
        let result = answer.reply.as_ref().and_then(Reply::result_tree);
        if let (StatusCode::OK, Some(r)) = (answer.status, result) {
            let offered = r.get("supportedVersions").and_then(Value::as_array);
            let mutual = MODERN_VERSIONS
                .iter()
                .find(|v| offered.is_some_and(|o| o.iter().any(|x| x == **v)));
            if let Some(v) = mutual {
                tracing::info!(upstream = %self.redacted_uri(), version = v, "upstream speaks the stateless MCP revision");
                return Ok(Peer::Modern {
                    version: (*v).to_owned(),
                    discover: Some(r.clone()),
                });
            }
        }
        tracing::info!(upstream = %self.redacted_uri(), status = answer.status.as_u16(), "upstream speaks the handshake MCP revision");
        Ok(Peer::Handshake)
    }

    /// The `server/discover` result of an upstream pinned to a stateless revision, asked at
    /// that revision when first needed and kept with the peer. Not a probe: whatever it
    /// answers, the revision stays pinned.
    async fn discover_pinned(
        &self,
        peer: &Arc<Peer>,
        version: &str,
    ) -> Result<Value, UpstreamError> {
        let answer = self
            .send_modern(
                version,
                "server/discover",
                Map::new(),
                None,
                Extras::default(),
            )
            .await?;
        let result = match answer.settle()? {
            Reply::Result(r) => crate::mcp::raw::tree(&r)
                .map_err(|e| UpstreamError::Malformed(format!("server/discover: {e}")))?,
            Reply::Error(e) => {
                return Err(UpstreamError::Malformed(format!(
                    "server/discover refused: {e}"
                )));
            }
        };
        self.peer.compare_and_swap(
            &Some(Arc::clone(peer)),
            Some(Arc::new(Peer::Modern {
                version: version.to_owned(),
                discover: Some(result.clone()),
            })),
        );
        Ok(result)
    }

    // --- the stateless revision ---------------------------------------------------------------

    async fn send_modern(
        &self,
        version: &str,
        method: &str,
        mut params: Map<String, Value>,
        relay: Option<&Envelope>,
        extras: Extras<'_>,
    ) -> Result<Answer, UpstreamError> {
        let mut envelope = match params.remove("_meta") {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        for k in meta::ENVELOPE {
            envelope.remove(*k);
        }
        envelope.insert(meta::PROTOCOL_VERSION.into(), Value::from(version));
        let (caps, info) = match relay {
            Some(r) => (
                r.client_capabilities.clone(),
                r.client_info.clone().unwrap_or_else(client_info),
            ),
            None if extras.server_requests.is_some() => (relayable_capabilities(), client_info()),
            None => (json!({}), client_info()),
        };
        envelope.insert(meta::CLIENT_CAPABILITIES.into(), caps);
        envelope.insert(meta::CLIENT_INFO.into(), info);
        // The log level a stateless client asked for with this request, so the upstream's log
        // messages for it are sent (and relayed back).
        if let Some(level) = relay.and_then(|r| r.log_level.as_deref()) {
            envelope.insert(meta::LOG_LEVEL.into(), Value::from(level));
        }
        params.insert("_meta".into(), Value::Object(envelope));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        sent_as(id, false);
        let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        // The routing headers are computed from this body and nothing else.
        let mut routing: Vec<(hyper::header::HeaderName, HeaderValue)> =
            headers::for_upstream(&body)
                .map_err(UpstreamError::Malformed)?
                .into_iter()
                .map(|(k, v)| (hyper::header::HeaderName::from_static(k), v))
                .collect();
        if let Some(marked) = extras.marked {
            let arguments = body.pointer("/params/arguments").and_then(Value::as_object);
            routing.extend(params::for_upstream(marked, arguments));
        }
        self.post(&body, id, &routing).await
    }

    // --- the handshake revision ---------------------------------------------------------------

    /// Sends one request within the shared session; reopens the session once if the upstream
    /// says it no longer knows it.
    async fn send_in_session(
        &self,
        method: &str,
        params: &Map<String, Value>,
        server_requests: Option<&Arc<ServerRequests>>,
    ) -> Result<Answer, UpstreamError> {
        let params = without_envelope(params);
        let session = self.session().await?;
        let answer = self
            .send_with_session(method, &params, &session, server_requests)
            .await?;
        if answer.status == StatusCode::NOT_FOUND && session.id.is_some() {
            self.session
                .compare_and_swap(&Some(Arc::clone(&session)), None);
            let fresh = self.session().await?;
            return self
                .send_with_session(method, &params, &fresh, server_requests)
                .await;
        }
        Ok(answer)
    }

    async fn send_with_session(
        &self,
        method: &str,
        params: &Map<String, Value>,
        session: &Session,
        server_requests: Option<&Arc<ServerRequests>>,
    ) -> Result<Answer, UpstreamError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        sent_as(id, true);
        let body = serde_json::to_vec(&Outgoing {
            jsonrpc: "2.0",
            id,
            method,
            params,
        })
        .map_err(|e| UpstreamError::Malformed(e.to_string()))?;
        let _in_flight = self.session_calls.enter(id, server_requests.cloned());
        match server_requests {
            Some(answer) => {
                self.post_relaying(body, id, session, &*answer.ask, RELAYED_CALL_IDLE, true)
                    .await
            }
            // Nobody to ask: a request of the upstream is refused at once, and the whole
            // exchange keeps the call timeout.
            None => tokio::time::timeout(
                self.timeout,
                self.post_relaying(
                    body,
                    id,
                    session,
                    &refuse_server_request,
                    self.timeout,
                    false,
                ),
            )
            .await
            .map_err(|_| UpstreamError::Timeout(self.timeout))?,
        }
    }

    /// [`Self::post`] for a call during which the upstream may ask the client something: an
    /// event stream is read as it arrives; each request in it is answered through `answer`
    /// and the reply posted back in the session, until our response arrives. Bounded like
    /// `post` in size, and by [`RELAYED_CALL_IDLE`] of silence rather than the call timeout.
    async fn post_relaying(
        &self,
        bytes: Vec<u8>,
        id: u64,
        session: &Session,
        answer: &AskClient,
        idle: Duration,
        streaming: bool,
    ) -> Result<Answer, UpstreamError> {
        let headers = session_headers(session);
        let req = self.build(bytes, &headers)?;
        let resp = tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| UpstreamError::Timeout(self.timeout))?
            .map_err(|e| UpstreamError::Unavailable(error_chain(&e)))?;
        let status = resp.status();
        let session_id = resp.headers().get("mcp-session-id").cloned();
        let is_sse = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let mut body = resp.into_body();
        let mut events = Events::default();
        let mut read = 0usize;
        let mut notifications = Vec::new();
        let mut relayed = 0usize;
        let finish = |reply: Option<Reply>, detail: String, notifications| {
            Ok(Answer {
                status,
                reply,
                session_id: session_id.clone(),
                detail,
                notifications,
            })
        };
        loop {
            // Complete events first. A JSON answer is no event stream: it is read whole at the
            // end.
            while let Some(event) = is_sse.then(|| events.next_event()).flatten() {
                let v = match sse_event_message(&event) {
                    Some(Message::Response { id: Some(x), reply }) if x.as_u64() == Some(id) => {
                        return finish(Some(reply), String::new(), notifications);
                    }
                    Some(Message::Other(v)) => v,
                    // Another request's response, or no JSON: not ours.
                    _ => continue,
                };
                let is_request = v.get("method").is_some() && v.get("id").is_some();
                if !is_request {
                    if streaming && is_notification(&v) {
                        // Passed on as it arrives (the handler decides what the client sees).
                        let _ = answer(v).await;
                    } else {
                        keep(&mut notifications, v);
                    }
                    continue;
                }
                relayed += 1;
                let upstream_id = v.get("id").cloned().unwrap_or(Value::Null);
                let mut reply = if relayed > MAX_SERVER_REQUESTS {
                    let mut m = Map::new();
                    m.insert(
                        "error".into(),
                        json!({"code": code::INTERNAL_ERROR, "message": "too many requests during one call"}),
                    );
                    m
                } else {
                    answer(v).await
                };
                reply.insert("jsonrpc".into(), Value::from("2.0"));
                reply.insert("id".into(), upstream_id);
                // The call is running upstream: a refused reply must not read as a refused call
                // (which would be sent again).
                self.post_reply(&Value::Object(reply), &headers)
                    .await
                    .map_err(|e| UpstreamError::Interrupted(e.to_string()))?;
            }
            let frame = tokio::time::timeout(idle, body.frame())
                .await
                .map_err(|_| UpstreamError::Timeout(idle))?;
            match frame {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        read += data.len();
                        if read > self.max_response {
                            return Err(UpstreamError::TooLarge(self.max_response));
                        }
                        events.push(&data);
                    }
                }
                Some(Err(e)) => return Err(UpstreamError::Unavailable(e.to_string())),
                None => break,
            }
        }
        let buf = events.bytes();
        // The body ended without our response: a JSON answer, or a stream cut short.
        let detail = String::from_utf8_lossy(&buf[..buf.len().min(512)]).into_owned();
        let message = if is_sse {
            find_sse_response(buf, id, &mut notifications)
        } else {
            find_json_response(buf, id, &mut notifications)
        };
        match message {
            Ok(r) => finish(Some(r), detail, notifications),
            // Taken (200), then cut short: it may have run.
            Err(e) if status == StatusCode::OK => Err(UpstreamError::Interrupted(e.to_string())),
            Err(_) => finish(None, detail, notifications),
        }
    }

    /// Posts the client's reply to a server request in the session (answered `202`).
    async fn post_reply(
        &self,
        reply: &Value,
        headers: &[(hyper::header::HeaderName, HeaderValue)],
    ) -> Result<(), UpstreamError> {
        self.post_message(reply, headers, "the reply to the upstream's request")
            .await
    }

    /// Posts a message that has no answer (a notification, a reply), drains what comes back so
    /// the connection returns to the pool, and says whether the upstream took it.
    async fn post_message(
        &self,
        message: &Value,
        headers: &[(hyper::header::HeaderName, HeaderValue)],
        what: &str,
    ) -> Result<(), UpstreamError> {
        let bytes =
            serde_json::to_vec(message).map_err(|e| UpstreamError::Malformed(e.to_string()))?;
        let req = self.build(bytes, headers)?;
        let resp = tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| UpstreamError::Timeout(self.timeout))?
            .map_err(|e| UpstreamError::Unavailable(error_chain(&e)))?;
        let status = resp.status();
        // The drain is bounded too: an upstream that answers a notification with a stream it
        // never ends must not hold the caller (a session's opening holds a lock every other
        // caller waits on). What it said is its status; the body is dropped after that.
        let drain = Limited::new(resp.into_body(), self.max_response).collect();
        let _ = tokio::time::timeout(self.timeout, drain).await;
        if status.is_success() {
            Ok(())
        } else {
            Err(UpstreamError::Status {
                status: status.as_u16(),
                detail: format!("{what} was refused"),
            })
        }
    }

    async fn session(&self) -> Result<Arc<Session>, UpstreamError> {
        if let Some(s) = self.session.load_full() {
            return Ok(s);
        }
        let _guard = self.opening.lock().await;
        if let Some(s) = self.session.load_full() {
            return Ok(s);
        }
        if self.ended.load(Ordering::Acquire) {
            return Err(UpstreamError::Unavailable(
                "the gateway is shutting down".into(),
            ));
        }
        let s = Arc::new(self.open_session().await?);
        // The requests the upstream sends outside any call's stream, for as long as the
        // session lives. A server without an event store drops what it sends there before the
        // stream is open, and a call waiting on such a request would never end: the first
        // calls wait (holding `opening`) until the stream's headers arrive. A server that holds
        // the headers until it has something to send is waited for once, then no more (its
        // stream is registered as soon as the request reaches it, so nothing is lost there).
        let (opened, open) = tokio::sync::oneshot::channel();
        tokio::spawn(session_stream::listen(session_stream::Listener {
            client: self.client.clone(),
            uri: self.uri.clone(),
            session: Arc::downgrade(&s),
            calls: Arc::clone(&self.session_calls),
            timeout: self.timeout,
            max_response: self.max_response,
            opened: Some(opened),
        }));
        if !self.stream_headers_late.load(Ordering::Relaxed)
            && tokio::time::timeout(self.timeout.min(STREAM_OPEN_WAIT), open)
                .await
                .is_err()
        {
            tracing::info!(upstream = %self.redacted_uri(), "upstream sends its session stream's headers only with a first message; new sessions no longer wait for them");
            self.stream_headers_late.store(true, Ordering::Relaxed);
        }
        self.session.store(Some(Arc::clone(&s)));
        Ok(s)
    }

    async fn open_session(&self) -> Result<Session, UpstreamError> {
        // Sampling and elicitation are relayed to the agent whose call asks for them (and
        // refused when it cannot be asked).
        let params = json!({
            "protocolVersion": HANDSHAKE_VERSION,
            "capabilities": {"sampling": {}, "elicitation": {"form": {}, "url": {}}, "roots": {}},
            "clientInfo": client_info(),
        });
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": params});
        let answer = self.post(&body, id, &[]).await?;
        let session_id = answer.session_id.clone();
        let result = match answer.settle()? {
            Reply::Result(r) => crate::mcp::raw::tree(&r)
                .map_err(|e| UpstreamError::Malformed(format!("initialize: {e}")))?,
            Reply::Error(e) => {
                return Err(UpstreamError::Malformed(format!("initialize refused: {e}")));
            }
        };
        let version = result
            .get("protocolVersion")
            .and_then(Value::as_str)
            .unwrap_or(HANDSHAKE_VERSION);
        let protocol_version = HeaderValue::from_str(version)
            .map_err(|_| UpstreamError::Malformed("bad protocolVersion".into()))?;
        let session = Session {
            id: session_id,
            protocol_version,
            initialize_result: result,
        };
        self.notify("notifications/initialized", &session).await?;
        Ok(session)
    }

    /// Ends the shared handshake-era session upstream (`DELETE` with its id), as a client done
    /// with a session should, so the upstream does not keep one nobody will use again (at
    /// shutdown). Best effort within `within`: a server that does not allow it (`405`) or does
    /// not answer changes nothing here. Returns the status the upstream answered.
    pub async fn end_session(&self, within: Duration) -> Option<StatusCode> {
        // Under `opening`: a session being opened now is stored first, then ended here.
        let session = {
            let _guard = tokio::time::timeout(within, self.opening.lock())
                .await
                .ok()?;
            self.ended.store(true, Ordering::Release);
            self.session.swap(None)?
        };
        session.id.as_ref()?;
        let mut req = Request::builder()
            .method(Method::DELETE)
            .uri(self.uri.clone());
        for (name, value) in session_headers(&session) {
            req = req.header(name, value);
        }
        let req = req.body(Full::new(Bytes::new())).ok()?;
        match tokio::time::timeout(within, self.client.request(req)).await {
            Ok(Ok(resp)) => Some(resp.status()),
            Ok(Err(e)) => {
                tracing::debug!(upstream = %self.redacted_uri(), error = %error_chain(&e), "ending the upstream session failed");
                None
            }
            Err(_) => None,
        }
    }

    async fn notify(&self, method: &str, session: &Session) -> Result<(), UpstreamError> {
        let message = json!({"jsonrpc": "2.0", "method": method});
        self.post_message(&message, &session_headers(session), method)
            .await
    }

    // --- HTTP ---------------------------------------------------------------------------------

    fn build(
        &self,
        body: Vec<u8>,
        extra: &[(hyper::header::HeaderName, HeaderValue)],
    ) -> Result<Request<Full<Bytes>>, UpstreamError> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json, text/event-stream");
        for (name, value) in extra {
            req = req.header(name, value.clone());
        }
        // W3C trace context of the call being forwarded, computed for this hop.
        if let Some((traceparent, tracestate)) = crate::telemetry::trace::upstream_headers() {
            req = req.header("traceparent", traceparent);
            if let Some(state) = tracestate {
                req = req.header("tracestate", state);
            }
        }
        req.body(Full::new(Bytes::from(body)))
            .map_err(|e| UpstreamError::Unavailable(e.to_string()))
    }

    /// One JSON-RPC round trip, bounded in time and size.
    async fn post(
        &self,
        body: &Value,
        id: u64,
        extra: &[(hyper::header::HeaderName, HeaderValue)],
    ) -> Result<Answer, UpstreamError> {
        let bytes =
            serde_json::to_vec(body).map_err(|e| UpstreamError::Malformed(e.to_string()))?;
        let req = self.build(bytes, extra)?;
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| UpstreamError::Unavailable(error_chain(&e)))?;
            let status = resp.status();
            let session_id = resp.headers().get("mcp-session-id").cloned();
            let is_sse = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream"));
            let body = Limited::new(resp.into_body(), self.max_response)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        UpstreamError::TooLarge(self.max_response)
                    } else {
                        UpstreamError::Unavailable(e.to_string())
                    }
                })?
                .to_bytes();
            Ok::<_, UpstreamError>((status, session_id, is_sse, body))
        };
        let (status, session_id, is_sse, body) =
            tokio::time::timeout(self.timeout, fut)
                .await
                .map_err(|_| UpstreamError::Timeout(self.timeout))??;
        let detail = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
        let mut notifications = Vec::new();
        let message = if is_sse {
            find_sse_response(&body, id, &mut notifications)
        } else {
            find_json_response(&body, id, &mut notifications)
        };
        let reply = match message {
            Ok(r) => Some(r),
            // A 200 must carry an answer; an HTTP error may carry none.
            Err(e) if status == StatusCode::OK => return Err(e),
            Err(_) => None,
        };
        Ok(Answer {
            status,
            reply,
            session_id,
            detail,
            notifications,
        })
    }
}

tokio::task_local! {
    /// Where a forwarded request's upstream id is noted, for a client's later cancellation
    /// (set by the caller around the forwarding, see [`Upstream::cancel`]).
    pub static SENT: Arc<Sent>;
}

/// The upstream id of a forwarded request, and whether it went in the gateway's session.
#[derive(Debug, Default)]
pub struct Sent {
    id: AtomicU64,
    in_session: std::sync::atomic::AtomicBool,
}

impl Sent {
    /// The id the request was sent with, once sent (0 before).
    pub fn id(&self) -> u64 {
        self.id.load(Ordering::Acquire)
    }
}

/// Notes the id of the request being sent, when the caller asked for it.
fn sent_as(id: u64, in_session: bool) {
    let _ = SENT.try_with(|s| {
        s.in_session.store(in_session, Ordering::Relaxed);
        s.id.store(id, Ordering::Release);
    });
}

impl Upstream {
    /// Tells the upstream that the client cancelled the request sent as `sent`
    /// (`notifications/cancelled`). In the gateway's session it goes with the session's
    /// headers; a stateless request is cancelled by the same notification with the revision's
    /// envelope. Best effort: a request already answered is ignored by the upstream.
    pub async fn cancel(&self, sent: &Sent, reason: &str) -> Result<(), UpstreamError> {
        let id = sent.id();
        if id == 0 {
            return Ok(());
        }
        let params = json!({"requestId": id, "reason": reason});
        let (body, headers) = if sent.in_session.load(Ordering::Relaxed) {
            let Some(session) = self.session.load_full() else {
                return Ok(()); // the session is gone, and its requests with it
            };
            let body =
                json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params});
            (body, session_headers(&session))
        } else {
            let mut params = params;
            params["_meta"] = json!({meta::PROTOCOL_VERSION: LATEST_MODERN});
            let body =
                json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params});
            let headers = headers::for_upstream(&body)
                .map_err(UpstreamError::Malformed)?
                .into_iter()
                .map(|(k, v)| (hyper::header::HeaderName::from_static(k), v))
                .collect();
            (body, headers)
        };
        self.post_message(&body, &headers, "notifications/cancelled")
            .await
    }
}

/// A JSON-RPC request as sent in a session, written from borrowed parts: the params are
/// serialised where they are, never copied into a new tree first.
#[derive(serde::Serialize)]
struct Outgoing<'a> {
    jsonrpc: &'static str,
    id: u64,
    method: &'a str,
    params: &'a Map<String, Value>,
}

/// `params` for a handshake-era hop: the stateless envelope's keys are not sent in a session
/// (an emptied `_meta` goes too). Copied only when there is something to take out.
fn without_envelope(params: &Map<String, Value>) -> std::borrow::Cow<'_, Map<String, Value>> {
    let strip = match params.get("_meta") {
        Some(Value::Object(m)) => {
            m.is_empty() || m.keys().any(|k| meta::ENVELOPE.contains(&k.as_str()))
        }
        _ => false,
    };
    if !strip {
        return std::borrow::Cow::Borrowed(params);
    }
    let mut params = params.clone();
    if let Some(Value::Object(m)) = params.get_mut("_meta") {
        for k in meta::ENVELOPE {
            m.remove(*k);
        }
        if m.is_empty() {
            params.remove("_meta");
        }
    }
    std::borrow::Cow::Owned(params)
}

/// The last guard before a body leaves: its target (after any renaming) is the one cleared,
/// and a tool call's arguments are the ones decided.
fn sends_what_was_cleared(
    cleared: Cleared<'_>,
    method: &str,
    params: &Map<String, Value>,
) -> Result<(), UpstreamError> {
    let target = crate::upstreams::target_of(method, params);
    let arguments_ok = method != "tools/call"
        || cleared
            .permit
            .covers_arguments(params.get("arguments").unwrap_or(&Value::Null));
    if target == Some(cleared.forwarded_as) && arguments_ok {
        return Ok(());
    }
    tracing::error!(
        method,
        "refused to forward a body that is not the one decided"
    );
    Err(UpstreamError::NotDecided)
}

/// An error with its causes (`client error (Connect): invalid peer certificate: UnknownIssuer`):
/// the client's own message alone does not say what failed, e.g. which TLS check.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

fn session_headers(session: &Session) -> Vec<(hyper::header::HeaderName, HeaderValue)> {
    use hyper::header::HeaderName;
    let mut h = vec![(
        HeaderName::from_static(headers::PROTOCOL_VERSION),
        session.protocol_version.clone(),
    )];
    if let Some(id) = &session.id {
        h.push((HeaderName::from_static("mcp-session-id"), id.clone()));
    }
    h
}

/// Every string in `v` without the secrets of `uri` ([`crate::config::scrub_url_secrets`]).
fn scrub_strings(v: &mut Value, uri: &Uri) {
    match v {
        Value::String(t) => *t = crate::config::scrub_url_secrets(t, uri),
        Value::Array(items) => items.iter_mut().for_each(|i| scrub_strings(i, uri)),
        Value::Object(m) => m.values_mut().for_each(|i| scrub_strings(i, uri)),
        _ => {}
    }
}

/// Methods that reach a target and are forwarded only with a [`Permit`].
pub fn needs_permit(method: &str) -> bool {
    matches!(
        method,
        "tools/call"
            | "resources/read"
            | "resources/subscribe"
            | "prompts/get"
            | "completion/complete"
    )
}

/// The answer to an upstream's request when no client can be asked (the client does not take
/// an event stream, or the call came in on `/v1/tool-call`).
fn refuse_server_request(request: Value) -> crate::store::BoxFuture<'static, Map<String, Value>> {
    let method = request
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    Box::pin(async move {
        let mut m = Map::new();
        m.insert(
            "error".into(),
            json!({"code": code::METHOD_NOT_FOUND,
                   "message": format!("{method} is not available: the client cannot be asked during this call")}),
        );
        m
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream's error quoting the URL it was called at reaches the agent without the
    /// credentials of the configured URL.
    #[tokio::test]
    async fn an_upstream_error_loses_the_secrets_of_its_url() {
        let url = "http://svc:hunter22@127.0.0.1:9/mcp?api_key=sekrit99";
        let up = Upstream::with_options(
            url.parse().expect("uri"),
            Options::new(Duration::from_secs(1), 1 << 20),
            crate::tls::plaintext_only().expect("tls"),
        );
        let answer = Answer {
            status: StatusCode::OK,
            reply: Some(Reply::Error(json!({"code": -32000,
                "message": format!("POST {url} failed"),
                "data": {"tried": [url], "n": 1}}))),
            session_id: None,
            detail: String::new(),
            notifications: Vec::new(),
        };
        let relayed = up.settled("tools/call", answer).expect("settled");
        let Reply::Error(e) = relayed.reply else {
            panic!("an error")
        };
        let text = e.to_string();
        assert!(
            !text.contains("sekrit99") && !text.contains("hunter22"),
            "{text}"
        );
        assert_eq!(e["data"]["n"], 1);
        assert!(text.contains("127.0.0.1:9/mcp"), "{text}");
    }

    /// A session hop sends the params as they are (borrowed, not copied) unless the stateless
    /// envelope must come out; user keys of `_meta` stay, an emptied `_meta` goes.
    #[test]
    fn a_session_hop_sends_the_params_without_the_envelope() {
        let object = |v: Value| v.as_object().cloned().expect("object");
        let plain = object(json!({"name": "echo", "arguments": {"n": 1.50},
                                   "_meta": {"progressToken": 7}}));
        assert!(matches!(
            without_envelope(&plain),
            std::borrow::Cow::Borrowed(_)
        ));
        let wrapped = object(json!({"name": "echo", "_meta": {
            "progressToken": 7,
            (meta::PROTOCOL_VERSION): "2026-07-28",
            (meta::CLIENT_INFO): {"name": "c", "version": "1"},
        }}));
        assert_eq!(
            Value::Object(without_envelope(&wrapped).into_owned()),
            json!({"name": "echo", "_meta": {"progressToken": 7}})
        );
        let only = object(json!({"name": "echo", "_meta": {(meta::LOG_LEVEL): "info"}}));
        assert_eq!(
            Value::Object(without_envelope(&only).into_owned()),
            json!({"name": "echo"})
        );
        let empty = object(json!({"name": "echo", "_meta": {}}));
        assert_eq!(
            Value::Object(without_envelope(&empty).into_owned()),
            json!({"name": "echo"})
        );
        let body = serde_json::to_value(Outgoing {
            jsonrpc: "2.0",
            id: 9,
            method: "tools/call",
            params: &plain,
        })
        .expect("serialises");
        assert_eq!(
            body,
            json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": plain})
        );
    }

    #[test]
    fn only_the_cleared_body_leaves() {
        use crate::pipeline::{CallKind, Permit};
        let args = json!({"text": "hi"});
        let permit = Permit::for_test(CallKind::Tool, "gh__echo", &args);
        let cleared = permit
            .clear(CallKind::Tool, "gh__echo", &args, "echo")
            .expect("cleared");
        let body = |name: &str, args: Value| {
            json!({"name": name, "arguments": args})
                .as_object()
                .cloned()
                .expect("object")
        };
        assert!(sends_what_was_cleared(cleared, "tools/call", &body("echo", args.clone())).is_ok());
        for (name, a) in [
            ("send_email", args.clone()),
            ("echo", json!({"text": "rm -rf"})),
        ] {
            assert!(matches!(
                sends_what_was_cleared(cleared, "tools/call", &body(name, a)),
                Err(UpstreamError::NotDecided)
            ));
        }
        // Another method's target is checked where that method names it.
        let read = json!({"uri": "file:///x"})
            .as_object()
            .cloned()
            .expect("object");
        let p = Permit::for_test(CallKind::Resource, "file:///x", &json!({}));
        let c = p
            .clear(CallKind::Resource, "file:///x", &json!({}), "file:///x")
            .expect("cleared");
        assert!(sends_what_was_cleared(c, "resources/read", &read).is_ok());
        assert!(sends_what_was_cleared(c, "prompts/get", &read).is_err());
    }

    fn answer(status: u16, reply: Option<Value>) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).expect("status"),
            reply: reply.map(Reply::Error),
            session_id: None,
            detail: String::new(),
            notifications: Vec::new(),
        }
    }

    #[test]
    fn wrong_era_signals() {
        // mcp 1.30 to a session-less request: 400 -32600 "Missing session ID".
        assert!(
            answer(
                400,
                Some(json!({"code": -32600, "message": "Missing session ID"}))
            )
            .wrong_era()
        );
        assert!(answer(400, Some(json!({"code": -32022}))).wrong_era());
        assert!(answer(404, None).wrong_era());
        // A JSON-RPC answer of the right era is passed on, not retried.
        assert!(!answer(400, Some(json!({"code": -32602}))).wrong_era());
        assert!(!answer(404, Some(json!({"code": -32601}))).wrong_era());
        assert!(!answer(200, Some(json!({"code": -32603}))).wrong_era());
        assert!(matches!(
            answer(400, Some(json!({"code": -32602}))).settle(),
            Ok(Reply::Error(_))
        ));
        assert!(matches!(
            answer(502, None).settle(),
            Err(UpstreamError::Status { status: 502, .. })
        ));
    }
}
