//! Counter charges that ride in an audit batch: a call's budget debits (the bundle's ceilings,
//! the token's `max_calls` and `rate_limit`, a round's single-use nonce) are decided and written
//! in the transaction that records the call's audit event, so a call costs one commit, not one
//! store round trip per counter plus one for the event.
//!
//! Per batch, two statements whatever its size: one upsert that makes every touched counter row
//! exist, locks it (PostgreSQL: rows in key order, so writers on other replicas cannot deadlock;
//! SQLite: the transaction already holds the database write lock) and returns its value; then,
//! after every entry's debits were decided in memory **in queue order**, one upsert of the new
//! values. A debit that would pass its limit refuses its own entry only: the entry's earlier
//! debits are undone in memory and its event is rewritten as a budget refusal before it is
//! hashed, so the chain records what the caller is told.
//!
//! This module must never apply a debit outside the transaction of its entry's event, never
//! read a counter it has not locked, and never let one entry's refusal touch another entry.

use std::collections::{BTreeMap, BTreeSet};

use super::AuditError;

/// One conditional counter change: `amount` added to `key` in `window` only if the total stays
/// within `limit`. A negative `amount` is a refund: always applied, floored at zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Debit {
    pub key: String,
    pub window: i64,
    pub amount: i64,
    pub limit: i64,
}

impl Debit {
    /// The debit that gives this one back.
    pub fn refund(&self) -> Debit {
        Debit {
            key: self.key.clone(),
            window: self.window,
            amount: -self.amount,
            limit: i64::MAX,
        }
    }

    /// What a caller refused by this debit is told (and what its audit event says).
    pub fn refusal(&self) -> String {
        if self.key.starts_with("round:") {
            return "this round was already answered: a requestState is single-use".to_owned();
        }
        let what = if self.key.starts_with("calls:") {
            "token max_calls"
        } else if self.key.starts_with("rate:") {
            "token rate_limit"
        } else if self.key.starts_with("token-cents:") || self.key.contains("/token-cents:") {
            "token max_cents"
        } else {
            "budget"
        };
        format!("{what} of {} reached", self.limit)
    }

    /// Refuses what must never reach SQL: the store's rules for a counter key and a limit.
    pub fn validate(&self) -> Result<(), AuditError> {
        crate::store::check::charge(&self.key, self.amount, self.limit)
            .map_err(|e| AuditError::InvalidQuery(format!("budget charge: {e}")))
    }
}

/// A counter row: key and window.
pub(crate) type Slot = (String, i64);

/// Every distinct counter the entries touch, in key order (the lock order).
pub(crate) fn slots<'a>(entries: impl Iterator<Item = &'a [Debit]>) -> BTreeSet<Slot> {
    entries
        .flatten()
        .map(|d| (d.key.clone(), d.window))
        .collect()
}

/// Decides each entry's debits in order against `values` (updated in place). Returns, per entry,
/// the index of the debit that refused it, if any; a refused entry leaves `values` as it found
/// them.
pub(crate) fn decide<'a>(
    values: &mut BTreeMap<Slot, i64>,
    entries: impl Iterator<Item = &'a [Debit]>,
) -> Vec<Option<usize>> {
    let mut out = Vec::new();
    let mut undo: Vec<(Slot, i64)> = Vec::new();
    for debits in entries {
        undo.clear();
        let mut refused = None;
        for (i, d) in debits.iter().enumerate() {
            let slot = (d.key.clone(), d.window);
            let value = values.entry(slot.clone()).or_insert(0);
            let before = *value;
            if d.amount < 0 {
                *value = value.saturating_add(d.amount).max(0);
            } else if d.amount <= d.limit && *value <= d.limit - d.amount {
                *value += d.amount;
            } else {
                refused = Some(i);
                break;
            }
            undo.push((slot, before));
        }
        if refused.is_some() {
            for (slot, before) in undo.drain(..).rev() {
                values.insert(slot, before);
            }
        }
        out.push(refused);
    }
    out
}

