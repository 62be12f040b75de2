//! Decision correctness and abuse on the call path, through the whole gateway: the token's
//! `max_cents` priced by the bundle's budget configuration (one replica, attenuated children,
//! two replicas on PostgreSQL), caveats the gateway cannot evaluate (`risk_max`,
//! `callee_zones`), `callee_allow` against the upstream's name, the denial throttle, and the
//! audit deadline against a stalled PostgreSQL.

use std::time::Duration;

use intentgate::bundles::BundleSpec;
use intentgate::capability::{Caveat, Token};
use intentgate::plugins::Stage;
use serde_json::{Value, json};

use crate::support::gateway::{self, ADMIN_TOKEN, Backend, TestGateway};
use crate::support::http::{get_json, post_json};

fn err_code(v: &Value) -> Option<i64> {
    v["error"]["code"].as_i64()
}

fn allowed(v: &Value) -> bool {
    v.get("result").is_some() && v.get("error").is_none()
}

/// The gateway's default bundle with the budget stage pricing `read_invoice` at 3 cents and
/// everything else at 0, promoted for `tenant` on this gateway.
async fn price_tools(tg: &TestGateway, tenant: &str) {
    let registry = tg.gw.pipeline.registry().clone();
    let tenant = tenant.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut spec: BundleSpec = registry.default_spec().clone();
        let budget = spec
            .stages
            .get_mut(&Stage::Budget)
            .and_then(|checks| checks.first_mut())
            .expect("a budget check in the default bundle");
        budget.config = json!({"costs": {"read_invoice": 3}, "default_cost_cents": 0}).to_string();
        let draft = registry
            .create_draft(&tenant, "priced", spec)
            .expect("draft");
        registry.promote(&tenant, &draft.digest).expect("promote");
    })
    .await
    .expect("promote task");
}

fn attenuate(token: &str, caveat: Caveat) -> String {
    Token::decode(token)
        .and_then(|t| t.attenuate(caveat))
        .expect("attenuate")
        .encode()
}

async fn invoice(tg: &TestGateway, token: &str) -> Value {
    tg.tool_call(token, "read_invoice", json!({"id": "7"}))
        .await
}

#[tokio::test]
async fn max_cents_zero_refuses_priced_tools_and_allows_free_ones() {
    let tg = gateway::start(Backend::Sqlite, None, &["--demo"]).await;
    price_tools(&tg, "default").await;
    let (token, _) = tg
        .mint(json!({"subject": "spender", "tools": ["read_invoice", "echo"], "max_cents": 0}))
        .await;
    let priced = invoice(&tg, &token).await;
    assert_eq!(err_code(&priced), Some(-32013), "{priced}");
    assert!(
        priced["error"]["data"]
            .as_str()
            .is_some_and(|d| d.contains("max_cents")),
        "{priced}"
    );
    let free = tg.tool_call(&token, "echo", json!({"text": "x"})).await;
    assert!(allowed(&free), "a free tool is within max_cents 0: {free}");
    // A token without the caveat pays freely.
    let (unlimited, _) = tg
        .mint(json!({"subject": "spender", "tools": ["read_invoice"]}))
        .await;
    assert!(allowed(&invoice(&tg, &unlimited).await));
    tg.shutdown().await;
}

