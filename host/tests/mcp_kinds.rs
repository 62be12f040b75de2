//! Resources, prompts and completions through the gateway, authorized like tool calls (issue 12),
//! and the MCP edges: `Host`/`Origin`, ending a session, upstream answers as NDJSON or as
//! several SSE events.
//!
//! - upstream: `tests/interop/upstream_server.py` (official `mcp` 2.3 server, with resources, a
//!   resource template, prompts and completions), spoken to in the stateless era (its default)
//!   and in the handshake era (`--handshake-only`);
//! - clients: the official Python client (`mcp` 2.3, handshake and 2026-07-28 modes) and the
//!   TypeScript v2 client (`@modelcontextprotocol/client`, legacy and pinned), driven by
//!   `tests/interop_modern/clients.{py,mjs}`; the IntentGate Python SDK (`intentgate` 0.3.0)
//!   attenuates tokens with the new caveats; raw HTTP for what no client sends on purpose.
//!
//! Each test marks what it sends with a unique string and reads the upstream's call log to see
//! what reached it.

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::interop::{Flavor, Upstream};
use crate::mcp_eras::{assert_rpc_error, modern_body, post, python_client, ts_client};
use crate::support::gateway::{self, ADMIN_TOKEN, Backend, TestGateway};
use crate::support::http;

const CAPABILITY: i64 = -32010;
const POLICY: i64 = -32012;
const HEADER_MISMATCH: i64 = -32020;
const UNSUPPORTED_VERSION: i64 = -32022;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const MODERN: &str = "2026-07-28";

fn marker(name: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{name}{}x{nanos}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

async fn full_token(gw: &TestGateway) -> (String, String) {
    gw.mint(
        json!({"subject": "agent-kinds", "tenant": "acme", "ttl_seconds": 600,
                   "tools": ["*"]}),
    )
    .await
}

/// What reached the upstream, by the log's `tool` (`resource:<uri>`, `prompt:<name>`, ...).
fn reached(up: &Upstream, marker: &str) -> Vec<String> {
    let mut t: Vec<String> = up
        .calls_with(marker)
        .iter()
        .map(|c| c["tool"].as_str().unwrap_or("").to_owned())
        .collect();
    t.sort();
    t
}

fn result_of<'a>(out: &'a Value, i: usize, ctx: &str) -> &'a Value {
    let r = &out["results"][i];
    assert_eq!(r["ok"], true, "{ctx}: step {i}: {out}");
    r
}

fn steps_for(m: &str) -> Value {
    json!([
        {"op": "resources"},
        {"op": "templates"},
        {"op": "prompts"},
        {"op": "read", "uri": "file:///public/readme.md"},
        {"op": "read", "uri": format!("note://{m}")},
        {"op": "prompt", "name": "greet", "args": {"name": m}},
        {"op": "complete", "ref": {"type": "ref/prompt", "name": "greet"},
         "argument": {"name": "name", "value": "al"}},
        {"op": "complete", "ref": {"type": "ref/resource", "uri": "note://{topic}"},
         "argument": {"name": "topic", "value": "al"}},
    ])
}

fn check_full_scope(out: &Value, m: &str, ctx: &str) {
    assert_eq!(
        result_of(out, 0, ctx)["uris"],
        json!([
            "file:///private/ledger.csv",
            "file:///public/readme.md",
            "file:///public/secret.txt"
        ]),
        "{ctx}: {out}"
    );
    assert_eq!(
        result_of(out, 1, ctx)["templates"],
        json!(["note://{topic}"]),
        "{ctx}"
    );
    assert_eq!(
        result_of(out, 2, ctx)["prompts"],
        json!(["admin_reset", "greet", "summarize"]),
        "{ctx}"
    );
    assert_eq!(
        result_of(out, 3, ctx)["text"],
        json!(["# Readme\nPublic."]),
        "{ctx}"
    );
    assert_eq!(
        result_of(out, 4, ctx)["text"],
        json!([format!("note about {m}")]),
        "{ctx}"
    );
    assert_eq!(
        result_of(out, 5, ctx)["text"],
        json!([format!("Say hello to {m}")]),
        "{ctx}"
    );
    assert_eq!(
        result_of(out, 6, ctx)["values"],
        json!(["alice", "alfred"]),
        "{ctx}"
    );
    assert_eq!(
        result_of(out, 7, ctx)["values"],
        json!(["alpha", "almanac"]),
        "{ctx}"
    );
}

