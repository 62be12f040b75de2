//! The SQLite backend of [`Store`]: the embedded default, one file in WAL mode with
//! `synchronous=FULL`, so a committed revocation or charge survives a power cut.
//!
//! SQLite has one writer at a time: single-statement writes wait on `busy_timeout`, and
//! multi-statement writes start with `BEGIN IMMEDIATE` so they take the write lock up front
//! instead of failing with `SQLITE_BUSY` half-way. Because writes are serialized, `seq` order
//! in `revocations` is commit order and the feed cannot skip a row.
//!
//! This file must never build SQL from input (every value is bound), never read-then-write a
//! counter, and never panic.

use std::path::Path;
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};

use super::{
    BoxFuture, ChargeOutcome, Db, NewRevocation, Revocation, SQLITE_BUSY_TIMEOUT, SessionRecord,
    Store, StoreError, Tenant, check, now_secs,
};

/// Each connection's page cache (negative: KiB), allocated as pages are used.
const SQLITE_CACHE_KIB: &str = "-32768";

/// Connections in the pool: WAL lets readers run beside the one writer.
const MAX_CONNECTIONS: u32 = 8;

/// The SQLite store. Cheap to clone (the pool is reference-counted).
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// This process's ownership of the file ([`super::owner`]).
    owner: std::sync::Arc<super::owner::Owner>,
}

/// Pool options whose every connection attaches the audit query's lookup file of the
/// database at `path` (`audit/facets.rs`), read-only: the queries read its tables beside
/// `audit_events`, and a `BEGIN IMMEDIATE` of the pool takes only the database's write lock,
/// never the lookup file's (which its writer holds while it enters a slice).
/// [`create_facets`] must have made the file first.
pub(crate) fn pool_options(path: &Path) -> SqlitePoolOptions {
    let facets = crate::audit::facets::read_only_uri(path);
    SqlitePoolOptions::new().after_connect(move |conn, _| {
        let facets = facets.clone();
        Box::pin(async move {
            sqlx::query("ATTACH DATABASE ?1 AS facets")
                .bind(facets)
                .execute(conn)
                .await?;
            Ok(())
        })
    })
}

/// Creates the audit lookup file of the database at `path` when it is missing, before the pool
/// attaches it ([`crate::audit::facets::create`]).
pub(crate) async fn create_facets(path: &Path) -> Result<(), StoreError> {
    let path = path.to_path_buf();
    let shown = crate::audit::facets::path_of(&path);
    tokio::task::spawn_blocking(move || crate::audit::facets::create(&path))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .map_err(|e| {
            StoreError::Config(format!(
                "cannot create the audit lookup file {}: {e}",
                shown.display()
            ))
        })
}

