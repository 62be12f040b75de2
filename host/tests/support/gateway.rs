//! A gateway started in-process on a loopback port, with its own data directory, the store of
//! choice and an optional upstream, shut down through the same future Ctrl-C uses.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use intentgate::Gateway;
use intentgate::config::ServeArgs;
use serde_json::{Value, json};
use tokio::sync::oneshot;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    serve: ServeArgs,
}

/// Which store a test gateway uses.
#[derive(Clone, Debug)]
pub enum Backend {
    Sqlite,
    Postgres(String),
}

pub const ADMIN_TOKEN: &str = "test-superadmin-token-0123456789";
pub const MASTER_KEY: &str = "dGVzdC1tYXN0ZXIta2V5LTAxMjM0NTY3ODlhYmNkZWY";

/// The checks' deadlines of every test gateway: generous, so that only a test of the deadlines
/// sees one expire (see [`start`]). The plugin limits are process-wide, so every in-process
/// gateway of this test binary has these; a test of the deadlines works within them.
pub const TEST_CHECK_DEADLINES: [(&str, &str); 2] = [
    ("--plugin-deadline-ms", "1000"),
    ("--call-checks-deadline-ms", "3000"),
];

/// The same deadlines as environment variables, for the gateway binary.
pub const TEST_CHECK_DEADLINES_ENV: [(&str, &str); 2] = [
    ("INTENTGATE_PLUGIN_DEADLINE_MS", "1000"),
    ("INTENTGATE_CALL_CHECKS_DEADLINE_MS", "3000"),
];

/// The process-wide plugin runtime with the limits every in-process test gateway asks for
/// ([`TEST_CHECK_DEADLINES`]). A test that uses the shared runtime takes it here, so whichever
/// test touches it first, the gateways started after find the limits they ask for.
pub fn shared_runtime() -> std::sync::Arc<intentgate::plugins::Runtime> {
    intentgate::plugins::Runtime::shared_with(intentgate::plugins::Limits {
        call_deadline: std::time::Duration::from_millis(1000),
        call_checks_deadline: std::time::Duration::from_millis(3000),
        ..intentgate::plugins::Limits::default()
    })
    .expect("the shared runtime has the test gateways' limits")
}

pub struct TestGateway {
    pub addr: SocketAddr,
    pub url: String,
    pub gw: Arc<Gateway>,
    pub data_dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// Options beyond the defaults, as `--flag value` pairs.
pub async fn start(backend: Backend, upstream: Option<&str>, extra: &[&str]) -> TestGateway {
    let data_dir = tempfile::tempdir().expect("tempdir");
    let mut argv: Vec<String> = vec!["intentgate".into(), "--addr".into(), "127.0.0.1:0".into()];
    // A test that shares a data directory between gateways (restart, replicas) names its own.
    if !extra.contains(&"--data-dir") {
        argv.push("--data-dir".into());
        argv.push(data_dir.path().display().to_string());
    }
    argv.extend(["--admin-token".into(), ADMIN_TOKEN.into()]);
    // A test of a master key's change names its own.
    if !extra.contains(&"--master-key") {
        argv.extend(["--master-key".into(), MASTER_KEY.into()]);
    }
    if let Backend::Postgres(url) = &backend {
        argv.push("--postgres-url".into());
        argv.push(url.clone());
    }
    if let Some(u) = upstream {
        argv.push("--upstream-url".into());
        argv.push(u.into());
    }
    // Tests run with the token-scope policy (what --demo uses) unless they bring their own.
    if !extra
        .iter()
        .any(|f| *f == "--policy-file" || *f == "--demo")
    {
        argv.push("--policy-file".into());
        argv.push(format!(
            "{}/../policies/examples/token_scope.rego",
            env!("CARGO_MANIFEST_DIR")
        ));
    }
    // The tests' receivers listen on loopback, which a destination added over the admin API
    // may reach only when private networks are allowed; a test of that bound passes
    // `--outbox-allow-private-networks=false`.
    if !extra
        .iter()
        .any(|f| f.starts_with("--outbox-allow-private-networks"))
    {
        argv.push("--outbox-allow-private-networks".into());
    }
    // The checks' deadlines (by default 50 ms a plugin call, 200 ms a call's checks) are
    // wall-clock time: on a two-core machine running the whole suite, a guest call preempted
    // for longer would be refused and fail a test about something else.
    for (flag, ms) in TEST_CHECK_DEADLINES {
        if !extra.contains(&flag) {
            argv.extend([flag.to_owned(), ms.to_owned()]);
        }
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    let config = Args::try_parse_from(argv)
        .expect("flags")
        .serve
        .validate()
        .expect("valid config");
    let gw = Gateway::start(config).await.expect("gateway starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(intentgate::serve(Arc::clone(&gw), listener, async move {
        let _ = stopped.await;
    }));
    let task = tokio::spawn(async move {
        let _ = task.await;
    });
    // The revocation feed must have synced once before tokens verify.
    for _ in 0..100 {
        if gw.revocations.check_fresh().is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    TestGateway {
        addr,
        url: format!("http://{addr}"),
        gw,
        data_dir,
        stop: Some(stop),
        task: Some(task),
    }
}

impl TestGateway {
    /// Stops accepting and waits for the server to finish.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    /// Mints a token through the admin API; returns `(token, jti)`.
    pub async fn mint(&self, body: Value) -> (String, String) {
        let (status, v) = super::http::post_json(
            &format!("{}/v1/admin/mint", self.url),
            Some(ADMIN_TOKEN),
            &body,
        )
        .await;
        assert_eq!(status, 200, "mint failed: {v}");
        (
            v["token"].as_str().expect("token").to_owned(),
            v["jti"].as_str().expect("jti").to_owned(),
        )
    }

    /// Calls a tool over `/v1/mcp` without a session, as the IntentGate SDKs do.
    pub async fn tool_call(&self, token: &str, tool: &str, args: Value) -> Value {
        let (status, v) = super::http::post_json(
            &format!("{}/v1/mcp", self.url),
            Some(token),
            &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                    "params": {"name": tool, "arguments": args}}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        v
    }
}
