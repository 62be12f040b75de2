//! Budget counters as the plugins see them (the `counters` host import): a read-only view whose
//! state the host owns, plus an in-memory implementation for a gateway without a database.
//!
//! Plugins never write counters: they propose charges, which the pipeline applies atomically
//! and conditionally after every check allowed the call.

use super::Charge;
use std::collections::HashMap;
use std::sync::Mutex;

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
#[derive(Default)]
pub struct MemoryCounters {
    values: Mutex<HashMap<String, (u64, u64)>>,
}

impl MemoryCounters {
    /// Apply all charges or none: each must satisfy `current + amount <= limit`.
    /// Returns the first charge that did not fit.
    pub fn charge_all(&self, charges: &[Charge]) -> Result<(), Charge> {
        let mut values = match self.values.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        for charge in charges {
            let current = match values.get(&charge.key) {
                Some((window, value)) if *window == charge.window_start => *value,
                _ => 0,
            };
            if current.saturating_add(charge.amount) > charge.limit {
                return Err(charge.clone());
            }
        }
        for charge in charges {
            let entry = values
                .entry(charge.key.clone())
                .or_insert((charge.window_start, 0));
            if entry.0 != charge.window_start {
                *entry = (charge.window_start, 0);
            }
            entry.1 = entry.1.saturating_add(charge.amount);
        }
        Ok(())
    }
}

impl Counters for MemoryCounters {
    fn get(&self, key: &str, window_start: u64) -> u64 {
        let values = match self.values.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        match values.get(key) {
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
}
