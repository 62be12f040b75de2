//! The gateway as a whole, over HTTP: authentication of every method, tool filtering, typed
//! errors, bad input that must not hurt the server, admin scoping, and durable decisions.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::gateway::{self, ADMIN_TOKEN, Backend, TestGateway};
use crate::support::http::{get_json, post_json, send};

async fn demo_gateway(extra: &[&str]) -> TestGateway {
    let mut flags = vec!["--demo"];
    flags.extend_from_slice(extra);
    gateway::start(Backend::Sqlite, None, &flags).await
}

async fn rpc(tg: &TestGateway, token: &str, body: Value) -> (u16, Value) {
    post_json(&format!("{}/v1/mcp", tg.url), Some(token), &body).await
}

fn err_code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error: {v}"))
}

#[tokio::test]
async fn allow_deny_and_filtered_listing() {
    let tg = demo_gateway(&[]).await;
    let (token, _) = tg
        .mint(json!({"subject": "alice", "tools": ["read_*", "echo"], "ttl_seconds": 600}))
        .await;
    let (_, list) = rpc(
        &tg,
        &token,
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
    )
    .await;
    let mut names: Vec<&str> = list["result"]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .map(|t| t["name"].as_str().expect("name"))
        .collect();
    names.sort();
    assert_eq!(names, ["echo", "read_invoice"]);

    let ok = tg.tool_call(&token, "echo", json!({"text": "hi"})).await;
    assert_eq!(ok["result"]["content"][0]["text"], "hi", "{ok}");
    assert!(
        ok["result"].get("_intentgate").is_none(),
        "not annotated by default: {ok}"
    );

    let denied = tg
        .tool_call(&token, "delete_records", json!({"table": "t"}))
        .await;
    assert_eq!(err_code(&denied), -32010, "{denied}");
    assert!(
        denied["error"]["data"]
            .as_str()
            .expect("reason")
            .contains("delete_records")
    );

    // Both decisions are in the audit chain, and the chain verifies.
    let (_, audit) = get_json(
        &format!("{}/v1/admin/audit?tool=delete_records", tg.url),
        ADMIN_TOKEN,
    )
    .await;
    let items = audit["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{audit}");
    assert_eq!(items[0]["decision"], "block");
    let (_, verify) = get_json(
        &format!("{}/v1/admin/audit/verify?tenant=default", tg.url),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(verify["ok"], true, "{verify}");
    tg.shutdown().await;
}

#[tokio::test]
async fn every_method_is_authenticated() {
    let tg = demo_gateway(&[]).await;
    for method in ["initialize", "ping", "tools/list", "tools/call"] {
        let body = json!({"jsonrpc": "2.0", "id": 9, "method": method, "params": {}});
        let (status, v) = post_json(&format!("{}/v1/mcp", tg.url), None, &body).await;
        assert_eq!((status, err_code(&v)), (200, -32010), "{method}: {v}");
        let (_, v) = rpc(&tg, "not-a-token", body).await;
        assert_eq!(err_code(&v), -32010, "{method}: {v}");
    }
    let (status, _) = post_json(
        &format!("{}/v1/mcp", tg.url),
        None,
        &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    )
    .await;
    assert_eq!(status, 401);
    tg.shutdown().await;
}

#[tokio::test]
async fn sessions_are_bound_to_their_token() {
    let tg = demo_gateway(&[]).await;
    let (alice, _) = tg.mint(json!({"subject": "alice"})).await;
    let (bob, _) = tg.mint(json!({"subject": "bob"})).await;
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let auth = format!("Bearer {alice}");
    let (status, headers, body) = send(
        "POST",
        &format!("{}/v1/mcp", tg.url),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        serde_json::to_vec(&init).expect("json"),
    )
    .await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["result"]["protocolVersion"], "2025-06-18");
    let sid = headers["mcp-session-id"].to_str().expect("sid").to_owned();

    let ping =
        serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": 2, "method": "ping"})).expect("json");
    let with = |token: &str, sid: &str| {
        let auth = format!("Bearer {token}");
        let sid = sid.to_owned();
        let url = format!("{}/v1/mcp", tg.url);
        let ping = ping.clone();
        async move {
            send(
                "POST",
                &url,
                &[("authorization", &auth), ("mcp-session-id", &sid)],
                ping,
            )
            .await
            .0
        }
    };
    assert_eq!(with(&alice, &sid).await, 200);
    assert_eq!(
        with(&bob, &sid).await,
        404,
        "another token cannot ride the session"
    );
    assert_eq!(with(&alice, "forged-session").await, 404);
    tg.shutdown().await;
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_server_keeps_serving() {
    let tg = demo_gateway(&["--max-body-bytes", "4096", "--header-timeout-ms", "300"]).await;
    let (token, _) = tg
        .mint(json!({"subject": "alice", "tools": ["echo"]}))
        .await;
    let auth = format!("Bearer {token}");
    let url = format!("{}/v1/mcp", tg.url);
    let post = |body: Vec<u8>| {
        let (url, auth) = (url.clone(), auth.clone());
        async move { send("POST", &url, &[("authorization", &auth)], body).await }
    };
    let code_of =
        |b: &[u8]| err_code(&serde_json::from_slice::<Value>(b).expect("json error body"));

    let (s, _, b) = post(b"{not json".to_vec()).await;
    assert_eq!((s, code_of(&b)), (400, -32700));
    let (s, _, b) = post(br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#.to_vec()).await;
    assert_eq!((s, code_of(&b)), (400, -32600));
    let (s, _, b) = post(br#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#.to_vec()).await;
    assert_eq!((s, code_of(&b)), (400, -32600));
    let (s, _, b) =
        post(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":7}}"#.to_vec())
            .await;
    assert_eq!((s, code_of(&b)), (200, -32602));
    let (s, _, b) = post(br#"{"jsonrpc":"2.0","id":1,"method":"no/such_method"}"#.to_vec()).await;
    assert_eq!((s, code_of(&b)), (200, -32601));
    let (s, _, b) = post(vec![b' '; 10_000]).await;
    assert_eq!((s, code_of(&b)), (413, -32600));
    let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
    let (s, _, b) = post(deep.into_bytes()).await;
    assert_eq!((s, code_of(&b)), (400, -32600));
    let (s, _, b) = post(vec![0xff, 0xfe, 0x00]).await;
    assert_eq!((s, code_of(&b)), (400, -32700));

    // A client that never finishes its headers is cut off by the header read timeout.
    let mut slow = tokio::net::TcpStream::connect(tg.addr)
        .await
        .expect("connect");
    slow.write_all(b"POST /v1/mcp HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "slow-header connection must be closed by the server"
    );

    // Still serving.
    let ok = tg
        .tool_call(&token, "echo", json!({"text": "still here"}))
        .await;
    assert_eq!(ok["result"]["content"][0]["text"], "still here", "{ok}");
    tg.shutdown().await;
}

#[tokio::test]
async fn revoked_and_limited_tokens_are_refused() {
    let tg = demo_gateway(&[]).await;
    let (token, jti) = tg
        .mint(json!({"subject": "alice", "tools": ["echo"], "max_calls": 2}))
        .await;
    for _ in 0..2 {
        let ok = tg.tool_call(&token, "echo", json!({"text": "x"})).await;
        assert!(ok.get("result").is_some(), "{ok}");
    }
    let third = tg.tool_call(&token, "echo", json!({"text": "x"})).await;
    assert_eq!(err_code(&third), -32013, "{third}");
    // A denied call (outside scope) is not charged; a second token is unaffected.
    let (other, _) = tg
        .mint(json!({"subject": "alice", "tools": ["echo"], "max_calls": 1}))
        .await;
    let denied = tg.tool_call(&other, "send_email", json!({})).await;
    assert_eq!(err_code(&denied), -32010);
    let ok = tg.tool_call(&other, "echo", json!({"text": "x"})).await;
    assert!(
        ok.get("result").is_some(),
        "blocked calls must not be charged: {ok}"
    );

    let (status, _) = post_json(
        &format!("{}/v1/admin/revoke", tg.url),
        Some(ADMIN_TOKEN),
        &json!({"jti": jti, "reason": "test"}),
    )
    .await;
    assert_eq!(status, 204);
    let revoked = tg.tool_call(&token, "echo", json!({"text": "x"})).await;
    assert_eq!(err_code(&revoked), -32010);
    assert!(
        revoked["error"]["data"]
            .as_str()
            .expect("reason")
            .contains("revoked"),
        "{revoked}"
    );
    tg.shutdown().await;
}

#[tokio::test]
async fn tenant_admins_stay_in_their_tenant() {
    let tg = demo_gateway(&[
        "--tenant-admins",
        "acme:acme-admin-token-123456,globex:globex-admin-token-12345",
    ])
    .await;
    let url = |p: &str| format!("{}{p}", tg.url);
    let (s, v) = post_json(
        &url("/v1/admin/mint"),
        Some("acme-admin-token-123456"),
        &json!({"subject": "bot", "tenant": "globex"}),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    assert!(v["error"].is_string());
    let (s, v) = post_json(
        &url("/v1/admin/mint"),
        Some("acme-admin-token-123456"),
        &json!({"subject": "bot"}),
    )
    .await;
    assert_eq!((s, v["tenant"].as_str()), (200, Some("acme")), "{v}");
    let acme_jti = v["jti"].as_str().expect("jti").to_owned();
    // globex's admin cannot revoke acme's token.
    let (s, _) = post_json(
        &url("/v1/admin/revoke"),
        Some("globex-admin-token-12345"),
        &json!({"jti": acme_jti}),
    )
    .await;
    assert_eq!(s, 403);
    let (s, v) = get_json(&url("/v1/admin/tenants"), "acme-admin-token-123456").await;
    assert_eq!(
        (s, v),
        (200, json!([{"name": "acme", "pending_approvals": 0}]))
    );
    let (s, _) = get_json(
        &url("/v1/admin/revocations?tenant=globex"),
        "acme-admin-token-123456",
    )
    .await;
    assert_eq!(s, 403);
    let (s, _) = get_json(&url("/v1/admin/tenants"), "wrong-token").await;
    assert_eq!(s, 401);
    let (s, v) = post_json(
        &url("/v1/admin/mint"),
        Some(ADMIN_TOKEN),
        &json!({"subject": ""}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    tg.shutdown().await;
}

#[tokio::test]
async fn upstream_failures_are_not_authorization_blocks() {
    // An upstream that refuses connections.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let dead_url = format!("http://{}/mcp", dead.local_addr().expect("addr"));
    drop(dead);
    let tg = gateway::start(
        Backend::Sqlite,
        Some(&dead_url),
        &["--upstream-timeout-ms", "500"],
    )
    .await;
    let (token, _) = tg
        .mint(json!({"subject": "alice", "tools": ["echo"]}))
        .await;
    let v = tg.tool_call(&token, "echo", json!({})).await;
    assert_eq!(err_code(&v), -32018, "{v}");
    assert_eq!(v["error"]["data"]["upstream_status"], 0);
    tg.shutdown().await;
}

#[tokio::test]
async fn raw_wasm_uploads_are_not_checked_as_json() {
    let tg = demo_gateway(&[]).await;
    // A component whose bytes hold more `[` than the JSON depth limit: judged as a component
    // (422 here, it is not a valid one), never refused as "JSON nesting too deep".
    let mut wasm = b"\0asm\x0d\0\x01\0".to_vec();
    wasm.extend(std::iter::repeat_n(b'[', 10_000));
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let (status, _, body) = send(
        "POST",
        &format!("{}/v1/admin/plugins?tenant=acme&name=deep", tg.url),
        &[
            ("authorization", &auth),
            ("content-type", "application/wasm"),
        ],
        wasm,
    )
    .await;
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains("nesting"), "{status} {text}");
    assert_eq!(status, 422, "{text}");
    // A JSON body is still depth-checked.
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let (status, _, body) = send(
        "POST",
        &format!("{}/v1/admin/plugins?tenant=acme", tg.url),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        deep.into_bytes(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("nesting"));
    tg.shutdown().await;
}

#[tokio::test]
async fn healthz_does_not_reveal_the_upstream_url() {
    let tg = gateway::start(
        Backend::Sqlite,
        Some("http://svc:hunter2@127.0.0.1:9/mcp?api_key=sekrit"),
        &[],
    )
    .await;
    let (status, _, body) = send("GET", &format!("{}/healthz", tg.url), &[], Vec::new()).await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body);
    for secret in ["hunter2", "sekrit", "127.0.0.1:9", "svc"] {
        assert!(!text.contains(secret), "{text}");
    }
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["upstream_configured"], true, "{v}");
    assert_eq!(v["audit_durable"], true, "{v}");
    tg.shutdown().await;
}

/// Sends `head` (request line and headers) on a fresh connection, never the body it announces,
/// and returns what the server answers within `wait` (None when it answers nothing).
async fn answer_without_body(tg: &TestGateway, head: &str, wait: Duration) -> Option<String> {
    let mut conn = tokio::net::TcpStream::connect(tg.addr)
        .await
        .expect("connect");
    conn.write_all(head.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(wait, conn.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        _ => None,
    }
}

#[tokio::test]
async fn a_body_that_never_arrives_gets_408() {
    let tg = demo_gateway(&["--body-timeout-ms", "300"]).await;
    let (token, _) = tg
        .mint(json!({"subject": "alice", "tools": ["echo"], "ttl_seconds": 600}))
        .await;
    for (path, auth) in [
        ("/v1/mcp", token.as_str()),
        ("/v1/tool-call", token.as_str()),
        ("/v1/admin/bundles?tenant=acme", ADMIN_TOKEN),
    ] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {auth}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"jsonrpc\""
        );
        let answer = answer_without_body(&tg, &head, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{path}: no answer while the body never arrives"));
        assert!(answer.starts_with("HTTP/1.1 408"), "{path}: {answer}");
    }
    tg.shutdown().await;
}

#[tokio::test]
async fn a_call_without_a_token_is_refused_before_its_body_is_read() {
    let tg = demo_gateway(&[]).await;
    for path in ["/v1/mcp", "/v1/tool-call"] {
        // Half a megabyte announced, none sent: refused at once, not after the body deadline.
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: 500000\r\n\r\n"
        );
        let answer = answer_without_body(&tg, &head, Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("{path}: not refused before the body"));
        assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer}");
        assert!(answer.contains("-32010"), "{path}: {answer}");
        assert!(
            answer.contains("missing bearer capability token"),
            "{path}: {answer}"
        );
    }
    tg.shutdown().await;
}

/// Issue 13 (idle costs nothing): a replica's revocation feed is woken by the revoking
/// replica's `NOTIFY`, not by polling. With a 300 s staleness limit its fallback poll is 60 s
/// apart, so only the notification can make the revocation reach it within seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_another_replica_by_notification() {
    let url = tokio::task::spawn_blocking(|| {
        intentgate::testkit::PgServer::shared().and_then(|pg| pg.fresh_database())
    })
    .await
    .expect("postgres task")
    .unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
    let slow_poll = ["--demo", "--revocation-max-staleness-secs", "300"];
    let a = gateway::start(Backend::Postgres(url.clone()), None, &slow_poll).await;
    let b = gateway::start(Backend::Postgres(url), None, &slow_poll).await;
    let (token, jti) = a.mint(json!({"subject": "alice", "tools": ["echo"]})).await;
    let ok = b.tool_call(&token, "echo", json!({"text": "x"})).await;
    assert!(ok.get("result").is_some(), "{ok}");
    let (status, _) = post_json(
        &format!("{}/v1/admin/revoke", a.url),
        Some(ADMIN_TOKEN),
        &json!({"jti": jti, "reason": "test"}),
    )
    .await;
    assert_eq!(status, 204);
    let mut refused = None;
    for _ in 0..50 {
        let v = b.tool_call(&token, "echo", json!({"text": "x"})).await;
        if v["error"]["code"] == -32010 {
            refused = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = refused.expect("replica b still allows the token 5 s after it was revoked");
    assert!(
        refused["error"]["data"]
            .as_str()
            .unwrap_or_default()
            .contains("revoked"),
        "{refused}"
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// The decision and its audit event in the response headers, always; the `_intentgate`
/// summary in the result only with `INTENTGATE_ANNOTATE_RESULTS`.
#[tokio::test]
async fn the_decision_is_in_the_headers_and_the_annotation_is_opt_in() {
    for annotate in [false, true] {
        let extra: &[&str] = if annotate {
            &["--demo", "--annotate-results"]
        } else {
            &["--demo"]
        };
        let tg = gateway::start(Backend::Sqlite, None, extra).await;
        let (token, _) = tg.mint(json!({"subject": "hdr", "tools": ["echo"]})).await;
        let auth = format!("Bearer {token}");
        let call = |tool: &str| {
            serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": tool, "arguments": {"text": "hi"}}}))
            .expect("json")
        };
        let headers = [
            ("content-type", "application/json"),
            ("authorization", auth.as_str()),
        ];
        let url = format!("{}/v1/mcp", tg.url);
        let (status, h, body) = send("POST", &url, &headers, call("echo")).await;
        assert_eq!(status, 200);
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(h["x-intentgate-decision"], "allow", "{v}");
        let event_id: i64 = h["x-intentgate-event-id"]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("an event id");
        // The header names the decision's audit event.
        let (_, audit) = get_json(
            &format!("{}/v1/admin/audit?tenant=default&limit=50", tg.url),
            ADMIN_TOKEN,
        )
        .await;
        let ev = audit["items"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["id"] == event_id))
            .unwrap_or_else(|| panic!("event {event_id} in {audit}"));
        assert_eq!(ev["decision"], "allow", "{ev}");
        assert_eq!(ev["tool"], "echo", "{ev}");
        match annotate {
            false => assert!(v["result"].get("_intentgate").is_none(), "{v}"),
            true => {
                assert_eq!(v["result"]["_intentgate"]["decision"], "allow", "{v}");
                assert_eq!(v["result"]["_intentgate"]["event_id"], event_id, "{v}");
            }
        }
        assert_eq!(v["result"]["content"][0]["text"], "hi", "{v}");
        // A refusal says so too, with no event id to follow.
        let (_, h, _) = send("POST", &url, &headers, call("delete_records")).await;
        assert_eq!(h["x-intentgate-decision"], "block");
        assert!(h.get("x-intentgate-event-id").is_none());
        tg.shutdown().await;
    }
}
