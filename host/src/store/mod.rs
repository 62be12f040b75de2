//! The store: SQLite and PostgreSQL behind one trait, [`Store`].
//!
//! What lives here: tenants, revocations (and the feed that keeps every replica's in-memory
//! revocation set current), the counters that budgets and token limits charge against, and
//! handshake-era MCP sessions. [`connect`] opens a backend from a [`StoreConfig`] and applies
//! the embedded migrations (`migrations/sqlite`, `migrations/postgres`) before returning.
//! Modules that need backend-specific SQL (the audit log) get the raw pool through
//! [`Store::db`] and own their own tables and migrations.
//!
//! Conventions:
//! - Every timestamp is **unix seconds** (`i64`), taken from the gateway's clock.
//! - Every input is checked before it reaches SQL; a bad one is [`StoreError::InvalidInput`]
//!   naming the field. A database that cannot be reached is [`StoreError::Unavailable`], so
//!   callers can fail closed with a retryable error.
//! - Both backends pass the same test suite (`host/tests/store.rs`).
//! - A SQLite file is owned by one process ([`owner`]); replicas share PostgreSQL.
//!
//! This module must never panic on bad input or a bad database, never read-then-write a
//! counter (every charge is one atomic statement), never log secrets (a PostgreSQL URL is
//! redacted in `Debug` and `Display`), and never hold a lock across an `await` of anything
//! but its own SQL.

pub mod absent;
pub mod owner;
pub mod page;
mod postgres;
pub mod retention;
mod session_reads;
pub(crate) mod sqlite;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use postgres::PgStore;
pub use sqlite::{STATISTICS_REFRESH, SqliteStore, keep_statistics};

/// A boxed, sendable future: what every [`Store`] method returns, so the trait stays
/// object-safe (`Arc<dyn Store>`) without the async-trait crate.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The largest page [`Store::list_revocations`] and [`Store::revocations_since`] return.
pub const MAX_PAGE: i64 = 10_000;

/// The channel a revocation is announced on (PostgreSQL `NOTIFY`), so every replica's
/// revocation feed reads it at once instead of polling for it.
pub const REVOCATIONS_CHANNEL: &str = "intentgate_revocations";

/// How long SQLite waits for another writer before giving up with [`StoreError::Unavailable`].
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`connect`] waits for PostgreSQL to answer before giving up.
pub const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a PostgreSQL query waits for a free pooled connection.
pub const PG_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// The size of the PostgreSQL pool of one gateway process.
pub const PG_MAX_CONNECTIONS: u32 = 16;

/// Where the store lives.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// One SQLite file (created, with its directory, when missing).
    Sqlite { path: PathBuf },
    /// A PostgreSQL database, as a `postgres://user:password@host:port/db` URL.
    Postgres { url: String },
}

impl fmt::Display for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite { path } => write!(f, "sqlite:{}", path.display()),
            Self::Postgres { url } => f.write_str(&redact_url(url)),
        }
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite { path } => f.debug_struct("Sqlite").field("path", path).finish(),
            Self::Postgres { url } => f
                .debug_struct("Postgres")
                .field("url", &redact_url(url))
                .finish(),
        }
    }
}

/// A URL with its password (in the userinfo or a `password=` query parameter) replaced by
/// `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = redact_userinfo(base);
    if let Some(query) = query {
        let params: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => p.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return url.to_owned();
    };
    format!(
        "{}{}:***{}",
        &url[..scheme_end + 3],
        &userinfo[..colon],
        &rest[at..]
    )
}

