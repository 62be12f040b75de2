//! Several upstreams behind one endpoint (issue 12): two real MCP servers
//! (`tests/interop/upstream_server.py`, the official `mcp` 2.3 server, one answering with SSE
//! streams and one with JSON) behind one gateway, configured as `--upstream github=URL
//! --upstream db=URL`.
//!
//! - the official Python MCP client (`tests/interop/clients.py` for tools,
//!   `tests/interop_modern/clients.py` for resources, templates and prompts), in the handshake
//!   and the stateless era, sees every upstream's tools and prompts as `NAME__tool` and their
//!   resources as `NAME+uri`, and reaches each upstream through its names, the upstream getting
//!   its own names back;
//! - a token whose `servers` (`mcp_allow`) name one upstream neither sees nor reaches the other,
//!   and the refusal is audited naming the upstream;
//! - an upstream that is killed fails only its own calls (`-32018`); the other keeps answering
//!   and lists say which upstream is missing.
//!
//! Each test marks its arguments with a unique string and reads the upstreams' call logs to see
//! which calls reached which upstream.
//!
//! The upstreams document (`--upstreams-file`): each upstream's own timeout (a slow tool times
//! out behind the short one only), its own TLS roots, client certificate and server name
//! (rustls fronts from `transport.rs`), its pinned revision (the upstream, behind a recording
//! proxy, sees only that wire and no `server/discover` probe), and a bad document stopping the
//! start with an error that names the file, the entry and the key. At shutdown the gateway
//! ends its handshake-era upstream session (`DELETE`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::interop::{self, Flavor, Upstream};
use crate::mcp_eras::{post, python_client};
use crate::support::gateway::{self, ADMIN_TOKEN, Backend, TestGateway};
use crate::support::http;

const CAPABILITY: i64 = -32010;
const UPSTREAM_UNAVAILABLE: i64 = -32018;
const INVALID_PARAMS: i64 = -32602;
const MODERN: &str = "2026-07-28";
const TOOLS: [&str; 9] = [
    "ask_model",
    "ask_user",
    "confirm",
    "delete_records",
    "echo",
    "read_invoice",
    "send_email",
    "slow_count",
    "touch",
];

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

/// A gateway in front of `github` and `db`.
async fn two_upstream_gateway(github: &Upstream, db: &Upstream) -> TestGateway {
    let github = format!("github={}", github.url);
    let db = format!("db={}", db.url);
    gateway::start(
        Backend::Sqlite,
        None,
        &["--upstream", &github, "--upstream", &db],
    )
    .await
}

async fn token(gw: &TestGateway, servers: &[&str]) -> String {
    let mut body = json!({"subject": "agent-multi", "tenant": "acme", "ttl_seconds": 600,
                          "tools": ["*"]});
    if !servers.is_empty() {
        body["servers"] = json!(servers);
    }
    gw.mint(body).await.0
}

fn namespaced(upstreams: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = upstreams
        .iter()
        .flat_map(|u| TOOLS.iter().map(move |t| format!("{u}__{t}")))
        .collect();
    out.sort();
    out
}

