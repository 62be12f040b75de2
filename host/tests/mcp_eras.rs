//! Both MCP revisions on one endpoint, toward agents and toward tool servers (issue 7).
//!
//! - upstreams: `tests/interop_modern/upstream_server.py` run by the system `python3` with
//!   `mcp` 2.3 (speaks the handshake era and the stateless 2026-07-28 era) and by the venv
//!   `tests/interop_modern/.venv-mcp130` with `mcp` 1.30 (handshake era only);
//! - clients: the official Python client (`mcp` 2.3, modes legacy / 2026-07-28 / auto) through
//!   `tests/interop_modern/clients.py`, the TypeScript v1 client (`@modelcontextprotocol/sdk`)
//!   and v2 client (`@modelcontextprotocol/client`, modes legacy / pin / auto) through
//!   `tests/interop_modern/clients.mjs`, and raw HTTP for what no client sends on purpose
//!   (headers that disagree with the body, malformed envelopes, forged round states);
//! - two gateways on one PostgreSQL database share a handshake-era session.
//!
//! Every tool is a hard requirement: a missing one fails the test with the command that
//! installs it (`bash tests/interop_modern/setup.sh`, after
//! `pip install -r tests/interop/requirements.txt`).
//!
//! Each test marks its tool arguments with a unique string and reads the upstream's call log to
//! see exactly which calls reached it, with which headers.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::support::gateway::{self, ADMIN_TOKEN, Backend, TestGateway};
use crate::support::http;

const SETUP: &str =
    "bash tests/interop_modern/setup.sh (after pip install -r tests/interop/requirements.txt)";
const CAPABILITY: i64 = -32010;
const BUDGET: i64 = -32013;
const HEADER_MISMATCH: i64 = -32020;
const UNSUPPORTED_VERSION: i64 = -32022;
const INVALID_PARAMS: i64 = -32602;
const METHOD_NOT_FOUND: i64 = -32601;
const MODERN: &str = "2026-07-28";
const PV: &str = "io.modelcontextprotocol/protocolVersion";
const CAPS: &str = "io.modelcontextprotocol/clientCapabilities";
const CLIENT_TIMEOUT: Duration = Duration::from_secs(180);

// --- processes ----------------------------------------------------------------------------------

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests")
        .join("interop_modern")
}

fn python() -> String {
    std::env::var("INTENTGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn venv_python() -> PathBuf {
    dir().join(".venv-mcp130").join("bin").join("python")
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs a command to completion (killed after the deadline); returns exit code and outputs.
fn run(mut cmd: Command, deadline: Duration) -> (Option<i32>, String, String) {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}; run {SETUP}"));
    let out = reader(child.stdout.take().expect("stdout"));
    let err = reader(child.stderr.take().expect("stderr"));
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
    (
        status.and_then(|s| s.code()),
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    )
}

/// Fails (never skips) when a client or server package is missing.
fn require_tools() {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    let res = CHECK.get_or_init(|| {
        let mut py = Command::new(python());
        py.arg(dir().join("clients.py")).arg("--check");
        let (code, out, err) = run(py, Duration::from_secs(60));
        if code != Some(0) || !out.contains("\"2.3.0\"") {
            return Err(format!(
                "python3 with mcp 2.3.0 is needed: run {SETUP}\n{out}{err}"
            ));
        }
        let mut venv = Command::new(venv_python());
        venv.args([
            "-c",
            "import importlib.metadata as m; print(m.version('mcp'))",
        ]);
        let (code, out, err) = run(venv, Duration::from_secs(60));
        if code != Some(0) || out.trim() != "1.30.0" {
            return Err(format!(
                "the mcp 1.30 venv ({}) is needed: run {SETUP}\n{out}{err}",
                venv_python().display()
            ));
        }
        let mut node = Command::new("node");
        node.arg(dir().join("clients.mjs")).arg("check");
        let (code, out, err) = run(node, Duration::from_secs(60));
        if code != Some(0) {
            return Err(format!(
                "node and the TypeScript clients are needed: run {SETUP}\n{out}{err}"
            ));
        }
        Ok(())
    });
    if let Err(e) = res {
        panic!("{e}");
    }
}

fn last_json_line(what: &str, code: Option<i32>, out: &str, err: &str) -> Value {
    let last = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    match serde_json::from_str::<Value>(last) {
        Ok(v) if code == Some(0) => v,
        _ if code == Some(3) => panic!("{what}: a package is missing: run {SETUP}\n{err}"),
        _ => panic!("{what} exited {code:?}\n--- stdout\n{out}\n--- stderr\n{err}"),
    }
}

/// The official Python client (mcp 2.3) in `mode`, through the gateway.
pub(crate) async fn python_client(
    gw: &TestGateway,
    token: &str,
    mode: &str,
    steps: Value,
    extra: &[&str],
) -> Value {
    require_tools();
    let mut cmd = Command::new(python());
    cmd.arg(dir().join("clients.py"))
        .args(["--gateway", &gw.url, "--token", token, "--mode", mode])
        .args(extra)
        .arg(steps.to_string());
    tokio::task::spawn_blocking(move || {
        let (code, out, err) = run(cmd, CLIENT_TIMEOUT);
        last_json_line("clients.py", code, &out, &err)
    })
    .await
    .expect("client task")
}

/// A TypeScript client (`v1` or `v2`) in `mode` (legacy, auto, pin), through the gateway.
pub(crate) async fn ts_client(
    gw: &TestGateway,
    token: &str,
    client: &str,
    mode: &str,
    steps: Value,
) -> Value {
    require_tools();
    let mut cmd = Command::new("node");
    cmd.arg(dir().join("clients.mjs"))
        .arg("run")
        .args([
            "--client",
            client,
            "--mode",
            mode,
            "--gateway",
            &gw.url,
            "--token",
            token,
        ])
        .arg(steps.to_string());
    tokio::task::spawn_blocking(move || {
        let (code, out, err) = run(cmd, CLIENT_TIMEOUT);
        last_json_line("clients.mjs", code, &out, &err)
    })
    .await
    .expect("client task")
}

// --- upstreams ----------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// mcp 2.3: both revisions.
    BothEras,
    /// mcp 1.30: the handshake era only.
    HandshakeOnly,
}

pub(crate) struct Upstream {
    pub(crate) url: String,
    log: PathBuf,
    child: Mutex<Child>,
    _stdin: Mutex<ChildStdin>,
}

