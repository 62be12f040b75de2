//! Bundles end to end: content digests, drafts, promote and rollback under continuous
//! concurrent load (no failed or mis-attributed decision; after a swap returns no new request
//! sees the old bundle), a custom check built from the SDK template changing decisions without
//! restart, and dry-runs.

use crate::plugins::{input, registry};
use intentgate::bundles::admin::{AdminCall, AdminReply, handle};
use intentgate::bundles::{BundleError, BundleSpec, CheckSpec, RecordedCall};
use intentgate::plugins::{Stage, VerdictKind, World, artifacts};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A bundle whose policy allows everything with reason `tag`.
fn tagged_spec(tag: &str) -> BundleSpec {
    registry().default_spec().with_policy_config(format!(
        "package intentgate.policy\n\ndecision := {{\"allow\": true, \"reason\": \"{tag}\"}}\n"
    ))
}

#[test]
fn promote_and_rollback_under_load_never_fail_or_misattribute() {
    // This test is about attribution, not deadlines: a wall-clock deadline generous enough that
    // a loaded 2-core machine descheduling a worker cannot turn a decision into a timeout.
    let runtime = intentgate::plugins::Runtime::new(intentgate::plugins::Limits {
        call_deadline: std::time::Duration::from_secs(10),
        ..intentgate::plugins::Limits::default()
    })
    .expect("runtime");
    let registry = intentgate::bundles::Registry::with_runtime(runtime).expect("registry");
    let tenant = "bundles-load";
    let mut tag_of: HashMap<String, String> = HashMap::new();
    let mut digests = Vec::new();
    for i in 0..4 {
        let tag = format!("bundle-{i}");
        let draft = registry
            .create_draft(tenant, &tag, tagged_spec(&tag))
            .expect("draft");
        tag_of.insert(draft.digest.clone(), tag);
        digests.push(draft.digest);
    }
    registry
        .promote(tenant, &digests[0])
        .expect("first promote");
    let tag_of = Arc::new(tag_of);
    // expected[e]: the digest active once swap number e returned; later entries are swaps that
    // started since.
    let expected = Arc::new(Mutex::new(vec![digests[0].clone()]));
    let epoch = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let decisions = Arc::new(AtomicUsize::new(0));

    let workers: Vec<_> = (0..3)
        .map(|w| {
            let (registry, tag_of, expected, epoch, stop, decisions) = (
                registry.clone(),
                tag_of.clone(),
                expected.clone(),
                epoch.clone(),
                stop.clone(),
                decisions.clone(),
            );
            std::thread::spawn(move || {
                let call = input(tenant, "read_invoice");
                let mut n = 0usize;
                while !stop.load(Ordering::Acquire) {
                    let e = epoch.load(Ordering::Acquire);
                    let snapshot = registry.snapshot(tenant);
                    let (verdict, _) = snapshot
                        .decide(&call)
                        .unwrap_or_else(|err| panic!("worker {w}: {err}"));
                    assert_eq!(
                        verdict.kind,
                        VerdictKind::Allow,
                        "worker {w}: {}",
                        verdict.reason
                    );
                    let tag = tag_of.get(snapshot.digest()).expect("a known bundle");
                    assert_eq!(
                        &verdict.reason, tag,
                        "decision attributed to the bundle that made it"
                    );
                    let allowed: Vec<String> = expected.lock().expect("lock")[e..].to_vec();
                    assert!(
                        allowed.contains(&snapshot.digest().to_string()),
                        "worker {w} saw {} after swap {e} returned",
                        tag
                    );
                    n += 1;
                }
                decisions.fetch_add(n, Ordering::Relaxed);
            })
        })
        .collect();

    for i in 1..=24 {
        // Announce the target before swapping (a request may see it as soon as the swap starts),
        // and bump the epoch once the swap returned (from then on, nothing older may be seen).
        let rollback = i % 3 == 0;
        let target = if rollback {
            registry.status(tenant).previous.expect("a rollback target")
        } else {
            digests[i % 4].clone()
        };
        expected.lock().expect("lock").push(target.clone());
        let outcome = if rollback {
            registry.rollback(tenant).expect("rollback")
        } else {
            registry.promote(tenant, &target).expect("promote")
        };
        assert_eq!(outcome.to, target);
        assert_eq!(registry.snapshot(tenant).digest(), target);
        epoch.fetch_add(1, Ordering::Release);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    stop.store(true, Ordering::Release);
    for w in workers {
        w.join()
            .expect("worker panicked: a failed or mis-attributed decision");
    }
    assert!(
        decisions.load(Ordering::Relaxed) > 100,
        "only {} decisions",
        decisions.load(Ordering::Relaxed)
    );
    assert_eq!(registry.history(tenant).len(), 25);
}

/// With several policy checks, a later check's block wins over an earlier check's escalation
/// (an approval of the escalation must never answer a block nobody was shown), and a step-up
/// that any allowing check asks for is kept, whichever check words the verdict.
#[test]
fn a_later_policy_block_beats_an_escalation_and_every_step_up_is_kept() {
    let registry = registry();
    let tenant = "bundles-policy-combined";
    let rego = |rules: &str| format!("package intentgate.policy\n\n{rules}\n");
    let mut spec = registry.default_spec().with_policy_config(rego(
        r#"decision := {"allow": false, "escalate": true, "reason": "ask a person"} if {
	input.tool == "wire_funds"
} else := {"allow": true, "reason": "the first check allows"}"#,
    ));
    let policy = spec.checks(Stage::Policy)[0].component.clone();
    spec.stages
        .get_mut(&Stage::Policy)
        .expect("policy stage")
        .push(CheckSpec {
            component: policy,
            config: rego(
                r#"decision := {"allow": false, "reason": "wire_funds is never allowed"} if {
	input.tool == "wire_funds"
} else := {"allow": true, "requires_step_up": true, "reason": "the second check wants a step-up"}"#,
            ),
        });
    let draft = registry
        .create_draft(tenant, "combined", spec)
        .expect("draft");
    registry.promote(tenant, &draft.digest).expect("promote");

    let (verdict, _) = registry
        .snapshot(tenant)
        .decide(&input(tenant, "wire_funds"))
        .expect("decide");
    assert_eq!(verdict.kind, VerdictKind::Block, "{verdict:?}");
    assert!(verdict.reason.contains("never allowed"), "{verdict:?}");

    let (verdict, _) = registry
        .snapshot(tenant)
        .decide(&input(tenant, "read_report"))
        .expect("decide");
    assert_eq!(verdict.kind, VerdictKind::Allow, "{verdict:?}");
    assert_eq!(verdict.reason, "the first check allows");
    assert!(
        verdict.requires_step_up,
        "the second check's step-up: {verdict:?}"
    );
}

