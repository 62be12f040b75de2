//! A bundle made live for one tenant: the checks of each stage as instance pools, and the
//! bundle digest that every decision it makes must record.
//!
//! The pipeline loads one `Arc<Snapshot>` per request and calls the stages in order. A stage
//! runs its checks in order and returns the first verdict that is not allow; any plugin error
//! is returned as an error (the pipeline fails closed). The `*_async` stage calls are the
//! request path (plugins yield to the runtime); the plain ones run inline, off the runtime.

use crate::plugins::check::{Exec, now_or_never};
use crate::plugins::{
    BudgetOutcome, Charge, CheckComponent, CheckInput, CheckOutput, CheckPool, Counters,
    IntentOutcome, IntentRecord, PluginError, Runtime, Stage, Verdict, VerdictKind,
};
use std::collections::HashMap;
use std::sync::Arc;

use super::BundleSpec;
use super::registry::BundleError;

/// A live bundle for one tenant. Immutable; dropping the last `Arc` frees its instances.
pub struct Snapshot {
    digest: String,
    tenant: Arc<str>,
    spec: BundleSpec,
    intent: Vec<CheckPool>,
    policy: Vec<CheckPool>,
    budget: Vec<CheckPool>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("digest", &self.digest)
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    /// Build pools for `spec`. With `warm`, instantiate and configure one instance of every
    /// check now, so a bad configuration (Rego that does not compile, failing Rego tests) is
    /// refused here rather than at the first call.
    pub(crate) fn build(
        runtime: &Arc<Runtime>,
        components: &HashMap<String, CheckComponent>,
        spec: &BundleSpec,
        tenant: &str,
        counters: &Arc<dyn Counters>,
        warm: bool,
    ) -> Result<Self, BundleError> {
        let tenant: Arc<str> = tenant.into();
        let mut pools: HashMap<Stage, Vec<CheckPool>> = HashMap::new();
        for stage in Stage::ALL {
            let mut list = Vec::new();
            for (i, check) in spec.checks(stage).iter().enumerate() {
                let component = components
                    .get(&check.component)
                    .ok_or_else(|| BundleError::UnknownComponent(check.component.clone()))?;
                let pool = CheckPool::new(
                    runtime.clone(),
                    component.clone(),
                    check.config.as_str(),
                    stage,
                    tenant.clone(),
                    counters.clone(),
                )
                .with_intent_required(stage == Stage::Intent && i == 0);
                if warm {
                    pool.warm().map_err(|e| BundleError::Invalid {
                        stage,
                        index: i,
                        error: e,
                    })?;
                }
                list.push(pool);
            }
            pools.insert(stage, list);
        }
        let mut take = |s: Stage| pools.remove(&s).unwrap_or_default();
        Ok(Self {
            digest: spec.digest(),
            tenant,
            spec: spec.clone(),
            intent: take(Stage::Intent),
            policy: take(Stage::Policy),
            budget: take(Stage::Budget),
        })
    }

    /// A bundle with no checks: every call is blocked by the policy stage (deny by default).
    pub(crate) fn empty(tenant: &str) -> Self {
        let spec = BundleSpec::default();
        Self {
            digest: spec.digest(),
            tenant: tenant.into(),
            spec,
            intent: Vec::new(),
            policy: Vec::new(),
            budget: Vec::new(),
        }
    }

    /// The bundle digest (`sha256:<hex>`): record it with every decision this snapshot makes.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The tenant this snapshot serves.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The spec.
    pub fn spec(&self) -> &BundleSpec {
        &self.spec
    }

    /// The intent stage: the first check's intent record and the stage verdict.
    pub fn intent(&self, input: &CheckInput) -> Result<IntentOutcome, PluginError> {
        now_or_never(self.intent_in(input, Exec::Inline), Stage::Intent)
    }

    /// [`Snapshot::intent`] on the request path.
    pub async fn intent_async(&self, input: &CheckInput) -> Result<IntentOutcome, PluginError> {
        self.intent_in(input, Exec::Async).await
    }