fn sorted_strings(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| t.as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The upstream's own names of the calls that reached it with `marker`.
fn reached(up: &Upstream, marker: &str) -> Vec<String> {
    let mut t: Vec<String> = up
        .calls_with(marker)
        .iter()
        .map(|c| c["tool"].as_str().unwrap_or("").to_owned())
        .collect();
    t.sort();
    t
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

#[track_caller]
fn assert_ok(r: &Value, ctx: &str) {
    assert_eq!(r["ok"], true, "{ctx}: expected success, got {r}");
    assert_eq!(r["is_error"], false, "{ctx}: the tool failed: {r}");
}

#[track_caller]
fn assert_code(r: &Value, code: i64, ctx: &str) {
    assert_eq!(r["ok"], false, "{ctx}: expected {code}, got success: {r}");
    assert_eq!(r["code"], code, "{ctx}: expected {code}: {r}");
}

/// A raw `tools/list` (handshake era, no session): the whole result.
async fn raw_list(gw: &TestGateway, token: &str, params: Value) -> Value {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": params});
    let (s, _, v) = post(gw, token, &[], &body).await;
    assert_eq!(s, 200, "{v}");
    v
}

/// Both upstreams' tools, listed and called by their namespaced names with the official
/// client in both eras; each call reaches its own upstream under the upstream's own name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_client_lists_and_calls_both_upstreams() {
    let github = Upstream::shared_async(Flavor::Sse).await;
    let db = Upstream::shared_async(Flavor::Json).await;
    let gw = two_upstream_gateway(github, db).await;
    let token = token(&gw, &[]).await;
    for mode in ["legacy", MODERN] {
        let m = marker("both");
        let results = interop::steps(
            &gw,
            Some(&token),
            mode,
            json!([
                {"op": "list"},
                {"op": "call", "tool": "github__echo", "args": {"text": m}},
                {"op": "call", "tool": "db__read_invoice", "args": {"id": m}},
                {"op": "call", "tool": "echo", "args": {"text": m}},
                {"op": "call", "tool": "jira__echo", "args": {"text": m}},
            ]),
        )
        .await;
        assert_eq!(results[0]["ok"], true, "{mode}: {}", results[0]);
        assert_eq!(
            sorted_strings(&results[0]["tools"]),
            namespaced(&["db", "github"]),
            "{mode}: the merged list"
        );
        assert_ok(&results[1], mode);
        assert_eq!(results[1]["text"], json!([m]), "{mode}");
        assert_ok(&results[2], mode);
        assert_eq!(results[2]["structured"]["id"], json!(m), "{mode}");
        // A name without a configured upstream's prefix goes nowhere.
        assert_code(&results[3], INVALID_PARAMS, mode);
        assert_code(&results[4], INVALID_PARAMS, mode);
        assert_eq!(
            reached(github, &m),
            ["echo"],
            "{mode}: github got its own name"
        );
        assert_eq!(
            reached(db, &m),
            ["read_invoice"],
            "{mode}: db got its own name"
        );
    }
    // The audit names the upstream each call went to, and the name the agent called.
    let events = audit_events(&gw).await;
    for (tool, upstream) in [("github__echo", "github"), ("db__read_invoice", "db")] {
        assert!(
            events.iter().any(|e| e["tool"] == tool
                && e["upstream"] == upstream
                && e["decision"] == "allow"),
            "no allowed {tool} event naming {upstream}: {events:#?}"
        );
    }
    gw.shutdown().await;
}

/// Resources, templates and prompts of both upstreams, namespaced (`NAME+uri`, `NAME__prompt`),
/// read and got through the official client, and completed by their namespaced reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_and_prompts_of_both_upstreams_are_namespaced() {
    let github = Upstream::shared_async(Flavor::Sse).await;
    let db = Upstream::shared_async(Flavor::Json).await;
    let gw = two_upstream_gateway(github, db).await;
    let token = token(&gw, &[]).await;
    for mode in ["legacy", MODERN] {
        let m = marker("kinds");
        let out = python_client(
            &gw,
            &token,
            mode,
            json!([
                {"op": "resources"},
                {"op": "templates"},
                {"op": "prompts"},
                {"op": "read", "uri": format!("db+note://{m}")},
                {"op": "read", "uri": "github+file:///public/readme.md"},
                {"op": "prompt", "name": "github__greet", "args": {"name": m}},
                {"op": "complete", "ref": {"type": "ref/prompt", "name": "db__greet"},
                 "argument": {"name": "name", "value": "al"}},
                {"op": "read", "uri": format!("note://{m}")},
            ]),
            &[],
        )
        .await;
        let r = out["results"].as_array().cloned().unwrap_or_default();
        assert_eq!(r.len(), 8, "{mode}: {out}");
        let mut uris = Vec::new();
        for up in ["db", "github"] {
            for f in [
                "file:///private/ledger.csv",
                "file:///public/readme.md",
                "file:///public/secret.txt",
            ] {
                uris.push(format!("{up}+{f}"));
            }
        }
        assert_eq!(sorted_strings(&r[0]["uris"]), uris, "{mode}: {}", r[0]);
        assert_eq!(
            sorted_strings(&r[1]["templates"]),
            ["db+note://{topic}", "github+note://{topic}"],
            "{mode}: {}",
            r[1]
        );
        let mut prompts = Vec::new();
        for up in ["db", "github"] {
            for p in ["admin_reset", "greet", "summarize"] {
                prompts.push(format!("{up}__{p}"));
            }
        }
        assert_eq!(
            sorted_strings(&r[2]["prompts"]),
            prompts,
            "{mode}: {}",
            r[2]
        );
        assert_eq!(r[3]["ok"], true, "{mode}: {}", r[3]);
        assert_eq!(r[3]["text"], json!([format!("note about {m}")]), "{mode}");
        assert_eq!(
            r[4]["text"],
            json!(["# Readme\nPublic."]),
            "{mode}: {}",
            r[4]
        );
        assert_eq!(r[5]["ok"], true, "{mode}: {}", r[5]);
        assert!(r[5]["text"].to_string().contains(&m), "{mode}: {}", r[5]);
        assert_eq!(
            r[6]["values"],
            json!(["alice", "alfred"]),
            "{mode}: {}",
            r[6]
        );
        assert_eq!(r[7]["ok"], false, "{mode}: an unprefixed URI: {}", r[7]);
        assert_eq!(reached(db, &m), [format!("resource:note://{m}")], "{mode}");
        assert_eq!(reached(github, &m), ["prompt:greet"], "{mode}");
    }
    gw.shutdown().await;
}

