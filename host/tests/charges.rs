//! Budget debits written in the audit transaction of their call (`AuditLog::append_charged`):
//! exact under concurrency, on one process, across two replicas and across two gateway
//! processes on one PostgreSQL; a refusal is recorded as what the caller is told.

use std::sync::Arc;

use intentgate::audit::{
    AuditConfig, AuditEvent, AuditLog, Debit, Decision, LogKey, kinds, verify,
};
use intentgate::store::{self, Store, StoreConfig};
use tokio::task::JoinSet;

fn key() -> LogKey {
    LogKey::from_seed("charges-gw", [7; 32]).expect("key")
}

fn allowed(tenant: &str, i: usize) -> AuditEvent {
    let mut e = AuditEvent::new(kinds::TOOL_CALL, tenant);
    e.decision = Some(Decision::Allow);
    e.tool = "echo".into();
    e.jti = format!("call-{i}");
    e
}

/// The rate debit first, so a refusal by `max_calls` must undo it.
fn debits(token: &str, max_calls: i64) -> Vec<Debit> {
    vec![
        Debit {
            key: format!("rate:{token}"),
            window: 60,
            amount: 1,
            limit: 1_000_000,
        },
        Debit {
            key: format!("calls:{token}"),
            window: 0,
            amount: 1,
            limit: max_calls,
        },
    ]
}

/// `calls` concurrent calls spread over `logs`, each charging `debits(token, max_calls)`;
/// returns how many were allowed. Every refusal says which limit refused it.
async fn race(logs: &[AuditLog], tenant: &str, token: &str, max_calls: i64, calls: usize) -> i64 {
    let mut set = JoinSet::new();
    for i in 0..calls {
        let log = logs[i % logs.len()].clone();
        let (tenant, token) = (tenant.to_owned(), token.to_owned());
        set.spawn(async move {
            log.append_charged(allowed(&tenant, i), debits(&token, max_calls))
                .await
                .expect("committed")
        });
    }
    let mut allowed = 0;
    while let Some(a) = set.join_next().await {
        match a.expect("task").refused {
            None => allowed += 1,
            Some(reason) => {
                assert_eq!(reason, format!("token max_calls of {max_calls} reached"));
            }
        }
    }
    allowed
}

async fn assert_counters(store: &Arc<dyn Store>, token: &str, n: i64) {
    let calls = store
        .counter(&format!("calls:{token}"), 0)
        .await
        .expect("calls");
    let rate = store
        .counter(&format!("rate:{token}"), 60)
        .await
        .expect("rate");
    assert_eq!(
        (calls, rate),
        (n, n),
        "the sum of charges equals the allowed calls, and refused calls left the rate counter alone"
    );
}

/// Each refusal is in the chain as a budget block, each allowed call as an allow, and the chain
/// verifies.
async fn assert_chain(store: &Arc<dyn Store>, tenant: &str, allowed: i64, refused: i64) {
    let db = store.db();
    let report = verify::verify_chain(&db, tenant, &key().verifier(), None)
        .await
        .expect("verify");
    assert!(report.ok, "{report:?}");
    assert_eq!(report.verified as i64, allowed + refused);
    let sql =
        "SELECT COUNT(*) FROM audit_events WHERE tenant = $1 AND decision = $2 AND check_name = $3";
    let count = |decision: &'static str, check: &'static str| {
        let db = db.clone();
        let tenant = tenant.to_owned();
        async move {
            match db {
                intentgate::audit::Db::Sqlite(p) => sqlx::query_scalar::<_, i64>(sql)
                    .bind(tenant)
                    .bind(decision)
                    .bind(check)
                    .fetch_one(&p)
                    .await
                    .expect("count"),
                intentgate::audit::Db::Postgres(p) => sqlx::query_scalar::<_, i64>(sql)
                    .bind(tenant)
                    .bind(decision)
                    .bind(check)
                    .fetch_one(&p)
                    .await
                    .expect("count"),
            }
        }
    };
    assert_eq!(count("allow", "").await, allowed);
    assert_eq!(count("block", "budget").await, refused);
}

