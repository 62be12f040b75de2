//! Interop: clients that nobody on this team wrote, through the gateway, to a real MCP server.
//!
//! - the upstream is `tests/interop/upstream_server.py`, a tool server built with the official
//!   `mcp` Python package (2.3), over streamable HTTP: stateful and answering with SSE streams by
//!   default, and in other tests answering with plain JSON, with no sessions, or refusing the
//!   stateless era as `mcp` 1.x does (so the gateway must keep a handshake-era session);
//! - the clients are driven by `tests/interop/clients.py`: the official MCP Python client
//!   (`mcp.Client` over `streamable_http_client`) in each of its protocol modes (the handshake era,
//!   `auto` which probes `server/discover` first, and the stateless 2026-07-28 era), and the
//!   IntentGate Python SDK (`intentgate.Gateway.tool_call`, `intentgate.attenuate`);
//! - every test runs on SQLite and on PostgreSQL (a throwaway server from
//!   `intentgate::testkit::PgServer`).
//!
//! The Python packages are a hard requirement: without them every test here fails with the
//! command that installs them (`pip install -r tests/interop/requirements.txt`). Set
//! `INTENTGATE_TEST_PYTHON` to use another interpreter than `python3`.
//!
//! Each test marks its tool arguments with a unique string, so it can read from the upstream's
//! call log exactly which of its calls reached the upstream (upstreams are shared between tests).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::support::gateway::{self, ADMIN_TOKEN, Backend, TestGateway};
use crate::support::http;

const INSTALL_HINT: &str = "pip install -r tests/interop/requirements.txt";
const MCP_VERSION: &str = "2.3.0";
const SDK_VERSION: &str = "0.3.0";
/// How long one Python client process may run before it is killed and the test fails.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(180);
const CAPABILITY: i64 = -32010;
const BUDGET: i64 = -32013;
const UPSTREAM_UNAVAILABLE: i64 = -32018;

const ACME_ADMIN: &str = "acme-admin-token-0123456789abcdef";
const GLOBEX_ADMIN: &str = "globex-admin-token-0123456789abcdef";

// --- Python: interpreter, packages, processes -----------------------------------------------------

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

pub(crate) fn interop_dir() -> PathBuf {
    repo_root().join("tests").join("interop")
}