impl Upstream {
    fn start(kind: Kind) -> Upstream {
        Upstream::start_on(kind, 0)
    }

    /// An upstream of its own on `port` (0: any free port).
    fn start_on(kind: Kind, port: u16) -> Upstream {
        require_tools();
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "mcp-eras-{}-{kind:?}-{}.jsonl",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&log);
        let mut cmd = match kind {
            Kind::BothEras => Command::new(python()),
            Kind::HandshakeOnly => Command::new(venv_python()),
        };
        cmd.arg(dir().join("upstream_server.py"))
            .arg(port.to_string())
            .arg("--call-log")
            .arg(&log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the {kind:?} upstream: {e}; run {SETUP}"));
        let stdin = child.stdin.take().expect("stdin");
        let stderr = reader(child.stderr.take().expect("stderr"));
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = stdout.read_line(&mut line);
            let _ = tx.send(line);
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_default();
        let Some(port) = line
            .strip_prefix("PORT ")
            .and_then(|p| p.trim().parse::<u16>().ok())
        else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the {kind:?} upstream did not start (got {line:?}); run {SETUP}\n{}",
                stderr.join().unwrap_or_default()
            );
        };
        Upstream {
            url: format!("http://127.0.0.1:{port}/mcp"),
            log,
            child: Mutex::new(child),
            _stdin: Mutex::new(stdin),
        }
    }

    /// Stops this upstream and waits for it to exit.
    fn stop(&self) {
        let mut child = self.child.lock().expect("child");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub(crate) async fn shared(kind: Kind) -> &'static Upstream {
        static BOTH: OnceLock<Upstream> = OnceLock::new();
        static OLD: OnceLock<Upstream> = OnceLock::new();
        tokio::task::spawn_blocking(move || {
            let cell = match kind {
                Kind::BothEras => &BOTH,
                Kind::HandshakeOnly => &OLD,
            };
            let up = cell.get_or_init(|| Upstream::start(kind));
            if let Ok(Some(s)) = up.child.lock().expect("child").try_wait() {
                panic!("the shared {kind:?} upstream exited: {s}");
            }
            up
        })
        .await
        .expect("upstream start")
    }

    /// The calls that reached this upstream with `marker` in their arguments.
    pub(crate) fn calls_with(&self, marker: &str) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["args"].to_string().contains(marker))
            .collect()
    }

    fn tools_called_with(&self, marker: &str) -> Vec<String> {
        let mut t: Vec<String> = self
            .calls_with(marker)
            .iter()
            .map(|c| c["tool"].as_str().unwrap_or("").to_owned())
            .collect();
        t.sort();
        t
    }
}

// --- helpers ------------------------------------------------------------------------------------

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

async fn token(gw: &TestGateway, tools: &[&str], extra: Value) -> (String, String) {
    let mut body = json!({"subject": "agent-eras", "tenant": "acme", "ttl_seconds": 600,
                          "tools": tools});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    gw.mint(body).await
}

pub(crate) fn envelope() -> Value {
    json!({PV: MODERN, CAPS: {}, "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"}})
}

