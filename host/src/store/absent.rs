//! Session ids known to have no row in a SQLite file this process owns, so that a
//! handshake-era call's check of its session (`crate::mcp::ended`: one indexed read a call)
//! reads the file once per session instead of once per call.
//!
//! Why this is exact: a SQLite file has one owning process ([`super::owner`]), and every store
//! of the file in that process shares this one set, so every write that could create a row
//! passes through [`AbsentSessions::invalidate`]. A row can only appear through a write; an id
//! without a row stays without one until the next write, whatever the clock says (a row that
//! expires only makes more ids absent). Each write moves a version: an id is remembered only
//! when no write happened between the read that found it absent and the remembering, and a
//! shard whose version is behind is emptied before it answers.
//!
//! This module must never answer "absent" for an id written after the version it was read at,
//! and never grow without bound.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Shards, so concurrent calls of different sessions rarely share a lock.
const SHARDS: usize = 16;
/// Most ids remembered (all shards together); a full shard is emptied and starts again.
pub const CAPACITY: usize = 65_536;

#[derive(Debug, Default)]
struct Shard {
    version: u64,
    ids: HashSet<String>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct AbsentSessions {
    version: AtomicU64,
    shards: Box<[Mutex<Shard>]>,
}

impl Default for AbsentSessions {
    fn default() -> Self {
        Self {
            version: AtomicU64::new(0),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl AbsentSessions {
    /// The version to pass to [`remember`](Self::remember): read it before the store read.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Whether `id` is known to have no row.
    pub fn contains(&self, id: &str) -> bool {
        let now = self.version();
        let Ok(mut shard) = self.shard(id).lock() else {
            return false;
        };
        if shard.version != now {
            shard.ids.clear();
            shard.version = now;
            return false;
        }
        shard.ids.contains(id)
    }

    /// Remembers that a read begun at `version` found no row for `id` (ignored when a write
    /// happened since).
    pub fn remember(&self, id: &str, version: u64) {
        let Ok(mut shard) = self.shard(id).lock() else {
            return;
        };
        if self.version() != version {
            return;
        }
        if shard.version != version || shard.ids.len() >= CAPACITY / SHARDS {
            shard.ids.clear();
            shard.version = version;
        }
        shard.ids.insert(id.to_owned());
    }

    /// A row may exist now for any id: forget them all. Call it after the write committed.
    pub fn invalidate(&self) {
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    fn shard(&self, id: &str) -> &Mutex<Shard> {
        // Ids end in a digest or a signature: their last byte is spread enough.
        let last = id.as_bytes().last().copied().unwrap_or(0) as usize;
        &self.shards[last % SHARDS]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_read_absent_is_remembered_until_a_write() {
        let a = AbsentSessions::default();
        assert!(!a.contains("ended:x"));
        let v = a.version();
        a.remember("ended:x", v);
        assert!(a.contains("ended:x"));
        assert!(!a.contains("ended:y"), "only what was read");
        a.invalidate();
        assert!(!a.contains("ended:x"), "a write forgets every id");
    }

    #[test]
    fn a_read_that_raced_a_write_is_not_remembered() {
        let a = AbsentSessions::default();
        let v = a.version();
        // The store read found no row, then a write committed before it was remembered.
        a.invalidate();
        a.remember("ended:x", v);
        assert!(!a.contains("ended:x"));
        // Remembered before the write, forgotten after it.
        let v = a.version();
        a.remember("ended:x", v);
        a.invalidate();
        assert!(!a.contains("ended:x"));
    }

    #[test]
    fn memory_is_bounded() {
        let a = AbsentSessions::default();
        let v = a.version();
        for i in 0..CAPACITY * 3 {
            a.remember(&format!("ended:{i}"), v);
        }
        let held: usize = a
            .shards
            .iter()
            .map(|s| s.lock().expect("shard").ids.len())
            .sum();
        assert!(held <= CAPACITY, "{held}");
        assert!(a.contains(&format!("ended:{}", CAPACITY * 3 - 1)));
    }
}