pub(crate) fn python() -> String {
    std::env::var("INTENTGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs a command to completion with a deadline; returns (exit code, stdout, stderr).
fn run_with_deadline(mut cmd: Command, deadline: Duration) -> (Option<i32>, String, String) {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start {what}: {e}; is python3 installed? then {INSTALL_HINT}")
        });
    let out = reader_thread(child.stdout.take().expect("stdout"));
    let err = reader_thread(child.stderr.take().expect("stderr"));
    let start = Instant::now();
    let status = loop {
        match child.try_wait().expect("try_wait") {
            Some(s) => break Some(s),
            None if start.elapsed() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let mut stderr = err.join().unwrap_or_default();
    if status.is_none() {
        stderr.push_str(&format!("\n[killed after {deadline:?}]"));
    }
    (status.and_then(|s| s.code()), stdout, stderr)
}

fn reader_thread(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Fails (never skips) when the client packages are missing or at other versions than pinned.
fn require_python_packages() {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    let res = CHECK.get_or_init(|| {
        let mut cmd = Command::new(python());
        cmd.arg(interop_dir().join("clients.py")).arg("check");
        let (code, stdout, stderr) = run_with_deadline(cmd, Duration::from_secs(120));
        if code != Some(0) {
            return Err(format!(
                "the interop tests need Python packages: run `{INSTALL_HINT}`\n\
                 ({} clients.py check exited {code:?})\n{stderr}{stdout}",
                python()
            ));
        }
        let v: Value = serde_json::from_str(stdout.trim()).map_err(|e| format!("{e}: {stdout}"))?;
        if v["mcp"] != MCP_VERSION || v["intentgate"] != SDK_VERSION {
            return Err(format!(
                "the interop tests are pinned to mcp=={MCP_VERSION} and intentgate=={SDK_VERSION}, \
                 found {v}: run `{INSTALL_HINT}`"
            ));
        }
        Ok(())
    });
    if let Err(e) = res {
        panic!("{e}");
    }
}

/// Runs `clients.py steps` against the gateway and returns the results, one per step.
pub(crate) async fn steps(
    gw: &TestGateway,
    token: Option<&str>,
    mode: &str,
    steps: Value,
) -> Vec<Value> {
    require_python_packages();
    let mut args = vec![
        "steps".to_owned(),
        "--gateway".to_owned(),
        gw.url.clone(),
        "--mode".to_owned(),
        mode.to_owned(),
    ];
    if let Some(t) = token {
        args.push("--token".into());
        args.push(t.into());
    }
    args.push(steps.to_string());
    let out = run_client(args).await;
    let results = out["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        results.len(),
        steps.as_array().map_or(0, Vec::len),
        "one result per step: {out}"
    );
    results
}

async fn run_client(args: Vec<String>) -> Value {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(python());
        cmd.arg(interop_dir().join("clients.py")).args(&args);
        let (code, stdout, stderr) = run_with_deadline(cmd, CLIENT_TIMEOUT);
        if code == Some(3) {
            panic!("the interop tests need Python packages: run `{INSTALL_HINT}`\n{stderr}");
        }
        let last = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        match serde_json::from_str::<Value>(last) {
            Ok(v) if code == Some(0) => v,
            _ => panic!(
                "clients.py {args:?} exited {code:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
            ),
        }
    })
    .await
    .expect("client task")
}

// --- the upstream MCP server ----------------------------------------------------------------------

/// A running `upstream_server.py`. It exits when its stdin closes, so even a shared one (never
/// dropped) goes away with the test process.
pub(crate) struct Upstream {
    pub(crate) url: String,
    call_log: PathBuf,
    child: Mutex<Child>,
    _stdin: Mutex<ChildStdin>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flavor {
    /// The official server's default: sessions, answers as SSE streams, both eras (a gateway
    /// that speaks the stateless era to it needs no session).
    Sse,
    /// `json_response=True`: answers as plain JSON bodies, both eras.
    Json,
    /// `stateless_http=True`: no sessions.
    Stateless,
    /// The default server refusing the stateless era as `mcp` 1.x does: the gateway must
    /// `initialize`, keep the `Mcp-Session-Id` and read SSE answers.
    HandshakeSse,
    /// The same, answering with plain JSON bodies.
    HandshakeJson,
    /// Plain JSON bodies, `tools/list` in pages of three tools.
    Paged,
    /// The default server refusing the handshake era (`initialize`, session streams), as a
    /// server written for 2026-07-28 alone: it asks the client only through input-required
    /// results.
    ModernOnly,
    /// The default server whose session streams (`GET`) open only after 800 ms: what it sends
    /// there before is lost.
    SlowSessionStream,
    /// A handshake-only server that refuses (HTTP 500) the client's replies to its requests and
    /// logs every `tools/call` POST it receives as `posted:tools/call`.
    RefusesReplies,
}

impl Flavor {
    fn flags(self) -> &'static [&'static str] {
        match self {
            Flavor::Sse => &[],
            Flavor::Json => &["--json-response"],
            Flavor::Stateless => &["--stateless"],
            Flavor::HandshakeSse => &["--handshake-only"],
            Flavor::HandshakeJson => &["--handshake-only", "--json-response"],
            Flavor::Paged => &["--json-response", "--page-size", "3"],
            Flavor::ModernOnly => &["--modern-only"],
            Flavor::SlowSessionStream => &["--session-stream-delay-ms", "800"],
            Flavor::RefusesReplies => &["--handshake-only", "--refuse-replies"],
        }
    }

    fn handshake_only(self) -> bool {
        matches!(self, Flavor::HandshakeSse | Flavor::HandshakeJson)
    }
}

impl Upstream {
    fn start(flavor: Flavor) -> Upstream {
        require_python_packages();
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let call_log = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "interop-upstream-{}-{}-{:?}.jsonl",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
            flavor
        ));
        let _ = std::fs::remove_file(&call_log);
        let mut cmd = Command::new(python());
        cmd.arg(interop_dir().join("upstream_server.py"))
            .arg("0")
            .arg("--call-log")
            .arg(&call_log)
            .args(flavor.flags());
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start upstream_server.py: {e}; {INSTALL_HINT}"));
        let stdin = child.stdin.take().expect("stdin");
        let stderr = reader_thread(child.stderr.take().expect("stderr"));
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = stdout.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the server never blocks on a full pipe.
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_default();
        let port = line
            .strip_prefix("PORT ")
            .and_then(|p| p.trim().parse::<u16>().ok());
        let Some(port) = port else {
            let _ = child.kill();
            let _ = child.wait();
            let err = stderr.join().unwrap_or_default();
            if err.contains("pip install") {
                panic!("the interop tests need Python packages: run `{INSTALL_HINT}`\n{err}");
            }
            panic!("upstream_server.py did not report its port (got {line:?})\n{err}");
        };
        Upstream {
            url: format!("http://127.0.0.1:{port}/mcp"),
            call_log,
            child: Mutex::new(child),
            _stdin: Mutex::new(stdin),
        }
    }

    /// The upstream of this flavor shared by every test of this process.
    fn shared(flavor: Flavor) -> &'static Upstream {
        static SSE: OnceLock<Upstream> = OnceLock::new();
        static JSON: OnceLock<Upstream> = OnceLock::new();
        static STATELESS: OnceLock<Upstream> = OnceLock::new();
        static HANDSHAKE_SSE: OnceLock<Upstream> = OnceLock::new();
        static HANDSHAKE_JSON: OnceLock<Upstream> = OnceLock::new();
        static PAGED: OnceLock<Upstream> = OnceLock::new();
        static MODERN_ONLY: OnceLock<Upstream> = OnceLock::new();
        static SLOW_SESSION_STREAM: OnceLock<Upstream> = OnceLock::new();
        static REFUSES_REPLIES: OnceLock<Upstream> = OnceLock::new();
        let cell = match flavor {
            Flavor::Sse => &SSE,
            Flavor::Json => &JSON,
            Flavor::Stateless => &STATELESS,
            Flavor::HandshakeSse => &HANDSHAKE_SSE,
            Flavor::HandshakeJson => &HANDSHAKE_JSON,
            Flavor::Paged => &PAGED,
            Flavor::ModernOnly => &MODERN_ONLY,
            Flavor::SlowSessionStream => &SLOW_SESSION_STREAM,
            Flavor::RefusesReplies => &REFUSES_REPLIES,
        };
        let up = cell.get_or_init(|| Upstream::start(flavor));
        if let Ok(Some(status)) = up.child.lock().expect("child").try_wait() {
            panic!("the shared {flavor:?} upstream exited: {status}");
        }
        up
    }

    /// An upstream of this test's own (one it may kill).
    pub(crate) async fn start_async(flavor: Flavor) -> Upstream {
        tokio::task::spawn_blocking(move || Upstream::start(flavor))
            .await
            .expect("upstream start")
    }

    /// Kills the server (a crash: no goodbye to open connections) and waits for it to exit.
    pub(crate) fn kill(&self) {
        let mut child = self.child.lock().expect("child");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub(crate) async fn shared_async(flavor: Flavor) -> &'static Upstream {
        tokio::task::spawn_blocking(move || Upstream::shared(flavor))
            .await
            .expect("upstream start")
    }

    /// The tool calls that reached this upstream with `marker` anywhere in their arguments.
    pub(crate) fn calls_with(&self, marker: &str) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.call_log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["args"].to_string().contains(marker))
            .collect()
    }

    fn tools_called_with(&self, marker: &str) -> Vec<String> {
        let mut tools: Vec<String> = self
            .calls_with(marker)
            .iter()
            .map(|c| c["tool"].as_str().unwrap_or("").to_owned())
            .collect();
        tools.sort();
        tools
    }
}

