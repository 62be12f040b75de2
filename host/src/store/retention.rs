//! Counter windows that can no longer be charged are deleted, a batch at a time.
//!
//! Every call of a token with `rate_limit` charges `rate:{jti}` in the minute's window, and a
//! budget plugin charges its keys in windows of its own (a day, a month): one row per key and
//! window, so the table grew by a row per token per minute of use, for ever. A window is dead
//! once a later window of the same key exists (windows only move forward), and a rate window
//! once its minute has passed. Both are kept an hour past that ([`KEEP_SECS`]), so a replica
//! whose clock runs behind still finds the window it charges.
//!
//! A multi-round call's single-use marks (`round:{event}:{n}`, without a window) are dead once
//! the sealed state they guard has expired (`crate::mcp::rounds::MAX_AGE_SECS`, 15 minutes):
//! they go [`KEEP_SECS`] after their last change.
//!
//! This module must never delete a counter without a window (`window_start = 0`: a token's
//! `max_calls`, a lifetime budget) other than a round's mark, nor the newest window of a key
//! other than a rate's.

use std::sync::Arc;
use std::time::Duration;

use super::{Store, now_secs};

/// How often the dead windows are looked for.
pub const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// How long a dead window is kept (clock skew between replicas).
pub const KEEP_SECS: i64 = 3600;
/// Rows deleted per statement (a short hold of SQLite's write lock).
pub const BATCH: u64 = 1000;

/// Deletes up to [`BATCH`] dead windows that started before `$1`: those of a key with a later
/// window, and those of a gateway rate limit (`rate:`, one minute long); and the round marks
/// last changed before `$1`.
pub(crate) const PRUNE_COUNTERS: &str = "DELETE FROM counters WHERE (key, window_start) IN (\
     SELECT c.key, c.window_start FROM counters c \
     WHERE (c.window_start > 0 AND c.window_start < $1 \
     AND (c.key LIKE 'rate:%' OR EXISTS (SELECT 1 FROM counters n \
     WHERE n.key = c.key AND n.window_start > c.window_start))) \
     OR (c.window_start = 0 AND c.key LIKE 'round:%' AND c.updated_at < $1) \
     LIMIT 1000)";

/// Runs for the gateway's life: every [`PRUNE_EVERY`], deletes the dead windows, a batch at a
/// time with a pause between. A failure is logged and tried again at the next round.
pub async fn prune_counters(store: Arc<dyn Store>) {
    loop {
        tokio::time::sleep(PRUNE_EVERY).await;
        prune_now(store.as_ref()).await;
    }
}

/// One round of [`prune_counters`]: returns how many rows went.
pub async fn prune_now(store: &dyn Store) -> u64 {
    let mut total = 0;
    loop {
        match store.prune_counters(now_secs() - KEEP_SECS).await {
            Ok(n) => {
                total += n;
                if n < BATCH {
                    return total;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not delete past counter windows; trying again later");
                return total;
            }
        }
    }
}
