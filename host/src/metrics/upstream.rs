//! Calls forwarded to the upstream and their failures by kind
//! (`intentgate_upstream_calls_total{upstream}`, `intentgate_upstream_errors_total{upstream,kind}`).
//!
//! The `upstream` label is the configured upstream name (`INTENTGATE_UPSTREAM_NAME`), never
//! its URL (which may carry credentials); `kind` is one of a fixed set. This module must never
//! label with an error's text.

use std::sync::atomic::{AtomicU64, Ordering};

use super::exposition::{Exposition, Kind, Labels};
use crate::upstream::UpstreamError;

const KINDS: [&str; 6] = [
    "not_configured",
    "unreachable",
    "timeout",
    "http_status",
    "too_large",
    "malformed",
];

fn kind_of(e: &UpstreamError) -> usize {
    match e {
        UpstreamError::NotConfigured => 0,
        UpstreamError::Unavailable(_) => 1,
        UpstreamError::Timeout(_) => 2,
        UpstreamError::Status { .. } => 3,
        UpstreamError::TooLarge(_) => 4,
        UpstreamError::Malformed(_) => 5,
    }
}

#[derive(Debug)]
pub struct Upstream {
    name: Box<str>,
    calls: AtomicU64,
    errors: [AtomicU64; KINDS.len()],
}

impl Upstream {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            calls: AtomicU64::new(0),
            errors: [const { AtomicU64::new(0) }; KINDS.len()],
        }
    }

    /// Counts one forwarded call (whatever its answer).
    #[inline]
    pub fn call(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one failure (a call that was never sent counts here, not in calls).
    pub fn error(&self, e: &UpstreamError) {
        self.errors[kind_of(e)].fetch_add(1, Ordering::Relaxed);
    }

    /// Failures of `kind` so far (a name of the fixed set; 0 for any other).
    pub fn errors(&self, kind: &str) -> u64 {
        KINDS
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.errors[i].load(Ordering::Relaxed))
    }

    pub fn write(&self, e: &mut Exposition) {
        let name = &*self.name;
        e.family(
            "intentgate_upstream_calls_total",
            Kind::Counter,
            "Calls forwarded to the upstream after an allow decision (tools, resources, prompts).",
        )
        .sample(
            &Labels(&[("upstream", name)]),
            self.calls.load(Ordering::Relaxed),
        );
        let mut f = e.family(
            "intentgate_upstream_errors_total",
            Kind::Counter,
            "Allowed calls the upstream did not answer, by upstream and kind.",
        );
        for (i, kind) in KINDS.iter().enumerate() {
            f.sample(
                &Labels(&[("upstream", name), ("kind", kind)]),
                self.errors[i].load(Ordering::Relaxed),
            );
        }
    }
}
