//! What a tool server asks the client during a call, through the gateway, in every pair of
//! client and upstream revisions (issue 12): the official Python client (`mcp` 2.3, modes legacy
//! and 2026-07-28) and TypeScript clients (v1 `@modelcontextprotocol/sdk`, handshake era; v2
//! `@modelcontextprotocol/client`, modes legacy and pin) answer sampling and elicitation and
//! receive progress, in front of the interop upstream (`tests/interop/upstream_server.py`) in
//! each of its revisions: both (`Flavor::Sse`), the handshake era only (`HandshakeSse`) and
//! 2026-07-28 only (`ModernOnly`), and in front of `mcp` 1.30's own server
//! (`tests/interop_modern/upstream_server.py` in its venv, handshake era only).
//!
//! The upstream's `confirm` (elicitation) and `ask_model` (sampling) tools ask through the
//! official SDK's resolvers: a request during the call in the handshake era, an
//! `InputRequiredResult` in 2026-07-28. The gateway carries each across eras and decides it as
//! the upstream acting toward the agent's user (audited as `elicitation:confirm`,
//! `sampling:ask_model`). Resources and prompts are read here only for the pairs that
//! `mcp_kinds.rs` does not cover (the v1 client, the 2026-07-28-only and the mcp 1.30 upstreams).
//!
//! The five clients of one upstream run at once, each with its own token, so each one's audit
//! is read by its token id.

use serde_json::{Value, json};

use crate::interop::{Flavor, Upstream as InteropUpstream};
use crate::mcp_eras::{Kind, Upstream as SdkUpstream, python_client, ts_client};
use crate::support::gateway::{self, ADMIN_TOKEN, Backend, TestGateway};
use crate::support::http;

const MODERN: &str = "2026-07-28";

/// Every client: (driver, mode).
const CLIENTS: [(&str, &str); 5] = [
    ("py", "legacy"),
    ("py", MODERN),
    ("v1", "legacy"),
    ("v2", "legacy"),
    ("v2", "pin"),
];

fn marker(name: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{name}{}x{nanos}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// The upstream in front of which the clients run.
#[derive(Clone, Copy)]
enum Up {
    /// `tests/interop/upstream_server.py` (mcp 2.3) in one of its revisions.
    Interop(&'static InteropUpstream, Flavor),
    /// `tests/interop_modern/upstream_server.py` on mcp 1.30: a handshake-only SDK of its own.
    Mcp130(&'static SdkUpstream),
}

impl Up {
    async fn start(flavor: Option<Flavor>) -> Up {
        match flavor {
            Some(f) => Up::Interop(InteropUpstream::shared_async(f).await, f),
            None => Up::Mcp130(SdkUpstream::shared(Kind::HandshakeOnly).await),
        }
    }

    fn url(self) -> &'static str {
        match self {
            Up::Interop(u, _) => &u.url,
            Up::Mcp130(u) => &u.url,
        }
    }

    fn calls_with(self, m: &str) -> Vec<Value> {
        match self {
            Up::Interop(u, _) => u.calls_with(m),
            Up::Mcp130(u) => u.calls_with(m),
        }
    }
}

impl std::fmt::Display for Up {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Up::Interop(_, flavor) => write!(f, "{flavor:?}"),
            Up::Mcp130(_) => f.write_str("mcp 1.30"),
        }
    }
}

/// Whether `mcp_kinds.rs` already reads resources and gets prompts with this pair.
fn kinds_covered(client: &str, up: Up) -> bool {
    client != "v1" && matches!(up, Up::Interop(_, Flavor::Sse | Flavor::HandshakeSse))
}

fn steps(m: &str, with_kinds: bool) -> Value {
    let mut s = vec![
        json!({"op": "call", "tool": "confirm", "args": {"question": format!("go ahead {m}?")}}),
        json!({"op": "call", "tool": "ask_model", "args": {"prompt": format!("complete {m}")}}),
        json!({"op": "call", "tool": "slow_count", "args": {"n": 2}, "progress": true}),
    ];
    if with_kinds {
        s.push(json!({"op": "read", "uri": format!("note://{m}")}));
        s.push(json!({"op": "prompt", "name": "greet", "args": {"name": m}}));
    }
    Value::Array(s)
}

async fn run_client(
    gw: &TestGateway,
    client: &str,
    mode: &str,
    token: &str,
    steps: Value,
) -> Value {
    match client {
        "py" => python_client(gw, token, mode, steps, &[]).await,
        _ => ts_client(gw, token, client, mode, steps).await,
    }
}

