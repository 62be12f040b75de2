//! Telemetry: `GET /metrics` read by the reference Prometheus text parser (the
//! `prometheus-client` Python package, `tests/interop/prometheus_parse.py`), its counts
//! against the calls made, its cardinality against many tokens, who may scrape, where it is
//! served; and `INTENTGATE_LOG_FORMAT=json` lines from the real binary, checked for planted
//! secrets.
//!
//! The Python package is a hard requirement (pinned in `tests/interop/requirements.txt`):
//! without it these tests fail with the command that installs it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use serde_json::{Value, json};

use crate::support::binary::{collect_all_lines, collect_lines, lines_at_end, listening_url};
use crate::support::gateway::{self, ADMIN_TOKEN, Backend, TestGateway};
use crate::support::http;

const INSTALL_HINT: &str = "pip install -r tests/interop/requirements.txt";
const PARSER_VERSION: &str = "0.26.0";
const METRICS_TOKEN: &str = "test-metrics-scrape-token-0123456789";
const ACME_ADMIN: &str = "acme-admin-token-0123456789abcdef";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

fn python() -> String {
    std::env::var("INTENTGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// GET /metrics; returns status, content type and body.
async fn scrape_at(url: &str, bearer: Option<&str>) -> (u16, String, String) {
    let auth = bearer.map(|b| format!("Bearer {b}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    let (status, h, body) =
        http::send("GET", &format!("{url}/metrics"), &headers, Vec::new()).await;
    let ctype = h
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, ctype, String::from_utf8_lossy(&body).into_owned())
}

/// One sample as the reference parser read it.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: Value,
}

/// The exposition as the reference parser read it: family name → (type, samples).
struct Parsed {
    families: BTreeMap<String, (String, Vec<Sample>)>,
}

impl Parsed {
    fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.families.values().flat_map(|(_, s)| s.iter())
    }

    /// The value of the one sample named `name` with exactly these labels (0 when absent).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples()
            .find(|s| s.name == name && s.labels == want)
            .and_then(|s| s.value.as_f64())
            .unwrap_or(0.0)
    }

    /// Sum of the samples named `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .filter_map(|s| s.value.as_f64())
            .sum()
    }
}

/// Parses `text` with `prometheus_client.parser` (fails the test when it does not parse).
fn parse(text: &str) -> Parsed {
    let script = repo_root().join("tests/interop/prometheus_parse.py");
    let mut child = Command::new(python())
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}; then {INSTALL_HINT}", python()));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write exposition");
    let out = child.wait_with_output().expect("parser output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {}
        Some(3) => {
            panic!("the metrics tests need prometheus-client: run `{INSTALL_HINT}`\n{stderr}")
        }
        code => panic!("the reference parser refused /metrics ({code:?}): {stderr}\n---\n{text}"),
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("parser JSON");
    assert_eq!(
        v["version"], PARSER_VERSION,
        "pinned prometheus-client=={PARSER_VERSION}: run `{INSTALL_HINT}`"
    );
    let mut families = BTreeMap::new();
    for f in v["families"].as_array().expect("families") {
        let samples = f["samples"]
            .as_array()
            .expect("samples")
            .iter()
            .map(|s| Sample {
                name: s["name"].as_str().expect("name").to_owned(),
                labels: serde_json::from_value(s["labels"].clone()).expect("labels"),
                value: s["value"].clone(),
            })
            .collect();
        families.insert(
            f["name"].as_str().expect("name").to_owned(),
            (f["type"].as_str().expect("type").to_owned(), samples),
        );
    }
    Parsed { families }
}

async fn scrape_parsed(tg: &TestGateway) -> (String, Parsed) {
    let (status, ctype, body) = scrape_at(&tg.url, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ctype, "text/plain; version=0.0.4; charset=utf-8");
    let parsed = tokio::task::spawn_blocking({
        let body = body.clone();
        move || parse(&body)
    })
    .await
    .expect("parse task");
    (body, parsed)
}

