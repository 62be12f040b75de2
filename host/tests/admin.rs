//! The admin API over HTTP, as an operator and an attacker use it: the tenant named in the body
//! or the query (never silently another), bodies with unknown fields, bad values answered 400
//! naming the field (never a store error), admin changes that are not applied when their audit
//! event is refused, and the per-tenant component quota with component deletion.

use serde_json::{Value, json};

use crate::support::gateway::{self, ADMIN_TOKEN, Backend, TestGateway};
use crate::support::http::{get_json, post_json, send};

const DENY_ALL: &str = r#"package intentgate.policy

decision := {"allow": false, "reason": "frozen by the admin test"}
"#;

const ACME_ADMIN: &str = "acme-admin-token-123456";
const GLOBEX_ADMIN: &str = "globex-admin-token-12345";

async fn demo_gateway(extra: &[&str]) -> TestGateway {
    demo_gateway_on(Backend::Sqlite, extra).await
}

async fn demo_gateway_on(backend: Backend, extra: &[&str]) -> TestGateway {
    let mut flags = vec![
        "--demo",
        "--tenant-admins",
        "acme:acme-admin-token-123456,globex:globex-admin-token-12345",
    ];
    flags.extend_from_slice(extra);
    gateway::start(backend, None, &flags).await
}

async fn post(tg: &TestGateway, path: &str, token: &str, body: Value) -> (u16, Value) {
    post_json(&format!("{}{path}", tg.url), Some(token), &body).await
}

async fn get(tg: &TestGateway, path: &str) -> (u16, Value) {
    get_json(&format!("{}{path}", tg.url), ADMIN_TOKEN).await
}

