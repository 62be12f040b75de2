//! Budget counters as the plugins see them (the `counters` host import): a read-only view whose
//! state the host owns, plus an in-memory implementation for a gateway without a database.
//!
//! Plugins never write counters: they propose charges, which the pipeline applies atomically
//! and conditionally after every check allowed the call.

use super::Charge;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard};

/// Read access to budget counters. Keys arrive already namespaced by tenant
/// (`"<tenant>/<plugin key>"`), so one tenant's plugin cannot read another's counters.
///
/// Implementations must be fast (called on the request path, under the plugin's deadline) and
/// must not block on I/O; a panic is caught and read as "exhausted".
pub trait Counters: Send + Sync + 'static {
    /// The value of `key` in the window starting at `window_start` (0 when absent).
    fn get(&self, key: &str, window_start: u64) -> u64;
}

/// Process-local counters: the default when no store-backed view is configured, and the one
/// tests use. Windows older than the newest seen for a key are dropped on write.
///
/// Sharded by key (a lock per shard, never one for the process) and bounded: a shard that
/// reaches its share of [`MemoryCounters::DEFAULT_CAPACITY`] forgets its smallest counts. This is a view for policies (usage words a verdict); the
/// store's conditional charges stay the authority, so forgetting an entry never grants a call
/// that a limit refuses.
pub struct MemoryCounters {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    per_shard: usize,
}

type Shard = HashMap<String, (u64, u64)>;

const SHARDS: usize = 16;

impl Default for MemoryCounters {
    fn default() -> Self {
        Self::with_capacity(Self::DEFAULT_CAPACITY)
    }
}

impl MemoryCounters {
    /// Keys kept at most (across shards) by [`MemoryCounters::default`].
    pub const DEFAULT_CAPACITY: usize = 256 * 1024;

