//! Audit: the tamper-evident, durable record of every decision and admin action.
//!
//! - [`event`]: the versioned event schema ([`AuditEvent`]) and argument redaction ([`ArgValuesMode`]).
//! - [`jcs`]: RFC 8785 canonical JSON, the hashed form of an event.
//! - [`log`]: [`AuditLog`], the per-tenant group-commit writers. `append` resolves only after the
//!   event's transaction committed; a full queue or a failing store is a typed error
//!   ([`AuditError::Overloaded`], [`AuditError::CommitFailed`]) and the caller must refuse the
//!   call (fail closed). Chain: `hash = SHA-256(prev_hash || canonical_event)` per tenant, the
//!   first `prev_hash` being 32 zero bytes; hashes are stored as lowercase hex.
//! - [`charges`]: budget debits decided and written in the transaction of their call's event
//!   ([`AuditLog::append_charged`]), so a call costs one commit.
//! - [`key`] and [`checkpoint`]: the Ed25519 log key and signed checkpoints (C2SP signed notes).
//! - [`query`]: filters and keyset pagination for the admin API and export.
//! - `facets`: the SQLite store's token, agent, tool and time lookup tables, in a file of their
//!   own, which `facet_writer` fills a slice of durable events at a time beside the audit
//!   writer instead of updating an index in every commit.
//! - [`rollback`]: `audit prepare-rollback`, which enters every event in the database file's
//!   own lookup tables (migrations 0008 and 0009) before a rollback to a binary that uses them.
//! - [`verify`]: walks a tenant's chain in the database, optionally against a checkpoint.
//! - [`export`]: streamed CSV / NDJSON with bounded memory.
//! - [`offline`]: verifies an NDJSON export against a checkpoint and public key, no gateway needed.
//! - [`priority`]: the SQLite writer thread's scheduling class (`SCHED_BATCH`, so its wake-ups
//!   do not preempt requests) and nice value.
//!
//! This module must never acknowledge an event that is not committed, never drop an event it
//! acknowledged, and never let two writers extend one tenant's chain from the same head.

pub mod charges;
pub mod checkpoint;
mod commit;
mod committer;
mod durable;
pub mod event;
pub mod export;
mod facet_writer;
pub(crate) mod facets;
pub mod jcs;
pub mod key;
mod late;
pub mod log;
pub mod offline;
mod postgres;
pub mod priority;
pub mod query;
pub mod rollback;
pub mod time;
pub mod verify;
mod wal;

use std::sync::Arc;
use std::time::Duration;

pub use charges::Debit;
pub use checkpoint::Checkpoint;
pub(crate) use commit::Entry;
pub use durable::DurableMark;
pub use event::{ArgValuesMode, AuditEvent, Decision, SCHEMA_VERSION, kinds};
pub use key::{LogKey, Verifier};
pub use log::{Appended, AuditLog, AuditStats};
pub use query::{AuditFilter, AuditRecord, Page};
pub use verify::{BrokenAt, CheckpointCheck, VerifyReport};

/// The chain the superadmin's actions on every tenant at once are recorded in: a global
/// destination's change, a redrive or an export across tenants. Its name is not a tenant name
/// (parentheses are refused in one), so no tenant admin can read it and no tenant's chain holds
/// another tenant's business; only the superadmin may name it, in the audit read API.
pub const GLOBAL_CHAIN: &str = "(global)";

/// The database the audit tables live in: the store's raw pool ([`crate::store::Store::db`]).
pub use crate::store::Db;

