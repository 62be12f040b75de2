//! Bundles across processes and time, through `intentgate serve` as operators run it: a
//! promotion made on one gateway reaches the others (SQLite polling, PostgreSQL NOTIFY),
//! survives a restart, is undone when the store cannot record it, a dry-run replays the
//! recorded traffic (`sample: last-24h`), `--watch DIR` reloads on save, and a check plugin
//! uploaded over HTTP changes decisions without a restart.

use std::time::Duration;

use intentgate::bundles::admin::{AdminCall, handle};
use intentgate::bundles::persist::{Follower, Persist};
use intentgate::bundles::{BundleSpec, Registry};
use serde_json::{Value, json};

use crate::support::gateway::{self, ADMIN_TOKEN, Backend, TestGateway};
use crate::support::http::{get_json, post_json};

const FREEZE: &str = r#"package intentgate.policy

decision := {"allow": false, "reason": "frozen by the sync test"}
"#;

async fn admin_post(tg: &TestGateway, path: &str, body: Value) -> (u16, Value) {
    post_json(&format!("{}{path}", tg.url), Some(ADMIN_TOKEN), &body).await
}

/// Drafts `rego` for tenant acme and promotes it; returns the draft id (the bundle digest).
async fn promote_rego(tg: &TestGateway, rego: &str) -> String {
    let (status, draft) = admin_post(
        tg,
        "/v1/admin/policies/drafts?tenant=acme",
        json!({"rego_source": rego, "name": "freeze"}),
    )
    .await;
    assert_eq!(status, 201, "{draft}");
    let id = draft["id"].as_str().expect("draft id").to_string();
    let (status, active) = admin_post(
        tg,
        "/v1/admin/policies/active?tenant=acme",
        json!({"draft_id": id}),
    )
    .await;
    assert_eq!(status, 200, "{active}");
    id
}

/// The reason a policy denial gives, or None when the call went through.
async fn denial(tg: &TestGateway, token: &str) -> Option<String> {
    let v = tg
        .tool_call(token, "read_invoice", json!({"id": "INV-1"}))
        .await;
    if v["result"].is_object() {
        return None;
    }
    assert_eq!(v["error"]["code"], -32012, "not a policy denial: {v}");
    Some(v["error"]["data"].as_str().unwrap_or_default().to_string())
}

