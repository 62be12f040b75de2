//! The PostgreSQL backend of [`Store`]: for production and for more than one replica. Every
//! replica shares revocations, counters, sessions and tenants through it.
//!
//! Concurrency: a charge is one `INSERT … ON CONFLICT DO UPDATE … WHERE` statement, atomic under
//! any number of replicas. The revocation feed pages on an identity column, which alone could
//! commit out of order; every revoke therefore locks the `revocations` table against other
//! writers first (see [`PgStore::revoke`](Store::revoke)), so `seq` order is commit order.
//!
//! This file must never build SQL from input (every value is bound), never read-then-write a
//! counter, never log the connection URL unredacted, and never panic.

use std::str::FromStr;
use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};

use super::{
    BoxFuture, ChargeOutcome, Db, NewRevocation, PG_ACQUIRE_TIMEOUT, PG_CONNECT_TIMEOUT,
    PG_MAX_CONNECTIONS, Revocation, SessionRecord, Store, StoreError, Tenant, check, now_secs,
    redact_url,
};

/// The PostgreSQL store. Cheap to clone (the pool is reference-counted).
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    /// Session reads, gathered into one query per round ([`super::session_reads`]).
    session_reads: super::session_reads::SessionReads,
}

fn migrator() -> sqlx::migrate::Migrator {
    let mut m = sqlx::migrate!("../migrations/postgres");
    // A database already migrated by a newer binary (rolling upgrade, rollback) still opens.
    m.set_ignore_missing(true);
    m
}

/// Settings of every session, so that a stalled statement or a vanished client cannot hold a
/// connection, a row lock (the audit chain head) or a table lock (revocations) for long:
/// - `statement_timeout`: no statement runs longer than this (a migration included);
/// - `idle_in_transaction_session_timeout`: a transaction whose client stopped talking (a
///   black-holed replica holding the chain head `FOR UPDATE`) is ended by the server;
/// - `tcp_keepalives_*`: the server probes an idle connection and drops it when the client is
///   gone. sqlx sets no client-side keepalive on its socket; on the client, the audit deadline
///   (`INTENTGATE_AUDIT_DEADLINE_MS`) bounds what a caller waits, and the pool's acquire
///   timeout bounds a new connection.
const SESSION_SETTINGS: [(&str, &str); 5] = [
    ("statement_timeout", "30s"),
    ("idle_in_transaction_session_timeout", "60s"),
    ("tcp_keepalives_idle", "30"),
    ("tcp_keepalives_interval", "10"),
    ("tcp_keepalives_count", "3"),
];

const REVOCATION_COLUMNS: &str = "seq, tenant, jti, reason, revoked_by, revoked_at";
pub(super) const SESSION_COLUMNS: &str =
    "id, tenant, token_jti, upstream_session, protocol_version, created_at, expires_at";

