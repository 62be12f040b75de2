//! The plugin runtime end to end with the real components built by `build.rs`: the default
//! bundle, hostile plugins failing closed within their deadline while other tenants keep
//! succeeding, world validation, the runbook policy, budget charges, the SIEM formatter.

use intentgate::bundles::Registry;
use intentgate::plugins::{
    CheckComponent, CheckInput, CheckPool, Limits, MemoryCounters, PluginError, Runtime, Stage,
    TokenInput, Usage, VerdictKind, World, artifacts,
};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub fn input(tenant: &str, tool: &str) -> CheckInput {
    CheckInput {
        tenant: tenant.into(),
        agent_id: "agent-trade-bot".into(),
        tool: tool.into(),
        arguments: r#"{"to": "ops@example.com"}"#.into(),
        intent_prompt: Some("read the March invoice".into()),
        token: TokenInput {
            jti: "jti-1".into(),
            root_jti: "jti-1".into(),
            subject: "agent-trade-bot".into(),
            zone: "default".into(),
            caveat_count: 2,
            max_calls: Some(1000),
            max_cents: None,
            step_up_at: None,
        },
        usage: Usage::default(),
    }
}

/// One registry (built-in components compiled once) for the whole test binary.
pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        crate::support::gateway::shared_runtime();
        Registry::builtin().expect("builtin registry")
    })
}

fn hostile_runtime() -> Arc<Runtime> {
    static RUNTIME: OnceLock<Arc<Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            Runtime::new(Limits {
                call_deadline: Duration::from_millis(150),
                configure_deadline: Duration::from_millis(300),
                max_memory_bytes: 16 << 20,
                max_instances: 64,
                ..Limits::default()
            })
            .expect("runtime")
        })
        .clone()
}

fn hostile_pool(mode: &str, tenant: &str) -> CheckPool {
    let runtime = hostile_runtime();
    let wasm = std::fs::read(artifacts::TEST_HOSTILE_PATH).expect("hostile artifact");
    let component = CheckComponent::new(&runtime, &wasm).expect("compile hostile");
    CheckPool::new(
        runtime,
        component,
        mode,
        Stage::Policy,
        tenant,
        Arc::new(MemoryCounters::default()),
    )
}

#[test]
fn default_bundle_denies_by_default_and_records_its_digest() {
    let registry = registry();
    let snapshot = registry.snapshot("plugins-default");
    assert_eq!(snapshot.digest(), registry.default_spec().digest());
    assert!(snapshot.digest().starts_with("sha256:"));
    let call = input("plugins-default", "read_invoice");
    let intent = snapshot.intent(&call).expect("intent");
    assert_eq!(intent.verdict.kind, VerdictKind::Allow);
    let verdict = snapshot.policy(&call, &intent.record).expect("policy");
    assert_eq!(
        (verdict.kind, verdict.reason.as_str()),
        (VerdictKind::Block, "denied by default")
    );
    let budget = snapshot.budget(&call).expect("budget");
    assert_eq!(budget.verdict.kind, VerdictKind::Allow);
    // The token's max_calls (1000 here) is the gateway's own charge, written once per call;
    // the default budget plugin does not charge it a second time.
    assert!(budget.charges.is_empty(), "{:?}", budget.charges);
}

