//! Check plugins: failures by stage and kind (`intentgate_plugin_failures_total{stage,kind}`:
//! traps, timeouts, memory, capacity), recorded from the pipeline's denials, and the runtime's
//! instances read at scrape time (`intentgate_plugin_instances`, `_max`, calls in flight).
//!
//! The runtime is shared by the whole process, so its gauges are the process's. This module
//! must never label with a plugin's message or a tenant.

use std::sync::atomic::{AtomicU64, Ordering};

use super::exposition::{Exposition, Kind, Labels};
use crate::plugins::{PluginError, Runtime, Stage};

const STAGES: [Stage; 3] = Stage::ALL;

const KINDS: [&str; 10] = [
    "trap",
    "timeout",
    "out_of_memory",
    "malformed",
    "instantiate",
    "configure",
    "busy",
    "tenant_quota",
    "call_deadline",
    "other",
];

fn kind_of(e: &PluginError) -> usize {
    match e {
        PluginError::Trap { .. } => 0,
        PluginError::Timeout { .. } => 1,
        PluginError::OutOfMemory { .. } => 2,
        PluginError::Malformed { .. } => 3,
        PluginError::Instantiate { .. } => 4,
        PluginError::Configure { .. } => 5,
        PluginError::Busy(_) => 6,
        PluginError::TenantQuota { .. } => 7,
        PluginError::CallDeadline { .. } => 8,
        _ => 9,
    }
}

fn stage_index(stage: Stage) -> usize {
    STAGES.iter().position(|s| *s == stage).unwrap_or(0)
}

#[derive(Debug)]
pub struct Plugins {
    failures: [[AtomicU64; KINDS.len()]; STAGES.len()],
}

impl Default for Plugins {
    fn default() -> Self {
        Self {
            failures: [const { [const { AtomicU64::new(0) }; KINDS.len()] }; STAGES.len()],
        }
    }
}

impl Plugins {
    /// Counts a check that failed closed.
    pub fn failure(&self, stage: Stage, error: &PluginError) {
        self.failures[stage_index(stage)][kind_of(error)].fetch_add(1, Ordering::Relaxed);
    }

    /// Failures of `stage` and `kind` so far.
    pub fn failures(&self, stage: Stage, kind: &str) -> u64 {
        KINDS.iter().position(|k| *k == kind).map_or(0, |k| {
            self.failures[stage_index(stage)][k].load(Ordering::Relaxed)
        })
    }

    pub fn write(&self, e: &mut Exposition, runtime: &Runtime) {
        let mut f = e.family(
            "intentgate_plugin_failures_total",
            Kind::Counter,
            "Checks that failed closed (the call was refused), by stage and kind: traps, \
             timeouts, memory, capacity.",
        );
        for (s, stage) in STAGES.iter().enumerate() {
            for (k, kind) in KINDS.iter().enumerate() {
                let n = self.failures[s][k].load(Ordering::Relaxed);
                if n > 0 || matches!(*kind, "trap" | "timeout") {
                    f.sample(&Labels(&[("stage", stage.as_str()), ("kind", kind)]), n);
                }
            }
        }
        e.single(
            "intentgate_plugin_instances",
            Kind::Gauge,
            "Plugin instances alive in this process (idle pooled ones included).",
            runtime.live_instances(),
        );
        e.single(
            "intentgate_plugin_instances_max",
            Kind::Gauge,
            "Most plugin instances this process may hold.",
            runtime.limits().max_instances,
        );
        e.single(
            "intentgate_plugin_calls_in_flight",
            Kind::Gauge,
            "Guest calls running right now.",
            runtime.calls_in_flight(),
        );
    }
}