pub(crate) fn modern_body(id: u64, method: &str, mut params: Value) -> Value {
    params["_meta"] = envelope();
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// A raw POST to `/v1/mcp`: status, headers, JSON answer (or Null).
pub(crate) async fn post(
    gw: &TestGateway,
    token: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, hyper::HeaderMap, Value) {
    let auth = format!("Bearer {token}");
    let mut h = vec![
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
        ("authorization", auth.as_str()),
    ];
    h.extend_from_slice(headers);
    let (s, hdrs, bytes) = http::send(
        "POST",
        &format!("{}/v1/mcp", gw.url),
        &h,
        serde_json::to_vec(body).expect("json"),
    )
    .await;
    (
        s,
        hdrs,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// A well-formed modern request: the headers are derived from the body, as a client does.
async fn modern(gw: &TestGateway, token: &str, body: &Value) -> (u16, Value) {
    let method = body["method"].as_str().unwrap_or("").to_owned();
    let name = body["params"]["name"].as_str().map(str::to_owned);
    let mut h = vec![
        ("mcp-protocol-version", MODERN),
        ("mcp-method", method.as_str()),
    ];
    if let Some(n) = &name {
        h.push(("mcp-name", n.as_str()));
    }
    let (s, _, v) = post(gw, token, &h, body).await;
    (s, v)
}

#[track_caller]
pub(crate) fn assert_rpc_error(status: u16, v: &Value, want_status: u16, code: i64, ctx: &str) {
    assert_eq!(v["error"]["code"], code, "{ctx}: {v}");
    assert_eq!(status, want_status, "{ctx}: HTTP status: {v}");
    assert!(v["result"].is_null(), "{ctx}: {v}");
}

fn tools_of(r: &Value) -> Vec<String> {
    let mut t: Vec<String> = r["tools"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    t.sort();
    t
}

// --- raw protocol -------------------------------------------------------------------------------

/// The stateless era answered by the gateway itself: discover, lists, calls, and the spec's
/// refusals for everything else; the gateway keeps serving after each bad request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_era_raw_protocol() {
    for kind in [Kind::BothEras, Kind::HandshakeOnly] {
        let up = Upstream::shared(kind).await;
        let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
        let (tok, _) = token(&gw, &["echo", "read_*"], json!({})).await;
        let m = marker("raw");
        let ctx = format!("{kind:?} upstream");

        let (s, hdrs, d) = post(
            &gw,
            &tok,
            &[
                ("mcp-protocol-version", MODERN),
                ("mcp-method", "server/discover"),
            ],
            &modern_body(1, "server/discover", json!({})),
        )
        .await;
        assert_eq!(s, 200, "{ctx}: discover: {d}");
        assert!(
            hdrs.get("mcp-session-id").is_none(),
            "{ctx}: no session in the stateless era"
        );
        let r = &d["result"];
        assert!(
            r["supportedVersions"]
                .as_array()
                .is_some_and(|v| v.iter().any(|x| x == MODERN)),
            "{ctx}: {d}"
        );
        assert_eq!(r["resultType"], "complete", "{ctx}: {d}");
        assert_eq!(r["cacheScope"], "private", "{ctx}: {d}");
        assert!(r["ttlMs"].is_u64(), "{ctx}: {d}");
        // What the upstream offers and the gateway proxies, with the notifications and
        // subscriptions the upstream announces (relayed on `subscriptions/listen` streams).
        let relayed = kind == Kind::BothEras;
        assert_eq!(
            r["capabilities"],
            json!({"tools": {"listChanged": relayed}, "prompts": {"listChanged": relayed},
                   "resources": {"listChanged": relayed, "subscribe": relayed}}),
            "{ctx}: {d}"
        );
        assert!(
            r["instructions"]
                .as_str()
                .is_some_and(|i| i.starts_with("Invoices and e-mail.")),
            "{ctx}: discover is answered from the upstream's own description: {d}"
        );

        let (s, l) = modern(&gw, &tok, &modern_body(2, "tools/list", json!({}))).await;
        assert_eq!(s, 200, "{ctx}: {l}");
        let mut names: Vec<&str> = l["result"]["tools"]
            .as_array()
            .map(|a| a.iter().filter_map(|t| t["name"].as_str()).collect())
            .unwrap_or_default();
        names.sort();
        assert_eq!(
            names,
            ["echo", "read_invoice"],
            "{ctx}: only the token's tools: {l}"
        );
        assert_eq!(
            l["result"]["cacheScope"], "private",
            "{ctx}: a per-token list is never shared: {l}"
        );
        assert_eq!(l["result"]["resultType"], "complete", "{ctx}: {l}");
        assert!(l["result"]["ttlMs"].is_u64(), "{ctx}: {l}");

        let call = |id, tool: &str, args: Value| {
            modern_body(id, "tools/call", json!({"name": tool, "arguments": args}))
        };
        let (s, c) = modern(&gw, &tok, &call(3, "echo", json!({"text": m}))).await;
        assert_eq!(s, 200, "{ctx}: {c}");
        assert_eq!(c["result"]["resultType"], "complete", "{ctx}: {c}");
        assert_eq!(c["result"]["content"][0]["text"], m.as_str(), "{ctx}: {c}");
        // Not annotated by default (the decision is in the response headers).
        assert!(c["result"].get("_intentgate").is_none(), "{ctx}: {c}");
        let (s, c) = modern(&gw, &tok, &call(4, "delete_records", json!({"table": m}))).await;
        assert_rpc_error(s, &c, 200, CAPABILITY, &format!("{ctx}: forbidden tool"));

        // How the call reached the upstream: statelessly toward mcp 2.3, in the pooled session
        // toward mcp 1.30; headers computed by the gateway, never the agent's token.
        let calls = up.calls_with(&m);
        assert_eq!(up.tools_called_with(&m), ["echo"], "{ctx}: {calls:?}");
        let h = &calls[0]["headers"];
        assert!(
            h.get("authorization").is_none(),
            "{ctx}: the agent's token is not forwarded: {h}"
        );
        match kind {
            Kind::BothEras => {
                assert_eq!(h["mcp-protocol-version"], MODERN, "{ctx}: {h}");
                assert_eq!(h["mcp-method"], "tools/call", "{ctx}: {h}");
                assert_eq!(h["mcp-name"], "echo", "{ctx}: {h}");
                assert!(
                    h.get("mcp-session-id").is_none(),
                    "{ctx}: no session toward a stateless upstream: {h}"
                );
            }
            Kind::HandshakeOnly => {
                assert!(
                    h["mcp-session-id"].is_string(),
                    "{ctx}: the pooled session: {h}"
                );
                assert!(h.get("mcp-method").is_none(), "{ctx}: {h}");
            }
        }

        // What the stateless era refuses.
        let (s, hdrs, _) = http::send(
            "GET",
            &format!("{}/v1/mcp", gw.url),
            &[
                ("mcp-protocol-version", MODERN),
                ("authorization", &format!("Bearer {tok}")),
            ],
            Vec::new(),
        )
        .await;
        assert_eq!(s, 405, "{ctx}: GET in the stateless era");
        assert_eq!(
            hdrs.get("allow").and_then(|v| v.to_str().ok()),
            Some("POST")
        );
        for method in ["initialize", "ping"] {
            let (s, v) = modern(&gw, &tok, &modern_body(5, method, json!({}))).await;
            assert_rpc_error(
                s,
                &v,
                404,
                METHOD_NOT_FOUND,
                &format!("{ctx}: {method} in the stateless era"),
            );
        }
        let (s, _, _) = post(
            &gw,
            &tok,
            &[("mcp-protocol-version", MODERN), ("mcp-method", "notifications/cancelled")],
            &json!({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"_meta": envelope()}}),
        )
        .await;
        assert_eq!(s, 202, "{ctx}: a notification is acknowledged");

        // Bad versions: a future one and one that is no version at all.
        for (v, hint) in [
            ("2031-01-01", "Unsupported protocol version"),
            ("banana", "not a protocol revision"),
        ] {
            let mut body = modern_body(6, "tools/list", json!({}));
            body["params"]["_meta"][PV] = json!(v);
            let (s, _, r) = post(
                &gw,
                &tok,
                &[("mcp-protocol-version", v), ("mcp-method", "tools/list")],
                &body,
            )
            .await;
            assert_rpc_error(
                s,
                &r,
                400,
                UNSUPPORTED_VERSION,
                &format!("{ctx}: version {v}"),
            );
            assert_eq!(r["error"]["data"]["requested"], v, "{r}");
            let supported = r["error"]["data"]["supported"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            // The same list server/discover advertises (as the official servers answer).
            assert_eq!(supported, [json!(MODERN)], "{r}");
            assert!(
                r["error"]["message"]
                    .as_str()
                    .is_some_and(|msg| msg.contains(hint)),
                "{r}"
            );
        }
        // Malformed or missing envelope, missing required headers.
        let list_headers = [
            ("mcp-protocol-version", MODERN),
            ("mcp-method", "tools/list"),
        ];
        for (params, why) in [
            (json!({}), "no _meta"),
            (json!({"_meta": "2026-07-28"}), "_meta is a string"),
            (
                json!({"_meta": {PV: MODERN}}),
                "_meta without client capabilities",
            ),
            (
                json!({"_meta": {PV: MODERN, CAPS: []}}),
                "client capabilities not an object",
            ),
        ] {
            let body = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": params});
            let (s, _, r) = post(&gw, &tok, &list_headers, &body).await;
            assert_rpc_error(s, &r, 400, INVALID_PARAMS, &format!("{ctx}: {why}"));
        }
        let (s, _, r) = post(
            &gw,
            &tok,
            &[("mcp-protocol-version", MODERN)],
            &modern_body(8, "tools/list", json!({})),
        )
        .await;
        assert_rpc_error(
            s,
            &r,
            400,
            HEADER_MISMATCH,
            &format!("{ctx}: missing Mcp-Method"),
        );
        let (s, _, r) = post(
            &gw,
            &tok,
            &[
                ("mcp-protocol-version", MODERN),
                ("mcp-method", "tools/call"),
            ],
            &call(9, "echo", json!({"text": format!("{m}-noname")})),
        )
        .await;
        assert_rpc_error(
            s,
            &r,
            400,
            HEADER_MISMATCH,
            &format!("{ctx}: missing Mcp-Name"),
        );
        let (s, _, r) = post(
            &gw,
            &tok,
            &[
                ("mcp-protocol-version", MODERN),
                ("mcp-method", "tools/list"),
            ],
            &json!({"bad": true}),
        )
        .await;
        assert_eq!(s, 400, "{ctx}: {r}");

        // Still serving, in both eras, and the IntentGate SDK's plain POST still works.
        let (s, c) = modern(
            &gw,
            &tok,
            &call(10, "echo", json!({"text": format!("{m}-after")})),
        )
        .await;
        assert_eq!(s, 200, "{ctx}: {c}");
        assert_eq!(
            c["result"]["content"][0]["text"],
            format!("{m}-after"),
            "{ctx}: {c}"
        );
        let v = gw
            .tool_call(&tok, "echo", json!({"text": format!("{m}-sdk")}))
            .await;
        assert_eq!(
            v["result"]["content"][0]["text"],
            format!("{m}-sdk"),
            "{ctx}: {v}"
        );
        assert!(
            v["result"].get("resultType").is_none(),
            "{ctx}: handshake-era answers stay as they were: {v}"
        );
        assert_eq!(up.tools_called_with(&m), ["echo", "echo", "echo"], "{ctx}");
        gw.shutdown().await;
    }
}

/// MCP-Protocol-Version, Mcp-Method and Mcp-Name never outvote the body: any disagreement, in
/// either direction and in either era, is HTTP 400 / -32020 before any check runs (even a bad
/// token is not looked at) and nothing reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_never_outvote_the_body() {
    let up = Upstream::shared(Kind::BothEras).await;
    let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (tok, _) = token(&gw, &["echo"], json!({})).await;
    let m = marker("outvote");
    let call = |tool: &str, args: Value| {
        modern_body(1, "tools/call", json!({"name": tool, "arguments": args}))
    };
    let plain = |tool: &str, args: Value| json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": args}});
    let allowed = call("echo", json!({"text": format!("{m}-a")}));
    let forbidden = call("delete_records", json!({"table": format!("{m}-f")}));
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Value);
    let cases: Vec<Case> = vec![
        // The header names an allowed tool, the body a forbidden one.
        (
            "Mcp-Name allowed, body forbidden",
            vec![
                ("mcp-protocol-version", MODERN),
                ("mcp-method", "tools/call"),
                ("mcp-name", "echo"),
            ],
            forbidden.clone(),
        ),
        // The header names a forbidden tool, the body an allowed one.
        (
            "Mcp-Name forbidden, body allowed",
            vec![
                ("mcp-protocol-version", MODERN),
                ("mcp-method", "tools/call"),
                ("mcp-name", "delete_records"),
            ],
            allowed.clone(),
        ),
        (
            "Mcp-Name differs in case",
            vec![
                ("mcp-protocol-version", MODERN),
                ("mcp-method", "tools/call"),
                ("mcp-name", "Echo"),
            ],
            allowed.clone(),
        ),
        (
            "Mcp-Method differs",
            vec![
                ("mcp-protocol-version", MODERN),
                ("mcp-method", "tools/list"),
                ("mcp-name", "echo"),
            ],
            allowed.clone(),
        ),
        (
            "Mcp-Name twice",
            vec![
                ("mcp-protocol-version", MODERN),
                ("mcp-method", "tools/call"),
                ("mcp-name", "echo"),
                ("mcp-name", "echo"),
            ],
            allowed.clone(),
        ),
        (
            "version header differs from _meta",
            vec![
                ("mcp-protocol-version", MODERN),
                ("mcp-method", "tools/call"),
                ("mcp-name", "echo"),
            ],
            {
                let mut b = allowed.clone();
                b["params"]["_meta"][PV] = json!("2031-01-01");
                b
            },
        ),
        // Handshake era: the headers are optional, but when present they must agree too.
        (
            "handshake era, Mcp-Name forbidden",
            vec![("mcp-name", "delete_records")],
            plain("echo", json!({"text": format!("{m}-h1")})),
        ),
        (
            "handshake era, Mcp-Name allowed",
            vec![("mcp-name", "echo")],
            plain("delete_records", json!({"table": format!("{m}-h2")})),
        ),
        (
            "handshake era, Mcp-Method differs",
            vec![("mcp-method", "tools/list")],
            plain("delete_records", json!({"table": format!("{m}-h3")})),
        ),
        (
            "handshake header, modern _meta",
            vec![("mcp-protocol-version", "2025-11-25")],
            call("echo", json!({"text": format!("{m}-h4")})),
        ),
    ];
    for (why, headers, body) in &cases {
        for bearer in [tok.as_str(), "not-a-token"] {
            let (s, _, v) = post(&gw, bearer, headers, body).await;
            assert_rpc_error(
                s,
                &v,
                400,
                HEADER_MISMATCH,
                &format!("{why} (token {bearer:.10})"),
            );
        }
    }
    assert!(
        up.calls_with(&m).is_empty(),
        "nothing reached the upstream: {:?}",
        up.calls_with(&m)
    );
    // The same requests with agreeing headers are decided from the body.
    let (s, v) = modern(&gw, &tok, &allowed).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["result"].is_object(), "{v}");
    let (s, v) = modern(&gw, &tok, &forbidden).await;
    assert_rpc_error(s, &v, 200, CAPABILITY, "agreeing headers, forbidden tool");
    // Modern _meta without the header is a handshake-era request, as the official servers do.
    let (s, _, v) = post(
        &gw,
        &tok,
        &[],
        &call("echo", json!({"text": format!("{m}-b")})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(
        v["result"]["resultType"].is_null(),
        "handshake-era answer: {v}"
    );
    assert_eq!(up.tools_called_with(&m), ["echo", "echo"]);
    gw.shutdown().await;
}

// --- real clients -------------------------------------------------------------------------------

fn client_steps(m: &str) -> Value {
    json!([
        {"op": "list"},
        {"op": "call", "tool": "echo", "args": {"text": m}},
        {"op": "call", "tool": "delete_records", "args": {"table": m}},
    ])
}

#[track_caller]
fn assert_client_run(out: &Value, m: &str, ctx: &str) {
    let r = out["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(r.len(), 3, "{ctx}: {out}");
    assert_eq!(r[0]["ok"], true, "{ctx}: list failed: {out}");
    assert_eq!(
        tools_of(&r[0]),
        ["echo", "read_invoice"],
        "{ctx}: only the token's tools: {out}"
    );
    assert_eq!(r[1]["ok"], true, "{ctx}: allowed call failed: {out}");
    assert_eq!(r[1]["is_error"], false, "{ctx}: {out}");
    assert_eq!(r[1]["text"][0], m, "{ctx}: {out}");
    assert_eq!(r[2]["ok"], false, "{ctx}: forbidden call succeeded: {out}");
    assert_eq!(r[2]["code"], CAPABILITY, "{ctx}: forbidden call: {out}");
}

/// The official Python client in its three modes, in front of a tool server speaking both
/// revisions and one speaking only the handshake one. `auto` ends on 2026-07-28: the gateway
/// speaks it whatever the upstream does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_in_every_mode() {
    for kind in [Kind::BothEras, Kind::HandshakeOnly] {
        let up = Upstream::shared(kind).await;
        let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
        let (tok, _) = token(&gw, &["echo", "read_invoice"], json!({})).await;
        for (mode, ends_on) in [("legacy", "2025-11-25"), (MODERN, MODERN), ("auto", MODERN)] {
            let m = marker(&format!("py-{mode}"));
            let out = python_client(&gw, &tok, mode, client_steps(&m), &[]).await;
            let ctx = format!("python mcp 2.3, mode {mode}, {kind:?} upstream");
            assert_client_run(&out, &m, &ctx);
            assert_eq!(out["protocol_version"], ends_on, "{ctx}: {out}");
            assert_eq!(
                up.tools_called_with(&m),
                ["echo"],
                "{ctx}: only the allowed call reaches the upstream"
            );
            // The gateway speaks the upstream's newest revision (stateless toward mcp 2.3, in
            // its pooled session toward mcp 1.30), except that a handshake-era client's call goes
            // through the session of an upstream that speaks both: the tool may ask that client
            // something during the call (sampling, elicitation), which only a session carries.
            let h = &up.calls_with(&m)[0]["headers"];
            match kind {
                Kind::BothEras if mode == "legacy" => assert!(
                    h["mcp-session-id"].is_string() && h.get("mcp-method").is_none(),
                    "{ctx}: {h}"
                ),
                Kind::BothEras => assert!(
                    h["mcp-method"] == "tools/call" && h.get("mcp-session-id").is_none(),
                    "{ctx}: {h}"
                ),
                Kind::HandshakeOnly => assert!(
                    h["mcp-session-id"].is_string() && h.get("mcp-method").is_none(),
                    "{ctx}: {h}"
                ),
            }
        }
        gw.shutdown().await;
    }
}

/// The TypeScript clients: v1 (handshake era) and v2 in legacy, pinned and auto modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_clients_v1_and_v2() {
    for kind in [Kind::BothEras, Kind::HandshakeOnly] {
        let up = Upstream::shared(kind).await;
        let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
        let (tok, _) = token(&gw, &["echo", "read_invoice"], json!({})).await;
        for (client, mode, era) in [
            ("v1", "legacy", "legacy"),
            ("v2", "legacy", "legacy"),
            ("v2", "pin", "modern"),
            ("v2", "auto", "modern"),
        ] {
            let m = marker(&format!("ts-{client}-{mode}"));
            let out = ts_client(&gw, &tok, client, mode, client_steps(&m)).await;
            let ctx = format!("typescript {client}, mode {mode}, {kind:?} upstream");
            assert_client_run(&out, &m, &ctx);
            assert_eq!(out["era"], era, "{ctx}: {out}");
            assert_eq!(
                up.tools_called_with(&m),
                ["echo"],
                "{ctx}: only the allowed call reaches the upstream"
            );
        }
        gw.shutdown().await;
    }
}

// --- multi-round calls --------------------------------------------------------------------------

async fn audit_events(gw: &TestGateway, jti: &str) -> Vec<Value> {
    let (s, v) = http::get_json(&format!("{}/v1/admin/audit?jti={jti}", gw.url), ADMIN_TOKEN).await;
    assert_eq!(s, 200, "{v}");
    v.get("items")
        .or_else(|| v.get("events"))
        .unwrap_or(&v)
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A 2026-07-28 tool that asks for input: the official client answers the elicitation and
/// retries; the gateway decides every round, charges once (max_calls 1 is enough for both
/// rounds, and spent afterwards), and the audit links round 2 to the call's first event.
/// A prompt whose upstream answers with an input-required result (a request that the client
/// sample) is a multi-round call like a tool's: the request is decided and audited before the
/// client sees it, the upstream's state goes out sealed to this prompt and its arguments, and
/// the retry reaches the upstream with the client's answer and the upstream's own state. A
/// policy that refuses sampling refuses the prompt's round too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompts_input_requests_are_decided_and_sealed() {
    let up = Upstream::shared(Kind::BothEras).await;
    let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (tok, jti) = token(&gw, &["*"], json!({})).await;
    let m = marker("prompt-input");
    let ask = |id: u64, extra: Value| {
        let mut body = modern_body(
            id,
            "prompts/get",
            json!({"name": "greet_by_model", "arguments": {"name": m}}),
        );
        body["params"]["_meta"][CAPS] = json!({"sampling": {}});
        if let (Some(p), Some(e)) = (body["params"].as_object_mut(), extra.as_object()) {
            p.extend(e.clone());
        }
        body
    };
    let (status, v) = modern(&gw, &tok, &ask(3, json!({}))).await;
    assert_eq!(status, 200, "{v}");
    let r = &v["result"];
    assert_eq!(r["resultType"], "input_required", "{v}");
    assert_eq!(
        r["inputRequests"]["model"]["method"], "sampling/createMessage",
        "{v}"
    );
    let state = r["requestState"].as_str().expect("a state").to_owned();
    assert_ne!(state, "greet:1", "the upstream's state goes out sealed");
    let audit = audit_events(&gw, &jti).await;
    assert!(
        audit
            .iter()
            .any(|e| e["tool"] == "sampling:prompt:greet_by_model" && e["decision"] == "allow"),
        "the request to sample was decided: {audit:?}"
    );
    // The state is bound to the prompt and its arguments.
    let mut other = ask(
        4,
        json!({"requestState": state, "inputResponses": {"model": {}}}),
    );
    other["params"]["arguments"]["name"] = json!("someone else");
    let (_, v) = modern(&gw, &tok, &other).await;
    assert_eq!(v["error"]["code"], INVALID_PARAMS, "{v}");
    // The retry with the answer: the upstream gets its own state back, and completes.
    let answer = json!({"model": {"role": "assistant", "model": "m",
                                   "content": {"type": "text", "text": "hello"}}});
    let (_, v) = modern(
        &gw,
        &tok,
        &ask(5, json!({"requestState": state, "inputResponses": answer})),
    )
    .await;
    assert!(v["result"]["messages"].is_array(), "{v}");
    let rounds = up.calls_with(&m);
    assert_eq!(rounds.len(), 2, "{rounds:?}");
    assert_eq!(rounds[1]["request_state"], "greet:1", "{rounds:?}");
    assert_eq!(rounds[1]["answered"], json!(["model"]), "{rounds:?}");
    // A state is single-use.
    let (_, v) = modern(
        &gw,
        &tok,
        &ask(6, json!({"requestState": state, "inputResponses": answer})),
    )
    .await;
    assert!(v["error"].is_object(), "a second use of the state: {v}");
    gw.shutdown().await;

    // A policy that refuses sampling refuses the prompt's request to sample.
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("no_sampling.rego");
    std::fs::write(
        &policy,
        "package intentgate.policy\n\ndecision := {\"allow\": false, \"reason\": \"no sampling\"} if {\n\tinput.kind == \"sampling\"\n} else := {\"allow\": true, \"reason\": \"ok\"}\n",
    )
    .expect("policy");
    let gw = gateway::start(
        Backend::Sqlite,
        Some(&up.url),
        &["--policy-file", &policy.display().to_string()],
    )
    .await;
    let (tok, jti) = token(&gw, &["*"], json!({})).await;
    let (_, v) = modern(&gw, &tok, &ask(7, json!({}))).await;
    assert!(v["error"].is_object() && v["result"].is_null(), "{v}");
    let audit = audit_events(&gw, &jti).await;
    assert!(
        audit
            .iter()
            .any(|e| e["tool"] == "sampling:prompt:greet_by_model"
                && e["decision"] == "block"
                && e["check"] == "policy"),
        "{audit:?}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_round_call_is_one_call() {
    let up = Upstream::shared(Kind::BothEras).await;
    let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (tok, jti) = token(&gw, &["confirm_transfer", "echo"], json!({"max_calls": 1})).await;
    let m = marker("rounds");
    let out = python_client(
        &gw,
        &tok,
        MODERN,
        json!([
            {"op": "call", "tool": "confirm_transfer", "args": {"amount": 5, "memo": m}},
            {"op": "call", "tool": "echo", "args": {"text": m}},
        ]),
        &[],
    )
    .await;
    let r = &out["results"];
    assert_eq!(r[0]["ok"], true, "multi-round call: {out}");
    assert!(
        r[0]["text"][0]
            .as_str()
            .is_some_and(|t| t.contains("confirmed=True after 2 rounds")),
        "{out}"
    );
    assert_eq!(
        out["elicitations"].as_array().map(Vec::len),
        Some(1),
        "{out}"
    );
    assert_eq!(
        r[1]["code"], BUDGET,
        "the call was charged once, max_calls=1 is now spent: {out}"
    );
    let calls = up.calls_with(&m);
    assert_eq!(
        calls.len(),
        2,
        "both rounds reached the upstream: {calls:?}"
    );
    assert!(
        calls[1]["request_state"]
            .as_str()
            .is_some_and(|s| s.starts_with("round:")),
        "the upstream got its own state back, not the gateway's seal: {calls:?}"
    );
    let events: Vec<Value> = audit_events(&gw, &jti)
        .await
        .into_iter()
        .filter(|e| e["tool"] == "confirm_transfer")
        .collect();
    assert_eq!(events.len(), 2, "one event per round: {events:?}");
    let first = events
        .iter()
        .find(|e| e.get("round").is_none())
        .expect("first round");
    let second = events
        .iter()
        .find(|e| e.get("round").is_some())
        .expect("second round");
    assert_eq!(first["decision"], "allow");
    assert_eq!(second["decision"], "allow");
    assert!(first.get("call_id").is_none(), "{first}");
    assert_eq!(second["round"], 2, "{second}");
    assert_eq!(
        second["call_id"], first["id"],
        "round 2 names the call's first event: {events:?}"
    );
    gw.shutdown().await;
}

/// Raw rounds: the client gets the gateway's seal, not the upstream's state; a forged or
/// re-targeted state is refused before the upstream; a token revoked between rounds stops the
/// call; a handshake-era client gets a clear error instead of a round it cannot answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_round_is_authorized() {
    let up = Upstream::shared(Kind::BothEras).await;
    let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (tok, jti) = token(&gw, &["confirm_transfer"], json!({})).await;
    let m = marker("round-raw");
    let args = json!({"amount": 7, "memo": m});
    let caps = json!({"elicitation": {}});
    let round = |id: u64, args: &Value, extra: Value| {
        let mut b = modern_body(
            id,
            "tools/call",
            json!({"name": "confirm_transfer", "arguments": args}),
        );
        b["params"]["_meta"][CAPS] = caps.clone();
        if let (Some(p), Some(e)) = (b["params"].as_object_mut(), extra.as_object()) {
            p.extend(e.clone());
        }
        b
    };
    let (s, first) = modern(&gw, &tok, &round(1, &args, json!({}))).await;
    assert_eq!(s, 200, "{first}");
    assert_eq!(first["result"]["resultType"], "input_required", "{first}");
    let state = first["result"]["requestState"]
        .as_str()
        .expect("requestState")
        .to_owned();
    assert!(
        state.starts_with("igr1."),
        "the gateway's seal, not the upstream's state: {state}"
    );
    assert!(
        first["result"]["inputRequests"]["confirm"].is_object(),
        "{first}"
    );
    let answers = json!({"confirm": {"action": "accept", "content": {"ok": true}}});

    // A forged state, and the real one under other arguments or another tool: refused.
    let (s, v) = modern(
        &gw,
        &tok,
        &round(
            2,
            &args,
            json!({"inputResponses": answers, "requestState": "v1.forged"}),
        ),
    )
    .await;
    assert_rpc_error(s, &v, 400, INVALID_PARAMS, "forged state");
    let other = json!({"amount": 7000, "memo": m});
    let (s, v) = modern(
        &gw,
        &tok,
        &round(
            3,
            &other,
            json!({"inputResponses": answers, "requestState": state}),
        ),
    )
    .await;
    assert_rpc_error(
        s,
        &v,
        400,
        INVALID_PARAMS,
        "state reused for other arguments",
    );
    assert_eq!(
        up.calls_with(&m).len(),
        1,
        "only round 1 reached the upstream"
    );

    // Revoked between rounds: round 2 is refused and never forwarded.
    let (s, _) = http::post_json(
        &format!("{}/v1/admin/revoke", gw.url),
        Some(ADMIN_TOKEN),
        &json!({"jti": jti, "reason": "between rounds"}),
    )
    .await;
    assert!(s == 200 || s == 204, "revoke: HTTP {s}");
    let (s, v) = modern(
        &gw,
        &tok,
        &round(
            4,
            &args,
            json!({"inputResponses": answers, "requestState": state}),
        ),
    )
    .await;
    assert_rpc_error(s, &v, 200, CAPABILITY, "round 2 after revocation");
    assert_eq!(
        up.calls_with(&m).len(),
        1,
        "the revoked round never reached the upstream"
    );

    // A handshake-era client cannot answer a round: a clear error, not a half-result.
    let (tok2, _) = token(&gw, &["confirm_transfer"], json!({})).await;
    let v = gw
        .tool_call(
            &tok2,
            "confirm_transfer",
            json!({"amount": 1, "memo": format!("{m}-h")}),
        )
        .await;
    assert!(
        v["error"]["data"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("2026-07-28")),
        "{v}"
    );
    gw.shutdown().await;
}

/// A sealed round state is single-use: replaying an answered round (which would skip the
/// budget, charged once per call) is refused and never reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_state_is_single_use() {
    let up = Upstream::shared(Kind::BothEras).await;
    let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (tok, _) = token(&gw, &["confirm_transfer"], json!({})).await;
    let m = marker("round-replay");
    let args = json!({"amount": 7, "memo": m});
    let round = |id: u64, extra: Value| {
        let mut b = modern_body(
            id,
            "tools/call",
            json!({"name": "confirm_transfer", "arguments": args}),
        );
        b["params"]["_meta"][CAPS] = json!({"elicitation": {}});
        if let (Some(p), Some(e)) = (b["params"].as_object_mut(), extra.as_object()) {
            p.extend(e.clone());
        }
        b
    };
    let (s, first) = modern(&gw, &tok, &round(1, json!({}))).await;
    assert_eq!(s, 200, "{first}");
    let state = first["result"]["requestState"]
        .as_str()
        .expect("requestState")
        .to_owned();
    let answer = json!({"inputResponses": {"confirm": {"action": "accept", "content": {"ok": true}}},
                        "requestState": state});
    let (s, second) = modern(&gw, &tok, &round(2, answer.clone())).await;
    assert_eq!(s, 200, "{second}");
    assert!(second.get("error").is_none(), "round 2 answered: {second}");
    assert_eq!(up.calls_with(&m).len(), 2);
    let (s, replay) = modern(&gw, &tok, &round(3, answer)).await;
    assert_rpc_error(s, &replay, 200, BUDGET, "a replayed round");
    assert!(
        replay["error"]["data"]
            .as_str()
            .is_some_and(|d| d.contains("single-use")),
        "{replay}"
    );
    assert_eq!(
        up.calls_with(&m).len(),
        2,
        "the replay never reached the upstream"
    );
    gw.shutdown().await;
}