async fn audit_of(gw: &TestGateway, jti: &str) -> Vec<Value> {
    let (s, v) = http::get_json(
        &format!("{}/v1/admin/audit?jti={jti}&limit=1000", gw.url),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v["items"].as_array().cloned().unwrap_or_default()
}

/// Step `i` of a run, when it succeeded without a tool error.
fn step(out: &Value, i: usize) -> Result<&Value, String> {
    let r = &out["results"][i];
    if r["ok"] != true || r["is_error"] == true {
        return Err(format!("step {i} failed: {r}"));
    }
    Ok(r)
}

fn progress_of(r: &Value) -> Vec<f64> {
    r["progress"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

/// What is wrong with one client's run: the tool must get the client's answers, progress must
/// arrive, and each question the upstream asked must be decided and audited with its kind.
#[allow(clippy::too_many_arguments)]
async fn problems(
    gw: &TestGateway,
    up: Up,
    client: &str,
    mode: &str,
    jti: &str,
    m: &str,
    out: &Value,
) -> Vec<String> {
    let mut p = Vec::new();
    let mut want = |ok: bool, what: String| {
        if !ok {
            p.push(what);
        }
    };
    match step(out, 0) {
        Ok(r) => want(
            r["text"] == json!(["confirmed: True"]),
            format!("the elicitation's answer did not reach the tool: {r}"),
        ),
        Err(e) => want(false, format!("confirm: {e}")),
    }
    want(
        out["elicitations"] == json!([format!("go ahead {m}?")]),
        format!("the client was not asked once: {}", out["elicitations"]),
    );
    let label = if client == "py" { "python" } else { client };
    match step(out, 1) {
        Ok(r) => want(
            r["text"] == json!([format!("model said: sampled by {label} {mode}")]),
            format!("the sampled text did not reach the tool: {r}"),
        ),
        Err(e) => want(false, format!("ask_model: {e}")),
    }
    want(
        out["sampled"] == json!([format!("complete {m}")]),
        format!("the client did not sample once: {}", out["sampled"]),
    );
    match step(out, 2) {
        Ok(r) => {
            want(
                r["text"] == json!(["counted to 2"]),
                format!("slow_count: {r}"),
            );
            want(
                progress_of(r) == [1.0, 2.0],
                format!("not every progress arrived: {r}"),
            );
        }
        Err(e) => want(false, format!("slow_count: {e}")),
    }
    let kinds = !kinds_covered(client, up);
    if kinds {
        match step(out, 3) {
            Ok(r) => want(
                r["text"] == json!([format!("note about {m}")]),
                format!("resources/read: {r}"),
            ),
            Err(e) => want(false, format!("resources/read: {e}")),
        }
        match step(out, 4) {
            Ok(r) => want(
                r["text"] == json!([format!("Say hello to {m}")]),
                format!("prompts/get: {r}"),
            ),
            Err(e) => want(false, format!("prompts/get: {e}")),
        }
    }
    let calls = up.calls_with(m);
    let mut reached: Vec<String> = calls
        .iter()
        .filter_map(|c| c["tool"].as_str())
        .map(|t| {
            if t.starts_with("resource:note://") {
                "resource:note".to_owned()
            } else {
                t.to_owned()
            }
        })
        .collect();
    reached.sort_unstable();
    let expected: &[&str] = if kinds {
        &["ask_model", "confirm", "prompt:greet", "resource:note"]
    } else {
        &["ask_model", "confirm"]
    };
    want(
        reached == expected,
        format!("the upstream did not finish each once: {reached:?}"),
    );
    let audit = audit_of(gw, jti).await;
    for target in ["elicitation:confirm", "sampling:ask_model"] {
        let asked: Vec<&Value> = audit.iter().filter(|e| e["tool"] == target).collect();
        want(
            asked.len() == 1 && asked[0]["decision"] == "allow",
            format!(
                "{target} not decided and audited once: {:?}",
                asked.iter().map(|e| &e["decision"]).collect::<Vec<_>>()
            ),
        );
    }
    p.into_iter()
        .map(|e| format!("{client} {mode} client, {up} upstream: {e}"))
        .collect()
}

async fn matrix(flavor: Option<Flavor>) {
    let up = Up::start(flavor).await;
    let gw = gateway::start(Backend::Sqlite, Some(up.url()), &[]).await;
    let mut runs = Vec::new();
    for (client, mode) in CLIENTS {
        let (token, jti) = gw
            .mint(
                json!({"subject": format!("asked-{client}-{mode}"), "tenant": "acme",
                         "ttl_seconds": 600, "tools": ["*"]}),
            )
            .await;
        let m = marker(&format!("relay{client}"));
        let s = steps(&m, !kinds_covered(client, up));
        runs.push((client, mode, token, jti, m, s));
    }
    let go = |i: usize| {
        let (client, mode, token, _, _, s) = &runs[i];
        run_client(&gw, client, mode, token, s.clone())
    };
    let (a, b, c, d, e) = tokio::join!(go(0), go(1), go(2), go(3), go(4));
    let mut all = Vec::new();
    for ((client, mode, _, jti, m, _), out) in runs.iter().zip([a, b, c, d, e]) {
        let p = problems(&gw, up, client, mode, jti, m, &out).await;
        if !p.is_empty() {
            all.extend(p);
            all.push(format!("  run: {out}"));
        }
    }
    gw.shutdown().await;
    assert!(all.is_empty(), "{}", all.join("\n"));
}

/// An upstream speaking both revisions: a handshake-era client is served through the
/// upstream's session (its requests relayed on the call's stream), a 2026-07-28 client
/// statelessly (its input-required results sealed by the gateway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_answers_an_upstream_of_both_revisions() {
    matrix(Some(Flavor::Sse)).await;
}

/// A handshake-only upstream asks during the call, on the call's stream; a 2026-07-28 client
/// gets each request as an input-required result while the gateway holds the call open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_answers_a_handshake_only_upstream() {
    matrix(Some(Flavor::HandshakeSse)).await;
}

/// The official Python SDK 1.30 (handshake era only), a server of its own: it asks on the
/// call's stream (`related_request_id`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_answers_an_mcp_1_30_upstream() {
    matrix(None).await;
}