// --- helpers --------------------------------------------------------------------------------------

async fn backend_sqlite() -> Backend {
    Backend::Sqlite
}

async fn backend_postgres() -> Backend {
    let url = tokio::task::spawn_blocking(|| {
        intentgate::testkit::PgServer::shared().and_then(|pg| pg.fresh_database())
    })
    .await
    .expect("postgres task");
    Backend::Postgres(url.unwrap_or_else(|e| panic!("PostgreSQL for the interop tests: {e}")))
}

/// A string no other test uses, to find this test's calls in a shared upstream's log.
fn marker(name: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{name}-{}-{nanos}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

#[track_caller]
fn assert_ok(r: &Value, ctx: &str) {
    assert_eq!(r["ok"], true, "{ctx}: expected success, got {r}");
    assert_eq!(
        r["is_error"], false,
        "{ctx}: the tool reported an error: {r}"
    );
}

#[track_caller]
fn assert_code(r: &Value, code: i64, ctx: &str) {
    assert_eq!(
        r["ok"], false,
        "{ctx}: expected JSON-RPC error {code}, got success: {r}"
    );
    assert_eq!(
        r["code"], code,
        "{ctx}: expected JSON-RPC error {code}: {r}"
    );
}

fn texts(r: &Value) -> Vec<String> {
    r["text"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| t.as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn sorted_tools(r: &Value) -> Vec<String> {
    let mut t: Vec<String> = r["tools"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| t.as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default();
    t.sort();
    t
}

/// The `exp` caveat of a token (unix seconds), read from its base64url JSON.
fn token_exp(token: &str) -> u64 {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .expect("token is base64url");
    let v: Value = serde_json::from_slice(&bytes).expect("token is JSON");
    v["cav"]
        .as_array()
        .and_then(|c| c.iter().find_map(|c| c["exp"].as_u64()))
        .unwrap_or_else(|| panic!("token has no exp caveat: {v}"))
}

/// The upstream must never see the agent's capability token: it is a credential for the
/// gateway, not for the tool server.
#[track_caller]
fn assert_token_not_forwarded(up: &Upstream, marker: &str, token: &str) {
    for call in up.calls_with(marker) {
        let auth = call["authorization"].as_str().unwrap_or("");
        assert!(
            !auth.contains(token),
            "the gateway forwarded the agent's capability token to the upstream: {call}"
        );
    }
}

async fn admin_post(gw: &TestGateway, path: &str, bearer: &str, body: Value) -> (u16, Value) {
    http::post_json(&format!("{}{path}", gw.url), Some(bearer), &body).await
}

/// One JSON-RPC message to `/v1/mcp` as a streamable-HTTP client sends it; the answer is read
/// from a JSON body or from the `data:` lines of an SSE body.
async fn mcp_post(
    gw: &TestGateway,
    token: &str,
    session: Option<&str>,
    body: Value,
) -> (u16, Option<String>, Value) {
    let auth = format!("Bearer {token}");
    let mut headers = vec![
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
        ("authorization", auth.as_str()),
    ];
    if let Some(s) = session {
        headers.push(("mcp-session-id", s));
        headers.push(("mcp-protocol-version", "2025-11-25"));
    }
    let (status, hdrs, bytes) = http::send(
        "POST",
        &format!("{}/v1/mcp", gw.url),
        &headers,
        serde_json::to_vec(&body).expect("json"),
    )
    .await;
    let session_id = hdrs
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = String::from_utf8_lossy(&bytes);
    let value = serde_json::from_str::<Value>(&text).unwrap_or_else(|_| {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
            .find(|v| v.get("id").is_some())
            .unwrap_or(Value::Null)
    });
    (status, session_id, value)
}

fn initialize_body() -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "interop-raw", "version": "0"}
    }})
}

/// Runs a test body on both stores: `name::sqlite` and `name::postgres`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(super::backend_sqlite().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(super::backend_postgres().await).await;
            }
        }
    )*};
}

on_both_backends!(
    mcp_client_handshake_era,
    mcp_client_auto_mode,
    mcp_client_modern_era,
    sdk_calls_and_attenuation,
    revoked_token_is_refused,
    expired_token_is_refused,
    missing_or_forged_token_is_refused,
    budget_counts_allowed_calls_only,
    tenant_admins_stay_in_their_tenant,
    session_is_bound_to_its_token,
    upstream_answering_json,
    upstream_handshake_only_sse_sessions,
    upstream_without_sessions,
    upstream_down_is_typed,
);

