//! The store suite: every case is written once, as an async fn taking a [`Fixture`], and run
//! against SQLite (a temp dir) and PostgreSQL (a throwaway server from `testkit`), as
//! `store::<case>::sqlite` and `store::<case>::postgres`. Below the suite, backend-specific
//! checks (SQLite pragmas, connect errors) and the testkit's own shutdown guarantees.
//!
//! These tests must never skip: missing PostgreSQL binaries fail them with the package name.
//! They must never reach anything but loopback and their own temp dirs.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use intentgate::store::{
    self, ChargeOutcome, Db, MAX_PAGE, NewRevocation, SessionRecord, Store, StoreConfig, StoreError,
};
use intentgate::testkit::PgServer;

/// A store on a fresh database, and how to open it again (as another replica would).
struct Fixture {
    config: StoreConfig,
    store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        // A directory that does not exist yet: opening must create it and the file.
        let config = StoreConfig::Sqlite {
            path: dir.path().join("data").join("intentgate.db"),
        };
        let store = store::connect(&config).await.expect("open SQLite store");
        Self {
            config,
            store,
            _dir: Some(dir),
        }
    }

    async fn postgres() -> Self {
        let url = tokio::task::spawn_blocking(|| {
            PgServer::shared().and_then(|server| server.fresh_database())
        })
        .await
        .expect("join")
        .expect("PostgreSQL test server");
        let config = StoreConfig::Postgres { url };
        let store = store::connect(&config)
            .await
            .expect("connect PostgreSQL store");
        Self {
            config,
            store,
            _dir: None,
        }
    }

    /// A second, independent handle on the same database: another replica.
    async fn replica(&self) -> Arc<dyn Store> {
        store::connect(&self.config).await.expect("second connect")
    }
}

/// Runs each case against both backends.
macro_rules! suite {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$case(super::Fixture::sqlite().await).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$case(super::Fixture::postgres().await).await;
            }
        }
    )*};
}

suite!(
    migrations_are_idempotent,
    revoke_is_idempotent,
    list_revocations_is_scoped_by_tenant,
    revocations_since_orders_and_pages,
    concurrent_revocations_are_never_missed,
    tenants_are_listed_once,
    step_ups_are_recorded_per_tenant_and_tree,
    charge_adds_within_the_limit,
    concurrent_charges_never_pass_the_limit,
    past_counter_windows_are_pruned,
    sessions_round_trip_and_expire,
    bad_input_is_a_typed_error,
    db_handle_ping_and_close,
);

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn rev(tenant: &str, jti: &str, reason: &str) -> NewRevocation {
    NewRevocation {
        tenant: tenant.into(),
        jti: jti.into(),
        reason: reason.into(),
        revoked_by: "superadmin".into(),
    }
}

async fn migration_versions(db: &Db) -> Vec<i64> {
    let sql = "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version";
    match db {
        Db::Sqlite(pool) => sqlx::query_scalar(sql).fetch_all(pool).await,
        Db::Postgres(pool) => sqlx::query_scalar(sql).fetch_all(pool).await,
    }
    .expect("read _sqlx_migrations")
}

// ---------------------------------------------------------------------------------------------
// The suite.

async fn migrations_are_idempotent(f: Fixture) {
    let applied = migration_versions(&f.store.db()).await;
    assert_eq!(applied.first(), Some(&1), "0001_core applied: {applied:?}");
    f.store
        .revoke(rev("acme", "jti-survives", "r"))
        .await
        .expect("revoke");
    // Connect again, twice at once (two replicas starting together), to the migrated database.
    let (a, b) = tokio::join!(store::connect(&f.config), store::connect(&f.config));
    let (a, b) = (a.expect("second connect"), b.expect("third connect"));
    assert_eq!(migration_versions(&a.db()).await, applied);
    for s in [&a, &b] {
        let rows = s.list_revocations(Some("acme"), 10).await.expect("list");
        assert_eq!(rows.len(), 1, "data survives a re-connect");
        assert_eq!(rows[0].jti, "jti-survives");
    }
}

async fn revoke_is_idempotent(f: Fixture) {
    let before = now();
    let first = f
        .store
        .revoke(rev("acme", "jti-1", "leaked"))
        .await
        .expect("revoke");
    assert!(first.newly_revoked);
    assert!(first.seq > 0);
    assert_eq!(
        (
            first.tenant.as_str(),
            first.jti.as_str(),
            first.reason.as_str()
        ),
        ("acme", "jti-1", "leaked")
    );
    assert_eq!(first.revoked_by, "superadmin");
    assert!(
        (before..=now()).contains(&first.revoked_at),
        "revoked_at is unix seconds"
    );

    let mut again = rev("acme", "jti-1", "another reason");
    again.revoked_by = "tenant-admin:acme".into();
    let second = f.store.revoke(again).await.expect("revoke again");
    assert!(!second.newly_revoked, "second revoke is not new");
    assert_eq!(
        Store::revoke(&*f.store, rev("acme", "jti-1", "x"))
            .await
            .expect("third")
            .seq,
        first.seq
    );
    // The existing row comes back unchanged.
    assert_eq!(
        second,
        store::Revocation {
            newly_revoked: false,
            ..first.clone()
        }
    );
    // The tenant was created by the revoke.
    let tenants = f.store.list_tenants().await.expect("tenants");
    assert_eq!(
        tenants.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["acme"]
    );

    // Revocations are tenant-scoped: the same jti in another tenant is its own row.
    let other = f
        .store
        .revoke(rev("globex", "jti-1", "also"))
        .await
        .expect("revoke in globex");
    assert!(other.newly_revoked);
    assert!(other.seq > first.seq);
    let feed = f.store.revocations_since(0, 100).await.expect("feed");
    assert_eq!(
        feed,
        vec![(first.seq, "jti-1".into()), (other.seq, "jti-1".into())]
    );
}