/// Answers sent with a first round (no sealed state) never reach the upstream: the client may
/// answer only what the upstream asked, through the gateway, in a later round. Forwarded, they
/// pre-answered a confirmation nobody was shown, and the call completed in one round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_without_a_sealed_round_are_not_forwarded() {
    let up = Upstream::shared(Kind::BothEras).await;
    let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (tok, _) = token(&gw, &["confirm_transfer"], json!({})).await;
    let m = marker("pre-answered");
    let mut body = modern_body(
        1,
        "tools/call",
        json!({"name": "confirm_transfer", "arguments": {"amount": 9, "memo": m},
               "inputResponses": {"confirm": {"action": "accept", "content": {"ok": true}}}}),
    );
    body["params"]["_meta"][CAPS] = json!({"elicitation": {}});
    let (s, first) = modern(&gw, &tok, &body).await;
    assert_eq!(s, 200, "{first}");
    assert!(
        first["result"]["requestState"].is_string(),
        "the upstream asked its question: {first}"
    );
    let calls = up.calls_with(&m);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0]["input_responses"].is_null(), "{calls:?}");
    gw.shutdown().await;
}

/// A multi-round call a person approved is approved for every round: its later rounds are
/// decided again but not asked again (before, each round escalated anew, and the call could
/// never finish).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_multi_round_call_is_not_asked_again_in_its_later_rounds() {
    let up = Upstream::shared(Kind::BothEras).await;
    let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let registry = gw.gw.pipeline.registry().clone();
    tokio::task::spawn_blocking(move || {
        let spec = registry.default_spec().with_policy_config(
            r#"package intentgate.policy

decision := {"allow": false, "escalate": true, "reason": "transfers need a person"} if {
	input.tool == "confirm_transfer"
} else := {"allow": true, "reason": "ok"}
"#
            .into(),
        );
        let draft = registry
            .create_draft("acme", "transfers-asked", spec)
            .expect("draft");
        registry.promote("acme", &draft.digest).expect("promote");
    })
    .await
    .expect("promote task");
    let (tok, _) = token(&gw, &["confirm_transfer"], json!({})).await;
    let m = marker("approved-rounds");
    let round = |id: u64, extra: Value| {
        let mut b = modern_body(
            id,
            "tools/call",
            json!({"name": "confirm_transfer", "arguments": {"amount": 3, "memo": m}}),
        );
        b["params"]["_meta"][CAPS] = json!({"elicitation": {}});
        if let (Some(p), Some(e)) = (b["params"].as_object_mut(), extra.as_object()) {
            p.extend(e.clone());
        }
        b
    };
    // Round 0: the policy asks a person; the client holds a sealed state naming the approval.
    let (s, asked) = modern(&gw, &tok, &round(1, json!({}))).await;
    assert_eq!(s, 200, "{asked}");
    let state = asked["result"]["requestState"]
        .as_str()
        .unwrap_or_else(|| panic!("an approval state: {asked}"))
        .to_owned();
    let (s, list) = http::get_json(
        &format!("{}/v1/admin/approvals?status=pending&tenant=acme", gw.url),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(s, 200, "{list}");
    let id = list["items"][0]["pending_id"]
        .as_str()
        .unwrap_or_else(|| panic!("a pending approval: {list}"))
        .to_owned();
    let (s, d) = http::post_json(
        &format!("{}/v1/admin/approvals/{id}/decide", gw.url),
        Some(ADMIN_TOKEN),
        &json!({"decision": "approve", "decided_by": "ops@example.com"}),
    )
    .await;
    assert_eq!(s, 200, "{d}");
    // Approved: the call runs, and the upstream asks its confirmation.
    let (s, confirm) = modern(&gw, &tok, &round(2, json!({"requestState": state}))).await;
    assert_eq!(s, 200, "{confirm}");
    let state = confirm["result"]["requestState"]
        .as_str()
        .unwrap_or_else(|| panic!("the upstream's question: {confirm}"))
        .to_owned();
    assert_eq!(up.calls_with(&m).len(), 1, "ran once");
    // The answer's round is decided again, not asked of a person again.
    let answer = json!({"requestState": state,
        "inputResponses": {"confirm": {"action": "accept", "content": {"ok": true}}}});
    let (s, done) = modern(&gw, &tok, &round(3, answer)).await;
    assert_eq!(s, 200, "{done}");
    let text = done["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_default();
    assert!(text.contains("confirmed=True"), "completed: {done}");
    assert_eq!(up.calls_with(&m).len(), 2, "the answered round ran");
    gw.shutdown().await;
}

// --- replicas -----------------------------------------------------------------------------------

/// Two gateways on one PostgreSQL database with the same master key: a handshake-era session
/// opened on one is used on the other (session ids are signed and self-contained).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_opened_on_one_replica_works_on_another() {
    let up = Upstream::shared(Kind::HandshakeOnly).await;
    let url = tokio::task::spawn_blocking(|| {
        intentgate::testkit::PgServer::shared().and_then(|pg| pg.fresh_database())
    })
    .await
    .expect("postgres task")
    .unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
    let a = gateway::start(Backend::Postgres(url.clone()), Some(&up.url), &[]).await;
    let b = gateway::start(Backend::Postgres(url), Some(&up.url), &[]).await;
    let (tok, _) = token(&a, &["echo"], json!({})).await;
    let m = marker("replica");
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}});
    let (s, hdrs, v) = post(&a, &tok, &[], &init).await;
    assert_eq!(s, 200, "{v}");
    let sid = hdrs
        .get("mcp-session-id")
        .and_then(|h| h.to_str().ok())
        .expect("a session id from replica A")
        .to_owned();
    let session = [
        ("mcp-session-id", sid.as_str()),
        ("mcp-protocol-version", "2025-11-25"),
    ];
    let (s, _, _) = post(
        &b,
        &tok,
        &session,
        &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    assert_eq!(s, 202);
    let (s, _, v) = post(
        &b,
        &tok,
        &session,
        &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["result"]["tools"].as_array().map(Vec::len),
        Some(1),
        "replica B lists on A's session: {v}"
    );
    let call = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                      "params": {"name": "echo", "arguments": {"text": m}}});
    let (s, _, v) = post(&b, &tok, &session, &call).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["result"]["content"][0]["text"],
        m.as_str(),
        "replica B calls on A's session: {v}"
    );
    // A session id that no replica issued is refused on both.
    let forged = [
        ("mcp-session-id", "igs1.e30.AAAA"),
        ("mcp-protocol-version", "2025-11-25"),
    ];
    for gw in [&a, &b] {
        let (s, _, _) = post(gw, &tok, &forged, &call).await;
        assert_eq!(s, 404, "unknown session");
    }
    assert_eq!(up.tools_called_with(&m), ["echo"]);
    a.shutdown().await;
    b.shutdown().await;
}