/// The raw connection pool, for modules that own backend-specific tables (the audit log).
/// Cloning is cheap (the pools are reference-counted).
///
/// On SQLite, start a transaction that writes with `pool.begin_with("BEGIN IMMEDIATE")`: a
/// deferred transaction that reads and then writes can fail with `SQLITE_BUSY` without waiting.
#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// Errors of the store. Never a panic.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An argument was refused before it reached the database.
    #[error("invalid {field}: {reason}")]
    InvalidInput { field: &'static str, reason: String },
    /// The write contradicts a row that exists (for example a session id owned by another
    /// tenant).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The store configuration cannot be used (bad URL, unusable path).
    #[error("store configuration: {0}")]
    Config(String),
    /// The database cannot be reached right now (connect timeout, pool exhausted, connection
    /// lost, SQLite busy beyond its timeout, PostgreSQL serialization failure). Retryable.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Applying the embedded migrations failed.
    #[error("store migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Any other database error (constraint, bad SQL, corrupt row).
    #[error("store error: {0}")]
    Database(#[source] sqlx::Error),
}

impl StoreError {
    /// Whether retrying later may succeed (the database was unreachable or busy).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidInput {
            field,
            reason: reason.into(),
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let transient = match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => {
                let code = db.code();
                let code = code.as_deref().unwrap_or("");
                if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                    // SQLITE_BUSY (5), SQLITE_LOCKED (6) and their extended codes.
                    code.parse::<u32>()
                        .is_ok_and(|c| c & 0xff == 5 || c & 0xff == 6)
                } else {
                    // PostgreSQL: serialization failure, deadlock, too many connections,
                    // lock timeout, connection exceptions (08xxx), operator intervention
                    // (57xxx: shutdown, cancel, statement timeout).
                    matches!(code, "40001" | "40P01" | "53300" | "55P03")
                        || code.starts_with("08")
                        || code.starts_with("57")
                }
            }
            _ => false,
        };
        if transient {
            Self::Unavailable(e)
        } else {
            Self::Database(e)
        }
    }
}

/// A tenant the store has seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    /// Unix seconds.
    pub created_at: i64,
}

/// A revocation to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRevocation {
    /// The tenant the token belongs to (created when unknown).
    pub tenant: String,
    /// The revoked token id; revoking a root `jti` revokes its whole attenuation tree.
    pub jti: String,
    /// Free text, at most 1024 bytes, may be empty.
    pub reason: String,
    /// Who revoked it (an admin principal label), 1–256 bytes.
    pub revoked_by: String,
}

/// A recorded revocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// Position in the revocation feed ([`Store::revocations_since`]).
    pub seq: i64,
    pub tenant: String,
    pub jti: String,
    pub reason: String,
    pub revoked_by: String,
    /// Unix seconds.
    pub revoked_at: i64,
    /// True only in the answer of the [`Store::revoke`] call that recorded it; false when the
    /// `(tenant, jti)` was already revoked (the existing row is returned unchanged) and in lists.
    pub newly_revoked: bool,
}

/// The answer of [`Store::charge`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// The amount was added; `total` is the counter after it.
    Charged { total: i64 },
    /// The amount was not added (it would pass the limit); `total` is the unchanged counter.
    Exceeded { total: i64 },
}

/// A handshake-era MCP session, shared between replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    /// The `Mcp-Session-Id`: 1–256 visible ASCII characters.
    pub id: String,
    pub tenant: String,
    /// The token that opened the session; the caller must check that a request presenting
    /// this session carries the same tenant and token.
    pub token_jti: String,
    /// The upstream's own session id, when the upstream is stateful.
    pub upstream_session: Option<String>,
    pub protocol_version: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; the session is gone for [`Store::get_session`] once `now >= expires_at`.
    pub expires_at: i64,
}

/// The storage trait: one object, two backends. Use it as `Arc<dyn Store>`.
///
/// Every method is tenant-scoped where a tenant exists, checks its input, and maps database
/// failures to [`StoreError`].
pub trait Store: Send + Sync {
    /// A clone of the raw pool, for modules with backend-specific SQL.
    fn db(&self) -> Db;

    /// One round trip to the database (for health checks).
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Closes the pool and waits for connections to finish (graceful shutdown).
    fn close(&self) -> BoxFuture<'_, ()>;

    /// Records that `jti` is revoked in `tenant` (creating the tenant when unknown).
    /// Idempotent: revoking an already revoked `(tenant, jti)` returns the existing row, with
    /// its original reason and `newly_revoked: false`.
    fn revoke(&self, r: NewRevocation) -> BoxFuture<'_, Result<Revocation, StoreError>>;

    /// The newest revocations first, at most `limit` (1..=[`MAX_PAGE`]); `tenant: None` lists
    /// every tenant (for the superadmin).
    fn list_revocations<'a>(
        &'a self,
        tenant: Option<&'a str>,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<Revocation>, StoreError>>;