/// The intent and budget stages combine their checks like the policy stage: a later check's
/// block wins over an earlier check's escalation (before, the escalation ended the stage, so
/// an approval of it skipped the later checks' blocks), every step-up is kept, and an
/// escalated call carries every budget check's charges (before: none, so an approved call
/// was never charged to the bundle's budgets).
#[test]
fn intent_and_budget_stages_run_every_check_past_an_escalation() {
    let registry = registry();
    let tenant = "bundles-stages-combined";
    let wasm = std::fs::read(artifacts::TEST_CUSTOM_PATH).expect("custom artifact");
    let custom = registry
        .upload_component("step-up-over", &wasm, World::CheckPlugin)
        .expect("upload")
        .digest;
    let step_up = r#"{"step_up_over": {"arg": "amount", "limit": 1000}}"#;
    let promote = |name: &str, spec: BundleSpec| {
        let draft = registry.create_draft(tenant, name, spec).expect("draft");
        registry.promote(tenant, &draft.digest).expect("promote");
    };
    let budget_spec = |config: serde_json::Value| {
        let mut spec = registry.default_spec().clone();
        let stage = spec.stages.get_mut(&Stage::Budget).expect("budget stage");
        stage[0].config = config.to_string();
        stage.insert(
            0,
            CheckSpec {
                component: custom.clone(),
                config: step_up.into(),
            },
        );
        spec
    };
    let mut pay = input(tenant, "pay");
    pay.arguments = r#"{"amount": 5000}"#.into();

    // The built-in budget check allows: the escalation carries its charge.
    promote(
        "allows",
        budget_spec(serde_json::json!({"agent": {"calls": 10}})),
    );
    let out = registry.snapshot(tenant).budget(&pay).expect("budget");
    assert_eq!(out.verdict.kind, VerdictKind::Escalate, "{out:?}");
    assert!(out.verdict.requires_step_up, "{out:?}");
    assert_eq!(out.charges.len(), 1, "{out:?}");
    assert!(
        out.charges[0]
            .key
            .starts_with(&format!("{tenant}/agent-calls:")),
        "{out:?}"
    );
    // It blocks: its block wins over the escalation.
    promote(
        "blocks",
        budget_spec(serde_json::json!({"agent": {"calls": 0}})),
    );
    let out = registry.snapshot(tenant).budget(&pay).expect("budget");
    assert_eq!(out.verdict.kind, VerdictKind::Block, "{out:?}");
    assert!(out.verdict.reason.contains("budget exceeded"), "{out:?}");
    assert!(out.charges.is_empty(), "{out:?}");

    // The intent stage: the built-in check escalates a tool outside what the agent says it
    // does, a custom check after it blocks the tool.
    let mut spec = registry.default_spec().clone();
    let stage = spec.stages.get_mut(&Stage::Intent).expect("intent stage");
    stage[0].config = serde_json::json!({
        "rules": [{"name": "reading", "keywords": ["read"], "summary": "reading",
                   "allowed_tools": ["read_*"]}],
        "on_outside_allowed": "escalate"})
    .to_string();
    stage.push(CheckSpec {
        component: custom.clone(),
        config: r#"{"deny": ["pay"]}"#.into(),
    });
    promote("intent", spec);
    let out = registry.snapshot(tenant).intent(&pay).expect("intent");
    assert_eq!(out.verdict.kind, VerdictKind::Block, "{out:?}");
    assert!(out.verdict.reason.contains("custom check"), "{out:?}");
    let out = registry
        .snapshot(tenant)
        .intent(&input(tenant, "wire"))
        .expect("intent");
    assert_eq!(out.verdict.kind, VerdictKind::Escalate, "{out:?}");
    assert_eq!(out.record.summary, "reading", "{out:?}");
}