    async fn intent_in(
        &self,
        input: &CheckInput,
        exec: Exec,
    ) -> Result<IntentOutcome, PluginError> {
        let mut record = None;
        let mut last = Verdict::allow("no intent check in bundle");
        let mut first_escalate: Option<Verdict> = None;
        let mut step_up = false;
        for pool in &self.intent {
            let out = pool.run(input, None, exec).await?;
            if record.is_none() {
                record = out.intent;
            }
            step_up |= out.verdict.requires_step_up;
            match out.verdict.kind {
                VerdictKind::Block => {
                    return Ok(IntentOutcome {
                        record: record.unwrap_or_default(),
                        verdict: out.verdict,
                    });
                }
                // As in the policy stage: a later check's block wins over an escalation, or an
                // approval of the escalation would skip a block nobody was shown.
                VerdictKind::Escalate => {
                    first_escalate.get_or_insert(out.verdict);
                }
                VerdictKind::Allow => last = out.verdict,
            }
        }
        let record = record.unwrap_or_else(|| IntentRecord {
            summary: "no intent check".into(),
            rationale: "the bundle has no intent stage".into(),
            ..IntentRecord::default()
        });
        let verdict = first_escalate.unwrap_or(last);
        Ok(IntentOutcome {
            record,
            verdict: Verdict {
                requires_step_up: step_up,
                ..verdict
            },
        })
    }

    /// The policy stage: the first block; else the first escalation, once every check ran (a
    /// later check's block wins over it); else the first check's allow (the operator's policy
    /// words the reason; custom checks after it only add vetoes). The verdict asks for a
    /// step-up when any check did. A bundle without a policy check denies (deny by default).
    pub fn policy(
        &self,
        input: &CheckInput,
        intent: &IntentRecord,
    ) -> Result<Verdict, PluginError> {
        now_or_never(self.policy_in(input, intent, Exec::Inline), Stage::Policy)
    }

    /// [`Snapshot::policy`] on the request path.
    pub async fn policy_async(
        &self,
        input: &CheckInput,
        intent: &IntentRecord,
    ) -> Result<Verdict, PluginError> {
        self.policy_in(input, intent, Exec::Async).await
    }

    async fn policy_in(
        &self,
        input: &CheckInput,
        intent: &IntentRecord,
        exec: Exec,
    ) -> Result<Verdict, PluginError> {
        let mut first_allow: Option<Verdict> = None;
        let mut first_escalate: Option<Verdict> = None;
        let mut step_up = false;
        for pool in &self.policy {
            let out: CheckOutput = pool.run(input, Some(intent), exec).await?;
            step_up |= out.verdict.requires_step_up;
            match out.verdict.kind {
                // A block ends the stage: no approval can answer it.
                VerdictKind::Block => return Ok(out.verdict),
                // An escalation does not: a person approves the call only if no later check
                // blocks it, or the approval would answer a block nobody was shown.
                VerdictKind::Escalate => {
                    first_escalate.get_or_insert(out.verdict);
                }
                VerdictKind::Allow => {
                    first_allow.get_or_insert(out.verdict);
                }
            }
        }
        match first_escalate.or(first_allow) {
            // Any check's step-up holds, whichever check words the verdict.
            Some(verdict) => Ok(Verdict {
                requires_step_up: step_up,
                ..verdict
            }),
            None => Ok(Verdict {
                kind: VerdictKind::Block,
                reason: "no policy in bundle (deny by default)".into(),
                requires_step_up: false,
                approval_mode: None,
            }),
        }
    }

    /// The budget stage: a verdict and, when it allows, the charges (keys namespaced
    /// `"<tenant>/<key>"`) the pipeline applies once every check allowed.
    pub fn budget(&self, input: &CheckInput) -> Result<BudgetOutcome, PluginError> {
        now_or_never(self.budget_in(input, Exec::Inline), Stage::Budget)
    }

    /// [`Snapshot::budget`] on the request path.
    pub async fn budget_async(&self, input: &CheckInput) -> Result<BudgetOutcome, PluginError> {
        self.budget_in(input, Exec::Async).await
    }

    async fn budget_in(
        &self,
        input: &CheckInput,
        exec: Exec,
    ) -> Result<BudgetOutcome, PluginError> {
        let mut charges: Vec<Charge> = Vec::new();
        let mut last = Verdict::allow("no budget check in bundle");
        let mut first_escalate: Option<Verdict> = None;
        let mut step_up = false;
        for pool in &self.budget {
            let out = pool.run(input, None, exec).await?;
            step_up |= out.verdict.requires_step_up;
            match out.verdict.kind {
                VerdictKind::Block => {
                    return Ok(BudgetOutcome {
                        verdict: out.verdict,
                        charges: Vec::new(),
                    });
                }
                // A later check's block wins over an escalation, and every check's charges are
                // kept: the call a person approves is charged like any other.
                VerdictKind::Escalate => {
                    first_escalate.get_or_insert(out.verdict);
                }
                VerdictKind::Allow => last = out.verdict,
            }
            for c in out.charges {
                let key = format!("{}/{}", self.tenant, c.key);
                merge_charge(
                    &mut charges,
                    Charge {
                        key,
                        window_start: c.window_start,
                        amount: c.amount,
                        limit: c.limit,
                    },
                );
            }
        }
        let verdict = first_escalate.unwrap_or(last);
        Ok(BudgetOutcome {
            verdict: Verdict {
                requires_step_up: step_up,
                ..verdict
            },
            charges,
        })
    }

