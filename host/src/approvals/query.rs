//! Reads of the approval queue: one approval by id, a page of a tenant's queue (or of every
//! tenant's, for the superadmin), and the approvals past their expiry (for the sweep).
//!
//! Every read is scoped by tenant when the caller is; this module must never return a row of a
//! tenant the caller did not name, and never build SQL from input (every value is bound).

use sqlx::Row as _;

use super::{Approval, Status};
use crate::store::Db;
use crate::store::page::read_bounded;

/// Errors reading the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("invalid {0}")]
    Invalid(&'static str),
    #[error("approval store: {0}")]
    Store(#[from] sqlx::Error),
    #[error("approval row is malformed: {0}")]
    Malformed(String),
}

const COLUMNS: &str = "tenant, pending_id, capability_token_id, root_capability_token_id, \
     agent_id, tool, args, args_digest, bundle_digest, intent_summary, reason, escalated_by, status, \
     requires_step_up, created_ms, expires_ms, decided_ms, decided_by, decide_note, consumed_ms";

/// [`COLUMNS`] without the stored arguments (up to a request body each), for reads that look
/// through many rows and never show them: an escalation's look at its token's queue, the sweep.
const COLUMNS_BRIEF: &str = "tenant, pending_id, capability_token_id, root_capability_token_id, \
     agent_id, tool, CAST(NULL AS TEXT) AS args, args_digest, bundle_digest, intent_summary, \
     reason, escalated_by, status, requires_step_up, created_ms, expires_ms, decided_ms, \
     decided_by, decide_note, consumed_ms";

/// The most rows one page returns.
pub const MAX_LIMIT: i64 = 500;

/// Reads one row from either backend.
macro_rules! row_to_approval {
    ($row:expr) => {{
        let row = $row;
        let status: String = row.try_get("status")?;
        let args: Option<String> = row.try_get("args")?;
        let step_up: i64 = row.try_get("requires_step_up")?;
        Approval {
            tenant: row.try_get("tenant")?,
            pending_id: row.try_get("pending_id")?,
            capability_token_id: row.try_get("capability_token_id")?,
            root_capability_token_id: row.try_get("root_capability_token_id")?,
            agent_id: row.try_get("agent_id")?,
            tool: row.try_get("tool")?,
            args: match args {
                Some(a) => Some(
                    serde_json::from_str(&a).map_err(|e| QueryError::Malformed(e.to_string()))?,
                ),
                None => None,
            },
            args_digest: row.try_get("args_digest")?,
            bundle_digest: row.try_get("bundle_digest")?,
            intent_summary: row.try_get("intent_summary")?,
            reason: row.try_get("reason")?,
            escalated_by: row.try_get("escalated_by")?,
            status: Status::parse(&status)
                .ok_or_else(|| QueryError::Malformed(format!("status {status:?}")))?,
            requires_step_up: step_up != 0,
            created_ms: row.try_get("created_ms")?,
            expires_ms: row.try_get("expires_ms")?,
            decided_ms: row.try_get("decided_ms")?,
            decided_by: row.try_get("decided_by")?,
            decide_note: row.try_get("decide_note")?,
            consumed_ms: row.try_get("consumed_ms")?,
        }
    }};
}

/// One approval by id, within `tenant` when given (`None`: any tenant, the superadmin's view).
pub async fn get(db: &Db, tenant: Option<&str>, id: &str) -> Result<Option<Approval>, QueryError> {
    if !super::valid_id(id) {
        return Ok(None);
    }
    let sql = format!(
        "SELECT {COLUMNS} FROM approvals WHERE pending_id = $1 AND ($2 = '' OR tenant = $2)"
    );
    let tenant = tenant.unwrap_or_default();
    Ok(match db {
        Db::Sqlite(pool) => match sqlx::query(&sql)
            .bind(id)
            .bind(tenant)
            .fetch_optional(pool)
            .await?
        {
            Some(row) => Some(row_to_approval!(row)),
            None => None,
        },
        Db::Postgres(pool) => match sqlx::query(&sql)
            .bind(id)
            .bind(tenant)
            .fetch_optional(pool)
            .await?
        {
            Some(row) => Some(row_to_approval!(row)),
            None => None,
        },
    })
}

/// What a page of the queue is filtered by.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// `None`: every tenant (superadmin).
    pub tenant: Option<String>,
    /// `None`: every status. `Pending` lists only rows still pending now; `Expired` includes
    /// pending and approved rows past their expiry.
    pub status: Option<Status>,
    pub limit: i64,
    /// Keyset cursor: `(created_ms, pending_id)` of the last row of the previous page.
    pub after: Option<(i64, String)>,
}