async fn call(tg: &TestGateway, token: &str, tool: &str) -> Value {
    tg.tool_call(token, tool, json!({"text": "hi", "table": "t"}))
        .await
}

#[tokio::test]
async fn decisions_match_the_calls_by_outcome_and_the_reference_parser_reads_them() {
    let tg = gateway::start(Backend::Sqlite, None, &["--demo"]).await;
    let (echo, _) = tg
        .mint(json!({"subject": "alice", "tools": ["echo", "delete_records"]}))
        .await;
    let (acme, _) = tg
        .mint(json!({"subject": "bob", "tenant": "acme", "tools": ["echo"]}))
        .await;
    for _ in 0..5 {
        let v = call(&tg, &echo, "echo").await;
        assert!(v.get("result").is_some(), "{v}");
    }
    for _ in 0..3 {
        let v = call(&tg, &echo, "read_invoice").await;
        assert_eq!(v["error"]["code"], -32010, "outside the token's tools: {v}");
    }
    for _ in 0..2 {
        let v = call(&tg, &echo, "delete_records").await;
        assert_eq!(
            v["error"]["code"], -32019,
            "the policy escalates deletes: {v}"
        );
    }
    let v = call(&tg, &acme, "echo").await;
    assert!(v.get("result").is_some(), "{v}");
    for _ in 0..2 {
        let v = call(&tg, "not-a-token", "echo").await;
        assert_eq!(v["error"]["code"], -32010, "{v}");
    }
    // Any decided method counts; a method that is not decided (ping) does not.
    for method in ["resources/read", "ping"] {
        let (_, v) = http::post_json(
            &format!("{}/v1/mcp", tg.url),
            Some("not-a-token"),
            &json!({"jsonrpc": "2.0", "id": 9, "method": method, "params": {"uri": "file:///x"}}),
        )
        .await;
        assert_eq!(v["error"]["code"], -32010, "{v}");
    }

    let (text, m) = scrape_parsed(&tg).await;
    let d = "intentgate_decisions_total";
    let cases = [
        (("default", "none", "allow"), 5.0),
        (("default", "capability", "block"), 3.0),
        (("default", "policy", "escalate"), 2.0),
        (("acme", "none", "allow"), 1.0),
        (("(unauthenticated)", "capability", "block"), 3.0),
    ];
    for ((tenant, check, outcome), want) in cases {
        let got = m.value(
            d,
            &[("tenant", tenant), ("check", check), ("outcome", outcome)],
        );
        assert_eq!(got, want, "{tenant}/{check}/{outcome}\n{text}");
    }
    // By outcome, whatever the tenant or check: exactly the calls made.
    assert_eq!(m.sum(d, &[("outcome", "allow")]), 6.0);
    assert_eq!(m.sum(d, &[("outcome", "block")]), 6.0);
    assert_eq!(m.sum(d, &[("outcome", "escalate")]), 2.0);

    // Stages ran as often as the calls reached them.
    let count = |stage: &str| {
        m.value(
            "intentgate_stage_duration_seconds_count",
            &[("stage", stage)],
        )
    };
    assert_eq!(count("capability"), 11.0, "every authenticated call");
    assert_eq!(count("audit"), 11.0, "every decided call was committed");
    assert_eq!(count("intent"), 8.0, "the calls that passed capability");
    assert_eq!(count("policy"), 8.0);
    assert_eq!(count("budget"), 6.0, "the calls the policy allowed");
    assert_eq!(count("upstream"), 6.0, "the allowed calls were forwarded");
    assert!(count("token") >= 15.0, "every request's token was verified");
    assert_eq!(
        m.value("intentgate_decision_duration_seconds_count", &[]),
        11.0
    );
    // A histogram's +Inf bucket is its count.
    assert_eq!(
        m.value(
            "intentgate_stage_duration_seconds_bucket",
            &[("stage", "upstream"), ("le", "+Inf")]
        ),
        6.0
    );
    assert_eq!(
        m.value(
            "intentgate_upstream_calls_total",
            &[("upstream", "default")]
        ),
        6.0
    );
    assert!(m.value("intentgate_audit_events_total", &[]) >= 11.0);
    assert!(m.value("intentgate_audit_batch_events_count", &[]) >= 1.0);
    assert!(m.value("intentgate_audit_transactions_total", &[]) >= 1.0);
    assert!(m.value("intentgate_audit_commit_duration_seconds_count", &[]) >= 1.0);
    // The commits of this SQLite store were synced, each sync timed.
    assert!(m.value("intentgate_audit_sync_duration_seconds_count", &[]) >= 1.0);
    // The lookup tables' writer: a gauge of what it has not entered yet (at most every event
    // of this new store), and no failure.
    assert!(text.contains("# TYPE intentgate_audit_lookup_lag_events gauge"));
    let lag = m.value("intentgate_audit_lookup_lag_events", &[]);
    assert!(
        lag <= m.value("intentgate_audit_events_total", &[]),
        "lag {lag}"
    );
    assert_eq!(m.value("intentgate_audit_lookup_failures_total", &[]), 0.0);
    assert!(m.value("intentgate_plugin_instances", &[]) >= 1.0);
    let age = m.value("intentgate_revocation_sync_age_seconds", &[]);
    assert!((0.0..60.0).contains(&age), "synced at start: {age}");
    assert_eq!(
        m.value(
            "intentgate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // Naming: every family prefixed; counters end in _total, durations in _seconds.
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split_whitespace().skip(2);
        let (name, kind) = (parts.next().expect("name"), parts.next().expect("type"));
        assert!(name.starts_with("intentgate_"), "{line}");
        assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
        if name.contains("duration") {
            assert!(name.ends_with("_seconds"), "{line}");
        }
    }
    // No label names an agent, a token or a tool; no value carries one.
    let labels: BTreeSet<&str> = m
        .samples()
        .flat_map(|s| s.labels.keys().map(String::as_str))
        .collect();
    for l in &labels {
        assert!(
            [
                "tenant", "check", "outcome", "stage", "le", "upstream", "kind", "action",
                "version"
            ]
            .contains(l),
            "unexpected label {l}"
        );
    }
    for secret in [echo.as_str(), acme.as_str(), "alice", "bob", "not-a-token"] {
        assert!(!text.contains(secret), "{secret} leaked into /metrics");
    }
    tg.shutdown().await;
}

/// The number of series: sample lines, whatever their values.
fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.rsplit_once(' ').map_or(l, |(k, _)| k).to_owned())
        .collect()
}

