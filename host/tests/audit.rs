//! The audit chain against real databases: concurrent writers (one and several tenants, and two
//! "replicas" on one PostgreSQL), crash safety under `kill -9`, tamper detection (edited event,
//! consistently rewritten chain, deleted tail), overload behaviour, checkpoints, listing, and a
//! large streamed export verified offline.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use intentgate::audit::export::{self, Format};
use intentgate::audit::log::link_hash;
use intentgate::audit::{
    self, ArgValuesMode, AuditConfig, AuditError, AuditEvent, AuditFilter, AuditLog, Db, Decision,
    LogKey, kinds, offline, query, verify,
};
use intentgate::store::{self, StoreConfig};
use serde_json::json;
use tokio::task::JoinSet;

// ---------------------------------------------------------------------------------------------
// helpers

async fn sqlite_at(path: &Path) -> Db {
    store::connect(&StoreConfig::Sqlite {
        path: path.to_path_buf(),
    })
    .await
    .expect("sqlite store")
    .db()
}

async fn postgres_url() -> String {
    intentgate::testkit::PgServer::shared()
        .expect("postgres server")
        .fresh_database()
        .expect("fresh database")
}

async fn postgres_at(url: &str) -> Db {
    store::connect(&StoreConfig::Postgres {
        url: url.to_owned(),
    })
    .await
    .expect("postgres store")
    .db()
}

fn test_key() -> LogKey {
    LogKey::from_seed("test-gw", [42; 32]).expect("key")
}

fn event(tenant: &str, i: usize) -> AuditEvent {
    let mut e = AuditEvent::new(kinds::TOOL_CALL, tenant);
    e.decision = Some(if i.is_multiple_of(3) {
        Decision::Block
    } else {
        Decision::Allow
    });
    if i.is_multiple_of(3) {
        e.check = "policy".into();
        e.reason = "rule deny_writes matched".into();
    }
    e.agent_id = format!("agent-{}", i % 4);
    e.tool = format!("tool_{}", i % 5);
    e.jti = format!("jti-{i}");
    e.root_jti = format!("root-{}", i % 2);
    e.caveat_count = Some(2);
    e.latency_ms = Some(i as u64 % 17);
    e.upstream_status = (!i.is_multiple_of(3)).then_some(200);
    e.remote_ip = "127.0.0.1".into();
    e.with_arguments(
        ArgValuesMode::Raw,
        &json!({"path": "/tmp/ünï\u{2028}", "n": i, "ratio": 0.1 * i as f64,
                "nested": {"x": [1, 2.5e-7, 1e21, null, true]}}),
    )
}

/// Runs `tasks` tasks appending `per_task` events each, tenants round-robin over tasks; returns
/// every acknowledgement.
async fn hammer(
    logs: &[AuditLog],
    tenants: &[&str],
    tasks: usize,
    per_task: usize,
) -> Vec<(String, audit::Appended)> {
    let mut set = JoinSet::new();
    for t in 0..tasks {
        let log = logs[t % logs.len()].clone();
        let tenant = tenants[t % tenants.len()].to_owned();
        set.spawn(async move {
            let mut acks = Vec::with_capacity(per_task);
            for i in 0..per_task {
                let a = log
                    .append(event(&tenant, t * per_task + i))
                    .await
                    .expect("append");
                acks.push((tenant.clone(), a));
            }
            acks
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.expect("task"));
    }
    all
}

/// Every tenant's acknowledged positions are exactly 1..=n, ids are unique, and the chain
/// verifies with n events.
async fn assert_no_fork_no_gap(db: &Db, key: &LogKey, acks: &[(String, audit::Appended)]) {
    let mut by_tenant: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    let mut ids = HashSet::new();
    for (tenant, a) in acks {
        by_tenant.entry(tenant).or_default().push(a.seq);
        assert!(ids.insert(a.id), "id {} acknowledged twice", a.id);
    }
    for (tenant, mut seqs) in by_tenant {
        seqs.sort_unstable();
        let n = seqs.len() as u64;
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "positions of {tenant}");
        let report = verify::verify_chain(db, tenant, &key.verifier(), None)
            .await
            .expect("verify");
        assert!(report.ok, "{tenant}: {report:?}");
        assert_eq!(report.verified, n);
        assert_eq!(report.head_seq, n);
        assert!(report.head_at.is_some() && report.head_id.is_some());
    }
}

async fn count_rows(db: &Db, tenant: &str) -> i64 {
    query::count_after(db, tenant, 0).await.expect("count")
}

/// Executes SQL written with `$n` placeholders on either backend, binding text or integers.
async fn exec(db: &Db, sql: &str, args: &[&dyn ArgLike]) {
    match db {
        Db::Sqlite(p) => {
            let mut q = sqlx::query(sql);
            for a in args {
                q = a.bind_sqlite(q);
            }
            q.execute(p).await.expect(sql);
        }
        Db::Postgres(p) => {
            let mut q = sqlx::query(sql);
            for a in args {
                q = a.bind_pg(q);
            }
            q.execute(p).await.expect(sql);
        }
    }
}

type SqliteQ<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;
type PgQ<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

trait ArgLike: Sync {
    fn bind_sqlite<'q>(&'q self, q: SqliteQ<'q>) -> SqliteQ<'q>;
    fn bind_pg<'q>(&'q self, q: PgQ<'q>) -> PgQ<'q>;
}
impl ArgLike for i64 {
    fn bind_sqlite<'q>(&'q self, q: SqliteQ<'q>) -> SqliteQ<'q> {
        q.bind(*self)
    }
    fn bind_pg<'q>(&'q self, q: PgQ<'q>) -> PgQ<'q> {
        q.bind(*self)
    }
}
impl ArgLike for String {
    fn bind_sqlite<'q>(&'q self, q: SqliteQ<'q>) -> SqliteQ<'q> {
        q.bind(self.as_str())
    }
    fn bind_pg<'q>(&'q self, q: PgQ<'q>) -> PgQ<'q> {
        q.bind(self.as_str())
    }
}

/// A tenant's rows in chain order.
async fn rows(db: &Db, tenant: &str) -> Vec<query::ChainRow> {
    query::chain_page(db, tenant, 0, i64::MAX, 100_000)
        .await
        .expect("rows")
}

async fn append_n(log: &AuditLog, tenant: &str, n: usize) -> Vec<audit::Appended> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(log.append(event(tenant, i)).await.expect("append"));
    }
    out
}