/// A token whose `servers` caveat names `github` lists only github's tools, resources and
/// prompts, and its calls to `db` are refused by the capability check (audited with the
/// upstream) and never reach `db`.
/// `initialize` describes only the upstreams the token reaches: another upstream's name and
/// instructions stay hidden from it, as its tools, resources and prompts do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initialize_describes_only_the_upstreams_the_token_reaches() {
    let github = Upstream::shared_async(Flavor::Json).await;
    let billing = crate::mcp_eras::Upstream::shared(crate::mcp_eras::Kind::BothEras).await;
    let github = format!("github={}", github.url);
    let billing = format!("billing={}", billing.url);
    let gw = gateway::start(
        Backend::Sqlite,
        None,
        &["--upstream", &github, "--upstream", &billing],
    )
    .await;
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"}}});
    let instructions = |v: &Value| {
        v["result"]["instructions"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    let both = token(&gw, &[]).await;
    let (s, _, v) = post(&gw, &both, &[], &init).await;
    assert_eq!(s, 200, "{v}");
    assert!(
        instructions(&v).contains("billing: Invoices and e-mail."),
        "a token reaching billing reads its instructions: {v}"
    );
    let only_github = token(&gw, &["github"]).await;
    let (s, _, v) = post(&gw, &only_github, &[], &init).await;
    assert_eq!(s, 200, "{v}");
    assert!(
        !v.to_string().contains("billing") && !v.to_string().contains("Invoices"),
        "an upstream the token cannot reach is not described to it: {v}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_one_upstream_neither_sees_nor_reaches_the_other() {
    let github = Upstream::shared_async(Flavor::Sse).await;
    let db = Upstream::shared_async(Flavor::Json).await;
    let gw = two_upstream_gateway(github, db).await;
    let token = token(&gw, &["github"]).await;
    for mode in ["legacy", MODERN] {
        let m = marker("scoped");
        let results = interop::steps(
            &gw,
            Some(&token),
            mode,
            json!([
                {"op": "list"},
                {"op": "call", "tool": "github__echo", "args": {"text": m}},
                {"op": "call", "tool": "db__echo", "args": {"text": m}},
            ]),
        )
        .await;
        assert_eq!(
            sorted_strings(&results[0]["tools"]),
            namespaced(&["github"]),
            "{mode}: {}",
            results[0]
        );
        assert_ok(&results[1], mode);
        assert_code(&results[2], CAPABILITY, mode);
        assert!(
            results[2]["data"].to_string().contains("db"),
            "{mode}: the refusal names the server: {}",
            results[2]
        );
        assert_eq!(reached(github, &m), ["echo"], "{mode}");
        assert!(reached(db, &m).is_empty(), "{mode}: db was reached");
        let out = python_client(
            &gw,
            &token,
            mode,
            json!([{"op": "resources"}, {"op": "prompts"},
                   {"op": "read", "uri": format!("db+note://{m}")}]),
            &[],
        )
        .await;
        let r = out["results"].as_array().cloned().unwrap_or_default();
        assert!(
            sorted_strings(&r[0]["uris"])
                .iter()
                .all(|u| u.starts_with("github+")),
            "{mode}: {}",
            r[0]
        );
        assert_eq!(
            sorted_strings(&r[1]["prompts"]).len(),
            3,
            "{mode}: {}",
            r[1]
        );
        assert_eq!(r[2]["ok"], false, "{mode}: {}", r[2]);
        assert!(reached(db, &m).is_empty(), "{mode}: db was reached");
    }
    let events = audit_events(&gw).await;
    let refused: Vec<&Value> = events
        .iter()
        .filter(|e| e["tool"] == "db__echo" && e["decision"] == "block")
        .collect();
    assert_eq!(refused.len(), 2, "one refusal per era: {events:#?}");
    for e in refused {
        assert_eq!(e["check"], "capability", "{e}");
        assert_eq!(e["upstream"], "db", "{e}");
        assert!(
            e["reason"].as_str().unwrap_or("").contains("mcp_allow")
                || e["reason"].as_str().unwrap_or("").contains("server"),
            "{e}"
        );
    }
    // A cursor naming the other upstream does not list it either.
    let cursor = intentgate::upstreams::encode_cursor(&[("db".to_owned(), json!("x"))]);
    let v = raw_list(&gw, &token, json!({"cursor": cursor})).await;
    assert_eq!(v["result"]["tools"], json!([]), "{v}");
    gw.shutdown().await;
}

/// A `tool_deny` written for the upstreams' own names (a token from before the second
/// upstream was configured) still refuses their namespaced tools.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_caveat_of_an_upstreams_own_names_holds_behind_the_namespace() {
    let github = Upstream::shared_async(Flavor::Sse).await;
    let db = Upstream::shared_async(Flavor::Json).await;
    let gw = two_upstream_gateway(github, db).await;
    let token = intentgate::capability::Token::decode(&token(&gw, &[]).await)
        .expect("decode")
        .attenuate(intentgate::capability::Caveat::tool_deny(["delete_*"]))
        .expect("attenuate")
        .encode();
    let m = marker("denied");
    let results = interop::steps(
        &gw,
        Some(&token),
        "legacy",
        json!([
            {"op": "call", "tool": "db__delete_records", "args": {"text": m}},
            {"op": "call", "tool": "db__echo", "args": {"text": m}},
        ]),
    )
    .await;
    assert_code(&results[0], CAPABILITY, "legacy");
    assert!(
        results[0]["data"].to_string().contains("tool_deny"),
        "{}",
        results[0]
    );
    assert_ok(&results[1], "legacy");
    assert_eq!(reached(db, &m), ["echo"]);
    gw.shutdown().await;
}

/// One upstream is killed: its calls fail with `-32018` (audited against it), the other's keep
/// working, lists carry the other's entries and name the missing upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_is_down_fails_only_its_own_calls() {
    let github = Upstream::shared_async(Flavor::Sse).await;
    let db = Upstream::start_async(Flavor::Json).await;
    let gw = two_upstream_gateway(github, &db).await;
    let token = token(&gw, &[]).await;
    let m = marker("down");
    let before = interop::steps(
        &gw,
        Some(&token),
        "legacy",
        json!([{"op": "call", "tool": "db__echo", "args": {"text": m}}]),
    )
    .await;
    assert_ok(&before[0], "db before it is killed");
    db.kill();
    for mode in ["legacy", MODERN] {
        let m = marker("down");
        let results = interop::steps(
            &gw,
            Some(&token),
            mode,
            json!([
                {"op": "list"},
                {"op": "call", "tool": "db__echo", "args": {"text": m}},
                {"op": "call", "tool": "github__echo", "args": {"text": m}},
            ]),
        )
        .await;
        assert_eq!(
            sorted_strings(&results[0]["tools"]),
            namespaced(&["github"]),
            "{mode}: {}",
            results[0]
        );
        assert_code(&results[1], UPSTREAM_UNAVAILABLE, mode);
        assert_ok(&results[2], mode);
        assert_eq!(reached(github, &m), ["echo"], "{mode}");
    }
    let v = raw_list(&gw, &token, json!({})).await;
    assert_eq!(
        v["result"]["_meta"]["io.intentgate/unavailable"],
        json!(["db"]),
        "{v}"
    );
    let events = audit_events(&gw).await;
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "intentgate.upstream_result"
                && e["tool"] == "db__echo"
                && e["upstream"] == "db"),
        "the failure is audited against db: {events:#?}"
    );
    // Metrics count each upstream's calls and failures under its name.
    let (s, _, body) = http::send(
        "GET",
        &format!("{}/metrics", gw.url),
        &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        Vec::new(),
    )
    .await;
    assert_eq!(s, 200);
    let body = String::from_utf8_lossy(&body).into_owned();
    let sum = |prefix: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        sum("intentgate_upstream_errors_total{upstream=\"db\"") >= 2.0,
        "{body}"
    );
    assert_eq!(
        sum("intentgate_upstream_errors_total{upstream=\"github\""),
        0.0,
        "{body}"
    );
    assert!(
        sum("intentgate_upstream_calls_total{upstream=\"github\"}") >= 2.0,
        "{body}"
    );
    // Health names the upstreams, never their URLs.
    let (s, v) = http::get_json(&format!("{}/healthz", gw.url), "").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["upstreams"],
        json!([{"name": "github", "status": "up"}, {"name": "db", "status": "down"}]),
        "{v}"
    );
    assert_eq!(
        v["status"], "ok",
        "one upstream down is not the gateway down: {v}"
    );
    assert!(!v.to_string().contains("127.0.0.1"), "{v}");
    gw.shutdown().await;
}

