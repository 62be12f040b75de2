//! Retention of the approval queue: a final approval (rejected, expired or consumed) is deleted
//! once every time it records is older than `INTENTGATE_APPROVAL_RETENTION_DAYS` (30 by
//! default; 0 keeps every row). The chain keeps every step of every approval; the row is the
//! queue's working copy, with the call's arguments as far as the persistence setting allowed,
//! which nobody should have to keep for ever.
//!
//! Each deletion is a queue write like the others: it rides in the transaction of an audit
//! event of the tenant's (`intentgate.approvals.purged`, the cutoff in its reason), so the chain
//! says what went and when. A cutoff moves forward about [`BATCH`] rows at a time, so a first
//! run over a long history never holds SQLite's write lock for long.
//!
//! This module must never delete a pending or approved approval, however old, nor delete a row
//! without the event that records it.

use std::time::Duration;

use super::ApprovalWrite;
use super::query::QueryError;
use crate::audit::{self, AuditEvent, AuditLog};
use crate::store::Db;

/// How often final approvals past the retention are looked for.
pub const PURGE_EVERY: Duration = Duration::from_secs(600);
/// Rows one deletion's transaction carries, about (rows that share the cutoff's time go too).
pub const BATCH: i64 = 1000;
/// Deletions per round, across tenants: a long history is worked off over several rounds.
const MAX_BATCHES: usize = 100;
/// The audit event that records a deletion.
pub const PURGED: &str = "intentgate.approvals.purged";

const FINAL: &str = "status IN ('rejected', 'expired', 'consumed')";