/// Creates or checks the audit lookup file of the migrated database at `path`
/// ([`crate::audit::facets::prepare`]), on a connection of its own, before anything queries it.
pub(crate) async fn prepare_facets(path: &Path) -> Result<(), StoreError> {
    let path = path.to_path_buf();
    let shown = crate::audit::facets::path_of(&path);
    let prepared = tokio::task::spawn_blocking(move || {
        let mut conn = rusqlite::Connection::open(&path).map_err(|e| e.to_string())?;
        conn.busy_timeout(SQLITE_BUSY_TIMEOUT)
            .map_err(|e| e.to_string())?;
        crate::audit::facets::attach(&conn, &path).map_err(|e| e.to_string())?;
        crate::audit::facets::prepare(&mut conn).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    prepared.map_err(|e| {
        StoreError::Config(format!(
            "cannot prepare the audit lookup file {}: {e}",
            shown.display()
        ))
    })
}

fn migrator() -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("../migrations/sqlite");
    // A database already migrated by a newer binary (rolling upgrade, rollback) still opens.
    m.set_ignore_missing(true);
    m
}

const REVOCATION_COLUMNS: &str = "seq, tenant, jti, reason, revoked_by, revoked_at";
const SESSION_COLUMNS: &str =
    "id, tenant, token_jti, upstream_session, protocol_version, created_at, expires_at";

fn revocation(row: &SqliteRow, newly_revoked: bool) -> Result<Revocation, StoreError> {
    Ok(Revocation {
        seq: row.try_get("seq")?,
        tenant: row.try_get("tenant")?,
        jti: row.try_get("jti")?,
        reason: row.try_get("reason")?,
        revoked_by: row.try_get("revoked_by")?,
        revoked_at: row.try_get("revoked_at")?,
        newly_revoked,
    })
}

fn session(row: &SqliteRow) -> Result<SessionRecord, StoreError> {
    Ok(SessionRecord {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant")?,
        token_jti: row.try_get("token_jti")?,
        upstream_session: row.try_get("upstream_session")?,
        protocol_version: row.try_get("protocol_version")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
    })
}

impl SqliteStore {
    /// Opens (creating when missing, with its directory) the SQLite file at `path` and applies
    /// the migrations.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        if path.as_os_str().is_empty() {
            return Err(StoreError::Config("the SQLite path is empty".into()));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await.map_err(|e| {
                StoreError::Config(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        // Before anything is read or written: another process may own this file.
        let owner = super::owner::own(path)?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(SQLITE_BUSY_TIMEOUT)
            .foreign_keys(true)
            // The audit indexes of many tenants are written at once: a page cache that holds
            // their hot leaves keeps the committer from reading them back from the kernel.
            .pragma("cache_size", SQLITE_CACHE_KIB);
        create_facets(path).await?;
        let pool = pool_options(path)
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(SQLITE_BUSY_TIMEOUT + Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(|e| {
                StoreError::Config(format!(
                    "cannot open SQLite database {}: {e}",
                    path.display()
                ))
            })?;
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&pool)
            .await?;
        if !mode.eq_ignore_ascii_case("wal") {
            // Some filesystems (network mounts) cannot do WAL; SQLite then keeps its rollback
            // journal. Still durable, only slower under concurrency.
            tracing::warn!(path = %path.display(), journal_mode = %mode, "SQLite is not in WAL mode");
        }
        let store = Self { pool, owner };
        store.migrate().await?;
        prepare_facets(path).await?;
        store.optimize().await;
        Ok(store)
    }

    async fn optimize(&self) {
        optimize(&self.pool).await;
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        match migrator().run(&self.pool).await {
            Ok(()) => Ok(()),
            // SQLite has no migration lock: two processes opening a new file at once can race
            // on the same migration. The loser retries once and then finds it applied.
            Err(first) => {
                tracing::warn!(error = %first, "SQLite migration failed, retrying once");
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(migrator().run(&self.pool).await?)
            }
        }
    }

    /// The pool, for backend-specific SQL.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn revoke_impl(&self, r: NewRevocation) -> Result<Revocation, StoreError> {
        check::revocation(&r)?;
        let now = now_secs();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "INSERT INTO tenants (name, created_at) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&r.tenant)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let inserted = sqlx::query(&format!(
            "INSERT INTO revocations (tenant, jti, reason, revoked_by, revoked_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (tenant, jti) DO NOTHING \
             RETURNING {REVOCATION_COLUMNS}"
        ))
        .bind(&r.tenant)
        .bind(&r.jti)
        .bind(&r.reason)
        .bind(&r.revoked_by)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let out = match inserted {
            Some(row) => revocation(&row, true)?,
            None => {
                let row = sqlx::query(&format!(
                    "SELECT {REVOCATION_COLUMNS} FROM revocations WHERE tenant = ?1 AND jti = ?2"
                ))
                .bind(&r.tenant)
                .bind(&r.jti)
                .fetch_one(&mut *tx)
                .await?;
                revocation(&row, false)?
            }
        };
        tx.commit().await?;
        Ok(out)
    }

    async fn list_revocations_impl(
        &self,
        tenant: Option<&str>,
        before_seq: i64,
        limit: i64,
    ) -> Result<Vec<Revocation>, StoreError> {
        check::limit(limit)?;
        let rows = match tenant {
            Some(t) => {
                check::tenant(t)?;
                sqlx::query(&format!(
                    "SELECT {REVOCATION_COLUMNS} FROM revocations WHERE tenant = ?1 \
                     AND seq < ?2 ORDER BY seq DESC LIMIT ?3"
                ))
                .bind(t)
                .bind(before_seq)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {REVOCATION_COLUMNS} FROM revocations WHERE seq < ?1 \
                     ORDER BY seq DESC LIMIT ?2"
                ))
                .bind(before_seq)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(|r| revocation(r, false)).collect()
    }

    async fn revocations_since_impl(
        &self,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        check::limit(limit)?;
        let rows =
            sqlx::query("SELECT seq, jti FROM revocations WHERE seq > ?1 ORDER BY seq LIMIT ?2")
                .bind(after_seq)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("seq")?, r.try_get("jti")?)))
            .collect()
    }

    async fn record_step_up_impl(
        &self,
        tenant: &str,
        root_jti: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        check::tenant(tenant)?;
        check::visible_ascii("root_jti", root_jti, 128)?;
        sqlx::query(
            "INSERT INTO step_ups (tenant, root_jti, step_up_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (tenant, root_jti) DO NOTHING",
        )
        .bind(tenant)
        .bind(root_jti)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn minted_step_up_impl(
        &self,
        tenant: &str,
        root_jti: &str,
    ) -> Result<Option<i64>, StoreError> {
        let at: Option<i64> = sqlx::query_scalar(
            "SELECT step_up_at FROM step_ups WHERE tenant = ?1 AND root_jti = ?2",
        )
        .bind(tenant)
        .bind(root_jti)
        .fetch_optional(&self.pool)
        .await?;
        Ok(at)
    }

    async fn ensure_tenant_impl(&self, name: &str) -> Result<bool, StoreError> {
        check::tenant(name)?;
        let done = sqlx::query(
            "INSERT INTO tenants (name, created_at) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(now_secs())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn list_tenants_impl(&self) -> Result<Vec<Tenant>, StoreError> {
        let rows = sqlx::query("SELECT name, created_at FROM tenants ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Tenant {
                    name: r.try_get("name")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    async fn charge_impl(
        &self,
        key: &str,
        window_start: i64,
        amount: i64,
        limit: i64,
    ) -> Result<ChargeOutcome, StoreError> {
        check::charge(key, amount, limit)?;
        let now = now_secs();
        if amount < 0 {
            // A refund: always applied, floored at zero; nothing to refund on a missing row.
            let total: Option<i64> = sqlx::query_scalar(
                "UPDATE counters SET value = max(value + ?3, 0), updated_at = ?4 \
                 WHERE key = ?1 AND window_start = ?2 RETURNING value",
            )
            .bind(key)
            .bind(window_start)
            .bind(amount)
            .bind(now)
            .fetch_optional(&self.pool)
            .await?;
            return Ok(ChargeOutcome::Charged {
                total: total.unwrap_or(0),
            });
        }
        if amount > limit {
            return Ok(ChargeOutcome::Exceeded {
                total: self.counter_impl(key, window_start).await?,
            });
        }
        // One statement: insert the first charge, or add to the existing row only while the
        // result stays within the limit (`value <= limit - amount` cannot overflow because
        // 0 <= amount <= limit). The `WHERE` on the SELECT also resolves SQLite's upsert
        // parsing ambiguity.
        let total: Option<i64> = sqlx::query_scalar(
            "INSERT INTO counters (key, window_start, value, updated_at) \
             SELECT ?1, ?2, ?3, ?5 WHERE ?3 <= ?4 \
             ON CONFLICT (key, window_start) DO UPDATE \
             SET value = counters.value + excluded.value, updated_at = excluded.updated_at \
             WHERE counters.value <= ?4 - excluded.value \
             RETURNING value",
        )
        .bind(key)
        .bind(window_start)
        .bind(amount)
        .bind(limit)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match total {
            Some(total) => ChargeOutcome::Charged { total },
            None => ChargeOutcome::Exceeded {
                total: self.counter_impl(key, window_start).await?,
            },
        })
    }

    async fn counter_impl(&self, key: &str, window_start: i64) -> Result<i64, StoreError> {
        check::counter_key(key)?;
        let v: Option<i64> =
            sqlx::query_scalar("SELECT value FROM counters WHERE key = ?1 AND window_start = ?2")
                .bind(key)
                .bind(window_start)
                .fetch_optional(&self.pool)
                .await?;
        Ok(v.unwrap_or(0))
    }

    async fn put_session_impl(&self, s: &SessionRecord) -> Result<(), StoreError> {
        check::session(s)?;
        let done = sqlx::query(
            "INSERT INTO mcp_sessions \
             (id, tenant, token_jti, upstream_session, protocol_version, created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT (id) DO UPDATE SET upstream_session = excluded.upstream_session, \
             protocol_version = excluded.protocol_version, expires_at = excluded.expires_at \
             WHERE mcp_sessions.tenant = excluded.tenant \
             AND mcp_sessions.token_jti = excluded.token_jti",
        )
        .bind(&s.id)
        .bind(&s.tenant)
        .bind(&s.token_jti)
        .bind(&s.upstream_session)
        .bind(&s.protocol_version)
        .bind(s.created_at)
        .bind(s.expires_at)
        .execute(&self.pool)
        .await;
        // Whatever the outcome (an error may follow a commit), a row may exist now that was
        // absent before.
        self.owner.absent.invalidate();
        let done = done?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Conflict(
                "the session id belongs to another tenant or token".into(),
            ));
        }
        Ok(())
    }

    async fn get_session_impl(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        check::session_id(id)?;
        let absent = &self.owner.absent;
        let version = absent.version();
        if absent.contains(id) {
            return Ok(None);
        }
        let row = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM mcp_sessions WHERE id = ?1 AND expires_at > ?2"
        ))
        .bind(id)
        .bind(now_secs())
        .fetch_optional(&self.pool)
        .await?;
        if row.is_none() {
            absent.remember(id, version);
        }
        row.as_ref().map(session).transpose()
    }

    async fn delete_session_impl(&self, id: &str) -> Result<bool, StoreError> {
        check::session_id(id)?;
        let done = sqlx::query("DELETE FROM mcp_sessions WHERE id = ?1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn prune_sessions_impl(&self) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM mcp_sessions WHERE expires_at <= ?1")
            .bind(now_secs())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

impl Store for SqliteStore {
    fn db(&self) -> Db {
        Db::Sqlite(self.pool.clone())
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.pool.close())
    }

    fn revoke(&self, r: NewRevocation) -> BoxFuture<'_, Result<Revocation, StoreError>> {
        Box::pin(self.revoke_impl(r))
    }

    fn list_revocations<'a>(
        &'a self,
        tenant: Option<&'a str>,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<Revocation>, StoreError>> {
        Box::pin(self.list_revocations_impl(tenant, i64::MAX, limit))
    }

    fn list_revocations_before<'a>(
        &'a self,
        tenant: Option<&'a str>,
        before_seq: i64,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<Revocation>, StoreError>> {
        Box::pin(self.list_revocations_impl(tenant, before_seq, limit))
    }

    fn revocations_since(
        &self,
        after_seq: i64,
        limit: i64,
    ) -> BoxFuture<'_, Result<Vec<(i64, String)>, StoreError>> {
        Box::pin(self.revocations_since_impl(after_seq, limit))
    }

    fn ensure_tenant<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.ensure_tenant_impl(name))
    }

    fn list_tenants(&self) -> BoxFuture<'_, Result<Vec<Tenant>, StoreError>> {
        Box::pin(self.list_tenants_impl())
    }

    fn record_step_up<'a>(
        &'a self,
        tenant: &'a str,
        root_jti: &'a str,
        at: i64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.record_step_up_impl(tenant, root_jti, at))
    }

    fn minted_step_up<'a>(
        &'a self,
        tenant: &'a str,
        root_jti: &'a str,
    ) -> BoxFuture<'a, Result<Option<i64>, StoreError>> {
        Box::pin(self.minted_step_up_impl(tenant, root_jti))
    }

    fn charge<'a>(
        &'a self,
        key: &'a str,
        window_start: i64,
        amount: i64,
        limit: i64,
    ) -> BoxFuture<'a, Result<ChargeOutcome, StoreError>> {
        Box::pin(self.charge_impl(key, window_start, amount, limit))
    }

    fn counter<'a>(
        &'a self,
        key: &'a str,
        window_start: i64,
    ) -> BoxFuture<'a, Result<i64, StoreError>> {
        Box::pin(self.counter_impl(key, window_start))
    }

    fn put_session<'a>(&'a self, s: &'a SessionRecord) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.put_session_impl(s))
    }

    fn get_session<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<SessionRecord>, StoreError>> {
        Box::pin(self.get_session_impl(id))
    }

    fn delete_session<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.delete_session_impl(id))
    }

    fn prune_sessions(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(self.prune_sessions_impl())
    }

    fn prune_counters(&self, before: i64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let done = sqlx::query(super::retention::PRUNE_COUNTERS)
                .bind(before)
                .execute(&self.pool)
                .await?;
            Ok(done.rows_affected())
        })
    }
}

