//! The load generator: MCP `tools/call` over HTTP/1.1 keep-alive connections.
//!
//! - **Closed loop**: `connections` clients, each sending its next call as soon as the previous
//!   answer arrived. Measures saturation throughput at that concurrency; latency there is mostly
//!   queueing (Little's law: latency = concurrency / throughput).
//! - **Open loop**: calls are *scheduled* at a fixed rate by a pacer thread (independent of how
//!   fast answers come back) and picked up by up to `connections` clients. Latency is measured
//!   from the scheduled time, not from when a client got round to sending, so a server that
//!   falls behind is charged for the wait (no coordinated omission). The pacer uses
//!   `std::thread::sleep` (tens of µs of jitter on Linux), not the 1 ms tokio timer.
//!
//! Only calls that *complete* inside the measurement window (after the warm-up) are counted.
//! An answer is an error when the HTTP status is not 200 or the body carries a JSON-RPC
//! `"error"` member, or when the connection fails (the client then reconnects).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::stats::{Samples, Summary};

/// Where to send calls and what with.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub path: String,
    /// Bearer tokens; connection `i` uses `tokens[i % len]` (`agents` per tenant, tenants first).
    /// Empty: no header.
    pub tokens: Vec<String>,
    /// The `tools/call` `params` to send (JSON text).
    pub params: String,
    /// Which MCP revision the clients speak.
    pub era: ClientEra,
}

/// How a client speaks MCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientEra {
    /// Header-less JSON-RPC POSTs, no handshake (the IntentGate SDKs).
    Plain,
    /// 2025-11-25: `initialize` + `notifications/initialized` once per connection, then
    /// `Mcp-Session-Id` and `MCP-Protocol-Version` on every call.
    Handshake,
    /// 2026-07-28, stateless: `MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name` headers and
    /// the `params._meta` envelope on every call.
    Modern,
}

impl ClientEra {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientEra::Plain => "plain",
            ClientEra::Handshake => "handshake",
            ClientEra::Modern => "modern",
        }
    }
}

/// The handshake revision the `handshake` clients ask for.
pub const HANDSHAKE_VERSION: &str = "2025-11-25";
/// The stateless revision the `modern` clients speak.
pub const MODERN_VERSION: &str = "2026-07-28";

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Closed,
    /// Calls scheduled per second.
    Open {
        rate: f64,
    },
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub target: Target,
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub mode: Mode,
    /// Keep a [`CallRecord`] of every call completed in the window (for timelines).
    pub record: bool,
}

/// One completed call, for timelines (hot swap).
#[derive(Debug, Clone, Copy)]
pub struct CallRecord {
    /// Completion time, from the start of the measurement window.
    pub done: Duration,
    pub latency: Duration,
    pub ok: bool,
    /// First 64 bits of the `bundle_digest` the gateway reported for the call (0: none).
    pub digest: u64,
}

/// The first 64 bits of a `sha256:…` digest (what timelines compare).
pub fn digest_prefix(digest: &str) -> u64 {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.get(..16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or(0)
}

fn find_digest(body: &[u8]) -> u64 {
    const KEY: &[u8] = b"\"bundle_digest\":\"";
    let Some(at) = body.windows(KEY.len()).position(|w| w == KEY) else {
        return 0;
    };
    let rest = &body[at + KEY.len()..];
    let end = rest.iter().position(|&b| b == b'"').unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end])
        .map(digest_prefix)
        .unwrap_or(0)
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub mode: Mode,
    pub connections: usize,
    /// Successful calls completed inside the measurement window.
    pub ok: u64,
    pub errors: u64,
    pub window: Duration,
    pub latency: Summary,
    /// First few error descriptions, for the report.
    pub error_examples: Vec<String>,
    /// Every call completed in the window, by completion time (when `Spec::record`).
    pub calls: Vec<CallRecord>,
}

impl Outcome {
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.window.as_secs_f64()
    }
}

struct Shared {
    start: Instant,
    measure_from: Instant,
    end: Instant,
    ok: AtomicU64,
    errors: AtomicU64,
    examples: std::sync::Mutex<Vec<String>>,
    stop: AtomicBool,
    record: bool,
    calls: std::sync::Mutex<Vec<CallRecord>>,
}