/// An upstream that lists its tools in pages (three a page) beside one that lists them in
/// one: the merged list's cursor continues only the upstream that has more, with its own
/// cursor; the official client paging through the gateway sees every tool once, and a token
/// scoped to some tools sees only those on every page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_continues_each_upstream_with_its_own_cursor() {
    let github = Upstream::shared_async(Flavor::Sse).await;
    let db = Upstream::shared_async(Flavor::Paged).await;
    let gw = two_upstream_gateway(github, db).await;
    let token = token(&gw, &[]).await;
    // Raw: the first page has github's six and db's first three; the second db's last three.
    let first = raw_list(&gw, &token, json!({})).await;
    let names = |v: &Value| -> Vec<String> {
        v["result"]["tools"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|t| t["name"].as_str().unwrap_or("").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(names(&first).len(), TOOLS.len() + 3, "{first}");
    // Then db's remaining pages, three tools at most each, until no cursor is left.
    let mut cursor = first["result"]["nextCursor"].clone();
    let mut rest = Vec::new();
    while cursor.is_string() {
        let page = raw_list(&gw, &token, json!({"cursor": cursor})).await;
        let n = names(&page);
        assert!(!n.is_empty() && n.len() <= 3, "{page}");
        assert!(n.iter().all(|n| n.starts_with("db__")), "{page}");
        rest.extend(n);
        cursor = page["result"]
            .get("nextCursor")
            .cloned()
            .unwrap_or(Value::Null);
    }
    assert_eq!(rest.len(), TOOLS.len() - 3, "{rest:?}");
    // The official client, paging in both eras.
    for mode in ["legacy", MODERN] {
        let m = marker("paged");
        let results = interop::steps(
            &gw,
            Some(&token),
            mode,
            json!([
                {"op": "list-all"},
                {"op": "call", "tool": "db__send_email", "args": {"to": "x@example.com", "body": m}},
            ]),
        )
        .await;
        assert_eq!(
            results[0]["pages"],
            TOOLS.len().div_ceil(3),
            "{mode}: {}",
            results[0]
        );
        let tools = results[0]["tools"].as_array().map_or(0, Vec::len);
        assert_eq!(
            tools,
            2 * TOOLS.len(),
            "{mode}: every tool once: {}",
            results[0]
        );
        assert_eq!(
            sorted_strings(&results[0]["tools"]),
            namespaced(&["db", "github"]),
            "{mode}"
        );
        assert_ok(&results[1], mode);
        assert_eq!(reached(db, &m), ["send_email"], "{mode}");
    }
    // A token for db's tools only: github contributes nothing, db's pages are filtered.
    let scoped = gw
        .mint(
            json!({"subject": "agent-multi", "tenant": "acme", "ttl_seconds": 600,
                     "tools": ["db__send_email", "db__read_invoice"]}),
        )
        .await
        .0;
    let results = interop::steps(&gw, Some(&scoped), "legacy", json!([{"op": "list-all"}])).await;
    assert_eq!(
        sorted_strings(&results[0]["tools"]),
        ["db__read_invoice", "db__send_email"],
        "{}",
        results[0]
    );
    gw.shutdown().await;
}

/// A cursor this gateway did not hand out is refused, not passed to some upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_cursor_is_refused() {
    let github = Upstream::shared_async(Flavor::Sse).await;
    let db = Upstream::shared_async(Flavor::Json).await;
    let gw = two_upstream_gateway(github, db).await;
    let token = token(&gw, &[]).await;
    for cursor in [json!("not-ours"), json!(7)] {
        let v = raw_list(&gw, &token, json!({"cursor": cursor})).await;
        assert_eq!(v["error"]["code"], INVALID_PARAMS, "{v}");
    }
    gw.shutdown().await;
}

