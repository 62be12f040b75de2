//! Requests a tool server sends the client during a call, through the gateway: the official
//! Python client (handshake era) answers an elicitation of the real Python MCP server's
//! `ask_user` tool, and only the token whose call was asked can answer. (In the stateless era
//! the same server cannot elicit outside an input-required result; those rounds are tested in
//! `mcp_eras.rs`.)

use std::process::{Command, Stdio};

use serde_json::{Value, json};

use crate::interop::{Flavor, Upstream};
use crate::support::gateway::{self, Backend};
use crate::support::http;

fn run_client(mode: &str, url: &str, token: &str, question: &str) -> Value {
    let out = Command::new(crate::interop::python())
        .arg(crate::interop::interop_dir().join("relay_client.py"))
        .args([mode, "--gateway", url, "--token", token, question])
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
