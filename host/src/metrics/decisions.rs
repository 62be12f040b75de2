//! Tool-call decisions by tenant, deciding check and outcome
//! (`intentgate_decisions_total{tenant,check,outcome}`), with a bounded tenant label.
//!
//! At most [`MAX_TENANT_LABELS`] tenants get their own label value; the calls of any further
//! tenant are counted under [`OTHER_TENANTS`]. Requests refused before a token was verified
//! have no tenant anyone vouched for and are counted under [`UNAUTHENTICATED`]. Both values
//! contain parentheses, which a tenant name cannot, so they never collide with a tenant.
//!
//! Recording a decision of a known tenant is a lock-free map read and one `fetch_add`; only a
//! tenant's first decision takes a lock (copy-on-write of the map). This module must never
//! create a label from an agent, a token, a tool or an argument.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::exposition::{Exposition, Kind, Labels};

/// Tenants with their own label value; the rest share [`OTHER_TENANTS`].
pub const MAX_TENANT_LABELS: usize = 1000;
/// The label value of the tenants beyond [`MAX_TENANT_LABELS`].
pub const OTHER_TENANTS: &str = "(other)";
/// The label value of calls refused before their token verified.
pub const UNAUTHENTICATED: &str = "(unauthenticated)";

/// Whether the pipeline decides requests of this MCP method (the ones counted here): a request
/// of one refused before its token verified is counted under [`UNAUTHENTICATED`].
pub fn is_decided_method(method: &str) -> bool {
    matches!(
        method,
        "tools/call"
            | "resources/read"
            | "prompts/get"
            | "completion/complete"
            | "resources/subscribe"
    )
}

/// The check that decided a call (`none` when every check allowed it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    None,
    Throttle,
    Capability,
    Intent,
    Policy,
    Budget,
    Audit,
    Other,
}

impl Check {
    const ALL: [Check; 8] = [
        Check::None,
        Check::Throttle,
        Check::Capability,
        Check::Intent,
        Check::Policy,
        Check::Budget,
        Check::Audit,
        Check::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Check::None => "none",
            Check::Throttle => "throttle",
            Check::Capability => "capability",
            Check::Intent => "intent",
            Check::Policy => "policy",
            Check::Budget => "budget",
            Check::Audit => "audit",
            Check::Other => "other",
        }
    }

    /// The check as the audit log names it (`Denial::check`); unknown names fold into `other`.
    pub fn from_name(name: &str) -> Check {
        match name {
            "" | "none" => Check::None,
            "throttle" => Check::Throttle,
            "capability" => Check::Capability,
            "intent" => Check::Intent,
            "policy" => Check::Policy,
            "budget" => Check::Budget,
            "audit" => Check::Audit,
            _ => Check::Other,
        }
    }
}

/// A decision's outcome, as audit events name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Allow,
    Block,
    Escalate,
}

impl Outcome {
    const ALL: [Outcome; 3] = [Outcome::Allow, Outcome::Block, Outcome::Escalate];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Block => "block",
            Outcome::Escalate => "escalate",
        }
    }
}

const CELLS: usize = Check::ALL.len() * Outcome::ALL.len();

/// One tenant's counters, a cell per (check, outcome).
#[derive(Debug)]
struct TenantCounts([AtomicU64; CELLS]);

impl Default for TenantCounts {
    fn default() -> Self {
        Self([const { AtomicU64::new(0) }; CELLS])
    }
}

fn cell(check: Check, outcome: Outcome) -> usize {
    check as usize * Outcome::ALL.len() + outcome as usize
}

/// The decision counters of one gateway.
#[derive(Debug)]
pub struct Decisions {
    tenants: ArcSwap<HashMap<Box<str>, Arc<TenantCounts>>>,
    other: Arc<TenantCounts>,
    unauthenticated: TenantCounts,
    grow: Mutex<()>,
    max_tenants: usize,
}

impl Default for Decisions {
    fn default() -> Self {
        Self::with_max_tenants(MAX_TENANT_LABELS)
    }
}

impl Decisions {
    /// Counters giving at most `max_tenants` tenants their own label value.
    pub fn with_max_tenants(max_tenants: usize) -> Self {
        Self {
            tenants: ArcSwap::from_pointee(HashMap::new()),
            other: Arc::default(),
            unauthenticated: TenantCounts::default(),
            grow: Mutex::new(()),
            max_tenants,
        }
    }

