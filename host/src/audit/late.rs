//! A tenant writer's late records: the refusals of callers that gave up at the deadline
//! (`log.rs`), held until the store takes them.
//!
//! They are committed on their own, never beside fresh calls, so a record the store refuses
//! for what it holds (not for being down) cannot refuse anyone else's call. Whether a failure
//! was the store being down is learned from the writer's next commit of fresh calls: when that
//! one succeeds, the late commit's failure counts as a strike against what it carried. After
//! [`STRIKES`] strikes the records are tried one at a time (several in a row while they go
//! through), and one that earns [`STRIKES`] strikes alone is dropped with an error log and
//! counted (`intentgate_audit_late_records_dropped_total`); the others then go together again.
//!
//! Must never hold more than [`MAX_LATE`] records, never retry a record the store keeps
//! refusing while it takes everything else, and never drop one without saying so.

use super::commit::Entry;

/// Most late records a writer holds while its store is down.
pub const MAX_LATE: usize = 4096;

/// Failed commits (each followed by a fresh commit that succeeded) after which late records
/// are tried one at a time, and after which one tried alone is dropped.
pub(super) const STRIKES: u32 = 3;

/// What a late commit should carry, and what its outcome means.
#[derive(Default)]
pub(super) struct Late {
    records: Vec<Entry>,
    /// Strikes against the records tried last (all of them, or the first one alone).
    strikes: u32,
    /// The last late commit failed; the next fresh commit says whether the store was up.
    suspect: bool,
    /// Trying one record per commit, to find the one the store refuses.
    one_by_one: bool,
    /// Late commits failed in a row (for the log, which says the first and every 50th).
    failures: u64,
}

/// Why [`Late::keep`] did not keep a record.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Full;

impl Late {
    /// Whether records are being tried one at a time.
    pub(super) fn searching(&self) -> bool {
        self.one_by_one
    }

    pub(super) fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.records.len()
    }

    /// Holds `record` for a later commit, unless [`MAX_LATE`] are held.
    pub(super) fn keep(&mut self, record: Entry) -> Result<(), Full> {
        if self.records.len() >= MAX_LATE {
            return Err(Full);
        }
        self.records.push(record);
        Ok(())
    }

    /// The records the next late commit carries (at most `max`), taken out until
    /// [`Late::failed`] gives them back.
    pub(super) fn take(&mut self, max: usize) -> Vec<Entry> {
        let n = if self.one_by_one { 1 } else { max.max(1) };
        let n = n.min(self.records.len());
        self.records.drain(..n).collect()
    }

    /// Every held record, for the last attempt at shutdown.
    pub(super) fn take_all(&mut self) -> Vec<Entry> {
        std::mem::take(&mut self.records)
    }

    /// The late commit carrying [`Late::take`]'s records succeeded.
    pub(super) fn committed(&mut self) {
        self.suspect = false;
        self.failures = 0;
        self.strikes = 0;
        if self.records.is_empty() {
            self.one_by_one = false;
        }
    }

    /// The late commit failed: its records (as the commit gave them back) come first again.
    /// Returns whether the failure is worth a log line (the first of a streak, then every
    /// 50th: a store that is down for long is said once, not five times a second).
    pub(super) fn failed(&mut self, records: Vec<Entry>) -> bool {
        self.records.splice(0..0, records);
        self.suspect = true;
        self.failures += 1;
        self.failures % 50 == 1
    }

    /// A fresh commit of the same writer succeeded: the store is up, so a late commit that
    /// failed just before failed for what it carried. Returns the record to drop, when one
    /// tried alone has earned [`STRIKES`] strikes.
    pub(super) fn store_is_up(&mut self) -> Option<Entry> {
        if !std::mem::take(&mut self.suspect) {
            return None;
        }
        self.strikes += 1;
        if self.strikes < STRIKES {
            return None;
        }
        self.strikes = 0;
        if !self.one_by_one {
            self.one_by_one = true;
            return None;
        }
        // Found: the others go together again.
        self.one_by_one = false;
        (!self.records.is_empty()).then(|| self.records.remove(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tool: &str) -> Entry {
        let mut e = crate::audit::AuditEvent::new("tool_call", "acme");
        e.tool = tool.to_owned();
        Entry::new(e, Vec::new())
    }

    fn tools(v: &[Entry]) -> Vec<String> {
        v.iter().map(|e| e.event.tool.clone()).collect()
    }

    /// A store that is down earns no strikes however long it stays down; a record the store
    /// refuses while it takes fresh commits is found by trying one at a time, and dropped
    /// after its strikes, and the others are then written.
    #[test]
    fn a_record_the_store_keeps_refusing_is_found_and_dropped() {
        let mut late = Late::default();
        for t in ["a", "poison", "b"] {
            late.keep(record(t)).expect("room");
        }
        // Down: every late commit fails and no fresh one succeeds.
        for _ in 0..10 {
            let carried = late.take(64);
            assert_eq!(carried.len(), 3);
            late.failed(carried);
        }
        assert_eq!(late.len(), 3, "nothing dropped while the store is down");
        // Up, but the batch holds the poison: strikes, then one at a time.
        for _ in 0..STRIKES {
            let carried = late.take(64);
            assert_eq!(carried.len(), 3);
            late.failed(carried);
            assert!(late.store_is_up().is_none());
        }
        let first = late.take(64);
        assert_eq!(tools(&first), ["a"], "one at a time now");
        late.committed();
        let mut dropped = None;
        for _ in 0..STRIKES {
            assert!(dropped.is_none());
            let carried = late.take(64);
            assert_eq!(tools(&carried), ["poison"]);
            late.failed(carried);
            dropped = late.store_is_up();
        }
        assert_eq!(dropped.map(|e| e.event.tool), Some("poison".to_owned()));
        let rest = late.take(64);
        assert_eq!(tools(&rest), ["b"]);
        late.committed();
        assert!(late.is_empty());
        // A success resets: the next records go together again.
        for t in ["c", "d"] {
            late.keep(record(t)).expect("room");
        }
        assert_eq!(late.take(64).len(), 2);
    }

    #[test]
    fn holds_at_most_max_late() {
        let mut late = Late::default();
        for _ in 0..MAX_LATE {
            late.keep(record("x")).expect("room");
        }
        assert_eq!(late.keep(record("x")), Err(Full));
        assert_eq!(late.len(), MAX_LATE);
    }
}