// --- the official MCP client ----------------------------------------------------------------------

/// List, allowed calls and out-of-scope calls with the official client in one protocol mode.
async fn mcp_client_in_mode(backend: Backend, mode: &str, flavor: Flavor) {
    let up = Upstream::shared_async(flavor).await;
    let tg = gateway::start(backend, Some(&up.url), &[]).await;
    let (token, _) = tg
        .mint(
            json!({"subject": "agent-mcp", "tenant": "acme", "ttl_seconds": 600,
                     "tools": ["read_*", "echo"]}),
        )
        .await;
    let m = marker(&format!("mcp-{mode}-{flavor:?}"));
    let r = steps(
        &tg,
        Some(&token),
        mode,
        json!([
            {"op": "list"},
            {"op": "call", "tool": "read_invoice", "args": {"id": m}},
            {"op": "call", "tool": "echo", "args": {"text": m}},
            {"op": "call", "tool": "delete_records", "args": {"table": m}},
            {"op": "call", "tool": "send_email", "args": {"to": "cfo@example.com", "body": m}},
            {"op": "list"},
        ]),
    )
    .await;
    let ctx = format!("mcp client, mode {mode}, {flavor:?} upstream");
    assert_eq!(r[0]["ok"], true, "{ctx}: tools/list failed: {}", r[0]);
    assert_eq!(
        sorted_tools(&r[0]),
        ["echo", "read_invoice"],
        "{ctx}: tools/list must show exactly the token's tools: {}",
        r[0]
    );
    assert_ok(&r[1], &format!("{ctx}: read_invoice"));
    assert!(
        r[1]["structured"]["id"] == m.as_str() || texts(&r[1]).concat().contains(&m),
        "{ctx}: read_invoice result does not come from the upstream: {}",
        r[1]
    );
    assert_ok(&r[2], &format!("{ctx}: echo"));
    assert_eq!(
        texts(&r[2]),
        std::slice::from_ref(&m),
        "{ctx}: echo result: {}",
        r[2]
    );
    assert_code(
        &r[3],
        CAPABILITY,
        &format!("{ctx}: delete_records is out of scope"),
    );
    assert_code(
        &r[4],
        CAPABILITY,
        &format!("{ctx}: send_email is out of scope"),
    );
    assert_eq!(
        sorted_tools(&r[5]),
        ["echo", "read_invoice"],
        "{ctx}: the session survives denials: {}",
        r[5]
    );
    assert_eq!(
        up.tools_called_with(&m),
        ["echo", "read_invoice"],
        "{ctx}: exactly the allowed calls reach the upstream"
    );
    assert_token_not_forwarded(up, &m, &token);
    if flavor.handshake_only() {
        // Toward a handshake-only upstream the gateway initializes once and keeps the session
        // for later calls (ARCHITECTURE.md: no new upstream session per call).
        let calls = up.calls_with(&m);
        let mut sessions: Vec<&str> = calls
            .iter()
            .filter_map(|c| c["session_id"].as_str())
            .collect();
        assert_eq!(
            sessions.len(),
            calls.len(),
            "{ctx}: every call in a session: {calls:?}"
        );
        for c in &calls {
            assert_ne!(
                c["protocol_version"], "2026-07-28",
                "{ctx}: handshake era upstream: {c}"
            );
        }
        sessions.dedup();
        assert_eq!(
            sessions.len(),
            1,
            "{ctx}: one upstream session for the calls: {calls:?}"
        );
    }
    tg.shutdown().await;
}

async fn mcp_client_handshake_era(backend: Backend) {
    mcp_client_in_mode(backend, "legacy", Flavor::Sse).await;
}

/// `auto` is the official client's default: it probes `server/discover` and falls back to the
/// handshake if the gateway does not speak the stateless era.
async fn mcp_client_auto_mode(backend: Backend) {
    mcp_client_in_mode(backend, "auto", Flavor::Sse).await;
}

async fn mcp_client_modern_era(backend: Backend) {
    mcp_client_in_mode(backend, "2026-07-28", Flavor::Sse).await;
}

async fn upstream_answering_json(backend: Backend) {
    mcp_client_in_mode(backend.clone(), "legacy", Flavor::Json).await;
    mcp_client_in_mode(backend.clone(), "legacy", Flavor::HandshakeJson).await;
    mcp_client_in_mode(backend, "2026-07-28", Flavor::HandshakeJson).await;
}

/// The official server's SSE answers inside a handshake-era session: clients of either era.
async fn upstream_handshake_only_sse_sessions(backend: Backend) {
    mcp_client_in_mode(backend.clone(), "legacy", Flavor::HandshakeSse).await;
    mcp_client_in_mode(backend, "2026-07-28", Flavor::HandshakeSse).await;
}

async fn upstream_without_sessions(backend: Backend) {
    mcp_client_in_mode(backend.clone(), "legacy", Flavor::Stateless).await;
    mcp_client_in_mode(backend, "2026-07-28", Flavor::Stateless).await;
}

// --- the IntentGate SDK ---------------------------------------------------------------------------

