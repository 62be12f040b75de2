//! Bundles end to end: content digests, drafts, promote and rollback under continuous
//! concurrent load (no failed or mis-attributed decision; after a swap returns no new request
//! sees the old bundle), a custom check built from the SDK template changing decisions without
//! restart, and dry-runs.

use crate::plugins::{input, registry};
use intentgate::bundles::{BundleError, BundleSpec, CheckSpec, RecordedCall};
use intentgate::plugins::{Stage, VerdictKind, artifacts};
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
    let registry = registry().clone();
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
    assert_eq!(
        registry
            .history()
            .iter()
            .filter(|h| h.tenant == tenant)
            .count(),
        25
    );
}

#[test]
fn a_custom_check_from_the_template_changes_decisions_without_restart() {
    let registry = registry();
    let tenant = "bundles-custom";
    let wasm = std::fs::read(artifacts::TEST_CUSTOM_PATH).expect("custom artifact");
    let info = registry
        .upload_component("no-email", &wasm)
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
