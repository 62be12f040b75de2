//! The audit writers' batches: events per committed batch (`intentgate_audit_batch_events`)
//! and commit latency (`intentgate_audit_commit_duration_seconds`), recorded by each tenant's
//! writer around its commit; on SQLite, the latency of each sync of the write-ahead log
//! (`intentgate_audit_sync_duration_seconds`: what the disk charges for durability, the floor
//! under every commit); plus the writers' counters ([`crate::audit::AuditStats`]) at scrape
//! time.
//!
//! This module must never label with a tenant (the per-tenant view is the decisions counter).

use std::time::Duration;

use super::exposition::{Exposition, Kind, Labels};
use super::histogram::{Latency, Sizes};
use crate::audit::AuditStats;

#[derive(Debug, Default)]
pub struct AuditCommits {
    batch_events: Sizes,
    commit_seconds: Latency,
    sync_seconds: Latency,
}

impl AuditCommits {
    /// A batch of `events` was committed (or failed to) in `elapsed`.
    pub fn record(&self, events: usize, elapsed: Duration, committed: bool) {
        self.commit_seconds.observe_duration(elapsed);
        if committed {
            self.batch_events.observe(events as u64);
        }
    }

    /// Batches recorded so far.
    pub fn commits(&self) -> u64 {
        self.commit_seconds.count()
    }

    /// One sync of the SQLite write-ahead log took `elapsed` (failed ones included: a disk that
    /// fails slowly shows here first).
    pub fn synced(&self, elapsed: Duration) {
        self.sync_seconds.observe_duration(elapsed);
    }

    /// Syncs recorded so far.
    pub fn syncs(&self) -> u64 {
        self.sync_seconds.count()
    }

    pub fn write(&self, e: &mut Exposition, stats: &AuditStats) {
        let counters = [
            (
                "intentgate_audit_events_total",
                "Audit events committed by this process.",
                stats.events,
            ),
            (
                "intentgate_audit_batches_total",
                "Audit batches committed, each one tenant writer's (events / batches = events per tenant batch).",
                stats.batches,
            ),
            (
                "intentgate_audit_transactions_total",
                "Audit write transactions committed (events / transactions = the group-commit factor; on SQLite one carries the batches of every tenant handed in meanwhile).",
                stats.transactions,
            ),
            (
                "intentgate_audit_failed_batches_total",
                "Audit batches that failed (their calls were refused).",
                stats.failed_batches,
            ),
            (
                "intentgate_audit_overloaded_total",
                "Appends refused because a writer's queue was full or an event waited too long.",
                stats.overloaded,
            ),
            (
                "intentgate_audit_late_records_dropped_total",
                "Late audit records (refusals of callers that gave up at the deadline) dropped unwritten; each is logged.",
                stats.late_dropped,
            ),
            (
                "intentgate_audit_checkpoints_total",
                "Audit checkpoints signed.",
                stats.checkpoints,
            ),
            (
                "intentgate_audit_lookup_failures_total",
                "SQLite: failed attempts to enter audit events in the query's lookup tables (each logged and retried; queries read the events from the audit table meanwhile).",
                stats.lookup_failures,
            ),
            (
                "intentgate_audit_caller_commits_total",
                "SQLite: audit transactions committed on the appending call's own thread, because it was the only append in flight and the writer was idle (part of intentgate_audit_transactions_total).",
                stats.caller_commits,
            ),
        ];
        for (name, help, value) in counters {
            e.single(name, Kind::Counter, help, value);
        }
        e.single(
            "intentgate_audit_lookup_lag_events",
            Kind::Gauge,
            "SQLite: audit events not yet entered in the query's lookup tables, as their writer last saw (a filtered query reads these from the audit table itself); 0 on PostgreSQL.",
            stats.lookup_lag,
        );
        let mut f = e.family(
            "intentgate_audit_batch_events",
            Kind::Histogram,
            "Events per committed audit batch (one tenant's writer).",
        );
        self.batch_events.write(&mut f, &Labels::NONE);
        let mut f = e.family(
            "intentgate_audit_commit_duration_seconds",
            Kind::Histogram,
            "Latency of one audit batch commit (events, charges and chain head in one transaction).",
        );
        self.commit_seconds.write(&mut f, &Labels::NONE);
        let mut f = e.family(
            "intentgate_audit_sync_duration_seconds",
            Kind::Histogram,
            "Latency of one sync (fdatasync) of the SQLite audit store's write-ahead log; none on PostgreSQL.",
        );
        self.sync_seconds.write(&mut f, &Labels::NONE);
    }
}