#[tokio::test]
async fn max_cents_holds_until_the_sum_would_exceed_it_also_through_a_child() {
    let tg = gateway::start(Backend::Sqlite, None, &["--demo"]).await;
    price_tools(&tg, "default").await;
    let (root, _) = tg
        .mint(json!({"subject": "spender", "tools": ["read_invoice", "echo"], "max_cents": 10}))
        .await;
    // 3 + 3 on the root.
    for i in 0..2 {
        let v = invoice(&tg, &root).await;
        assert!(allowed(&v), "call {i}: {v}");
    }
    // A child that claims a larger budget still has the root's 10 and shares its counter.
    let child = attenuate(
        &root,
        Caveat {
            max_cents: 1000,
            ..Caveat::bare("max_cost")
        },
    );
    let v = invoice(&tg, &child).await;
    assert!(allowed(&v), "9 of 10 cents: {v}");
    for token in [&child, &root] {
        let v = invoice(&tg, token).await;
        assert_eq!(err_code(&v), Some(-32013), "12 would exceed 10: {v}");
    }
    // Free calls are still allowed, and a refused call was not charged: a second child with
    // a smaller budget (9) is already spent.
    assert!(allowed(
        &tg.tool_call(&child, "echo", json!({"text": "x"})).await
    ));
    let small = attenuate(
        &root,
        Caveat {
            max_cents: 12,
            ..Caveat::bare("max_cost")
        },
    );
    let v = invoice(&tg, &small).await;
    assert_eq!(err_code(&v), Some(-32013), "{v}");
    tg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_cents_is_enforced_by_two_replicas_together_on_postgres() {
    let url = tokio::task::spawn_blocking(|| {
        intentgate::testkit::PgServer::shared().and_then(|pg| pg.fresh_database())
    })
    .await
    .expect("postgres task")
    .unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
    let a = gateway::start(Backend::Postgres(url.clone()), None, &["--demo"]).await;
    let b = gateway::start(Backend::Postgres(url), None, &["--demo"]).await;
    price_tools(&a, "default").await;
    price_tools(&b, "default").await;
    let (token, _) = a
        .mint(json!({"subject": "spender", "tools": ["read_invoice"], "max_cents": 10}))
        .await;
    let mut results = Vec::new();
    for tg in [&a, &b, &a, &b, &a] {
        results.push(allowed(&invoice(tg, &token).await));
    }
    assert_eq!(
        results,
        [true, true, true, false, false],
        "3 + 3 + 3 cents across both replicas, then 12 > 10 on either"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn caveats_the_gateway_cannot_evaluate_are_refused_at_mint_and_on_use() {
    let tg = gateway::start(Backend::Sqlite, None, &["--demo"]).await;
    for (extra, field) in [
        (json!({"risk_max": 50}), "risk_max"),
        (
            json!({"callees": ["default"], "callee_zones": ["ops"]}),
            "callee_zones",
        ),
    ] {
        let mut body = json!({"subject": "bot", "tools": ["echo"]});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        let (status, v) = post_json(
            &format!("{}/v1/admin/mint", tg.url),
            Some(ADMIN_TOKEN),
            &body,
        )
        .await;
        assert_eq!(status, 400, "{field}: {v}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(field) && error.contains("not supported"),
            "{field}: {error}"
        );
    }
    // A token attenuated offline with risk_max is refused, saying the gateway does not
    // evaluate it (not "risk 100 exceeds").
    let (token, _) = tg.mint(json!({"subject": "bot", "tools": ["echo"]})).await;
    let risky = attenuate(
        &token,
        Caveat {
            risk_max: 100,
            ..Caveat::bare("risk_max")
        },
    );
    let v = tg.tool_call(&risky, "echo", json!({"text": "x"})).await;
    assert_eq!(err_code(&v), Some(-32010), "{v}");
    let reason = v["error"]["data"].as_str().unwrap_or_default();
    assert!(
        reason.contains("does not evaluate risk_max") && !reason.contains("exceeds"),
        "{reason}"
    );
    tg.shutdown().await;
}

#[tokio::test]
async fn callee_allow_is_checked_against_the_upstream_name() {
    let tg = gateway::start(
        Backend::Sqlite,
        None,
        &["--demo", "--upstream-name", "tools-eu"],
    )
    .await;
    let (to_eu, _) = tg
        .mint(json!({"subject": "bot", "tools": ["echo"], "callees": ["tools-*"]}))
        .await;
    let v = tg.tool_call(&to_eu, "echo", json!({"text": "x"})).await;
    assert!(allowed(&v), "the upstream tools-eu matches tools-*: {v}");
    let (to_crm, _) = tg
        .mint(json!({"subject": "bot", "tools": ["echo"], "callees": ["crm"]}))
        .await;
    let v = tg.tool_call(&to_crm, "echo", json!({"text": "x"})).await;
    assert_eq!(err_code(&v), Some(-32010), "{v}");
    assert!(
        v["error"]["data"]
            .as_str()
            .is_some_and(|d| d.contains("callee_allow") && d.contains("tools-eu")),
        "{v}"
    );
    // A child that narrows to another callee is refused too.
    let narrowed = attenuate(
        &to_eu,
        Caveat {
            callees: vec!["crm".into()],
            ..Caveat::bare("callee_allow")
        },
    );
    let v = tg.tool_call(&narrowed, "echo", json!({"text": "x"})).await;
    assert_eq!(err_code(&v), Some(-32010), "{v}");
    tg.shutdown().await;
}

/// Every audit event of this token (newest first).
async fn events_of(tg: &TestGateway, jti: &str) -> Vec<Value> {
    let (status, v) = get_json(
        &format!(
            "{}/v1/admin/audit?tenant=default&jti={jti}&limit=1000",
            tg.url
        ),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v["items"].as_array().cloned().unwrap_or_default()
}

/// A gateway that stops records the denials it throttled in the window it stopped in: the
/// count is in the chain when a gateway starts again on the same store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_denials_are_recorded_when_the_gateway_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    let tg = gateway::start(Backend::Sqlite, None, &["--demo", "--data-dir", d]).await;
    let per_token = tg.gw.pipeline.denial_limits().per_token as usize;
    let (flooder, jti) = tg
        .mint(json!({"subject": "flooder", "tools": ["echo"]}))
        .await;
    let mut throttled = 0u64;
    for _ in 0..per_token + 5 {
        let v = tg
            .tool_call(&flooder, "send_email", json!({"to": "x"}))
            .await;
        if err_code(&v) == Some(-32013) {
            throttled += 1;
        }
    }
    assert!(throttled > 0, "the flood was throttled");
    tg.shutdown().await;
    let again = gateway::start(Backend::Sqlite, None, &["--demo", "--data-dir", d]).await;
    let events = events_of(&again, &jti).await;
    let counted: u64 = events
        .iter()
        .filter(|e| e["event"] == intentgate::pipeline::THROTTLED_KIND)
        .filter_map(|e| e["count"].as_u64())
        .sum();
    assert_eq!(
        counted, throttled,
        "the throttled denials of the last window: {events:#?}"
    );
    again.shutdown().await;
}

#[tokio::test]
async fn a_flood_of_denied_calls_is_throttled_and_audited_in_aggregate() {
    let tg = gateway::start(Backend::Sqlite, None, &["--demo"]).await;
    let limits = tg.gw.pipeline.denial_limits();
    let (flooder, flooder_jti) = tg
        .mint(json!({"subject": "flooder", "tools": ["echo"], "rate_per_min": 1}))
        .await;
    let (other, _) = tg
        .mint(json!({"subject": "worker", "tools": ["echo"]}))
        .await;
    // Windows are aligned to the clock: start the flood early in one, so that it does not
    // cross into the next (which would let another `per_token` denials through).
    let window_ms = limits.window.as_millis().max(1) as u64;
    let into = intentgate::audit::time::now_ms() as u64 % window_ms;
    if window_ms >= 20_000 && into > window_ms - 15_000 {
        tokio::time::sleep(std::time::Duration::from_millis(window_ms - into + 50)).await;
    }
    let n = (limits.per_token as usize) * 3;
    let mut throttled = 0u64;
    let mut denied = 0u64;
    for i in 0..n {
        // Outside the token's scope: every one is denied.
        let v = tg
            .tool_call(&flooder, "send_email", json!({"to": "x"}))
            .await;
        match err_code(&v) {
            Some(-32013) => {
                assert!(
                    v["error"]["data"]
                        .as_str()
                        .is_some_and(|d| d.contains("too many denied calls")),
                    "{v}"
                );
                throttled += 1;
            }
            Some(-32010) => denied += 1,
            _ => panic!("call {i}: {v}"),
        }
        // Another token of the tenant is not affected.
        if i % 10 == 0 {
            let ok = tg.tool_call(&other, "echo", json!({"text": "x"})).await;
            assert!(allowed(&ok), "call {i}: {ok}");
        }
    }
    assert_eq!(
        denied,
        u64::from(limits.per_token),
        "denied before the throttle"
    );
    assert_eq!(denied + throttled, n as u64);
    // Allowed calls of the flooding token are throttled too (cheaply, before any check).
    let v = tg.tool_call(&flooder, "echo", json!({"text": "x"})).await;
    assert_eq!(err_code(&v), Some(-32013), "{v}");
    throttled += 1;

    tg.gw.pipeline.flush_throttled().await;
    let events = events_of(&tg, &flooder_jti).await;
    let summaries: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == intentgate::pipeline::THROTTLED_KIND)
        .collect();
    assert_eq!(
        summaries.len(),
        1,
        "one event per token and window: {events:?}"
    );
    assert_eq!(summaries[0]["count"].as_u64(), Some(throttled));
    assert_eq!(summaries[0]["check"], "throttle");
    assert_eq!(summaries[0]["decision"], "block");
    let calls = events
        .iter()
        .filter(|e| e["event"] == "intentgate.tool_call")
        .count();
    assert_eq!(
        calls as u64, denied,
        "only the unthrottled denials have rows"
    );
    assert!(
        events.len() < n / 2,
        "{} events for {n} denied calls",
        events.len()
    );
    let (_, verify) = get_json(
        &format!("{}/v1/admin/audit/verify?tenant=default", tg.url),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(verify["ok"], true, "{verify}");
    tg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_audit_store_refuses_calls_at_the_deadline_and_records_them_later() {
    let url = tokio::task::spawn_blocking(|| {
        intentgate::testkit::PgServer::shared().and_then(|pg| pg.fresh_database())
    })
    .await
    .expect("postgres task")
    .unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
    let target = intentgate::testkit::host_port(&url).expect("host:port in the URL");
    let proxy = intentgate::testkit::StallProxy::start(&target).expect("proxy");
    let proxied = url.replacen(&target, &proxy.addr().to_string(), 1);
    // The deadline must hold a normal commit (the calls before and after the stall) on a loaded
    // machine; the stall below lasts until the refusal, however long the deadline.
    let tg = gateway::start(
        Backend::Postgres(proxied),
        None,
        &["--demo", "--audit-deadline-ms", "2000"],
    )
    .await;
    let (token, jti) = tg
        .mint(json!({"subject": "bot", "tools": ["echo"], "max_calls": 50}))
        .await;
    let ok = tg
        .tool_call(&token, "echo", json!({"text": "before"}))
        .await;
    assert!(allowed(&ok), "{ok}");

    proxy.pause();
    // Bounded only so that a gateway without a deadline fails this test instead of hanging it.
    let stalled = tokio::time::timeout(
        Duration::from_secs(30),
        tg.tool_call(&token, "echo", json!({"text": "stalled"})),
    )
    .await
    .expect("refused while the store is stalled, not left waiting");
    assert_eq!(err_code(&stalled), Some(-32016), "{stalled}");
    proxy.resume();

    // Calls work again once the store answers.
    let mut recovered = None;
    for _ in 0..100 {
        let v = tg.tool_call(&token, "echo", json!({"text": "after"})).await;
        if allowed(&v) {
            recovered = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        recovered.is_some(),
        "calls work again after the store returns"
    );
    // The refused call is in the chain: its allow event points to a refusal by the audit check.
    let mut refusal = None;
    for _ in 0..100 {
        let events = events_of(&tg, &jti).await;
        refusal = events
            .into_iter()
            .find(|e| e["check"] == "audit" && e["decision"] == "block");
        if refusal.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refusal = refusal.expect("the refusal at the deadline is audited");
    // The refused call charged nothing (or was refunded with its refusal record): the token's
    // counter holds exactly the two calls that were answered.
    let pool = sqlx::PgPool::connect(&url).await.expect("direct pool");
    let charged: i64 = sqlx::query_scalar("SELECT value FROM counters WHERE key = $1")
        .bind(format!("calls:{jti}"))
        .fetch_one(&pool)
        .await
        .expect("counter");
    assert_eq!(charged, 2, "max_calls charged only for answered calls");
    assert!(
        refusal["reason"]
            .as_str()
            .is_some_and(|r| r.contains("deadline")),
        "{refusal}"
    );
    let (_, verify) = get_json(
        &format!("{}/v1/admin/audit/verify?tenant=default", tg.url),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(verify["ok"], true, "{verify}");
    tg.shutdown().await;
}

/// A refused call's huge tool name (PostgreSQL cannot index 20 KB of text) is recorded cut to
/// the longest name a token may hold, so its denial commits; before, the batch failed and
/// the call was refused as "audit log unavailable", with every call committed beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_calls_huge_tool_name_is_recorded_cut_on_postgres() {
    let url = tokio::task::spawn_blocking(|| {
        intentgate::testkit::PgServer::shared().and_then(|pg| pg.fresh_database())
    })
    .await
    .expect("postgres task")
    .unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
    let tg = gateway::start(Backend::Postgres(url), None, &["--demo"]).await;
    let (token, jti) = tg
        .mint(json!({"subject": "long-names", "tools": ["*"]}))
        .await;
    // Letters that do not compress: an index entry of about 20 KB.
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let name: String = (0..20_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect();
    let v = tg.tool_call(&token, &name, json!({})).await;
    assert!(v.get("error").is_some(), "refused: {v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        !message.contains("audit"),
        "refused for its name, not for the audit: {v}"
    );
    let events = events_of(&tg, &jti).await;
    let denial = events
        .iter()
        .find(|e| {
            e["tool"]
                .as_str()
                .is_some_and(|t| t.starts_with(&name[..64]))
        })
        .unwrap_or_else(|| panic!("the denial in {events:?}"));
    let tool = denial["tool"].as_str().expect("tool");
    assert!(
        tool.len() <= intentgate::capability::MAX_NAME_BYTES + 64 + '…'.len_utf8()
            && tool.ends_with('…'),
        "{} bytes",
        tool.len()
    );
    assert!(allowed(&invoice(&tg, &token).await));
    tg.shutdown().await;
}
