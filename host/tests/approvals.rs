//! The approval queue end to end, in front of the real MCP upstream (`upstream_server.py`, which
//! logs every call it executes): async escalation and resume (single-use, matched to the call,
//! expiring), sync holds (approved, rejected, timed out, client gone), the admin API's errors,
//! two replicas on PostgreSQL, and pending approvals surviving `kill -9`.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::interop::{Flavor, Upstream};
use crate::support::binary::{collect_lines, listening_url};
use crate::support::gateway::{self, ADMIN_TOKEN, Backend, MASTER_KEY, TestGateway};
use crate::support::http;

/// A marker unique to this test run, put in the arguments so the upstream's call log can be
/// searched for exactly this call.
fn marker(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        intentgate::approvals::new_id()
    )
}

fn call_body(tool: &str, table: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
           "params": {"name": tool, "arguments": {"table": table}}})
}

async fn call_with(url: &str, token: &str, body: &Value, extra: &[(&str, &str)]) -> Value {
    let auth = format!("Bearer {token}");
    let mut headers = vec![
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
        ("authorization", auth.as_str()),
    ];
    headers.extend_from_slice(extra);
    let (status, h, bytes) = http::send(
        "POST",
        &format!("{url}/v1/mcp"),
        &headers,
        serde_json::to_vec(body).expect("json"),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let sse = h
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("text/event-stream"));
    if sse {
        // The last `data:` line is the answer (comments and notifications come before it).
        let data = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .next_back()
            .unwrap_or_else(|| panic!("no event in {text:?}"));
        serde_json::from_str(data).expect("event JSON")
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"))
    }
}

async fn start(backend: Backend, up: &Upstream, extra: &[&str]) -> TestGateway {
    // A generous audit deadline: these tests hold, wait and decide across many steps while the
    // whole suite shares the machine's disk; a commit slower than the 2 s default under that
    // load would be a refusal the test did not mean to exercise.
    let mut flags = vec![
        "--tenant-admins",
        "acme:acme-admin-token-0123456789",
        "--audit-deadline-ms",
        "15000",
    ];
    flags.extend_from_slice(extra);
    gateway::start(backend, Some(&up.url), &flags).await
}

async fn pending_of(v: &Value) -> String {
    assert_eq!(v["error"]["code"], -32019, "escalated: {v}");
    let data = &v["error"]["data"];
    assert_eq!(data["status"], "pending", "{v}");
    assert_eq!(data["resume_header"], "X-IntentGate-Approval-Id", "{v}");
    data["pending_id"].as_str().expect("pending_id").to_owned()
}

async fn decide(tg_url: &str, admin: &str, id: &str, body: Value) -> (u16, Value) {
    http::post_json(
        &format!("{tg_url}/v1/admin/approvals/{id}/decide"),
        Some(admin),
        &body,
    )
    .await
}

async fn approvals(tg_url: &str, admin: &str, query: &str) -> Vec<Value> {
    let (status, v) = http::get_json(&format!("{tg_url}/v1/admin/approvals?{query}"), admin).await;
    assert_eq!(status, 200, "{v}");
    v["items"].as_array().cloned().unwrap_or_default()
}