async fn list_revocations_is_scoped_by_tenant(f: Fixture) {
    for (tenant, jti) in [
        ("acme", "a1"),
        ("globex", "g1"),
        ("acme", "a2"),
        ("globex", "g2"),
        ("acme", "a3"),
    ] {
        f.store.revoke(rev(tenant, jti, "r")).await.expect("revoke");
    }
    let jtis = |rows: Vec<store::Revocation>| rows.into_iter().map(|r| r.jti).collect::<Vec<_>>();

    let acme = f
        .store
        .list_revocations(Some("acme"), 100)
        .await
        .expect("list acme");
    assert!(acme.iter().all(|r| r.tenant == "acme" && !r.newly_revoked));
    assert_eq!(jtis(acme), ["a3", "a2", "a1"], "newest first");
    assert_eq!(
        jtis(
            f.store
                .list_revocations(Some("globex"), 100)
                .await
                .expect("globex")
        ),
        ["g2", "g1"]
    );
    assert_eq!(
        jtis(f.store.list_revocations(None, 100).await.expect("all")),
        ["a3", "g2", "a2", "g1", "a1"]
    );
    assert_eq!(
        jtis(f.store.list_revocations(None, 2).await.expect("limit")),
        ["a3", "g2"]
    );
    assert_eq!(
        jtis(
            f.store
                .list_revocations(Some("acme"), 1)
                .await
                .expect("limit")
        ),
        ["a3"]
    );
    assert!(
        f.store
            .list_revocations(Some("initech"), 10)
            .await
            .expect("unknown tenant")
            .is_empty()
    );
}

async fn revocations_since_orders_and_pages(f: Fixture) {
    let expected: Vec<String> = (0..25).map(|i| format!("jti-{i:02}")).collect();
    for jti in &expected {
        f.store
            .revoke(rev("default", jti, ""))
            .await
            .expect("revoke");
    }
    let all = f.store.revocations_since(0, 1000).await.expect("all");
    assert_eq!(
        all.iter().map(|(_, j)| j.clone()).collect::<Vec<_>>(),
        expected,
        "oldest first"
    );
    assert!(
        all.windows(2).all(|w| w[0].0 < w[1].0),
        "strictly increasing seq"
    );

    let mut paged = Vec::new();
    let mut sizes = Vec::new();
    let mut after = 0;
    loop {
        let page = f.store.revocations_since(after, 10).await.expect("page");
        sizes.push(page.len());
        let Some((last, _)) = page.last() else { break };
        after = *last;
        paged.extend(page);
    }
    assert_eq!(sizes, [10, 10, 5, 0]);
    assert_eq!(paged, all);

    // Re-revoking does not move the feed; a new revocation appears after the cursor.
    f.store
        .revoke(rev("default", "jti-03", "again"))
        .await
        .expect("re-revoke");
    assert!(
        f.store
            .revocations_since(after, 10)
            .await
            .expect("empty")
            .is_empty()
    );
    let new = f
        .store
        .revoke(rev("default", "jti-new", ""))
        .await
        .expect("new");
    assert_eq!(
        f.store.revocations_since(after, 10).await.expect("one"),
        [(new.seq, "jti-new".to_owned())]
    );
}