/// Deletes, tenant by tenant, the final approvals whose every time is before `before_ms`, each
/// batch with its event; returns how many deletions (events) were recorded. A failure stops
/// the round (tried again at the next one).
pub async fn purge_once(
    audit: &AuditLog,
    before_ms: i64,
    retention_days: u64,
) -> Result<usize, QueryError> {
    let mut batches = 0;
    for tenant in tenants_with_rows(audit.db(), before_ms).await? {
        while batches < MAX_BATCHES {
            let Some(cutoff) = next_cutoff(audit.db(), &tenant, before_ms).await? else {
                break;
            };
            let mut event = AuditEvent::new(PURGED, tenant.clone());
            event.check = "approval".to_owned();
            event.reason = format!(
                "final approvals (rejected, expired, consumed) whose every time is before {} deleted from the queue (retention {retention_days} days; their steps stay in this chain)",
                audit::time::format_rfc3339_ms(cutoff)
            );
            let write = ApprovalWrite::Purge { before_ms: cutoff };
            if let Err(e) = audit.append_with(event, Vec::new(), Some(write)).await {
                tracing::warn!(error = %e, tenant, "approvals: a deletion past the retention was not recorded; retrying later");
                return Ok(batches);
            }
            batches += 1;
            if cutoff >= before_ms {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(batches)
}

/// Tenants holding a final approval that expired before `before_ms`.
async fn tenants_with_rows(db: &Db, before_ms: i64) -> Result<Vec<String>, QueryError> {
    let sql = format!(
        "SELECT DISTINCT tenant FROM approvals WHERE {FINAL} AND expires_ms < $1 ORDER BY tenant"
    );
    Ok(match db {
        Db::Sqlite(pool) => {
            sqlx::query_scalar(&sql)
                .bind(before_ms)
                .fetch_all(pool)
                .await?
        }
        Db::Postgres(pool) => {
            sqlx::query_scalar(&sql)
                .bind(before_ms)
                .fetch_all(pool)
                .await?
        }
    })
}

/// The cutoff of `tenant`'s next deletion: just past the [`BATCH`]-th oldest final approval's
/// expiry (a row's latest time: a decision, a consumption and its creation all come before it),
/// or `before_ms` when fewer remain; `None` when none does.
async fn next_cutoff(db: &Db, tenant: &str, before_ms: i64) -> Result<Option<i64>, QueryError> {
    if nth_expiry(db, tenant, before_ms, 0).await?.is_none() {
        return Ok(None);
    }
    let nth = nth_expiry(db, tenant, before_ms, BATCH - 1).await?;
    Ok(Some(nth.map_or(before_ms, |t| (t + 1).min(before_ms))))
}

/// The expiry of `tenant`'s `offset`-th oldest final approval expired before `before_ms`.
async fn nth_expiry(
    db: &Db,
    tenant: &str,
    before_ms: i64,
    offset: i64,
) -> Result<Option<i64>, QueryError> {
    let sql = format!(
        "SELECT expires_ms FROM approvals WHERE tenant = $1 AND {FINAL} AND expires_ms < $2 \
         ORDER BY expires_ms LIMIT 1 OFFSET $3"
    );
    Ok(match db {
        Db::Sqlite(pool) => {
            sqlx::query_scalar(&sql)
                .bind(tenant)
                .bind(before_ms)
                .bind(offset)
                .fetch_optional(pool)
                .await?
        }
        Db::Postgres(pool) => {
            sqlx::query_scalar(&sql)
                .bind(tenant)
                .bind(before_ms)
                .bind(offset)
                .fetch_optional(pool)
                .await?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::query;
    use super::*;
    use crate::audit::{AuditConfig, AuditFilter, LogKey};
    use crate::store::{self, StoreConfig};

    /// Old final rows go, with one event per tenant; pending and approved rows stay however
    /// old, and so do final rows inside the retention.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_final_approvals_past_the_retention_are_deleted_each_with_its_event() {
        let dir = tempfile::tempdir().expect("tempdir");
        only_final_rows_go(StoreConfig::Sqlite {
            path: dir.path().join("a.db"),
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_final_approvals_past_the_retention_are_deleted_on_postgres() {
        let server = tokio::task::spawn_blocking(crate::testkit::PgServer::shared)
            .await
            .expect("join")
            .expect("a PostgreSQL server");
        let url = server.fresh_database().expect("database");
        only_final_rows_go(StoreConfig::Postgres { url }).await;
    }

    async fn only_final_rows_go(config: StoreConfig) {
        let db = store::connect(&config).await.expect("store").db();
        let key = LogKey::from_seed("test-gw", [9; 32]).expect("key");
        let log = AuditLog::open(db.clone(), key, AuditConfig::default())
            .await
            .expect("log");
        let day = 86_400_000;
        let now = audit::time::now_ms();
        let old = now - 40 * day;
        let write = |tenant: &str, w: ApprovalWrite| {
            let log = log.clone();
            let e = AuditEvent::new("test", tenant);
            async move {
                let r = log
                    .append_with(e, Vec::new(), Some(w))
                    .await
                    .expect("append");
                assert!(r.refused.is_none(), "{r:?}");
            }
        };
        let decide = |id: &str, approve: bool, at_ms: i64| ApprovalWrite::Decide {
            id: id.to_owned(),
            approve,
            by: "ops".into(),
            note: String::new(),
            at_ms,
            resume_until_ms: at_ms + 60_000,
        };
        // acme: rejected, consumed and expired long ago; a pending and an approved row that
        // the sweep never reached; a rejection of yesterday.
        let mut kept = Vec::new();
        let mut gone = Vec::new();
        for (tenant, fate) in [
            ("acme", "rejected"),
            ("acme", "consumed"),
            ("acme", "expired"),
            ("acme", "pending"),
            ("acme", "approved"),
            ("acme", "recent"),
            ("globex", "rejected"),
        ] {
            let (created, expires) = if fate == "recent" {
                (now - day, now + day)
            } else {
                (old, old + 300_000)
            };
            let mut a = super::super::sample(tenant, created, expires);
            a.args = Some(serde_json::json!({"text": "x".repeat(1000)}));
            let id = a.pending_id.clone();
            write(tenant, ApprovalWrite::Create(Box::new(a))).await;
            match fate {
                "rejected" | "recent" => write(tenant, decide(&id, false, created + 1_000)).await,
                "approved" => write(tenant, decide(&id, true, created + 1_000)).await,
                "consumed" => {
                    write(tenant, decide(&id, true, created + 1_000)).await;
                    let consume = ApprovalWrite::Consume {
                        id: id.clone(),
                        at_ms: created + 2_000,
                    };
                    write(tenant, consume).await;
                }
                "expired" => {
                    let expire = ApprovalWrite::Expire {
                        id: id.clone(),
                        pending_only: true,
                        at_ms: expires,
                    };
                    write(tenant, expire).await;
                }
                _ => {}
            }
            if matches!(fate, "pending" | "approved" | "recent") {
                kept.push((tenant, id));
            } else {
                gone.push((tenant, id));
            }
        }
        // The sweep's and the queue's reads leave the stored arguments out; one row's read
        // carries them.
        let overdue = query::overdue(&db, now, 200).await.expect("overdue");
        assert_eq!(
            overdue.len(),
            2,
            "the old pending and approved rows: {overdue:?}"
        );
        let waiting = query::pending_of_token(&db, "acme", "root", old, 100)
            .await
            .expect("pending of token");
        assert!(!waiting.is_empty());
        assert!(overdue.iter().chain(&waiting).all(|a| a.args.is_none()));
        let one = query::get(&db, Some("acme"), &overdue[0].pending_id).await;
        assert!(one.expect("get").expect("row").args.is_some());
        let before = now - 30 * day;
        assert_eq!(purge_once(&log, before, 30).await.expect("purge"), 2);
        for (tenant, id) in &kept {
            let row = query::get(&db, Some(tenant), id).await.expect("get");
            assert!(row.is_some(), "{tenant}/{id} was deleted");
        }
        for (tenant, id) in &gone {
            let row = query::get(&db, Some(tenant), id).await.expect("get");
            assert!(row.is_none(), "{tenant}/{id} was kept: {row:?}");
        }
        for tenant in ["acme", "globex"] {
            let filter = AuditFilter {
                tenant: Some(tenant.to_owned()),
                ..AuditFilter::default()
            };
            let page = audit::query::list(&db, &filter, None, 100)
                .await
                .expect("list");
            let purged: Vec<serde_json::Value> = page
                .items
                .iter()
                .filter_map(|r| serde_json::from_str(&r.body).ok())
                .filter(|v: &serde_json::Value| v["event"] == PURGED)
                .collect();
            assert_eq!(purged.len(), 1, "{tenant}");
            let reason = purged[0]["reason"].as_str().unwrap_or_default();
            assert!(reason.contains("retention 30 days"), "{reason}");
        }
        // Nothing left to delete: no event.
        assert_eq!(purge_once(&log, before, 30).await.expect("purge"), 0);
    }

    /// A long history goes a batch at a time, each batch with its event.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_history_goes_a_batch_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = store::connect(&StoreConfig::Sqlite {
            path: dir.path().join("a.db"),
        })
        .await
        .expect("store")
        .db();
        let Db::Sqlite(pool) = &db else {
            unreachable!("sqlite")
        };
        // Rows written straight to the table: what is tested is the batching.
        let now = audit::time::now_ms();
        for i in 0..(BATCH + 10) {
            sqlx::query(
                "INSERT INTO approvals (tenant, pending_id, capability_token_id, \
                 root_capability_token_id, agent_id, tool, args_digest, bundle_digest, status, \
                 created_ms, expires_ms) VALUES ('acme', $1, 'j', 'r', 'a', 't', 'd', 'b', \
                 'expired', $2, $2)",
            )
            .bind(format!("p{i}"))
            .bind(now - 1_000_000 + i)
            .execute(pool)
            .await
            .expect("insert");
        }
        let key = LogKey::from_seed("test-gw", [9; 32]).expect("key");
        let log = AuditLog::open(db.clone(), key, AuditConfig::default())
            .await
            .expect("log");
        assert_eq!(purge_once(&log, now, 30).await.expect("purge"), 2);
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM approvals")
            .fetch_one(pool)
            .await
            .expect("count");
        assert_eq!(left, 0);
    }
}