impl Shared {
    fn error(&self, at: Instant, what: String) {
        if at >= self.measure_from && at <= self.end {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Ok(mut ex) = self.examples.lock()
            && ex.len() < 5
        {
            ex.push(what);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether an answer is a successful JSON-RPC result, or why not.
pub fn check_answer(status: StatusCode, body: &[u8]) -> Result<(), String> {
    if status != StatusCode::OK {
        return Err(format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ));
    }
    if contains(body, b"\"error\":") || !contains(body, b"\"result\":") {
        return Err(format!(
            "JSON-RPC error: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        ));
    }
    Ok(())
}

struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
}

async fn connect(addr: SocketAddr) -> Result<Conn, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Conn { sender })
}

struct Client {
    addr: SocketAddr,
    host: HeaderValue,
    path: String,
    auth: Option<HeaderValue>,
    body: Bytes,
    era: ClientEra,
    /// Per-call headers of the client's era (routing headers, protocol version).
    extra: Headers,
    /// Handshake era: the session of the current connection (opened after connecting).
    session: Option<HeaderValue>,
    conn: Option<Conn>,
}

/// Extra request headers, by name.
pub type Headers = Vec<(&'static str, HeaderValue)>;

/// The `tools/call` request body of a client of `era` (`params` as JSON text), and the
/// per-call headers that go with it.
pub fn call_body(era: ClientEra, index: usize, params: &str) -> Result<(Bytes, Headers), String> {
    let hv = |s: &str| HeaderValue::from_str(s).map_err(|e| format!("header value {s:?}: {e}"));
    match era {
        ClientEra::Plain => Ok((
            Bytes::from(format!(
                r#"{{"jsonrpc":"2.0","id":{index},"method":"tools/call","params":{params}}}"#
            )),
            Vec::new(),
        )),
        ClientEra::Handshake => Ok((
            Bytes::from(format!(
                r#"{{"jsonrpc":"2.0","id":{index},"method":"tools/call","params":{params}}}"#
            )),
            vec![("mcp-protocol-version", hv(HANDSHAKE_VERSION)?)],
        )),
        ClientEra::Modern => {
            let mut p: serde_json::Value =
                serde_json::from_str(params).map_err(|e| format!("params: {e}"))?;
            let name = p
                .get("name")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let obj = p.as_object_mut().ok_or("params must be an object")?;
            obj.insert(
                "_meta".into(),
                serde_json::json!({
                    "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
                    "io.modelcontextprotocol/clientCapabilities": {},
                    "io.modelcontextprotocol/clientInfo": {"name": "intentgate-bench", "version": "0"},
                }),
            );
            let body = serde_json::json!({"jsonrpc": "2.0", "id": index, "method": "tools/call", "params": p});
            Ok((
                Bytes::from(serde_json::to_vec(&body).map_err(|e| e.to_string())?),
                vec![
                    ("mcp-protocol-version", hv(MODERN_VERSION)?),
                    ("mcp-method", hv("tools/call")?),
                    ("mcp-name", hv(&name)?),
                ],
            ))
        }
    }
}

impl Client {
    fn new(target: &Target, index: usize) -> Client {
        let auth = (!target.tokens.is_empty()).then(|| {
            let t = &target.tokens[index % target.tokens.len()];
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap_or(HeaderValue::from_static(""))
        });
        // The params are the bench's own constant: a failure here is a bug, and shows as an
        // error on every call (empty body) rather than a panic.
        let (body, extra) = call_body(target.era, index, &target.params).unwrap_or_default();
        Client {
            addr: target.addr,
            host: HeaderValue::from_str(&target.addr.to_string())
                .unwrap_or(HeaderValue::from_static("localhost")),
            path: target.path.clone(),
            auth,
            body,
            era: target.era,
            extra,
            session: None,
            conn: None,
        }
    }

    fn request(&self, body: Bytes, call: bool) -> Result<Request<Full<Bytes>>, String> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.path.as_str())
            .header(HOST, self.host.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header(
                ACCEPT,
                HeaderValue::from_static("application/json, text/event-stream"),
            );
        if let Some(a) = &self.auth {
            req = req.header(AUTHORIZATION, a.clone());
        }
        if call {
            for (k, v) in &self.extra {
                req = req.header(*k, v.clone());
            }
        }
        if let Some(s) = &self.session {
            req = req.header("mcp-session-id", s.clone());
        }
        req.body(Full::new(body)).map_err(|e| e.to_string())
    }

    /// One exchange on the current connection (dropping it on a transport failure).
    async fn exchange(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Option<HeaderValue>, Bytes), String> {
        let Some(conn) = self.conn.as_mut() else {
            return Err("no connection".into());
        };
        if conn.sender.ready().await.is_err() {
            self.conn = None;
            return Err("connection closed".into());
        }
        let resp = match conn.sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                self.conn = None;
                return Err(format!("request: {e}"));
            }
        };
        let status = resp.status();
        let session = resp.headers().get("mcp-session-id").cloned();
        match resp.into_body().collect().await {
            Ok(b) => Ok((status, session, b.to_bytes())),
            Err(e) => {
                self.conn = None;
                Err(format!("response body: {e}"))
            }
        }
    }

