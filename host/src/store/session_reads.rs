//! Reads of session rows on PostgreSQL, gathered: every read queued while the last query ran
//! is answered by one query (`id = ANY($1)`), so a handshake-era call's ended-session check
//! (`crate::mcp::ended`, one read a call) costs a share of a round trip instead of a pooled
//! connection, its liveness pings and a round trip of its own.
//!
//! Exact as a read of its own: a read's query starts after the read was queued, so it sees
//! every write committed before the call asked (a session ended on another replica is ended
//! here). With nothing else queued, a read is one query, as before.
//!
//! This module must never answer a read from a query that began before the read was queued,
//! and never drop a read unanswered (an error answers every read of its round).

use std::collections::HashMap;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use super::{SessionRecord, StoreError, now_secs};

type Answer = Result<Option<SessionRecord>, StoreError>;

/// Most reads one query answers.
const MAX_ROUND: usize = 256;
/// Reads waiting for the next query (a full queue makes callers wait: backpressure).
const QUEUE: usize = 4096;

/// The queue of the process's session reads on one pool.
#[derive(Clone, Debug)]
pub(super) struct SessionReads {
    queue: mpsc::Sender<(String, oneshot::Sender<Answer>)>,
}

impl SessionReads {
    /// Starts the reader task; it ends when every handle is dropped.
    pub(super) fn start(pool: PgPool) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(pool, rx));
        Self { queue }
    }

    /// The session row `id`, if it exists and has not expired.
    pub(super) async fn get(&self, id: &str) -> Answer {
        let (reply, answer) = oneshot::channel();
        let gone = || StoreError::Unavailable(sqlx::Error::WorkerCrashed);
        self.queue
            .send((id.to_owned(), reply))
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn run(pool: PgPool, mut rx: mpsc::Receiver<(String, oneshot::Sender<Answer>)>) {
    let sql = format!(
        "SELECT {} FROM mcp_sessions WHERE id = ANY($1) AND expires_at > $2",
        super::postgres::SESSION_COLUMNS
    );
    let mut round = Vec::with_capacity(MAX_ROUND);
    while rx.recv_many(&mut round, MAX_ROUND).await > 0 {
        let ids: Vec<&str> = round.iter().map(|(id, _)| id.as_str()).collect();
        let rows = sqlx::query(&sql)
            .bind(ids)
            .bind(now_secs())
            .fetch_all(&pool)
            .await
            .map_err(StoreError::from)
            .and_then(|rows| {
                rows.iter()
                    .map(super::postgres::session)
                    .collect::<Result<Vec<_>, _>>()
            });
        match rows {
            Ok(rows) => {
                let by_id: HashMap<&str, &SessionRecord> =
                    rows.iter().map(|r| (r.id.as_str(), r)).collect();
                for (id, reply) in round.drain(..) {
                    let _ = reply.send(Ok(by_id.get(id.as_str()).map(|r| (*r).clone())));
                }
            }
            Err(e) => {
                // Every read of the round hears it (the error is not `Clone`: its text is).
                let text = e.to_string();
                for (_, reply) in round.drain(..) {
                    let copy = sqlx::Error::Protocol(text.clone());
                    let _ = reply.send(Err(if e.is_unavailable() {
                        StoreError::Unavailable(copy)
                    } else {
                        StoreError::Database(copy)
                    }));
                }
            }
        }
    }
}