/// Many writers on two replicas while a poller follows the feed with a cursor and never
/// re-reads: every revocation must reach the poller. A feed whose seq can commit out of order
/// loses rows here.
async fn concurrent_revocations_are_never_missed(f: Fixture) {
    const WRITERS: usize = 8;
    const EACH: usize = 25;
    let replica = f.replica().await;
    let done = Arc::new(AtomicBool::new(false));

    let poller = {
        let store = Arc::clone(&f.store);
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut after = 0i64;
            let mut seen = Vec::new();
            loop {
                let finished = done.load(Ordering::SeqCst);
                let page = store.revocations_since(after, 7).await.expect("poll");
                if let Some((last, _)) = page.last() {
                    after = *last;
                }
                let empty = page.is_empty();
                seen.extend(page);
                if finished && empty {
                    return seen;
                }
                if empty {
                    tokio::task::yield_now().await;
                }
            }
        })
    };

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = if w % 2 == 0 {
            Arc::clone(&f.store)
        } else {
            Arc::clone(&replica)
        };
        writers.push(tokio::spawn(async move {
            for i in 0..EACH {
                let tenant = if i % 2 == 0 { "acme" } else { "globex" };
                store
                    .revoke(rev(tenant, &format!("w{w}-{i}"), "bulk"))
                    .await
                    .expect("concurrent revoke");
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    done.store(true, Ordering::SeqCst);
    let seen = poller.await.expect("poller");

    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "feed order is seq order"
    );
    let seen: BTreeSet<String> = seen.into_iter().map(|(_, j)| j).collect();
    let expected: BTreeSet<String> = (0..WRITERS)
        .flat_map(|w| (0..EACH).map(move |i| format!("w{w}-{i}")))
        .collect();
    assert_eq!(
        seen.len(),
        expected.len(),
        "missed: {:?}",
        expected.difference(&seen).collect::<Vec<_>>()
    );
    assert_eq!(seen, expected);
}

async fn tenants_are_listed_once(f: Fixture) {
    let before = now();
    assert!(f.store.ensure_tenant("globex").await.expect("ensure"));
    assert!(f.store.ensure_tenant("acme").await.expect("ensure"));
    assert!(!f.store.ensure_tenant("acme").await.expect("again"));
    f.store
        .revoke(rev("acme", "j", ""))
        .await
        .expect("revoke in a known tenant");
    f.store
        .revoke(rev("default", "j", ""))
        .await
        .expect("revoke in a new tenant");
    let tenants = f.store.list_tenants().await.expect("list");
    assert_eq!(
        tenants.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["acme", "default", "globex"]
    );
    assert!(
        tenants
            .iter()
            .all(|t| (before..=now()).contains(&t.created_at))
    );
}

async fn step_ups_are_recorded_per_tenant_and_tree(f: Fixture) {
    assert_eq!(
        f.store
            .minted_step_up("acme", "root-1")
            .await
            .expect("read"),
        None
    );
    f.store
        .record_step_up("acme", "root-1", 1_700_000_000)
        .await
        .expect("record");
    // Idempotent: a second record keeps the first.
    f.store
        .record_step_up("acme", "root-1", 1_800_000_000)
        .await
        .expect("again");
    let replica = f.replica().await;
    assert_eq!(
        replica
            .minted_step_up("acme", "root-1")
            .await
            .expect("read"),
        Some(1_700_000_000)
    );
    assert_eq!(
        replica
            .minted_step_up("globex", "root-1")
            .await
            .expect("read"),
        None
    );
    assert_eq!(
        replica
            .minted_step_up("acme", "root-2")
            .await
            .expect("read"),
        None
    );
    assert!(f.store.record_step_up("acme", "", 1).await.is_err());
    assert!(
        f.store
            .record_step_up("Not a tenant!", "r", 1)
            .await
            .is_err()
    );
}

async fn charge_adds_within_the_limit(f: Fixture) {
    use ChargeOutcome::{Charged, Exceeded};
    let s = &f.store;
    let w = 1_700_000_040;
    let charge = |key: &'static str, window: i64, amount: i64, limit: i64| {
        let s = Arc::clone(s);
        async move { s.charge(key, window, amount, limit).await.expect("charge") }
    };
    assert_eq!(s.counter("calls:a", w).await.expect("counter"), 0);
    assert_eq!(charge("calls:a", w, 3, 10).await, Charged { total: 3 });
    assert_eq!(charge("calls:a", w, 7, 10).await, Charged { total: 10 });
    assert_eq!(charge("calls:a", w, 1, 10).await, Exceeded { total: 10 });
    assert_eq!(charge("calls:a", w, 0, 10).await, Charged { total: 10 });
    assert_eq!(s.counter("calls:a", w).await.expect("counter"), 10);
    // Windows and keys are independent counters.
    assert_eq!(charge("calls:a", w + 60, 5, 10).await, Charged { total: 5 });
    assert_eq!(charge("calls:b", w, 1, 10).await, Charged { total: 1 });
    // A first charge above the limit creates nothing.
    assert_eq!(charge("calls:c", w, 11, 10).await, Exceeded { total: 0 });
    assert_eq!(s.counter("calls:c", w).await.expect("counter"), 0);
    // A lowered limit refuses further charges but keeps the total.
    assert_eq!(charge("calls:a", w, 1, 4).await, Exceeded { total: 10 });
    // Refunds: always applied, floored at zero, never create a row.
    assert_eq!(
        charge("calls:a", w, -4, i64::MAX).await,
        Charged { total: 6 }
    );
    assert_eq!(charge("calls:a", w, -100, 0).await, Charged { total: 0 });
    assert_eq!(
        charge("calls:none", w, -1, i64::MAX).await,
        Charged { total: 0 }
    );
    assert_eq!(s.counter("calls:none", w).await.expect("counter"), 0);
    // Extremes do not overflow.
    assert_eq!(
        charge("big", 0, i64::MAX, i64::MAX).await,
        Charged { total: i64::MAX }
    );
    assert_eq!(
        charge("big", 0, 1, i64::MAX).await,
        Exceeded { total: i64::MAX }
    );
    assert_eq!(
        charge("big", 0, i64::MAX, i64::MAX).await,
        Exceeded { total: i64::MAX }
    );
    assert_eq!(charge("zero", 0, 0, 0).await, Charged { total: 0 });
    assert_eq!(charge("zero", 0, 1, 0).await, Exceeded { total: 0 });
}

/// Counter windows that can no longer be charged go (a rate minute past, a window with a later
/// one of its key), an hour after they ended; counters without a window and each key's newest
/// window stay.
async fn past_counter_windows_are_pruned(f: Fixture) {
    let s = &f.store;
    let minute = now() / 60 * 60;
    let old = minute - 7_200;
    let day = 86_400;
    let charged = [
        ("rate:old", old),
        ("rate:old", minute - 5_400),
        ("rate:recent", minute - 1_800),
        ("rate:now", minute),
        ("budget:k", old - 2 * day),
        ("budget:k", old - day),
        ("budget:k", old),
        ("budget:idle", old - day),
        ("calls:j", 0),
        ("budget:fresh", minute - 600),
        ("budget:fresh", minute),
        ("round:7:2", 0),
        ("round:8:2", 0),
    ];
    for (key, window) in charged {
        s.charge(key, window, 1, 10).await.expect("charge");
    }
    // One round's mark was set two hours ago (its sealed state long expired).
    let db = s.db();
    let sql = "UPDATE counters SET updated_at = updated_at - 7200 WHERE key = 'round:7:2'";
    match &db {
        intentgate::store::Db::Sqlite(p) => drop(sqlx::query(sql).execute(p).await.expect("age")),
        intentgate::store::Db::Postgres(p) => drop(sqlx::query(sql).execute(p).await.expect("age")),
    }
    let mut gone = 0;
    loop {
        let n = s.prune_counters(now() - 3_600).await.expect("prune");
        gone += n;
        if n == 0 {
            break;
        }
    }
    assert_eq!(
        gone, 5,
        "rate:old twice, budget:k's two superseded days, round:7:2"
    );
    for (key, window, left) in [
        ("rate:old", old, 0),
        ("rate:old", minute - 5_400, 0),
        ("rate:recent", minute - 1_800, 1),
        ("rate:now", minute, 1),
        ("budget:k", old - 2 * day, 0),
        ("budget:k", old - day, 0),
        ("budget:k", old, 1),
        ("budget:idle", old - day, 1),
        ("calls:j", 0, 1),
        ("budget:fresh", minute - 600, 1),
        ("budget:fresh", minute, 1),
        ("round:7:2", 0, 0),
        ("round:8:2", 0, 1),
    ] {
        assert_eq!(
            s.counter(key, window).await.expect("counter"),
            left,
            "{key} at {window}"
        );
    }
    assert_eq!(store::retention::prune_now(s.as_ref()).await, 0);
}

/// Many tasks on two replicas charge one counter at once: exactly `limit` unit charges win,
/// each sees a distinct total, and the counter ends at the limit.
async fn concurrent_charges_never_pass_the_limit(f: Fixture) {
    const TASKS: i64 = 120;
    const LIMIT: i64 = 37;
    let replica = f.replica().await;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let s = if t % 2 == 0 {
            Arc::clone(&f.store)
        } else {
            Arc::clone(&replica)
        };
        tasks.push(tokio::spawn(async move {
            s.charge("rate:hot", 60, 1, LIMIT).await.expect("charge")
        }));
    }
    let mut totals = Vec::new();
    let mut exceeded = 0;
    for t in tasks {
        match t.await.expect("task") {
            ChargeOutcome::Charged { total } => totals.push(total),
            ChargeOutcome::Exceeded { total } => {
                assert!(total <= LIMIT);
                exceeded += 1;
            }
        }
    }
    totals.sort();
    assert_eq!(
        totals,
        (1..=LIMIT).collect::<Vec<_>>(),
        "each winner saw a distinct total"
    );
    assert_eq!(exceeded, TASKS - LIMIT);
    assert_eq!(
        f.store.counter("rate:hot", 60).await.expect("counter"),
        LIMIT
    );

    // Mixed amounts: the sum of what was granted is what was counted, and within the limit.
    let mut tasks = Vec::new();
    for t in 0..80i64 {
        let s = if t % 2 == 0 {
            Arc::clone(&f.store)
        } else {
            Arc::clone(&replica)
        };
        let amount = t % 5 + 1;
        tasks.push(tokio::spawn(async move {
            let out = s.charge("cents:x", 0, amount, 100).await.expect("charge");
            (amount, out)
        }));
    }
    let mut granted = 0;
    for t in tasks {
        if let (amount, ChargeOutcome::Charged { .. }) = t.await.expect("task") {
            granted += amount;
        }
    }
    let counted = f.store.counter("cents:x", 0).await.expect("counter");
    assert_eq!(granted, counted);
    assert!(
        counted <= 100 && counted > 95,
        "the limit is filled, not passed: {counted}"
    );
}