/// The official Python and TypeScript clients list, read, get prompts and complete through the
/// gateway, in both client revisions, toward an upstream spoken to in either revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_clients_reach_resources_prompts_and_completions() {
    for flavor in [Flavor::Sse, Flavor::HandshakeSse] {
        let up = Upstream::shared_async(flavor).await;
        let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
        let (tok, _) = full_token(&gw).await;
        for (client, mode) in [
            ("py", "legacy"),
            ("py", MODERN),
            ("v2", "legacy"),
            ("v2", "pin"),
        ] {
            let m = marker("kinds");
            let ctx = format!("{client} {mode} client, {flavor:?} upstream");
            let out = match client {
                "py" => python_client(&gw, &tok, mode, steps_for(&m), &[]).await,
                _ => ts_client(&gw, &tok, client, mode, steps_for(&m)).await,
            };
            check_full_scope(&out, &m, &ctx);
            assert_eq!(
                reached(up, &m),
                ["prompt:greet".to_owned(), format!("resource:note://{m}")],
                "{ctx}"
            );
            if (client, mode) == ("py", MODERN) {
                assert_eq!(out["protocol_version"], MODERN, "{ctx}: {out}");
            }
        }
        gw.shutdown().await;
    }
}

/// Attenuates `parent` with the IntentGate Python SDK (0.3.0): the new caveats ride in its
/// generic `Caveat(type, tools)`.
pub(crate) fn sdk_attenuate(parent: &str) -> String {
    const SCRIPT: &str = r#"
import sys
try:
    from intentgate.capability import Caveat, attenuate
except ImportError as exc:
    print("IMPORT-ERROR: %s" % exc)
    sys.exit(3)
print(attenuate(sys.argv[1], extra=[
    Caveat(type="resource_allow", tools=["file:///public/*", "note://*"]),
    Caveat(type="resource_deny", tools=["file:///public/secret*"]),
    Caveat(type="prompt_allow", tools=["summarize", "greet*", "admin_*"]),
    Caveat(type="prompt_deny", tools=["admin_*"]),
]))
"#;
    let out = Command::new("python3")
        .args(["-c", SCRIPT, parent])
        .output()
        .unwrap_or_else(|e| {
            panic!("python3: {e}; run pip install -r tests/interop/requirements.txt")
        });
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success() && !text.starts_with("IMPORT-ERROR"),
        "the intentgate SDK is needed (pip install -r tests/interop/requirements.txt): {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

async fn audit_events(gw: &TestGateway) -> Vec<Value> {
    let (s, v) = http::get_json(
        &format!("{}/v1/admin/audit?tenant=acme&limit=1000", gw.url),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v["items"].as_array().cloned().unwrap_or_default()
}

/// A token scoped by the new caveats (attenuated by the Python SDK) sees and reaches only its
/// resources and prompts, in both client revisions; each refusal is typed and audited with its
/// kind, and never reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_token_sees_and_reaches_only_its_resources_and_prompts() {
    let up = Upstream::shared_async(Flavor::Sse).await;
    let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (parent, _) = full_token(&gw).await;
    let child = tokio::task::spawn_blocking(move || sdk_attenuate(&parent))
        .await
        .expect("sdk");
    for mode in ["legacy", MODERN] {
        let m = marker("scoped");
        let ctx = format!("python {mode}");
        let steps = json!([
            {"op": "resources"},
            {"op": "templates"},
            {"op": "prompts"},
            {"op": "read", "uri": format!("note://{m}")},
            {"op": "read", "uri": "file:///public/secret.txt"},
            {"op": "read", "uri": "file:///private/ledger.csv"},
            {"op": "prompt", "name": "greet", "args": {"name": m}},
            {"op": "prompt", "name": "admin_reset"},
            {"op": "complete", "ref": {"type": "ref/prompt", "name": "admin_reset"},
             "argument": {"name": "x", "value": m}},
            {"op": "complete", "ref": {"type": "ref/prompt", "name": "greet"},
             "argument": {"name": "name", "value": "b"}},
        ]);
        let out = python_client(&gw, &child, mode, steps, &[]).await;
        assert_eq!(
            result_of(&out, 0, &ctx)["uris"],
            json!(["file:///public/readme.md"]),
            "{ctx}: the list is filtered: {out}"
        );
        assert_eq!(
            result_of(&out, 1, &ctx)["templates"],
            json!(["note://{topic}"])
        );
        assert_eq!(
            result_of(&out, 2, &ctx)["prompts"],
            json!(["greet", "summarize"])
        );
        result_of(&out, 3, &ctx);
        for i in [4, 5, 7, 8] {
            let r = &out["results"][i];
            assert_eq!(r["ok"], false, "{ctx}: step {i} refused: {out}");
            assert_eq!(r["code"], CAPABILITY, "{ctx}: step {i}: {r}");
        }
        assert_eq!(
            result_of(&out, 6, &ctx)["text"],
            json!([format!("Say hello to {m}")])
        );
        assert_eq!(result_of(&out, 9, &ctx)["values"], json!(["bob"]));
        assert_eq!(
            reached(up, &m),
            ["prompt:greet".to_owned(), format!("resource:note://{m}")],
            "{ctx}: only the allowed targets reached the upstream"
        );
    }
    // The refused targets never reached the upstream (no test reads them with another token).
    let all = reached(up, "");
    for forbidden in [
        "resource:file:///public/secret.txt",
        "resource:file:///private/ledger.csv",
        "prompt:admin_reset",
        "completion:admin_reset",
    ] {
        assert!(!all.iter().any(|t| t == forbidden), "{forbidden} reached");
    }
    // Audited with the kind, by the check that refused.
    let events = audit_events(&gw).await;
    for target in [
        "resource:file:///public/secret.txt",
        "resource:file:///private/ledger.csv",
        "prompt:admin_reset",
        "completion:prompt:admin_reset",
    ] {
        let denied: Vec<&Value> = events
            .iter()
            .filter(|e| e["tool"] == target && e["decision"] == "block")
            .collect();
        assert_eq!(
            denied.len(),
            2,
            "{target}: once per client mode: {events:?}"
        );
        assert!(
            denied.iter().all(|e| e["check"] == "capability"),
            "{denied:?}"
        );
    }
    assert!(
        events
            .iter()
            .any(|e| e["tool"] == "prompt:greet" && e["decision"] == "allow"),
        "allowed targets are audited too"
    );
    gw.shutdown().await;
}

const KIND_POLICY: &str = r#"package intentgate.policy

default decision := {"allow": false, "reason": "denied by default"}

decision := {"allow": false, "reason": sprintf("%s %s is off limits", [input.kind, input.target])} if {
	input.kind == "resource"
	startswith(input.target, "note://forbidden")
} else := {"allow": true, "reason": "ok"} if {
	input.capability.subject != ""
}
"#;

/// A modern request with headers derived from the body, as a client does.
async fn modern(gw: &TestGateway, token: &str, body: &Value) -> (u16, Value) {
    let method = body["method"].as_str().unwrap_or("").to_owned();
    let p = &body["params"];
    let name = p["name"]
        .as_str()
        .or_else(|| p["uri"].as_str())
        .map(str::to_owned);
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

/// The policy sees the kind and the target; header/body disagreement on the new methods is
/// refused before any check, as for tools; the stateless era has no subscribe pair, and its
/// -32022 lists what discover does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_sees_the_kind_and_headers_must_agree() {
    let up = Upstream::shared_async(Flavor::HandshakeSse).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("kinds.rego");
    std::fs::write(&policy, KIND_POLICY).expect("policy");
    let policy = policy.display().to_string();
    let gw = gateway::start(
        Backend::Sqlite,
        Some(&up.url),
        &["--policy-file", policy.as_str()],
    )
    .await;
    let (tok, _) = full_token(&gw).await;
    let m = marker("policy");
    let read = |id: u64, uri: String| modern_body(id, "resources/read", json!({"uri": uri}));

    let (s, ok) = modern(&gw, &tok, &read(1, format!("note://{m}"))).await;
    assert_eq!(s, 200, "{ok}");
    let r = &ok["result"];
    assert_eq!(r["contents"][0]["text"], format!("note about {m}"), "{ok}");
    assert_eq!(r["resultType"], "complete", "{ok}");
    assert_eq!(
        r["cacheScope"], "private",
        "a decided read is per token: {ok}"
    );
    assert!(r["ttlMs"].is_u64(), "{ok}");
    assert!(
        r.get("_intentgate").is_none(),
        "not annotated by default: {ok}"
    );

    let forbidden = format!("note://forbidden-{m}");
    let (s, no) = modern(&gw, &tok, &read(2, forbidden.clone())).await;
    assert_rpc_error(s, &no, 200, POLICY, "policy on kind and target");
    assert_eq!(
        no["error"]["data"],
        format!("resource {forbidden} is off limits"),
        "{no}"
    );
    let events = audit_events(&gw).await;
    assert!(
        events
            .iter()
            .any(|e| e["tool"] == format!("resource:{forbidden}")
                && e["check"] == "policy"
                && e["decision"] == "block"),
        "{events:?}"
    );

    // Headers that disagree with the body: refused before any check, nothing forwarded.
    let body = modern_body(
        3,
        "prompts/get",
        json!({"name": "greet", "arguments": {"name": m}}),
    );
    for (method, name) in [("prompts/get", "summarize"), ("prompts/list", "greet")] {
        let (s, _, v) = post(
            &gw,
            &tok,
            &[
                ("mcp-protocol-version", MODERN),
                ("mcp-method", method),
                ("mcp-name", name),
            ],
            &body,
        )
        .await;
        assert_rpc_error(s, &v, 400, HEADER_MISMATCH, &format!("{method} {name}"));
    }
    let uri = format!("note://{m}-hdr");
    let (s, _, v) = post(
        &gw,
        &tok,
        &[
            ("mcp-protocol-version", MODERN),
            ("mcp-method", "resources/read"),
            ("mcp-name", "note://other"),
        ],
        &read(4, uri.clone()),
    )
    .await;
    assert_rpc_error(s, &v, 400, HEADER_MISMATCH, "resources/read Mcp-Name");
    assert_eq!(
        reached(up, &m),
        [format!("resource:note://{m}")],
        "only the agreeing read reached the upstream"
    );
    let (s, v) = modern(&gw, &tok, &body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["result"]["messages"][0]["content"]["text"],
        format!("Say hello to {m}")
    );

    // A token minted for some resources and prompts (admin API `resources`, `prompts`).
    let (minted, _) = gw
        .mint(
            json!({"subject": "agent-kinds", "tenant": "acme", "ttl_seconds": 600,
                     "tools": ["*"], "resources": ["note://*"], "prompts": ["greet"]}),
        )
        .await;
    let (_, v) = modern(&gw, &minted, &modern_body(11, "prompts/list", json!({}))).await;
    let names: Vec<&str> = v["result"]["prompts"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["greet"], "{v}");
    let (_, v) = modern(&gw, &minted, &modern_body(12, "resources/list", json!({}))).await;
    assert_eq!(v["result"]["resources"], json!([]), "{v}");
    let (s, v) = modern(
        &gw,
        &minted,
        &modern_body(
            13,
            "prompts/get",
            json!({"name": "summarize", "arguments": {"text": m}}),
        ),
    )
    .await;
    assert_rpc_error(s, &v, 200, CAPABILITY, "prompt outside the minted scope");

    // A target that names nothing is invalid; the stateless era has no subscribe pair.
    let (s, v) = modern(&gw, &tok, &modern_body(5, "resources/read", json!({}))).await;
    assert_rpc_error(s, &v, 400, INVALID_PARAMS, "read without uri");
    let (s, v) = modern(
        &gw,
        &tok,
        &modern_body(6, "resources/subscribe", json!({"uri": "note://x"})),
    )
    .await;
    assert_rpc_error(
        s,
        &v,
        404,
        METHOD_NOT_FOUND,
        "subscribe in the stateless era",
    );

    // -32022 names the revisions server/discover advertises.
    let (_, d) = modern(&gw, &tok, &modern_body(7, "server/discover", json!({}))).await;
    let mut future = modern_body(8, "prompts/list", json!({}));
    future["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] = json!("2031-01-01");
    let (s, _, v) = post(
        &gw,
        &tok,
        &[
            ("mcp-protocol-version", "2031-01-01"),
            ("mcp-method", "prompts/list"),
        ],
        &future,
    )
    .await;
    assert_rpc_error(s, &v, 400, UNSUPPORTED_VERSION, "future revision");
    assert_eq!(
        v["error"]["data"]["supported"], d["result"]["supportedVersions"],
        "{v} vs {d}"
    );
    // Handshake-era logging/setLevel is acknowledged, with a typed error for a bad level.
    let level = |id: u64, l: &str| json!({"jsonrpc": "2.0", "id": id, "method": "logging/setLevel", "params": {"level": l}});
    let (_, _, v) = post(&gw, &tok, &[], &level(9, "warning")).await;
    assert_eq!(v["result"], json!({}), "{v}");
    let (_, _, v) = post(&gw, &tok, &[], &level(10, "loud")).await;
    assert_eq!(v["error"]["code"], INVALID_PARAMS, "{v}");
    // Subscriptions are decided as reads of the resource (handshake era only): toward this
    // handshake-era upstream, in the gateway's session.
    let (s, h, init) = post(
        &gw,
        &tok,
        &[],
        &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"}}}),
    )
    .await;
    assert_eq!(s, 200, "{init}");
    let sid = h
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .expect("session")
        .to_owned();
    let sub = |id: u64, uri: &str| json!({"jsonrpc": "2.0", "id": id, "method": "resources/subscribe", "params": {"uri": uri}});
    let session = [("mcp-session-id", sid.as_str())];
    let (_, _, ok) = post(&gw, &tok, &session, &sub(2, &format!("note://sub-{m}"))).await;
    assert!(ok["result"].is_object(), "{ok}");
    let (s, _, no) = post(&gw, &tok, &session, &sub(3, &forbidden)).await;
    assert_rpc_error(s, &no, 200, POLICY, "subscribe refused by the policy");
    let unsub = json!({"jsonrpc": "2.0", "id": 4, "method": "resources/unsubscribe",
                       "params": {"uri": format!("note://sub-{m}")}});
    let (_, _, v) = post(&gw, &tok, &session, &unsub).await;
    assert!(v["result"].is_object(), "{v}");
    let all = reached(up, "");
    assert!(
        all.contains(&format!("subscribe:note://sub-{m}")),
        "{all:?}"
    );
    assert!(
        all.contains(&format!("unsubscribe:note://sub-{m}")),
        "{all:?}"
    );
    assert!(!all.contains(&format!("subscribe:{forbidden}")), "{all:?}");
    gw.shutdown().await;
}

/// A raw request with explicit `Host` and `Origin`.
async fn with_host(
    gw: &TestGateway,
    token: &str,
    host: &str,
    origin: Option<&str>,
) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    let mut h = vec![
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
        ("authorization", auth.as_str()),
        ("host", host),
    ];
    if let Some(o) = origin {
        h.push(("origin", o));
    }
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "ping"});
    let (s, _, b) = http::send(
        "POST",
        &format!("{}/v1/mcp", gw.url),
        &h,
        serde_json::to_vec(&body).expect("json"),
    )
    .await;
    (s, serde_json::from_slice(&b).unwrap_or(Value::Null))
}