/// A page of the queue, oldest first, and the cursor of the next page (a page ends early at
/// [`crate::store::page::MAX_PAGE_BYTES`] of arguments).
pub async fn list(
    db: &Db,
    filter: &ListFilter,
    now_ms: i64,
) -> Result<(Vec<Approval>, Option<(i64, String)>), QueryError> {
    if !(1..=MAX_LIMIT).contains(&filter.limit) {
        return Err(QueryError::Invalid("limit"));
    }
    // Status as of now: expiry is read from the clock, not only from what the sweep recorded.
    let status_sql = match filter.status {
        None => "1 = 1",
        Some(Status::Pending) => "status = 'pending' AND expires_ms > $3",
        Some(Status::Approved) => "status = 'approved' AND expires_ms > $3",
        Some(Status::Expired) => {
            "(status = 'expired' OR (status IN ('pending', 'approved') AND expires_ms <= $3))"
        }
        Some(Status::Rejected) => "status = 'rejected'",
        Some(Status::Consumed) => "status = 'consumed'",
    };
    let sql = format!(
        "SELECT {COLUMNS} FROM approvals WHERE ($1 = '' OR tenant = $1) AND {status_sql} \
         AND $3 = $3 AND (created_ms > $4 OR (created_ms = $4 AND pending_id > $5)) \
         ORDER BY created_ms, pending_id LIMIT $2"
    );
    let tenant = filter.tenant.as_deref().unwrap_or_default();
    let (after_ms, after_id) = filter.after.clone().unwrap_or((i64::MIN, String::new()));
    let (rows, cut_short): (Vec<Approval>, bool) = match db {
        Db::Sqlite(pool) => {
            let rows = sqlx::query(&sql)
                .bind(tenant)
                .bind(filter.limit)
                .bind(now_ms)
                .bind(after_ms)
                .bind(after_id)
                .fetch(pool);
            read_bounded(rows, |row| {
                let args: Option<String> = row.try_get("args")?;
                let size = 512 + args.map_or(0, |a| a.len());
                Ok::<_, QueryError>((row_to_approval!(row), size))
            })
            .await?
        }
        Db::Postgres(pool) => {
            let rows = sqlx::query(&sql)
                .bind(tenant)
                .bind(filter.limit)
                .bind(now_ms)
                .bind(after_ms)
                .bind(after_id)
                .fetch(pool);
            read_bounded(rows, |row| {
                let args: Option<String> = row.try_get("args")?;
                let size = 512 + args.map_or(0, |a| a.len());
                Ok::<_, QueryError>((row_to_approval!(row), size))
            })
            .await?
        }
    };
    let next = (rows.len() as i64 == filter.limit || cut_short)
        .then(|| rows.last().map(|a| (a.created_ms, a.pending_id.clone())))
        .flatten();
    Ok((rows, next))
}

/// The pending, unexpired approvals of one token tree (`root_jti`) in `tenant`, at most
/// `limit`, without their arguments: what an escalation looks through before it adds one (the
/// same call waiting already, or too many waiting).
pub async fn pending_of_token(
    db: &Db,
    tenant: &str,
    root_jti: &str,
    now_ms: i64,
    limit: i64,
) -> Result<Vec<Approval>, QueryError> {
    let sql = format!(
        "SELECT {COLUMNS_BRIEF} FROM approvals WHERE tenant = $1 AND status = 'pending' \
         AND root_capability_token_id = $2 AND expires_ms > $3 ORDER BY created_ms LIMIT $4"
    );
    let mut out = Vec::new();
    match db {
        Db::Sqlite(pool) => {
            for row in sqlx::query(&sql)
                .bind(tenant)
                .bind(root_jti)
                .bind(now_ms)
                .bind(limit)
                .fetch_all(pool)
                .await?
            {
                out.push(row_to_approval!(row));
            }
        }
        Db::Postgres(pool) => {
            for row in sqlx::query(&sql)
                .bind(tenant)
                .bind(root_jti)
                .bind(now_ms)
                .bind(limit)
                .fetch_all(pool)
                .await?
            {
                out.push(row_to_approval!(row));
            }
        }
    }
    Ok(out)
}