async fn sessions_round_trip_and_expire(f: Fixture) {
    let now = now();
    let s = SessionRecord {
        id: "sess-1".into(),
        tenant: "acme".into(),
        token_jti: "jti-1".into(),
        upstream_session: Some("upstream-abc".into()),
        protocol_version: "2025-06-18".into(),
        created_at: now,
        expires_at: now + 3600,
    };
    f.store.put_session(&s).await.expect("put");
    assert_eq!(
        f.store.get_session("sess-1").await.expect("get"),
        Some(s.clone())
    );
    let replica = f.replica().await;
    assert_eq!(
        replica.get_session("sess-1").await.expect("get on replica"),
        Some(s.clone()),
        "a session opened on one replica is known to another"
    );

    // Update: created_at is kept, the rest follows.
    let updated = SessionRecord {
        upstream_session: None,
        protocol_version: "2025-11-25".into(),
        created_at: now + 5,
        expires_at: now + 7200,
        ..s.clone()
    };
    replica.put_session(&updated).await.expect("update");
    assert_eq!(
        f.store.get_session("sess-1").await.expect("get"),
        Some(SessionRecord {
            created_at: now,
            ..updated.clone()
        })
    );

    // Another tenant or token cannot take the session over.
    for hijack in [
        SessionRecord {
            tenant: "globex".into(),
            ..s.clone()
        },
        SessionRecord {
            token_jti: "jti-2".into(),
            ..s.clone()
        },
    ] {
        let e = f.store.put_session(&hijack).await.expect_err("hijack");
        assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");
    }
    assert_eq!(
        f.store
            .get_session("sess-1")
            .await
            .expect("get")
            .map(|s| s.tenant),
        Some("acme".into())
    );

    // Expired sessions are gone for get and removed by prune.
    for (id, expires_at) in [("sess-old", now - 1), ("sess-edge", now)] {
        f.store
            .put_session(&SessionRecord {
                id: id.into(),
                created_at: now - 100,
                expires_at,
                ..s.clone()
            })
            .await
            .expect("put expired");
        assert_eq!(f.store.get_session(id).await.expect("get"), None, "{id}");
    }
    assert_eq!(f.store.prune_sessions().await.expect("prune"), 2);
    assert!(f.store.get_session("sess-1").await.expect("get").is_some());

    assert!(f.store.delete_session("sess-1").await.expect("delete"));
    assert_eq!(f.store.get_session("sess-1").await.expect("get"), None);
    assert!(
        !f.store
            .delete_session("sess-1")
            .await
            .expect("delete again")
    );
    assert_eq!(f.store.get_session("nope").await.expect("unknown"), None);
}