/// DNS rebinding: a loopback listener answers only to loopback names and origins by default;
/// configured hosts and origins replace that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_origin_are_checked() {
    let gw = gateway::start(Backend::Sqlite, None, &[]).await;
    let (tok, _) = full_token(&gw).await;
    let port = gw.addr.port();
    let local = format!("127.0.0.1:{port}");
    let named = format!("localhost:{port}");
    for (host, origin) in [
        (local.as_str(), None),
        (named.as_str(), Some("http://localhost:3000")),
        (local.as_str(), Some("http://127.0.0.1:5173")),
    ] {
        let (s, v) = with_host(&gw, &tok, host, origin).await;
        assert_eq!(
            (s, &v["result"]),
            (200, &json!({})),
            "{host} {origin:?}: {v}"
        );
    }
    for (host, origin) in [
        ("evil.example", None),
        ("evil.example:80", Some("http://evil.example")),
        (local.as_str(), Some("http://evil.example")),
        (local.as_str(), Some("null")),
    ] {
        let (s, v) = with_host(&gw, &tok, host, origin).await;
        assert_rpc_error(s, &v, 403, INVALID_REQUEST, &format!("{host} {origin:?}"));
    }
    // Every refusal is a typed JSON-RPC error, a method the endpoint does not serve too (the
    // GET stream's own refusals are in streams.rs).
    let auth = format!("Bearer {tok}");
    let (s, h, b) = http::send(
        "PUT",
        &format!("{}/v1/mcp", gw.url),
        &[("authorization", auth.as_str())],
        Vec::new(),
    )
    .await;
    let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
    assert_rpc_error(s, &v, 405, INVALID_REQUEST, "PUT");
    assert_eq!(h.get("allow").and_then(|v| v.to_str().ok()), Some("POST"));
    gw.shutdown().await;

    let gw = gateway::start(
        Backend::Sqlite,
        None,
        &[
            "--allowed-hosts",
            "gw.example,localhost",
            "--allowed-origins",
            "https://app.example",
        ],
    )
    .await;
    let (tok, _) = full_token(&gw).await;
    let (s, v) = with_host(&gw, &tok, "gw.example", Some("https://app.example")).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = with_host(&gw, &tok, "LOCALHOST:1", None).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = with_host(&gw, &tok, &format!("127.0.0.1:{}", gw.addr.port()), None).await;
    assert_rpc_error(s, &v, 403, INVALID_REQUEST, "not in the configured hosts");
    let (s, v) = with_host(&gw, &tok, "gw.example", Some("https://gw.example")).await;
    assert_rpc_error(s, &v, 403, INVALID_REQUEST, "not in the configured origins");
    gw.shutdown().await;
}