#[test]
fn hostile_plugins_fail_closed_within_the_deadline_while_others_keep_serving() {
    // Another tenant keeps evaluating a well-behaved check the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let worker = {
        let (stop, served) = (stop.clone(), served.clone());
        std::thread::spawn(move || {
            let pool = hostile_pool("ok", "good-tenant");
            let call = input("good-tenant", "read_invoice");
            while !stop.load(Ordering::Relaxed) {
                let out = pool
                    .evaluate(&call, None)
                    .expect("the good tenant must keep succeeding");
                assert_eq!(out.verdict.kind, VerdictKind::Allow);
                served.fetch_add(1, Ordering::Relaxed);
            }
        })
    };

    let call = input("bad-tenant", "read_invoice");
    for _round in 0..2 {
        // Timed from a built pool: compiling the component (the first time, while the good
        // tenant's thread compiles too) is no part of the deadline.
        let pool = hostile_pool("loop", "bad-tenant");
        let started = Instant::now();
        let err = pool.evaluate(&call, None).expect_err("loop");
        assert!(matches!(err, PluginError::Timeout { .. }), "{err}");
        assert!(
            started.elapsed() < Duration::from_millis(1000),
            "loop stopped after {:?}",
            started.elapsed()
        );

        let err = hostile_pool("alloc", "bad-tenant")
            .evaluate(&call, None)
            .expect_err("alloc");
        assert!(matches!(err, PluginError::OutOfMemory { .. }), "{err}");

        let err = hostile_pool("trap", "bad-tenant")
            .evaluate(&call, None)
            .expect_err("trap");
        assert!(matches!(err, PluginError::Trap { .. }), "{err}");

        let garbage = hostile_pool("garbage", "bad-tenant");
        let err = garbage.evaluate(&call, None).expect_err("garbage");
        assert!(matches!(err, PluginError::Malformed { .. }), "{err}");
        assert_eq!(
            garbage.idle_count(),
            0,
            "an instance whose result was malformed went back to the pool"
        );

        // A result larger than a crossing may lift is refused while it is lifted, before the
        // host holds it (the reason's bound is checked only after).
        let err = hostile_pool("huge-reason:4194304", "bad-tenant")
            .evaluate(&call, None)
            .expect_err("huge");
        assert!(matches!(err, PluginError::Trap { .. }), "{err}");
        assert!(err.to_string().contains("fuel"), "{err}");

        let err = hostile_pool("configure-fail", "bad-tenant")
            .evaluate(&call, None)
            .expect_err("configure");
        assert!(matches!(err, PluginError::Configure { .. }), "{err}");

        let pool = hostile_pool("configure-loop", "bad-tenant");
        let started = Instant::now();
        let err = pool.warm().expect_err("configure-loop");
        assert!(matches!(err, PluginError::Configure { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_millis(2000));
    }
    std::thread::sleep(Duration::from_millis(50));
    stop.store(true, Ordering::Relaxed);
    worker.join().expect("good tenant worker");
    assert!(
        served.load(Ordering::Relaxed) > 10,
        "the good tenant was served {} times",
        served.load(Ordering::Relaxed)
    );
}

#[test]
fn a_trapped_instance_is_replaced_and_the_pool_keeps_working() {
    let pool = hostile_pool("sometimes-trap:3", "recycle-tenant");
    let call = input("recycle-tenant", "t");
    let mut outcomes = Vec::new();
    for _ in 0..7 {
        outcomes.push(pool.evaluate(&call, None).is_ok());
    }
    // calls 1, 2 ok; 3 traps (instance dropped); a fresh instance serves 4, 5; 6 traps; 7 ok.
    assert_eq!(outcomes, vec![true, true, false, true, true, false, true]);
    assert_eq!(pool.idle_count(), 1);
}

#[test]
fn instances_are_reused_and_bounded() {
    let runtime = Runtime::new(Limits {
        max_instances: 2,
        max_uses_per_instance: 3,
        ..Limits::default()
    })
    .expect("runtime");
    let wasm = std::fs::read(artifacts::TEST_HOSTILE_PATH).expect("hostile artifact");
    let component = CheckComponent::new(&runtime, &wasm).expect("compile");
    let pool = CheckPool::new(
        runtime.clone(),
        component.clone(),
        "ok",
        Stage::Policy,
        "t",
        Arc::new(MemoryCounters::default()),
    );
    for _ in 0..10 {
        pool.evaluate(&input("t", "x"), None).expect("ok");
        assert!(
            runtime.live_instances() <= 1,
            "one instance reused (recycled every 3 calls)"
        );
    }
    let other = CheckPool::new(
        runtime.clone(),
        component.clone(),
        "ok",
        Stage::Policy,
        "u",
        Arc::new(MemoryCounters::default()),
    );
    other.warm().expect("second slot");
    let third = CheckPool::new(
        runtime.clone(),
        component,
        "ok",
        Stage::Policy,
        "v",
        Arc::new(MemoryCounters::default()),
    );
    assert!(matches!(
        third.evaluate(&input("v", "x"), None),
        Err(PluginError::Busy(2))
    ));
    drop(other);
    third
        .evaluate(&input("v", "x"), None)
        .expect("a freed slot is usable again");
}

#[test]
fn components_are_validated_against_the_worlds() {
    let runtime = hostile_runtime();
    assert_eq!(
        runtime.validate(artifacts::POLICY_REGO).expect("policy"),
        World::CheckPlugin
    );
    assert_eq!(
        runtime.validate(artifacts::SIEM_JSON).expect("siem"),
        World::SiemFormatter
    );
    let err = CheckComponent::new(&runtime, artifacts::SIEM_JSON).expect_err("siem is not a check");
    assert!(matches!(err, PluginError::WrongWorld { .. }), "{err}");
    let core_module = b"\0asm\x01\0\0\0";
    assert!(matches!(
        runtime.validate(core_module),
        Err(PluginError::InvalidComponent(_))
    ));
    assert!(matches!(
        runtime.validate(b"garbage"),
        Err(PluginError::InvalidComponent(_))
    ));
    // The registry refuses a formatter as a check at draft time and garbage at upload.
    let registry = registry();
    assert!(matches!(
        registry.upload_component("siem-as-check", artifacts::SIEM_JSON, World::CheckPlugin),
        Err(intentgate::bundles::BundleError::WrongWorld {
            found: World::SiemFormatter,
            ..
        })
    ));
    let info = registry
        .upload_component("siem", artifacts::SIEM_JSON, World::SiemFormatter)
        .expect("upload siem");
    assert_eq!(info.world, World::SiemFormatter);
    let mut spec = registry.default_spec().clone();
    spec.stages.get_mut(&Stage::Policy).expect("policy stage")[0].component = info.digest;
    assert!(matches!(
        registry.create_draft("plugins-world", "wrong", spec),
        Err(intentgate::bundles::BundleError::NotACheck { .. })
    ));
    assert!(
        registry
            .upload_component("junk", b"\0asm\x0d\0\x01\0junk", World::CheckPlugin)
            .is_err()
    );
}

/// The built-in budget component with its WIT package version rewritten in place to 0.1.0
/// (same length, so the binary stays well formed): a component built for the old version.
fn built_for_wit_0_1_0() -> Vec<u8> {
    let mut wasm = artifacts::BUDGET.to_vec();
    let package = b"intentgate:plugin/";
    let mut rewritten = 0;
    let mut i = 0;
    while i + package.len() < wasm.len() {
        if wasm[i..].starts_with(package) {
            let rest = i + package.len();
            if let Some(at) = wasm[rest..(rest + 40).min(wasm.len())]
                .windows(6)
                .position(|w| w == b"@0.2.0")
            {
                wasm[rest + at..rest + at + 6].copy_from_slice(b"@0.1.0");
                rewritten += 1;
            }
        }
        i += 1;
    }
    assert!(rewritten > 0, "the component names our package");
    wasm
}

#[test]
fn a_component_built_for_another_wit_version_is_refused_by_name() {
    let runtime = hostile_runtime();
    let old = built_for_wit_0_1_0();
    for err in [
        runtime.validate(&old).expect_err("old version"),
        CheckComponent::new(&runtime, &old).expect_err("old version"),
    ] {
        let text = err.to_string();
        assert!(matches!(err, PluginError::WrongWorld { .. }), "{text}");
        assert!(
            text.contains("intentgate:plugin@0.1.0")
                && text.contains("intentgate:plugin@0.2.0")
                && text.contains("rebuild"),
            "{text}"
        );
    }
    // The current build of the same component loads.
    assert!(CheckComponent::new(&runtime, artifacts::BUDGET).is_ok());
}

const RUNBOOK: &str = include_str!("../../policies/examples/runbook.rego");
const RUNBOOK_TEST: &str = include_str!("../../policies/examples/runbook_test.rego");

#[test]
fn the_runbook_policy_works_as_written() {
    let registry = registry();
    let tenant = "plugins-runbook";
    let config = serde_json::json!({"modules": {"runbook.rego": RUNBOOK}, "tests": {"runbook_test.rego": RUNBOOK_TEST}});
    let draft = registry
        .draft_policy(tenant, "runbook", config.to_string())
        .expect("draft");
    registry.promote(tenant, &draft.digest).expect("promote");
    let snapshot = registry.snapshot(tenant);
    assert_eq!(snapshot.digest(), draft.digest);

    let decide = |tool: &str, calls_today: u64| {
        let mut call = input(tenant, tool);
        call.usage = Usage {
            calls_today_tool: calls_today,
            calls_today_total: calls_today,
        };
        snapshot.decide(&call).expect("decide").0
    };
    let v = decide("read_invoice", 500);
    assert_eq!(
        (v.kind, v.reason.as_str()),
        (VerdictKind::Allow, "read-only invoice access")
    );
    let v = decide("send_email_internal", 49);
    assert_eq!(
        (v.kind, v.reason.as_str()),
        (VerdictKind::Allow, "internal email under daily quota")
    );
    let v = decide("send_email_internal", 50);
    assert_eq!(v.kind, VerdictKind::Escalate);
    assert!(v.requires_step_up);
    assert_eq!(v.reason, "internal email over daily quota — review");
    let v = decide("delete_invoice", 0);
    assert_eq!(
        (v.kind, v.reason.as_str()),
        (VerdictKind::Block, "denied by default")
    );
}

#[test]
fn every_policy_in_policies_passes_its_rego_tests_and_broken_tests_fail() {
    let registry = registry();
    let cases = [
        (
            "default.rego",
            include_str!("../../policies/default.rego"),
            include_str!("../../policies/default_test.rego"),
        ),
        ("runbook.rego", RUNBOOK, RUNBOOK_TEST),
        (
            "intent_aware.rego",
            include_str!("../../policies/examples/intent_aware.rego"),
            include_str!("../../policies/examples/intent_aware_test.rego"),
        ),
    ];
    for (name, module, tests) in cases {
        let config = serde_json::json!({"modules": {name: module}, "tests": {"test.rego": tests}});
        registry
            .draft_policy("plugins-rego-tests", name, config.to_string())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        // The same tests against a policy that allows everything must fail.
        let wrong =
            "package intentgate.policy\n\ndecision := {\"allow\": true, \"reason\": \"x\"}\n";
        let config = serde_json::json!({"modules": {name: wrong}, "tests": {"test.rego": tests}});
        let err = registry
            .draft_policy("plugins-rego-tests", name, config.to_string())
            .expect_err(name);
        assert!(
            err.to_string().contains("Rego tests failed"),
            "{name}: {err}"
        );
    }
    let err = registry.draft_policy(
        "plugins-rego-tests",
        "syntax",
        "package intentgate.policy\ndecision := {".into(),
    );
    assert!(err.is_err());
}

#[test]
fn budget_charges_apply_only_when_asked_and_block_at_the_ceiling() {
    let registry =
        Registry::with_runtime(crate::support::gateway::shared_runtime()).expect("registry");
    let counters = registry.memory_counters().expect("memory counters");
    let tenant = "plugins-budget";
    let mut spec = registry.default_spec().clone().with_policy_config(
        "package intentgate.policy\n\ndecision := {\"allow\": true, \"reason\": \"ok\"}\n".into(),
    );
    spec.stages.get_mut(&Stage::Budget).expect("budget")[0].config =
        r#"{"agent": {"calls": 2, "window_secs": 3600}}"#.into();
    let draft = registry
        .create_draft(tenant, "budget", spec)
        .expect("draft");
    registry.promote(tenant, &draft.digest).expect("promote");
    let snapshot = registry.snapshot(tenant);
    let mut call = input(tenant, "read_invoice");
    call.token.max_calls = None;
    // Evaluating without charging never consumes budget.
    for _ in 0..5 {
        assert!(snapshot.budget(&call).expect("budget").verdict.is_allow());
    }
    for _ in 0..2 {
        let outcome = snapshot.budget(&call).expect("budget");
        assert!(outcome.verdict.is_allow());
        counters.charge_all(&outcome.charges).expect("charge fits");
    }
    let outcome = snapshot.budget(&call).expect("budget");
    assert_eq!(
        outcome.verdict.kind,
        VerdictKind::Block,
        "{}",
        outcome.verdict.reason
    );
    assert!(outcome.charges.is_empty());
    // Another tenant's counters are separate.
    let other = registry.snapshot("plugins-budget-other");
    assert!(
        other
            .budget(&input("plugins-budget-other", "read_invoice"))
            .expect("budget")
            .verdict
            .is_allow()
    );
}

#[test]
fn the_siem_formatter_builds_a_request() {
    let formatter = intentgate::plugins::siem::Formatter::new(
        crate::support::gateway::shared_runtime(),
        artifacts::SIEM_JSON,
        r#"{"format": "splunk-hec", "splunk_token": "t0k"}"#,
    )
    .expect("formatter");
    let request = formatter
        .format(&[r#"{"a":1}"#.to_string(), r#"{"b":2}"#.to_string()])
        .expect("format");
    let body = String::from_utf8(request.body).expect("utf8");
    assert_eq!(body.lines().count(), 2);
    assert!(body.starts_with(r#"{"event":{"a":1}"#), "{body}");
    assert!(
        request
            .headers
            .contains(&("authorization".to_string(), "Splunk t0k".to_string()))
    );
    assert!(formatter.format(&["not json".to_string()]).is_err());
}

fn hostile_component(runtime: &Arc<Runtime>) -> CheckComponent {
    let wasm = std::fs::read(artifacts::TEST_HOSTILE_PATH).expect("hostile artifact");
    CheckComponent::new(runtime, &wasm).expect("compile hostile")
}

fn pool_on(runtime: &Arc<Runtime>, mode: &str, tenant: &str) -> CheckPool {
    CheckPool::new(
        runtime.clone(),
        hostile_component(runtime),
        mode,
        Stage::Policy,
        tenant,
        Arc::new(MemoryCounters::default()),
    )
}

#[test]
fn a_tenant_at_its_instance_quota_is_refused_while_other_tenants_get_instances() {
    let runtime = Runtime::new(Limits {
        max_instances: 16,
        max_instances_per_tenant: 2,
        ..Limits::default()
    })
    .expect("runtime");
    let greedy = pool_on(&runtime, "ok", "greedy");
    greedy.warm().expect("first instance");
    greedy.warm().expect("second instance");
    let refused = greedy
        .warm()
        .expect_err("a third instance is over the quota");
    assert!(
        matches!(&refused, PluginError::TenantQuota { tenant, limit: 2 } if tenant == "greedy"),
        "{refused}"
    );
    assert!(
        refused
            .to_string()
            .contains("INTENTGATE_MAX_INSTANCES_PER_TENANT"),
        "{refused}"
    );
    // Another check of the same tenant is not shut out by instances idle in the first: it
    // takes one of them out, and the tenant still holds at most its quota.
    let call = input("greedy", "x");
    let sibling = pool_on(&runtime, "ok", "greedy");
    sibling
        .evaluate(&call, None)
        .expect("an idle instance of the tenant's other check gave its place");
    assert_eq!(greedy.idle_count(), 1);
    assert_eq!(sibling.idle_count(), 1);
    assert_eq!(runtime.tenant_instances("greedy"), 2);

    // The pool has room, and another tenant gets its instances.
    let modest = pool_on(&runtime, "ok", "modest");
    let out = modest
        .evaluate(&input("modest", "x"), None)
        .expect("another tenant is served");
    assert_eq!(out.verdict.kind, VerdictKind::Allow);
    assert_eq!(runtime.tenant_instances("modest"), 1);

    // Instances given back free the quota.
    greedy.trim();
    sibling.trim();
    assert_eq!(runtime.tenant_instances("greedy"), 0);
    sibling.evaluate(&call, None).expect("room again");
}

/// With every one of its instances in use (none idle to give its place), a tenant's next
/// call is refused by the quota.
#[test]
fn a_tenant_whose_instances_are_all_in_use_is_refused() {
    let runtime = Runtime::new(Limits {
        call_deadline: Duration::from_secs(10),
        max_instances: 16,
        max_instances_per_tenant: 2,
        ..Limits::default()
    })
    .expect("runtime");
    let slow = Arc::new(pool_on(&runtime, "slow:1500", "busy"));
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let slow = Arc::clone(&slow);
            std::thread::spawn(move || slow.evaluate(&input("busy", "x"), None))
        })
        .collect();
    while runtime.tenant_instances("busy") < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the slow calls began"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let other = pool_on(&runtime, "ok", "busy");
    assert!(matches!(
        other.evaluate(&input("busy", "x"), None),
        Err(PluginError::TenantQuota { .. })
    ));
    for c in calls {
        c.join().expect("join").expect("the slow calls end well");
    }
}

#[test]
fn a_spinning_plugin_does_not_stop_another_tenants_calls() {
    // A deadline far beyond the test, so only yielding lets the other tenant through.
    let runtime = Runtime::new(Limits {
        call_deadline: Duration::from_secs(600),
        max_instances: 8,
        ..Limits::default()
    })
    .expect("runtime");
    let spinning = Arc::new(pool_on(&runtime, "loop", "spinning"));
    let fine = pool_on(&runtime, "ok", "fine");
    fine.warm().expect("warm");
    // One runtime thread: with plugins that held it, the second call could not start.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    rt.block_on(async {
        let slow = {
            let pool = spinning.clone();
            tokio::spawn(async move { pool.evaluate_async(&input("spinning", "x"), None).await })
        };
        // Let the spinning call start (it runs until its first yield).
        tokio::task::yield_now().await;
        for _ in 0..3 {
            let out = fine
                .evaluate_async(&input("fine", "read_invoice"), None)
                .await
                .expect("the other tenant is decided");
            assert_eq!(out.verdict.kind, VerdictKind::Allow);
        }
        assert!(
            !slow.is_finished(),
            "the spinning call is still running while the other tenant was served"
        );
        assert_eq!(runtime.tenant_instances("spinning"), 1);
        // Abandoning the call (as the all-checks deadline does) frees its instance.
        slow.abort();
        assert!(slow.await.is_err_and(|e| e.is_cancelled()));
    });
    assert_eq!(runtime.tenant_instances("spinning"), 0);
    assert_eq!(spinning.idle_count(), 0);
}

#[test]
fn a_plugin_that_sleeps_in_the_host_traps_at_once_in_check_and_in_configure() {
    let call = input("sleepy", "read_invoice");
    // An hour: only a trap ends these before the test times out.
    let sleeper = hostile_pool("sleep:3600000", "sleepy");
    let err = sleeper.evaluate(&call, None).expect_err("sleeping");
    assert!(
        matches!(&err, PluginError::Trap { detail, .. } if detail.contains("plugins may not wait")),
        "{err}"
    );
    // The same on the request path, on a single runtime thread that the sleep must not hold.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let err = rt
        .block_on(sleeper.evaluate_async(&call, None))
        .expect_err("sleeping");
    assert!(err.to_string().contains("plugins may not wait"), "{err}");
    let err = hostile_pool("configure-sleep:3600000", "sleepy")
        .warm()
        .expect_err("sleeping in configure");
    assert!(
        matches!(&err, PluginError::Configure { message, .. } if message.contains("plugins may not wait")),
        "{err}"
    );
}

mod over_http {
    //! Hostile checks in a tenant's bundle, through a whole gateway on one runtime thread.

    use crate::support::gateway::{self, ADMIN_TOKEN, Backend, TestGateway};
    use crate::support::http::{get_json, post_json, send};
    use serde_json::{Value, json};

    async fn admin_post(tg: &TestGateway, path: &str, body: Value) -> (u16, Value) {
        post_json(&format!("{}{path}", tg.url), Some(ADMIN_TOKEN), &body).await
    }

    /// Uploads the hostile check for `tenant`; returns its digest.
    async fn upload_hostile(tg: &TestGateway, tenant: &str) -> String {
        let wasm = std::fs::read(intentgate::plugins::artifacts::TEST_HOSTILE_PATH)
            .expect("hostile artifact");
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let (status, _, body) = send(
            "POST",
            &format!("{}/v1/admin/plugins?tenant={tenant}&name=hostile", tg.url),
            &[
                ("authorization", &auth),
                ("content-type", "application/wasm"),
            ],
            wasm,
        )
        .await;
        let uploaded: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(status, 201, "{uploaded}");
        uploaded["digest"].as_str().expect("digest").to_string()
    }

    /// The running default bundle plus hostile policy checks in these modes.
    fn spec_with(tg: &TestGateway, component: &str, modes: &[String]) -> Value {
        let mut spec =
            serde_json::to_value(tg.gw.pipeline.registry().default_spec()).expect("spec");
        let checks = spec["stages"]["policy"]
            .as_array_mut()
            .expect("policy stage");
        for mode in modes {
            checks.push(json!({"component": component, "config": mode}));
        }
        spec
    }

    /// Drafts `spec` for `tenant`: (status, body).
    async fn draft(tg: &TestGateway, tenant: &str, spec: Value) -> (u16, Value) {
        admin_post(
            tg,
            &format!("/v1/admin/bundles?tenant={tenant}"),
            json!({"name": "hostile", "spec": spec}),
        )
        .await
    }

    async fn draft_and_promote(tg: &TestGateway, tenant: &str, spec: Value) {
        let (status, created) = draft(tg, tenant, spec).await;
        assert_eq!(status, 201, "{created}");
        let digest = created["digest"].as_str().expect("digest");
        let (status, v) = admin_post(
            tg,
            &format!("/v1/admin/bundles/{digest}/promote?tenant={tenant}"),
            json!({}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
    }

    async fn token_for(tg: &TestGateway, tenant: &str) -> String {
        tg.mint(json!({"subject": "bot", "tenant": tenant, "tools": ["read_invoice"], "ttl_seconds": 600}))
            .await
            .0
    }

    /// The audit events of `tenant`'s calls of `read_invoice`, newest first.
    async fn audited(tg: &TestGateway, tenant: &str) -> Vec<Value> {
        let (status, audit) = get_json(
            &format!(
                "{}/v1/admin/audit?tenant={tenant}&tool=read_invoice",
                tg.url
            ),
            ADMIN_TOKEN,
        )
        .await;
        assert_eq!(status, 200, "{audit}");
        let items = audit["items"].as_array().expect("items");
        items
            .iter()
            .filter(|e| e["event"] == "intentgate.tool_call")
            .cloned()
            .collect()
    }

    // One runtime thread: a check that held it (sleeping in the host) would stop the gateway.
    #[tokio::test]
    async fn a_sleeping_check_is_denied_and_audited_and_the_gateway_keeps_serving() {
        let tg = gateway::start(Backend::Sqlite, None, &["--demo"]).await;
        let component = upload_hostile(&tg, "sleepy").await;
        let spec = spec_with(&tg, &component, &["sleep:3600000".to_string()]);
        draft_and_promote(&tg, "sleepy", spec).await;
        let sleepy = token_for(&tg, "sleepy").await;
        let awake = token_for(&tg, "awake").await;
        for _ in 0..2 {
            let denied = tg
                .tool_call(&sleepy, "read_invoice", json!({"id": "INV-1"}))
                .await;
            assert_eq!(denied["error"]["code"], -32012, "{denied}");
            let reason = denied["error"]["data"].as_str().unwrap_or_default();
            assert!(reason.contains("plugins may not wait"), "{denied}");
            // Another tenant is served on the same connection pool and thread.
            let ok = tg
                .tool_call(&awake, "read_invoice", json!({"id": "INV-1"}))
                .await;
            assert!(ok["result"].is_object(), "{ok}");
        }
        let events = audited(&tg, "sleepy").await;
        assert_eq!(events.len(), 2, "{events:?}");
        for e in &events {
            assert_eq!(e["decision"], "block", "{e}");
            assert_eq!(e["check"], "policy", "{e}");
        }
        tg.shutdown().await;
    }

    // One runtime thread, as above: a plugin that panics writes to stderr, and a stream call
    // that entered tokio from the request path panicked the host and dropped the connection.
    #[tokio::test]
    async fn a_check_that_panics_is_denied_and_audited_and_the_gateway_keeps_serving() {
        let tg = gateway::start(Backend::Sqlite, None, &["--demo"]).await;
        let component = upload_hostile(&tg, "panicky").await;
        let spec = spec_with(&tg, &component, &["trap".to_string()]);
        draft_and_promote(&tg, "panicky", spec).await;
        let panicky = token_for(&tg, "panicky").await;
        let calm = token_for(&tg, "calm").await;
        for _ in 0..2 {
            let denied = tg
                .tool_call(&panicky, "read_invoice", json!({"id": "INV-1"}))
                .await;
            assert_eq!(denied["error"]["code"], -32012, "{denied}");
            let ok = tg
                .tool_call(&calm, "read_invoice", json!({"id": "INV-1"}))
                .await;
            assert!(ok["result"].is_object(), "{ok}");
        }
        let events = audited(&tg, "panicky").await;
        assert_eq!(events.len(), 2, "{events:?}");
        for e in &events {
            assert_eq!(e["decision"], "block", "{e}");
        }
        tg.shutdown().await;
    }

    #[tokio::test]
    async fn a_check_that_sleeps_in_configure_is_refused_without_holding_other_tenants() {
        let tg = gateway::start(Backend::Sqlite, None, &["--demo"]).await;
        let component = upload_hostile(&tg, "dozy").await;
        // Twenty seconds: were the sleep honoured, the draft would be accepted after it.
        let dozy = spec_with(&tg, &component, &["configure-sleep:20000".to_string()]);
        let tagged = spec_with(&tg, &component, &["ok".to_string()]);
        let other = upload_hostile(&tg, "busy").await;
        assert_eq!(other, component);
        let (refused, ()) = tokio::join!(draft(&tg, "dozy", dozy), async {
            draft_and_promote(&tg, "busy", tagged).await
        });
        let (status, body) = refused;
        assert_eq!(status, 400, "{body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(
            message.contains("policy check #1") && message.contains("plugins may not wait"),
            "{body}"
        );
        tg.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checks_past_the_calls_deadline_are_denied_and_audited() {
        let tg = gateway::start(Backend::Sqlite, None, &["--demo"]).await;
        let component = upload_hostile(&tg, "slowpoke").await;
        // Thirteen checks of 250 ms each (each well within its own 1 s deadline, the test
        // gateways' setting) with the default bundle's three: sixteen checks, the most a bundle
        // may hold, and more than the 3 s all the checks of one call may take together.
        let modes = vec!["slow:250".to_string(); 13];
        draft_and_promote(&tg, "slowpoke", spec_with(&tg, &component, &modes)).await;
        let token = token_for(&tg, "slowpoke").await;
        let denied = tg
            .tool_call(&token, "read_invoice", json!({"id": "INV-1"}))
            .await;
        assert_eq!(denied["error"]["code"], -32012, "{denied}");
        let reason = denied["error"]["data"].as_str().unwrap_or_default();
        assert!(reason.contains("deadline"), "{denied}");
        let events = audited(&tg, "slowpoke").await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["decision"], "block");

        // One check more than a bundle may hold is refused when drafted, naming the setting.
        let modes = vec!["ok".to_string(); 14];
        let (status, body) = draft(&tg, "slowpoke", spec_with(&tg, &component, &modes)).await;
        assert_eq!(status, 422, "{body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(
            message.contains("17 checks") && message.contains("INTENTGATE_MAX_CHECKS_PER_BUNDLE"),
            "{body}"
        );
        tg.shutdown().await;
    }
}

/// Issue 13 (idle costs nothing): the epoch ticker advances only while a guest call is in
/// flight. Without the gate it ticks every 2 ms forever, waking a core for nothing.
#[test]
fn the_epoch_ticker_is_parked_while_no_plugin_runs() {
    let runtime = Runtime::new(Limits {
        call_deadline: Duration::from_millis(100),
        configure_deadline: Duration::from_millis(300),
        max_memory_bytes: 16 << 20,
        max_instances: 8,
        ..Limits::default()
    })
    .expect("runtime");
    let wasm = std::fs::read(artifacts::TEST_HOSTILE_PATH).expect("hostile artifact");
    let component = CheckComponent::new(&runtime, &wasm).expect("compile hostile");
    let idle = runtime.epoch_ticks();
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(
        runtime.epoch_ticks(),
        idle,
        "the ticker ran with no call in flight"
    );

    let pool = CheckPool::new(
        runtime.clone(),
        component,
        "loop",
        Stage::Policy,
        "ticker",
        Arc::new(MemoryCounters::default()),
    );
    // A guest that spins is stopped only because the ticker runs during its call.
    let err = pool
        .evaluate(&input("ticker", "x"), None)
        .expect_err("a spinning guest is stopped");
    assert!(matches!(err, PluginError::Timeout { .. }), "{err}");
    assert!(
        runtime.epoch_ticks() > idle,
        "the ticker ran during the call"
    );
    assert_eq!(runtime.calls_in_flight(), 0);

    // It lingers a few ticks (20 ms), then parks again.
    let settled = parked_ticks(&runtime);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        runtime.epoch_ticks(),
        settled,
        "the ticker kept running after the call"
    );
}

/// Waits until the ticker parks (it lingers 10 ticks after the last call, longer when a loaded
/// machine runs it late); the epoch ticks then. Fails if it never parks.
fn parked_ticks(runtime: &Runtime) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !runtime.ticker_parked() {
        assert!(
            Instant::now() < deadline,
            "the ticker did not park after the calls"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    runtime.epoch_ticks()
}

/// Issue 13 (a system call less per guest call): while calls keep coming (here one every 3 ms), a starting call
/// finds the epoch ticker awake and does not wake it. Before, every call that started with none
/// in flight took the ticker's lock and made a `futex` wake, three times a request.
#[test]
fn calls_in_close_succession_do_not_wake_the_ticker_each_time() {
    let runtime = Runtime::new(Limits {
        max_memory_bytes: 16 << 20,
        max_instances: 8,
        ..Limits::default()
    })
    .expect("runtime");
    let pool = pool_on(&runtime, "ok", "ticker");
    // The ticker may rightly park between two guest calls 20 ms apart (it lingers 10 ticks): on
    // a loaded machine a 3 ms sleep, or the host's work around a guest call, sometimes lasts
    // that long. Such a gap lies inside the span from one `evaluate`'s start to the next one's
    // end, so a span over 15 ms allows one more wake.
    let mut long_spans = 0;
    let mut previous_start: Option<Instant> = None;
    for _ in 0..40 {
        let start = Instant::now();
        pool.evaluate(&input("ticker", "x"), None).expect("ok");
        if previous_start.is_some_and(|p| p.elapsed() > Duration::from_millis(15)) {
            long_spans += 1;
        }
        previous_start = Some(start);
        // Longer than a tick, so a ticker that parks at the first quiet tick parks here.
        std::thread::sleep(Duration::from_millis(3));
    }
    let wakes = runtime.ticker_wakes();
    assert!(
        (1..=3 + long_spans).contains(&wakes),
        "40 calls 3 ms apart woke the ticker {wakes} times ({long_spans} spans of over 15 ms)"
    );
    assert!(runtime.epoch_ticks() > 0, "the ticker ran during the calls");

    // Once calls stop it parks, and the next call wakes it again.
    let parked = parked_ticks(&runtime);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(runtime.epoch_ticks(), parked, "the ticker kept running");
    pool.evaluate(&input("ticker", "x"), None).expect("ok");
    assert_eq!(runtime.ticker_wakes(), wakes + 1);
}

/// Issue 13: the pool keeps an idle instance per request-path worker, so a call never pays
/// `instantiate` + `configure` because more workers evaluate at once than the pool kept.
#[test]
fn pools_keep_an_idle_instance_per_worker() {
    let runtime = Runtime::new(Limits {
        max_memory_bytes: 16 << 20,
        max_instances: 64,
        ..Limits::default()
    })
    .expect("runtime");
    let component = hostile_component(&runtime);
    let pool = |tenant: &str| {
        CheckPool::new(
            runtime.clone(),
            component.clone(),
            "ok",
            Stage::Policy,
            tenant,
            Arc::new(MemoryCounters::default()),
        )
    };
    let before = pool("four");
    for _ in 0..12 {
        before.warm().expect("warm");
    }
    assert_eq!(before.idle_count(), Limits::default().max_idle_per_pool);

    runtime.size_pools_for_workers(12);
    runtime.size_pools_for_workers(2); // a smaller server in the same process does not shrink it
    assert_eq!(runtime.idle_per_pool(), 12);
    let sized = pool("twelve");
    for _ in 0..16 {
        sized.warm().expect("warm");
    }
    assert_eq!(sized.idle_count(), 12);
}

/// Issue 13: a Rego configuration's tests run when the bundle is validated (draft, promote:
/// [`CheckPool::warm`]), not in `configure` of every instance that serves calls.
#[test]
fn rego_tests_run_at_validation_not_in_every_serving_instance() {
    let runtime = crate::support::gateway::shared_runtime();
    let component = CheckComponent::new(&runtime, artifacts::POLICY_REGO).expect("compile rego");
    let allow = "package intentgate.policy\n\ndecision := {\"allow\": true, \"reason\": \"ok\"}\n";
    let failing = "package intentgate.policy_test\n\ntest_never if false\n";
    let config =
        serde_json::json!({"modules": {"p.rego": allow}, "tests": {"p_test.rego": failing}});
    let pool = CheckPool::new(
        runtime,
        component,
        config.to_string(),
        Stage::Policy,
        "plugins-self-tests",
        Arc::new(MemoryCounters::default()),
    );
    let err = pool
        .warm()
        .expect_err("the tests run when the bundle is validated");
    assert!(err.to_string().contains("Rego tests failed"), "{err}");
    assert_eq!(pool.idle_count(), 0);
    // A serving instance is configured without them (they passed at promotion on the replica
    // that promoted): the call is decided by the policy alone.
    let out = pool
        .evaluate(&input("plugins-self-tests", "read_invoice"), None)
        .expect("served without re-running the tests");
    assert_eq!(out.verdict.kind, VerdictKind::Allow);
}