async fn sdk_calls_and_attenuation(backend: Backend) {
    let up = Upstream::shared_async(Flavor::Sse).await;
    let tg = gateway::start(backend, Some(&up.url), &[]).await;
    let (token, _) = tg
        .mint(
            json!({"subject": "agent-sdk", "tenant": "acme", "ttl_seconds": 600,
                     "tools": ["read_invoice", "echo"]}),
        )
        .await;
    let m = marker("sdk");
    let r = steps(
        &tg,
        Some(&token),
        "legacy",
        json!([
            {"op": "sdk-call", "tool": "read_invoice", "args": {"id": m}},
            {"op": "sdk-call", "tool": "echo", "args": {"text": m}},
            {"op": "sdk-call", "tool": "delete_records", "args": {"table": m}},
            // Client-side attenuation: the child token denies echo, keeps read_invoice.
            {"op": "sdk-attenuated-call", "tool": "echo", "args": {"text": m}, "deny": ["echo"]},
            {"op": "sdk-attenuated-call", "tool": "read_invoice", "args": {"id": m},
             "deny": ["echo"]},
        ]),
    )
    .await;
    assert_ok(&r[0], "sdk: read_invoice");
    assert!(
        texts(&r[0]).concat().contains(&m),
        "sdk: read_invoice result does not come from the upstream: {}",
        r[0]
    );
    if !r[0]["intentgate"].is_null() {
        assert_eq!(
            r[0]["intentgate"]["decision"], "allow",
            "sdk metadata: {}",
            r[0]
        );
    }
    assert_ok(&r[1], "sdk: echo");
    assert_eq!(
        texts(&r[1]),
        std::slice::from_ref(&m),
        "sdk: echo: {}",
        r[1]
    );
    assert_code(&r[2], CAPABILITY, "sdk: delete_records is out of scope");
    assert_eq!(
        r[2]["exception"], "CapabilityError",
        "sdk exception type: {}",
        r[2]
    );
    assert_code(
        &r[3],
        CAPABILITY,
        "sdk: echo with a child token that denies it",
    );
    assert_eq!(r[3]["exception"], "CapabilityError", "{}", r[3]);
    assert_ok(&r[4], "sdk: read_invoice with the attenuated child token");
    assert_eq!(
        up.tools_called_with(&m),
        ["echo", "read_invoice", "read_invoice"],
        "sdk: exactly the allowed calls reach the upstream"
    );
    assert_token_not_forwarded(up, &m, &token);
    tg.shutdown().await;
}

// --- token lifecycle ------------------------------------------------------------------------------

/// Revoked through the admin API (`{jti, reason}`, as consoles send it): the gateway that revoked
/// applies it at once, to new connections and to a session that is already open.
async fn revoked_token_is_refused(backend: Backend) {
    let up = Upstream::shared_async(Flavor::Sse).await;
    let tg = gateway::start(backend.clone(), Some(&up.url), &[]).await;
    let (token, jti) = tg
        .mint(
            json!({"subject": "agent-rev", "tenant": "acme", "ttl_seconds": 600,
                     "tools": ["echo"]}),
        )
        .await;
    let m = marker("revoke");
    let r = steps(
        &tg,
        Some(&token),
        "legacy",
        json!([
            {"op": "list"},
            {"op": "call", "tool": "echo", "args": {"text": format!("{m}-before")}},
            {"op": "revoke", "jti": jti, "admin_token": ADMIN_TOKEN, "reason": "interop test"},
            {"op": "call", "tool": "echo", "args": {"text": format!("{m}-after")}},
            {"op": "sdk-call", "tool": "echo", "args": {"text": format!("{m}-after-sdk")}},
        ]),
    )
    .await;
    assert_eq!(sorted_tools(&r[0]), ["echo"], "{}", r[0]);
    assert_ok(&r[1], "before revocation");
    assert_eq!(r[2]["ok"], true, "revoke through the admin API: {}", r[2]);
    assert_code(
        &r[3],
        CAPABILITY,
        "mcp client, open session, after revocation",
    );
    assert_code(&r[4], CAPABILITY, "sdk, after revocation");

    // A new connection with the revoked token is refused at its first message.
    for mode in ["legacy", "2026-07-28"] {
        let r = steps(&tg, Some(&token), mode, json!([{"op": "list"}])).await;
        assert_code(
            &r[0],
            CAPABILITY,
            &format!("mcp client ({mode}), new connection, revoked"),
        );
    }
    // The revocation outlives the feed's next polls of the store (every 0.5 s).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let v = tg
        .tool_call(&token, "echo", json!({"text": format!("{m}-later")}))
        .await;
    assert_eq!(
        v["error"]["code"], CAPABILITY,
        "still revoked after the feed polled: {v}"
    );
    // Another replica on the same PostgreSQL database learns it from the store.
    if let Backend::Postgres(url) = &backend {
        let replica = gateway::start(Backend::Postgres(url.clone()), Some(&up.url), &[]).await;
        let v = replica
            .tool_call(&token, "echo", json!({"text": format!("{m}-replica")}))
            .await;
        assert_eq!(
            v["error"]["code"], CAPABILITY,
            "revoked at another replica: {v}"
        );
        replica.shutdown().await;
    }
    assert_eq!(
        up.tools_called_with(&m),
        ["echo"],
        "only the call before the revocation reaches the upstream"
    );
    tg.shutdown().await;
}