// --- the upstreams document ----------------------------------------------------------------------

/// Writes the upstreams document into `dir`; its path.
fn upstreams_file(dir: &Path, doc: &Value) -> String {
    let path = dir.join("upstreams.json");
    std::fs::write(&path, serde_json::to_vec_pretty(doc).expect("json")).expect("write");
    path.to_str().expect("utf-8").to_owned()
}

/// Each upstream of the file has its own timeout: `slow_count` (3 s) times out behind the
/// upstream configured with 1 s, and answers behind the one that keeps the global 20 s, both
/// the same server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_upstream_of_the_file_has_its_own_timeout() {
    let up = Upstream::shared_async(Flavor::Sse).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = upstreams_file(
        dir.path(),
        &json!({"upstreams": [
            {"name": "quick", "url": up.url, "timeout_ms": 1000},
            {"name": "patient", "url": up.url},
        ]}),
    );
    let gw = gateway::start(
        Backend::Sqlite,
        None,
        &["--upstreams-file", &file, "--upstream-timeout-ms", "20000"],
    )
    .await;
    let token = token(&gw, &[]).await;
    let m = marker("timeouts");
    let timed_out = |v: &Value| {
        v["error"]["code"] == UPSTREAM_UNAVAILABLE
            && (v["error"]["data"]["detail"].as_str()).is_some_and(|d| d.contains("timed out"))
    };
    // A quick call answers within the 1 s. The first also opens the upstream session, which a
    // loaded machine (the upstream is a shared Python server) can make last longer than that:
    // it is tried again then, since what this test is about is the slow call below.
    let mut v = Value::Null;
    for _ in 0..5 {
        v = gw
            .tool_call(&token, "quick__echo", json!({"text": m}))
            .await;
        if !timed_out(&v) {
            break;
        }
    }
    assert_eq!(v["result"]["content"][0]["text"], m, "a quick call: {v}");
    let started = Instant::now();
    let v = gw
        .tool_call(&token, "quick__slow_count", json!({"n": 10}))
        .await;
    assert_eq!(v["error"]["code"], UPSTREAM_UNAVAILABLE, "{v}");
    let detail = v["error"]["data"]["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("timed out after 1s"), "{v}");
    // Cut at the timeout, not when the upstream answered: its ten 0.3 s steps take at least
    // 3 s, and anything shorter leaves a loaded machine time to record the call after the 1 s.
    assert!(
        started.elapsed() < Duration::from_millis(2900),
        "the 1 s timeout held: {:?}",
        started.elapsed()
    );
    let v = gw
        .tool_call(&token, "patient__slow_count", json!({"n": 10}))
        .await;
    assert_eq!(
        v["result"]["content"][0]["text"], "counted to 10",
        "the global timeout: {v}"
    );
    gw.shutdown().await;
}

