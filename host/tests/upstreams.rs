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

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::interop::{self, Flavor, Upstream};
use crate::mcp_eras::{post, python_client};
use crate::support::gateway::{self, ADMIN_TOKEN, Backend, TestGateway};
use crate::support::http;

const CAPABILITY: i64 = -32010;
const UPSTREAM_UNAVAILABLE: i64 = -32018;
const INVALID_PARAMS: i64 = -32602;
const MODERN: &str = "2026-07-28";
const TOOLS: [&str; 7] = [
    "ask_user",
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