    /// Counts one decision of `tenant`.
    #[inline]
    pub fn record(&self, tenant: &str, check: Check, outcome: Outcome) {
        let i = cell(check, outcome);
        if let Some(counts) = self.tenants.load().get(tenant) {
            counts.0[i].fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.counts_for_new(tenant).0[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one call refused before its token verified.
    pub fn record_unauthenticated(&self) {
        self.unauthenticated.0[cell(Check::Capability, Outcome::Block)]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// A tenant's first decision: give it a label value if there is room, else `other`.
    #[cold]
    fn counts_for_new(&self, tenant: &str) -> Arc<TenantCounts> {
        // Once full, the tenants beyond the cap never take the lock.
        if self.tenants.load().len() >= self.max_tenants {
            return Arc::clone(&self.other);
        }
        let _grow = self.grow.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.tenants.load();
        if let Some(counts) = current.get(tenant) {
            return Arc::clone(counts);
        }
        if current.len() >= self.max_tenants {
            return Arc::clone(&self.other);
        }
        let counts = Arc::new(TenantCounts::default());
        let mut next = HashMap::clone(&current);
        next.insert(tenant.into(), Arc::clone(&counts));
        self.tenants.store(Arc::new(next));
        counts
    }

    /// The count of one (tenant label, check, outcome); for tests and tools.
    pub fn get(&self, tenant: &str, check: Check, outcome: Outcome) -> u64 {
        let i = cell(check, outcome);
        match tenant {
            OTHER_TENANTS => self.other.0[i].load(Ordering::Relaxed),
            UNAUTHENTICATED => self.unauthenticated.0[i].load(Ordering::Relaxed),
            t => self
                .tenants
                .load()
                .get(t)
                .map_or(0, |c| c.0[i].load(Ordering::Relaxed)),
        }
    }

    /// Writes `intentgate_decisions_total`: the cells that counted something, tenants sorted.
    pub fn write(&self, e: &mut Exposition) {
        let mut f = e.family(
            "intentgate_decisions_total",
            Kind::Counter,
            "Decisions (tools/call, resources/read, prompts/get, completion/complete, \
             resources/subscribe) by tenant, deciding check (none when allowed) and outcome.",
        );
        let tenants = self.tenants.load();
        let mut named: Vec<(&str, &TenantCounts)> =
            tenants.iter().map(|(t, c)| (&**t, &**c)).collect();
        named.sort_unstable_by_key(|(t, _)| *t);
        named.push((OTHER_TENANTS, &self.other));
        named.push((UNAUTHENTICATED, &self.unauthenticated));
        for (tenant, counts) in named {
            for check in Check::ALL {
                for outcome in Outcome::ALL {
                    let n = counts.0[cell(check, outcome)].load(Ordering::Relaxed);
                    if n > 0 {
                        let labels = [
                            ("tenant", tenant),
                            ("check", check.as_str()),
                            ("outcome", outcome.as_str()),
                        ];
                        f.sample(&Labels(&labels), n);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_beyond_the_cap_fold_into_other() {
        let d = Decisions::with_max_tenants(3);
        for i in 0..10 {
            d.record(&format!("t{i}"), Check::None, Outcome::Allow);
        }
        d.record("t0", Check::Policy, Outcome::Block);
        d.record("t9", Check::Policy, Outcome::Escalate);
        assert_eq!(d.get("t0", Check::None, Outcome::Allow), 1);
        assert_eq!(d.get("t0", Check::Policy, Outcome::Block), 1);
        assert_eq!(d.get("t5", Check::None, Outcome::Allow), 0);
        assert_eq!(d.get(OTHER_TENANTS, Check::None, Outcome::Allow), 7);
        assert_eq!(d.get(OTHER_TENANTS, Check::Policy, Outcome::Escalate), 1);
        let mut e = Exposition::new();
        d.write(&mut e);
        let text = e.finish();
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        // t0 (2 cells), t1, t2, other (2 cells).
        assert_eq!(samples, 6, "{text}");
        assert!(text.contains(
            "intentgate_decisions_total{tenant=\"(other)\",check=\"none\",outcome=\"allow\"} 7"
        ));
    }

    #[test]
    fn check_names_map_and_unknown_ones_fold() {
        for c in Check::ALL {
            assert_eq!(Check::from_name(c.as_str()), c);
        }
        assert_eq!(Check::from_name("siem"), Check::Other);
    }
}