/// Waits (up to 20 s) until `tg` decides as `frozen` says.
async fn until_frozen(tg: &TestGateway, token: &str, frozen: bool, what: &str) {
    for _ in 0..200 {
        if denial(tg, token).await.is_some() == frozen {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: gateway never became frozen={frozen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotions_reach_other_gateways_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    let a = gateway::start(Backend::Sqlite, None, &["--demo", "--data-dir", d]).await;
    let b = gateway::start(Backend::Sqlite, None, &["--demo", "--data-dir", d]).await;
    let (token, _) = a
        .mint(json!({"subject": "bot", "tenant": "acme", "tools": ["read_invoice"], "ttl_seconds": 600}))
        .await;
    assert_eq!(denial(&a, &token).await, None);
    assert_eq!(denial(&b, &token).await, None);

    // Promoted on a: a decides with it as soon as the call returns; b follows the stored pointer.
    let id = promote_rego(&a, FREEZE).await;
    assert_eq!(
        denial(&a, &token).await.as_deref(),
        Some("frozen by the sync test")
    );
    until_frozen(&b, &token, true, "b after a's promotion").await;

    // Rolled back on b: b at once, a follows.
    let (status, v) = admin_post(&b, "/v1/admin/policies/rollback?tenant=acme", json!({})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(denial(&b, &token).await, None);
    until_frozen(&a, &token, false, "a after b's rollback").await;

    // Promoted again, then both stop. A gateway started on the same store decides with the
    // stored bundle from its first call: no window on the default bundle.
    let (status, v) = admin_post(
        &a,
        "/v1/admin/policies/active?tenant=acme",
        json!({"draft_id": id}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    a.shutdown().await;
    b.shutdown().await;
    let c = gateway::start(Backend::Sqlite, None, &["--demo", "--data-dir", d]).await;
    assert_eq!(
        denial(&c, &token).await.as_deref(),
        Some("frozen by the sync test")
    );
    let (status, active) = get_json(
        &format!("{}/v1/admin/policies/active?tenant=acme", c.url),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(status, 200, "{active}");
    assert_eq!(active["draft_id"], id.as_str());
    // The decision records the bundle that made it.
    let (_, page) = get_json(
        &format!("{}/v1/admin/audit?tenant=acme&decision=block", c.url),
        ADMIN_TOKEN,
    )
    .await;
    let digests: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|e| e["bundle_digest"].as_str())
        .collect();
    assert!(!digests.is_empty(), "{page}");
    assert!(digests.iter().all(|d| *d == id), "{digests:?} vs {id}");
    c.shutdown().await;
}

/// A tenant whose stored bundle no longer loads (its row damaged here; a limit lowered since
/// it was promoted, in practice) does not stop the gateway from starting: that tenant's calls
/// are refused, never decided by the default bundle, other tenants' are served, and promoting
/// another bundle mends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_bundle_that_no_longer_loads_stops_only_its_tenant() {
    use sqlx::Connection as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    let a = gateway::start(Backend::Sqlite, None, &["--demo", "--data-dir", d]).await;
    let frozen = promote_rego(&a, FREEZE).await;
    a.shutdown().await;
    let file = dir.path().join("intentgate.sqlite3");
    let mut raw = sqlx::SqliteConnection::connect(&format!("sqlite://{}", file.display()))
        .await
        .expect("raw connection");
    sqlx::query(
        "UPDATE bundles SET spec = '{\"stages\": {}}' WHERE tenant = 'acme' AND digest = ?",
    )
    .bind(&frozen)
    .execute(&mut raw)
    .await
    .expect("damaged");
    raw.close().await.expect("close");

    let b = gateway::start(Backend::Sqlite, None, &["--demo", "--data-dir", d]).await;
    let (acme, _) = b
        .mint(json!({"subject": "bot", "tenant": "acme", "tools": ["read_invoice"], "ttl_seconds": 600}))
        .await;
    let (globex, _) = b
        .mint(json!({"subject": "bot", "tenant": "globex", "tools": ["read_invoice"], "ttl_seconds": 600}))
        .await;
    let refused = denial(&b, &acme).await;
    assert!(
        refused
            .as_deref()
            .is_some_and(|r| r.contains("deny by default")),
        "acme's calls are refused: {refused:?}"
    );
    assert_eq!(denial(&b, &globex).await, None, "another tenant is served");
    // The operator mends it by promoting another bundle.
    promote_rego(&b, &FREEZE.replace("frozen by", "mended by")).await;
    assert_eq!(
        denial(&b, &acme).await.as_deref(),
        Some("mended by the sync test")
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_are_woken_by_notify_not_by_the_poll() {
    let url = intentgate::testkit::PgServer::shared()
        .and_then(|pg| pg.fresh_database())
        .expect("PostgreSQL");
    let store = intentgate::store::connect(&intentgate::store::StoreConfig::Postgres { url })
        .await
        .expect("store");
    let runtime = crate::support::gateway::shared_runtime();
    let a = Registry::with_runtime(runtime.clone()).expect("replica a");
    let b = Registry::with_runtime(runtime).expect("replica b");
    a.attach_store(Persist::new(store.db()));
    // An hour between polls: only the notification can wake b within the test.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let follower = tokio::spawn(Follower::new(b.clone(), Persist::new(store.db())).run(
        Duration::from_secs(3600),
        async {
            let _ = stopped.await;
        },
    ));
    tokio::time::sleep(Duration::from_millis(500)).await; // b has done its first poll and listens

    let tenant = "notify";
    let r = draft_frozen(&a, tenant).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let digest = r.body["digest"].as_str().expect("digest").to_string();
    let path = format!("/v1/admin/bundles/{digest}/promote");
    let r = call(&a, tenant, hyper::Method::POST, &path, None, b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let mut followed = false;
    for _ in 0..200 {
        if b.status(tenant).active == digest {
            followed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop.send(());
    let _ = follower.await;
    assert!(followed, "replica b was not woken by NOTIFY");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_the_store_cannot_record_is_undone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = intentgate::store::connect(&intentgate::store::StoreConfig::Sqlite {
        path: dir.path().join("gateway.db"),
    })
    .await
    .expect("store");
    let runtime = crate::support::gateway::shared_runtime();
    let a = Registry::with_runtime(runtime).expect("registry");
    a.attach_store(Persist::new(store.db()));
    let tenant = "undo";
    let draft = a
        .create_draft(
            tenant,
            "frozen",
            BundleSpec::builtin().with_policy_config(FREEZE.into()),
        )
        .expect("draft");
    let before = a.status(tenant);
    // The store loses its pointer table: every pointer write fails.
    match store.db() {
        intentgate::store::Db::Sqlite(pool) => {
            sqlx::query("DROP TABLE bundle_pointers")
                .execute(&pool)
                .await
                .expect("drop");
        }
        intentgate::store::Db::Postgres(_) => unreachable!("SQLite store"),
    }
    let path = format!("/v1/admin/bundles/{}/promote", draft.digest);
    let r = call(&a, tenant, hyper::Method::POST, &path, None, b"").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        r.body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not swapped"),
        "{}",
        r.body
    );
    assert!(r.event.is_none(), "a refused swap is not reported as done");
    assert_eq!(a.status(tenant), before, "the running bundle is unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_replays_the_recorded_traffic() {
    let tg = gateway::start(
        Backend::Sqlite,
        None,
        &["--demo", "--audit-persist-arg-values", "scalars"],
    )
    .await;
    let (token, _) = tg
        .mint(json!({"subject": "bot", "tenant": "acme", "tools": ["read_invoice", "echo"], "ttl_seconds": 600}))
        .await;
    for id in ["INV-1", "INV-2", "INV-3"] {
        let v = tg
            .tool_call(&token, "read_invoice", json!({"id": id}))
            .await;
        assert!(v["result"].is_object(), "{v}");
    }
    let v = tg.tool_call(&token, "echo", json!({"text": "hi"})).await;
    assert!(v["result"].is_object(), "{v}");
    // Stopped by the capability check: never reached a bundle, so not replayed.
    let v = tg
        .tool_call(&token, "send_email", json!({"to": "x@example.com"}))
        .await;
    assert_eq!(v["error"]["code"], -32010, "{v}");

    // The candidate blocks one invoice by its recorded argument.
    let candidate = r#"package intentgate.policy

default decision := {"allow": true, "reason": "ok"}

decision := {"allow": false, "reason": "INV-2 is disputed"} if {
	input.args.id == "INV-2"
}
"#;
    let (status, report) = admin_post(
        &tg,
        "/v1/admin/policies/dry-run?tenant=acme",
        json!({"rego_source": candidate, "sample": "last-24h"}),
    )
    .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["total"], 4, "{report}");
    assert_eq!(
        report["transitions"],
        json!({"allow->allow": 3, "allow->block": 1})
    );
    let decisions = report["decisions"].as_array().expect("decisions");
    assert_eq!(decisions.len(), 4);
    let blocked: Vec<&Value> = decisions
        .iter()
        .filter(|d| d["candidate_decision"] == "block")
        .collect();
    assert_eq!(blocked.len(), 1, "{report}");
    assert_eq!(blocked[0]["actual_decision"], "allow");
    assert_eq!(blocked[0]["input"]["tool"], "read_invoice");
    assert_eq!(report["divergent"][0]["reason"], "INV-2 is disputed");
    // Nothing changed: the active bundle is still the default one.
    assert_eq!(
        denial(&tg, &token).await,
        None,
        "a dry-run must not change decisions"
    );

    for (body, expect) in [
        (
            json!({"rego_source": candidate, "sample": "yesterday"}),
            "last-24h",
        ),
        (json!({"rego_source": candidate}), "nothing to replay"),
        (
            json!({"rego_source": candidate, "sample": "last-24h", "input": {"tool": "x"}}),
            "either input or sample",
        ),
    ] {
        let (status, v) = admin_post(&tg, "/v1/admin/policies/dry-run?tenant=acme", body).await;
        assert_eq!(status, 400, "{v}");
        assert!(
            v["error"].as_str().unwrap_or_default().contains(expect),
            "{v}"
        );
    }
    tg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_watch_reloads_the_folder_on_save() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rego = dir.path().join("freeze.rego");
    std::fs::write(&rego, FREEZE).expect("write");
    let d = dir.path().to_str().expect("utf-8 path");
    let tg = gateway::start(
        Backend::Sqlite,
        None,
        &["--demo", "--watch", d, "--watch-tenants", "acme,globex"],
    )
    .await;
    let (token, _) = tg
        .mint(json!({"subject": "bot", "tenant": "acme", "tools": ["read_invoice"], "ttl_seconds": 600}))
        .await;
    assert_eq!(
        denial(&tg, &token).await.as_deref(),
        Some("frozen by the sync test")
    );
    // A tenant that is not watched keeps the default bundle (the demo's token-scope policy).
    let (other, _) = tg
        .mint(json!({"subject": "bot", "tenant": "initech", "tools": ["read_invoice"], "ttl_seconds": 600}))
        .await;
    assert_eq!(denial(&tg, &other).await, None);

    std::fs::write(
        &rego,
        "package intentgate.policy\n\ndecision := {\"allow\": true, \"reason\": \"thawed\"}\n",
    )
    .expect("write");
    until_frozen(&tg, &token, false, "after saving an allowing policy").await;
    tg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_plugin_uploaded_over_http_changes_decisions_without_restart() {
    let tg = gateway::start(Backend::Sqlite, None, &["--demo"]).await;
    let (token, _) = tg
        .mint(json!({"subject": "bot", "tenant": "acme", "tools": ["send_email", "read_invoice"], "ttl_seconds": 600}))
        .await;
    let email = json!({"to": "ops@example.com"});
    assert!(tg.tool_call(&token, "send_email", email.clone()).await["result"].is_object());

    // The template's code (plugins/test-custom is the template, checked by a unit test).
    let wasm = std::fs::read(intentgate::plugins::artifacts::TEST_CUSTOM_PATH).expect("artifact");
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let (status, _, body) = crate::support::http::send(
        "POST",
        &format!("{}/v1/admin/plugins?tenant=acme&name=no-email", tg.url),
        &[
            ("authorization", &auth),
            ("content-type", "application/wasm"),
        ],
        wasm,
    )
    .await;
    let uploaded: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(status, 201, "{uploaded}");
    // The running default bundle (the demo's token-scope policy) plus the uploaded check.
    let mut spec = serde_json::to_value(tg.gw.pipeline.registry().default_spec()).expect("spec");
    spec["stages"]["policy"]
        .as_array_mut()
        .expect("policy stage")
        .push(json!({"component": uploaded["digest"], "config": r#"{"deny": ["send_email"]}"#}));
    let (status, created) = admin_post(
        &tg,
        "/v1/admin/bundles?tenant=acme",
        json!({"name": "no-email", "spec": spec}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let digest = created["digest"].as_str().expect("digest");
    let (status, v) = admin_post(
        &tg,
        &format!("/v1/admin/bundles/{digest}/promote?tenant=acme"),
        json!({}),
    )
    .await;
    assert_eq!(status, 200, "{v}");

    let denied = tg.tool_call(&token, "send_email", email).await;
    assert_eq!(denied["error"]["code"], -32012, "{denied}");
    assert!(
        denied["error"]["data"]
            .as_str()
            .unwrap_or_default()
            .contains("custom check: send_email matches send_email"),
        "{denied}"
    );
    assert!(
        tg.tool_call(&token, "read_invoice", json!({"id": "INV-1"}))
            .await["result"]
            .is_object()
    );
    tg.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pointer_to_the_default_bundle_means_each_replicas_own_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8 path");
    let a = gateway::start(Backend::Sqlite, None, &["--demo", "--data-dir", d]).await;
    let (token, _) = a
        .mint(json!({"subject": "bot", "tenant": "acme", "tools": ["read_invoice"], "ttl_seconds": 600}))
        .await;
    promote_rego(&a, FREEZE).await;
    let (status, _, _) = crate::support::http::send(
        "DELETE",
        &format!("{}/v1/admin/policies/active?tenant=acme", a.url),
        &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        Vec::new(),
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(denial(&a, &token).await, None);
    a.shutdown().await;

    // Restarted with another policy file: the stored "default" is this process's default, and
    // the rollback target (the frozen draft) is still there.
    let policies = tempfile::tempdir().expect("tempdir");
    let file = policies.path().join("open.rego");
    std::fs::write(
        &file,
        "package intentgate.policy\n\ndecision := {\"allow\": true, \"reason\": \"open house\"}\n",
    )
    .expect("write");
    let b = gateway::start(
        Backend::Sqlite,
        None,
        &[
            "--demo",
            "--data-dir",
            d,
            "--policy-file",
            file.to_str().expect("utf-8"),
            "--annotate-results",
        ],
    )
    .await;
    let ok = b
        .tool_call(&token, "read_invoice", json!({"id": "INV-1"}))
        .await;
    let own_default = b.gw.pipeline.registry().default_spec().digest();
    assert_eq!(
        ok["result"]["_intentgate"]["bundle_digest"],
        own_default.as_str(),
        "{ok}"
    );
    let (status, v) = admin_post(&b, "/v1/admin/policies/rollback?tenant=acme", json!({})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        denial(&b, &token).await.as_deref(),
        Some("frozen by the sync test")
    );
    b.shutdown().await;
}

/// Drafts the frozen policy as bundle `frozen` of `tenant` through the admin handler.
async fn draft_frozen(registry: &Registry, tenant: &str) -> intentgate::bundles::admin::AdminReply {
    let spec = BundleSpec::builtin().with_policy_config(FREEZE.into());
    let body = serde_json::to_vec(&json!({"name": "frozen", "spec": spec})).expect("json");
    call(
        registry,
        tenant,
        hyper::Method::POST,
        "/v1/admin/bundles",
        None,
        &body,
    )
    .await
}

/// One admin call on `registry` for `tenant` (the superadmin's shape, as the router passes it).
async fn call(
    registry: &Registry,
    tenant: &str,
    method: hyper::Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> intentgate::bundles::admin::AdminReply {
    handle(
        registry,
        AdminCall {
            method: &method,
            path,
            query,
            tenant,
            actor: "ops",
            body,
        },
    )
    .await
    .expect("route")
}

async fn sqlite_exec(store: &std::sync::Arc<dyn intentgate::store::Store>, sql: &str) {
    match store.db() {
        intentgate::store::Db::Sqlite(pool) => {
            sqlx::query(sql).execute(&pool).await.expect(sql);
        }
        intentgate::store::Db::Postgres(_) => unreachable!("SQLite store"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_the_store_never_recorded_is_stored_before_it_is_promoted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = intentgate::store::connect(&intentgate::store::StoreConfig::Sqlite {
        path: dir.path().join("gateway.db"),
    })
    .await
    .expect("store");
    let runtime = crate::support::gateway::shared_runtime();
    let a = Registry::with_runtime(runtime.clone()).expect("replica a");
    a.attach_store(Persist::new(store.db()));
    let tenant = "unstored";
    let wasm = std::fs::read(intentgate::plugins::artifacts::TEST_CUSTOM_PATH).expect("artifact");

    // The store refuses bundles and components: the upload and the draft are answered 503 and
    // are not kept in memory either.
    sqlite_exec(&store, "ALTER TABLE bundles RENAME TO bundles_away").await;
    sqlite_exec(
        &store,
        "ALTER TABLE plugin_components RENAME TO plugin_components_away",
    )
    .await;
    let r = call(
        &a,
        tenant,
        hyper::Method::POST,
        "/v1/admin/plugins",
        Some("name=no-email"),
        &wasm,
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        a.components().iter().all(|c| c.builtin),
        "an upload the store refused stays in memory"
    );
    let r = draft_frozen(&a, tenant).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        a.drafts(tenant).is_empty(),
        "a draft the store refused stays in memory"
    );
    let r = call(
        &a,
        tenant,
        hyper::Method::POST,
        "/v1/admin/policies/drafts",
        None,
        &serde_json::to_vec(&json!({"rego_source": FREEZE})).expect("json"),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(a.drafts(tenant).is_empty());

    // A draft only in memory (as one whose write failed before this fix): promoting it while the
    // store still cannot record it is undone.
    let info = a
        .upload_component("no-email", &wasm, intentgate::plugins::World::CheckPlugin)
        .expect("upload");
    let mut spec = BundleSpec::builtin().with_policy_config(FREEZE.into());
    spec.stages
        .get_mut(&intentgate::plugins::Stage::Policy)
        .expect("policy stage")
        .push(intentgate::bundles::CheckSpec {
            component: info.digest.clone(),
            config: r#"{"deny": ["send_email"]}"#.into(),
        });
    let draft = a.create_draft(tenant, "custom", spec).expect("draft");
    let promote = format!("/v1/admin/bundles/{}/promote", draft.digest);
    let before = a.status(tenant);
    let r = call(&a, tenant, hyper::Method::POST, &promote, None, b"").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(a.status(tenant), before, "the running bundle is unchanged");

    // Once the store works again the promotion stores the bundle and its component first, so a
    // replica starting on this store loads what the pointer names.
    sqlite_exec(&store, "ALTER TABLE bundles_away RENAME TO bundles").await;
    sqlite_exec(
        &store,
        "ALTER TABLE plugin_components_away RENAME TO plugin_components",
    )
    .await;
    let r = call(&a, tenant, hyper::Method::POST, &promote, None, b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let b = Registry::with_runtime(runtime).expect("replica b");
    Follower::new(b.clone(), Persist::new(store.db()))
        .load_all()
        .await
        .expect("a replica loads every stored pointer");
    assert_eq!(b.status(tenant).active, draft.digest);
    // Every component it names is stored, the built-in intent, Rego and budget ones too: a
    // build of the gateway with other built-ins (an upgrade) loads the bundle from these bytes.
    let persist = Persist::new(store.db());
    let spec = a
        .drafts(tenant)
        .into_iter()
        .find(|d| d.digest == draft.digest)
        .expect("the draft")
        .spec;
    let named: Vec<String> = spec.component_digests().map(str::to_owned).collect();
    assert!(named.len() >= 4, "{named:?}");
    for digest in named {
        let (_, _, wasm) = persist
            .component(&digest)
            .await
            .expect("read")
            .unwrap_or_else(|| panic!("component {digest} is not stored"));
        assert_eq!(Some(wasm.as_slice()), a.component_bytes(&digest).as_deref());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_dry_run_leaves_the_drafts_as_they_were() {
    let runtime = crate::support::gateway::shared_runtime();
    let a = Registry::with_runtime(runtime).expect("registry");
    let tenant = "dry-run-drafts";
    let post = |path: &'static str, body: Value| {
        let a = a.clone();
        async move {
            let body = serde_json::to_vec(&body).expect("json");
            call(&a, tenant, hyper::Method::POST, path, None, &body).await
        }
    };
    let dry_run = json!({"rego_source": FREEZE, "input": {"tool": "read_invoice"}});
    // No draft before: none after.
    let r = post("/v1/admin/policies/dry-run", dry_run.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["would_block"], 1, "{}", r.body);
    assert!(a.drafts(tenant).is_empty(), "the dry-run left a draft");
    // The operator's draft of the very same Rego survives a dry-run of it.
    let r = post(
        "/v1/admin/policies/drafts",
        json!({"rego_source": FREEZE, "name": "mine"}),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().expect("id").to_string();
    let r = post("/v1/admin/policies/dry-run", dry_run).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let drafts = a.drafts(tenant);
    assert_eq!(drafts.len(), 1, "{drafts:?}");
    assert_eq!(drafts[0].digest, id);
    assert_eq!(drafts[0].name, "mine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_over_a_pointer_another_replica_moved_is_refused_and_undone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = intentgate::store::connect(&intentgate::store::StoreConfig::Sqlite {
        path: dir.path().join("gateway.db"),
    })
    .await
    .expect("store");
    let runtime = crate::support::gateway::shared_runtime();
    let a = Registry::with_runtime(runtime.clone()).expect("replica a");
    let b = Registry::with_runtime(runtime).expect("replica b");
    a.attach_store(Persist::new(store.db()));
    b.attach_store(Persist::new(store.db()));
    let mut follow_b = Follower::new(b.clone(), Persist::new(store.db()));
    let tenant = "cas";
    let draft = |registry: &Registry, tag: &'static str| {
        let registry = registry.clone();
        async move {
            let rego = format!(
                "package intentgate.policy\n\ndecision := {{\"allow\": true, \"reason\": \"{tag}\"}}\n"
            );
            let body =
                serde_json::to_vec(&json!({"rego_source": rego, "name": tag})).expect("json");
            let r = call(
                &registry,
                tenant,
                hyper::Method::POST,
                "/v1/admin/policies/drafts",
                None,
                &body,
            )
            .await;
            assert_eq!(r.status, 201, "{}", r.body);
            r.body["id"].as_str().expect("id").to_string()
        }
    };
    let promote = |registry: &Registry, id: String| {
        let registry = registry.clone();
        async move {
            let body = serde_json::to_vec(&json!({"draft_id": id})).expect("json");
            call(
                &registry,
                tenant,
                hyper::Method::POST,
                "/v1/admin/policies/active",
                None,
                &body,
            )
            .await
        }
    };
    let from_a = draft(&a, "from a").await;
    let from_b = draft(&b, "from b").await;

    // a promotes; b has not followed yet and still runs the default bundle.
    let r = promote(&a, from_a.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(b.status(tenant).is_default);
    // b's promotion would overwrite a's without b ever having run it: refused and undone.
    let r = promote(&b, from_b.clone()).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("changed on another replica"),
        "{}",
        r.body
    );
    assert!(r.event.is_none());
    assert!(b.status(tenant).is_default, "b's swap was not undone");
    let persist = Persist::new(store.db());
    let stored = persist
        .pointer(tenant)
        .await
        .expect("read")
        .expect("pointer");
    assert_eq!(stored.active, from_a, "a's promotion was overwritten");

    // Once b follows, its promotion goes through, and then a's next swap is the one refused.
    follow_b.poll().await.expect("poll");
    assert_eq!(b.status(tenant).active, from_a);
    let r = promote(&b, from_b.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let stored = persist
        .pointer(tenant)
        .await
        .expect("read")
        .expect("pointer");
    assert_eq!((stored.active.as_str(), stored.seq), (from_b.as_str(), 2));
    let r = call(
        &a,
        tenant,
        hyper::Method::POST,
        "/v1/admin/policies/rollback",
        None,
        b"",
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(a.status(tenant).active, from_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_sees_and_uses_only_its_own_uploaded_components() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = intentgate::store::connect(&intentgate::store::StoreConfig::Sqlite {
        path: dir.path().join("gateway.db"),
    })
    .await
    .expect("store");
    let runtime = crate::support::gateway::shared_runtime();
    let a = Registry::with_runtime(runtime).expect("registry");
    a.attach_store(Persist::new(store.db()));
    let wasm = std::fs::read(intentgate::plugins::artifacts::TEST_CUSTOM_PATH).expect("artifact");
    let r = call(
        &a,
        "acme",
        hyper::Method::POST,
        "/v1/admin/plugins",
        Some("name=no-email"),
        &wasm,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let digest = r.body["digest"].as_str().expect("digest").to_string();
    let listed = |tenant: &'static str| {
        let a = a.clone();
        async move {
            let r = call(
                &a,
                tenant,
                hyper::Method::GET,
                "/v1/admin/plugins",
                None,
                b"",
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.body);
            r.body
                .as_array()
                .expect("list")
                .iter()
                .filter(|c| c["builtin"] == false)
                .map(|c| c["digest"].as_str().expect("digest").to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed("acme").await, vec![digest.clone()]);
    assert!(
        listed("globex").await.is_empty(),
        "globex sees acme's upload"
    );
    let one = format!("/v1/admin/plugins/{digest}");
    let r = call(&a, "globex", hyper::Method::GET, &one, None, b"").await;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = call(&a, "acme", hyper::Method::GET, &one, None, b"").await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The store records who uploaded it.
    let owners: Vec<String> = match store.db() {
        intentgate::store::Db::Sqlite(pool) => {
            sqlx::query_scalar("SELECT tenant FROM plugin_component_tenants WHERE digest = $1")
                .bind(&digest)
                .fetch_all(&pool)
                .await
                .expect("owners")
        }
        intentgate::store::Db::Postgres(_) => unreachable!("SQLite store"),
    };
    assert_eq!(owners, ["acme"]);

    // A bundle of globex cannot name acme's component; acme's can.
    let mut spec = BundleSpec::builtin().with_policy_config(FREEZE.into());
    spec.stages
        .get_mut(&intentgate::plugins::Stage::Policy)
        .expect("policy stage")
        .push(intentgate::bundles::CheckSpec {
            component: digest.clone(),
            config: r#"{"deny": ["send_email"]}"#.into(),
        });
    let body = serde_json::to_vec(&json!({"name": "borrowed", "spec": spec})).expect("json");
    let r = call(
        &a,
        "globex",
        hyper::Method::POST,
        "/v1/admin/bundles",
        None,
        &body,
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(a.drafts("globex").is_empty());
    let r = call(
        &a,
        "acme",
        hyper::Method::POST,
        "/v1/admin/bundles",
        None,
        &body,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drafts_uploads_and_the_history_are_bounded() {
    let runtime = crate::support::gateway::shared_runtime();
    let a = Registry::with_runtime(runtime).expect("registry");
    a.set_limits(2, 0);
    let tenant = "limits";
    let rego = |tag: usize| {
        serde_json::to_vec(&json!({"rego_source": format!(
            "package intentgate.policy\n\ndecision := {{\"allow\": true, \"reason\": \"{tag}\"}}\n"
        )}))
        .expect("json")
    };
    let post = |path: &'static str, body: Vec<u8>| {
        let a = a.clone();
        async move { call(&a, tenant, hyper::Method::POST, path, None, &body).await }
    };
    for i in 0..2 {
        let r = post("/v1/admin/policies/drafts", rego(i)).await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let r = post("/v1/admin/policies/drafts", rego(2)).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("delete some"),
        "{}",
        r.body
    );
    let spec = BundleSpec::builtin().with_policy_config(FREEZE.into());
    let body = serde_json::to_vec(&json!({"name": "third", "spec": spec})).expect("json");
    let r = post("/v1/admin/bundles", body).await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(a.drafts(tenant).len(), 2);
    // Another tenant has its own allowance.
    let r = call(
        &a,
        "limits-other",
        hyper::Method::POST,
        "/v1/admin/policies/drafts",
        None,
        &rego(0),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);

    // No room for uploads at all here.
    let wasm = std::fs::read(intentgate::plugins::artifacts::TEST_CUSTOM_PATH).expect("artifact");
    let r = call(
        &a,
        tenant,
        hyper::Method::POST,
        "/v1/admin/plugins",
        Some("name=no-email"),
        &wasm,
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert!(
        r.body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("uploaded components"),
        "{}",
        r.body
    );
    assert!(a.components().iter().all(|c| c.builtin));

    // The history keeps the last 1000 swaps of each tenant: another's swap is not pushed out.
    a.promote("bundle-sync-other", "default").expect("promote");
    let first = a.drafts(tenant)[0].digest.clone();
    a.promote(tenant, &first).expect("promote");
    for _ in 0..1100 {
        a.rollback(tenant).expect("rollback");
    }
    let history = a.history(tenant);
    assert_eq!(history.len(), 1000);
    assert_eq!(a.history("bundle-sync-other").len(), 1);
    assert_eq!(history.last().map(|h| h.action.as_str()), Some("rollback"));
    assert!(
        history.iter().all(|h| h.action == "rollback"),
        "the oldest went first"
    );
}