/// `exp` is checked as `now >= exp`, with no clock leeway; in an open session too.
async fn expired_token_is_refused(backend: Backend) {
    let up = Upstream::shared_async(Flavor::Sse).await;
    let tg = gateway::start(backend, Some(&up.url), &[]).await;
    // Long enough for the Python client to start and make one call before expiry.
    let (token, _) = tg
        .mint(
            json!({"subject": "agent-exp", "tenant": "acme", "ttl_seconds": 20,
                     "tools": ["echo"]}),
        )
        .await;
    let exp = token_exp(&token);
    let m = marker("expire");
    let r = steps(
        &tg,
        Some(&token),
        "legacy",
        json!([
            {"op": "call", "tool": "echo", "args": {"text": format!("{m}-before")}},
            {"op": "sleep_until", "unix": exp as f64 + 0.2},
            {"op": "call", "tool": "echo", "args": {"text": format!("{m}-after")}},
            {"op": "sdk-call", "tool": "echo", "args": {"text": format!("{m}-after-sdk")}},
        ]),
    )
    .await;
    assert_ok(&r[0], "before expiry");
    assert_code(&r[2], CAPABILITY, "mcp client, open session, after expiry");
    assert_code(&r[3], CAPABILITY, "sdk, after expiry");

    // A token minted with a one-second TTL is refused by a new connection once it passed.
    let (short, _) = tg
        .mint(
            json!({"subject": "agent-exp", "tenant": "acme", "ttl_seconds": 1,
                     "tools": ["echo"]}),
        )
        .await;
    let exp = token_exp(&short);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64((exp as f64 - now).max(0.0) + 0.2)).await;
    let r = steps(
        &tg,
        Some(&short),
        "legacy",
        json!([
            {"op": "call", "tool": "echo", "args": {"text": format!("{m}-short")}},
            {"op": "sdk-call", "tool": "echo", "args": {"text": format!("{m}-short-sdk")}},
        ]),
    )
    .await;
    assert_code(&r[0], CAPABILITY, "mcp client, new connection, expired");
    assert_code(&r[1], CAPABILITY, "sdk, expired");
    assert_eq!(
        up.tools_called_with(&m),
        ["echo"],
        "only the call before expiry is forwarded"
    );
    tg.shutdown().await;
}

async fn missing_or_forged_token_is_refused(backend: Backend) {
    let up = Upstream::shared_async(Flavor::Sse).await;
    let tg = gateway::start(backend, Some(&up.url), &[]).await;
    let (token, _) = tg
        .mint(
            json!({"subject": "agent-forge", "tenant": "acme", "ttl_seconds": 600,
                     "tools": ["echo"]}),
        )
        .await;
    // Widen the token's tools without the key: decode, edit the caveat, re-encode.
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut v: Value = serde_json::from_slice(&engine.decode(&token).expect("b64")).expect("json");
    for cav in v["cav"].as_array_mut().expect("caveats") {
        if cav["tools"].is_array() {
            cav["tools"] = json!(["*"]);
        }
    }
    let forged = engine.encode(serde_json::to_vec(&v).expect("json"));
    let m = marker("forged");
    let r = steps(
        &tg,
        Some(&forged),
        "legacy",
        json!([
            {"op": "call", "tool": "delete_records", "args": {"table": m}},
            {"op": "sdk-call", "tool": "delete_records", "args": {"table": m}},
            {"op": "sdk-call", "tool": "echo", "args": {"text": m}, "token": null},
            {"op": "sdk-call", "tool": "echo", "args": {"text": m}, "token": "not-a-token"},
        ]),
    )
    .await;
    assert_code(&r[0], CAPABILITY, "mcp client with a forged token");
    assert_code(&r[1], CAPABILITY, "sdk with a forged token");
    assert_code(&r[2], CAPABILITY, "sdk with no token");
    assert_code(&r[3], CAPABILITY, "sdk with a garbage token");
    assert!(
        up.calls_with(&m).is_empty(),
        "nothing reaches the upstream: {:?}",
        up.calls_with(&m)
    );
    tg.shutdown().await;
}

/// `max_calls` is charged for allowed calls only: a call blocked by an earlier check does not
/// spend the budget (the original charges blocked calls; we do not copy that).
async fn budget_counts_allowed_calls_only(backend: Backend) {
    let up = Upstream::shared_async(Flavor::Sse).await;
    let tg = gateway::start(backend, Some(&up.url), &[]).await;
    let (token, _) = tg
        .mint(
            json!({"subject": "agent-budget", "tenant": "acme", "ttl_seconds": 600,
                     "tools": ["echo"], "max_calls": 2}),
        )
        .await;
    let m = marker("budget");
    let r = steps(
        &tg,
        Some(&token),
        "legacy",
        json!([
            {"op": "sdk-call", "tool": "delete_records", "args": {"table": m}},
            {"op": "sdk-call", "tool": "echo", "args": {"text": format!("{m}-1")}},
            {"op": "call", "tool": "echo", "args": {"text": format!("{m}-2")}},
            {"op": "sdk-call", "tool": "echo", "args": {"text": format!("{m}-3")}},
            {"op": "call", "tool": "echo", "args": {"text": format!("{m}-4")}},
        ]),
    )
    .await;
    assert_code(&r[0], CAPABILITY, "out of scope");
    assert_ok(&r[1], "first allowed call");
    assert_ok(&r[2], "second allowed call (mcp client)");
    assert_code(&r[3], BUDGET, "third call, sdk: max_calls=2 is spent");
    assert_eq!(r[3]["exception"], "BudgetError", "{}", r[3]);
    assert_code(&r[4], BUDGET, "third call, mcp client");
    assert_eq!(
        up.tools_called_with(&m),
        ["echo", "echo"],
        "two calls reach the upstream"
    );
    tg.shutdown().await;
}