fn quiet_config() -> AuditConfig {
    AuditConfig {
        checkpoint_every: 1_000_000,
        checkpoint_interval: Duration::from_secs(3600),
        ..AuditConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// concurrency: no fork, no gap

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_concurrent_writers_one_tenant_and_several() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = sqlite_at(&dir.path().join("audit.db")).await;
    let key = test_key();
    let log = AuditLog::open(db.clone(), key.clone(), AuditConfig::default())
        .await
        .expect("open");
    let acks = hammer(std::slice::from_ref(&log), &["solo"], 64, 25).await;
    assert_no_fork_no_gap(&db, &key, &acks).await;
    let acks = hammer(std::slice::from_ref(&log), &["a", "b", "c"], 60, 20).await;
    assert_no_fork_no_gap(&db, &key, &acks).await;
    let stats = log.stats();
    assert_eq!(stats.events, 64 * 25 + 60 * 20);
    assert!(
        stats.batches < stats.events,
        "group commit: {} events in {} transactions",
        stats.events,
        stats.batches
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_concurrent_writers_and_two_replicas() {
    let url = postgres_url().await;
    let key = test_key();
    let db_a = postgres_at(&url).await;
    let db_b = postgres_at(&url).await;
    let a = AuditLog::open(db_a.clone(), key.clone(), AuditConfig::default())
        .await
        .expect("open a");
    let acks = hammer(std::slice::from_ref(&a), &["solo"], 32, 20).await;
    assert_no_fork_no_gap(&db_a, &key, &acks).await;
    // Two independent AuditLogs on separate pools: two replicas racing for the same heads.
    let b = AuditLog::open(db_b.clone(), key.clone(), AuditConfig::default())
        .await
        .expect("open b");
    let acks = hammer(&[a.clone(), b.clone()], &["shared", "x", "y"], 48, 15).await;
    assert_no_fork_no_gap(&db_b, &key, &acks).await;
    let s = (a.stats(), b.stats());
    assert!(
        s.0.events > 0 && s.1.events > 0,
        "both replicas wrote: {s:?}"
    );
}

/// The unique constraint makes a second event at a taken position fail instead of forking.
async fn duplicate_position_is_refused(db: &Db) {
    let log = AuditLog::open(db.clone(), test_key(), quiet_config())
        .await
        .expect("open");
    log.append(event("dup", 1)).await.expect("append");
    let sql = "INSERT INTO audit_events (tenant, seq, ts_ms, event, body, prev_hash, hash) \
               VALUES ('dup', 1, 0, 'x', '{}', 'p', 'h')";
    let failed = match db {
        Db::Sqlite(p) => sqlx::query(sql).execute(p).await.is_err(),
        Db::Postgres(p) => sqlx::query(sql).execute(p).await.is_err(),
    };
    assert!(failed, "a second event at seq 1 must be refused");
}

#[tokio::test]
async fn sqlite_duplicate_position_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    duplicate_position_is_refused(&sqlite_at(&dir.path().join("a.db")).await).await;
}

#[tokio::test]
async fn postgres_duplicate_position_is_refused() {
    duplicate_position_is_refused(&postgres_at(&postgres_url().await).await).await;
}

/// A PostgreSQL tenant writer keeps its connection between batches, unpinged. When the server
/// ends that connection (a restart, an administrator), the next batch takes another and
/// commits: no call is refused for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_kept_connection_that_died_is_replaced() {
    use sqlx::Connection as _;
    let url = postgres_url().await;
    let db = postgres_at(&url).await;
    let log = AuditLog::open(db.clone(), test_key(), quiet_config())
        .await
        .expect("open");
    let mut admin = sqlx::PgConnection::connect(&url)
        .await
        .expect("admin connection");
    for round in 0..3 {
        // Back to back: the writer keeps the connection of the last batch.
        append_n(&log, "t", 3).await;
        let ended: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
             AND application_name = 'intentgate'",
        )
        .fetch_all(&mut admin)
        .await
        .expect("terminate");
        assert!(ended.contains(&true), "round {round}: no connection to end");
        log.append(event("t", 100 + round))
            .await
            .expect("the batch after the connection died commits");
    }
    assert_eq!(count_rows(&db, "t").await, 12);
}

/// The SQLite committer writes every tenant's part in one transaction: a tenant whose stored
/// head is unusable is refused alone; the others in the same batches commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_tenant_with_an_unusable_head_fails_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = sqlite_at(&dir.path().join("a.db")).await;
    let log = AuditLog::open(db.clone(), test_key(), quiet_config())
        .await
        .expect("open");
    append_n(&log, "good", 1).await;
    append_n(&log, "bad", 1).await;
    exec(
        &db,
        "UPDATE audit_chain_heads SET hash = 'not-hex' WHERE tenant = $1",
        &[&"bad".to_owned()],
    )
    .await;
    let mut set = JoinSet::new();
    for i in 0..64 {
        let log = log.clone();
        let tenant = if i % 2 == 0 { "good" } else { "bad" };
        set.spawn(async move { (tenant, log.append(event(tenant, 100 + i)).await) });
    }
    let (mut good, mut bad) = (0, 0);
    while let Some(done) = set.join_next().await {
        match done.expect("task") {
            ("good", r) => {
                r.expect("the healthy tenant commits");
                good += 1;
            }
            (_, r) => {
                let e = r.expect_err("the broken tenant is refused");
                assert!(e.to_string().contains("malformed hash"), "{e}");
                bad += 1;
            }
        }
    }
    assert_eq!((good, bad), (32, 32));
    assert_eq!(count_rows(&db, "good").await, 33);
    assert_eq!(count_rows(&db, "bad").await, 1);
}

// ---------------------------------------------------------------------------------------------
// tampering

async fn edited_event_is_named(db: Db) {
    let key = test_key();
    let log = AuditLog::open(db.clone(), key.clone(), quiet_config())
        .await
        .expect("open");
    let acks = append_n(&log, "acme", 40).await;
    let victim = &acks[16];
    // Edit the body of event 17 (as someone with database access would).
    exec(
        &db,
        "UPDATE audit_events SET body = REPLACE(body, 'tool_1', 'tool_9') WHERE id = $1",
        &[&victim.id],
    )
    .await;
    let r = verify::verify_chain(&db, "acme", &key.verifier(), None)
        .await
        .expect("verify");
    assert!(!r.ok);
    let b = r.broken_at.expect("broken_at");
    assert_eq!((b.id, b.seq), (victim.id, 17));
    assert_eq!(b.reason, "hash mismatch");
    assert_eq!(b.stored_hash, victim.hash);
    assert_ne!(b.expected_hash, victim.hash);
    assert_eq!(r.verified, 16);
    assert_eq!(r.skipped, 24);

    // Restore the body, then change only an indexed column (to hide the event from a filter).
    exec(
        &db,
        "UPDATE audit_events SET body = REPLACE(body, 'tool_9', 'tool_1') WHERE id = $1",
        &[&victim.id],
    )
    .await;
    assert!(
        verify::verify_chain(&db, "acme", &key.verifier(), None)
            .await
            .expect("verify")
            .ok
    );
    exec(
        &db,
        "UPDATE audit_events SET decision = 'allow', agent_id = 'nobody' WHERE id = $1",
        &[&acks[30].id],
    )
    .await;
    let r = verify::verify_chain(&db, "acme", &key.verifier(), None)
        .await
        .expect("verify");
    let b = r.broken_at.expect("column tamper found");
    assert_eq!(b.id, acks[30].id);
    assert!(b.reason.starts_with("column"), "{}", b.reason);

    // Deleting an event in the middle is a gap.
    exec(
        &db,
        "UPDATE audit_events SET agent_id = 'agent-2', decision = 'block' WHERE id = $1",
        &[&acks[30].id],
    )
    .await;
    exec(
        &db,
        "DELETE FROM audit_events WHERE id = $1",
        &[&acks[5].id],
    )
    .await;
    let r = verify::verify_chain(&db, "acme", &key.verifier(), None)
        .await
        .expect("verify");
    let b = r.broken_at.expect("gap found");
    assert_eq!(b.id, acks[6].id);
    assert!(b.reason.starts_with("gap"), "{}", b.reason);
}