/// Waits until the upstream's call log holds `n` calls with `marker` (it is written when the
/// tool runs), or a few seconds pass; returns the count.
async fn upstream_calls(up: &Upstream, marker: &str, n: usize) -> usize {
    let until = Instant::now() + Duration::from_secs(3);
    loop {
        let got = up.calls_with(marker).len();
        if got >= n || Instant::now() > until {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn audit_with(tg: &TestGateway, pending_id: &str) -> Vec<Value> {
    let (status, v) = http::get_json(
        &format!("{}/v1/admin/audit?tenant=default&limit=500", tg.url),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.to_string().contains(pending_id))
        .collect()
}

#[tokio::test]
async fn async_escalation_resumes_once_and_every_mismatch_is_refused_and_audited() {
    let up = Upstream::shared_async(Flavor::Json).await;
    let tg = start(Backend::Sqlite, up, &[]).await;
    let (token, _) = tg
        .mint(json!({"subject": "agent-a", "tools": ["delete_records", "echo"]}))
        .await;
    let m = marker("async");
    let v = call_with(&tg.url, &token, &call_body("delete_records", &m), &[]).await;
    let id = pending_of(&v).await;
    assert_eq!(
        upstream_calls(up, &m, 1).await,
        0,
        "not run before approval"
    );

    // The queue shows it with the original's fields.
    let rows = approvals(&tg.url, ADMIN_TOKEN, "status=pending").await;
    let row = rows
        .iter()
        .find(|r| r["pending_id"] == id.as_str())
        .unwrap_or_else(|| panic!("pending row in {rows:?}"));
    for field in [
        "tenant",
        "capability_token_id",
        "root_capability_token_id",
        "agent_id",
        "tool",
        "intent_summary",
        "reason",
        "status",
        "created_at",
        "requires_step_up",
        "args_digest",
        "bundle_digest",
        "expires_at",
    ] {
        assert!(row.get(field).is_some(), "{field} in {row}");
    }
    assert_eq!(row["tool"], "delete_records");
    assert_eq!(row["agent_id"], "agent-a");
    assert_eq!(row["requires_step_up"], true, "the demo policy asks for it");

    // Resuming before the decision: still pending (after a long-poll of `Prefer: wait=1`),
    // or at once with `respond-async`; nothing is decided or consumed.
    let resume = [("x-intentgate-approval-id", id.as_str())];
    for prefer in ["wait=1", "respond-async"] {
        let mut headers = resume.to_vec();
        headers.push(("prefer", prefer));
        let v = call_with(&tg.url, &token, &call_body("delete_records", &m), &headers).await;
        assert_eq!(pending_of(&v).await, id, "still pending ({prefer}): {v}");
    }

    let (status, d) = decide(
        &tg.url,
        ADMIN_TOKEN,
        &id,
        json!({"decision": "approve", "decided_by": "ops@example.com", "note": "ok"}),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["approval"]["status"], "approved");

    // Another tool, other arguments, another token of the same agent: refused, not consumed.
    let other_args = call_with(
        &tg.url,
        &token,
        &call_body("delete_records", "other"),
        &resume,
    )
    .await;
    assert_eq!(other_args["error"]["code"], -32012, "{other_args}");
    assert!(
        other_args.to_string().contains("other arguments"),
        "{other_args}"
    );
    let other_tool = call_with(&tg.url, &token, &call_body("echo", &m), &resume).await;
    assert_eq!(other_tool["error"]["code"], -32012, "{other_tool}");
    let (token2, _) = tg
        .mint(json!({"subject": "agent-a", "tools": ["delete_records"]}))
        .await;
    let other_token = call_with(&tg.url, &token2, &call_body("delete_records", &m), &resume).await;
    assert_eq!(other_token["error"]["code"], -32012, "{other_token}");
    assert!(
        other_token.to_string().contains("another token"),
        "{other_token}"
    );
    let (acme, _) = tg
        .mint(json!({"subject": "agent-a", "tenant": "acme", "tools": ["delete_records"]}))
        .await;
    let other_tenant = call_with(&tg.url, &acme, &call_body("delete_records", &m), &resume).await;
    assert_eq!(other_tenant["error"]["code"], -32012, "{other_tenant}");
    assert!(
        other_tenant.to_string().contains("unknown approval"),
        "{other_tenant}"
    );

    // The matching call runs, once.
    let v = call_with(&tg.url, &token, &call_body("delete_records", &m), &resume).await;
    assert!(v.get("result").is_some(), "approved call runs: {v}");
    assert_eq!(upstream_calls(up, &m, 1).await, 1);
    // And only once.
    let again = call_with(&tg.url, &token, &call_body("delete_records", &m), &resume).await;
    assert_eq!(again["error"]["code"], -32012, "{again}");
    assert!(again.to_string().contains("already used"), "{again}");
    assert_eq!(upstream_calls(up, &m, 2).await, 1, "a replay never runs");

    let rows = approvals(&tg.url, ADMIN_TOKEN, "status=consumed").await;
    assert!(
        rows.iter().any(|r| r["pending_id"] == id.as_str()),
        "{rows:?}"
    );

    // Every step is on the chain: escalation, decision, refusals, the consumption.
    let events = audit_with(&tg, &id).await;
    let has = |pred: &dyn Fn(&Value) -> bool, what: &str| {
        assert!(events.iter().any(pred), "{what} in {events:#?}");
    };
    has(&|e| e["decision"] == "escalate", "the escalation");
    has(
        &|e| {
            e["event"] == "intentgate.approval.decided"
                && e["decided_by"] == "ops@example.com"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("approved with credential superadmin"))
        },
        "the decision, with the credential that made it beside the claimed name",
    );
    has(
        &|e| e["decision"] == "allow" && e["event"] == "intentgate.tool_call",
        "the consumption",
    );
    let refusals = events
        .iter()
        .filter(|e| e["decision"] == "block" && e["check"] == "approval")
        .count();
    assert!(
        refusals >= 4,
        "mismatches and the replay are audited: {events:#?}"
    );
    tg.shutdown().await;
}

#[tokio::test]
async fn an_approved_id_expires() {
    let up = Upstream::shared_async(Flavor::Json).await;
    // Three seconds: the decision must land before the pending approval expires, and the
    // escalated call's synced commit on a loaded machine is part of that span.
    let tg = start(Backend::Sqlite, up, &["--approval-timeout-s", "3"]).await;
    let (token, _) = tg
        .mint(json!({"subject": "agent-e", "tools": ["delete_records"]}))
        .await;
    let m = marker("expiry");
    let id =
        pending_of(&call_with(&tg.url, &token, &call_body("delete_records", &m), &[]).await).await;
    let (status, d) = decide(
        &tg.url,
        ADMIN_TOKEN,
        &id,
        json!({"decision": "approve", "decided_by": "ops"}),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let resume = [("x-intentgate-approval-id", id.as_str())];
    let v = call_with(&tg.url, &token, &call_body("delete_records", &m), &resume).await;
    assert_eq!(v["error"]["code"], -32012, "{v}");
    assert!(v.to_string().contains("expired"), "{v}");
    assert_eq!(upstream_calls(up, &m, 1).await, 0);
    // Deciding an expired approval is a conflict, too.
    let id2 =
        pending_of(&call_with(&tg.url, &token, &call_body("delete_records", &m), &[]).await).await;
    tokio::time::sleep(Duration::from_millis(3300)).await;
    let (status, d) = decide(
        &tg.url,
        ADMIN_TOKEN,
        &id2,
        json!({"decision": "approve", "decided_by": "ops"}),
    )
    .await;
    assert_eq!(status, 409, "{d}");
    assert_eq!(d["current"]["status"], "expired", "{d}");
    // The sweep records the expiry on the chain.
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        let events = audit_with(&tg, &id2).await;
        if events.iter().any(|e| e["reason"] == "approval expired") {
            break;
        }
        assert!(Instant::now() < until, "expiry recorded: {events:#?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tg.shutdown().await;
}

#[tokio::test]
async fn deciding_is_scoped_single_and_not_by_the_agent_itself() {
    let up = Upstream::shared_async(Flavor::Json).await;
    let tg = start(Backend::Sqlite, up, &[]).await;
    let (token, _) = tg
        .mint(json!({"subject": "agent-d", "tools": ["delete_records"]}))
        .await;
    let id =
        pending_of(&call_with(&tg.url, &token, &call_body("delete_records", "x"), &[]).await).await;
    // Another tenant's admin: 404, as an unknown id.
    let acme = "acme-admin-token-0123456789";
    let (status, v) = decide(
        &tg.url,
        acme,
        &id,
        json!({"decision": "approve", "decided_by": "eve"}),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    assert!(
        approvals(&tg.url, acme, "status=all").await.is_empty(),
        "acme sees none of default's"
    );
    // The tenants listing counts what waits, per tenant.
    let (_, tenants) = http::get_json(&format!("{}/v1/admin/tenants", tg.url), ADMIN_TOKEN).await;
    let count = |t: &str| {
        tenants
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == t))
            .map(|x| x["pending_approvals"].clone())
    };
    assert_eq!(count("default"), Some(json!(1)), "{tenants}");
    assert_eq!(count("acme"), Some(json!(0)), "{tenants}");
    // Bad input.
    let (status, v) = decide(
        &tg.url,
        ADMIN_TOKEN,
        &id,
        json!({"decision": "maybe", "decided_by": "ops"}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    // Self-approval.
    let (status, v) = decide(
        &tg.url,
        ADMIN_TOKEN,
        &id,
        json!({"decision": "approve", "decided_by": "agent-d"}),
    )
    .await;
    assert_eq!(status, 403, "{v}");
    // Two deciders race: exactly one wins, the other gets 409 with the current row.
    let body_a = json!({"decision": "reject", "decided_by": "ops-1", "note": "no"});
    let body_b = json!({"decision": "approve", "decided_by": "ops-2"});
    let (a, b) = tokio::join!(
        decide(&tg.url, ADMIN_TOKEN, &id, body_a),
        decide(&tg.url, ADMIN_TOKEN, &id, body_b)
    );
    let mut statuses = [a.0, b.0];
    statuses.sort();
    assert_eq!(statuses, [200, 409], "{a:?} {b:?}");
    let loser = if a.0 == 409 { &a.1 } else { &b.1 };
    assert_eq!(loser["error"], "already decided");
    assert!(
        loser["current"]["status"] == "approved" || loser["current"]["status"] == "rejected",
        "{loser}"
    );
    tg.shutdown().await;
}

/// A held call (`Prefer: wait`) in a task; the caller decides it meanwhile.
async fn held(url: String, token: String, body: Value) -> tokio::task::JoinHandle<Value> {
    tokio::spawn(async move { call_with(&url, &token, &body, &[("prefer", "wait")]).await })
}

async fn wait_pending(url: &str, agent: &str) -> String {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = approvals(url, ADMIN_TOKEN, "status=pending&limit=500").await;
        if let Some(r) = rows.iter().find(|r| r["agent_id"] == agent) {
            return r["pending_id"].as_str().expect("id").to_owned();
        }
        assert!(Instant::now() < until, "no pending approval for {agent}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sync_holds_until_approved_rejected_or_timed_out() {
    let up = Upstream::shared_async(Flavor::Json).await;
    let tg = start(
        Backend::Sqlite,
        up,
        // Five seconds: the approved and rejected holds are decided within it after the
        // escalation's synced commit, which a loaded machine can stretch to a second or more.
        &[
            "--approval-timeout-s",
            "5",
            "--approval-keepalive-ms",
            "100",
        ],
    )
    .await;
    let (token, _) = tg
        .mint(json!({"subject": "agent-s", "tools": ["delete_records"]}))
        .await;
    // Approved: the held call completes, once.
    let m = marker("sync-ok");
    let task = held(
        tg.url.clone(),
        token.clone(),
        call_body("delete_records", &m),
    )
    .await;
    let id = wait_pending(&tg.url, "agent-s").await;
    tokio::time::sleep(Duration::from_millis(300)).await; // a few keep-alives go out
    let (status, d) = decide(
        &tg.url,
        ADMIN_TOKEN,
        &id,
        json!({"decision": "approve", "decided_by": "ops"}),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    let v = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("answered")
        .expect("task");
    assert!(v.get("result").is_some(), "approved held call runs: {v}");
    assert_eq!(upstream_calls(up, &m, 1).await, 1);

    // Rejected: the rejection, no upstream call.
    let m = marker("sync-no");
    let task = held(
        tg.url.clone(),
        token.clone(),
        call_body("delete_records", &m),
    )
    .await;
    let id = wait_pending(&tg.url, "agent-s").await;
    let (status, _) = decide(
        &tg.url,
        ADMIN_TOKEN,
        &id,
        json!({"decision": "reject", "decided_by": "ops", "note": "too risky"}),
    )
    .await;
    assert_eq!(status, 200);
    let v = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("answered")
        .expect("task");
    assert_eq!(v["error"]["code"], -32012, "{v}");
    assert_eq!(v["error"]["message"], "approval rejected", "{v}");
    assert_eq!(v["error"]["data"]["note"], "too risky", "{v}");
    assert_eq!(upstream_calls(up, &m, 1).await, 0);

    // Nobody decides: timed out, audited, no upstream call.
    let m = marker("sync-late");
    let task = held(
        tg.url.clone(),
        token.clone(),
        call_body("delete_records", &m),
    )
    .await;
    let id = wait_pending(&tg.url, "agent-s").await;
    let v = tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("answered")
        .expect("task");
    assert_eq!(v["error"]["code"], -32012, "{v}");
    assert_eq!(v["error"]["message"], "approval timed out", "{v}");
    assert_eq!(upstream_calls(up, &m, 1).await, 0);
    let events = audit_with(&tg, &id).await;
    assert!(
        events.iter().any(|e| e["reason"] == "approval timed out"),
        "{events:#?}"
    );
    tg.shutdown().await;
}

/// The same call escalated again joins its waiting approval instead of queueing it twice, and
/// a token tree may have at most 100 approvals waiting: past that an escalation is refused
/// (so one agent cannot bury the queue an operator reads).
#[tokio::test]
async fn an_escalation_joins_the_same_calls_approval_and_the_queue_is_bounded_per_token() {
    let up = Upstream::shared_async(Flavor::Json).await;
    let tg = start(Backend::Sqlite, up, &[]).await;
    let (token, _) = tg
        .mint(json!({"subject": "agent-again", "tools": ["delete_records"]}))
        .await;
    let escalate = |m: String| {
        let (url, token) = (tg.url.clone(), token.clone());
        async move { call_with(&url, &token, &call_body("delete_records", &m), &[]).await }
    };
    let m = marker("again");
    let first = pending_of(&escalate(m.clone()).await).await;
    let again = pending_of(&escalate(m.clone()).await).await;
    assert_eq!(first, again, "the same call joins its waiting approval");
    let mut ids = std::collections::HashSet::from([first.clone()]);
    for i in 1..100 {
        ids.insert(pending_of(&escalate(marker(&format!("again-{i}"))).await).await);
    }
    assert_eq!(ids.len(), 100, "other arguments are other approvals");
    let v = escalate(marker("one-too-many")).await;
    assert_eq!(v["error"]["code"], -32012, "{v}");
    assert!(v.to_string().contains("too many approvals waiting"), "{v}");
    // A call already waiting still joins its approval.
    assert_eq!(pending_of(&escalate(m).await).await, first);
    let rows = approvals(&tg.url, ADMIN_TOKEN, "status=pending&limit=500").await;
    let mine = rows
        .iter()
        .filter(|r| r["agent_id"] == "agent-again")
        .count();
    assert_eq!(mine, 100, "one row per waiting call");
    tg.shutdown().await;
}

/// Calls held for their approval take the tenant's share of connections held open, as live
/// streams do: past it a call is answered at once with its pending approval (`-32019`, to be
/// resumed), so one tenant's waiting calls cannot take every connection the gateway accepts.
#[tokio::test]
async fn held_calls_take_at_most_the_tenants_share_of_connections() {
    let up = Upstream::shared_async(Flavor::Json).await;
    // 8 connections: one tenant may hold 4 open.
    let tg = start(Backend::Sqlite, up, &["--max-connections", "8"]).await;
    let (token, _) = tg
        .mint(json!({"subject": "agent-share", "tools": ["delete_records"]}))
        .await;
    let mut tasks = Vec::new();
    for i in 0..4 {
        let m = marker(&format!("share-{i}"));
        tasks.push(
            held(
                tg.url.clone(),
                token.clone(),
                call_body("delete_records", &m),
            )
            .await,
        );
    }
    let until = Instant::now() + Duration::from_secs(10);
    while approvals(&tg.url, ADMIN_TOKEN, "status=pending&limit=500")
        .await
        .iter()
        .filter(|r| r["agent_id"] == "agent-share")
        .count()
        < 4
    {
        assert!(Instant::now() < until, "four held calls never pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The fifth asks to wait but is answered at once, pending.
    let m = marker("share-over");
    let v = tokio::time::timeout(
        Duration::from_secs(10),
        call_with(
            &tg.url,
            &token,
            &call_body("delete_records", &m),
            &[("prefer", "wait")],
        ),
    )
    .await
    .expect("answered at once, not held");
    let over = pending_of(&v).await;
    // Each held call is still waiting for its own decision; rejecting them frees the share.
    for row in approvals(&tg.url, ADMIN_TOKEN, "status=pending&limit=500").await {
        if row["agent_id"] == "agent-share" && row["pending_id"] != over.as_str() {
            let id = row["pending_id"].as_str().expect("id");
            let (s, d) = decide(
                &tg.url,
                ADMIN_TOKEN,
                id,
                json!({"decision": "reject", "decided_by": "ops"}),
            )
            .await;
            assert_eq!(s, 200, "{d}");
        }
    }
    for task in tasks {
        let v = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("answered")
            .expect("task");
        assert_eq!(v["error"]["message"], "approval rejected", "{v}");
    }
    // With the share free again, a call is held.
    let m = marker("share-again");
    let task = held(
        tg.url.clone(),
        token.clone(),
        call_body("delete_records", &m),
    )
    .await;
    let id = wait_pending(&tg.url, "agent-share").await;
    let id = if id == over {
        // The first pending row found may be the one answered at once; find the held one.
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let rows = approvals(&tg.url, ADMIN_TOKEN, "status=pending&limit=500").await;
            if let Some(r) = rows
                .iter()
                .find(|r| r["agent_id"] == "agent-share" && r["pending_id"] != over.as_str())
            {
                break r["pending_id"].as_str().expect("id").to_owned();
            }
            assert!(Instant::now() < until, "the call was not held");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    } else {
        id
    };
    let (s, _) = decide(
        &tg.url,
        ADMIN_TOKEN,
        &id,
        json!({"decision": "reject", "decided_by": "ops"}),
    )
    .await;
    assert_eq!(s, 200);
    let v = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("held, then answered")
        .expect("task");
    assert_eq!(v["error"]["message"], "approval rejected", "{v}");
    tg.shutdown().await;
}

/// The client connections `tg` has open, from its metrics read in process (a scrape over HTTP
/// would count itself).
fn connections_open(tg: &TestGateway) -> u64 {
    intentgate::metrics::collect::render(&tg.gw)
        .lines()
        .find_map(|l| l.strip_prefix("intentgate_connections_open "))
        .and_then(|v| v.trim().parse().ok())
        .expect("intentgate_connections_open")
}

#[tokio::test]
async fn a_client_that_left_never_runs_its_approved_call() {
    let up = Upstream::shared_async(Flavor::Json).await;
    let tg = start(Backend::Sqlite, up, &["--approval-keepalive-ms", "100"]).await;
    let (token, _) = tg
        .mint(json!({"subject": "agent-gone", "tools": ["delete_records"]}))
        .await;
    for accept in ["application/json, text/event-stream", "application/json"] {
        let m = marker("gone");
        let body = serde_json::to_vec(&call_body("delete_records", &m)).expect("json");
        let mut sock = std::net::TcpStream::connect(tg.addr).expect("connect");
        write!(
            sock,
            "POST /v1/mcp HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nAccept: {accept}\r\nPrefer: wait\r\nContent-Length: {}\r\n\r\n",
            tg.addr,
            body.len()
        )
        .expect("write");
        sock.write_all(&body).expect("body");
        let id = wait_pending(&tg.url, "agent-gone").await;
        drop(sock);
        // The gateway counts a connection open until it has dropped the connection's request
        // (and with it the held wait, or the held stream the wait watches): once none is open,
        // it has seen this client go, however slowly, and approving must not run the call.
        let until = Instant::now() + Duration::from_secs(10);
        while connections_open(&tg) > 0 {
            assert!(
                Instant::now() < until,
                "{accept}: the gateway still holds the gone client's connection"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (status, d) = decide(
            &tg.url,
            ADMIN_TOKEN,
            &id,
            json!({"decision": "approve", "decided_by": "ops"}),
        )
        .await;
        assert_eq!(status, 200, "{d}");
        assert_eq!(
            upstream_calls(up, &m, 1).await,
            0,
            "{accept}: the client had gone"
        );
        let rows = approvals(&tg.url, ADMIN_TOKEN, "status=approved").await;
        assert!(
            rows.iter().any(|r| r["pending_id"] == id.as_str()),
            "not consumed: {rows:?}"
        );
    }
    tg.shutdown().await;
}

#[tokio::test]
async fn a_decision_on_one_replica_releases_the_call_held_on_another() {
    let Ok(pg) = intentgate::testkit::PgServer::shared() else {
        panic!("PostgreSQL test server could not start");
    };
    let url = pg.fresh_database().expect("database");
    let up = Upstream::shared_async(Flavor::Json).await;
    // A poll far longer than the wait below: only the decision's `NOTIFY` can release the
    // held call in time (with the default 2 s poll, a call woken by the poll could pass).
    let slow_poll = ["--approval-poll-ms", "60000"];
    let a = start(Backend::Postgres(url.clone()), up, &slow_poll).await;
    let b = start(Backend::Postgres(url), up, &slow_poll).await;
    let (token, _) = a
        .mint(json!({"subject": "agent-r", "tools": ["delete_records", "echo"]}))
        .await;
    // A first call through `a` opens its connection to the upstream, so the span timed below
    // is the wake and the held call, not a first connect.
    let warm = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                      "params": {"name": "echo", "arguments": {"text": "warm"}}});
    let v = call_with(&a.url, &token, &warm, &[]).await;
    assert!(v.get("result").is_some(), "{v}");
    let m = marker("replicas");
    let task = held(
        a.url.clone(),
        token.clone(),
        call_body("delete_records", &m),
    )
    .await;
    let id = wait_pending(&b.url, "agent-r").await;
    let started = Instant::now();
    let (status, d) = decide(
        &b.url,
        ADMIN_TOKEN,
        &id,
        json!({"decision": "approve", "decided_by": "ops"}),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    let v = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("answered")
        .expect("task");
    assert!(v.get("result").is_some(), "{v}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "woken by NOTIFY, not the poll: {:?}",
        started.elapsed()
    );
    assert_eq!(upstream_calls(up, &m, 1).await, 1);
    // The consumed id is refused on the other replica too.
    let resume = [("x-intentgate-approval-id", id.as_str())];
    let again = call_with(&b.url, &token, &call_body("delete_records", &m), &resume).await;
    assert_eq!(again["error"]["code"], -32012, "{again}");
    a.shutdown().await;
    b.shutdown().await;
}

// --- kill -9 ---------------------------------------------------------------------------------

/// The gateway binary on `data`; returns the child and its URL (the caller kills and waits).
#[allow(clippy::zombie_processes)]
async fn binary(data: &std::path::Path, upstream: &str) -> (std::process::Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_intentgate"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("INTENTGATE_LOG_FORMAT", "json")
        .env("INTENTGATE_ADDR", "127.0.0.1:0")
        .env("INTENTGATE_DATA_DIR", data)
        .envs(crate::support::gateway::TEST_CHECK_DEADLINES_ENV)
        .env("INTENTGATE_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("INTENTGATE_MASTER_KEY", MASTER_KEY)
        .env("INTENTGATE_UPSTREAM_URL", upstream)
        .env(
            "INTENTGATE_POLICY_FILE",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../policies/examples/token_scope.rego"
            ),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the gateway binary");
    let lines = collect_lines(child.stdout.take().expect("stdout"));
    match listening_url(&mut child, &lines).await {
        Ok(url) => (child, url),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn pending_approvals_survive_kill_9_and_resume_once() {
    let up = Upstream::shared_async(Flavor::Json).await;
    let data = tempfile::tempdir().expect("tempdir");
    let (mut child, url) = binary(data.path(), &up.url).await;
    let (status, minted) = http::post_json(
        &format!("{url}/v1/admin/mint"),
        Some(ADMIN_TOKEN),
        &json!({"subject": "agent-k", "tools": ["delete_records"]}),
    )
    .await;
    assert_eq!(status, 200, "{minted}");
    let token = minted["token"].as_str().expect("token").to_owned();
    let m = marker("kill9");
    let mut ids = Vec::new();
    for i in 0..5 {
        let v = call_with(
            &url,
            &token,
            &call_body("delete_records", &format!("{m}-{i}")),
            &[],
        )
        .await;
        ids.push(pending_of(&v).await);
    }
    child.kill().expect("SIGKILL");
    let _ = child.wait();

    let (mut child, url) = binary(data.path(), &up.url).await;
    let rows = approvals(&url, ADMIN_TOKEN, "status=pending&limit=500").await;
    for id in &ids {
        let n = rows
            .iter()
            .filter(|r| r["pending_id"] == id.as_str())
            .count();
        assert_eq!(n, 1, "{id} survived exactly once: {rows:?}");
    }
    let (status, d) = decide(
        &url,
        ADMIN_TOKEN,
        &ids[0],
        json!({"decision": "approve", "decided_by": "ops"}),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    let resume = [("x-intentgate-approval-id", ids[0].as_str())];
    let body = call_body("delete_records", &format!("{m}-0"));
    let v = call_with(&url, &token, &body, &resume).await;
    assert!(v.get("result").is_some(), "{v}");
    let again = call_with(&url, &token, &body, &resume).await;
    assert_eq!(again["error"]["code"], -32012, "{again}");
    assert_eq!(upstream_calls(up, &format!("{m}-0"), 1).await, 1);
    child.kill().expect("SIGKILL");
    let _ = child.wait();
}

// --- agents resuming with real clients ----------------------------------------------------------

/// Runs `tests/interop/approval_agent.py MODE` in the background; its one JSON line when done.
fn agent(mode: &str, url: &str, token: &str, table: &str) -> tokio::task::JoinHandle<Value> {
    let mut cmd = Command::new(crate::interop::python());
    cmd.arg(crate::interop::interop_dir().join("approval_agent.py"))
        .args([mode, "--gateway", url, "--token", token, "delete_records"])
        .arg(json!({"table": table}).to_string())
        .stdin(Stdio::null());
    tokio::task::spawn_blocking(move || {
        let out = cmd.output().expect("the agent ran");
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_else(|_| {
            panic!(
                "agent printed no JSON: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    })
}

#[tokio::test]
async fn agents_with_the_official_client_and_plain_http_resume_after_approval() {
    let up = Upstream::shared_async(Flavor::Json).await;
    let tg = start(Backend::Sqlite, up, &[]).await;
    for mode in ["mcp", "http", "modern"] {
        let subject = format!("agent-{mode}");
        let (token, _) = tg
            .mint(json!({"subject": subject, "tools": ["delete_records"]}))
            .await;
        // Approved: the agent's call runs once.
        let m = marker(mode);
        let task = agent(mode, &tg.url, &token, &m);
        let id = wait_pending(&tg.url, &subject).await;
        tokio::time::sleep(Duration::from_millis(500)).await; // the agent is resuming
        let (status, d) = decide(
            &tg.url,
            ADMIN_TOKEN,
            &id,
            json!({"decision": "approve", "decided_by": "ops"}),
        )
        .await;
        assert_eq!(status, 200, "{d}");
        let out = task.await.expect("agent");
        assert_eq!(out["ok"], true, "{mode}: {out}");
        assert!(out["text"].to_string().contains(&m), "{mode}: {out}");
        assert_eq!(upstream_calls(up, &m, 1).await, 1, "{mode}");
        // Rejected: the agent learns it, the call never runs.
        let m = marker(mode);
        let task = agent(mode, &tg.url, &token, &m);
        let id = wait_pending(&tg.url, &subject).await;
        let (status, _) = decide(
            &tg.url,
            ADMIN_TOKEN,
            &id,
            json!({"decision": "reject", "decided_by": "ops"}),
        )
        .await;
        assert_eq!(status, 200);
        let out = task.await.expect("agent");
        assert_eq!(out["ok"], false, "{mode}: {out}");
        assert!(out.to_string().contains("rejected"), "{mode}: {out}");
        assert_eq!(upstream_calls(up, &m, 1).await, 0, "{mode}");
    }
    tg.shutdown().await;
}

#[tokio::test]
async fn a_step_up_the_token_lacks_is_asked_of_a_person_and_recorded() {
    let up = Upstream::shared_async(Flavor::Json).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("step_up.rego");
    std::fs::write(
        &policy,
        r#"package intentgate.policy

decision := {"allow": true, "requires_step_up": true, "reason": "payments need a fresh factor"} if {
	input.tool == "delete_records"
} else := {"allow": true, "reason": "ok"}
"#,
    )
    .expect("policy");
    let policy = policy.display().to_string();
    let tg = start(Backend::Sqlite, up, &["--policy-file", &policy]).await;
    // Without a step-up: an approval marked step_up, not a run.
    let (plain, _) = tg
        .mint(json!({"subject": "agent-su", "tools": ["delete_records"]}))
        .await;
    let m = marker("stepup");
    let v = call_with(&tg.url, &plain, &call_body("delete_records", &m), &[]).await;
    let id = pending_of(&v).await;
    assert_eq!(v["error"]["data"]["requires_step_up"], true, "{v}");
    assert!(v.to_string().contains("step-up required"), "{v}");
    let rows = approvals(&tg.url, ADMIN_TOKEN, "status=pending").await;
    let row = rows
        .iter()
        .find(|r| r["pending_id"] == id.as_str())
        .expect("row");
    assert_eq!(row["requires_step_up"], true);
    assert_eq!(upstream_calls(up, &m, 1).await, 0);
    // Approved by a person: the same call runs once, and the chain says a step-up was asked.
    let (status, d) = decide(
        &tg.url,
        ADMIN_TOKEN,
        &id,
        json!({"decision": "approve", "decided_by": "ops"}),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    let resume = [("x-intentgate-approval-id", id.as_str())];
    let v = call_with(&tg.url, &plain, &call_body("delete_records", &m), &resume).await;
    assert!(v.get("result").is_some(), "{v}");
    assert_eq!(upstream_calls(up, &m, 1).await, 1);
    let events = audit_with(&tg, &id).await;
    assert!(
        events
            .iter()
            .any(|e| e["decision"] == "escalate" && e["requires_step_up"] == true),
        "{events:#?}"
    );
    // A token minted with a step-up runs without a person, and so does a child of it.
    let (stepped, _) = tg
        .mint(json!({"subject": "agent-su", "tools": ["delete_records"], "step_up": true}))
        .await;
    let m = marker("stepped");
    let v = call_with(&tg.url, &stepped, &call_body("delete_records", &m), &[]).await;
    assert!(v.get("result").is_some(), "{v}");
    assert_eq!(upstream_calls(up, &m, 1).await, 1);
    let child = attenuated(&stepped, intentgate::capability::Caveat::bare("exp"), |c| {
        c.exp = 4_000_000_000;
    });
    let m = marker("stepped-child");
    let v = call_with(&tg.url, &child, &call_body("delete_records", &m), &[]).await;
    assert!(v.get("result").is_some(), "{v}");
    assert_eq!(upstream_calls(up, &m, 1).await, 1);
    // A step-up its holder appended is no step-up: the call still waits for a person, and
    // nothing reached the upstream.
    let forged = attenuated(
        &plain,
        intentgate::capability::Caveat::bare("step_up"),
        |c| {
            c.step_up_at = 1;
        },
    );
    let m = marker("forged-step-up");
    let v = call_with(&tg.url, &forged, &call_body("delete_records", &m), &[]).await;
    assert_eq!(v["error"]["code"], -32019, "{v}");
    assert_eq!(v["error"]["data"]["requires_step_up"], true, "{v}");
    assert_eq!(upstream_calls(up, &m, 0).await, 0);
    tg.shutdown().await;
}

#[tokio::test]
async fn the_policy_decision_chooses_how_its_escalation_is_answered() {
    let up = Upstream::shared_async(Flavor::Json).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("modes.rego");
    std::fs::write(
        &policy,
        r#"package intentgate.policy

decision := {"allow": false, "escalate": true, "reason": "hold it", "approval_mode": "sync"} if {
	input.tool == "delete_records"
} else := {"allow": false, "escalate": true, "reason": "ask later", "approval_mode": "async"} if {
	input.tool == "send_email"
} else := {"allow": true, "reason": "ok"}
"#,
    )
    .expect("policy");
    let policy = policy.display().to_string();
    // The gateway's default is the opposite of each decision's mode.
    for default in ["async", "sync"] {
        let tg = start(
            Backend::Sqlite,
            up,
            &["--policy-file", &policy, "--approval-mode", default],
        )
        .await;
        let agent = format!("agent-mode-{default}");
        let (token, _) = tg
            .mint(json!({"subject": agent, "tools": ["delete_records", "send_email"]}))
            .await;
        // "sync" from the policy: held without any Prefer header, then run once approved.
        let m = marker("policy-sync");
        let url = tg.url.clone();
        let (t2, body) = (token.clone(), call_body("delete_records", &m));
        let task = tokio::spawn(async move { call_with(&url, &t2, &body, &[]).await });
        let id = wait_pending(&tg.url, &agent).await;
        let (status, _) = decide(
            &tg.url,
            ADMIN_TOKEN,
            &id,
            json!({"decision": "approve", "decided_by": "ops"}),
        )
        .await;
        assert_eq!(status, 200);
        let v = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("answered")
            .expect("task");
        assert!(
            v.get("result").is_some(),
            "default {default}: held then run: {v}"
        );
        assert_eq!(upstream_calls(up, &m, 1).await, 1);
        // "async" from the policy: answered at once, even when the gateway holds by default.
        let v = tokio::time::timeout(
            Duration::from_secs(5),
            call_with(
                &tg.url,
                &token,
                &json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call",
                "params": {"name": "send_email", "arguments": {"to": "a@b", "body": "x"}}}),
                &[],
            ),
        )
        .await
        .expect("answered at once");
        pending_of(&v).await;
        tg.shutdown().await;
    }
}

/// `token` with one more caveat appended by its holder (no master key), as `set` fills it.
fn attenuated(
    token: &str,
    mut caveat: intentgate::capability::Caveat,
    set: impl FnOnce(&mut intentgate::capability::Caveat),
) -> String {
    set(&mut caveat);
    intentgate::capability::Token::decode(token)
        .expect("decode")
        .attenuate(caveat)
        .expect("attenuate")
        .encode()
}

/// A call held for its approval is decided again when approved, with its token as it is then:
/// revoked meanwhile, it is refused and never reaches the upstream.
#[tokio::test]
async fn a_held_call_whose_token_was_revoked_meanwhile_does_not_run() {
    let up = Upstream::shared_async(Flavor::Json).await;
    let tg = start(Backend::Sqlite, up, &["--approval-timeout-s", "30"]).await;
    let (token, jti) = tg
        .mint(json!({"subject": "agent-rv", "tools": ["delete_records"]}))
        .await;
    let m = marker("revoked-while-held");
    let task = held(
        tg.url.clone(),
        token.clone(),
        call_body("delete_records", &m),
    )
    .await;
    let id = wait_pending(&tg.url, "agent-rv").await;
    let (status, v) = http::post_json(
        &format!("{}/v1/admin/revoke", tg.url),
        Some(ADMIN_TOKEN),
        &json!({"jti": jti, "reason": "compromised"}),
    )
    .await;
    assert_eq!(status, 204, "{v}");
    let (status, d) = decide(
        &tg.url,
        ADMIN_TOKEN,
        &id,
        json!({"decision": "approve", "decided_by": "ops"}),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    let v = tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .expect("answered")
        .expect("task");
    assert_eq!(v["error"]["code"], -32010, "{v}");
    assert!(v.to_string().contains("revoked"), "{v}");
    // Given time to arrive, had it been sent.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(up.calls_with(&m).len(), 0);
    tg.shutdown().await;
}

/// Drafts `spec` as a bundle of the default tenant and promotes it.
async fn promote_spec(tg: &TestGateway, name: &str, spec: Value) {
    let (status, created) = http::post_json(
        &format!("{}/v1/admin/bundles", tg.url),
        Some(ADMIN_TOKEN),
        &json!({"name": name, "spec": spec}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let digest = created["digest"].as_str().expect("digest");
    let (status, v) = http::post_json(
        &format!("{}/v1/admin/bundles/{digest}/promote", tg.url),
        Some(ADMIN_TOKEN),
        &json!({}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
}

/// A step-up asked for by a budget-stage check (not only the policy's) holds: without one on
/// the token the call goes to a person, marked as a step-up, and runs once approved.
#[tokio::test]
async fn a_budget_checks_step_up_is_asked_of_a_person() {
    let up = Upstream::shared_async(Flavor::Json).await;
    let tg = start(Backend::Sqlite, up, &[]).await;
    let (token, _) = tg
        .mint(json!({"subject": "agent-b", "tools": ["echo"]}))
        .await;
    let wasm =
        std::fs::read(intentgate::plugins::artifacts::TEST_HOSTILE_PATH).expect("hostile artifact");
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let (status, _, uploaded) = http::send(
        "POST",
        &format!("{}/v1/admin/plugins?name=step-up", tg.url),
        &[
            ("authorization", &auth),
            ("content-type", "application/wasm"),
        ],
        wasm,
    )
    .await;
    let uploaded: Value = serde_json::from_slice(&uploaded).expect("json");
    assert_eq!(status, 201, "{uploaded}");
    let mut spec = serde_json::to_value(tg.gw.pipeline.registry().default_spec()).expect("spec");
    spec["stages"]["budget"]
        .as_array_mut()
        .expect("budget stage")
        .push(json!({"component": uploaded["digest"], "config": "step-up"}));
    promote_spec(&tg, "budget-step-up", spec).await;

    let m = marker("budget-step-up");
    let body = json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call",
                      "params": {"name": "echo", "arguments": {"text": m}}});
    let v = call_with(&tg.url, &token, &body, &[]).await;
    let id = pending_of(&v).await;
    assert_eq!(v["error"]["data"]["requires_step_up"], true, "{v}");
    assert!(v.to_string().contains("step-up required"), "{v}");
    assert_eq!(
        upstream_calls(up, &m, 1).await,
        0,
        "not run before approval"
    );
    let (status, d) = decide(
        &tg.url,
        ADMIN_TOKEN,
        &id,
        json!({"decision": "approve", "decided_by": "ops"}),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    let resume = [("x-intentgate-approval-id", id.as_str())];
    let v = call_with(&tg.url, &token, &body, &resume).await;
    assert!(v.get("result").is_some(), "{v}");
    assert_eq!(upstream_calls(up, &m, 1).await, 1);
    tg.shutdown().await;
}

/// An escalation by the intent check, not only the policy's, goes to a person: the call is
/// pending (`check: intent`, `decision: escalate`), runs once approved (the intent check's
/// escalation answered, the later checks run again), and is counted as the intent's. An
/// approval answers its own check's question only.
#[tokio::test]
async fn an_intent_escalation_waits_for_a_person_like_the_policys() {
    let up = Upstream::shared_async(Flavor::Json).await;
    let tg = start(Backend::Sqlite, up, &[]).await;
    let (token, _) = tg
        .mint(json!({"subject": "agent-i", "tools": ["echo", "delete_records"]}))
        .await;
    // Reading is all an agent that says it reads may do; anything else goes to a person.
    let mut spec = serde_json::to_value(tg.gw.pipeline.registry().default_spec()).expect("spec");
    spec["stages"]["intent"][0]["config"] = Value::from(
        json!({"rules": [{"name": "reading", "keywords": ["read"], "summary": "reading",
                          "allowed_tools": ["read_*"]}],
               "on_outside_allowed": "escalate"})
        .to_string(),
    );
    promote_spec(&tg, "intent-escalates", spec).await;

    let m = marker("intent");
    let body = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                      "params": {"name": "echo", "arguments": {"text": m}}});
    let prompt = ("x-intent-prompt", "read the invoices of March");
    let v = call_with(&tg.url, &token, &body, &[prompt]).await;
    let id = pending_of(&v).await;
    assert_eq!(
        upstream_calls(up, &m, 1).await,
        0,
        "not run before approval"
    );
    let events = audit_with(&tg, &id).await;
    let escalated = events
        .iter()
        .find(|e| e["decision"] == "escalate")
        .unwrap_or_else(|| panic!("the escalation in {events:?}"));
    assert_eq!(escalated["check"], "intent", "{escalated}");
    let rows = approvals(&tg.url, ADMIN_TOKEN, "status=pending").await;
    let row = rows
        .iter()
        .find(|r| r["pending_id"] == id.as_str())
        .unwrap_or_else(|| panic!("pending row in {rows:?}"));
    assert_eq!(row["requires_step_up"], false, "{row}");
    assert_eq!(row["intent_summary"], "reading", "{row}");

    let (status, d) = decide(
        &tg.url,
        ADMIN_TOKEN,
        &id,
        json!({"decision": "approve", "decided_by": "ops@example.com"}),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    let resume = [prompt, ("x-intentgate-approval-id", id.as_str())];
    let v = call_with(&tg.url, &token, &body, &resume).await;
    assert!(v["result"].is_object(), "approved: {v}");
    assert_eq!(upstream_calls(up, &m, 1).await, 1, "run once");
    let again = call_with(&tg.url, &token, &body, &resume).await;
    assert_eq!(again["error"]["code"], -32012, "single use: {again}");
    assert_eq!(upstream_calls(up, &m, 2).await, 1, "not run twice");

    // A call two checks ask about: approving the intent check's question answers that one
    // only; the policy (which sends delete_records to a person) asks its own, and the call
    // runs once that one is approved too.
    let m = marker("both");
    let first = call_with(&tg.url, &token, &call_body("delete_records", &m), &[prompt]).await;
    let asked_by_intent = pending_of(&first).await;
    let (status, d) = decide(
        &tg.url,
        ADMIN_TOKEN,
        &asked_by_intent,
        json!({"decision": "approve", "decided_by": "ops@example.com"}),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["approval"]["escalated_by"], json!(["intent"]), "{d}");
    let resume = [
        prompt,
        ("x-intentgate-approval-id", asked_by_intent.as_str()),
    ];
    let second = call_with(&tg.url, &token, &call_body("delete_records", &m), &resume).await;
    let asked_by_policy = pending_of(&second).await;
    assert_ne!(asked_by_policy, asked_by_intent, "{second}");
    // The intent check's approval was used up by the call that went on to the policy's
    // question: left approved, it would run the call again once the policy allowed it.
    let reused = call_with(&tg.url, &token, &call_body("delete_records", &m), &resume).await;
    assert_eq!(reused["error"]["code"], -32012, "used up: {reused}");
    let rows = approvals(&tg.url, ADMIN_TOKEN, "status=consumed").await;
    assert!(
        rows.iter()
            .any(|r| r["pending_id"] == asked_by_intent.as_str()),
        "{rows:?}"
    );
    assert_eq!(
        upstream_calls(up, &m, 1).await,
        0,
        "the policy's question is open"
    );
    let events = audit_with(&tg, &asked_by_policy).await;
    assert!(
        events
            .iter()
            .any(|e| e["decision"] == "escalate" && e["check"] == "policy"),
        "{events:?}"
    );
    let (status, d) = decide(
        &tg.url,
        ADMIN_TOKEN,
        &asked_by_policy,
        json!({"decision": "approve", "decided_by": "ops@example.com"}),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(
        d["approval"]["escalated_by"],
        json!(["intent", "policy"]),
        "{d}"
    );
    let resume = [
        prompt,
        ("x-intentgate-approval-id", asked_by_policy.as_str()),
    ];
    let third = call_with(&tg.url, &token, &call_body("delete_records", &m), &resume).await;
    assert!(third["result"].is_object(), "both answered: {third}");
    assert_eq!(upstream_calls(up, &m, 1).await, 1, "run once");

    let auth = format!("Bearer {ADMIN_TOKEN}");
    let (status, _, metrics) = http::send(
        "GET",
        &format!("{}/metrics", tg.url),
        &[("authorization", &auth)],
        Vec::new(),
    )
    .await;
    assert_eq!(status, 200);
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("intentgate_decisions_total{")
                && l.contains("check=\"intent\"")
                && l.contains("outcome=\"escalate\"")),
        "{metrics}"
    );
    tg.shutdown().await;
}

/// A call held for its approval in a session the client then ends (`DELETE`) runs nothing
/// when approved: the session is gone, as for every other request naming it.
#[tokio::test]
async fn a_held_call_of_an_ended_session_does_not_run_when_approved() {
    let up = Upstream::shared_async(Flavor::Json).await;
    let tg = start(Backend::Sqlite, up, &[]).await;
    let (token, _) = tg
        .mint(json!({"subject": "agent-e", "tools": ["delete_records"]}))
        .await;
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"}}});
    let auth = format!("Bearer {token}");
    let (status, h, body) = http::send(
        "POST",
        &format!("{}/v1/mcp", tg.url),
        &[
            ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream"),
            ("authorization", &auth),
        ],
        serde_json::to_vec(&init).expect("json"),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let sid = h
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .expect("session")
        .to_owned();
    let m = marker("ended");
    let (url, tok, s, table) = (tg.url.clone(), token.clone(), sid.clone(), m.clone());
    let task = tokio::spawn(async move {
        let headers = [("prefer", "wait"), ("mcp-session-id", s.as_str())];
        call_with(&url, &tok, &call_body("delete_records", &table), &headers).await
    });
    let id = wait_pending(&tg.url, "agent-e").await;
    let (status, _, _) = http::send(
        "DELETE",
        &format!("{}/v1/mcp", tg.url),
        &[("authorization", &auth), ("mcp-session-id", &sid)],
        Vec::new(),
    )
    .await;
    assert_eq!(status, 204);
    let (status, d) = decide(
        &tg.url,
        ADMIN_TOKEN,
        &id,
        json!({"decision": "approve", "decided_by": "ops@example.com"}),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    let v = task.await.expect("join");
    assert_eq!(v["error"]["code"], -32012, "{v}");
    assert!(v.to_string().contains("session that has ended"), "{v}");
    assert_eq!(upstream_calls(up, &m, 1).await, 0);
    tg.shutdown().await;
}