fn revocation(row: &PgRow, newly_revoked: bool) -> Result<Revocation, StoreError> {
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

pub(super) fn session(row: &PgRow) -> Result<SessionRecord, StoreError> {
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

impl PgStore {
    /// Connects to the database at `url` (bounded by [`PG_CONNECT_TIMEOUT`]) and applies the
    /// migrations. sqlx holds a PostgreSQL advisory lock while migrating, so replicas starting
    /// together apply each migration once.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| {
                StoreError::Config(format!("bad PostgreSQL URL {}: {e}", redact_url(url)))
            })?
            .application_name("intentgate")
            .options(SESSION_SETTINGS);
        let pool = PgPoolOptions::new()
            .max_connections(PG_MAX_CONNECTIONS)
            .min_connections(0)
            .acquire_timeout(PG_ACQUIRE_TIMEOUT)
            .idle_timeout(Some(Duration::from_secs(600)))
            .max_lifetime(Some(Duration::from_secs(1800)))
            .connect_with(options);
        let pool = match tokio::time::timeout(PG_CONNECT_TIMEOUT, pool).await {
            Ok(pool) => pool?,
            Err(_elapsed) => return Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut)),
        };
        let session_reads = super::session_reads::SessionReads::start(pool.clone());
        let store = Self {
            pool,
            session_reads,
        };
        migrator().run(&store.pool).await?;
        Ok(store)
    }

    /// The pool, for backend-specific SQL.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn revoke_impl(&self, r: NewRevocation) -> Result<Revocation, StoreError> {
        check::revocation(&r)?;
        let now = now_secs();
        let mut tx = self.pool.begin().await?;
        // The feed (`revocations_since`) must never skip a row. An identity value is taken at
        // INSERT time but becomes visible at COMMIT, so without this lock tx A could take
        // seq 5, tx B seq 6, B commit first, and a poller that saw 6 would never look at 5.
        // SHARE ROW EXCLUSIVE conflicts with itself and with every INSERT's ROW EXCLUSIVE, so
        // revokes are serialized from "take seq" to "commit": seq order is commit order.
        // Readers (ACCESS SHARE) are not blocked. Revocations are rare admin actions, so the
        // serialization costs nothing that matters; the alternative (re-reading a trailing
        // window on every poll) would push that subtlety onto every caller.
        // A revoke stuck behind a hung lock holder gives up (Unavailable) instead of waiting
        // forever.
        sqlx::query("SET LOCAL lock_timeout = '5s'")
            .execute(&mut *tx)
            .await?;
        sqlx::query("LOCK TABLE revocations IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO tenants (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&r.tenant)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let inserted = sqlx::query(&format!(
            "INSERT INTO revocations (tenant, jti, reason, revoked_by, revoked_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant, jti) DO NOTHING \
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
                    "SELECT {REVOCATION_COLUMNS} FROM revocations WHERE tenant = $1 AND jti = $2"
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
                    "SELECT {REVOCATION_COLUMNS} FROM revocations WHERE tenant = $1 \
                     AND seq < $2 ORDER BY seq DESC LIMIT $3"
                ))
                .bind(t)
                .bind(before_seq)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {REVOCATION_COLUMNS} FROM revocations WHERE seq < $1 \
                     ORDER BY seq DESC LIMIT $2"
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
            sqlx::query("SELECT seq, jti FROM revocations WHERE seq > $1 ORDER BY seq LIMIT $2")
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
            "INSERT INTO step_ups (tenant, root_jti, step_up_at) VALUES ($1, $2, $3) \
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
            "SELECT step_up_at FROM step_ups WHERE tenant = $1 AND root_jti = $2",
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
            "INSERT INTO tenants (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
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
                "UPDATE counters SET value = GREATEST(value + $3, 0), updated_at = $4 \
                 WHERE key = $1 AND window_start = $2 RETURNING value",
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
        // 0 <= amount <= limit). PostgreSQL locks the
        // conflicting row, so the WHERE sees its latest committed value.
        let total: Option<i64> = sqlx::query_scalar(
            "INSERT INTO counters (key, window_start, value, updated_at) \
             SELECT $1, $2, $3, $5 WHERE $3 <= $4 \
             ON CONFLICT (key, window_start) DO UPDATE \
             SET value = counters.value + EXCLUDED.value, updated_at = EXCLUDED.updated_at \
             WHERE counters.value <= $4 - EXCLUDED.value \
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
            sqlx::query_scalar("SELECT value FROM counters WHERE key = $1 AND window_start = $2")
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
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (id) DO UPDATE SET upstream_session = EXCLUDED.upstream_session, \
             protocol_version = EXCLUDED.protocol_version, expires_at = EXCLUDED.expires_at \
             WHERE mcp_sessions.tenant = EXCLUDED.tenant \
             AND mcp_sessions.token_jti = EXCLUDED.token_jti",
        )
        .bind(&s.id)
        .bind(&s.tenant)
        .bind(&s.token_jti)
        .bind(&s.upstream_session)
        .bind(&s.protocol_version)
        .bind(s.created_at)
        .bind(s.expires_at)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::Conflict(
                "the session id belongs to another tenant or token".into(),
            ));
        }
        Ok(())
    }

    async fn get_session_impl(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        check::session_id(id)?;
        self.session_reads.get(id).await
    }

    async fn delete_session_impl(&self, id: &str) -> Result<bool, StoreError> {
        check::session_id(id)?;
        let done = sqlx::query("DELETE FROM mcp_sessions WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn prune_sessions_impl(&self) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM mcp_sessions WHERE expires_at <= $1")
            .bind(now_secs())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

impl Store for PgStore {
    fn db(&self) -> Db {
        Db::Postgres(self.pool.clone())
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