// --- learning the upstream's revision -----------------------------------------------------------

/// The upstream's revision is cached, and learned again when the upstream answers as another
/// revision: a stateless upstream replaced on the same address by a handshake-only one (mcp
/// 1.30 answers the stateless request with 400 "Missing session ID") is probed again and the
/// call goes through a session, within the agent's one call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_revision_is_learned_again() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let modern_up = tokio::task::spawn_blocking(move || Upstream::start_on(Kind::BothEras, port))
        .await
        .expect("start");
    let gw = gateway::start(Backend::Sqlite, Some(&modern_up.url), &[]).await;
    let (tok, _) = token(&gw, &["echo"], json!({})).await;
    let m = marker("relearn");
    let v = gw
        .tool_call(&tok, "echo", json!({"text": format!("{m}-1")}))
        .await;
    assert_eq!(v["result"]["content"][0]["text"], format!("{m}-1"), "{v}");
    let calls = modern_up.calls_with(&m);
    assert_eq!(
        calls[0]["headers"]["mcp-method"], "tools/call",
        "stateless toward mcp 2.3: {calls:?}"
    );

    modern_up.stop();
    let old_up = tokio::task::spawn_blocking(move || Upstream::start_on(Kind::HandshakeOnly, port))
        .await
        .expect("start");
    let v = gw
        .tool_call(&tok, "echo", json!({"text": format!("{m}-2")}))
        .await;
    assert_eq!(
        v["result"]["content"][0]["text"],
        format!("{m}-2"),
        "the call is sent again in the handshake era, transparently: {v}"
    );
    let calls = old_up.calls_with(&m);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(
        calls[0]["headers"]["mcp-session-id"].is_string(),
        "in a session toward mcp 1.30: {calls:?}"
    );
    // The verdict is cached: later calls go straight to the session.
    let v = gw
        .tool_call(&tok, "echo", json!({"text": format!("{m}-3")}))
        .await;
    assert_eq!(v["result"]["content"][0]["text"], format!("{m}-3"), "{v}");
    old_up.stop();
    gw.shutdown().await;
}