/// `(status, body)` of a request with raw bytes as the superadmin.
async fn raw(tg: &TestGateway, method: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let (status, _, bytes) = send(
        method,
        &format!("{}{path}", tg.url),
        &[("authorization", &auth)],
        body,
    )
    .await;
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Whether a tool call with `token` is allowed (`Some(code)`: the JSON-RPC error code).
async fn call_denied(tg: &TestGateway, token: &str) -> Option<i64> {
    let v = tg.tool_call(token, "echo", json!({"text": "hi"})).await;
    v["error"]["code"].as_i64()
}

fn error_of(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {v}"))
}

/// The reasons of the admin events `kind` (e.g. `admin/revoke`) of `tenant`, newest first.
async fn admin_events(tg: &TestGateway, tenant: &str, kind: &str) -> Vec<Value> {
    let (s, v) = get(tg, &format!("/v1/admin/audit?tenant={tenant}&limit=1000")).await;
    assert_eq!(s, 200, "{v}");
    v["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|e| e["event"] == kind)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_calls_with_the_tenant_in_the_body_change_that_tenant_only() {
    let tg = demo_gateway(&[]).await;
    let (acme, _) = tg
        .mint(json!({"subject": "bot", "tenant": "acme", "tools": ["echo"]}))
        .await;
    let (default, _) = tg.mint(json!({"subject": "bot", "tools": ["echo"]})).await;
    assert_eq!(call_denied(&tg, &acme).await, None);
    assert_eq!(call_denied(&tg, &default).await, None);

    // IntentGate's shapes, the tenant in the body, as the superadmin.
    let (s, draft) = post(
        &tg,
        "/v1/admin/policies/drafts",
        ADMIN_TOKEN,
        json!({"name": "freeze", "rego_source": DENY_ALL, "tenant": "acme",
               "description": "stop everything", "created_by": "joe@acme.example"}),
    )
    .await;
    assert_eq!(s, 201, "{draft}");
    assert_eq!(draft["tenant"], "acme");
    assert_eq!(draft["created_by"], "joe@acme.example");
    let id = draft["id"].as_str().expect("id").to_owned();
    let (s, listed) = get(&tg, "/v1/admin/policies/drafts?tenant=acme").await;
    assert_eq!(s, 200);
    assert!(
        listed
            .as_array()
            .expect("drafts")
            .iter()
            .any(|d| d["id"] == id.as_str())
    );
    let (s, listed) = get(&tg, "/v1/admin/policies/drafts?tenant=default").await;
    assert_eq!(s, 200);
    assert!(
        !listed
            .as_array()
            .expect("drafts")
            .iter()
            .any(|d| d["id"] == id.as_str())
    );

    let (s, active) = post(
        &tg,
        "/v1/admin/policies/active",
        ADMIN_TOKEN,
        json!({"draft_id": id, "tenant": "acme", "promoted_by": "joe@acme.example"}),
    )
    .await;
    assert_eq!(s, 200, "{active}");
    assert_eq!(active["tenant"], "acme");
    assert_eq!(active["draft_id"], id.as_str());
    assert_eq!(active["promoted_by"], "joe@acme.example");

    // acme's decisions changed; default's did not.
    assert_eq!(call_denied(&tg, &acme).await, Some(-32012));
    assert_eq!(call_denied(&tg, &default).await, None);
    let (_, default_active) = get(&tg, "/v1/admin/policies/active").await;
    assert_ne!(default_active["draft_id"], id.as_str());

    // promoted_by and created_by are recorded in acme's chain, the principal stays the actor.
    let promotes = admin_events(&tg, "acme", "admin/policy.promote").await;
    assert_eq!(promotes.len(), 1, "{promotes:?}");
    assert_eq!(promotes[0]["decided_by"], "superadmin");
    let detail: Value =
        serde_json::from_str(promotes[0]["reason"].as_str().expect("reason")).expect("detail");
    assert_eq!(detail["promoted_by"], "joe@acme.example");
    assert_eq!(detail["to"], id.as_str());
    let drafts = admin_events(&tg, "acme", "admin/policy.draft").await;
    assert!(
        drafts[0]["reason"]
            .as_str()
            .expect("reason")
            .contains("joe@acme.example")
    );

    // Body and query naming different tenants: 400, nothing changes.
    let (s, v) = post(
        &tg,
        "/v1/admin/policies/active?tenant=default",
        ADMIN_TOKEN,
        json!({"draft_id": id, "tenant": "acme"}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(error_of(&v).contains("differ"), "{v}");
    let (s, v) = post(
        &tg,
        "/v1/admin/revoke?tenant=globex",
        ADMIN_TOKEN,
        json!({"jti": "abc", "tenant": "acme"}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    // The same tenant in both is fine.
    let (s, v) = post(
        &tg,
        "/v1/admin/policies/rollback?tenant=acme",
        ADMIN_TOKEN,
        json!({"tenant": "acme"}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(call_denied(&tg, &acme).await, None);

    // A field the API does not document: 400 naming it, never ignored.
    let (s, v) = post(
        &tg,
        "/v1/admin/policies/active",
        ADMIN_TOKEN,
        json!({"draft_id": id, "tenant": "acme", "promoted_by": "x", "force": true}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(error_of(&v).contains("force"), "{v}");
    let (s, v) = post(
        &tg,
        "/v1/admin/policies/drafts",
        ADMIN_TOKEN,
        json!({"rego_source": DENY_ALL, "tennant": "acme"}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(error_of(&v).contains("tennant"), "{v}");
    let (s, v) = post(
        &tg,
        "/v1/admin/revoke",
        ADMIN_TOKEN,
        json!({"jti": "abc", "why": "x"}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(error_of(&v).contains("why"), "{v}");
    let (s, v) = post(
        &tg,
        "/v1/admin/policies/rollback",
        ADMIN_TOKEN,
        json!({"tenant": "acme", "now": true}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(error_of(&v).contains("now"), "{v}");
    let (s, v) = post(
        &tg,
        "/v1/admin/policies/active",
        ADMIN_TOKEN,
        json!({"draft_id": id, "tenant": 7}),
    )
    .await;
    assert_eq!(s, 400, "{v}");

    // A tenant admin naming another tenant in the body: 403, as with the query.
    let (s, v) = post(
        &tg,
        "/v1/admin/policies/active",
        GLOBEX_ADMIN,
        json!({"draft_id": id, "tenant": "acme"}),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    let (s, v) = post(
        &tg,
        "/v1/admin/policies/drafts",
        GLOBEX_ADMIN,
        json!({"rego_source": DENY_ALL, "tenant": "acme"}),
    )
    .await;
    assert_eq!(s, 403, "{v}");
    // Its own tenant in the body is its own.
    let (s, v) = post(
        &tg,
        "/v1/admin/policies/drafts",
        ACME_ADMIN,
        json!({"rego_source": DENY_ALL, "tenant": "acme", "name": "again"}),
    )
    .await;
    assert_eq!((s, v["tenant"].as_str()), (201, Some("acme")), "{v}");
    assert_eq!(call_denied(&tg, &acme).await, None);
    tg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_are_400s_naming_the_field_not_store_failures() {
    let tg = demo_gateway(&[]).await;
    for (body, field) in [
        (json!({"jti": "jti-é"}), "jti"),
        (json!({"jti": "a b"}), "jti"),
        (json!({"jti": "x".repeat(129)}), "jti"),
        (json!({"jti": "abc", "reason": "a\u{0}b"}), "reason"),
        (json!({"jti": "abc", "tenant": "a b"}), "tenant"),
        (json!({"jti": "abc", "tenant": "é"}), "tenant"),
    ] {
        let (s, v) = post(&tg, "/v1/admin/revoke", ADMIN_TOKEN, body.clone()).await;
        assert_eq!(s, 400, "{body}: {v}");
        assert!(error_of(&v).contains(field), "{body}: {v}");
    }
    // Nothing of it reached the store or the chain.
    let (_, v) = get(&tg, "/v1/admin/revocations").await;
    assert_eq!(v["items"], json!([]), "{v}");

    for (path, field) in [
        ("/v1/admin/audit?tool=a%00b", "tool"),
        ("/v1/admin/audit?agent_id=%07", "agent_id"),
        ("/v1/admin/audit/export?jti=%00", "jti"),
        ("/v1/admin/audit?cursor=%00", "cursor"),
        ("/v1/admin/audit/checkpoints?limit=x", "limit"),
        ("/v1/admin/revocations?cursor=x", "cursor"),
        ("/v1/admin/revocations?limit=0", "limit"),
        ("/v1/admin/revocations?tenant=a%00", "tenant"),
    ] {
        let (s, v) = get(&tg, path).await;
        assert_eq!(s, 400, "{path}: {v}");
        assert!(error_of(&v).contains(field), "{path}: {v}");
    }
    let (s, v) = raw(
        &tg,
        "POST",
        "/v1/admin/plugins?name=a%00",
        b"\0asm\x01\0\0\0".to_vec(),
    )
    .await;
    assert!(s < 500, "{s} {v}");
    let (s, v) = post(
        &tg,
        "/v1/admin/policies/drafts",
        ADMIN_TOKEN,
        json!({"rego_source": DENY_ALL, "name": "a\u{0}b"}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(error_of(&v).contains("name"), "{v}");

    // Revocations page with the cursor they hand out.
    let mut jtis = Vec::new();
    for i in 0..5 {
        let jti = format!("page-{i}");
        let (s, v) = post(&tg, "/v1/admin/revoke", ADMIN_TOKEN, json!({"jti": jti})).await;
        assert_eq!(s, 204, "{v}");
        jtis.push(jti);
    }
    let mut seen = Vec::new();
    let mut path = "/v1/admin/revocations?limit=2".to_owned();
    loop {
        let (s, v) = get(&tg, &path).await;
        assert_eq!(s, 200, "{v}");
        let items = v["items"].as_array().expect("items");
        assert!(items.len() <= 2);
        seen.extend(
            items
                .iter()
                .map(|r| r["jti"].as_str().expect("jti").to_owned()),
        );
        match v["next_cursor"].as_str() {
            Some(c) => path = format!("/v1/admin/revocations?limit=2&cursor={c}"),
            None => break,
        }
    }
    seen.reverse();
    assert_eq!(seen, jtis);
    tg.shutdown().await;
}

/// Makes every audit append fail (a real failure of the audit table), or lifts that.
async fn audit_refuses(tg: &TestGateway, refuse: bool) {
    let intentgate::store::Db::Sqlite(pool) = tg.gw.store.db() else {
        unreachable!("SQLite gateway")
    };
    let sql = if refuse {
        "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events \
         BEGIN SELECT RAISE(ABORT, 'audit table refuses writes'); END"
    } else {
        "DROP TRIGGER refuse_audit"
    };
    sqlx::query(sql).execute(&pool).await.expect(sql);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_change_whose_event_is_refused_is_not_applied_and_a_retry_is_both() {
    let tg = demo_gateway(&[]).await;
    let (token, jti) = tg.mint(json!({"subject": "bot", "tools": ["echo"]})).await;
    let (s, draft) = post(
        &tg,
        "/v1/admin/policies/drafts",
        ADMIN_TOKEN,
        json!({"name": "freeze", "rego_source": DENY_ALL}),
    )
    .await;
    assert_eq!(s, 201, "{draft}");
    let id = draft["id"].as_str().expect("id").to_owned();
    let (_, before) = get(&tg, "/v1/admin/policies/active").await;
    let wasm = std::fs::read(intentgate::plugins::artifacts::TEST_CUSTOM_PATH).expect("wasm");
    let other_rego = DENY_ALL.replace("frozen", "iced");

    audit_refuses(&tg, true).await;
    // Revoke: refused, and the token is revoked nowhere (tool calls themselves fail closed
    // while the audit refuses writes, so the store and the set are what to look at).
    let (s, v) = post(&tg, "/v1/admin/revoke", ADMIN_TOKEN, json!({"jti": jti})).await;
    assert_eq!(s, 503, "{v}");
    assert!(
        tg.gw
            .store
            .list_revocations(None, 10)
            .await
            .expect("list")
            .is_empty(),
        "a revocation without its event"
    );
    assert!(!tg.gw.revocations.is_revoked(&jti));
    // Promote: refused, the active policy is unchanged.
    let (s, v) = post(
        &tg,
        "/v1/admin/policies/active",
        ADMIN_TOKEN,
        json!({"draft_id": id}),
    )
    .await;
    assert_eq!(s, 503, "{v}");
    assert!(error_of(&v).contains("not applied"), "{v}");
    let (_, now) = get(&tg, "/v1/admin/policies/active").await;
    assert_eq!(now["draft_id"], before["draft_id"]);
    // Upload: refused, not listed.
    let (s, v) = raw(&tg, "POST", "/v1/admin/plugins?name=custom", wasm.clone()).await;
    assert_eq!(s, 503, "{v}");
    let (_, plugins) = get(&tg, "/v1/admin/plugins").await;
    assert!(
        plugins
            .as_array()
            .expect("plugins")
            .iter()
            .all(|p| p["builtin"] == true),
        "{plugins}"
    );
    // Draft: refused, not listed.
    let (s, v) = post(
        &tg,
        "/v1/admin/policies/drafts",
        ADMIN_TOKEN,
        json!({"name": "iced", "rego_source": other_rego}),
    )
    .await;
    assert_eq!(s, 503, "{v}");
    let (_, drafts) = get(&tg, "/v1/admin/policies/drafts").await;
    assert_eq!(drafts.as_array().expect("drafts").len(), 1, "{drafts}");
    // Delete of the draft: refused, still there.
    let (s, v) = raw(
        &tg,
        "DELETE",
        &format!("/v1/admin/policies/drafts/{id}"),
        vec![],
    )
    .await;
    assert_eq!(s, 503, "{v}");

    // The store recovers: each retry is applied and audited.
    audit_refuses(&tg, false).await;
    let (s, v) = post(&tg, "/v1/admin/revoke", ADMIN_TOKEN, json!({"jti": jti})).await;
    assert_eq!(s, 204, "{v}");
    assert_eq!(call_denied(&tg, &token).await, Some(-32010));
    assert_eq!(admin_events(&tg, "default", "admin/revoke").await.len(), 1);
    let (s, v) = post(
        &tg,
        "/v1/admin/policies/active",
        ADMIN_TOKEN,
        json!({"draft_id": id}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["draft_id"], id.as_str());
    assert_eq!(
        admin_events(&tg, "default", "admin/policy.promote")
            .await
            .len(),
        1
    );
    let (s, v) = raw(&tg, "POST", "/v1/admin/plugins?name=custom", wasm).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        admin_events(&tg, "default", "admin/plugin.upload")
            .await
            .len(),
        1
    );
    let (s, v) = post(
        &tg,
        "/v1/admin/policies/drafts",
        ADMIN_TOKEN,
        json!({"name": "iced", "rego_source": other_rego}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    // The first draft's event, and the retried one's; none for the refused attempts.
    assert_eq!(
        admin_events(&tg, "default", "admin/policy.draft")
            .await
            .len(),
        2
    );
    let (s, v) = get(&tg, "/v1/admin/audit/verify").await;
    assert_eq!((s, &v["ok"]), (200, &json!(true)), "{v}");
    tg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_component_quota_is_per_tenant_and_unused_components_can_be_deleted() {
    component_quota_and_deletion(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_component_quota_and_deletion_on_postgres() {
    let url = intentgate::testkit::PgServer::shared()
        .and_then(|pg| pg.fresh_database())
        .unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
    component_quota_and_deletion(Backend::Postgres(url)).await;
}

async fn component_quota_and_deletion(backend: Backend) {
    let tg = demo_gateway_on(backend, &["--max-components-per-tenant", "1"]).await;
    let custom = std::fs::read(intentgate::plugins::artifacts::TEST_CUSTOM_PATH).expect("wasm");
    let hostile = std::fs::read(intentgate::plugins::artifacts::TEST_HOSTILE_PATH).expect("wasm");
    let upload = |tenant: &'static str, wasm: &Vec<u8>| {
        let wasm = wasm.clone();
        let tg = &tg;
        async move {
            raw(
                tg,
                "POST",
                &format!("/v1/admin/plugins?name=c&tenant={tenant}"),
                wasm,
            )
            .await
        }
    };
    let (s, v) = upload("a", &hostile).await;
    assert_eq!(s, 201, "{v}");
    let hostile_digest = v["digest"].as_str().expect("digest").to_owned();
    // a's quota is full; b's is not.
    let (s, v) = upload("a", &custom).await;
    assert_eq!(s, 409, "{v}");
    assert!(error_of(&v).contains("tenant a"), "{v}");
    let (s, v) = upload("b", &custom).await;
    assert_eq!(s, 201, "{v}");
    let custom_digest = v["digest"].as_str().expect("digest").to_owned();
    // The same component again is not "more".
    let (s, v) = upload("a", &hostile).await;
    assert_eq!(s, 201, "{v}");

    // Unknown, built-in and another tenant's components: 404.
    for (tenant, digest) in [
        ("a", "sha256:00".to_owned()),
        ("a", custom_digest.clone()),
        ("b", hostile_digest.clone()),
    ] {
        let (s, v) = raw(
            &tg,
            "DELETE",
            &format!("/v1/admin/plugins/{digest}?tenant={tenant}"),
            vec![],
        )
        .await;
        assert_eq!(s, 404, "{tenant} {digest}: {v}");
    }
    // Deleting frees the quota.
    let (s, v) = raw(
        &tg,
        "DELETE",
        &format!("/v1/admin/plugins/{hostile_digest}?tenant=a"),
        vec![],
    )
    .await;
    assert_eq!(s, 204, "{v}");
    assert_eq!(admin_events(&tg, "a", "admin/plugin.delete").await.len(), 1);
    let (_, listed) = get(&tg, "/v1/admin/plugins?tenant=a").await;
    assert!(!listed.to_string().contains(&hostile_digest), "{listed}");
    let sql = "SELECT digest FROM plugin_components WHERE digest = $1";
    let stored: Vec<(String,)> = match tg.gw.store.db() {
        intentgate::store::Db::Sqlite(pool) => sqlx::query_as(sql)
            .bind(&hostile_digest)
            .fetch_all(&pool)
            .await
            .expect("query"),
        intentgate::store::Db::Postgres(pool) => sqlx::query_as(sql)
            .bind(&hostile_digest)
            .fetch_all(&pool)
            .await
            .expect("query"),
    };
    assert!(stored.is_empty(), "the deletion is stored");
    let (s, v) = upload("a", &custom).await;
    assert_eq!(s, 201, "{v}");

    // A component a bundle uses: 409 naming the bundle; free once the bundle is gone.
    let mut spec: Value = {
        let (_, v) = get(&tg, "/v1/admin/bundles?tenant=a").await;
        assert_eq!(v["status"]["is_default"], true, "{v}");
        let (_, d) = post(
            &tg,
            "/v1/admin/policies/drafts",
            ADMIN_TOKEN,
            json!({"rego_source": DENY_ALL, "tenant": "a"}),
        )
        .await;
        let (_, b) = get(
            &tg,
            &format!(
                "/v1/admin/bundles/{}?tenant=a",
                d["id"].as_str().expect("id")
            ),
        )
        .await;
        b["spec"].clone()
    };
    spec["stages"]["policy"]
        .as_array_mut()
        .expect("policy checks")
        .push(json!({"component": custom_digest, "config": "{\"deny\": [\"x_*\"]}"}));
    let (s, v) = post(
        &tg,
        "/v1/admin/bundles?tenant=a",
        ADMIN_TOKEN,
        json!({"name": "uses-custom", "spec": spec}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let bundle = v["digest"].as_str().expect("digest").to_owned();
    let (s, v) = raw(
        &tg,
        "DELETE",
        &format!("/v1/admin/plugins/{custom_digest}?tenant=a"),
        vec![],
    )
    .await;
    assert_eq!(s, 409, "{v}");
    assert!(error_of(&v).contains(&bundle), "{v}");
    let (s, v) = raw(
        &tg,
        "DELETE",
        &format!("/v1/admin/bundles/{bundle}?tenant=a"),
        vec![],
    )
    .await;
    assert_eq!(s, 204, "{v}");
    let (s, v) = raw(
        &tg,
        "DELETE",
        &format!("/v1/admin/plugins/{custom_digest}?tenant=a"),
        vec![],
    )
    .await;
    assert_eq!(s, 204, "{v}");
    // b still holds it.
    let (_, listed) = get(&tg, "/v1/admin/plugins?tenant=b").await;
    assert!(listed.to_string().contains(&custom_digest), "{listed}");
    tg.shutdown().await;
}

/// The Python package this test drives; without it the test fails with the install command.
const SCHEMATHESIS_HINT: &str = "pip install -r tests/interop/requirements.txt (schemathesis)";

/// Schemathesis over the original gateway's OpenAPI (`tests/interop/intentgate-openapi.yaml`,
/// the admin and MCP paths) against a running gateway: no answer may be a 5xx. Bounded (a few
/// examples per operation, a fixed seed) so it runs in the suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_in_the_admin_api() {
    let python = std::env::var("INTENTGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = std::process::Command::new(&python)
        .args(["-c", "import schemathesis"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "this test needs schemathesis: run `{SCHEMATHESIS_HINT}`\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("cannot run {python} ({e}): install Python, then `{SCHEMATHESIS_HINT}`"),
    }
    let tg = demo_gateway(&[]).await;
    let spec = format!(
        "{}/../tests/interop/intentgate-openapi.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let work = tempfile::tempdir().expect("tempdir");
    let mut cmd = std::process::Command::new(&python);
    cmd.current_dir(work.path())
        .args(["-m", "schemathesis.cli", "run", &spec, "--url", &tg.url])
        .args(["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
        .args(["--include-path-regex", "^/v1/(admin|mcp)"])
        .args(["--checks", "not_a_server_error"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", "30", "--seed", "1", "--workers", "2"])
        .args(["--request-timeout", "20", "--generation-database", "none"])
        .args(["--no-color", "--suppress-health-check", "all"])
        .stdin(std::process::Stdio::null());
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("schemathesis runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "schemathesis found failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    tg.shutdown().await;
}

/// The superadmin's actions on every tenant at once (a global destination, a redrive and an
/// export across tenants) are recorded in the `(global)` chain, which only the superadmin can
/// read: never in `default`, whose tenant admin would otherwise read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_on_every_tenant_are_in_a_chain_no_tenant_admin_reads() {
    const DEFAULT_ADMIN: &str = "default-admin-token-1234";
    let tg = gateway::start(
        Backend::Sqlite,
        None,
        &[
            "--demo",
            "--tenant-admins",
            &format!("default:{DEFAULT_ADMIN},acme:{ACME_ADMIN}"),
        ],
    )
    .await;
    let (s, v) = post(
        &tg,
        "/v1/admin/integrations/destinations",
        ADMIN_TOKEN,
        json!({"global": true, "name": "all", "kind": "ndjson", "url": "http://127.0.0.1:9/all"}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = post(
        &tg,
        "/v1/admin/integrations/redrive",
        ADMIN_TOKEN,
        json!({"destination": "all"}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, _, _) = send(
        "GET",
        &format!("{}/v1/admin/audit/export?format=json", tg.url),
        &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        Vec::new(),
    )
    .await;
    assert_eq!(s, 200);
    let (s, v) = raw(
        &tg,
        "DELETE",
        "/v1/admin/integrations/destinations/all?global=true",
        Vec::new(),
    )
    .await;
    assert_eq!(s, 200, "{v}");

    let kinds = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter_map(|e| e["event"].as_str().map(str::to_owned))
            .collect()
    };
    let (s, v) = get(&tg, "/v1/admin/audit?tenant=(global)&limit=1000").await;
    assert_eq!(s, 200, "{v}");
    let global = kinds(&v);
    for kind in [
        "admin/destination.put",
        "admin/outbox.redrive",
        "admin/audit_export",
        "admin/destination.delete",
    ] {
        assert!(global.iter().any(|k| k == kind), "{kind} in {global:?}");
    }
    assert!(
        v["items"]
            .as_array()
            .expect("items")
            .iter()
            .all(|e| e["tenant"] == "(global)"),
        "{v}"
    );
    let (s, v) = get(&tg, "/v1/admin/audit/verify?tenant=(global)").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["verified"], 4, "{v}");
    assert_eq!(v["tenant"], "(global)", "{v}");

    // `default` holds none of them, read by its own admin or by the superadmin…
    let (s, v) = get(&tg, "/v1/admin/audit?tenant=default&limit=1000").await;
    assert_eq!(s, 200, "{v}");
    assert!(
        kinds(&v).iter().all(|k| !global.contains(k)),
        "{:?}",
        kinds(&v)
    );
    let (s, v) = get_json(
        &format!("{}/v1/admin/audit?limit=1000", tg.url),
        DEFAULT_ADMIN,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(
        v["items"]
            .as_array()
            .expect("items")
            .iter()
            .all(|e| e["tenant"] == "default"),
        "{v}"
    );
    // …and no tenant admin can name the global chain.
    for path in [
        "/v1/admin/audit?tenant=(global)",
        "/v1/admin/audit/verify?tenant=(global)",
        "/v1/admin/audit/checkpoints?tenant=(global)",
        "/v1/admin/audit/export?tenant=(global)",
    ] {
        let (s, v) = get_json(&format!("{}{path}", tg.url), DEFAULT_ADMIN).await;
        assert_eq!(s, 400, "{path}: {v}");
    }
    // A token of acme's revoked by the superadmin without naming a tenant is acme's
    // business: its chain and revocation list say so, default's do not.
    let (_, jti) = tg
        .mint(json!({"subject": "x", "tenant": "acme", "tools": ["echo"]}))
        .await;
    let (s, v) = post(
        &tg,
        "/v1/admin/revoke",
        ADMIN_TOKEN,
        json!({"jti": jti, "reason": "lost laptop"}),
    )
    .await;
    assert_eq!(s, 204, "{v}");
    let revoked = admin_events(&tg, "acme", "admin/revoke").await;
    assert!(
        revoked
            .iter()
            .any(|e| e["capability_token_id"] == jti.as_str()),
        "{revoked:?}"
    );
    assert!(
        admin_events(&tg, "default", "admin/revoke")
            .await
            .is_empty()
    );
    let listed = |token: &'static str| {
        let url = format!("{}/v1/admin/revocations", tg.url);
        async move { get_json(&url, token).await.1.to_string() }
    };
    assert!(listed(ACME_ADMIN).await.contains(&jti));
    assert!(!listed(DEFAULT_ADMIN).await.contains(&jti));

    // The chain is not a tenant: nothing else accepts its name.
    let (s, v) = post(
        &tg,
        "/v1/admin/mint",
        ADMIN_TOKEN,
        json!({"subject": "x", "tenant": "(global)", "tools": ["echo"]}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    tg.shutdown().await;
}