/// A NUL in a field the store keeps in a column of its own (PostgreSQL's text refuses it) is
/// refused for that event alone, before it reaches a batch; a NUL in an approval's free text
/// (a policy's reason, an operator's note) is stored replaced. The calls beside it commit.
async fn a_nul_fails_its_own_event_only(db: Db) {
    use intentgate::approvals::{Approval, Status, record::ApprovalWrite};
    let key = test_key();
    let log = AuditLog::open(db.clone(), key.clone(), quiet_config())
        .await
        .expect("open");
    let mut bad = event("acme", 1);
    bad.tool = "echo\u{0}".into();
    let (bad, good) = tokio::join!(log.append(bad), log.append(event("acme", 2)));
    assert!(
        matches!(bad, Err(AuditError::Unstorable("tool"))),
        "{bad:?}"
    );
    good.expect("the call beside it commits");

    let approval = Approval {
        tenant: "acme".into(),
        pending_id: intentgate::approvals::new_id(),
        capability_token_id: "jti-1".into(),
        root_capability_token_id: "root-1".into(),
        agent_id: "agent-1".into(),
        tool: "delete_records".into(),
        args: None,
        args_digest: "d".into(),
        bundle_digest: "b".into(),
        intent_summary: "clean up\u{0}".into(),
        reason: "rule \u{0} matched".into(),
        escalated_by: "policy".into(),
        status: Status::Pending,
        requires_step_up: false,
        created_ms: 1,
        expires_ms: i64::MAX,
        decided_ms: None,
        decided_by: None,
        decide_note: None,
        consumed_ms: None,
    };
    let id = approval.pending_id.clone();
    let escalated = log
        .append_with(
            event("acme", 3),
            Vec::new(),
            Some(ApprovalWrite::Create(Box::new(approval))),
        )
        .await
        .expect("an approval with a NUL in its reason commits");
    assert!(escalated.refused.is_none(), "{escalated:?}");
    let stored = intentgate::approvals::query::get(&db, Some("acme"), &id)
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(stored.reason, "rule \u{FFFD} matched");
    log.append(event("acme", 4)).await.expect("and after it");
    let r = verify::verify_chain(&db, "acme", &key.verifier(), None)
        .await
        .expect("verify");
    assert!(r.ok && r.verified == 3, "{r:?}");
}

#[tokio::test]
async fn sqlite_a_nul_fails_its_own_event_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    a_nul_fails_its_own_event_only(sqlite_at(&dir.path().join("a.db")).await).await;
}

#[tokio::test]
async fn postgres_a_nul_fails_its_own_event_only() {
    a_nul_fails_its_own_event_only(postgres_at(&postgres_url().await).await).await;
}

/// A head moved back over intact rows (or rows planted above it) is found: the rows beyond
/// the head are reported, though every row up to the head still links.
async fn rows_beyond_the_head_are_found(db: Db) {
    let key = test_key();
    let log = AuditLog::open(db.clone(), key.clone(), quiet_config())
        .await
        .expect("open");
    let acks = append_n(&log, "acme", 10).await;
    let r = verify::verify_chain(&db, "acme", &key.verifier(), None)
        .await
        .expect("verify");
    assert!(r.ok, "{r:?}");
    let fifth = &acks[4];
    let t = "acme".to_owned();
    exec(
        &db,
        "UPDATE audit_chain_heads SET seq = 5, hash = $1, event_id = $2 WHERE tenant = $3",
        &[&fifth.hash, &fifth.id, &t],
    )
    .await;
    let r = verify::verify_chain(&db, "acme", &key.verifier(), None)
        .await
        .expect("verify");
    assert!(!r.ok, "{r:?}");
    let b = r.broken_at.expect("rows beyond the head");
    assert!(b.reason.contains("beyond the chain head"), "{}", b.reason);
    assert_eq!(b.seq, 5);
}

/// A row planted below the chain's first place (written past the table's CHECK, which
/// `PRAGMA ignore_check_constraints` turns off) is never walked, but lists and exports show it:
/// verify counts the rows that claim a place in the chain.
#[tokio::test]
async fn sqlite_a_row_planted_below_the_chain_is_found() {
    use sqlx::Connection as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.db");
    let db = sqlite_at(&path).await;
    let key = test_key();
    let log = AuditLog::open(db.clone(), key.clone(), quiet_config())
        .await
        .expect("open");
    append_n(&log, "acme", 5).await;
    let r = verify::verify_chain(&db, "acme", &key.verifier(), None)
        .await
        .expect("verify");
    assert!(r.ok, "{r:?}");
    let mut raw = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("raw connection");
    sqlx::query("PRAGMA ignore_check_constraints = 1")
        .execute(&mut raw)
        .await
        .expect("pragma");
    sqlx::query(
        "INSERT INTO audit_events (tenant, seq, ts_ms, event, body, prev_hash, hash) \
         SELECT tenant, 0, ts_ms, event, body, prev_hash, hash FROM audit_events \
         WHERE tenant = 'acme' AND seq = 1",
    )
    .execute(&mut raw)
    .await
    .expect("planted");
    raw.close().await.expect("close");
    let r = verify::verify_chain(&db, "acme", &key.verifier(), None)
        .await
        .expect("verify");
    assert!(!r.ok, "a planted row went unseen: {r:?}");
    let b = r.broken_at.expect("the planted row");
    assert!(b.reason.contains("6 rows claim"), "{}", b.reason);
}

/// The chain's freshness comes from the newest event verified, not from the head row: a head
/// row edited to look recent does not make a stalled chain look fresh.
#[tokio::test]
async fn sqlite_freshness_is_the_newest_verified_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = sqlite_at(&dir.path().join("a.db")).await;
    let key = test_key();
    let log = AuditLog::open(db.clone(), key.clone(), quiet_config())
        .await
        .expect("open");
    let acks = append_n(&log, "acme", 3).await;
    let t = "acme".to_owned();
    let later: i64 = 4_000_000_000_000;
    exec(
        &db,
        "UPDATE audit_chain_heads SET ts_ms = $1 WHERE tenant = $2",
        &[&later, &t],
    )
    .await;
    let r = verify::verify_chain(&db, "acme", &key.verifier(), None)
        .await
        .expect("verify");
    assert_eq!(r.head_id, Some(acks[2].id), "{r:?}");
    assert!(
        r.head_at
            .as_deref()
            .is_some_and(|at| !at.starts_with("2096")),
        "the head row's claim was reported: {r:?}"
    );
}

#[tokio::test]
async fn sqlite_rows_beyond_the_head_are_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    rows_beyond_the_head_are_found(sqlite_at(&dir.path().join("a.db")).await).await;
}

#[tokio::test]
async fn postgres_rows_beyond_the_head_are_found() {
    rows_beyond_the_head_are_found(postgres_at(&postgres_url().await).await).await;
}

#[tokio::test]
async fn sqlite_edited_event_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    edited_event_is_named(sqlite_at(&dir.path().join("a.db")).await).await;
}

#[tokio::test]
async fn postgres_edited_event_is_named() {
    edited_event_is_named(postgres_at(&postgres_url().await).await).await;
}