async fn exact_under_concurrency(config: StoreConfig) {
    let store = store::connect(&config).await.expect("store");
    let log = AuditLog::open(store.db(), key(), AuditConfig::default())
        .await
        .expect("open");
    let allowed = race(std::slice::from_ref(&log), "t1", "tok-a", 10, 64).await;
    assert_eq!(allowed, 10);
    assert_counters(&store, "tok-a", 10).await;
    assert_chain(&store, "t1", 10, 54).await;
    let stats = log.stats();
    assert!(
        stats.batches < stats.events,
        "calls share commits: {} events in {} transactions",
        stats.events,
        stats.batches
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_charges_are_exact_and_ride_in_the_event_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    exact_under_concurrency(StoreConfig::Sqlite {
        path: dir.path().join("gw.db"),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_charges_are_exact_and_ride_in_the_event_commit() {
    let url = intentgate::testkit::PgServer::shared()
        .expect("postgres server")
        .fresh_database()
        .expect("fresh database");
    exact_under_concurrency(StoreConfig::Postgres { url }).await;
}

/// Two replicas (two pools, two logs, two tenants' writers each) charge one token: exactly
/// `max_calls` calls are allowed in total, with no deadlock between their batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_replicas_charge_one_token_exactly() {
    let url = intentgate::testkit::PgServer::shared()
        .expect("postgres server")
        .fresh_database()
        .expect("fresh database");
    let config = StoreConfig::Postgres { url };
    let a = store::connect(&config).await.expect("store a");
    let b = store::connect(&config).await.expect("store b");
    let log_a = AuditLog::open(a.db(), key(), AuditConfig::default())
        .await
        .expect("open a");
    let log_b = AuditLog::open(b.db(), key(), AuditConfig::default())
        .await
        .expect("open b");
    // Two tenants per replica share the token's counters, so batches of different writers
    // lock the same rows.
    let (ab, ba) = ([log_a.clone(), log_b.clone()], [log_b, log_a]);
    let (x, y) = tokio::join!(
        race(&ab, "tx", "shared", 25, 80),
        race(&ba, "ty", "shared", 25, 80),
    );
    assert_eq!(x + y, 25);
    assert_counters(&a, "shared", 25).await;
}

#[tokio::test]
async fn a_debit_that_sql_must_not_see_is_refused_before_the_queue() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store::connect(&StoreConfig::Sqlite {
        path: dir.path().join("gw.db"),
    })
    .await
    .expect("store");
    let log = AuditLog::open(store.db(), key(), AuditConfig::default())
        .await
        .expect("open");
    let bad = Debit {
        key: "ctl\u{1}key".into(),
        window: 0,
        amount: 1,
        limit: 1,
    };
    assert!(
        log.append_charged(allowed("t", 0), vec![bad])
            .await
            .is_err()
    );
    assert_eq!(log.stats().events, 0, "nothing was written");
}

/// A child process killed when dropped (a failed assertion leaves nothing running).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A gateway binary on PostgreSQL `url` (its own data directory, the shared master key), with
/// the demo tool server as its upstream; returns the child and its URL.
async fn pg_gateway_process(url: &str, data: &std::path::Path) -> (Killed, String) {
    use crate::support::binary::{collect_lines, demo_gateway, listening_url};
    let mut child = demo_gateway(data)
        .env("INTENTGATE_LOG_FORMAT", "json")
        .env("INTENTGATE_POSTGRES_URL", url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the gateway binary");
    let lines = collect_lines(child.stdout.take().expect("stdout"));
    match listening_url(&mut child, &lines).await {
        Ok(u) => (Killed(child), u),
        Err(e) => panic!("{e}"),
    }
}

/// Issue 13, as it is checked: two gateway **processes** on one PostgreSQL, one token with
/// `max_calls: N`, both under load at once: exactly N calls are allowed, every other one is a
/// budget refusal, and the shared audit chain records exactly N allowed calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateway_processes_on_one_postgres_allow_exactly_max_calls() {
    use crate::support::gateway::ADMIN_TOKEN;
    use crate::support::http::{get_json, post_json};
    use serde_json::{Value, json};
    const N: usize = 40;
    const ATTEMPTS: usize = 120;
    let url = intentgate::testkit::PgServer::shared()
        .expect("postgres server")
        .fresh_database()
        .expect("fresh database");
    let (da, db) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (_a, url_a) = pg_gateway_process(&url, da.path()).await;
    let (_b, url_b) = pg_gateway_process(&url, db.path()).await;
    let (status, minted) = post_json(
        &format!("{url_a}/v1/admin/mint"),
        Some(ADMIN_TOKEN),
        &json!({"subject": "agent", "tools": ["echo"], "max_calls": N}),
    )
    .await;
    assert_eq!(status, 200, "{minted}");
    let token = minted["token"].as_str().expect("token").to_owned();
    // 16 callers per process, all at once, until the attempts are spent.
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut callers = JoinSet::new();
    for i in 0..32 {
        let target = if i % 2 == 0 { &url_a } else { &url_b };
        let (target, token, next) = (format!("{target}/v1/mcp"), token.clone(), next.clone());
        callers.spawn(async move {
            let mut answers = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < ATTEMPTS {
                let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"text": "x"}}});
                let (_, v) = post_json(&target, Some(&token), &call).await;
                answers.push(v);
            }
            answers
        });
    }
    let answers: Vec<Value> = callers.join_all().await.into_iter().flatten().collect();
    assert_eq!(answers.len(), ATTEMPTS);
    let allowed = answers.iter().filter(|v| v.get("result").is_some()).count();
    let refused = answers
        .iter()
        .filter(|v| v["error"]["code"] == -32013)
        .count();
    assert_eq!(
        allowed, N,
        "exactly max_calls allowed across both processes"
    );
    assert_eq!(
        refused,
        ATTEMPTS - N,
        "every other call is a budget refusal"
    );
    // The one chain both processes write holds exactly the allowed calls.
    let (_, audit) = get_json(
        &format!("{url_b}/v1/admin/audit?tenant=default&tool=echo&decision=allow&limit=500"),
        ADMIN_TOKEN,
    )
    .await;
    let items = audit["items"].as_array().expect("items");
    let calls = items
        .iter()
        .filter(|e| e["event"] == "intentgate.tool_call" && e["decision"] == "allow")
        .count();
    assert_eq!(calls, N, "allowed tool calls in the chain");
}
