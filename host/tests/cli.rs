//! The operator CLI end to end: the real `intentgate` binary against a gateway started in this
//! process, redoing the README's quickstart with the CLI alone, and its conventions (profiles,
//! JSON output, exit codes, completions).

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use crate::support::gateway::{self, ADMIN_TOKEN, Backend};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

/// Runs the binary off the runtime's threads (the gateway serves on them), in `dir`, with the
/// profile file inside `dir` and the given environment.
async fn cli(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_intentgate"));
    cmd.args(args)
        .current_dir(dir)
        .env_remove("INTENTGATE_ADMIN_TOKEN")
        .env_remove("INTENTGATE_URL")
        .env_remove("INTENTGATE_TENANT")
        .env_remove("INTENTGATE_PROFILE")
        .env_remove("INTENTGATE_ADMIN_TOKEN_FILE")
        .env("INTENTGATE_CLI_CONFIG", dir.join("profiles.json"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("the binary runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn rpc_code(v: &Value) -> Option<i64> {
    v.get("error")
        .and_then(|e| e.get("code"))
        .and_then(Value::as_i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_with_the_cli_alone() {
    let gw = gateway::start(Backend::Sqlite, None, &["--demo"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let env = [
        ("INTENTGATE_URL", gw.url.as_str()),
        ("INTENTGATE_ADMIN_TOKEN", ADMIN_TOKEN),
    ];

    // Mint: --quiet prints the token alone.
    let minted = cli(
        d,
        &env,
        &[
            "tokens",
            "mint",
            "--subject",
            "agent-1",
            "--tenant",
            "acme",
            "--tool",
            "echo",
            "--max-calls",
            "100",
            "--ttl",
            "3600",
            "--quiet",
        ],
    )
    .await;
    assert_eq!(minted.code, 0, "{}", minted.stderr);
    let token = minted.stdout.trim().to_owned();
    let allowed = gw.tool_call(&token, "echo", json!({"text": "hi"})).await;
    assert!(allowed.get("result").is_some(), "{allowed}");

    // The bundle acme runs (the built-in default) can be fetched and written out to edit.
    let spec_file = d.join("bundle.json");
    let copied = cli(
        d,
        &env,
        &[
            "bundle",
            "new",
            "--from",
            "active",
            "--tenant",
            "acme",
            "--out",
            spec_file.to_str().expect("utf8"),
        ],
    )
    .await;
    assert_eq!(copied.code, 0, "{}", copied.stderr);
    let spec: Value =
        serde_json::from_slice(&std::fs::read(&spec_file).expect("spec file")).expect("json");
    assert!(spec["spec"].is_object(), "{spec}");
    assert_eq!(spec["name"], "default");

    // A deny-all policy, drafted and promoted for acme by the CLI, decides acme's next call.
    let rego = d.join("deny.rego");
    std::fs::write(
        &rego,
        "package intentgate.policy\n\ndecision := {\"allow\": false, \"reason\": \"frozen by cli test\"}\n",
    )
    .expect("write rego");
    let draft = cli(
        d,
        &env,
        &[
            "policy",
            "draft",
            rego.to_str().expect("utf8"),
            "--tenant",
            "acme",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(draft.code, 0, "{}", draft.stderr);
    let draft_id = draft.json()["id"].as_str().expect("draft id").to_owned();
    let promoted = cli(
        d,
        &env,
        &[
            "policy", "promote", &draft_id, "--tenant", "acme", "-o", "json",
        ],
    )
    .await;
    assert_eq!(promoted.code, 0, "{}", promoted.stderr);
    assert_eq!(promoted.json()["tenant"], "acme");
    let denied = gw.tool_call(&token, "echo", json!({"text": "hi"})).await;
    assert_eq!(rpc_code(&denied), Some(-32012), "{denied}");

    // The dry-run shows the change as a diff, then rollback restores the earlier policy.
    let active = cli(
        d,
        &env,
        &["policy", "active", "--tenant", "acme", "-o", "json"],
    )
    .await;
    assert_eq!(active.json()["draft_id"], draft_id.as_str());
    let rolled = cli(d, &env, &["policy", "rollback", "--tenant", "acme"]).await;
    assert_eq!(rolled.code, 0, "{}", rolled.stderr);
    let again = gw.tool_call(&token, "echo", json!({"text": "hi"})).await;
    assert!(again.get("result").is_some(), "{again}");
    let dry = cli(
        d,
        &env,
        &[
            "policy",
            "dry-run",
            rego.to_str().expect("utf8"),
            "--tenant",
            "acme",
            "--sample",
            "last-1h",
        ],
    )
    .await;
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    assert!(dry.stdout.contains("allow->block"), "{}", dry.stdout);
    assert!(dry.stdout.contains("+ block"), "{}", dry.stdout);

    // `policy test` runs the NAME_test.rego beside the policy, as the gateway does at start:
    // a failing test fails the command.
    let test = |d: &Path| d.join("deny_test.rego");
    let rego_arg = rego.to_str().expect("utf8").to_owned();
    let test_args = ["policy", "test", rego_arg.as_str(), "--tenant", "acme"];
    let run_test = || cli(d, &env, &test_args);
    let untested = run_test().await;
    assert_eq!(untested.code, 0, "{}", untested.stderr);
    assert!(
        untested.stdout.contains("no tests ran"),
        "{}",
        untested.stdout
    );
    std::fs::write(
        test(d),
        "package intentgate.policy_test\n\nimport data.intentgate.policy\n\ntest_frozen if {\n\tnot policy.decision.allow\n}\n",
    )
    .expect("write test");
    let passing = run_test().await;
    assert_eq!(passing.code, 0, "{}", passing.stderr);
    assert!(passing.stdout.contains("tests pass"), "{}", passing.stdout);
    std::fs::write(
        test(d),
        "package intentgate.policy_test\n\nimport data.intentgate.policy\n\ntest_open if {\n\tpolicy.decision.allow\n}\n",
    )
    .expect("write test");
    let failing = run_test().await;
    assert_ne!(failing.code, 0, "{}{}", failing.stdout, failing.stderr);
    assert!(failing.stderr.contains("test_open"), "{}", failing.stderr);
    std::fs::remove_file(test(d)).expect("remove test");

    // Revoke, then list shows the token as revoked; the next call is refused.
    let jti = cli(
        d,
        &env,
        &["tokens", "list", "--tenant", "acme", "-o", "json"],
    )
    .await;
    assert_eq!(jti.code, 0, "{}", jti.stderr);
    let rows = jti.json();
    let jti = rows[0]["jti"].as_str().expect("jti").to_owned();
    assert_eq!(rows[0]["subject"], "agent-1");
    let revoked = cli(
        d,
        &env,
        &[
            "tokens", "revoke", &jti, "--reason", "cli test", "--tenant", "acme",
        ],
    )
    .await;
    assert_eq!(revoked.code, 0, "{}", revoked.stderr);
    // A thousand later revocations: the token's is on the second page, and still shown.
    for i in 0..1000 {
        gw.gw
            .store
            .revoke(intentgate::store::NewRevocation {
                tenant: "acme".into(),
                jti: format!("later-{i}"),
                reason: "later".into(),
                revoked_by: "superadmin".into(),
            })
            .await
            .expect("revoke");
    }
    let listed = cli(
        d,
        &env,
        &["tokens", "list", "--tenant", "acme", "-o", "json"],
    )
    .await;
    assert!(
        listed.json()[0]["revoked_at"].is_string(),
        "{}",
        listed.stdout
    );
    let refused = gw.tool_call(&token, "echo", json!({})).await;
    assert_eq!(rpc_code(&refused), Some(-32010), "{refused}");

    // Audit: query by decision, verify online, export and resume a broken export.
    let blocked = cli(
        d,
        &env,
        &[
            "audit",
            "query",
            "--tenant",
            "acme",
            "--decision",
            "block",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(blocked.code, 0, "{}", blocked.stderr);
    assert!(
        !blocked.json()["items"]
            .as_array()
            .expect("items")
            .is_empty()
    );
    let verified = cli(d, &env, &["audit", "verify", "--tenant", "acme"]).await;
    assert_eq!(verified.code, 0, "{}{}", verified.stdout, verified.stderr);
    assert!(verified.stdout.starts_with("ok"), "{}", verified.stdout);
    // A checkpoint kept outside the gateway is checked online too, never ignored.
    let forged = d.join("forged.note");
    std::fs::write(&forged, "not a signed checkpoint\n").expect("write");
    let against = cli(
        d,
        &env,
        &[
            "audit",
            "verify",
            "--tenant",
            "acme",
            "--checkpoint",
            forged.to_str().expect("utf8"),
        ],
    )
    .await;
    assert_ne!(against.code, 0, "{}{}", against.stdout, against.stderr);
    assert!(against.stderr.contains("checkpoint"), "{}", against.stderr);

    let full = d.join("full.ndjson");
    let part = d.join("part.ndjson");
    let whole = cli(
        d,
        &env,
        &[
            "audit",
            "export",
            "--tenant",
            "acme",
            "--out",
            full.to_str().expect("utf8"),
        ],
    )
    .await;
    assert_eq!(whole.code, 0, "{}", whole.stderr);
    let text = std::fs::read_to_string(&full).expect("export");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 4, "{text}");
    // A transfer that broke off inside the third event.
    let cut = lines[0].len() + lines[1].len() + 2 + 10;
    std::fs::write(&part, &text.as_bytes()[..cut]).expect("write part");
    let resumed = cli(
        d,
        &env,
        &[
            "audit",
            "export",
            "--tenant",
            "acme",
            "--resume",
            "--out",
            part.to_str().expect("utf8"),
        ],
    )
    .await;
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    // The resumed file holds the same events (the export itself is audited, so a later
    // export may hold more at its end).
    let after = std::fs::read_to_string(&part).expect("resumed");
    assert!(after.starts_with(&text), "resumed export differs");
    assert!(
        resumed.stderr.contains("resuming after event"),
        "{}",
        resumed.stderr
    );
    // An export that fails (here, a token the gateway refuses) leaves an existing export as
    // it was: it is the evidence the command exists to keep.
    let refused = cli(
        d,
        &[
            ("INTENTGATE_URL", gw.url.as_str()),
            ("INTENTGATE_ADMIN_TOKEN", "not-the-admin-token-0123456789"),
        ],
        &[
            "audit",
            "export",
            "--tenant",
            "acme",
            "--out",
            full.to_str().expect("utf8"),
        ],
    )
    .await;
    assert_eq!(refused.code, 1, "{}{}", refused.stdout, refused.stderr);
    assert_eq!(
        std::fs::read_to_string(&full).expect("kept"),
        text,
        "the earlier export is untouched"
    );
    assert!(
        !d.join("full.ndjson.partial").exists(),
        "nothing arrived, nothing left"
    );

    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_exit_codes_and_completions() {
    let gw = gateway::start(Backend::Sqlite, None, &["--demo"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();

    // No token anywhere: a usage error (2) that says what to do.
    let none = cli(
        d,
        &[("INTENTGATE_URL", gw.url.as_str())],
        &["tokens", "list"],
    )
    .await;
    assert_eq!(none.code, 2, "{}", none.stderr);
    assert!(
        none.stderr.contains("INTENTGATE_ADMIN_TOKEN"),
        "{}",
        none.stderr
    );

    // A wrong token: refused (1) with a hint.
    let wrong = cli(
        d,
        &[
            ("INTENTGATE_URL", gw.url.as_str()),
            ("INTENTGATE_ADMIN_TOKEN", "nope"),
        ],
        &["tokens", "list"],
    )
    .await;
    assert_eq!(wrong.code, 1, "{}", wrong.stderr);
    // A file that cannot be read is not a chain that does not verify (exit 1): exit 4.
    let missing = d.join("missing.ndjson");
    let unread = cli(
        d,
        &[],
        &[
            "audit",
            "verify",
            "--file",
            missing.to_str().expect("utf8"),
            "--checkpoint",
            missing.to_str().expect("utf8"),
            "--public-key",
            "gw+00000000+AAAA",
        ],
    )
    .await;
    assert_eq!(unread.code, 4, "{}", unread.stderr);
    assert!(
        wrong.stderr.contains("401") && wrong.stderr.contains("hint"),
        "{}",
        wrong.stderr
    );

    // Nothing listening: unreachable (3).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let gone = cli(
        d,
        &[
            ("INTENTGATE_URL", dead.as_str()),
            ("INTENTGATE_ADMIN_TOKEN", ADMIN_TOKEN),
        ],
        &["tokens", "list"],
    )
    .await;
    assert_eq!(gone.code, 3, "{}", gone.stderr);
    assert!(gone.stderr.contains("cannot reach"), "{}", gone.stderr);

    // A profile with the token in a secrets.env file, used with no environment at all.
    let secrets = d.join("secrets.env");
    std::fs::write(&secrets, format!("INTENTGATE_ADMIN_TOKEN={ADMIN_TOKEN}\n")).expect("write");
    let set = cli(
        d,
        &[],
        &[
            "profile",
            "set",
            "local",
            "--url",
            &gw.url,
            "--token-file",
            secrets.to_str().expect("utf8"),
            "--tenant",
            "globex",
        ],
    )
    .await;
    assert_eq!(set.code, 0, "{}", set.stderr);
    let listed = cli(d, &[], &["profile", "list"]).await;
    assert!(
        !listed.stdout.contains(ADMIN_TOKEN),
        "a profile listing shows the token"
    );
    let minted = cli(d, &[], &["tokens", "mint", "--subject", "p", "-o", "json"]).await;
    assert_eq!(minted.code, 0, "{}", minted.stderr);
    assert_eq!(minted.json()["tenant"], "globex");

    let bash = cli(d, &[], &["completions", "bash"]).await;
    assert_eq!(bash.code, 0);
    assert!(bash.stdout.contains("intentgate") && bash.stdout.contains("tokens"));
    let help = cli(d, &[], &["tokens", "mint", "--help"]).await;
    assert!(help.stdout.contains("Examples:"), "{}", help.stdout);

    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_gateway_with_its_own_ca() {
    // A CA and a leaf for 127.0.0.1, generated now.
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "cli test CA");
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let leaf_key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let write = |name: &str, text: String| {
        let p = d.join(name);
        std::fs::write(&p, text).expect("write");
        p.to_str().expect("utf8").to_owned()
    };
    let cert = write("tls.pem", leaf.pem());
    let key = write("tls.key", leaf_key.serialize_pem());
    let ca_file = write("ca.pem", ca.pem());
    let gw = gateway::start(
        Backend::Sqlite,
        None,
        &["--tls-cert-file", &cert, "--tls-key-file", &key],
    )
    .await;
    let url = gw.url.replacen("http://", "https://", 1);
    let env = [
        ("INTENTGATE_URL", url.as_str()),
        ("INTENTGATE_ADMIN_TOKEN", ADMIN_TOKEN),
    ];
    let ok = cli(
        d,
        &env,
        &[
            "tokens",
            "mint",
            "--subject",
            "s",
            "--ca-file",
            &ca_file,
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(ok.json()["token"].is_string());
    // Another CA: a clear TLS failure, exit 3.
    let other_key = rcgen::KeyPair::generate().expect("key");
    let mut other = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    other.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other = write(
        "other.pem",
        other.self_signed(&other_key).expect("ca").pem(),
    );
    let untrusted = cli(
        d,
        &env,
        &["tokens", "mint", "--subject", "s", "--ca-file", &other],
    )
    .await;
    assert_eq!(untrusted.code, 3, "{}", untrusted.stderr);
    assert!(
        untrusted.stderr.to_lowercase().contains("certificate"),
        "{}",
        untrusted.stderr
    );
    gw.shutdown().await;
}

/// The caveat types of a token, in chain order.
fn caveat_types(token: &str) -> Vec<String> {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim())
        .expect("base64url token");
    let v: Value = serde_json::from_slice(&raw).expect("token JSON");
    v["cav"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| c["t"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `tokens mint --resource/--prompt` and `tokens attenuate --resource/--deny-resource/--prompt/
/// --deny-prompt` write the resource and prompt caveats, and the gateway enforces them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_carry_resource_and_prompt_scopes() {
    let gw = gateway::start(Backend::Sqlite, None, &["--demo"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let env = [
        ("INTENTGATE_URL", gw.url.as_str()),
        ("INTENTGATE_ADMIN_TOKEN", ADMIN_TOKEN),
    ];
    let minted = cli(
        d,
        &env,
        &[
            "tokens",
            "mint",
            "--subject",
            "a",
            "--resource",
            "file:///*",
            "--prompt",
            "greet",
            "--quiet",
        ],
    )
    .await;
    assert_eq!(minted.code, 0, "{}", minted.stderr);
    assert_eq!(
        caveat_types(&minted.stdout),
        ["agent_lock", "resource_allow", "prompt_allow"]
    );
    std::fs::write(d.join("parent.txt"), minted.stdout.trim()).expect("write");
    let child = cli(
        d,
        &[],
        &[
            "tokens",
            "attenuate",
            "--token-in",
            "parent.txt",
            "--deny-resource",
            "file:///secret*",
            "--deny-prompt",
            "greet",
        ],
    )
    .await;
    assert_eq!(child.code, 0, "{}", child.stderr);
    assert_eq!(
        caveat_types(&child.stdout),
        [
            "agent_lock",
            "resource_allow",
            "prompt_allow",
            "resource_deny",
            "prompt_deny"
        ]
    );
    // The child verifies at the gateway (an authenticated method answers).
    let (s, v) = crate::support::http::post_json(
        &format!("{}/v1/mcp", gw.url),
        Some(child.stdout.trim()),
        &json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}),
    )
    .await;
    assert_eq!((s, &v["result"]), (200, &json!({})), "{v}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_are_answered_from_the_cli() {
    let gw = gateway::start(Backend::Sqlite, None, &["--demo"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let env = [
        ("INTENTGATE_URL", gw.url.as_str()),
        ("INTENTGATE_ADMIN_TOKEN", ADMIN_TOKEN),
    ];
    let (token, _) = gw
        .mint(json!({"subject": "cli-agent", "tools": ["delete_records"]}))
        .await;
    let mut pending = Vec::new();
    // Two calls (the same call again would join its waiting approval).
    for table in ["t0", "t1"] {
        let v = gw
            .tool_call(&token, "delete_records", json!({"table": table}))
            .await;
        assert_eq!(rpc_code(&v), Some(-32019), "{v}");
        pending.push(
            v["error"]["data"]["pending_id"]
                .as_str()
                .expect("id")
                .to_owned(),
        );
    }
    let listed = cli(d, &env, &["approvals", "list", "-o", "json"]).await;
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    let ids: Vec<String> = listed.json()["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|r| r["pending_id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids, pending);
    let table = cli(d, &env, &["approvals", "list"]).await;
    assert!(
        table.stdout.contains(&pending[0]) && table.stdout.contains("delete_records"),
        "{}",
        table.stdout
    );

    let ok = cli(
        d,
        &env,
        &[
            "approvals",
            "approve",
            &pending[0],
            "--by",
            "ops",
            "--note",
            "fine",
        ],
    )
    .await;
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert!(ok.stdout.contains("approved"), "{}", ok.stdout);
    let no = cli(
        d,
        &env,
        &[
            "approvals",
            "reject",
            &pending[1],
            "--by",
            "ops",
            "-o",
            "json",
        ],
    )
    .await;
    assert_eq!(no.code, 0, "{}", no.stderr);
    assert_eq!(no.json()["approval"]["status"], "rejected");
    // Deciding again is refused (exit 1) with the reason; a malformed id is a usage error (2).
    let again = cli(
        d,
        &env,
        &["approvals", "approve", &pending[1], "--by", "ops"],
    )
    .await;
    assert_eq!(again.code, 1, "{}", again.stdout);
    assert!(again.stderr.contains("already decided"), "{}", again.stderr);
    let bad = cli(d, &env, &["approvals", "approve", "nope", "--by", "ops"]).await;
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    // The integrations listing answers (no destination configured: an empty table).
    let integrations = cli(d, &env, &["integrations", "-o", "json"]).await;
    assert_eq!(integrations.code, 0, "{}", integrations.stderr);
    assert!(integrations.json().is_object() || integrations.json().is_array());
    gw.shutdown().await;
}

/// `check-config` refuses (exit 2, by the setting's name, never quoting a secret) what `serve`
/// would refuse at start: a log filter that does not parse, a master key that is not base64 or
/// too short, an audit log key that does not parse. An empty INTENTGATE_LOG is unset.
#[tokio::test]
async fn check_config_refuses_what_serve_would() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let data = d.join("data");
    let data = data.to_str().expect("utf-8");
    let base = ["check-config", "--data-dir", data];
    let ok = cli(d, &[("INTENTGATE_LOG", "")], &base).await;
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    for (env, setting) in [
        (("INTENTGATE_LOG", "intentgate=loud"), "INTENTGATE_LOG"),
        (
            ("INTENTGATE_MASTER_KEY", "c2Vrcml0"),
            "INTENTGATE_MASTER_KEY",
        ),
        (
            ("INTENTGATE_AUDIT_LOG_KEY", "c2Vrcml0"),
            "INTENTGATE_AUDIT_LOG_KEY",
        ),
    ] {
        let run = cli(d, &[env], &base).await;
        assert_eq!(run.code, 2, "{setting}: {}{}", run.stdout, run.stderr);
        assert!(run.stderr.contains(setting), "{}", run.stderr);
        assert!(!run.stderr.contains("c2Vrcml0"), "{}", run.stderr);
    }
}