/// How often a running gateway refreshes the planner's statistics ([`keep_statistics`]).
pub const STATISTICS_REFRESH: Duration = Duration::from_secs(3600);

/// Gives the query planner statistics: `PRAGMA optimize` analyzes the tables that have none yet
/// or have grown many times since, each bounded to a sample (`analysis_limit`), as SQLite
/// advises on opening a database and then periodically. Without statistics the planner may walk
/// the wrong index of a filtered audit query, or of the approvals and outbox queries.
/// A failure only leaves the plans as they were.
pub(crate) async fn optimize(pool: &SqlitePool) {
    let result = async {
        let mut conn = pool.acquire().await?;
        // `analysis_limit` is per connection: set it on the one that analyzes.
        sqlx::query("PRAGMA analysis_limit = 1000")
            .execute(&mut *conn)
            .await?;
        // `main.`: the lookup file is attached read-only here (its writer keeps it).
        sqlx::query("PRAGMA main.optimize = 0x10002")
            .execute(&mut *conn)
            .await?;
        Ok::<_, sqlx::Error>(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "SQLite PRAGMA optimize failed; query plans keep their statistics");
    }
}

/// Refreshes the statistics every `every` while the gateway runs (SQLite advises it for
/// long-lived connections): a gateway started on an empty file would otherwise plan its audit
/// queries without statistics until it restarts, however many events it has written since.
/// Each run is a short write transaction (sampled), so the audit writer waits for it at most
/// a few milliseconds; nothing wakes in between.
pub async fn keep_statistics(pool: SqlitePool, every: Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if pool.is_closed() {
            return;
        }
        optimize(&pool).await;
    }
}
