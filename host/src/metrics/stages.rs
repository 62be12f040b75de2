//! Latency of each stage of a tool call (`intentgate_stage_duration_seconds{stage}`) and of
//! the whole decision (`intentgate_decision_duration_seconds`).
//!
//! The stages, in call order: `token` (decode, signature chain, revocation), `capability`
//! (the token's caveats for this tool), the plugin stages `intent`, `policy`, `budget`, `audit`
//! (the wait for the decision's event and charges to be durable), `upstream` (forwarding).
//! A stage that did not run (an earlier one refused) records nothing. This module must never
//! label a latency with anything but the stage. Each recorded stage is also a span of the call's
//! trace when it is sampled ([`crate::telemetry::trace::stage`]).

use std::time::Instant;

use super::exposition::{Exposition, Kind, Labels};
use super::histogram::Latency;
use crate::plugins::Stage as PluginStage;

/// A stage of a tool call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Token,
    Capability,
    Intent,
    Policy,
    Budget,
    Audit,
    Upstream,
}

impl Stage {
    pub const ALL: [Stage; 7] = [
        Stage::Token,
        Stage::Capability,
        Stage::Intent,
        Stage::Policy,
        Stage::Budget,
        Stage::Audit,
        Stage::Upstream,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Token => "token",
            Stage::Capability => "capability",
            Stage::Intent => "intent",
            Stage::Policy => "policy",
            Stage::Budget => "budget",
            Stage::Audit => "audit",
            Stage::Upstream => "upstream",
        }
    }
}

impl From<PluginStage> for Stage {
    fn from(s: PluginStage) -> Self {
        match s {
            PluginStage::Intent => Stage::Intent,
            PluginStage::Policy => Stage::Policy,
            // A SIEM formatter is not on the call path; no call records it.
            PluginStage::Budget | PluginStage::Siem => Stage::Budget,
        }
    }
}

/// One histogram per stage, and one for the whole decision.
#[derive(Debug, Default)]
pub struct Stages {
    stages: [Latency; Stage::ALL.len()],
    decision: Latency,
}

/// Records its stage's latency when dropped (also when a `?` leaves the stage early).
#[derive(Debug)]
#[must_use = "the stage is recorded when the timer drops"]
pub struct StageTimer<'a> {
    stages: &'a Stages,
    stage: Stage,
    started: Instant,
}

impl Drop for StageTimer<'_> {
    fn drop(&mut self) {
        self.stages.since(self.stage, self.started);
    }
}

impl Stages {
    /// Times `stage` from now until the returned timer drops.
    #[inline]
    pub fn timer(&self, stage: Stage) -> StageTimer<'_> {
        StageTimer {
            stages: self,
            stage,
            started: Instant::now(),
        }
    }

    /// Records the time since `started` for `stage`.
    #[inline]
    pub fn since(&self, stage: Stage, started: Instant) {
        self.stages[stage as usize].observe_duration(started.elapsed());
        // The same timing point is the stage's span in a sampled call's trace.
        crate::telemetry::trace::stage(stage, started);
    }

    /// Records the time since `started` for the whole decision (throttle to durable event).
    #[inline]
    pub fn decision_since(&self, started: Instant) {
        self.decision.observe_duration(started.elapsed());
    }

    /// Observations of `stage` so far.
    pub fn count(&self, stage: Stage) -> u64 {
        self.stages[stage as usize].count()
    }

    pub fn write(&self, e: &mut Exposition) {
        let mut f = e.family(
            "intentgate_stage_duration_seconds",
            Kind::Histogram,
            "Latency of each stage of a tool call (token, capability, intent, policy, budget, \
             audit commit, upstream).",
        );
        for stage in Stage::ALL {
            self.stages[stage as usize].write(&mut f, &Labels(&[("stage", stage.as_str())]));
        }
        let mut f = e.family(
            "intentgate_decision_duration_seconds",
            Kind::Histogram,
            "Latency of a whole decision, from admission to a durable audit event.",
        );
        self.decision.write(&mut f, &Labels::NONE);
    }
}