/// A TCP forwarder to the upstream at `url` that keeps every byte the gateway sends it, so a
/// test sees which JSON-RPC methods reached the upstream. Its own URL.
async fn recording_proxy(url: &str) -> (String, Arc<Mutex<Vec<u8>>>) {
    let target: SocketAddr = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .expect("an http://ADDR/ URL");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    return;
                };
                let (mut from_gw, mut to_gw) = inbound.into_split();
                let (mut from_up, mut to_up) = outbound.into_split();
                let sent = async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n @ 1..) = from_gw.read(&mut buf).await {
                        log.lock().expect("log").extend_from_slice(&buf[..n]);
                        if to_up.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = to_up.shutdown().await;
                };
                let answered = async move {
                    let _ = tokio::io::copy(&mut from_up, &mut to_gw).await;
                    let _ = to_gw.shutdown().await;
                };
                tokio::join!(sent, answered);
            });
        }
    });
    (format!("http://{addr}/mcp"), seen)
}

/// The JSON-RPC methods in what the gateway sent, in order.
fn methods(log: &Mutex<Vec<u8>>) -> Vec<String> {
    let text = String::from_utf8_lossy(&log.lock().expect("log")).into_owned();
    text.split("\"method\":\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next().map(str::to_owned))
        .collect()
}

/// A pinned revision is the only wire the upstream sees: pinned to 2025-11-25 the gateway
/// opens a session (`initialize`) toward a server that also speaks the stateless era, pinned
/// to 2026-07-28 it sends stateless requests; neither is probed with `server/discover`, which
/// the same server behind an `auto` entry is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_revision_is_the_only_wire_the_upstream_sees() {
    let up = Upstream::shared_async(Flavor::Sse).await;
    let (hs_url, hs_log) = recording_proxy(&up.url).await;
    let (st_url, st_log) = recording_proxy(&up.url).await;
    let (auto_url, auto_log) = recording_proxy(&up.url).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = upstreams_file(
        dir.path(),
        &json!({"upstreams": [
            {"name": "hs", "url": hs_url, "revision": "2025-11-25"},
            {"name": "st", "url": st_url, "revision": "2026-07-28"},
            {"name": "learned", "url": auto_url, "revision": "auto"},
        ]}),
    );
    let gw = gateway::start(Backend::Sqlite, None, &["--upstreams-file", &file]).await;
    let token = token(&gw, &[]).await;
    let mut marks = Vec::new();
    for name in ["hs", "st", "learned"] {
        let m = marker(name);
        let v = gw
            .tool_call(&token, &format!("{name}__echo"), json!({"text": m}))
            .await;
        assert_eq!(v["result"]["content"][0]["text"], m, "{name}: {v}");
        marks.push(m);
    }
    let call = |m: &str| {
        let calls = up.calls_with(m);
        assert_eq!(calls.len(), 1, "{calls:?}");
        calls[0].clone()
    };
    let hs = call(&marks[0]);
    assert_eq!(hs["protocol_version"], "2025-11-25", "{hs}");
    assert!(hs["session_id"].is_string(), "in a session: {hs}");
    let st = call(&marks[1]);
    assert_eq!(st["protocol_version"], "2026-07-28", "{st}");
    assert!(st["session_id"].is_null(), "no session: {st}");
    let learned = call(&marks[2]);
    assert_eq!(learned["protocol_version"], "2026-07-28", "{learned}");
    let has = |log: &Mutex<Vec<u8>>, method: &str| methods(log).iter().any(|m| m == method);
    assert_eq!(
        methods(&hs_log)[..2],
        ["initialize", "notifications/initialized"],
        "pinned to the handshake era"
    );
    assert!(has(&hs_log, "tools/call"));
    assert!(!has(&hs_log, "server/discover"), "{:?}", methods(&hs_log));
    assert!(has(&st_log, "tools/call"));
    assert!(
        !has(&st_log, "server/discover") && !has(&st_log, "initialize"),
        "pinned to the stateless era: {:?}",
        methods(&st_log)
    );
    assert_eq!(
        methods(&auto_log)[0],
        "server/discover",
        "auto probes first (the proxy would see a probe)"
    );
    // What a pinned stateless upstream says about itself is asked when a client wants it,
    // at its revision, without changing what is spoken to it.
    let (s, _, v) = post(
        &gw,
        &token,
        &[],
        &json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                           "clientInfo": {"name": "t", "version": "1"}}}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["result"]["capabilities"]["tools"].is_object(), "{v}");
    assert!(has(&st_log, "server/discover"), "asked, not probed");
    assert!(!has(&hs_log, "server/discover"), "{:?}", methods(&hs_log));
    let v = gw
        .tool_call(&token, "st__echo", json!({"text": marks[1]}))
        .await;
    assert_eq!(v["result"]["content"][0]["text"], marks[1], "{v}");
    let calls = up.calls_with(&marks[1]);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[1]["protocol_version"], "2026-07-28", "{calls:?}");
    gw.shutdown().await;
    // At shutdown the gateway ends its session with the handshake-era upstream (`DELETE` with
    // the session's id), as a client done with a session should; the stateless one has none.
    let text =
        |log: &Mutex<Vec<u8>>| String::from_utf8_lossy(&log.lock().expect("log")).into_owned();
    let hs_text = text(&hs_log);
    let at = hs_text
        .find("DELETE /mcp")
        .unwrap_or_else(|| panic!("no DELETE of the upstream session: {:?}", methods(&hs_log)));
    assert!(
        hs_text[at..]
            .to_ascii_lowercase()
            .contains("mcp-session-id:"),
        "{}",
        &hs_text[at..]
    );
    assert!(
        !text(&st_log).contains("DELETE "),
        "the stateless upstream has no session"
    );
}