async fn bad_input_is_a_typed_error(f: Fixture) {
    fn field_of(r: Result<impl std::fmt::Debug, StoreError>) -> &'static str {
        match r {
            Err(StoreError::InvalidInput { field, .. }) => field,
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }
    let s = &f.store;
    let mut long_reason = rev("acme", "j", "");
    long_reason.reason = "x".repeat(1025);
    let mut nul_reason = rev("acme", "j", "");
    nul_reason.reason = "a\0b".into();
    let mut no_author = rev("acme", "j", "");
    no_author.revoked_by = String::new();
    for (r, field) in [
        (rev("acme", "", "r"), "jti"),
        (rev("acme", "has space", "r"), "jti"),
        (rev("acme", &"j".repeat(129), "r"), "jti"),
        (rev("", "j", "r"), "tenant"),
        (rev("a b", "j", "r"), "tenant"),
        (rev("acme:x", "j", "r"), "tenant"),
        (long_reason, "reason"),
        (nul_reason, "reason"),
        (no_author, "revoked_by"),
    ] {
        assert_eq!(field_of(s.revoke(r.clone()).await), field, "{r:?}");
    }
    assert_eq!(field_of(s.list_revocations(None, 0).await), "limit");
    assert_eq!(
        field_of(s.list_revocations(None, MAX_PAGE + 1).await),
        "limit"
    );
    assert_eq!(
        field_of(s.list_revocations(Some("a b"), 10).await),
        "tenant"
    );
    assert_eq!(field_of(s.revocations_since(0, 0).await), "limit");
    assert_eq!(field_of(s.revocations_since(0, -5).await), "limit");
    assert_eq!(field_of(s.ensure_tenant("").await), "tenant");
    assert_eq!(field_of(s.charge("", 0, 1, 1).await), "key");
    assert_eq!(field_of(s.charge("k", 0, 1, -1).await), "limit");
    assert_eq!(field_of(s.charge("k", 0, i64::MIN, 0).await), "amount");
    assert_eq!(field_of(s.counter("", 0).await), "key");

    let good = SessionRecord {
        id: "sess".into(),
        tenant: "acme".into(),
        token_jti: "jti".into(),
        upstream_session: None,
        protocol_version: "2025-06-18".into(),
        created_at: 100,
        expires_at: 200,
    };
    for (bad, field) in [
        (
            SessionRecord {
                id: String::new(),
                ..good.clone()
            },
            "session id",
        ),
        (
            SessionRecord {
                id: "a\nb".into(),
                ..good.clone()
            },
            "session id",
        ),
        (
            SessionRecord {
                tenant: "bad tenant".into(),
                ..good.clone()
            },
            "tenant",
        ),
        (
            SessionRecord {
                token_jti: String::new(),
                ..good.clone()
            },
            "token_jti",
        ),
        (
            SessionRecord {
                upstream_session: Some(String::new()),
                ..good.clone()
            },
            "upstream_session",
        ),
        (
            SessionRecord {
                protocol_version: String::new(),
                ..good.clone()
            },
            "protocol_version",
        ),
        (
            SessionRecord {
                expires_at: 99,
                ..good.clone()
            },
            "expires_at",
        ),
    ] {
        assert_eq!(field_of(s.put_session(&bad).await), field, "{bad:?}");
    }
    assert_eq!(field_of(s.get_session("").await), "session id");
    assert_eq!(field_of(s.delete_session("with space").await), "session id");

    // Nothing reached the database.
    assert!(s.list_revocations(None, 10).await.expect("list").is_empty());
    assert!(s.list_tenants().await.expect("tenants").is_empty());
    let e = s.charge("", 0, 1, 1).await.expect_err("bad key");
    assert!(!e.is_unavailable());
    assert!(e.to_string().contains("key"), "{e}");
}