#[tokio::test]
async fn cardinality_does_not_grow_with_tokens_or_agents() {
    let tg = Arc::new(gateway::start(Backend::Sqlite, None, &["--demo"]).await);
    let mut tokens = Vec::new();
    for i in 0..200 {
        let tenant = ["default", "acme", "globex"][i % 3];
        let (t, _) = tg
            .mint(json!({"subject": format!("agent-{i}"), "tenant": tenant, "tools": ["echo"]}))
            .await;
        tokens.push(t);
    }
    // Both kinds of outcome from the first tokens, then the series are counted. Returns how
    // many calls were allowed (the rest were refused).
    let run = |tokens: Vec<String>, calls_each: usize| {
        let tg = Arc::clone(&tg);
        async move {
            let mut workers = Vec::new();
            for chunk in tokens.chunks(tokens.len().div_ceil(8).max(1)) {
                let (tg, chunk) = (Arc::clone(&tg), chunk.to_vec());
                workers.push(tokio::spawn(async move {
                    let mut allowed = 0u32;
                    for t in &chunk {
                        for n in 0..calls_each {
                            let tool = if n % 4 == 3 { "read_invoice" } else { "echo" };
                            let v = call(&tg, t, tool).await;
                            allowed += u32::from(v.get("result").is_some());
                        }
                    }
                    allowed
                }));
            }
            let mut allowed = 0;
            for w in workers {
                allowed += w.await.expect("worker");
            }
            f64::from(allowed)
        }
    };
    let allowed_before = run(tokens[..10].to_vec(), 10).await;
    let (before_text, before) = scrape_parsed(&tg).await;
    let allowed = allowed_before + run(tokens[10..].to_vec(), 10).await;
    let (after_text, after) = scrape_parsed(&tg).await;

    // The counts are the calls' answers, by outcome.
    let d = "intentgate_decisions_total";
    assert_eq!(before.sum(d, &[]), 100.0);
    assert_eq!(before.sum(d, &[("outcome", "allow")]), allowed_before);
    assert_eq!(after.sum(d, &[]), 2000.0, "2,000 calls from 200 tokens");
    assert_eq!(after.sum(d, &[("outcome", "allow")]), allowed);
    assert_eq!(after.sum(d, &[("outcome", "block")]), 2000.0 - allowed);
    assert!(
        after.sum(d, &[("check", "capability"), ("outcome", "block")]) == 400.0,
        "one call in five is outside its token"
    );
    // No series came with the 190 new tokens. On a loaded machine a check may miss its
    // deadline, which adds its (bounded) check and failure series; nothing else may appear.
    let (s0, s1) = (series(&before_text), series(&after_text));
    assert!(s0.is_subset(&s1), "a series disappeared");
    for extra in s1.difference(&s0) {
        let load = extra.starts_with("intentgate_plugin_failures_total{")
            || (extra.starts_with("intentgate_decisions_total{")
                && ["intent", "policy", "budget", "audit"]
                    .iter()
                    .any(|c| extra.contains(&format!("check=\"{c}\""))));
        assert!(load, "a new series after 190 more tokens: {extra}");
    }
    assert_eq!(
        before.sum(d, &[("tenant", "globex")]) > 0.0,
        after.sum(d, &[("tenant", "globex")]) > 0.0
    );
    assert!(
        series(&after_text).len() < 400,
        "{} series",
        series(&after_text).len()
    );
    for i in [0, 57, 199] {
        assert!(!after_text.contains(&format!("agent-{i}\"")), "agent label");
    }
    match Arc::try_unwrap(tg) {
        Ok(tg) => tg.shutdown().await,
        Err(_) => panic!("gateway still shared"),
    }
}