/// Each https upstream of the file is verified against its own CA file (relative to the
/// file's folder), presents its own client certificate, and checks its own server name;
/// nothing global is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_upstream_of_the_file_has_its_own_tls() {
    use crate::transport::{Ca, tls_upstream, write};
    let ca_a = Ca::new("upstream a CA");
    let ca_b = Ca::new("upstream b CA");
    let client_ca = Ca::new("client CA");
    let client = client_ca.leaf("intentgate-gateway", 7, true);
    let (addr_a, _) = tls_upstream(&ca_a.leaf("a.test", 1, false), None).await;
    let (addr_b, seen_b) = tls_upstream(&ca_b.leaf("b.test", 2, false), Some(&client_ca)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "a-ca.pem", &ca_a.pem());
    write(dir.path(), "b-ca.pem", &ca_b.pem());
    write(dir.path(), "client.pem", &client.cert_pem);
    write(dir.path(), "client.key", &client.key_pem);
    let file = upstreams_file(
        dir.path(),
        &json!({"upstreams": [
            // The certificate names localhost and 127.0.0.1: checked as `localhost` here.
            {"name": "a", "url": format!("https://127.0.0.1:{}/mcp", addr_a.port()),
             "tls": {"ca_file": "a-ca.pem", "server_name": "localhost"}},
            {"name": "b", "url": format!("https://localhost:{}/mcp", addr_b.port()),
             "tls": {"ca_file": "b-ca.pem", "client_cert_file": "client.pem",
                     "client_key_file": "client.key"}},
            // a's server checked against another name.
            {"name": "misnamed", "url": format!("https://127.0.0.1:{}/mcp", addr_a.port()),
             "tls": {"ca_file": "a-ca.pem", "server_name": "elsewhere.test"}},
            // b's server checked against a's CA.
            {"name": "wrong-ca", "url": format!("https://localhost:{}/mcp", addr_b.port()),
             "tls": {"ca_file": "a-ca.pem"}},
        ]}),
    );
    let gw = gateway::start(Backend::Sqlite, None, &["--upstreams-file", &file]).await;
    let token = token(&gw, &[]).await;
    for name in ["a", "b"] {
        let v = gw
            .tool_call(&token, &format!("{name}__echo"), json!({"text": name}))
            .await;
        assert_eq!(v["result"]["content"][0]["text"], name, "{name}: {v}");
    }
    assert!(
        seen_b.lock().expect("lock").contains(&client.der),
        "b was shown the client certificate"
    );
    for (name, says) in [
        ("misnamed", "not valid for name \"elsewhere.test\""),
        ("wrong-ca", "UnknownIssuer"),
    ] {
        let v = gw
            .tool_call(&token, &format!("{name}__echo"), json!({"text": name}))
            .await;
        assert_eq!(v["error"]["code"], UPSTREAM_UNAVAILABLE, "{name}: {v}");
        let detail = v["error"]["data"]["detail"].as_str().unwrap_or_default();
        assert!(detail.contains(says), "{name}: {v}");
    }
    gw.shutdown().await;
}