/// Errors of the audit layer.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The tenant's writer queue is full, or an event waited too long in it: the store is not
    /// keeping up. The event was not written; refuse the call.
    #[error("audit log overloaded for tenant {tenant:?}: {detail}")]
    Overloaded {
        tenant: String,
        detail: &'static str,
    },
    /// The batch holding this event failed to commit; the event was not written.
    #[error("audit commit failed: {0}")]
    CommitFailed(#[source] Arc<AuditError>),
    /// The writer for this tenant is gone (shutting down).
    #[error("audit writer unavailable")]
    Unavailable,
    /// The event was not durable within the deadline (a stalled disk or database): refuse the
    /// call. The event may still be committed later; the writer then records that its caller
    /// was refused.
    #[error("audit store did not answer within the {ms} ms deadline")]
    DeadlineExceeded { ms: u64 },
    #[error("audit store: {0}")]
    Store(#[from] sqlx::Error),
    /// The SQLite writer's own connection (`committer.rs`) failed.
    #[error("audit store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The chain in the database contradicts itself in a way a writer cannot continue from.
    #[error("audit chain integrity: {0}")]
    Integrity(String),
    #[error("audit log key: {0}")]
    Key(String),
    #[error("invalid checkpoint: {0}")]
    InvalidCheckpoint(String),
    #[error("invalid audit query: {0}")]
    InvalidQuery(String),
    #[error("audit configuration: {0}")]
    Config(String),
    /// Input to the offline verifier that is not what an export contains.
    #[error("malformed input: {0}")]
    Malformed(String),
    #[error("audit i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A field the store keeps in a column of its own holds a NUL, which PostgreSQL's text
    /// cannot store: the event is refused alone, before it can fail a batch of other calls.
    #[error("audit event field {0} contains a NUL character")]
    Unstorable(&'static str),
}

/// Tuning of the writers and checkpoints.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Events that may wait per tenant before `append` answers [`AuditError::Overloaded`].
    pub queue_capacity: usize,
    /// Most events committed in one transaction.
    pub max_batch: usize,
    /// An event that waited longer than this in the queue is refused instead of written.
    pub max_queue_wait: Duration,
    /// Sign a checkpoint after this many new events of a tenant…
    pub checkpoint_every: u64,
    /// …or this long after the first event not covered by one.
    pub checkpoint_interval: Duration,
    /// How long `append` waits for its event to be durable (`INTENTGATE_AUDIT_DEADLINE_MS`).
    pub deadline: Duration,
    /// The SQLite writer thread's nice value, 0 to 19; 0 leaves it at the process's
    /// (`INTENTGATE_AUDIT_WRITER_NICE`, [`priority`]).
    pub writer_nice: u8,
    /// Whether the SQLite writer thread runs in Linux's `SCHED_BATCH` class, where its wake-ups
    /// do not preempt requests (`INTENTGATE_AUDIT_WRITER_BATCH`, [`priority`]).
    pub writer_batch: bool,
}

/// The SQLite writer thread's nice value unless configured: the process's own (see
/// [`priority`] for what a higher value trades).
pub const DEFAULT_WRITER_NICE: u8 = 0;

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            queue_capacity: 4096,
            max_batch: 512,
            max_queue_wait: Duration::from_secs(5),
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(60),
            deadline: Duration::from_secs(2),
            writer_nice: DEFAULT_WRITER_NICE,
            writer_batch: true,
        }
    }
}

impl AuditConfig {
    fn validate(&self) -> Result<(), AuditError> {
        if self.queue_capacity == 0 {
            return Err(AuditError::Config(
                "queue_capacity must be at least 1".into(),
            ));
        }
        if !(1..=2000).contains(&self.max_batch) {
            return Err(AuditError::Config(
                "max_batch must be within 1..=2000".into(),
            ));
        }
        if self.checkpoint_every == 0 {
            return Err(AuditError::Config(
                "checkpoint_every must be at least 1".into(),
            ));
        }
        if self.writer_nice > priority::MAX_NICE {
            return Err(AuditError::Config(format!(
                "writer_nice must be within 0..={}",
                priority::MAX_NICE
            )));
        }
        if self.deadline.is_zero() {
            return Err(AuditError::Config("deadline must be positive".into()));
        }
        if self.checkpoint_interval.is_zero() {
            return Err(AuditError::Config(
                "checkpoint_interval must be positive".into(),
            ));
        }
        Ok(())
    }
}