async fn db_handle_ping_and_close(f: Fixture) {
    f.store.ping().await.expect("ping");
    f.store.revoke(rev("acme", "j", "")).await.expect("revoke");
    let sql = "SELECT COUNT(*) FROM revocations";
    let n: i64 = match (&f.config, f.store.db()) {
        (StoreConfig::Sqlite { .. }, Db::Sqlite(pool)) => {
            sqlx::query_scalar(sql).fetch_one(&pool).await
        }
        (StoreConfig::Postgres { .. }, Db::Postgres(pool)) => {
            sqlx::query_scalar(sql).fetch_one(&pool).await
        }
        (config, db) => panic!("{config:?} gave {db:?}"),
    }
    .expect("raw query");
    assert_eq!(n, 1, "db() reaches the store's own database");

    f.store.close().await;
    let e = f.store.ping().await.expect_err("closed");
    assert!(e.is_unavailable(), "a closed pool is unavailable: {e:?}");
}

// ---------------------------------------------------------------------------------------------
// Backend-specific checks.

#[tokio::test]
async fn sqlite_runs_wal_full_sync_with_foreign_keys() {
    let f = Fixture::sqlite().await;
    let Db::Sqlite(pool) = f.store.db() else {
        panic!("not SQLite")
    };
    let mut conn = pool.acquire().await.expect("connection");
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut *conn)
        .await
        .expect("journal_mode");
    let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&mut *conn)
        .await
        .expect("synchronous");
    let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(&mut *conn)
        .await
        .expect("foreign_keys");
    let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
        .fetch_one(&mut *conn)
        .await
        .expect("busy_timeout");
    assert_eq!(mode, "wal");
    assert_eq!(sync, 2, "synchronous=FULL");
    assert_eq!(fk, 1);
    assert_eq!(busy, store::SQLITE_BUSY_TIMEOUT.as_millis() as i64);
}

/// A store opened on a file with events gives SQLite's planner statistics (`PRAGMA
/// optimize`), without which the audit query's token filter scans the tenant's events instead
/// of using the token indexes.
#[tokio::test]
async fn sqlite_gives_the_planner_statistics_when_opened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig::Sqlite {
        path: dir.path().join("stats.db"),
    };
    let stats = |db: Db| async move {
        let Db::Sqlite(pool) = db else {
            panic!("not SQLite")
        };
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'",
        )
        .fetch_one(&pool)
        .await
        .expect("sqlite_master")
    };
    {
        let s = store::connect(&config).await.expect("open");
        let Db::Sqlite(pool) = s.db() else {
            panic!("not SQLite")
        };
        insert_bare_events(&pool, 2_000).await;
        s.close().await;
    }
    let s = store::connect(&config).await.expect("reopen");
    assert_eq!(stats(s.db()).await, 1, "no statistics after reopening");
    let Db::Sqlite(pool) = s.db() else {
        panic!("not SQLite")
    };
    let analyzed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sqlite_stat1 WHERE tbl = 'audit_events'")
            .fetch_one(&pool)
            .await
            .expect("sqlite_stat1");
    assert!(analyzed > 0, "audit_events was not analyzed");
}

/// A running gateway refreshes the statistics (`keep_statistics`): a store opened on an empty
/// file has none to give, and without the refresh its audit token filter would scan the
/// tenant's events until a restart, however many it wrote since.
#[tokio::test]
async fn sqlite_refreshes_the_planner_statistics_while_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig::Sqlite {
        path: dir.path().join("fresh.db"),
    };
    let s = store::connect(&config).await.expect("open");
    let Db::Sqlite(pool) = s.db() else {
        panic!("not SQLite")
    };
    let analyzed = |pool: sqlx::SqlitePool| async move {
        let table: i64 =
            sqlx::query_scalar("SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'")
                .fetch_one(&pool)
                .await
                .expect("sqlite_master");
        if table == 0 {
            return 0;
        }
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM sqlite_stat1 WHERE tbl = 'audit_events'")
            .fetch_one(&pool)
            .await
            .expect("sqlite_stat1")
    };
    assert_eq!(
        analyzed(pool.clone()).await,
        0,
        "an empty file has statistics"
    );
    insert_bare_events(&pool, 2_000).await;
    let refresh = tokio::spawn(store::keep_statistics(
        pool.clone(),
        Duration::from_millis(50),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while analyzed(pool.clone()).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "audit_events was never analyzed while running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    refresh.abort();
    s.close().await;
}

/// The bundled SQLite is compiled with the repository's flags (`.cargo/config.toml`,
/// `LIBSQLITE3_FLAGS`): memory statistics off (no process-wide mutex on every allocation), no
/// memory management (each connection's page cache is its own, not one cache behind one
/// process-wide mutex) and, set in the same variable, `fdatasync` for commits. A build that lost
/// the setting fails here.
#[tokio::test]
async fn sqlite_is_built_with_the_repositorys_flags() {
    let f = Fixture::sqlite().await;
    let Db::Sqlite(pool) = f.store.db() else {
        panic!("not SQLite")
    };
    let mut conn = pool.acquire().await.expect("connection");
    let options: Vec<String> = sqlx::query_scalar("PRAGMA compile_options")
        .fetch_all(&mut *conn)
        .await
        .expect("compile_options");
    assert!(
        options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
        "SQLite built without LIBSQLITE3_FLAGS from .cargo/config.toml: {options:?}"
    );
    assert!(
        !options.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
        "SQLite built with one page cache for all connections: {options:?}"
    );
}

#[tokio::test]
async fn sqlite_bad_paths_are_config_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").expect("write");
    for path in [std::path::PathBuf::new(), file.join("under-a-file.db")] {
        let e = store::connect(&StoreConfig::Sqlite { path: path.clone() })
            .await
            .err()
            .expect("must fail");
        assert!(matches!(e, StoreError::Config(_)), "{path:?}: {e:?}");
    }
    // A file that is not a database.
    let e = store::connect(&StoreConfig::Sqlite { path: file })
        .await
        .err()
        .expect("must fail");
    assert!(!e.is_unavailable(), "{e:?}");
}

