//! The in-memory revocation set consulted on every token, kept current by the store's feed.
//!
//! Readers never block: the set is an immutable `HashSet` behind `ArcSwap`, replaced whole by
//! writers (revocations are rare, lookups are per call). Freshness is tracked on the monotonic
//! clock: a set that was never synced, or not within its bound, makes verification fail closed.
//! This module must never report a token as not revoked when it cannot know.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::error::CapabilityError;

/// `last_sync` value meaning "never synced".
const NEVER: u64 = u64::MAX;

/// Revoked token ids (`jti` or `root_jti`) plus the time of the last successful sync.
#[derive(Debug)]
pub struct RevocationSet {
    ids: ArcSwap<HashSet<String>>,
    /// Bound on the time since the last sync; `None` disables the check.
    max_staleness: Option<Duration>,
    /// Reference point for `last_sync`.
    epoch: Instant,
    /// Nanoseconds after `epoch` of the last `mark_synced`, or [`NEVER`].
    last_sync: AtomicU64,
}

impl RevocationSet {
    /// An empty set that counts as stale until the first [`mark_synced`](Self::mark_synced),
    /// and again whenever more than `max_staleness` passes without one.
    pub fn new(max_staleness: Duration) -> RevocationSet {
        RevocationSet {
            ids: ArcSwap::from_pointee(HashSet::new()),
            max_staleness: Some(max_staleness),
            epoch: Instant::now(),
            last_sync: AtomicU64::new(NEVER),
        }
    }

    /// A set that is never stale: for tests and for a single process that owns its store.
    pub fn always_fresh() -> RevocationSet {
        RevocationSet {
            max_staleness: None,
            ..RevocationSet::new(Duration::ZERO)
        }
    }

    /// Whether `jti` is revoked.
    pub fn is_revoked(&self, jti: &str) -> bool {
        self.ids.load().contains(jti)
    }

    /// Adds revoked ids (idempotent). Does not by itself count as a sync.
    pub fn extend<I, S>(&self, ids: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let new: Vec<String> = ids.into_iter().map(Into::into).collect();
        if new.is_empty() {
            return;
        }
        self.ids.rcu(|cur| {
            let mut next = HashSet::clone(cur);
            next.extend(new.iter().cloned());
            next
        });
    }

    /// Replaces the whole set with a full snapshot from the store and marks it synced.
    pub fn replace_all<I, S>(&self, ids: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.ids
            .store(Arc::new(ids.into_iter().map(Into::into).collect()));
        self.mark_synced();
    }

    /// Number of revoked ids.
    pub fn len(&self) -> usize {
        self.ids.load().len()
    }

    /// Whether no id is revoked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records that the feed has just caught up with the store.
    pub fn mark_synced(&self) {
        let nanos = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(NEVER - 1);
        self.last_sync
            .store(nanos.min(NEVER - 1), Ordering::Release);
    }

    /// Time since the last sync, `None` before the first (for `/metrics`).
    pub fn sync_age(&self) -> Option<Duration> {
        let last = self.last_sync.load(Ordering::Acquire);
        (last != NEVER).then(|| {
            self.epoch
                .elapsed()
                .saturating_sub(Duration::from_nanos(last))
        })
    }

    /// `Ok` if synced within the bound (or the bound is disabled), else
    /// [`CapabilityError::RevocationStale`].
    pub fn check_fresh(&self) -> Result<(), CapabilityError> {
        self.check_fresh_at(Instant::now())
    }

    /// [`check_fresh`](Self::check_fresh) as of `now` (a test's own clock, so that how long
    /// its statements take cannot decide the outcome).
    fn check_fresh_at(&self, now: Instant) -> Result<(), CapabilityError> {
        let Some(max) = self.max_staleness else {
            return Ok(());
        };
        let last = self.last_sync.load(Ordering::Acquire);
        if last == NEVER {
            return Err(CapabilityError::RevocationStale);
        }
        let age = now
            .saturating_duration_since(self.epoch)
            .saturating_sub(Duration::from_nanos(last));
        if age > max {
            return Err(CapabilityError::RevocationStale);
        }
        Ok(())
    }

    /// Fresh, and neither id revoked.
    pub(crate) fn check(&self, jti: &str, root_jti: &str) -> Result<(), CapabilityError> {
        let ids = self.ids.load();
        if ids.contains(jti) || ids.contains(root_jti) {
            return Err(CapabilityError::Revoked);
        }
        self.check_fresh()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_and_updates() {
        let set = RevocationSet::always_fresh();
        assert!(set.is_empty());
        set.extend(["a", "b"]);
        set.extend(Vec::<String>::new());
        set.extend(["b"]);
        assert_eq!(set.len(), 2);
        assert!(set.is_revoked("a") && !set.is_revoked("c"));
        assert_eq!(set.check("x", "a"), Err(CapabilityError::Revoked));
        assert_eq!(set.check("b", "x"), Err(CapabilityError::Revoked));
        assert_eq!(set.check("x", "y"), Ok(()));
        set.replace_all(["c"]);
        assert!(!set.is_revoked("a") && set.is_revoked("c"));
    }

    #[test]
    fn never_synced_is_stale_then_fresh_then_stale_again() {
        // A bound no pause of a loaded machine reaches between two statements, for the checks
        // on the real clock; the edges of the bound are checked at given instants.
        let max = Duration::from_secs(60);
        let set = RevocationSet::new(max);
        assert_eq!(set.check_fresh(), Err(CapabilityError::RevocationStale));
        assert_eq!(set.check("x", "y"), Err(CapabilityError::RevocationStale));
        let before = Instant::now();
        set.mark_synced();
        let after = Instant::now();
        assert_eq!(set.check_fresh(), Ok(()));
        // Synced at or after `before`: `max` later it is at most `max` old.
        assert_eq!(set.check_fresh_at(before + max), Ok(()));
        // Synced at or before `after`: a moment past `max` later it is older than `max`.
        let late = after + max + Duration::from_millis(1);
        assert_eq!(
            set.check_fresh_at(late),
            Err(CapabilityError::RevocationStale)
        );
        let resynced = Instant::now();
        set.replace_all(Vec::<String>::new());
        assert_eq!(set.check_fresh(), Ok(()));
        assert_eq!(set.check_fresh_at(resynced + max), Ok(()));
    }

    #[test]
    fn concurrent_readers_see_writes() {
        let set = Arc::new(RevocationSet::always_fresh());
        let writer = {
            let set = Arc::clone(&set);
            std::thread::spawn(move || {
                for i in 0..200 {
                    set.extend([format!("j{i}")]);
                }
            })
        };
        while !set.is_revoked("j199") {
            std::thread::yield_now();
        }
        assert!(writer.join().is_ok());
        assert_eq!(set.len(), 200);
    }
}