    /// All three stages in order, without applying charges (dry-run, tests): the first verdict
    /// that is not allow, or (all allowed) the policy's verdict with the budget's charges.
    pub fn decide(&self, input: &CheckInput) -> Result<(Verdict, Vec<Charge>), PluginError> {
        let intent = self.intent(input)?;
        if !intent.verdict.is_allow() {
            return Ok((intent.verdict, Vec::new()));
        }
        let policy = self.policy(input, &intent.record)?;
        if !policy.is_allow() {
            return Ok((policy, Vec::new()));
        }
        let budget = self.budget(input)?;
        if !budget.verdict.is_allow() {
            return Ok((budget.verdict, Vec::new()));
        }
        Ok((policy, budget.charges))
    }

    /// How many checks the snapshot runs, across its stages.
    pub fn check_count(&self) -> usize {
        self.intent.len() + self.policy.len() + self.budget.len()
    }

    /// Drop idle instances (when this snapshot stops being active).
    pub(crate) fn trim(&self) {
        for pool in self.intent.iter().chain(&self.policy).chain(&self.budget) {
            pool.trim();
        }
    }

    /// Idle instances across the snapshot's pools.
    pub fn idle_instances(&self) -> usize {
        self.intent
            .iter()
            .chain(&self.policy)
            .chain(&self.budget)
            .map(CheckPool::idle_count)
            .sum()
    }
}

/// Adds `c` to a call's charges. Two checks charging the same counter in the same window
/// (two ceilings on one key) are one write: charged twice, each call would count double
/// against both. The write adds the larger amount, and its limit leaves the counter the
/// headroom the tighter check asked for (`min(limit - amount)`), so it passes exactly when
/// each check's own charge would.
fn merge_charge(charges: &mut Vec<Charge>, c: Charge) {
    match charges
        .iter_mut()
        .find(|x| x.key == c.key && x.window_start == c.window_start)
    {
        Some(x) => {
            // Signed: a charge over its own limit (which can never pass) has negative
            // headroom, and the merged write must never pass either.
            let room = |c: &Charge| i128::from(c.limit) - i128::from(c.amount);
            let headroom = room(x).min(room(&c));
            x.amount = x.amount.max(c.amount);
            x.limit = u64::try_from((i128::from(x.amount) + headroom).max(0)).unwrap_or(u64::MAX);
        }
        None => charges.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge(key: &str, window_start: u64, amount: u64, limit: u64) -> Charge {
        Charge {
            key: key.into(),
            window_start,
            amount,
            limit,
        }
    }

    #[test]
    fn a_charge_over_its_own_limit_keeps_the_merged_write_from_passing() {
        for (first, second) in [
            ((200, 100), (200, 500)),
            ((200, 500), (200, 100)),
            ((5, 0), (1, 9)),
        ] {
            let mut charges = Vec::new();
            merge_charge(&mut charges, charge("t/spend", 0, first.0, first.1));
            merge_charge(&mut charges, charge("t/spend", 0, second.0, second.1));
            let c = &charges[0];
            assert!(
                c.amount > c.limit,
                "{first:?} + {second:?} merged into {c:?}, which passes on a fresh counter"
            );
        }
    }

    #[test]
    fn two_ceilings_on_one_counter_are_one_write() {
        let mut charges = Vec::new();
        merge_charge(&mut charges, charge("t/agent-calls:a", 100, 1, 50));
        merge_charge(&mut charges, charge("t/agent-cents:a", 100, 3, 500));
        merge_charge(&mut charges, charge("t/agent-calls:a", 100, 1, 20));
        merge_charge(&mut charges, charge("t/agent-cents:a", 100, 5, 900));
        // Another window of the same key is another counter.
        merge_charge(&mut charges, charge("t/agent-calls:a", 0, 1, 7));
        // Cents: 3 against 500 and 5 against 900 (headroom 497 and 895): 5 against 502, so a
        // counter at 497 passes neither check alone and not the write, at 496 all three.
        assert_eq!(
            charges,
            [
                charge("t/agent-calls:a", 100, 1, 20),
                charge("t/agent-cents:a", 100, 5, 502),
                charge("t/agent-calls:a", 0, 1, 7),
            ]
        );
    }
}