    /// Counters that keep at most about `capacity` keys.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
        }
    }

    /// Keys held right now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard_of(&self, key: &str) -> usize {
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    /// Apply all charges or none: each must satisfy `current + amount <= limit`.
    /// Returns the first charge that did not fit.
    pub fn charge_all(&self, charges: &[Charge]) -> Result<(), Charge> {
        // Lock every shard involved, in index order (no deadlock between two callers).
        let mut index: Vec<usize> = charges.iter().map(|c| self.shard_of(&c.key)).collect();
        let mut order = index.clone();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<(usize, MutexGuard<'_, Shard>)> =
            order.iter().map(|&i| (i, lock(&self.shards[i]))).collect();
        for slot in &mut index {
            // Position of the shard's guard in `guards`.
            *slot = order.binary_search(slot).unwrap_or_default();
        }
        for (charge, &g) in charges.iter().zip(&index) {
            let current = match guards[g].1.get(charge.key.as_str()) {
                Some((window, value)) if *window == charge.window_start => *value,
                _ => 0,
            };
            if current.saturating_add(charge.amount) > charge.limit {
                return Err(charge.clone());
            }
        }
        for (charge, &g) in charges.iter().zip(&index) {
            let shard = &mut guards[g].1;
            match shard.get_mut(charge.key.as_str()) {
                Some(entry) => {
                    if entry.0 != charge.window_start {
                        *entry = (charge.window_start, 0);
                    }
                    entry.1 = entry.1.saturating_add(charge.amount);
                }
                None => {
                    if shard.len() >= self.per_shard {
                        evict(shard);
                    }
                    shard.insert(charge.key.clone(), (charge.window_start, charge.amount));
                }
            }
        }
        Ok(())
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(|p| p.into_inner())
}

/// Make room in a full shard: drop a quarter of it, smallest counts first (a quarter at once,
/// so eviction's cost is paid once per many inserts). Windows are not compared: a lifetime
/// counter (window 0) and a minute's are both live, and a key's own past window is replaced
/// when it is written.
fn evict(shard: &mut Shard) {
    let cut = (shard.len() / 4).max(1);
    let mut values: Vec<u64> = shard.values().map(|(_, v)| *v).collect();
    let (_, threshold, _) = values.select_nth_unstable(cut - 1);
    let threshold = *threshold;
    let mut dropped = 0;
    shard.retain(|_, (_, v)| {
        if *v < threshold || (*v == threshold && dropped < cut) {
            dropped += 1;
            false
        } else {
            true
        }
    });
}

impl Counters for MemoryCounters {
    fn get(&self, key: &str, window_start: u64) -> u64 {
        match lock(&self.shards[self.shard_of(key)]).get(key) {
            Some((window, value)) if *window == window_start => *value,
            _ => 0,
        }
    }
}

/// Counters read from the store (shared by every replica). The host import is synchronous, so
/// on a multi-threaded tokio runtime the read runs under `block_in_place`; elsewhere (no
/// runtime, current-thread runtime) it reads 0, which is safe: the pipeline's conditional
/// `Store::charge` is what enforces the limit, the plugin's read only words the verdict early.
/// A database error reads as exhausted (the budget check then blocks: fail closed).
pub struct StoreCounters {
    store: std::sync::Arc<dyn crate::store::Store>,
}

impl StoreCounters {
    /// Over this store.
    pub fn new(store: std::sync::Arc<dyn crate::store::Store>) -> Self {
        Self { store }
    }
}

impl Counters for StoreCounters {
    fn get(&self, key: &str, window_start: u64) -> u64 {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let Ok(handle) = Handle::try_current() else {
            return 0;
        };
        if handle.runtime_flavor() != RuntimeFlavor::MultiThread {
            return 0;
        }
        let window = i64::try_from(window_start).unwrap_or(i64::MAX);
        let read = tokio::task::block_in_place(|| handle.block_on(self.store.counter(key, window)));
        match read {
            Ok(value) => u64::try_from(value).unwrap_or(0),
            Err(_) => u64::MAX,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(key: &str, window_start: u64, limit: u64) -> Charge {
        Charge {
            key: key.into(),
            window_start,
            amount: 1,
            limit,
        }
    }

    #[test]
    fn all_or_nothing() {
        let c = MemoryCounters::default();
        assert!(
            c.charge_all(&[charge("a", 0, 1), charge("b", 0, 5)])
                .is_ok()
        );
        assert_eq!(
            c.charge_all(&[charge("b", 0, 5), charge("a", 0, 1)])
                .map_err(|c| c.key),
            Err("a".into())
        );
        assert_eq!(
            c.get("b", 0),
            1,
            "nothing applied when one charge does not fit"
        );
        assert_eq!(c.get("a", 0), 1);
        // A new window starts from zero.
        assert!(c.charge_all(&[charge("a", 60, 1)]).is_ok());
        assert_eq!(c.get("a", 0), 0);
        assert_eq!(c.get("a", 60), 1);
    }

    #[test]
    fn memory_stays_bounded_whatever_the_number_of_keys() {
        let c = MemoryCounters::with_capacity(1024);
        for i in 0..100_000u64 {
            // One key per token ever seen: the growth issue 13 names.
            let key = format!("calls:{i}");
            assert!(c.charge_all(&[charge(&key, 0, u64::MAX)]).is_ok());
        }
        assert!(c.len() <= 1024 + SHARDS, "{} keys kept", c.len());
        // A busy key survives the churn of one-off keys (smallest counts go first).
        let c = MemoryCounters::with_capacity(256);
        for i in 0..10_000u64 {
            assert!(c.charge_all(&[charge("busy", 0, u64::MAX)]).is_ok());
            assert!(
                c.charge_all(&[charge(&format!("k{i}"), 0, u64::MAX)])
                    .is_ok()
            );
        }
        assert_eq!(c.get("busy", 0), 10_000);
    }

    #[test]
    fn all_or_nothing_across_shards() {
        let c = MemoryCounters::default();
        let many: Vec<Charge> = (0..64).map(|i| charge(&format!("k{i}"), 0, 1)).collect();
        assert!(c.charge_all(&many).is_ok());
        let mut again = vec![charge("fresh", 0, 5)];
        again.extend(many.iter().cloned());
        assert!(c.charge_all(&again).is_err());
        assert_eq!(
            c.get("fresh", 0),
            0,
            "nothing applied when one charge does not fit"
        );
    }
}