/// A 2026-07-28-only upstream asks through input-required results, which the gateway relays to
/// a handshake-era client as requests on its call's stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_answers_a_stateless_only_upstream() {
    matrix(Some(Flavor::ModernOnly)).await;
}

/// A policy that refuses sampling refuses it on every path across the eras: the client is never
/// asked, the tool never gets a model's answer, elicitation still works, and the refusal is
/// audited with its kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_refuses_sampling_on_every_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("no_sampling.rego");
    std::fs::write(
        &policy,
        r#"package intentgate.policy

decision := {"allow": false, "reason": "no sampling through this gateway"} if {
	input.kind == "sampling"
} else := {"allow": true, "reason": "ok"}
"#,
    )
    .expect("policy");
    let policy = policy.display().to_string();
    let mut all = Vec::new();
    for flavor in [Flavor::Sse, Flavor::HandshakeSse, Flavor::ModernOnly] {
        let up = InteropUpstream::shared_async(flavor).await;
        let gw = gateway::start(Backend::Sqlite, Some(&up.url), &["--policy-file", &policy]).await;
        let mut runs = Vec::new();
        for mode in ["legacy", MODERN] {
            let (token, jti) = gw
                .mint(
                    json!({"subject": format!("nosampling-{mode}"), "tenant": "acme",
                             "ttl_seconds": 600, "tools": ["*"]}),
                )
                .await;
            let m = marker("nosampling");
            let s = json!([
                {"op": "call", "tool": "ask_model", "args": {"prompt": format!("complete {m}")}},
                {"op": "call", "tool": "confirm", "args": {"question": format!("go ahead {m}?")}},
            ]);
            runs.push((mode, token, jti, m, s));
        }
        let (a, b) = tokio::join!(
            python_client(&gw, &runs[0].1, runs[0].0, runs[0].4.clone(), &[]),
            python_client(&gw, &runs[1].1, runs[1].0, runs[1].4.clone(), &[]),
        );
        for ((mode, _, jti, m, _), out) in runs.iter().zip([a, b]) {
            let ctx = format!("python {mode} client, {flavor:?} upstream");
            let mut want = |ok: bool, what: &str| {
                if !ok {
                    all.push(format!("{ctx}: {what}: {out}"));
                }
            };
            want(
                out["sampled"] == json!([]),
                "the client was asked to sample",
            );
            want(
                !out["results"][0].to_string().contains("model said"),
                "a model's answer reached the tool",
            );
            want(
                out["results"][1]["text"] == json!(["confirmed: True"]),
                "elicitation no longer works",
            );
            want(
                !up.calls_with(m).iter().any(|c| c["tool"] == "ask_model"),
                "the sampling tool finished with an answer",
            );
            let audit = audit_of(&gw, jti).await;
            let refused: Vec<&Value> = audit
                .iter()
                .filter(|e| e["tool"] == "sampling:ask_model")
                .collect();
            want(
                refused.len() == 1
                    && refused[0]["decision"] == "block"
                    && refused[0]["check"] == "policy",
                "the refusal is not audited once with its kind",
            );
        }
        gw.shutdown().await;
    }
    assert!(all.is_empty(), "{}", all.join("\n"));
}