#[tokio::test]
async fn scrapes_need_the_metrics_or_superadmin_token() {
    let tg = gateway::start(
        Backend::Sqlite,
        None,
        &[
            "--demo",
            "--metrics-token",
            METRICS_TOKEN,
            "--tenant-admins",
            &format!("acme:{ACME_ADMIN}"),
        ],
    )
    .await;
    let (agent, _) = tg.mint(json!({"subject": "a", "tools": ["echo"]})).await;
    for bearer in [
        None,
        Some("wrong-token-0123456789abcdef"),
        Some(ACME_ADMIN),
        Some(agent.as_str()),
    ] {
        let (status, _, body) = scrape_at(&tg.url, bearer).await;
        assert_eq!(status, 401, "{bearer:?}: {body}");
        assert!(!body.contains("intentgate_decisions_total"), "{body}");
    }
    let (_, headers, _) = http::send("GET", &format!("{}/metrics", tg.url), &[], Vec::new()).await;
    assert_eq!(
        headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer realm=\"intentgate-metrics\"")
    );
    for bearer in [ADMIN_TOKEN, METRICS_TOKEN] {
        let (status, _, body) = scrape_at(&tg.url, Some(bearer)).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("# TYPE intentgate_decisions_total counter"),
            "{body}"
        );
    }
    // The metrics token opens nothing else.
    let (status, _) = http::get_json(&format!("{}/v1/admin/tenants", tg.url), METRICS_TOKEN).await;
    assert_eq!(status, 401);
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let (status, headers, _) = http::send(
        "POST",
        &format!("{}/metrics", tg.url),
        &[("authorization", &auth)],
        Vec::new(),
    )
    .await;
    assert_eq!(status, 405);
    assert_eq!(
        headers.get("allow").and_then(|v| v.to_str().ok()),
        Some("GET, HEAD")
    );
    tg.shutdown().await;
}