#[test]
fn a_custom_check_from_the_template_changes_decisions_without_restart() {
    let registry = registry();
    let tenant = "bundles-custom";
    let wasm = std::fs::read(artifacts::TEST_CUSTOM_PATH).expect("custom artifact");
    let info = registry
        .upload_component("no-email", &wasm, World::CheckPlugin)
        .expect("upload");
    let base = tagged_spec("base");
    let mut custom = base.clone();
    custom
        .stages
        .get_mut(&Stage::Policy)
        .expect("policy")
        .push(CheckSpec {
            component: info.digest.clone(),
            config:
                r#"{"deny": ["send_email_*"], "step_up_over": {"arg": "amount", "limit": 1000}}"#
                    .into(),
        });
    let base = registry.create_draft(tenant, "base", base).expect("base");
    let custom = registry
        .create_draft(tenant, "custom", custom)
        .expect("custom");
    registry
        .promote(tenant, &base.digest)
        .expect("promote base");
    let email = input(tenant, "send_email_internal");
    assert!(
        registry
            .snapshot(tenant)
            .decide(&email)
            .expect("decide")
            .0
            .is_allow()
    );

    registry
        .promote(tenant, &custom.digest)
        .expect("promote custom");
    let (verdict, _) = registry.snapshot(tenant).decide(&email).expect("decide");
    assert_eq!(verdict.kind, VerdictKind::Block);
    assert!(
        verdict
            .reason
            .contains("send_email_internal matches send_email_*"),
        "{}",
        verdict.reason
    );
    let mut pay = input(tenant, "pay");
    pay.arguments = r#"{"amount": 5000}"#.into();
    let (verdict, _) = registry.snapshot(tenant).decide(&pay).expect("decide");
    assert_eq!(verdict.kind, VerdictKind::Escalate);
    assert!(verdict.requires_step_up);

    let back = registry.rollback(tenant).expect("rollback");
    assert_eq!(back.to, base.digest);
    assert!(
        registry
            .snapshot(tenant)
            .decide(&email)
            .expect("decide")
            .0
            .is_allow()
    );
}

#[test]
fn drafts_are_content_addressed_and_validated() {
    let registry = registry();
    let tenant = "bundles-drafts";
    let a = registry
        .create_draft(tenant, "a", tagged_spec("a"))
        .expect("a");
    let again = registry
        .create_draft(tenant, "a-again", tagged_spec("a"))
        .expect("again");
    assert_eq!(a.digest, again.digest);
    assert_eq!(registry.drafts(tenant).len(), 1);
    let mut unknown = tagged_spec("a");
    unknown.stages.get_mut(&Stage::Budget).expect("budget")[0].component =
        format!("sha256:{}", "0".repeat(64));
    assert!(matches!(
        registry.create_draft(tenant, "x", unknown),
        Err(BundleError::UnknownComponent(_))
    ));
    let mut bad_config = tagged_spec("a");
    bad_config.stages.get_mut(&Stage::Intent).expect("intent")[0].config = "{\"rules\": 7}".into();
    assert!(matches!(
        registry.create_draft(tenant, "x", bad_config),
        Err(BundleError::Invalid {
            stage: Stage::Intent,
            ..
        })
    ));
    assert!(matches!(
        registry.promote(tenant, "sha256:nope"),
        Err(BundleError::UnknownBundle(_))
    ));
    assert!(matches!(
        registry.rollback("bundles-never-promoted"),
        Err(BundleError::NoPrevious(_))
    ));
    let status = registry.status("bundles-never-promoted");
    assert!(status.is_default && status.previous.is_none());
    assert!(registry.delete_draft(tenant, &a.digest));
    assert!(registry.drafts(tenant).is_empty());
}