/// The held call on the wire: a 2026-07-28 request to a handshake-only upstream's `confirm`
/// gets the upstream's elicitation as an input-required result under a gateway id with a sealed
/// state; the retry with the answer gets the tool's result; the rounds are one call in the
/// audit, and the state cannot be used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_call_on_the_wire() {
    use crate::mcp_eras::{modern_body, post};
    let up = InteropUpstream::shared_async(Flavor::HandshakeSse).await;
    let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (tok, jti) = gw
        .mint(json!({"subject": "held", "tenant": "acme", "ttl_seconds": 600, "tools": ["*"]}))
        .await;
    let m = marker("held");
    let args = json!({"question": format!("held {m}?")});
    let round = |id: u64, extra: Value| {
        let mut b = modern_body(
            id,
            "tools/call",
            json!({"name": "confirm", "arguments": args}),
        );
        b["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"] =
            json!({"elicitation": {"form": {}}});
        if let (Some(p), Some(e)) = (b["params"].as_object_mut(), extra.as_object()) {
            p.extend(e.clone());
        }
        b
    };
    let headers = [
        ("mcp-protocol-version", MODERN),
        ("mcp-method", "tools/call"),
        ("mcp-name", "confirm"),
    ];
    let (s, _, first) = post(&gw, &tok, &headers, &round(1, json!({}))).await;
    assert_eq!(s, 200, "{first}");
    let r = &first["result"];
    assert_eq!(r["resultType"], "input_required", "{first}");
    let requests = r["inputRequests"].as_object().expect("inputRequests");
    assert_eq!(requests.len(), 1, "{first}");
    let (key, request) = requests.iter().next().expect("one request");
    assert!(key.starts_with("igq-"), "a gateway id: {key}");
    assert_eq!(request["method"], "elicitation/create", "{first}");
    assert_eq!(
        request["params"]["message"],
        format!("held {m}?"),
        "{first}"
    );
    let state = r["requestState"].as_str().expect("requestState").to_owned();
    assert!(state.starts_with("igr1."), "{state}");
    assert!(
        up.calls_with(&m).is_empty(),
        "the upstream's call is still open"
    );

    let answer = json!({"inputResponses": {key.as_str(): {"action": "accept", "content": {"confirm": true}}},
                        "requestState": state});
    let (s, _, second) = post(&gw, &tok, &headers, &round(2, answer.clone())).await;
    assert_eq!(s, 200, "{second}");
    assert_eq!(second["result"]["resultType"], "complete", "{second}");
    assert_eq!(
        second["result"]["content"][0]["text"], "confirmed: True",
        "{second}"
    );
    assert_eq!(up.calls_with(&m).len(), 1, "the upstream's call ended once");

    let (s, _, replay) = post(&gw, &tok, &headers, &round(3, answer)).await;
    assert_eq!(
        replay["error"]["code"], -32013,
        "a replayed round is refused as spent: {replay}"
    );
    assert_eq!(s, 200, "{replay}");
    assert_eq!(up.calls_with(&m).len(), 1);

    let audit = audit_of(&gw, &jti).await;
    let calls: Vec<&Value> = audit.iter().filter(|e| e["tool"] == "confirm").collect();
    let first_event = calls
        .iter()
        .find(|e| e.get("round").is_none())
        .expect("round 1");
    let second_event = calls.iter().find(|e| e["round"] == 2).expect("round 2");
    assert_eq!(second_event["call_id"], first_event["id"], "{audit:?}");
    assert_eq!(
        audit
            .iter()
            .filter(|e| e["tool"] == "elicitation:confirm" && e["decision"] == "allow")
            .count(),
        1,
        "{audit:?}"
    );
    gw.shutdown().await;
}