/// A bad document stops the start: the gateway exits with an error naming the setting, the
/// file, the entry and what is wrong, and never echoes a URL's credentials.
#[tokio::test]
async fn a_bad_upstreams_file_stops_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("not-a-cert.pem"), "hello").expect("write");
    let ok = json!({"name": "a", "url": "http://127.0.0.1:9/mcp"});
    let cases = [
        (
            json!({"upstreams": [ok, {"name": "db", "url": "http://127.0.0.1:9/mcp", "timeout": 5}]}),
            "upstream 2 (db): unknown field `timeout`",
        ),
        (
            json!([{"name": "gh", "url": "ftp://bot:hunter2pass@127.0.0.1/mcp"}]),
            "upstream 1 (gh): url: must be an absolute http:// or https:// URL",
        ),
        (
            json!([ok, {"name": "a", "url": "http://127.0.0.1:9/other"}]),
            "upstream 2 (a): upstream name \"a\" is configured twice",
        ),
        (
            json!([{"name": "gh", "url": "https://127.0.0.1:9/mcp",
                    "tls": {"ca_file": "not-a-cert.pem"}}]),
            "upstream 1 (gh): tls.ca_file:",
        ),
        (
            json!([{"name": "gh", "url": "http://127.0.0.1:9/mcp", "revision": "2099-01-01"}]),
            "upstream 1 (gh): revision \"2099-01-01\"",
        ),
    ];
    for (doc, says) in cases {
        let file = upstreams_file(dir.path(), &doc);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_intentgate"))
            .args(["serve", "--addr", "127.0.0.1:0", "--upstreams-file", &file])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env_remove("INTENTGATE_UPSTREAM_URL")
            .env_remove("INTENTGATE_UPSTREAMS")
            .output()
            .expect("run the gateway");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{doc}: started");
        assert!(
            stderr.contains(&format!("INTENTGATE_UPSTREAMS_FILE: {file}: {says}")),
            "{doc}: {stderr}"
        );
        assert!(!stderr.contains("hunter2pass"), "{stderr}");
    }
    let missing = dir.path().join("missing.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_intentgate"))
        .arg("check-config")
        .arg("--upstreams-file")
        .arg(&missing)
        .env_remove("INTENTGATE_UPSTREAMS")
        .output()
        .expect("run check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("INTENTGATE_UPSTREAMS_FILE")
            && stderr.contains("missing.json: cannot read"),
        "{stderr}"
    );
}