#[test]
fn dry_run_counts_and_transitions() {
    let registry = registry();
    let tenant = "bundles-dry-run";
    let runbook = serde_json::json!({"modules": {"r.rego": include_str!("../../policies/examples/runbook.rego")}});
    let draft = registry
        .draft_policy(tenant, "runbook", runbook.to_string())
        .expect("draft");
    let record = |tool: &str, calls: u64, decision| {
        let mut call = input(tenant, tool);
        call.usage.calls_today_tool = calls;
        RecordedCall {
            input: call,
            decision,
            id: Some(format!("{tool}-{calls}")),
        }
    };
    let calls = vec![
        record("read_invoice", 0, VerdictKind::Block),
        record("send_email_internal", 10, VerdictKind::Allow),
        record("send_email_internal", 80, VerdictKind::Allow),
        record("delete_invoice", 0, VerdictKind::Block),
    ];
    let report = registry
        .dry_run(tenant, &draft.digest, &calls)
        .expect("dry run");
    assert_eq!(report.digest, draft.digest);
    assert_eq!(
        (
            report.total,
            report.would_allow,
            report.would_block,
            report.would_escalate
        ),
        (4, 2, 1, 1)
    );
    assert_eq!(report.transitions.get("block->allow"), Some(&1));
    assert_eq!(report.transitions.get("allow->allow"), Some(&1));
    assert_eq!(report.transitions.get("allow->escalate"), Some(&1));
    assert_eq!(report.transitions.get("block->block"), Some(&1));
    assert_eq!(report.divergent.len(), 2);
    // The dry-run activated nothing.
    assert!(registry.status(tenant).is_default);
}

/// A candidate that fails on every call is not replayed to the end: the replay stops after
/// a row of failures, each of which costs a fresh instance, and says so.
#[test]
fn a_dry_run_of_a_broken_candidate_stops_early() {
    let registry = registry();
    let tenant = "bundles-dry-run-broken";
    let wasm = std::fs::read(artifacts::TEST_HOSTILE_PATH).expect("hostile artifact");
    let hostile = registry
        .upload_component("hostile", &wasm, World::CheckPlugin)
        .expect("upload");
    let mut spec = tagged_spec("broken candidate");
    spec.stages
        .get_mut(&Stage::Policy)
        .expect("policy")
        .push(CheckSpec {
            component: hostile.digest.clone(),
            config: "trap".into(),
        });
    let calls: Vec<RecordedCall> = (0..200)
        .map(|n| RecordedCall {
            input: input(tenant, "read_invoice"),
            decision: VerdictKind::Allow,
            id: Some(format!("c{n}")),
        })
        .collect();
    let report = registry
        .dry_run_spec(tenant, &spec, &calls)
        .expect("dry run");
    assert_eq!(
        report.total,
        intentgate::bundles::DRY_RUN_FAILURES_IN_A_ROW,
        "{report:?}"
    );
    assert_eq!(report.would_block, report.total);
    assert!(
        report
            .stopped
            .as_deref()
            .is_some_and(|s| s.contains("in a row")),
        "{report:?}"
    );
}

fn admin<'a>(
    method: &'a hyper::Method,
    path: &'a str,
    query: Option<&'a str>,
    body: &'a [u8],
) -> AdminCall<'a> {
    AdminCall {
        method,
        path,
        query,
        tenant: "bundles-admin",
        actor: "ops@example.com",
        body,
    }
}