#[tokio::test]
async fn postgres_bad_url_is_a_config_error_without_the_password() {
    let url = "postgres://ig:hunter2@127.0.0.1:notaport/db";
    let e = store::connect(&StoreConfig::Postgres { url: url.into() })
        .await
        .err()
        .expect("must fail");
    assert!(matches!(e, StoreError::Config(_)), "{e:?}");
    assert!(!e.to_string().contains("hunter2"), "{e}");
    let cfg = StoreConfig::Postgres { url: url.into() };
    assert!(!format!("{cfg} {cfg:?}").contains("hunter2"));
}

#[tokio::test]
async fn postgres_unreachable_is_unavailable_within_the_timeout() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let started = Instant::now();
    let e = store::connect(&StoreConfig::Postgres {
        url: format!("postgres://ig:pw@127.0.0.1:{port}/ig"),
    })
    .await
    .err()
    .expect("must fail");
    assert!(e.is_unavailable(), "{e:?}");
    assert!(started.elapsed() < store::PG_CONNECT_TIMEOUT + Duration::from_secs(2));
}

#[tokio::test]
async fn postgres_wrong_password_is_refused() {
    let server = tokio::task::spawn_blocking(PgServer::shared)
        .await
        .expect("join")
        .expect("server");
    let url = format!(
        "postgres://postgres:wrong@127.0.0.1:{}/postgres",
        server.port()
    );
    let e = store::connect(&StoreConfig::Postgres { url })
        .await
        .err()
        .expect("must fail");
    assert!(!e.to_string().contains("wrong@"), "{e}");
}

/// Every PostgreSQL session is bounded: no statement runs forever, a transaction whose client
/// went silent is ended by the server, and the server probes idle connections.
#[tokio::test]
async fn postgres_sessions_carry_statement_timeout_and_keepalive() {
    let f = Fixture::postgres().await;
    let Db::Postgres(pool) = f.store.db() else {
        panic!("a PostgreSQL store");
    };
    for (setting, expected) in [
        ("statement_timeout", "30s"),
        ("idle_in_transaction_session_timeout", "1min"),
        ("tcp_keepalives_idle", "30"),
        ("tcp_keepalives_interval", "10"),
        ("tcp_keepalives_count", "3"),
    ] {
        let value: String = sqlx::query_scalar(&format!("SHOW {setting}"))
            .fetch_one(&pool)
            .await
            .expect("show");
        assert_eq!(value, expected, "{setting}");
    }
}

// ---------------------------------------------------------------------------------------------
// The testkit itself.

#[test]
fn pg_server_private_instance_stops_and_cleans_up_on_drop() {
    let server = PgServer::start().expect("start");
    let dir = server.dir().to_path_buf();
    let port = server.port();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let a = server.fresh_database().expect("db a");
    let b = server.fresh_database().expect("db b");
    assert_ne!(a, b);
    assert!(a.starts_with("postgres://postgres:"));
    drop(server);
    assert!(!dir.exists(), "temp dir removed");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "server stopped"
    );
}

const WATCHDOG_CHILD_ENV: &str = "INTENTGATE_TEST_PG_WATCHDOG_CHILD";

/// Not a test on its own: run by `pg_server_shared_instance_stops_when_the_process_exits` in a
/// child process, where it starts the shared server and exits without dropping anything.
#[test]
fn pg_watchdog_child() {
    if std::env::var_os(WATCHDOG_CHILD_ENV).is_none() {
        return;
    }
    let server = PgServer::shared().expect("shared server");
    println!("PGDIR={}", server.dir().display());
    println!("PGPORT={}", server.port());
    std::process::exit(0);
}

#[test]
fn pg_server_shared_instance_stops_when_the_process_exits() {
    // libtest names a test by its module path without the crate: `store::pg_watchdog_child`
    // in the `main` test binary, `pg_watchdog_child` when this file is built on its own.
    let child_test_name = match module_path!().split_once("::") {
        Some((_crate, path)) => format!("{path}::pg_watchdog_child"),
        None => "pg_watchdog_child".to_owned(),
    };
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            &child_test_name,
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(WATCHDOG_CHILD_ENV, "1")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.split_once(key).map(|(_, v)| v.trim()))
            .unwrap_or_else(|| panic!("child printed no {key}: {stdout}"))
            .to_owned()
    };
    let dir = std::path::PathBuf::from(value("PGDIR="));
    let port: u16 = value("PGPORT=").parse().expect("port");
    let deadline = Instant::now() + Duration::from_secs(30);
    while dir.exists() || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "server of an exited process still running"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One process owns a SQLite file: a second gateway process on the same data directory is
