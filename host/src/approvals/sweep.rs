//! The expiry sweep: an approval past its expiry (never decided, or approved and never resumed)
//! is recorded as expired, with its audit event, so the queue and the chain say so without
//! anyone asking. A held request that times out records its own expiry (`proxy/hold.rs`).
//!
//! On PostgreSQL one replica sweeps: the one holding a session advisory lock on a dedicated
//! connection (another takes over when that connection goes), so replicas do not race to
//! record the same expiry; the same replica deletes final approvals past the retention
//! ([`retention`]). This module must never expire an approval without its event.

use std::time::Duration;

use super::query;
use super::retention;
use super::{Approval, ApprovalWrite};
use crate::audit::{self, AuditEvent, AuditLog, Decision};
use crate::store::Db;

/// How often the sweep looks for overdue approvals.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// The advisory lock the PostgreSQL sweeper holds (`'intentgate-approvals'` as a number).
const LOCK_KEY: i64 = 0x6967_6170_7072_7631;

/// The event that records an approval's expiry.
pub fn expiry_event(a: &Approval, reason: &str) -> AuditEvent {
    let mut e = AuditEvent::new(audit::kinds::APPROVAL_EXPIRED, a.tenant.clone());
    e.decision = Some(Decision::Block);
    e.check = "approval".to_owned();
    e.reason = reason.to_owned();
    e.pending_id = a.pending_id.clone();
    e.agent_id = a.agent_id.clone();
    e.tool = a.tool.clone();
    e.jti = a.capability_token_id.clone();
    e.root_jti = a.root_capability_token_id.clone();
    e.requires_step_up = a.requires_step_up;
    e
}

/// Records every overdue approval as expired, now; returns how many were.
pub async fn sweep_once(audit: &AuditLog) -> Result<usize, query::QueryError> {
    let now_ms = audit::time::now_ms();
    let overdue = query::overdue(audit.db(), now_ms, 200).await?;
    let mut expired = 0;
    for a in overdue {
        let write = ApprovalWrite::Expire {
            id: a.pending_id.clone(),
            pending_only: false,
            at_ms: now_ms,
        };
        match audit
            .append_with(
                expiry_event(&a, "approval expired"),
                Vec::new(),
                Some(write),
            )
            .await
        {
            Ok(r) if r.refused.is_none() => expired += 1,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "approvals: an expiry was not recorded; retrying later");
                break;
            }
        }
    }
    Ok(expired)
}

/// Sweeps for the life of the gateway, and every [`retention::PURGE_EVERY`] deletes the final
/// approvals older than `retention_days` (`None`: never).
pub async fn run(audit: AuditLog, retention_days: Option<u64>) {
    let mut leader: Option<sqlx::PgConnection> = None;
    let mut purged_at: Option<std::time::Instant> = None;
    loop {
        tokio::time::sleep(INTERVAL).await;
        if let Db::Postgres(pool) = audit.db()
            && !holds_lock(pool, &mut leader).await
        {
            continue;
        }
        if let Err(e) = sweep_once(&audit).await {
            tracing::warn!(error = %e, "approvals: expiry sweep failed");
        }
        if let Some(days) = retention_days
            && purged_at.is_none_or(|t| t.elapsed() >= retention::PURGE_EVERY)
        {
            purged_at = Some(std::time::Instant::now());
            let keep_ms = i64::try_from(days.saturating_mul(86_400_000)).unwrap_or(i64::MAX);
            let before_ms = audit::time::now_ms().saturating_sub(keep_ms);
            if let Err(e) = retention::purge_once(&audit, before_ms, days).await {
                tracing::warn!(error = %e, "approvals: deleting past the retention failed");
            }
        }
    }
}

/// Whether this replica is the sweeper: it keeps the connection that holds the lock.
async fn holds_lock(pool: &sqlx::PgPool, leader: &mut Option<sqlx::PgConnection>) -> bool {
    if let Some(conn) = leader.as_mut() {
        // Still connected (the lock lives as long as the session).
        if sqlx::query("SELECT 1").execute(&mut *conn).await.is_ok() {
            return true;
        }
        *leader = None;
    }
    // Detached from the pool: a connection holding the lock must never be handed to another
    // user of the pool.
    let Ok(conn) = pool.acquire().await else {
        return false;
    };
    let mut conn = conn.detach();
    match sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
        .bind(LOCK_KEY)
        .fetch_one(&mut conn)
        .await
    {
        Ok(true) => {
            *leader = Some(conn);
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditConfig, LogKey};
    use crate::store::{self, StoreConfig};

    /// The sweep reads overdue rows, then expires each: an approval decided in between (its
    /// expiry is now the resume window's) is not expired by it; one still past its expiry is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_approval_decided_after_the_sweep_read_it_is_not_expired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = store::connect(&StoreConfig::Sqlite {
            path: dir.path().join("a.db"),
        })
        .await
        .expect("store")
        .db();
        let key = LogKey::from_seed("test-gw", [9; 32]).expect("key");
        let log = AuditLog::open(db.clone(), key, AuditConfig::default())
            .await
            .expect("log");
        let now = audit::time::now_ms();
        let pending = super::super::sample("acme", now, now + 60_000);
        let id = pending.pending_id.clone();
        let write = |w: ApprovalWrite| {
            let log = log.clone();
            let e = expiry_event(&pending, "test");
            async move {
                log.append_with(e, Vec::new(), Some(w))
                    .await
                    .expect("append")
            }
        };
        let created = write(ApprovalWrite::Create(Box::new(pending.clone()))).await;
        assert!(created.refused.is_none(), "{created:?}");
        let decided = write(ApprovalWrite::Decide {
            id: id.clone(),
            approve: true,
            by: "ops".into(),
            note: String::new(),
            at_ms: now,
            resume_until_ms: now + 120_000,
        })
        .await;
        assert!(decided.refused.is_none(), "{decided:?}");
        // The sweep read it overdue before the decision (its old expiry had passed at
        // `now + 90 s`); the decision gave it until `now + 120 s`.
        let expire = |at_ms| ApprovalWrite::Expire {
            id: id.clone(),
            pending_only: false,
            at_ms,
        };
        let early = write(expire(now + 90_000)).await;
        assert!(
            early.refused.is_some(),
            "a fresh approval expired: {early:?}"
        );
        let row = query::get(&db, Some("acme"), &id)
            .await
            .expect("get")
            .expect("row");
        assert_eq!(row.status, super::super::Status::Approved);
        let late = write(expire(now + 120_000)).await;
        assert!(late.refused.is_none(), "{late:?}");
        let row = query::get(&db, Some("acme"), &id)
            .await
            .expect("get")
            .expect("row");
        assert_eq!(row.status, super::super::Status::Expired);
    }
}