/// An entry deleted from the SQLite lookup file hides its event from a filtered list while
/// the chain still holds: `verify` names the event and the filter, on any page of the walk.
#[tokio::test]
async fn sqlite_an_event_the_lookup_tables_would_hide_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.db");
    let db = sqlite_at(&path).await;
    let key = test_key();
    let log = AuditLog::open(db.clone(), key.clone(), quiet_config())
        .await
        .expect("open");
    let acks = append_n(&log, "acme", 1_100).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while query::lookup_lag(&db).await.expect("lag") != Some(0) {
        assert!(
            Instant::now() < deadline,
            "the lookup writer never caught up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = verify::verify_chain(&db, "acme", &key.verifier(), None)
        .await
        .expect("verify");
    assert!(r.ok && r.unlisted.is_none(), "{r:?}");

    let victim = &acks[1_050];
    let agent = "agent-2"; // event(_, 1050)'s agent
    let filter = AuditFilter::from_params([("tenant", "acme"), ("agent_id", agent)]).expect("f");
    let listed = |page: &audit::query::Page| page.items.iter().any(|e| e.id == victim.id);
    assert!(listed(
        &query::list(&db, &filter, None, 1000).await.expect("list")
    ));
    let facets = rusqlite::Connection::open(format!("{}-facets", path.display())).expect("open");
    facets
        .busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    let gone = facets
        .execute(
            "DELETE FROM audit_agent_facet WHERE event_id = ?1",
            [victim.id],
        )
        .expect("delete");
    assert_eq!(gone, 1);
    assert!(!listed(
        &query::list(&db, &filter, None, 1000).await.expect("list")
    ));

    let r = verify::verify_chain(&db, "acme", &key.verifier(), None)
        .await
        .expect("verify");
    assert!(!r.ok, "{r:?}");
    assert!(r.broken_at.is_none(), "{r:?}");
    assert_eq!(r.verified, 1_100);
    let u = r.unlisted.expect("the hidden event is named");
    assert_eq!(
        (u.id, u.seq, u.filter.as_str()),
        (victim.id, 1_051, "agent_id")
    );
}

/// Rewrites `tenant`'s chain from `from_seq` on with consistent hashes (an attacker with write
/// access to the database but not the log key), moves the head, and drops the stored checkpoints.
async fn rewrite_consistently(db: &Db, tenant: &str, from_seq: i64) {
    let all = rows(db, tenant).await;
    let mut prev = [0u8; 32];
    let mut last = None;
    for row in &all {
        let r = &row.record;
        let mut body = r.body.clone();
        if r.seq >= from_seq {
            body = body.replace("\"agent_id\":\"agent-1\"", "\"agent_id\":\"agent-7\"");
        }
        let hash = link_hash(&prev, body.as_bytes());
        let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
        let prev_hex: String = prev.iter().map(|b| format!("{b:02x}")).collect();
        let agent = if row.agent_id == "agent-1" && r.seq >= from_seq {
            "agent-7".to_owned()
        } else {
            row.agent_id.clone()
        };
        exec(
            db,
            "UPDATE audit_events SET body = $1, hash = $2, prev_hash = $3, agent_id = $4 WHERE id = $5",
            &[&body, &hex, &prev_hex, &agent, &r.id],
        )
        .await;
        prev = hash;
        last = Some((r.seq, hex));
    }
    let (seq, hex) = last.expect("rows");
    exec(
        db,
        "UPDATE audit_chain_heads SET hash = $1, checkpoint_size = 0 WHERE tenant = $2 AND seq = $3",
        &[&hex, &tenant.to_owned(), &seq],
    )
    .await;
    exec(
        db,
        "DELETE FROM audit_checkpoints WHERE tenant = $1",
        &[&tenant.to_owned()],
    )
    .await;
}

async fn rewrite_and_truncation_need_an_outside_checkpoint(db: Db) {
    let key = test_key();
    let log = AuditLog::open(db.clone(), key.clone(), quiet_config())
        .await
        .expect("open");
    let acks = append_n(&log, "acme", 30).await;
    let kept_outside = log
        .checkpoint_now("acme")
        .await
        .expect("checkpoint")
        .expect("a note");
    assert!(
        kept_outside.starts_with("test-gw/acme\n30\n"),
        "{kept_outside}"
    );
    let v = key.verifier();

    rewrite_consistently(&db, "acme", 5).await;
    let plain = verify::verify_chain(&db, "acme", &v, None)
        .await
        .expect("verify");
    assert!(
        plain.ok,
        "a consistent rewrite passes a plain chain walk: {plain:?}"
    );
    let pinned = verify::verify_chain(&db, "acme", &v, Some(&kept_outside))
        .await
        .expect("verify");
    assert!(!pinned.ok, "{pinned:?}");
    let c = &pinned.checkpoints[0];
    assert_eq!((c.source, c.size, c.ok), ("given", 30, false));
    assert!(
        c.reason.as_deref().unwrap_or("").contains("rewritten"),
        "{c:?}"
    );

    // Truncation on a fresh tenant: delete the tail together with its head.
    append_n(&log, "trunc", 30).await;
    let cp = log
        .checkpoint_now("trunc")
        .await
        .expect("cp")
        .expect("note");
    let keep = rows(&db, "trunc")
        .await
        .into_iter()
        .nth(19)
        .expect("row 20");
    let t = "trunc".to_owned();
    exec(
        &db,
        "DELETE FROM audit_events WHERE tenant = $1 AND seq > 20",
        &[&t],
    )
    .await;
    // First with the stored checkpoints left in place: the newest stored one catches it.
    exec(
        &db,
        "UPDATE audit_chain_heads SET seq = 20, hash = $1, event_id = $2, ts_ms = $3 WHERE tenant = $4",
        &[&keep.record.hash, &keep.record.id, &keep.record.ts_ms, &t],
    )
    .await;
    let r = verify::verify_chain(&db, "trunc", &v, None)
        .await
        .expect("verify");
    assert!(!r.ok, "the stored checkpoint covers 30 events: {r:?}");
    assert!(
        r.checkpoints[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("truncated")
    );
    // A careful attacker drops the stored checkpoints too; only the outside one still knows.
    exec(
        &db,
        "DELETE FROM audit_checkpoints WHERE tenant = $1",
        &[&t],
    )
    .await;
    exec(
        &db,
        "UPDATE audit_chain_heads SET checkpoint_size = 0 WHERE tenant = $1",
        &[&t],
    )
    .await;
    let r = verify::verify_chain(&db, "trunc", &v, None)
        .await
        .expect("verify");
    assert!(r.ok, "{r:?}");
    assert_eq!(r.verified, 20);
    let r = verify::verify_chain(&db, "trunc", &v, Some(&cp))
        .await
        .expect("verify");
    assert!(!r.ok);
    assert!(
        r.checkpoints[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("truncated"),
        "{r:?}"
    );
    // Deleting the tail but leaving the head is caught by the head check alone.
    let ids: Vec<i64> = acks.iter().map(|a| a.id).collect();
    exec(&db, "DELETE FROM audit_events WHERE id = $1", &[&ids[29]]).await;
    let r = verify::verify_chain(&db, "acme", &v, None)
        .await
        .expect("verify");
    assert!(!r.ok);
    assert!(r.broken_at.expect("broken").reason.contains("head says 30"));

    // A checkpoint signed by another key is refused outright.
    let other = LogKey::from_seed("test-gw", [1; 32]).expect("key");
    let forged = audit::Checkpoint {
        origin: "test-gw/acme".into(),
        size: 30,
        root_hash: [0; 32],
    }
    .sign(&other);
    assert!(matches!(
        verify::verify_chain(&db, "acme", &v, Some(&forged)).await,
        Err(AuditError::InvalidCheckpoint(_))
    ));
}

#[tokio::test]
async fn sqlite_rewrite_and_truncation_need_an_outside_checkpoint() {
    let dir = tempfile::tempdir().expect("tempdir");
    rewrite_and_truncation_need_an_outside_checkpoint(sqlite_at(&dir.path().join("a.db")).await)
        .await;
}

#[tokio::test]
async fn postgres_rewrite_and_truncation_need_an_outside_checkpoint() {
    rewrite_and_truncation_need_an_outside_checkpoint(postgres_at(&postgres_url().await).await)
        .await;
}

// ---------------------------------------------------------------------------------------------
// checkpoints

#[tokio::test]
async fn checkpoints_every_n_events_and_after_t_seconds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = sqlite_at(&dir.path().join("a.db")).await;
    let key = test_key();
    // The interval runs from the first commit a checkpoint does not cover: long enough that ten
    // sequential synced commits on a slow disk fit in it, so the count alone makes 10 and 20
    // (a time checkpoint between them would add a size of its own).
    let cfg = AuditConfig {
        checkpoint_every: 10,
        checkpoint_interval: Duration::from_secs(3),
        ..AuditConfig::default()
    };
    let log = AuditLog::open(db.clone(), key.clone(), cfg)
        .await
        .expect("open");
    append_n(&log, "acme", 25).await;
    // 10 and 20 by count; 25 by time.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let cps = query::checkpoints(&db, "acme", None, 10)
            .await
            .expect("cps");
        let sizes: Vec<i64> = cps.iter().map(|c| c.size).collect();
        if sizes.first() == Some(&25) {
            assert_eq!(sizes, [25, 20, 10]);
            for c in &cps {
                let cp = audit::Checkpoint::open(&c.note, &key.verifier()).expect("signed");
                assert_eq!(cp.size as i64, c.size);
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no time-based checkpoint: {sizes:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(log.stats().checkpoints >= 3);
    // Nothing new: checkpoint_now returns the newest without signing another.
    let note = log.checkpoint_now("acme").await.expect("cp").expect("note");
    assert!(note.starts_with("test-gw/acme\n25\n"));
    assert_eq!(
        query::checkpoints(&db, "acme", None, 10)
            .await
            .expect("cps")
            .len(),
        3
    );
    assert_eq!(log.checkpoint_now("empty").await.expect("cp"), None);
}

// ---------------------------------------------------------------------------------------------
// overload and store failure: refused, never dropped, never half-written

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_queue_and_slow_store_are_refused_not_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.db");
    let db = sqlite_at(&path).await;
    let cfg = AuditConfig {
        queue_capacity: 4,
        max_batch: 4,
        max_queue_wait: Duration::from_millis(300),
        ..quiet_config()
    };
    let log = AuditLog::open(db.clone(), test_key(), cfg)
        .await
        .expect("open");
    log.append(event("t", 0)).await.expect("warm up the writer");
    // Another connection holds the write lock: the writer stalls in BEGIN IMMEDIATE.
    let Db::Sqlite(pool) = &db else {
        unreachable!()
    };
    let mut blocker = pool.acquire().await.expect("conn");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *blocker)
        .await
        .expect("lock");
    let mut set = JoinSet::new();
    for i in 1..=30 {
        let log = log.clone();
        set.spawn(async move { log.append(event("t", i)).await });
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    sqlx::query("ROLLBACK")
        .execute(&mut *blocker)
        .await
        .expect("unlock");
    drop(blocker);
    let (mut ok, mut overloaded) = (Vec::new(), 0);
    while let Some(r) = set.join_next().await {
        match r.expect("task") {
            Ok(a) => ok.push(a),
            Err(AuditError::Overloaded { .. }) => overloaded += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(
        overloaded >= 20,
        "a queue of 4 cannot take 30: {overloaded} refused"
    );
    assert_eq!(log.stats().overloaded, overloaded);
    // Every acknowledged event is stored once, and nothing else is.
    assert_eq!(count_rows(&db, "t").await, 1 + ok.len() as i64);
    let r = verify::verify_chain(&db, "t", &test_key().verifier(), None)
        .await
        .expect("verify");
    assert!(r.ok && r.verified == 1 + ok.len() as u64, "{r:?}");

    // A failing store: the append is refused with the commit error.
    pool.close().await;
    match log.append(event("t", 99)).await {
        Err(AuditError::CommitFailed(_)) => {}
        other => panic!("expected CommitFailed, got {other:?}"),
    }
    let again = sqlite_at(&path).await;
    assert_eq!(count_rows(&again, "t").await, 1 + ok.len() as i64);
}

/// A late record (the refusal of a caller that gave up at the deadline) the store refuses for
/// what it holds, not for being down, never refuses anyone else's call: the tenant's next
/// calls and another tenant's are written beside it, and after its strikes it is dropped,
/// counted and logged, instead of being retried forever with every batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_record_the_store_refuses_does_not_refuse_later_calls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("a.db");
    let db = sqlite_at(&path).await;
    let cfg = AuditConfig {
        deadline: Duration::from_millis(100),
        ..quiet_config()
    };
    let log = AuditLog::open(db.clone(), test_key(), cfg)
        .await
        .expect("open");
    log.append(event("t", 1)).await.expect("warm up the writer");
    // What the store refuses: a row naming the tool `poison` (as a constraint the gateway
    // does not know about would).
    let Db::Sqlite(pool) = &db else {
        unreachable!()
    };
    sqlx::query(
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON audit_events WHEN NEW.tool = 'poison' \
         BEGIN SELECT RAISE(ABORT, 'poison refused'); END",
    )
    .execute(pool)
    .await
    .expect("trigger");
    // The writer stalls on the write lock past the caller's deadline: the caller is refused
    // and gone when the commit fails, so its refusal becomes a late record (still naming the
    // tool the store refuses).
    let mut blocker = pool.acquire().await.expect("conn");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *blocker)
        .await
        .expect("lock");
    let mut poison = event("t", 2);
    poison.tool = "poison".into();
    match log.append(poison).await {
        Err(AuditError::DeadlineExceeded { .. }) => {}
        other => panic!("expected the deadline, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    sqlx::query("ROLLBACK")
        .execute(&mut *blocker)
        .await
        .expect("unlock");
    drop(blocker);
    // Every later call of this tenant and of another is written.
    let mut written = 1;
    for i in 0..(4 * 3) {
        log.append(event("t", 10 + i))
            .await
            .unwrap_or_else(|e| panic!("call {i} of the tenant refused: {e}"));
        log.append(event("other", i))
            .await
            .unwrap_or_else(|e| panic!("call {i} of another tenant refused: {e}"));
        written += 1;
    }
    assert_eq!(log.stats().late_dropped, 1, "{:?}", log.stats());
    assert_eq!(count_rows(&db, "t").await, written);
    for tenant in ["t", "other"] {
        let r = verify::verify_chain(&db, tenant, &test_key().verifier(), None)
            .await
            .expect("verify");
        assert!(r.ok, "{tenant}: {r:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// kill -9 under load

const CRASH_CHILD_ENV: &str = "INTENTGATE_AUDIT_CRASH_CHILD_DB";

/// Not a test of its own: when the parent test re-executes this binary with the env var set,
/// this writes under load and prints every acknowledgement until it is killed.
#[test]
fn kill9_child_writer() {
    let Ok(path) = std::env::var(CRASH_CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let db = sqlite_at(Path::new(&path)).await;
        let cfg = AuditConfig {
            checkpoint_every: 50,
            ..AuditConfig::default()
        };
        let log = AuditLog::open(db, test_key(), cfg).await.expect("open");
        let stdout = Arc::new(std::sync::Mutex::new(std::io::stdout()));
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut set = JoinSet::new();
        for t in 0..24usize {
            let log = log.clone();
            let stdout = stdout.clone();
            set.spawn(async move {
                let tenant = ["k1", "k2", "k3"][t % 3];
                let mut i = t * 1_000_000;
                while Instant::now() < deadline {
                    i += 1;
                    // Allowed calls charge their tenant's call counter in the event's commit.
                    let e = event(tenant, i);
                    let debits = match e.decision {
                        Some(Decision::Allow) => vec![audit::Debit {
                            key: format!("calls:{tenant}"),
                            window: 0,
                            amount: 1,
                            limit: i64::MAX,
                        }],
                        _ => Vec::new(),
                    };
                    let a = log.append_charged(e, debits).await.expect("append");
                    let mut out = stdout.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = writeln!(out, "ACK {tenant} {} {} {}", a.id, a.seq, a.hash);
                    let _ = out.flush();
                }
            });
        }
        while set.join_next().await.is_some() {}
    });
}

#[test]
fn kill9_under_load_then_restart_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("crash.db");
    // Create and migrate the file first, so the child starts writing at once.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async { drop(sqlite_at(&path).await) });

    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "audit::kill9_child_writer",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CRASH_CHILD_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("ACK ") && tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut acks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acks.len() < 600 {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => acks.push(line),
            Err(_) => assert!(
                Instant::now() < deadline,
                "the child acknowledged only {} events",
                acks.len()
            ),
        }
    }
    child.kill().expect("SIGKILL"); // std sends SIGKILL on unix
    let status = child.wait().expect("wait");
    assert!(!status.success(), "the child was killed, not finished");
    reader.join().expect("reader");
    acks.extend(rx.try_iter());

    rt.block_on(async {
        let db = sqlite_at(&path).await;
        let key = test_key();
        let mut per_tenant: HashMap<String, u64> = HashMap::new();
        for line in &acks {
            let f: Vec<&str> = line.split(' ').collect();
            let (tenant, id, seq, hash) = (f[1], f[2].parse::<i64>().expect("id"), f[3], f[4]);
            let got = query::list(
                &db,
                &AuditFilter {
                    id: Some(id),
                    ..AuditFilter::default()
                },
                None,
                10,
            )
            .await
            .expect("lookup");
            assert_eq!(
                got.items.len(),
                1,
                "acknowledged id {id} is stored exactly once"
            );
            let r = &got.items[0];
            assert_eq!(
                (
                    r.tenant.as_str(),
                    r.seq.to_string().as_str(),
                    r.hash.as_str()
                ),
                (tenant, seq, hash)
            );
            let e = per_tenant.entry(tenant.to_owned()).or_default();
            *e = (*e).max(r.seq as u64);
        }
        for tenant in ["k1", "k2", "k3"] {
            let r = verify::verify_chain(&db, tenant, &key.verifier(), None)
                .await
                .expect("verify");
            assert!(r.ok, "{tenant} after kill -9: {r:?}");
            assert!(r.verified >= per_tenant.get(tenant).copied().unwrap_or(0));
            // The budget is exact through the kill: every stored allowed call was charged
            // once, and nothing else was (charges commit with their events or not at all).
            let Db::Sqlite(pool) = &db else {
                unreachable!("a SQLite store")
            };
            let allowed: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM audit_events WHERE tenant = ?1 AND decision = 'allow'",
            )
            .bind(tenant)
            .fetch_one(pool)
            .await
            .expect("count allowed");
            let charged: i64 =
                sqlx::query_scalar("SELECT COALESCE(SUM(value), 0) FROM counters WHERE key = ?1")
                    .bind(format!("calls:{tenant}"))
                    .fetch_one(pool)
                    .await
                    .expect("counter");
            assert!(allowed > 0, "{tenant} stored allowed calls");
            assert_eq!(
                charged, allowed,
                "{tenant}: charges == stored allowed calls"
            );
        }
        // The restarted gateway continues every chain from its head.
        let log = AuditLog::open(db.clone(), key.clone(), AuditConfig::default())
            .await
            .expect("reopen");
        for tenant in ["k1", "k2", "k3"] {
            let before = count_rows(&db, tenant).await as u64;
            let a = log
                .append(event(tenant, 0))
                .await
                .expect("append after restart");
            assert_eq!(a.seq, before + 1);
            let r = verify::verify_chain(&db, tenant, &key.verifier(), None)
                .await
                .expect("verify");
            assert!(r.ok, "{r:?}");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// listing

#[tokio::test]
async fn list_filters_and_keyset_pages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = sqlite_at(&dir.path().join("a.db")).await;
    let log = AuditLog::open(db.clone(), test_key(), quiet_config())
        .await
        .expect("open");
    append_n(&log, "acme", 45).await;
    append_n(&log, "globex", 10).await;
    let mut admin = AuditEvent::new("admin/clear_policy", "acme");
    admin.decision = Some(Decision::Allow);
    admin.decided_by = "alice@acme".into();
    admin.elevation_id = "elv_01".into();
    log.append(admin).await.expect("admin event");
    // A call of the root token itself (jti = root_jti), found by the token filter too.
    let mut own = event("acme", 45);
    own.jti = "root-1".into();
    own.root_jti = "root-1".into();
    log.append(own).await.expect("root token's own event");

    let acme = AuditFilter {
        tenant: Some("acme".into()),
        ..AuditFilter::default()
    };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = query::list(&db, &acme, cursor.as_deref(), 10)
            .await
            .expect("page");
        assert!(page.items.len() <= 10);
        seen.extend(page.items.iter().map(|r| r.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 47);
    assert!(
        seen.windows(2).all(|w| w[0] > w[1]),
        "newest first, no repeats"
    );

    let f = AuditFilter::from_params([
        ("tenant", "acme"),
        ("tool", "tool_1"),
        ("decision", "block"),
    ])
    .expect("filter");
    let page = query::list(&db, &f, None, 100).await.expect("list");
    // i in 0..45 with i % 5 == 1 and i % 3 == 0: 6, 21, 36.
    assert_eq!(page.items.len(), 3);
    for r in &page.items {
        let v = r.body_value();
        assert_eq!(
            (v["tool"].as_str(), v["decision"].as_str()),
            (Some("tool_1"), Some("block"))
        );
    }
    // jti matches the root too: every event of root-1 in acme, its own and its delegates'.
    let f = AuditFilter::from_params([("tenant", "acme"), ("jti", "root-1")]).expect("filter");
    assert_eq!(
        query::list(&db, &f, None, 100)
            .await
            .expect("list")
            .items
            .len(),
        23
    );
    // A delegated token's jti finds its own event only.
    let f = AuditFilter::from_params([("tenant", "acme"), ("jti", "jti-7")]).expect("filter");
    let page = query::list(&db, &f, None, 100).await.expect("list");
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].body_value()["capability_token_id"], "jti-7");
    let f = AuditFilter::from_params([("elevation_id", "elv_01")]).expect("filter");
    let page = query::list(&db, &f, None, 100).await.expect("list");
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].body_value()["decided_by"], "alice@acme");
    let f = AuditFilter::from_params([("tenant", "globex"), ("agent_id", "agent-1")]).expect("f");
    assert_eq!(
        query::list(&db, &f, None, 100)
            .await
            .expect("list")
            .items
            .len(),
        3
    );
    let future = AuditFilter::from_params([("from", "2999-01-01")]).expect("f");
    assert!(
        query::list(&db, &future, None, 100)
            .await
            .expect("list")
            .items
            .is_empty()
    );
}

// ---------------------------------------------------------------------------------------------
// export: streamed, bounded, verifiable offline

async fn collect(mut body: export::ExportBody) -> (Vec<u8>, usize) {
    let mut all = Vec::new();
    let mut largest = 0;
    while let Some(chunk) = body.next_chunk().await {
        let chunk = chunk.expect("chunk");
        largest = largest.max(chunk.len());
        all.extend_from_slice(&chunk);
    }
    (all, largest)
}

async fn export_verifies_offline(db: Db, n: usize) {
    let key = test_key();
    let log = AuditLog::open(db.clone(), key.clone(), AuditConfig::default())
        .await
        .expect("open");
    let acks = hammer(
        std::slice::from_ref(&log),
        &["acme", "acme", "acme", "globex"],
        32,
        n / 32,
    )
    .await;
    let acme_n = acks.iter().filter(|(t, _)| t == "acme").count();
    let mut formula = AuditEvent::new(kinds::TOOL_CALL, "acme");
    formula.reason = "=HYPERLINK(\"http://x\",\"click\")".into();
    formula.intent_summary = "@SUM(A1:A9), \"quoted\"\nnext line".into();
    log.append(formula).await.expect("append");
    let note = log.checkpoint_now("acme").await.expect("cp").expect("note");
    let vk = key.verifier().to_string();

    // All tenants (a superadmin export), NDJSON.
    let body = export::stream(db.clone(), AuditFilter::default(), Format::Ndjson);
    let (file, largest) = collect(body).await;
    assert!(
        largest <= export::CHUNK_BYTES + 16 * 1024,
        "chunks are bounded: {largest}"
    );
    let lines = file
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    assert_eq!(lines, acks.len() + 1);
    let report = offline::verify_export(&file[..], &note, &vk).expect("verify");
    assert!(report.ok, "{report}");
    assert_eq!(report.events_checked, acme_n as u64 + 1);
    assert_eq!(report.other_tenant_lines, (acks.len() - acme_n) as u64);
    assert_eq!(report.tenant.as_deref(), Some("acme"));
    // The bare public key works too, also when another signature line, under a name no key
    // could have, comes before the log's own.
    let bare = key.verifier().public_key_base64();
    assert!(
        offline::verify_export(&file[..], &note, &bare)
            .expect("verify")
            .ok
    );
    let (text, signatures) = note.split_once("\n\n").expect("a signed note");
    let witnessed = format!("{text}\n\n\u{2014} bad+name AAAA\n{signatures}");
    assert!(
        offline::verify_export(&file[..], &witnessed, &bare)
            .expect("verify")
            .ok
    );
    // Through a file on disk, as the CLI reads it.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("export.ndjson");
    std::fs::write(&path, &file).expect("write");
    let f = std::fs::File::open(&path).expect("open");
    assert!(
        offline::verify_export(BufReader::new(f), &note, &vk)
            .expect("verify")
            .ok
    );

    // Tamper with one acme line: named by line.
    let text = String::from_utf8(file.clone()).expect("utf8");
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let victim = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("\"tenant\":\"acme\"") && l.contains("agent-1"))
        .nth(10)
        .map(|(i, _)| i)
        .expect("an acme line");
    let original = lines[victim].clone();
    lines[victim] = original.replace("agent-1", "agent-2");
    let tampered = lines.join("\n");
    let r = offline::verify_export(tampered.as_bytes(), &note, &vk).expect("verify");
    assert!(!r.ok);
    let b = r.broken.expect("broken");
    assert_eq!(
        (b.line, b.reason.as_str()),
        (victim as u64 + 1, "hash mismatch")
    );
    lines[victim] = original;

    // Cut the tail: truncated against the checkpoint.
    let last_acme = lines
        .iter()
        .rposition(|l| l.contains("\"tenant\":\"acme\""))
        .expect("acme");
    let cut = lines[..last_acme].join("\n");
    let r = offline::verify_export(cut.as_bytes(), &note, &vk).expect("verify");
    assert!(!r.ok);
    assert!(r.broken.expect("broken").reason.starts_with("truncated"));

    // A hostile export whose first acme line is at the largest seq: the line after it is a
    // gap, not an overflow (a panic in a debug build, a wrapped `seq` passing in release).
    let forged = |seq: u64, prev: [u8; 32]| {
        let body = json!({"event": kinds::TOOL_CALL, "seq": seq, "tenant": "acme"});
        let canonical = intentgate::audit::jcs::canonicalize(&body);
        let hash = intentgate::audit::log::link_hash(&prev, canonical.as_bytes());
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let mut line = body;
        line["id"] = json!(1);
        line["hash"] = json!(hex(&hash));
        line["prev_hash"] = json!(hex(&prev));
        (line.to_string(), hash)
    };
    let (first, h) = forged(u64::MAX, [7; 32]);
    let (second, _) = forged(0, h);
    let hostile = format!("{first}\n{second}\n");
    let r = offline::verify_export(hostile.as_bytes(), &note, &vk).expect("verify");
    assert!(!r.ok);
    assert!(
        r.broken.expect("broken").reason.starts_with("gap"),
        "a gap after the largest seq"
    );

    // A wrong key or a forged checkpoint is an error, not a verdict.
    let other = LogKey::from_seed("test-gw", [9; 32])
        .expect("key")
        .verifier()
        .to_string();
    assert!(offline::verify_export(&file[..], &note, &other).is_err());
    let size = acme_n + 1;
    let forged = note.replacen(&format!("\n{size}\n"), &format!("\n{}\n", size + 1), 1);
    assert_ne!(forged, note);
    assert!(offline::verify_export(&file[..], &forged, &vk).is_err());

    // CSV: header, one line per event, formulas defused, quotes doubled.
    let csv_body = export::stream(
        db.clone(),
        AuditFilter {
            tenant: Some("acme".into()),
            ..AuditFilter::default()
        },
        Format::Csv,
    );
    let (csv, _) = collect(csv_body).await;
    let csv = String::from_utf8(csv).expect("utf8");
    assert!(csv.starts_with("id,seq,ts,tenant,event,decision,check,reason,"));
    assert!(
        csv.lines()
            .next()
            .is_some_and(|h| h.ends_with(",prev_hash,hash,count")),
        "a throttled record's count is a column"
    );
    assert!(
        csv.contains("\"'=HYPERLINK(\"\"http://x\"\",\"\"click\"\")\""),
        "formula defused"
    );
    assert!(csv.contains("\"'@SUM(A1:A9), \"\"quoted\"\"\nnext line\""));
    assert!(!csv.contains(",=") && !csv.contains(",@") && !csv.contains(",+"));
    assert_eq!(csv.matches("\r\n").count(), acme_n + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_large_export_streams_and_verifies_offline() {
    let dir = tempfile::tempdir().expect("tempdir");
    export_verifies_offline(sqlite_at(&dir.path().join("a.db")).await, 20_000).await;
}

/// Events as large as a request (raw argument values on) are read a few megabytes at a time:
/// each page of the list, the export and the verification ends at `MAX_PAGE_BYTES`, and the
/// pages together still hold every event.
async fn pages_are_bounded_by_bytes(db: Db) {
    let key = test_key();
    let log = AuditLog::open(db.clone(), key.clone(), quiet_config())
        .await
        .expect("open");
    // Five events of 3 MiB, a small one between each: any two large ones fill a page.
    let big = "x".repeat(3 << 20);
    let mut ids = Vec::new();
    for i in 0..5 {
        let e = event("acme", i).with_arguments(ArgValuesMode::Raw, &json!({ "blob": big }));
        ids.push(log.append(e).await.expect("append").id);
        ids.push(log.append(event("acme", 10 + i)).await.expect("append").id);
    }
    let weight = |rows: &[query::AuditRecord]| rows.iter().map(|r| r.body.len()).sum::<usize>();
    let most = query::MAX_PAGE_BYTES + (3 << 20) + 4096;
    let filter = AuditFilter::from_params([("tenant", "acme")]).expect("filter");

    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = query::list(&db, &filter, cursor.as_deref(), 1000)
            .await
            .expect("list");
        assert!(!page.items.is_empty());
        assert!(weight(&page.items) <= most, "{}", weight(&page.items));
        pages += 1;
        listed.extend(page.items.iter().map(|r| r.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    listed.reverse();
    assert_eq!(listed, ids);
    assert!(pages >= 3, "{pages} pages");

    let mut scanned = Vec::new();
    let mut after = 0;
    loop {
        let rows = query::scan(&db, &filter, after, i64::MAX, 500)
            .await
            .expect("scan");
        let Some(last) = rows.last() else { break };
        assert!(weight(&rows) <= most, "{}", weight(&rows));
        after = last.id;
        scanned.extend(rows.iter().map(|r| r.id));
    }
    assert_eq!(scanned, ids);
    let page = query::chain_page(&db, "acme", 0, i64::MAX, 1000)
        .await
        .expect("chain page");
    assert!(page.len() < ids.len() && !page.is_empty(), "{}", page.len());

    let r = verify::verify_chain(&db, "acme", &key.verifier(), None)
        .await
        .expect("verify");
    assert!(r.ok, "{r:?}");
    assert_eq!(r.verified, ids.len() as u64);
    let note = log.checkpoint_now("acme").await.expect("cp").expect("note");
    let (file, _) = collect(export::stream(db.clone(), filter, Format::Ndjson)).await;
    let report = offline::verify_export(&file[..], &note, &key.verifier().to_string())
        .expect("verify export");
    assert!(report.ok, "{report}");
    assert_eq!(report.events_checked, ids.len() as u64);
}

#[tokio::test]
async fn sqlite_pages_are_bounded_by_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    pages_are_bounded_by_bytes(sqlite_at(&dir.path().join("a.db")).await).await;
}

#[tokio::test]
async fn postgres_pages_are_bounded_by_bytes() {
    pages_are_bounded_by_bytes(postgres_at(&postgres_url().await).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_export_verifies_offline() {
    export_verifies_offline(postgres_at(&postgres_url().await).await, 3_200).await;
}

// ---------------------------------------------------------------------------------------------
// the admin HTTP API

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_lists_verifies_exports_and_serves_checkpoints() {
    use crate::support::gateway::{self, ADMIN_TOKEN, Backend};
    use crate::support::http;
    const ACME_ADMIN: &str = "acme-admin-token-0123456789abcdef";
    let tg = gateway::start(
        Backend::Sqlite,
        None,
        &["--tenant-admins", &format!("acme:{ACME_ADMIN}")],
    )
    .await;
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let mint =
        serde_json::to_vec(&json!({"subject": "agent-a", "tenant": "acme", "ttl_seconds": 60}))
            .expect("json");
    let (status, _, _) = http::send(
        "POST",
        &format!("{}/v1/admin/mint", tg.url),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("x-intentgate-elevation-id", "elv_42"),
        ],
        mint,
    )
    .await;
    assert_eq!(status, 200);

    // List, filtered by elevation id; a tenant admin cannot look at another tenant.
    let (s, v) = http::get_json(
        &format!("{}/v1/admin/audit?tenant=acme&elevation_id=elv_42", tg.url),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let items = v["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{v}");
    assert_eq!(items[0]["event"], "admin/mint");
    assert_eq!(items[0]["elevation_id"], "elv_42");
    assert!(items[0]["hash"].as_str().is_some_and(|h| h.len() == 64));
    let (s, _) = http::get_json(
        &format!("{}/v1/admin/audit?tenant=globex", tg.url),
        ACME_ADMIN,
    )
    .await;
    assert_eq!(s, 403);
    let (s, v) = http::get_json(&format!("{}/v1/admin/audit", tg.url), ACME_ADMIN).await;
    assert_eq!(s, 200);
    assert!(
        v["items"]
            .as_array()
            .expect("items")
            .iter()
            .all(|i| i["tenant"] == "acme"),
        "a tenant admin only sees its tenant: {v}"
    );

    // Verify, checkpoint, public key.
    let (s, v) = http::get_json(
        &format!("{}/v1/admin/audit/verify?tenant=acme", tg.url),
        ACME_ADMIN,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["verified"].as_u64().is_some_and(|n| n >= 1));
    tg.gw
        .pipeline
        .audit()
        .checkpoint_now("acme")
        .await
        .expect("checkpoint");
    let (s, _, note) = http::send(
        "GET",
        &format!(
            "{}/v1/admin/audit/checkpoints?tenant=acme&format=note",
            tg.url
        ),
        &[("authorization", &auth)],
        Vec::new(),
    )
    .await;
    assert_eq!(s, 200);
    let note = String::from_utf8(note.to_vec()).expect("utf8");
    let (s, v) = http::get_json(
        &format!("{}/v1/admin/audit/checkpoints?tenant=acme", tg.url),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["items"][0]["checkpoint"].as_str(), Some(note.as_str()));
    let (s, pk) = http::get_json(
        &format!("{}/v1/admin/audit/public-key", tg.url),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(s, 200);
    let vk = pk["verifier_key"]
        .as_str()
        .expect("verifier key")
        .to_owned();
    let (s, v) = http::get_json(
        &format!(
            "{}/v1/admin/audit/verify?tenant=acme&checkpoint={}",
            tg.url,
            percent_encode(&note)
        ),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["checkpoints"][0]["source"], "given");

    // Export: an attachment that verifies offline with what the API served.
    let (s, headers, body) = http::send(
        "GET",
        &format!("{}/v1/admin/audit/export?tenant=acme&format=json", tg.url),
        &[("authorization", &auth)],
        Vec::new(),
    )
    .await;
    assert_eq!(s, 200);
    let cd = headers
        .get("content-disposition")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        cd.starts_with("attachment; filename=\"intentgate-audit-acme-")
            && cd.ends_with(".ndjson\""),
        "{cd}"
    );
    let report = offline::verify_export(&body[..], &note, &vk).expect("offline");
    assert!(report.ok, "{report}");
    let (s, headers, body) = http::send(
        "GET",
        &format!("{}/v1/admin/audit/export?tenant=acme", tg.url),
        &[("authorization", &auth)],
        Vec::new(),
    )
    .await;
    assert_eq!(s, 200);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap_or("")
            .starts_with("text/csv")
    );
    assert!(body.starts_with(b"id,seq,ts,tenant,"));
    tg.shutdown().await;
}

/// `INTENTGATE_AUDIT_LOG_KEY`, read and checked with the configuration, is the key the gateway
/// signs checkpoints with (not the key file in the data directory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_audit_log_key_signs_the_checkpoints() {
    use crate::support::gateway::{self, ADMIN_TOKEN, Backend};
    use crate::support::http;
    const SEED: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
    let tg = gateway::start(Backend::Sqlite, None, &["--audit-log-key", SEED]).await;
    let (s, pk) = http::get_json(
        &format!("{}/v1/admin/audit/public-key", tg.url),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(s, 200, "{pk}");
    let expected = LogKey::parse(SEED).expect("seed").verifier().to_string();
    assert_eq!(pk["verifier_key"].as_str(), Some(expected.as_str()), "{pk}");
    assert!(
        !tg.data_dir.path().join("audit-log.key").exists(),
        "no key file is generated when the key is configured"
    );
    tg.shutdown().await;
}