/// `DELETE` ends a handshake-era session on every replica sharing the store (two gateways on
/// one SQLite file, then on one PostgreSQL database): the id is then unknown (404) there and
/// here; another token cannot end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_ends_the_session_everywhere() {
    let shared = tempfile::tempdir().expect("tempdir");
    let dir = shared.path().display().to_string();
    let a = gateway::start(Backend::Sqlite, None, &["--data-dir", dir.as_str()]).await;
    let b = gateway::start(Backend::Sqlite, None, &["--data-dir", dir.as_str()]).await;
    delete_on_one_replica_ends_it_on_both(a, b).await;
    let url = tokio::task::spawn_blocking(|| {
        intentgate::testkit::PgServer::shared().and_then(|pg| pg.fresh_database())
    })
    .await
    .expect("postgres task")
    .unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
    let a = gateway::start(Backend::Postgres(url.clone()), None, &[]).await;
    let b = gateway::start(Backend::Postgres(url), None, &[]).await;
    delete_on_one_replica_ends_it_on_both(a, b).await;
}

async fn delete_on_one_replica_ends_it_on_both(a: TestGateway, b: TestGateway) {
    let (tok, _) = full_token(&a).await;
    let (other, _) = full_token(&a).await;
    let (s, h, v) = post(
        &a,
        &tok,
        &[],
        &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"}}}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let sid = h
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .expect("session id")
        .to_owned();
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    for gw in [&a, &b] {
        let (s, _, v) = post(gw, &tok, &[("mcp-session-id", &sid)], &list).await;
        assert_eq!(s, 200, "the session works on both replicas: {v}");
    }
    let delete = |gw: &TestGateway, token: &str| {
        let auth = format!("Bearer {token}");
        let url = format!("{}/v1/mcp", gw.url);
        let sid = sid.clone();
        async move {
            let (s, _, b) = http::send(
                "DELETE",
                &url,
                &[
                    ("authorization", auth.as_str()),
                    ("mcp-session-id", sid.as_str()),
                ],
                Vec::new(),
            )
            .await;
            (
                s,
                serde_json::from_slice::<Value>(&b).unwrap_or(Value::Null),
            )
        }
    };
    let (s, _) = delete(&a, &other).await;
    assert_eq!(s, 404, "another token cannot end the session");
    // A child the holder attenuated (same token id) may call in the session, but neither open
    // its stream nor end it: only the very token that opened it does.
    let mut exp = intentgate::capability::Caveat::bare("exp");
    exp.exp = 4_000_000_000;
    let child = intentgate::capability::Token::decode(&tok)
        .expect("decode")
        .attenuate(exp)
        .expect("attenuate")
        .encode();
    let (s, _, v) = post(&a, &child, &[("mcp-session-id", &sid)], &list).await;
    assert_eq!(s, 200, "a child calls in the session: {v}");
    for method in ["resources/subscribe", "resources/unsubscribe"] {
        let change = json!({"jsonrpc": "2.0", "id": 3, "method": method,
                            "params": {"uri": "note://child"}});
        let (_, _, v) = post(&a, &child, &[("mcp-session-id", &sid)], &change).await;
        assert_eq!(
            v["error"]["code"], -32600,
            "a child cannot change the session's subscriptions ({method}): {v}"
        );
    }
    let (s, _, _) = http::send(
        "GET",
        &format!("{}/v1/mcp", a.url),
        &[
            ("authorization", format!("Bearer {child}").as_str()),
            ("mcp-session-id", sid.as_str()),
            ("accept", "text/event-stream"),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(s, 404, "a child cannot open the session's stream");
    let (s, _) = delete(&a, &child).await;
    assert_eq!(s, 404, "a child cannot end the session");
    let (s, _) = delete(&a, &tok).await;
    assert_eq!(s, 204);
    for gw in [&a, &b] {
        let (s, _, v) = post(gw, &tok, &[("mcp-session-id", &sid)], &list).await;
        assert_eq!(
            (s, &v["error"]["code"]),
            (404, &json!(-32001)),
            "ended: {v}"
        );
    }
    let (s, v) = delete(&b, &tok).await;
    assert_eq!(
        (s, &v["error"]["code"]),
        (404, &json!(-32001)),
        "already ended: {v}"
    );
    let (s, v) = delete(&b, "not-a-token").await;
    assert_eq!((s, &v["error"]["code"]), (401, &json!(CAPABILITY)), "{v}");
    a.shutdown().await;
    b.shutdown().await;
}

/// A stateless upstream that answers with `content-type` and a body of its choosing, the
/// response to the request among notifications.
async fn framing_upstream(sse: bool) -> String {
    use http_body_util::{BodyExt, Full};
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let rpc: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let id = rpc["id"].clone();
                        let result = match rpc["method"].as_str() {
                            Some("server/discover") => json!({"supportedVersions": [MODERN],
                            "capabilities": {"resources": {}}, "resultType": "complete",
                            "cacheScope": "public", "ttlMs": 0}),
                            _ => json!({"contents": [{"uri": rpc["params"]["uri"],
                            "text": format!("framed {}", rpc["params"]["uri"].as_str().unwrap_or(""))}],
                            "resultType": "complete"}),
                        };
                        let token = rpc["params"]["_meta"]["progressToken"].clone();
                        let notes = [
                            json!({"jsonrpc": "2.0", "method": "notifications/progress",
                                   "params": {"progressToken": token, "progress": 50}}),
                            json!({"jsonrpc": "2.0", "method": "notifications/progress",
                                   "params": {"progressToken": "someone-else", "progress": 1}}),
                            json!({"jsonrpc": "2.0", "method": "notifications/message",
                                   "params": {"level": "info", "data": "working"}}),
                            json!({"jsonrpc": "2.0", "method": "notifications/resources/updated",
                                   "params": {"uri": "note://framed"}}),
                            json!({"jsonrpc": "2.0", "id": 999_999, "result": {}}),
                        ];
                        let answer = json!({"jsonrpc": "2.0", "id": id, "result": result});
                        let all = notes.iter().chain([&answer]);
                        let (ctype, text): (&str, String) = if sse {
                            let events = all.map(|m| format!("event: message\ndata: {m}\n\n"));
                            ("text/event-stream", events.collect())
                        } else {
                            ("application/json", all.map(|m| format!("{m}\n")).collect())
                        };
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header("content-type", ctype)
                                .body(Full::new(bytes::Bytes::from(text)))
                                .expect("response"),
                        )
                    },
                );
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}/mcp")
}