    /// Like [`Store::list_revocations`], only revocations with `seq < before_seq` (keyset
    /// paging: pass the `seq` of the last row of the previous page).
    fn list_revocations_before<'a>(
        &'a self,
        tenant: Option<&'a str>,
        before_seq: i64,
        limit: i64,
    ) -> BoxFuture<'a, Result<Vec<Revocation>, StoreError>>;

    /// The revocation feed: `(seq, jti)` with `seq > after_seq`, oldest first, at most `limit`
    /// (1..=[`MAX_PAGE`]). Poll with the last `seq` seen; a row committed after a poll always
    /// has a larger `seq` than every row that poll returned, so none is ever skipped. The same
    /// `jti` may appear twice (revoked in two tenants).
    fn revocations_since(
        &self,
        after_seq: i64,
        limit: i64,
    ) -> BoxFuture<'_, Result<Vec<(i64, String)>, StoreError>>;

    /// Records a tenant; returns whether it was new.
    fn ensure_tenant<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Every known tenant, by name.
    fn list_tenants(&self) -> BoxFuture<'_, Result<Vec<Tenant>, StoreError>>;

    /// Records that the token tree `root_jti` of `tenant` was minted with a step-up at `at`
    /// (unix seconds), before the token leaves the gateway. Idempotent.
    fn record_step_up<'a>(
        &'a self,
        tenant: &'a str,
        root_jti: &'a str,
        at: i64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// When the token tree `root_jti` of `tenant` was minted with a step-up, if it was.
    fn minted_step_up<'a>(
        &'a self,
        tenant: &'a str,
        root_jti: &'a str,
    ) -> BoxFuture<'a, Result<Option<i64>, StoreError>>;

    /// Atomically adds `amount` to the counter `(key, window_start)` if the result stays
    /// `<= limit` (`limit >= 0`), in one statement, so concurrent charges from any number of
    /// replicas never pass the limit. A negative `amount` is a refund: always applied, never
    /// below zero, `limit` ignored, answered `Charged`.
    fn charge<'a>(
        &'a self,
        key: &'a str,
        window_start: i64,
        amount: i64,
        limit: i64,
    ) -> BoxFuture<'a, Result<ChargeOutcome, StoreError>>;

    /// The counter's value (0 when never charged).
    fn counter<'a>(
        &'a self,
        key: &'a str,
        window_start: i64,
    ) -> BoxFuture<'a, Result<i64, StoreError>>;

    /// Creates or updates a session. An update keeps `created_at` and refuses
    /// ([`StoreError::Conflict`]) to move a session to another tenant.
    fn put_session<'a>(&'a self, s: &'a SessionRecord) -> BoxFuture<'a, Result<(), StoreError>>;

    /// The session, unless unknown or expired (`now >= expires_at`).
    fn get_session<'a>(
        &'a self,
        id: &'a str,
    ) -> BoxFuture<'a, Result<Option<SessionRecord>, StoreError>>;

    /// Deletes a session; returns whether it existed.
    fn delete_session<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Deletes expired sessions; returns how many.
    fn prune_sessions(&self) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Deletes up to [`retention::BATCH`] counter windows that can no longer be charged and
    /// started before `before` (unix seconds); returns how many ([`retention`]).
    fn prune_counters(&self, before: i64) -> BoxFuture<'_, Result<u64, StoreError>>;
}

/// Opens the store described by `config` and applies the embedded migrations (idempotent:
/// already applied ones are skipped; migrations applied by a newer binary are tolerated).
pub async fn connect(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    match config {
        StoreConfig::Sqlite { path } => Ok(Arc::new(SqliteStore::open(path).await?)),
        StoreConfig::Postgres { url } => Ok(Arc::new(PgStore::connect(url).await?)),
    }
}

/// Now, in unix seconds (0 if the clock is before 1970).
pub(crate) fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Input checks shared by both backends, so both refuse exactly the same things.
pub(crate) mod check {
    use super::{MAX_PAGE, NewRevocation, SessionRecord, StoreError};

    type Result = std::result::Result<(), StoreError>;