/// refused at start, at once, saying why and what to do; the owner goes on serving.
#[tokio::test]
async fn a_second_process_on_one_sqlite_file_is_refused_clearly() {
    use crate::support::gateway::{self, Backend};
    let tg = gateway::start(Backend::Sqlite, None, &["--demo"]).await;
    let mut second = crate::support::binary::demo_gateway(tg.data_dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the gateway binary runs");
    // A process that served instead would never exit: it is killed at the deadline.
    let deadline = Instant::now() + Duration::from_secs(60);
    while second.try_wait().expect("wait").is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = second.kill();
    let out = second.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("in use by another IntentGate process")
            && stderr.contains(&std::process::id().to_string()),
        "the refusal names the owner: {stderr}"
    );
    // The owner is untouched.
    let (token, _) = tg
        .mint(serde_json::json!({"subject": "a", "tools": ["echo"]}))
        .await;
    let v = tg
        .tool_call(&token, "echo", serde_json::json!({"text": "hi"}))
        .await;
    assert_eq!(v["result"]["content"][0]["text"], "hi", "{v}");
    tg.shutdown().await;
}

/// `n` bare audit rows of tenant `acme` over 50 tokens, in one transaction: enough rows for
/// the planner's statistics to matter (no chain: these tests read plans, not hashes).
async fn insert_bare_events(pool: &sqlx::SqlitePool, n: i64) {
    let mut tx = pool.begin().await.expect("tx");
    for i in 1..=n {
        sqlx::query(
            "INSERT INTO audit_events (tenant, seq, ts_ms, event, jti, root_jti, body, prev_hash, hash) \
             VALUES ('acme', ?1, ?1, 'tool_call', ?2, ?2, '{}', '', '')",
        )
        .bind(i)
        .bind(format!("jti-{}", i % 50))
        .execute(&mut *tx)
        .await
        .expect("insert");
    }
    tx.commit().await.expect("commit");
}

/// A session id the SQLite file has no row for is remembered by every store of that file in
/// this process, so a handshake-era call does not read the file to learn its session was not
/// ended; a write through any of them makes them read again.
#[tokio::test]
async fn sqlite_remembers_absent_sessions_until_a_store_of_the_file_writes_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StoreConfig::Sqlite {
        path: dir.path().join("gw.db"),
    };
    let a = store::connect(&config).await.expect("store a");
    let b = store::connect(&config).await.expect("store b");
    let now = now();
    let record = |id: &str| SessionRecord {
        id: id.into(),
        tenant: "acme".into(),
        token_jti: "jti-1".into(),
        upstream_session: None,
        protocol_version: "ended".into(),
        created_at: now,
        expires_at: now + 3600,
    };
    assert_eq!(a.get_session("ended:raw").await.expect("get"), None);
    // Written behind the stores' back (no gateway does this): the absence is remembered.
    let Db::Sqlite(pool) = a.db() else {
        panic!("a SQLite store")
    };
    sqlx::query(
        "INSERT INTO mcp_sessions (id, tenant, token_jti, upstream_session, protocol_version, \
         created_at, expires_at) VALUES ('ended:raw', 'acme', 'jti-1', NULL, 'ended', ?1, ?2)",
    )
    .bind(now)
    .bind(now + 3600)
    .execute(&pool)
    .await
    .expect("raw insert");
    assert_eq!(a.get_session("ended:raw").await.expect("get"), None);
    // A write through another store of the file: both read the file again.
    assert_eq!(a.get_session("ended:put").await.expect("get"), None);
    b.put_session(&record("ended:put")).await.expect("put");
    assert_eq!(
        a.get_session("ended:put").await.expect("get"),
        Some(record("ended:put"))
    );
    assert_eq!(
        a.get_session("ended:raw").await.expect("get"),
        Some(record("ended:raw"))
    );
}

/// PostgreSQL answers concurrent session reads with one query per round: every read still
/// gets its own row, or none, and a read queued after a write on another replica sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_gathered_session_reads_each_get_their_own_answer() {
    let url = PgServer::shared()
        .expect("postgres server")
        .fresh_database()
        .expect("fresh database");
    let config = StoreConfig::Postgres { url };
    let a = store::connect(&config).await.expect("store a");
    let b = store::connect(&config).await.expect("store b");
    let now = now();
    let record = |i: usize| SessionRecord {
        id: format!("sess-{i}"),
        tenant: "acme".into(),
        token_jti: format!("jti-{i}"),
        upstream_session: Some(format!("up-{i}")),
        protocol_version: "2025-11-25".into(),
        created_at: now,
        expires_at: now + 3600,
    };
    for i in (0..300).step_by(2) {
        b.put_session(&record(i)).await.expect("put");
    }
    let mut set = tokio::task::JoinSet::new();
    for i in 0..300 {
        let a = Arc::clone(&a);
        set.spawn(async move { (i, a.get_session(&format!("sess-{i}")).await) });
    }
    while let Some(done) = set.join_next().await {
        let (i, got) = done.expect("task");
        let got = got.expect("read");
        assert_eq!(got, (i % 2 == 0).then(|| record(i)), "sess-{i}");
    }
    b.put_session(&record(1))
        .await
        .expect("put on the other replica");
    assert_eq!(
        a.get_session("sess-1").await.expect("read"),
        Some(record(1))
    );
}
