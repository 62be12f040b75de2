//! Requests a tool server sends the client during a call, through the gateway: the official
//! Python client (handshake era) answers an elicitation of the real Python MCP server's
//! `ask_user` tool, and only the token whose call was asked can answer. (In the stateless era
//! the same server cannot elicit outside an input-required result; those rounds are tested in
//! `mcp_eras.rs`, and every client/upstream revision pair in `relay_matrix.rs`.)

use std::process::{Command, Stdio};

use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::interop::{Flavor, Upstream};
use crate::support::gateway::{self, Backend};
use crate::support::http;

fn run_client(mode: &str, url: &str, token: &str, question: &str) -> Value {
    run_client_with(mode, url, token, question, &[])
}

fn run_client_with(mode: &str, url: &str, token: &str, question: &str, extra: &[&str]) -> Value {
    let out = Command::new(crate::interop::python())
        .arg(crate::interop::interop_dir().join("relay_client.py"))
        .args([mode, "--gateway", url, "--token", token, question])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("relay_client.py ran");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|_| {
        panic!(
            "no JSON from relay_client.py: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[tokio::test]
async fn an_elicitation_reaches_a_handshake_era_client_and_its_answer_the_tool() {
    let up = Upstream::shared_async(Flavor::Sse).await;
    let tg = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (token, _) = tg
        .mint(json!({"subject": "asker", "tools": ["ask_user"]}))
        .await;
    for mode in ["legacy"] {
        let question = format!("delete it? ({mode} {})", std::process::id());
        let (url, tok, q, m) = (
            tg.url.clone(),
            token.clone(),
            question.clone(),
            mode.to_owned(),
        );
        let out = tokio::task::spawn_blocking(move || run_client(&m, &url, &tok, &q))
            .await
            .expect("client");
        assert_eq!(out["ok"], true, "{mode}: {out}");
        assert_eq!(
            out["asked"],
            json!([question]),
            "{mode}: the client was asked: {out}"
        );
        assert_eq!(out["text"], json!(["answer: True"]), "{mode}: {out}");
        let calls = up.calls_with(&question);
        assert_eq!(calls.len(), 1, "{mode}: ran once: {calls:?}");
        assert_eq!(calls[0]["args"]["action"], "accept");
    }
    // The upstream's request was decided and audited as the upstream acting toward the user.
    let (_, audit) = http::get_json(
        &format!("{}/v1/admin/audit?tenant=default&limit=100", tg.url),
        gateway::ADMIN_TOKEN,
    )
    .await;
    let asked = audit["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|e| e["tool"] == "elicitation:ask_user")
        .collect::<Vec<_>>();
    assert_eq!(asked.len(), 1, "{audit}");
    assert_eq!(asked[0]["decision"], "allow");
    tg.shutdown().await;
}

#[tokio::test]
async fn a_policy_can_refuse_what_the_upstream_asks_the_agent() {
    let up = Upstream::shared_async(Flavor::Sse).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("no_elicitation.rego");
    std::fs::write(
        &policy,
        r#"package intentgate.policy

decision := {"allow": false, "reason": "no questions to users from tools"} if {
	input.kind == "elicitation"
} else := {"allow": true, "reason": "ok"}
"#,
    )
    .expect("policy");
    let policy = policy.display().to_string();
    let tg = gateway::start(Backend::Sqlite, Some(&up.url), &["--policy-file", &policy]).await;
    let (token, _) = tg
        .mint(json!({"subject": "asker", "tools": ["ask_user"]}))
        .await;
    let question = format!("refused? {}", std::process::id());
    let (url, tok, q) = (tg.url.clone(), token.clone(), question.clone());
    let out = tokio::task::spawn_blocking(move || run_client("legacy", &url, &tok, &q))
        .await
        .expect("client");
    // The client was never asked (the tool's call failed with the refusal instead).
    assert!(
        out.get("asked").is_none_or(|a| a == &json!([])),
        "the client was never asked: {out}"
    );
    // The tool learned that it could not ask (an error, or a decline) and did not get an answer.
    assert!(
        !out.to_string().contains("answer: True"),
        "no accepted answer reached the tool: {out}"
    );
    let (_, audit) = http::get_json(
        &format!("{}/v1/admin/audit?tenant=default&limit=100", tg.url),
        gateway::ADMIN_TOKEN,
    )
    .await;
    let refused = audit["items"].as_array().expect("items").iter().any(|e| {
        e["tool"] == "elicitation:ask_user" && e["decision"] == "block" && e["check"] == "policy"
    });
    assert!(refused, "the refusal is audited: {audit}");
    tg.shutdown().await;
}

#[tokio::test]
async fn a_reply_for_another_tokens_request_is_refused() {
    let up = Upstream::shared_async(Flavor::Sse).await;
    let tg = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (token, _) = tg.mint(json!({"subject": "x", "tools": ["echo"]})).await;
    let reply = json!({"jsonrpc": "2.0", "id": "igq-00000000000000000000000000000000",
                       "result": {"action": "accept"}});
    let (status, v) = http::post_json(&format!("{}/v1/mcp", tg.url), Some(&token), &reply).await;
    assert_eq!(status, 404, "{v}");
    let (status, _) = http::post_json(&format!("{}/v1/mcp", tg.url), None, &reply).await;
    assert_eq!(status, 401);
    tg.shutdown().await;
}

#[tokio::test]
async fn progress_reaches_a_handshake_era_client_while_the_tool_runs() {
    let up = Upstream::shared_async(Flavor::Sse).await;
    let tg = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (token, _) = tg
        .mint(json!({"subject": "counter", "tools": ["slow_count"]}))
        .await;
    let (url, tok) = (tg.url.clone(), token.clone());
    let out = tokio::task::spawn_blocking(move || {
        run_client_with("legacy", &url, &tok, "-", &["--progress"])
    })
    .await
    .expect("client");
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["text"], json!(["counted to 3"]), "{out}");
    let at: Vec<f64> = out["progress_at"]
        .as_array()
        .expect("progress")
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    let done = out["done_at"].as_f64().expect("done");
    assert_eq!(at.len(), 3, "every step's progress: {out}");
    // The tool sleeps 0.3 s after each step: the first progress arrived while it was still
    // running, not together with the answer.
    assert!(done - at[0] >= 0.5, "progress streamed as it came: {out}");
    tg.shutdown().await;
}

/// The upstream asks for the roots on its session's own stream. A gateway whose first call of
/// a new session went out before that stream was open would have the question dropped (the
/// server keeps no events) and the call would never end: the first call waits for the stream.
#[tokio::test]
async fn a_question_on_a_session_stream_that_opens_late_still_reaches_the_client() {
    let up = Upstream::start_async(Flavor::SlowSessionStream).await;
    let tg = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (token, _) = tg
        .mint(json!({"subject": "rooter", "tools": ["ask_user"]}))
        .await;
    let (url, tok) = (tg.url.clone(), token.clone());
    let out = tokio::task::spawn_blocking(move || run_client("legacy", &url, &tok, "roots: late"))
        .await
        .expect("client");
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["asked"], json!(["roots"]), "{out}");
    assert_eq!(out["text"], json!(["roots: file:///work/project"]), "{out}");
    tg.shutdown().await;
}

/// A call the upstream took is never sent to it again: when the upstream refuses the client's
/// reply to its question (HTTP 500), the call ends in an error, and the upstream received it
/// once (not again after probing its revision, as a refusal before the call was taken is).
#[tokio::test]
async fn a_call_the_upstream_took_is_never_sent_twice() {
    let up = Upstream::start_async(Flavor::RefusesReplies).await;
    let tg = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (token, _) = tg
        .mint(json!({"subject": "once", "tools": ["ask_user"]}))
        .await;
    let question = format!("once? {}", std::process::id());
    let (url, tok, q) = (tg.url.clone(), token.clone(), question.clone());
    let out = tokio::task::spawn_blocking(move || run_client("legacy", &url, &tok, &q))
        .await
        .expect("client");
    assert_ne!(out["ok"], true, "{out}");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let posted: Vec<Value> = up
        .calls_with(&question)
        .into_iter()
        .filter(|c| c["tool"] == "posted:tools/call")
        .collect();
    assert_eq!(posted.len(), 1, "{posted:?}");
    tg.shutdown().await;
}

#[tokio::test]
async fn the_clients_roots_reach_the_tool_that_lists_them() {
    let up = Upstream::shared_async(Flavor::Sse).await;
    let tg = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (token, _) = tg
        .mint(json!({"subject": "rooter", "tools": ["ask_user"]}))
        .await;
    let question = format!("roots: {}", std::process::id());
    let (url, tok, q) = (tg.url.clone(), token.clone(), question.clone());
    let out = tokio::task::spawn_blocking(move || run_client("legacy", &url, &tok, &q))
        .await
        .expect("client");
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["asked"], json!(["roots"]), "{out}");
    assert_eq!(out["text"], json!(["roots: file:///work/project"]), "{out}");
    let (_, audit) = http::get_json(
        &format!("{}/v1/admin/audit?tenant=default&limit=100", tg.url),
        gateway::ADMIN_TOKEN,
    )
    .await;
    assert!(
        audit["items"]
            .as_array()
            .expect("items")
            .iter()
            .any(|e| e["tool"] == "roots:ask_user" && e["decision"] == "allow"),
        "{audit}"
    );
    tg.shutdown().await;
}

/// A client's `notifications/cancelled` for a call in flight reaches the upstream, which stops
/// the tool; a call that is not cancelled runs to its end (the control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_cancellation_stops_the_tool_upstream() {
    let up = Upstream::start_async(Flavor::HandshakeSse).await;
    let tg = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (token, _) = tg
        .mint(json!({"subject": "canceller", "tools": ["slow_count"]}))
        .await;
    let url = format!("{}/v1/mcp", tg.url);
    let auth = format!("Bearer {token}");
    let send = |body: Value, sid: Option<String>| {
        let (url, auth) = (url.clone(), auth.clone());
        async move {
            let mut h = vec![
                ("content-type", "application/json"),
                ("accept", "application/json, text/event-stream"),
                ("authorization", auth.as_str()),
            ];
            if let Some(s) = &sid {
                h.push(("mcp-session-id", s.as_str()));
            }
            let body = serde_json::to_vec(&body).expect("json");
            http::send("POST", &url, &h, body).await
        }
    };
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"}}});
    let (s, h, _) = send(init, None).await;
    assert_eq!(s, 200);
    let sid = h
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .expect("session")
        .to_owned();
    let count = |id: &str, n: u64| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
               "params": {"name": "slow_count", "arguments": {"n": n}}})
    };
    let finished = |n: u64| {
        up.calls_with("")
            .iter()
            .any(|c| c["tool"] == "slow_count" && c["args"]["n"] == n)
    };
    // The control: nine steps of 0.3 s run to the end.
    let (s, _, _) = send(count("c0", 9), Some(sid.clone())).await;
    assert_eq!(s, 200);
    assert!(finished(9), "the control call ran to its end");
    // Cancelled once it runs: the tool never finishes. A cancel that reaches the upstream
    // before the call does is ignored (the protocol allows it), so the cancel waits for the
    // tool's first progress, relayed on c1's stream, rather than for a fixed time that a loaded
    // machine can outlast.
    let mut c1 = count("c1", 8);
    c1["params"]["_meta"] = json!({"progressToken": "c1-progress"});
    let headers = [
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
        ("authorization", auth.as_str()),
        ("mcp-session-id", sid.as_str()),
    ];
    let body = serde_json::to_vec(&c1).expect("json");
    let (s, _, mut c1_stream) = http::open("POST", &url, &headers, body).await;
    assert_eq!(s, 200);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("notifications/progress") {
        match tokio::time::timeout_at(deadline, c1_stream.frame()).await {
            Ok(Some(Ok(f))) => got.extend_from_slice(&f.into_data().unwrap_or_default()),
            Ok(_) => panic!("c1's stream ended first: {}", String::from_utf8_lossy(&got)),
            Err(_) => panic!(
                "no progress of c1 in 30 s: {}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                        "params": {"requestId": "c1", "reason": "the user pressed stop"}});
    let (s, _, _) = send(cancel, Some(sid.clone())).await;
    assert_eq!(s, 202);
    // Uncancelled, the tool would end 2.1 s after its first progress: wait well past that.
    tokio::time::sleep(std::time::Duration::from_millis(4200)).await;
    assert!(!finished(8), "the cancelled tool must not run to its end");
    // Held open until now: the tool stopped for the cancel, not because its client went away.
    drop(c1_stream);
    tg.shutdown().await;
    up.kill();
}