    /// The same rule as `config::valid_tenant_name`: 1–64 of `[A-Za-z0-9._-]`.
    pub fn tenant(name: &str) -> Result {
        if name.is_empty() || name.len() > 64 {
            return Err(StoreError::invalid("tenant", "must be 1-64 characters"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(StoreError::invalid(
                "tenant",
                "only ASCII letters, digits, '-', '_' and '.' are allowed",
            ));
        }
        Ok(())
    }

    /// 1..=max visible ASCII characters (0x21-0x7E): ids, jtis, protocol versions.
    pub fn visible_ascii(field: &'static str, v: &str, max: usize) -> Result {
        if v.is_empty() || v.len() > max {
            return Err(StoreError::invalid(
                field,
                format!("must be 1-{max} characters"),
            ));
        }
        if !v.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(StoreError::invalid(
                field,
                "only visible ASCII characters are allowed",
            ));
        }
        Ok(())
    }

    /// Free text up to `max` bytes without control characters (tab and newline allowed).
    pub fn text(field: &'static str, v: &str, min: usize, max: usize) -> Result {
        if v.len() < min || v.len() > max {
            return Err(StoreError::invalid(
                field,
                format!("must be {min}-{max} bytes"),
            ));
        }
        if v.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
            return Err(StoreError::invalid(
                field,
                "control characters are not allowed",
            ));
        }
        Ok(())
    }

    pub fn limit(limit: i64) -> Result {
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(StoreError::invalid(
                "limit",
                format!("must be 1-{MAX_PAGE}"),
            ));
        }
        Ok(())
    }

    pub fn revocation(r: &NewRevocation) -> Result {
        tenant(&r.tenant)?;
        visible_ascii("jti", &r.jti, 128)?;
        text("reason", &r.reason, 0, 1024)?;
        text("revoked_by", &r.revoked_by, 1, 256)
    }

    pub fn counter_key(key: &str) -> Result {
        text("key", key, 1, 512)
    }

    /// `limit` must be >= 0 for a charge; refunds (`amount < 0`) ignore it.
    pub fn charge(key: &str, amount: i64, limit: i64) -> Result {
        counter_key(key)?;
        if amount >= 0 && limit < 0 {
            return Err(StoreError::invalid("limit", "must not be negative"));
        }
        if amount == i64::MIN {
            return Err(StoreError::invalid("amount", "out of range"));
        }
        Ok(())
    }

    pub fn session_id(id: &str) -> Result {
        visible_ascii("session id", id, 256)
    }

    pub fn session(s: &SessionRecord) -> Result {
        session_id(&s.id)?;
        tenant(&s.tenant)?;
        visible_ascii("token_jti", &s.token_jti, 128)?;
        if let Some(up) = &s.upstream_session {
            visible_ascii("upstream_session", up, 1024)?;
        }
        visible_ascii("protocol_version", &s.protocol_version, 64)?;
        if s.expires_at < s.created_at {
            return Err(StoreError::invalid(
                "expires_at",
                "must not be before created_at",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("postgres://ig:s3cr3t@db:5432/ig?sslmode=require"),
            "postgres://ig:***@db:5432/ig?sslmode=require"
        );
        assert_eq!(redact_url("postgres://ig@db/ig"), "postgres://ig@db/ig");
        assert_eq!(redact_url("postgres://db/ig"), "postgres://db/ig");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(
            redact_url("postgres://u:p@ss@h/d?password=x&sslmode=disable"),
            "postgres://u:***@h/d?password=***&sslmode=disable"
        );
        assert_eq!(
            redact_url("postgres:///d?host=/run&password=x"),
            "postgres:///d?host=/run&password=***"
        );
        let cfg = StoreConfig::Postgres {
            url: "postgresql://u:p%40ss@h/d".into(),
        };
        assert!(!format!("{cfg:?}").contains("p%40ss"));
        assert!(!cfg.to_string().contains("p%40ss"));
    }

    #[test]
    fn tenant_rule_matches_config() {
        for ok in ["default", "acme", "a.b-c_d", &"x".repeat(64)] {
            assert!(check::tenant(ok).is_ok(), "{ok}");
            assert!(crate::config::valid_tenant_name(ok), "{ok}");
        }
        for bad in ["", "a b", "a:b", "é", &"x".repeat(65)] {
            assert!(check::tenant(bad).is_err(), "{bad}");
            assert!(!crate::config::valid_tenant_name(bad), "{bad}");
        }
    }

    #[test]
    fn charge_checks() {
        assert!(check::charge("k", 1, 0).is_ok());
        assert!(check::charge("k", -1, i64::MAX).is_ok());
        assert!(check::charge("k", -1, -1).is_ok());
        assert!(check::charge("k", 1, -1).is_err());
        assert!(check::charge("", 1, 1).is_err());
        assert!(check::charge("k", i64::MIN, 1).is_err());
    }
}