/// The JSON messages of an SSE body, in order.
fn sse_messages(body: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).expect("event data is JSON"))
        .collect()
}

/// An upstream answering newline-delimited JSON, or several SSE events, is read for the
/// response to the request; the progress of that request and log messages sent before it are
/// relayed to a client that accepts an event stream (another request's progress, other
/// notifications and other responses are not), and dropped for one that accepts only JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_ndjson_and_several_sse_events() {
    for sse in [false, true] {
        let url = framing_upstream(sse).await;
        let gw = gateway::start(Backend::Sqlite, Some(&url), &[]).await;
        let (tok, _) = full_token(&gw).await;
        let mut body = modern_body(1, "resources/read", json!({"uri": "note://framed"}));
        body["params"]["_meta"]["progressToken"] = json!("tok-1");
        let auth = format!("Bearer {tok}");
        for accept in ["application/json, text/event-stream", "application/json"] {
            let (s, h, b) = http::send(
                "POST",
                &format!("{}/v1/mcp", gw.url),
                &[
                    ("content-type", "application/json"),
                    ("accept", accept),
                    ("authorization", auth.as_str()),
                    ("mcp-protocol-version", MODERN),
                    ("mcp-method", "resources/read"),
                    ("mcp-name", "note://framed"),
                ],
                serde_json::to_vec(&body).expect("json"),
            )
            .await;
            let ctx = format!("sse={sse}, accept {accept}");
            assert_eq!(s, 200, "{ctx}: {}", String::from_utf8_lossy(&b));
            let ctype = h
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let streamed = accept.contains("event-stream");
            let messages = if streamed {
                assert_eq!(ctype, "text/event-stream", "{ctx}");
                sse_messages(&b)
            } else {
                assert_eq!(ctype, "application/json", "{ctx}");
                vec![serde_json::from_slice(&b).expect("json")]
            };
            let (answer, notes) = messages.split_last().expect("an answer");
            assert_eq!(
                answer["result"]["contents"][0]["text"], "framed note://framed",
                "{ctx}: {answer}"
            );
            let relayed: Vec<Value> = notes
                .iter()
                .map(|n| json!([n["method"], n["params"]]))
                .collect();
            let expected = if streamed {
                vec![
                    json!(["notifications/progress", {"progressToken": "tok-1", "progress": 50}]),
                    json!(["notifications/message", {"level": "info", "data": "working"}]),
                ]
            } else {
                Vec::new()
            };
            assert_eq!(relayed, expected, "{ctx}");
        }
        gw.shutdown().await;
    }
}