#[tokio::test]
async fn disabled_metrics_answer_404() {
    let tg = gateway::start(
        Backend::Sqlite,
        None,
        &["--demo", "--metrics-enabled", "false"],
    )
    .await;
    let (status, _, body) = scrape_at(&tg.url, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 404, "{body}");
    let listener = intentgate::metrics::endpoint::start_listener(&tg.gw)
        .await
        .expect("nothing to bind");
    assert!(listener.is_none());
    tg.shutdown().await;
}

#[tokio::test]
async fn a_separate_listener_serves_metrics_and_the_main_one_does_not() {
    // Protected (the default): the separate listener wants a token too.
    let tg = gateway::start(
        Backend::Sqlite,
        None,
        &["--demo", "--metrics-addr", "127.0.0.1:0"],
    )
    .await;
    let (status, _, _) = scrape_at(&tg.url, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 404, "not on the main listener");
    let listener = intentgate::metrics::endpoint::start_listener(&tg.gw)
        .await
        .expect("bind")
        .expect("a separate listener");
    let url = format!("http://{}", listener.addr);
    assert_eq!(scrape_at(&url, None).await.0, 401);
    let (status, _, body) = scrape_at(&url, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200);
    tokio::task::spawn_blocking(move || parse(&body))
        .await
        .expect("parse");
    let (status, _, _) = http::send("GET", &format!("{url}/v1/mcp"), &[], Vec::new()).await;
    assert_eq!(status, 404, "the metrics listener serves nothing else");
    drop(listener);
    tg.shutdown().await;

    // Reachable from the network (plain HTTP): the metrics token scrapes, the superadmin
    // token is not taken there.
    let tg = gateway::start(
        Backend::Sqlite,
        None,
        &[
            "--demo",
            "--metrics-addr",
            "0.0.0.0:0",
            "--metrics-token",
            "scrape-only-token-123456",
        ],
    )
    .await;
    let listener = intentgate::metrics::endpoint::start_listener(&tg.gw)
        .await
        .expect("bind")
        .expect("a separate listener");
    let url = format!("http://127.0.0.1:{}", listener.addr.port());
    assert_eq!(
        scrape_at(&url, Some(ADMIN_TOKEN)).await.0,
        401,
        "the superadmin token over plain HTTP on the network"
    );
    assert_eq!(
        scrape_at(&url, Some("scrape-only-token-123456")).await.0,
        200
    );
    drop(listener);
    tg.shutdown().await;

    // Asked for: no token, on loopback only (the configuration refuses it elsewhere).
    let tg = gateway::start(
        Backend::Sqlite,
        None,
        &[
            "--demo",
            "--metrics-addr",
            "127.0.0.1:0",
            "--metrics-auth",
            "none",
        ],
    )
    .await;
    let listener = intentgate::metrics::endpoint::start_listener(&tg.gw)
        .await
        .expect("bind")
        .expect("a separate listener");
    let (status, _, body) = scrape_at(&format!("http://{}", listener.addr), None).await;
    assert_eq!(status, 200, "{body}");
    drop(listener);
    tg.shutdown().await;
}

// --- JSON logs from the real binary ---------------------------------------------------------------