/// Settles the debits on the SQLite writer's own connection (`committer.rs`; PostgreSQL's is
/// `postgres.rs`): the transaction holds the
/// database write lock, so each counter is read as it stands, every debit is decided in queue
/// order in memory, and only the counters that changed are written back, each statement prepared
/// once for the life of the connection.
pub(crate) fn settle_sqlite(
    tx: &rusqlite::Transaction<'_>,
    entries: &mut [&mut super::commit::Entry],
) -> Result<(), AuditError> {
    use rusqlite::OptionalExtension;
    let slots = slots(entries.iter().map(|e| e.debits.as_slice()));
    if slots.is_empty() {
        return Ok(());
    }
    let mut read = tx.prepare_cached(SQLITE_READ)?;
    let mut before: BTreeMap<Slot, i64> = BTreeMap::new();
    for (key, window) in slots {
        let value: Option<i64> = read
            .query_row(rusqlite::params![key, window], |r| r.get(0))
            .optional()?;
        if let Some(v) = value {
            before.insert((key, window), v);
        }
    }
    let mut values = before.clone();
    let refused = decide(&mut values, entries.iter().map(|e| e.debits.as_slice()));
    let now = super::time::now_ms() / 1000;
    let mut write = tx.prepare_cached(SQLITE_WRITE)?;
    for ((key, window), value) in &values {
        if before.get(&(key.clone(), *window)) != Some(value) {
            write.execute(rusqlite::params![key, window, value, now])?;
        }
    }
    for (entry, refused) in entries.iter_mut().zip(refused) {
        if let Some(i) = refused {
            entry.refuse(i);
        }
    }
    Ok(())
}

const SQLITE_READ: &str = "SELECT value FROM counters WHERE key = ?1 AND window_start = ?2";
const SQLITE_WRITE: &str = "INSERT INTO counters (key, window_start, value, updated_at) \
     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (key, window_start) DO UPDATE \
     SET value = excluded.value, updated_at = excluded.updated_at";

#[cfg(test)]
mod tests {
    use super::*;

    fn d(key: &str, amount: i64, limit: i64) -> Debit {
        Debit {
            key: key.into(),
            window: 0,
            amount,
            limit,
        }
    }

    #[test]
    fn entries_are_decided_in_order_and_a_refusal_undoes_only_its_own_entry() {
        let mut values = BTreeMap::new();
        values.insert(("calls:a".to_owned(), 0), 1);
        let e1 = vec![d("calls:a", 1, 2), d("rate:a", 1, 5)];
        let e2 = vec![d("rate:a", 1, 5), d("calls:a", 1, 2)];
        let e3 = vec![d("rate:a", 1, 5)];
        let out = decide(
            &mut values,
            [e1.as_slice(), e2.as_slice(), e3.as_slice()].into_iter(),
        );
        assert_eq!(out, vec![None, Some(1), None]);
        assert_eq!(values[&("calls:a".to_owned(), 0)], 2);
        // e2's rate debit was undone: e1 and e3 only.
        assert_eq!(values[&("rate:a".to_owned(), 0)], 2);
    }

    #[test]
    fn refunds_floor_at_zero_and_oversized_amounts_refuse() {
        let mut values = BTreeMap::new();
        let out = decide(
            &mut values,
            [
                [d("k", -5, i64::MAX)].as_slice(),
                [d("k", 3, 2)].as_slice(),
                [d("k", i64::MAX, i64::MAX)].as_slice(),
                [d("k", 1, i64::MAX)].as_slice(),
            ]
            .into_iter(),
        );
        assert_eq!(out, vec![None, Some(0), None, Some(0)]);
        assert_eq!(values[&("k".to_owned(), 0)], i64::MAX);
    }

    #[test]
    fn refusals_name_the_limit() {
        assert_eq!(d("calls:j", 1, 7).refusal(), "token max_calls of 7 reached");
        assert!(d("round:5:2", 1, 1).refusal().contains("single-use"));
        assert!(d("t/token-cents:x", 1, 1).refusal().contains("max_cents"));
    }
}
