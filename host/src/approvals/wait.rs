//! How a held request learns that its approval was decided: the deciding replica announces
//! `tenant/pending_id` in process ([`Waiters::announce`]) and, on PostgreSQL, with `NOTIFY` on
//! [`super::CHANNEL`] that every replica's listener ([`listen`]) turns into the same in-process
//! announcement. A waiter re-reads its row on every announcement and on a slow poll, so a lost
//! notification delays a held request by at most the poll, never loses it.
//!
//! This module must never decide anything: the row in the store is the only truth a waiter
//! acts on.

use std::time::Duration;

use tokio::sync::broadcast;

use super::query::{self, QueryError};
use super::{Approval, CHANNEL, Status};
use crate::store::Db;

/// How often a held request re-reads its row without being woken, unless configured
/// (`INTENTGATE_APPROVAL_POLL_MS`).
pub const POLL: Duration = Duration::from_secs(2);

/// Announcements of decided approvals, in this process. Cheap to clone.
#[derive(Clone)]
pub struct Waiters {
    tx: broadcast::Sender<String>,
    poll: Duration,
}

impl Default for Waiters {
    fn default() -> Self {
        Self::new(POLL)
    }
}

/// How a wait ended.
#[derive(Debug)]
pub enum Outcome {
    /// Decided (approved or rejected) or otherwise no longer pending: the row as it is now.
    Decided(Box<Approval>),
    /// Still pending at the deadline.
    TimedOut,
}

fn key(tenant: &str, id: &str) -> String {
    format!("{tenant}/{id}")
}

impl Waiters {
    /// Waiters that re-read their row every `poll` when nothing wakes them.
    pub fn new(poll: Duration) -> Self {
        // Bounded: a waiter that lags re-reads its row (it may have missed its own).
        let (tx, _) = broadcast::channel(1024);
        Self { tx, poll }
    }

    /// Wakes this process's waiters of the approval, and (PostgreSQL) every other replica's.
    pub async fn announce(&self, db: &Db, tenant: &str, id: &str) {
        let k = key(tenant, id);
        let _ = self.tx.send(k.clone());
        if let Db::Postgres(pool) = db
            && let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(&k)
                .execute(pool)
                .await
        {
            // Other replicas' waiters still see the decision on their next poll.
            tracing::warn!(error = %e, "approvals: NOTIFY failed; other replicas will poll");
        }
    }

    /// Waits until the approval `id` of `tenant` is no longer pending, or `deadline`.
    pub async fn wait(
        &self,
        db: &Db,
        tenant: &str,
        id: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Outcome, QueryError> {
        let mine = key(tenant, id);
        let mut rx = self.tx.subscribe();
        loop {
            // Subscribed before the read: a decision between the two is not missed.
            if let Some(a) = query::get(db, Some(tenant), id).await?
                && a.status != Status::Pending
            {
                return Ok(Outcome::Decided(Box::new(a)));
            }
            let poll = tokio::time::Instant::now() + self.poll;
            loop {
                tokio::select! {
                    got = rx.recv() => match got {
                        Ok(k) if k == mine => break,
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(_)) => break,
                        Err(broadcast::error::RecvError::Closed) => {
                            tokio::time::sleep_until(poll.min(deadline)).await;
                            break;
                        }
                    },
                    _ = tokio::time::sleep_until(poll.min(deadline)) => break,
                }
            }
            if tokio::time::Instant::now() >= deadline {
                // One last read: a decision at the deadline still counts.
                return match query::get(db, Some(tenant), id).await? {
                    Some(a) if a.status != Status::Pending => Ok(Outcome::Decided(Box::new(a))),
                    _ => Ok(Outcome::TimedOut),
                };
            }
        }
    }
}

/// Turns PostgreSQL notifications on [`CHANNEL`] into in-process announcements, for the life
/// of the gateway. Without `LISTEN` (a connection failure) waiters still poll.
pub async fn listen(db: Db, waiters: Waiters) {
    let Db::Postgres(pool) = db else {
        return;
    };
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("approvals: LISTEN connection failed, waiters poll: {e}");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::warn!("approvals: LISTEN failed, waiters poll: {e}");
            tokio::time::sleep(Duration::from_secs(5)).await;
            continue;
        }
        loop {
            match listener.recv().await {
                Ok(n) => {
                    let _ = waiters.tx.send(n.payload().to_owned());
                }
                Err(e) => {
                    tracing::warn!("approvals: LISTEN connection lost: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
        }
    }
}