#[tokio::test]
async fn json_log_lines_parse_and_carry_no_planted_secret() {
    let data = tempfile::tempdir().expect("tempdir");
    let admin = "planted-admin-token-7f3a9c1e5b";
    let master = "cGxhbnRlZC1tYXN0ZXIta2V5LTAxMjM0NTY3ODlhYmM";
    let tenant_admin = "planted-tenant-admin-4d2e8a";
    let metrics_token = "planted-metrics-token-9b1c6f";
    let upstream_pass = "planted-upstream-pass-2c7d";
    let upstream_key = "planted-upstream-key-8e4f";
    // An upstream that refuses connections: forwarding fails and is logged.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let upstream = format!("http://svc:{upstream_pass}@127.0.0.1:{port}/mcp?key={upstream_key}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_intentgate"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("INTENTGATE_LOG_FORMAT", "json")
        .env("INTENTGATE_LOG", "intentgate=debug,info")
        .env("INTENTGATE_ADDR", "127.0.0.1:0")
        .env("INTENTGATE_DATA_DIR", data.path())
        .env("INTENTGATE_ADMIN_TOKEN", admin)
        .env("INTENTGATE_MASTER_KEY", master)
        .envs(crate::support::gateway::TEST_CHECK_DEADLINES_ENV)
        .env("INTENTGATE_TENANT_ADMINS", format!("acme:{tenant_admin}"))
        .env("INTENTGATE_METRICS_TOKEN", metrics_token)
        .env("INTENTGATE_UPSTREAM_URL", &upstream)
        .env(
            "INTENTGATE_POLICY_FILE",
            repo_root().join("policies/examples/token_scope.rego"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the gateway binary");
    let (lines, reader) = collect_all_lines(child.stdout.take().expect("stdout"));
    let errors = collect_lines(child.stderr.take().expect("stderr"));
    let url = listening_url(&mut child, &lines)
        .await
        .unwrap_or_else(|e| panic!("{e}\nstderr: {:?}", errors.lock().expect("lines")));
    let (status, minted) = http::post_json(
        &format!("{url}/v1/admin/mint"),
        Some(admin),
        &json!({"subject": "logger", "tools": ["echo"]}),
    )
    .await;
    assert_eq!(status, 200, "{minted}");
    let token = minted["token"].as_str().expect("token").to_owned();
    let mcp = format!("{url}/v1/mcp");
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": "echo", "arguments": {"text": "hi"}}});
    // Allowed, then failing at the upstream (its URL carries credentials).
    let (_, v) = http::post_json(&mcp, Some(&token), &body).await;
    assert_eq!(v["error"]["code"], -32018, "{v}");
    // Refused: outside the token, a forged token, a wrong admin token.
    let outside = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                         "params": {"name": "delete_records", "arguments": {}}});
    http::post_json(&mcp, Some(&token), &outside).await;
    http::post_json(&mcp, Some(&format!("{token}x")), &body).await;
    http::get_json(
        &format!("{url}/v1/admin/tenants"),
        "planted-wrong-admin-token",
    )
    .await;
    let (status, _, _) = scrape_at(&url, Some(metrics_token)).await;
    assert_eq!(status, 200);
    // The lines looked for below were written before answers this test already got: once the
    // killed child is reaped and its output read to its end, they are all here, with every
    // other line it wrote (each checked for secrets too).
    let _ = child.kill();
    let _ = child.wait();
    let lines = lines_at_end(&lines, reader);
    assert!(lines.len() >= 3, "{lines:?}");
    let middle = token.len() / 2;
    let fragment = token[middle..middle + 24].to_owned();
    let planted = [
        admin,
        master,
        tenant_admin,
        metrics_token,
        upstream_pass,
        upstream_key,
        token.as_str(),
        fragment.as_str(),
        "planted-wrong-admin-token",
    ];
    for line in &lines {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        for secret in planted {
            assert!(
                !line.contains(secret),
                "a planted secret was logged: {line}"
            );
        }
    }
    assert!(
        lines.iter().any(|l| l.contains("forwarding allowed calls")),
        "the upstream was logged (redacted): {lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("call allowed") && l.contains("\"event_id\":")),
        "a decision is logged at debug with its audit event id: {lines:?}"
    );
}