/// Approvals still pending or approved but past their expiry, oldest first, without their
/// arguments (for the sweep).
pub async fn overdue(db: &Db, now_ms: i64, limit: i64) -> Result<Vec<Approval>, QueryError> {
    let sql = format!(
        "SELECT {COLUMNS_BRIEF} FROM approvals WHERE status IN ('pending', 'approved') \
         AND expires_ms <= $1 ORDER BY expires_ms LIMIT $2"
    );
    let mut out = Vec::new();
    match db {
        Db::Sqlite(pool) => {
            for row in sqlx::query(&sql)
                .bind(now_ms)
                .bind(limit)
                .fetch_all(pool)
                .await?
            {
                out.push(row_to_approval!(row));
            }
        }
        Db::Postgres(pool) => {
            for row in sqlx::query(&sql)
                .bind(now_ms)
                .bind(limit)
                .fetch_all(pool)
                .await?
            {
                out.push(row_to_approval!(row));
            }
        }
    }
    Ok(out)
}

/// Pending approvals per tenant (for the tenants listing and metrics).
pub async fn pending_count(db: &Db, tenant: &str, now_ms: i64) -> Result<i64, QueryError> {
    let sql = "SELECT COUNT(*) FROM approvals WHERE tenant = $1 AND status = 'pending' \
               AND expires_ms > $2";
    Ok(match db {
        Db::Sqlite(pool) => {
            sqlx::query_scalar(sql)
                .bind(tenant)
                .bind(now_ms)
                .fetch_one(pool)
                .await?
        }
        Db::Postgres(pool) => {
            sqlx::query_scalar(sql)
                .bind(tenant)
                .bind(now_ms)
                .fetch_one(pool)
                .await?
        }
    })
}

/// The cursor a page hands out: `created_ms:pending_id`.
pub fn encode_cursor(c: &(i64, String)) -> String {
    format!("{}:{}", c.0, c.1)
}

pub fn decode_cursor(s: &str) -> Option<(i64, String)> {
    let (ms, id) = s.split_once(':')?;
    let ms = ms.parse().ok()?;
    super::valid_id(id).then(|| (ms, id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{self, StoreConfig};

    /// Approvals whose arguments are as large as a request page a few at a time: each page
    /// ends at the byte bound with a cursor, and the pages hold every approval once.
    #[tokio::test]
    async fn a_page_of_large_arguments_ends_at_the_byte_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store::connect(&StoreConfig::Sqlite {
            path: dir.path().join("a.db"),
        })
        .await
        .expect("store");
        let db = store.db();
        let Db::Sqlite(pool) = &db else {
            panic!("a SQLite store")
        };
        let big = serde_json::json!({ "blob": "x".repeat(3 << 20) }).to_string();
        for i in 0..5i64 {
            sqlx::query(super::super::record::INSERT)
                .bind("acme")
                .bind(format!("pa_{i}"))
                .bind("jti")
                .bind("root")
                .bind("agent")
                .bind("tool")
                .bind(Some(big.as_str()))
                .bind("digest")
                .bind("bundle")
                .bind("")
                .bind("reason")
                .bind("pending")
                .bind(0i64)
                .bind(1_000 + i)
                .bind(i64::MAX)
                .bind("policy")
                .execute(pool)
                .await
                .expect("insert");
        }
        let mut filter = ListFilter {
            tenant: Some("acme".into()),
            status: None,
            limit: MAX_LIMIT,
            after: None,
        };
        let (mut seen, mut pages) = (Vec::new(), 0);
        loop {
            let (rows, next) = list(&db, &filter, 0).await.expect("list");
            assert!(!rows.is_empty() && rows.len() <= 3, "{} rows", rows.len());
            pages += 1;
            seen.extend(rows.into_iter().map(|a| a.pending_id));
            match next {
                Some(after) => filter.after = Some(after),
                None => break,
            }
        }
        assert_eq!(seen, (0..5).map(|i| format!("pa_{i}")).collect::<Vec<_>>());
        assert!(pages >= 2, "{pages} pages");
    }
}