async fn run(registry: &intentgate::bundles::Registry, call: AdminCall<'_>) -> AdminReply {
    handle(registry, call).await.expect("one of our routes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_uploads_promotes_rolls_back_and_edits_policies() {
    let registry = registry().clone();
    let tenant = "bundles-admin";
    let (get, post, delete) = (
        hyper::Method::GET,
        hyper::Method::POST,
        hyper::Method::DELETE,
    );

    // A component of the wrong world is refused at upload; the template-built check is taken.
    let r = run(
        &registry,
        admin(
            &post,
            "/v1/admin/plugins",
            Some("name=siem"),
            artifacts::SIEM_JSON,
        ),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    let r = run(
        &registry,
        admin(
            &post,
            "/v1/admin/plugins",
            Some("name=junk"),
            b"\0asm\x01\0\0\0",
        ),
    )
    .await;
    assert_eq!(r.status, 422, "{}", r.body);
    let wasm = std::fs::read(artifacts::TEST_CUSTOM_PATH).expect("custom artifact");
    let r = run(
        &registry,
        admin(&post, "/v1/admin/plugins", Some("name=no-email"), &wasm),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.event.as_ref().map(|e| e.action), Some("plugin.upload"));
    let component = r.body["digest"].as_str().expect("digest").to_string();

    // A bundle with the custom check, promoted: decisions change without restart.
    let mut spec = tagged_spec("admin");
    spec.stages
        .get_mut(&Stage::Policy)
        .expect("policy")
        .push(CheckSpec {
            component,
            config: r#"{"deny": ["send_email_*"]}"#.into(),
        });
    let body =
        serde_json::to_vec(&serde_json::json!({"name": "no-email", "spec": spec})).expect("json");
    let r = run(&registry, admin(&post, "/v1/admin/bundles", None, &body)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let digest = r.body["digest"].as_str().expect("digest").to_string();
    let email = input(tenant, "send_email_internal");
    assert!(
        registry
            .snapshot(tenant)
            .decide(&email)
            .is_ok_and(|(v, _)| v.kind == VerdictKind::Block),
        "default denies"
    );
    let promote = format!("/v1/admin/bundles/{digest}/promote");
    let r = run(&registry, admin(&post, &promote, None, b"")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.event.as_ref().map(|e| e.action), Some("bundle.promote"));
    assert_eq!(registry.snapshot(tenant).digest(), digest);
    let (verdict, _) = registry.snapshot(tenant).decide(&email).expect("decide");
    assert!(
        verdict.reason.contains("custom check"),
        "{}",
        verdict.reason
    );
    assert!(
        registry
            .snapshot(tenant)
            .decide(&input(tenant, "read_invoice"))
            .expect("decide")
            .0
            .is_allow()
    );
    let r = run(&registry, admin(&get, "/v1/admin/bundles", None, b"")).await;
    assert_eq!(r.body["status"]["active"], digest.as_str());

    // The policies shorthand: draft the runbook policy, promote it, read it back, roll back.
    let rego = include_str!("../../policies/examples/runbook.rego");
    let body = serde_json::to_vec(&serde_json::json!({"name": "runbook", "rego_source": rego}))
        .expect("json");
    let r = run(
        &registry,
        admin(&post, "/v1/admin/policies/drafts", None, &body),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["rego_source"], rego);
    let id = r.body["id"].as_str().expect("id").to_string();
    let bad = serde_json::to_vec(&serde_json::json!({"rego_source": "package x\ndecision := {"}))
        .expect("json");
    assert_eq!(
        run(
            &registry,
            admin(&post, "/v1/admin/policies/drafts", None, &bad)
        )
        .await
        .status,
        400
    );
    let body = serde_json::to_vec(&serde_json::json!({"draft_id": id})).expect("json");
    let r = run(
        &registry,
        admin(&post, "/v1/admin/policies/active", None, &body),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["draft_id"], id.as_str());
    assert_eq!(r.body["name"], "runbook");
    let mut over_quota = input(tenant, "send_email_internal");
    over_quota.usage.calls_today_tool = 50;
    let (verdict, _) = registry
        .snapshot(tenant)
        .decide(&over_quota)
        .expect("decide");
    // The custom check of the active bundle is kept (the shorthand only replaces the Rego):
    // its block wins over the runbook's escalation of a call over its quota, which no approval
    // may answer.
    assert_eq!(verdict.kind, VerdictKind::Block, "{}", verdict.reason);
    assert!(
        verdict
            .reason
            .contains("send_email_internal matches send_email_*"),
        "{}",
        verdict.reason
    );
    let r = run(
        &registry,
        admin(&get, "/v1/admin/policies/active", None, b""),
    )
    .await;
    assert_eq!(r.body["bundle_digest"], id.as_str());
    let r = run(
        &registry,
        admin(&post, "/v1/admin/policies/rollback", None, b""),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(registry.snapshot(tenant).digest(), digest);
    // The rollback target (now the runbook draft) and the active bundle are not deleted: a
    // rollback and the replicas following the pointer rebuild from them.
    for gone in [id.as_str(), digest.as_str()] {
        let r = run(
            &registry,
            admin(
                &delete,
                &format!("/v1/admin/policies/drafts/{gone}"),
                None,
                b"",
            ),
        )
        .await;
        assert_eq!(r.status, 409, "{}", r.body);
    }
    assert!(registry.drafts(tenant).iter().any(|d| d.digest == id));

    // Dry-run a candidate against recorded calls.
    let calls = serde_json::json!([
        {"input": input(tenant, "read_invoice"), "decision": "block"},
        {"input": input(tenant, "delete_invoice"), "decision": "block"},
    ]);
    let body = serde_json::to_vec(&serde_json::json!({"rego_source": rego, "calls": calls}))
        .expect("json");
    let r = run(
        &registry,
        admin(&post, "/v1/admin/policies/dry-run", None, &body),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["transitions"]["block->allow"], 1);
    assert_eq!(r.body["transitions"]["block->block"], 1);
    // No more calls than a recorded sample holds.
    let many: Vec<serde_json::Value> = (0..=intentgate::bundles::sample::MAX_SAMPLE)
        .map(|_| serde_json::json!({"input": {"tool": "t"}, "decision": "block"}))
        .collect();
    let body =
        serde_json::to_vec(&serde_json::json!({"rego_source": rego, "calls": many})).expect("json");
    let r = run(
        &registry,
        admin(&post, "/v1/admin/policies/dry-run", None, &body),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);

    // Clearing the active policy returns to deny by default; unknown paths are not ours.
    assert_eq!(
        run(
            &registry,
            admin(&delete, "/v1/admin/policies/active", None, b"")
        )
        .await
        .status,
        204
    );
    assert!(registry.status(tenant).is_default);
    assert!(
        handle(&registry, admin(&get, "/v1/admin/tokens", None, b""))
            .await
            .is_none()
    );
}

#[test]
fn watch_mode_reloads_rego_and_wasm_on_save() {
    let registry = registry().clone();
    let tenant = "bundles-watch".to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let allow_all =
        "package intentgate.policy\n\ndecision := {\"allow\": true, \"reason\": \"watch v1\"}\n";
    std::fs::write(dir.path().join("policy.rego"), allow_all).expect("write");
    let _handle = intentgate::bundles::watch::watch(
        registry.clone(),
        dir.path().to_path_buf(),
        vec![tenant.clone()],
    )
    .expect("watch");
    let reason = |tool: &str| {
        registry
            .snapshot(&tenant)
            .decide(&input(&tenant, tool))
            .expect("decide")
            .0
            .reason
    };
    assert_eq!(reason("send_email_internal"), "watch v1");

    let wait_for = |want: &str, tool: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while reason(tool) != want {
            assert!(
                std::time::Instant::now() < deadline,
                "no reload to {want:?} (have {:?})",
                reason(tool)
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    // Saving new Rego reloads it.
    std::fs::write(
        dir.path().join("policy.rego"),
        allow_all.replace("v1", "v2"),
    )
    .expect("write");
    wait_for("watch v2", "send_email_internal");
    // Broken Rego is refused and the running bundle stays.
    std::fs::write(
        dir.path().join("policy.rego"),
        "package intentgate.policy\ndecision := {",
    )
    .expect("write");
    std::thread::sleep(std::time::Duration::from_millis(800));
    assert_eq!(reason("send_email_internal"), "watch v2");
    // Dropping a component (with its configuration) next to it adds a custom check.
    std::fs::write(
        dir.path().join("policy.rego"),
        allow_all.replace("v1", "v3"),
    )
    .expect("write");
    std::fs::write(
        dir.path().join("no-email.json"),
        r#"{"deny": ["send_email_*"]}"#,
    )
    .expect("write");
    let wasm = std::fs::read(artifacts::TEST_CUSTOM_PATH).expect("custom artifact");
    std::fs::write(dir.path().join("no-email.wasm"), wasm).expect("write");
    wait_for(
        "custom check: send_email_internal matches send_email_*",
        "send_email_internal",
    );
    assert_eq!(reason("read_invoice"), "watch v3");
}

/// Replica `a` stores its swaps in a SQLite store in `dir`; replica `b` follows them.
async fn two_replicas(
    dir: &tempfile::TempDir,
) -> (
    intentgate::bundles::Registry,
    intentgate::bundles::Registry,
    intentgate::bundles::persist::Follower,
) {
    use intentgate::bundles::persist::{Follower, Persist};
    let config = intentgate::store::StoreConfig::Sqlite {
        path: dir.path().join("gateway.db"),
    };
    let store = intentgate::store::connect(&config).await.expect("store");
    let runtime = crate::support::gateway::shared_runtime();
    let a = intentgate::bundles::Registry::with_runtime(runtime.clone()).expect("replica a");
    let b = intentgate::bundles::Registry::with_runtime(runtime).expect("replica b");
    a.attach_store(Persist::new(store.db()));
    let follow_b = Follower::new(b.clone(), Persist::new(store.db()));
    (a, b, follow_b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_follow_promotions_and_rollbacks_through_the_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, mut follow_b) = two_replicas(&dir).await;
    assert!(
        follow_b.poll().await.expect("poll").is_empty(),
        "nothing promoted yet"
    );

    let post = hyper::Method::POST;
    let tenant = "bundles-admin"; // the tenant `admin()` acts on
    let wasm = std::fs::read(artifacts::TEST_CUSTOM_PATH).expect("custom artifact");
    let r = run(
        &a,
        admin(&post, "/v1/admin/plugins", Some("name=no-email"), &wasm),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let mut spec = tagged_spec("replicated");
    spec.stages
        .get_mut(&Stage::Policy)
        .expect("policy")
        .push(CheckSpec {
            component: r.body["digest"].as_str().expect("digest").into(),
            config: r#"{"deny": ["send_email_*"]}"#.into(),
        });
    let body =
        serde_json::to_vec(&serde_json::json!({"name": "replicated", "spec": spec})).expect("json");
    let r = run(&a, admin(&post, "/v1/admin/bundles", None, &body)).await;
    let digest = r.body["digest"].as_str().expect("digest").to_string();
    let r = run(
        &a,
        admin(
            &post,
            &format!("/v1/admin/bundles/{digest}/promote"),
            None,
            b"",
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);

    // Replica b has never seen the component or the bundle: it loads both and swaps.
    assert_eq!(
        follow_b.poll().await.expect("poll"),
        vec![tenant.to_string()]
    );
    assert_eq!(b.snapshot(tenant).digest(), digest);
    let (verdict, _) = b
        .snapshot(tenant)
        .decide(&input(tenant, "send_email_internal"))
        .expect("decide");
    assert!(
        verdict.reason.contains("custom check"),
        "{}",
        verdict.reason
    );
    assert!(
        follow_b.poll().await.expect("poll").is_empty(),
        "no change, no swap"
    );

    // A rollback on a reaches b too.
    let r = run(&a, admin(&post, "/v1/admin/bundles/rollback", None, b"")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        follow_b.poll().await.expect("poll"),
        vec![tenant.to_string()]
    );
    assert!(b.status(tenant).is_default);
    assert_eq!(b.status(tenant).previous.as_deref(), Some(digest.as_str()));
}

/// A promote whose request goes away mid-swap (the client disconnected) still stores the
/// pointer it swapped to: the other replicas follow, and no replica runs a bundle the store
/// does not name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promote_whose_request_is_dropped_still_reaches_every_replica() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b, mut follow_b) = two_replicas(&dir).await;
    let tenant = "bundles-admin";
    let post = hyper::Method::POST;
    let body = serde_json::to_vec(
        &serde_json::json!({"name": "dropped", "spec": tagged_spec("dropped-promote")}),
    )
    .expect("json");
    let r = run(&a, admin(&post, "/v1/admin/bundles", None, &body)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let digest = r.body["digest"].as_str().expect("digest").to_string();
    let path = format!("/v1/admin/bundles/{digest}/promote");
    // The request is dropped a millisecond in, as hyper drops a disconnected client's.
    let _ = tokio::time::timeout(
        std::time::Duration::from_millis(1),
        handle(&a, admin(&post, &path, None, b"")),
    )
    .await;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while b.snapshot(tenant).digest() != digest {
        assert!(
            std::time::Instant::now() < until,
            "replica b never followed: a runs {}, b runs {}",
            a.snapshot(tenant).digest(),
            b.snapshot(tenant).digest()
        );
        let _ = follow_b.poll().await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(a.snapshot(tenant).digest(), digest);
}

/// The test component with a custom section of its own: other bytes, another digest, the
/// same code.
fn variant(n: u8) -> Vec<u8> {
    let mut wasm = std::fs::read(artifacts::TEST_CUSTOM_PATH).expect("custom artifact");
    wasm.extend_from_slice(&[0x00, 0x03, 0x01, b'v', n]);
    wasm
}

/// Parallel uploads are counted one after another against the tenant's quota (none passes
/// the check before the others are counted), and an upload whose request is dropped while
/// it compiles leaves nothing behind to count.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_keep_to_the_quota_in_parallel_and_when_dropped() {
    let runtime = crate::support::gateway::shared_runtime();
    let registry = intentgate::bundles::Registry::with_runtime(runtime).expect("registry");
    let post = hyper::Method::POST;
    let options = intentgate::bundles::admin::AdminOptions {
        max_components_per_tenant: 2,
        ..intentgate::bundles::admin::AdminOptions::default()
    };
    let uploads: Vec<_> = (0..8u8)
        .map(|n| {
            let (registry, wasm) = (registry.clone(), variant(n));
            tokio::spawn(async move {
                let options = intentgate::bundles::admin::AdminOptions {
                    max_components_per_tenant: 2,
                    ..intentgate::bundles::admin::AdminOptions::default()
                };
                let call = admin(
                    &hyper::Method::POST,
                    "/v1/admin/plugins",
                    Some("name=v"),
                    &wasm,
                );
                intentgate::bundles::admin::handle_with(&registry, call, &options)
                    .await
                    .expect("a route")
                    .status
            })
        })
        .collect();
    let mut created = 0;
    for u in uploads {
        if u.await.expect("join") == 201 {
            created += 1;
        }
    }
    assert_eq!(created, 2, "the quota is 2");
    let uploaded = |r: &intentgate::bundles::Registry| {
        r.components().into_iter().filter(|c| !c.builtin).count()
    };
    assert_eq!(uploaded(&registry), 2);

    // Dropped a millisecond in, while it compiles: nothing stays once the compile ends.
    let fresh =
        intentgate::bundles::Registry::with_runtime(crate::support::gateway::shared_runtime())
            .expect("registry");
    let wasm = variant(200);
    let _ = tokio::time::timeout(
        std::time::Duration::from_millis(1),
        intentgate::bundles::admin::handle_with(
            &fresh,
            admin(&post, "/v1/admin/plugins", Some("name=gone"), &wasm),
            &options,
        ),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(uploaded(&fresh), 0, "{:?}", fresh.components());
}

/// Each tenant's swaps have a gate of their own: a tenant whose promote is under way (its
/// gate held) holds up no other tenant's promote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_swap_in_progress_holds_up_no_other_tenants() {
    let runtime = crate::support::gateway::shared_runtime();
    let registry = intentgate::bundles::Registry::with_runtime(runtime).expect("registry");
    let gate = registry.swap_gate("slow-tenant");
    let _held = gate.lock().await;
    let post = hyper::Method::POST;
    let body = serde_json::to_vec(
        &serde_json::json!({"name": "other", "spec": tagged_spec("another tenant's")}),
    )
    .expect("json");
    let r = run(&registry, admin(&post, "/v1/admin/bundles", None, &body)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let path = format!(
        "/v1/admin/bundles/{}/promote",
        r.body["digest"].as_str().expect("digest")
    );
    let promoted = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        run(&registry, admin(&post, &path, None, b"")),
    )
    .await
    .expect("the other tenant's promote is not held up");
    assert_eq!(promoted.status, 200, "{}", promoted.body);
}

/// A draft's deletion waits for a swap of its tenant under way (it takes the tenant's gate):
/// a promote of that draft finishes first, and the draft, then active, is not deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drafts_deletion_waits_for_its_tenants_swap() {
    let runtime = crate::support::gateway::shared_runtime();
    let registry = intentgate::bundles::Registry::with_runtime(runtime).expect("registry");
    let post = hyper::Method::POST;
    let body = serde_json::to_vec(
        &serde_json::json!({"name": "kept", "spec": tagged_spec("deleted while promoted")}),
    )
    .expect("json");
    let r = run(&registry, admin(&post, "/v1/admin/bundles", None, &body)).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let digest = r.body["digest"].as_str().expect("digest").to_string();
    let gate = registry.swap_gate("bundles-admin");
    let held = gate.lock().await;
    let deleting = {
        let (registry, path) = (registry.clone(), format!("/v1/admin/bundles/{digest}"));
        tokio::spawn(async move {
            run(&registry, admin(&hyper::Method::DELETE, &path, None, b""))
                .await
                .status
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!deleting.is_finished(), "the deletion waits for the gate");
    drop(held);
    assert_eq!(deleting.await.expect("join"), 204);
}

/// Two rollbacks at once are recorded as the two swaps they make (each plans under the
/// tenant's gate), and promoting the active bundle again keeps the rollback target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_record_what_they_did_and_a_repeated_promote_keeps_the_rollback_target() {
    let runtime = crate::support::gateway::shared_runtime();
    let registry = intentgate::bundles::Registry::with_runtime(runtime).expect("registry");
    let post = hyper::Method::POST;
    let mut digests = Vec::new();
    for tag in ["swap record a", "swap record b"] {
        let body = serde_json::to_vec(&serde_json::json!({"name": tag, "spec": tagged_spec(tag)}))
            .expect("json");
        let r = run(&registry, admin(&post, "/v1/admin/bundles", None, &body)).await;
        assert_eq!(r.status, 201, "{}", r.body);
        digests.push(r.body["digest"].as_str().expect("digest").to_string());
    }
    for d in &digests {
        let path = format!("/v1/admin/bundles/{d}/promote");
        let r = run(&registry, admin(&post, &path, None, b"")).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // b active, a the rollback target. b promoted again: a stays the target.
    let again = format!("/v1/admin/bundles/{}/promote", digests[1]);
    let r = run(&registry, admin(&post, &again, None, b"")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let status = registry.status("bundles-admin");
    assert_eq!(status.active, digests[1]);
    assert_eq!(
        status.previous.as_deref(),
        Some(digests[0].as_str()),
        "promoting the active bundle again lost the rollback target"
    );

    // Two rollbacks queued behind the gate: b→a, then a→b, each recorded as made.
    let gate = registry.swap_gate("bundles-admin");
    let held = gate.lock().await;
    let rollbacks: Vec<_> = (0..2)
        .map(|_| {
            let registry = registry.clone();
            tokio::spawn(async move {
                run(
                    &registry,
                    admin(
                        &hyper::Method::POST,
                        "/v1/admin/bundles/rollback",
                        None,
                        b"",
                    ),
                )
                .await
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    drop(held);
    let mut recorded = Vec::new();
    for r in rollbacks {
        let r = r.await.expect("join");
        assert_eq!(r.status, 200, "{}", r.body);
        let event = r.event.expect("an event");
        assert_eq!(event.detail["from"], r.body["from"], "{}", event.detail);
        assert_eq!(event.detail["to"], r.body["to"], "{}", event.detail);
        recorded.push((event.detail["from"].clone(), event.detail["to"].clone()));
    }
    recorded.sort_by_key(|(from, _)| from.to_string());
    assert_ne!(
        recorded[0], recorded[1],
        "both recorded the same swap: {recorded:?}"
    );
    assert_eq!(registry.status("bundles-admin").active, digests[1]);
}

/// Dry-runs wait for a place: one a tenant at a time and two a gateway; past the wait, none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_take_turns_one_a_tenant_and_two_a_gateway() {
    let runtime = crate::support::gateway::shared_runtime();
    let registry = intentgate::bundles::Registry::with_runtime(runtime).expect("registry");
    let short = std::time::Duration::from_millis(200);
    let a = registry.dry_run_place("a", short).await.expect("a");
    assert!(
        registry.dry_run_place("a", short).await.is_none(),
        "a second dry-run of a tenant at once"
    );
    let b = registry.dry_run_place("b", short).await.expect("b");
    assert!(
        registry.dry_run_place("c", short).await.is_none(),
        "a third dry-run at once"
    );
    let waiting = {
        let registry = registry.clone();
        tokio::spawn(async move {
            registry
                .dry_run_place("c", std::time::Duration::from_secs(10))
                .await
                .is_some()
        })
    };
    drop(a);
    assert!(waiting.await.expect("join"), "c gets a's place once a ends");
    drop(b);
}