// --- tenants --------------------------------------------------------------------------------------

/// Items of an admin list answer (`{"items": [...]}`), or the answer itself when it is a list.
fn items(v: &Value) -> Vec<Value> {
    v.get("items")
        .or_else(|| v.get("events"))
        .unwrap_or(v)
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A per-tenant admin mints, revokes and reads only within its tenant; tokens of another
/// tenant keep working whatever it tries; audit and revocations are tenant-scoped.
async fn tenant_admins_stay_in_their_tenant(backend: Backend) {
    let up = Upstream::shared_async(Flavor::Sse).await;
    let admins = format!("acme:{ACME_ADMIN},globex:{GLOBEX_ADMIN}");
    let tg = gateway::start(backend, Some(&up.url), &["--tenant-admins", &admins]).await;
    let mint = |tenant: Option<&str>| {
        let mut b = json!({"subject": "agent-t", "ttl_seconds": 600, "tools": ["echo"]});
        if let Some(t) = tenant {
            b["tenant"] = json!(t);
        }
        b
    };

    // Mint: own tenant (named or implied) yes, another tenant no.
    let (s, acme) = admin_post(&tg, "/v1/admin/mint", ACME_ADMIN, mint(Some("acme"))).await;
    assert_eq!(s, 200, "acme admin mints for acme: {acme}");
    let (s, implied) = admin_post(&tg, "/v1/admin/mint", ACME_ADMIN, mint(None)).await;
    assert_eq!(
        s, 200,
        "acme admin mints without naming a tenant: {implied}"
    );
    let implied_tok = implied["token"].as_str().expect("token");
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let decoded: Value =
        serde_json::from_slice(&engine.decode(implied_tok).expect("b64")).expect("json");
    assert_eq!(
        decoded["tenant"], "acme",
        "a tenant admin's token is of its tenant: {decoded}"
    );
    let (s, v) = admin_post(&tg, "/v1/admin/mint", ACME_ADMIN, mint(Some("globex"))).await;
    assert_eq!(s, 403, "acme admin must not mint for globex: {v}");
    assert!(v["error"].is_string(), "errors are {{\"error\": ...}}: {v}");
    let (s, v) = admin_post(
        &tg,
        "/v1/admin/mint",
        "no-such-admin-token",
        mint(Some("acme")),
    )
    .await;
    assert_eq!(s, 401, "unknown admin token: {v}");

    let (s, globex) = admin_post(&tg, "/v1/admin/mint", GLOBEX_ADMIN, mint(Some("globex"))).await;
    assert_eq!(s, 200, "globex admin mints for globex: {globex}");
    let g_token = globex["token"].as_str().expect("token").to_owned();
    let g_jti = globex["jti"].as_str().expect("jti").to_owned();

    // Revoke: acme's admin cannot revoke globex's token, by jti alone or naming globex.
    let (s, v) = admin_post(
        &tg,
        "/v1/admin/revoke",
        ACME_ADMIN,
        json!({"jti": g_jti, "reason": "cross-tenant"}),
    )
    .await;
    assert_eq!(s, 403, "acme admin must not revoke a globex token: {v}");
    let (s, v) = admin_post(
        &tg,
        "/v1/admin/revoke",
        ACME_ADMIN,
        json!({"jti": g_jti, "reason": "cross-tenant", "tenant": "globex"}),
    )
    .await;
    assert_eq!(s, 403, "acme admin must not revoke in globex: {v}");

    // The globex token still works, through the official client and the SDK.
    let m = marker("tenant");
    let r = steps(
        &tg,
        Some(&g_token),
        "legacy",
        json!([
            {"op": "list"},
            {"op": "call", "tool": "echo", "args": {"text": format!("{m}-g")}},
            {"op": "sdk-call", "tool": "echo", "args": {"text": format!("{m}-g-sdk")}},
        ]),
    )
    .await;
    assert_eq!(sorted_tools(&r[0]), ["echo"], "{}", r[0]);
    assert_ok(&r[1], "globex token after acme's revoke attempts");
    assert_ok(&r[2], "globex token after acme's revoke attempts (sdk)");
    assert_eq!(up.tools_called_with(&m), ["echo", "echo"]);

    // Audit and revocations are tenant-scoped.
    let (s, v) = http::get_json(
        &format!("{}/v1/admin/audit?tenant=globex", tg.url),
        ACME_ADMIN,
    )
    .await;
    assert_eq!(s, 403, "acme admin must not read globex's audit: {v}");
    let (s, v) = http::get_json(
        &format!("{}/v1/admin/audit?jti={g_jti}", tg.url),
        ACME_ADMIN,
    )
    .await;
    assert!(
        s == 403 || (s == 200 && items(&v).is_empty()),
        "acme admin must see no globex audit events (HTTP {s}): {v}"
    );
    let (s, v) = http::get_json(&format!("{}/v1/admin/audit", tg.url), ACME_ADMIN).await;
    assert_eq!(s, 200, "acme admin reads its own audit: {v}");
    for e in items(&v) {
        assert_eq!(
            e["tenant"], "acme",
            "acme's audit shows another tenant's event: {e}"
        );
    }
    let (s, v) = http::get_json(
        &format!("{}/v1/admin/audit?jti={g_jti}", tg.url),
        GLOBEX_ADMIN,
    )
    .await;
    assert_eq!(s, 200, "globex admin reads its own audit: {v}");
    let g_events = items(&v);
    assert!(
        g_events.iter().any(|e| e["tool"] == "echo"),
        "globex's audit records the globex token's tool calls: {v}"
    );
    for e in &g_events {
        assert_eq!(e["tenant"], "globex", "{e}");
    }

    let (s, _) = admin_post(
        &tg,
        "/v1/admin/revoke",
        GLOBEX_ADMIN,
        json!({"jti": g_jti, "reason": "own tenant"}),
    )
    .await;
    assert_eq!(s, 204, "globex admin revokes its own token");
    let (s, v) = http::get_json(&format!("{}/v1/admin/revocations", tg.url), ACME_ADMIN).await;
    assert_eq!(s, 200, "{v}");
    assert!(
        !v.to_string().contains(&g_jti),
        "acme admin sees globex's revocation: {v}"
    );
    let r = tg
        .tool_call(&g_token, "echo", json!({"text": format!("{m}-revoked")}))
        .await;
    assert_eq!(
        r["error"]["code"], CAPABILITY,
        "revoked by its own tenant admin: {r}"
    );
    tg.shutdown().await;
}

/// An `Mcp-Session-Id` obtained with one token is no credential for another: a token of another
/// tenant (or none at all) on that session is refused, and the session's own token keeps working.
async fn session_is_bound_to_its_token(backend: Backend) {
    let up = Upstream::shared_async(Flavor::Sse).await;
    let tg = gateway::start(backend, Some(&up.url), &[]).await;
    let (acme, _) = tg
        .mint(
            json!({"subject": "agent-a", "tenant": "acme", "ttl_seconds": 600,
                     "tools": ["echo"]}),
        )
        .await;
    let (globex, _) = tg
        .mint(
            json!({"subject": "agent-g", "tenant": "globex", "ttl_seconds": 600,
                     "tools": ["echo", "delete_records"]}),
        )
        .await;
    let m = marker("session");

    let (s, sid, v) = mcp_post(&tg, &acme, None, initialize_body()).await;
    assert_eq!(s, 200, "initialize: {v}");
    assert!(
        v["result"]["protocolVersion"].is_string(),
        "initialize result: {v}"
    );
    let sid = sid.expect("a stateful gateway hands out Mcp-Session-Id on initialize");
    let (s, _, _) = mcp_post(
        &tg,
        &acme,
        Some(&sid),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    assert_eq!(s, 202, "notifications are answered with 202");

    let call = |id: u64, tool: &str, args: Value| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
               "params": {"name": tool, "arguments": args}})
    };
    let (s, _, v) = mcp_post(
        &tg,
        &acme,
        Some(&sid),
        call(2, "echo", json!({"text": format!("{m}-a")})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["result"].is_object(), "acme's own session works: {v}");

    // globex's token on acme's session: must not run, whatever the transport answers.
    let (s, _, v) = mcp_post(
        &tg,
        &globex,
        Some(&sid),
        call(3, "delete_records", json!({"table": format!("{m}-g")})),
    )
    .await;
    assert!(
        v["result"].is_null() && (s >= 400 || v["error"]["code"] == CAPABILITY),
        "a globex token on an acme session must be refused (HTTP {s}): {v}"
    );
    let (s, _, v) = mcp_post(
        &tg,
        &globex,
        Some(&sid),
        call(4, "echo", json!({"text": format!("{m}-g2")})),
    )
    .await;
    assert!(
        v["result"].is_null() && (s >= 400 || v["error"]["code"] == CAPABILITY),
        "a globex token on an acme session must be refused (HTTP {s}): {v}"
    );
    // The session itself is no credential.
    let (s, _, v) = mcp_post(
        &tg,
        "",
        Some(&sid),
        call(5, "echo", json!({"text": format!("{m}-none")})),
    )
    .await;
    assert!(
        v["result"].is_null() && (s >= 400 || v["error"]["code"] == CAPABILITY),
        "a session id without a token must be refused (HTTP {s}): {v}"
    );

    let (s, _, v) = mcp_post(
        &tg,
        &acme,
        Some(&sid),
        call(6, "echo", json!({"text": format!("{m}-a2")})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(
        v["result"].is_object(),
        "acme's session still works afterwards: {v}"
    );
    assert_eq!(
        up.tools_called_with(&m),
        ["echo", "echo"],
        "only acme's calls are forwarded"
    );
    tg.shutdown().await;
}

// --- upstream failures ----------------------------------------------------------------------------

/// An unreachable upstream is its own typed error (-32018), not a crash, for both clients.
async fn upstream_down_is_typed(backend: Backend) {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("http://127.0.0.1:{port}/mcp");
    let tg = gateway::start(backend, Some(&url), &[]).await;
    let (token, _) = tg
        .mint(
            json!({"subject": "agent-down", "tenant": "acme", "ttl_seconds": 600,
                     "tools": ["echo"]}),
        )
        .await;
    let r = steps(
        &tg,
        Some(&token),
        "legacy",
        json!([
            {"op": "sdk-call", "tool": "echo", "args": {"text": "down"}},
            {"op": "call", "tool": "echo", "args": {"text": "down"}},
        ]),
    )
    .await;
    assert_code(&r[0], UPSTREAM_UNAVAILABLE, "sdk, upstream down");
    assert_code(&r[1], UPSTREAM_UNAVAILABLE, "mcp client, upstream down");
    tg.shutdown().await;
}