    /// Handshake era: `initialize`, then `notifications/initialized`, in a new session.
    async fn open_session(&mut self) -> Result<(), String> {
        self.session = None;
        let init = format!(
            r#"{{"jsonrpc":"2.0","id":0,"method":"initialize","params":{{"protocolVersion":"{HANDSHAKE_VERSION}","capabilities":{{}},"clientInfo":{{"name":"intentgate-bench","version":"0"}}}}}}"#
        );
        let req = self.request(Bytes::from(init), false)?;
        let (status, session, body) = self.exchange(req).await?;
        check_answer(status, &body).map_err(|e| format!("initialize: {e}"))?;
        self.session = Some(session.ok_or("initialize: no Mcp-Session-Id in the answer")?);
        let note = Bytes::from_static(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        let req = self.request(note, true)?;
        let (status, _, body) = self.exchange(req).await?;
        if !status.is_success() {
            return Err(format!(
                "notifications/initialized: HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ));
        }
        Ok(())
    }

    /// One call; on a successful JSON-RPC result, the prefix of the bundle digest it reports.
    async fn call(&mut self) -> Result<u64, String> {
        if self.conn.is_none() {
            self.conn = Some(connect(self.addr).await?);
            self.session = None;
        }
        if self.era == ClientEra::Handshake && self.session.is_none() {
            self.open_session().await?;
        }
        let req = self.request(self.body.clone(), true)?;
        let (status, _, body) = self.exchange(req).await?;
        if status == StatusCode::NOT_FOUND && self.session.is_some() {
            // The server forgot the session: the transport says open a new one.
            self.session = None;
        }
        check_answer(status, &body).map(|()| find_digest(&body))
    }
}

async fn closed_worker(shared: Arc<Shared>, mut client: Client) -> Samples {
    let mut samples = Samples::with_capacity(64 * 1024);
    let mut records = Vec::new();
    loop {
        let sent = Instant::now();
        if sent >= shared.end || shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let r = client.call().await;
        let done = Instant::now();
        let in_window = done >= shared.measure_from && done <= shared.end;
        if shared.record && in_window {
            records.push(CallRecord {
                done: done - shared.measure_from,
                latency: done - sent,
                ok: r.is_ok(),
                digest: *r.as_ref().unwrap_or(&0),
            });
        }
        match r {
            Ok(_) => {
                if in_window {
                    shared.ok.fetch_add(1, Ordering::Relaxed);
                    samples.push(done - sent);
                }
            }
            Err(e) => {
                shared.error(done, e);
                // Do not spin on a dead server.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    if let Ok(mut all) = shared.calls.lock() {
        all.extend(records);
    }
    samples
}

type Tickets = Arc<Mutex<tokio::sync::mpsc::UnboundedReceiver<Instant>>>;

async fn open_worker(shared: Arc<Shared>, mut client: Client, tickets: Tickets) -> Samples {
    let mut samples = Samples::with_capacity(64 * 1024);
    loop {
        let next = { tickets.lock().await.recv().await };
        let Some(scheduled) = next else { break };
        let r = client.call().await;
        let done = Instant::now();
        match r {
            Ok(_) => {
                if scheduled >= shared.measure_from && done <= shared.end {
                    shared.ok.fetch_add(1, Ordering::Relaxed);
                    samples.push(done - scheduled);
                }
            }
            Err(e) => shared.error(done, e),
        }
    }
    samples
}

/// Runs one load test on the current tokio runtime.
pub async fn run(spec: &Spec) -> Outcome {
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let shared = Arc::new(Shared {
        start,
        measure_from,
        end,
        ok: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        examples: std::sync::Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        record: spec.record,
        calls: std::sync::Mutex::new(Vec::new()),
    });
    let mut tasks = Vec::with_capacity(spec.connections);
    let mut pacer = None;
    match spec.mode {
        Mode::Closed => {
            for i in 0..spec.connections {
                let client = Client::new(&spec.target, i);
                tasks.push(tokio::spawn(closed_worker(Arc::clone(&shared), client)));
            }
        }
        Mode::Open { rate } => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let rx: Tickets = Arc::new(Mutex::new(rx));
            for i in 0..spec.connections {
                let client = Client::new(&spec.target, i);
                tasks.push(tokio::spawn(open_worker(
                    Arc::clone(&shared),
                    client,
                    Arc::clone(&rx),
                )));
            }
            let interval = Duration::from_secs_f64(1.0 / rate.max(1e-3));
            let shared = Arc::clone(&shared);
            pacer = Some(std::thread::spawn(move || {
                let mut i: u32 = 0;
                loop {
                    let at = shared.start + interval * i;
                    if at >= shared.end {
                        break;
                    }
                    let now = Instant::now();
                    if at > now {
                        std::thread::sleep(at - now);
                    }
                    if tx.send(at).is_err() {
                        break;
                    }
                    i = i.saturating_add(1);
                }
                // Dropping tx lets the workers finish the queue and stop.
            }));
        }
    }
    // Stop waiting for stragglers a little after the window: a call that has not come back by
    // then is not counted (it would have completed outside the window anyway).
    let deadline = end + Duration::from_secs(5);
    let mut all = Samples::default();
    for t in tasks {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, t).await {
            Ok(Ok(s)) => all.extend(s),
            Ok(Err(_)) => {}
            Err(_) => shared.stop.store(true, Ordering::Relaxed),
        }
    }
    if let Some(p) = pacer {
        let _ = p.join();
    }
    let examples = shared
        .examples
        .lock()
        .map(|e| e.clone())
        .unwrap_or_default();
    let mut calls = shared.calls.lock().map(|c| c.clone()).unwrap_or_default();
    calls.sort_by_key(|c| c.done);
    Outcome {
        mode: spec.mode,
        connections: spec.connections,
        ok: shared.ok.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        window: spec.duration,
        latency: all.summary(),
        error_examples: examples,
        calls,
    }
}

/// Sends one call and reports whether it succeeded (a sanity check before measuring).
pub async fn probe(target: &Target) -> Result<(), String> {
    Client::new(target, 0).call().await.map(|_| ())
}

/// One admin API call (`Authorization: Bearer admin_token`, JSON body): status and body.
pub async fn admin(
    addr: SocketAddr,
    method: Method,
    path_and_query: &str,
    admin_token: &str,
    body: &str,
) -> Result<(StatusCode, Bytes), String> {
    let mut conn = connect(addr).await?;
    let req = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(HOST, addr.to_string())
        .header(CONTENT_TYPE, "application/json")
        .header(AUTHORIZATION, format!("Bearer {admin_token}"))
        .body(Full::new(Bytes::from(body.to_owned())))
        .map_err(|e| e.to_string())?;
    let resp = conn
        .sender
        .send_request(req)
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// Polls `GET /healthz` until it answers 200 (the gateway's revocation set is synced).
pub async fn wait_healthy(addr: SocketAddr, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        match healthz(addr).await {
            Ok(StatusCode::OK) => return Ok(()),
            Ok(s) => last = format!("HTTP {s}"),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{addr} not healthy after {within:?}: {last}"))
}

async fn healthz(addr: SocketAddr) -> Result<StatusCode, String> {
    let mut conn = connect(addr).await?;
    let req = Request::builder()
        .method(Method::GET)
        .uri("/healthz")
        .header(HOST, addr.to_string())
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = conn
        .sender
        .send_request(req)
        .await
        .map_err(|e| e.to_string())?;
    Ok(resp.status())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified() {
        let ok = br#"{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":false}}"#;
        assert_eq!(find_digest(ok), 0);
        let with = br#"{"result":{"_intentgate":{"bundle_digest":"sha256:00000000000000ff99"}}}"#;
        assert_eq!(find_digest(with), 0xff);
        assert_eq!(digest_prefix("sha256:0000000000000001abcdef"), 1);
        assert!(check_answer(StatusCode::OK, ok).is_ok());
        let err = br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32010,"message":"x"}}"#;
        assert!(check_answer(StatusCode::OK, err).is_err());
        assert!(check_answer(StatusCode::BAD_GATEWAY, ok).is_err());
        assert!(check_answer(StatusCode::OK, b"").is_err());
    }

    #[test]
    fn era_bodies_and_headers() {
        let params = r#"{"name":"echo","arguments":{"text":"hi"}}"#;
        let (plain, h) = call_body(ClientEra::Plain, 3, params).expect("plain");
        assert!(h.is_empty());
        let v: serde_json::Value = serde_json::from_slice(&plain).expect("json");
        assert_eq!(v["params"]["name"], "echo");
        let (_, h) = call_body(ClientEra::Handshake, 3, params).expect("handshake");
        assert_eq!(
            h,
            vec![(
                "mcp-protocol-version",
                HeaderValue::from_static(HANDSHAKE_VERSION)
            )]
        );
        let (modern, h) = call_body(ClientEra::Modern, 3, params).expect("modern");
        let v: serde_json::Value = serde_json::from_slice(&modern).expect("json");
        assert_eq!(
            v["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"],
            MODERN_VERSION
        );
        assert!(v["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"].is_object());
        assert_eq!(v["params"]["arguments"]["text"], "hi");
        let get = |k: &str| {
            h.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_str().unwrap_or("").to_owned())
        };
        assert_eq!(get("mcp-protocol-version").as_deref(), Some(MODERN_VERSION));
        assert_eq!(get("mcp-method").as_deref(), Some("tools/call"));
        assert_eq!(get("mcp-name").as_deref(), Some("echo"));
    }
}
