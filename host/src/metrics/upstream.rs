//! Calls forwarded to the upstream and their failures by kind
//! (`intentgate_upstream_calls_total{upstream}`, `intentgate_upstream_errors_total{upstream,kind}`).
//!
//! The `upstream` label is a configured upstream name (`INTENTGATE_UPSTREAM_NAME`, the names
//! of `INTENTGATE_UPSTREAMS`: a bounded set), never its URL (which may carry credentials);
//! `kind` is one of a fixed set. This module must never
//! label with an error's text.

use std::sync::atomic::{AtomicU64, Ordering};

use super::exposition::{Exposition, Kind, Labels};
use crate::upstream::UpstreamError;

const KINDS: [&str; 8] = [
    "not_configured",
    "unreachable",
    "timeout",
    "http_status",
    "too_large",
    "malformed",
    "not_decided",
    "interrupted",
];

fn kind_of(e: &UpstreamError) -> usize {
    match e {
        UpstreamError::NotConfigured => 0,
        UpstreamError::Unavailable(_) => 1,
        UpstreamError::Timeout(_) => 2,
        UpstreamError::Status { .. } => 3,
        UpstreamError::TooLarge(_) => 4,
        UpstreamError::Malformed(_) => 5,
        UpstreamError::NotDecided => 6,
        UpstreamError::Interrupted(_) => 7,
    }
}

/// One upstream's series.
#[derive(Debug)]
struct Series {
    name: Box<str>,
    calls: AtomicU64,
    errors: [AtomicU64; KINDS.len()],
}

impl Series {
    fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            calls: AtomicU64::new(0),
            errors: [const { AtomicU64::new(0) }; KINDS.len()],
        }
    }
}

/// The series of every configured upstream (at least one: the default name labels calls
/// that were never routed, such as those refused for want of an upstream).
#[derive(Debug)]
pub struct Upstream {
    series: Box<[Series]>,
}

impl Upstream {
    pub fn new(name: &str) -> Self {
        Self::named(&[name])
    }

    /// One series per upstream name (configuration order); none given: `default`.
    pub fn named(names: &[&str]) -> Self {
        let mut series: Vec<Series> = names.iter().map(|n| Series::new(n)).collect();
        if series.is_empty() {
            series.push(Series::new("default"));
        }
        Self {
            series: series.into_boxed_slice(),
        }
    }

    /// The series of `upstream`; the first for `None` or a name not configured.
    #[inline]
    fn of(&self, upstream: Option<&str>) -> &Series {
        let first = &self.series[0];
        match upstream {
            Some(n) if self.series.len() > 1 => {
                self.series.iter().find(|s| &*s.name == n).unwrap_or(first)
            }
            _ => first,
        }
    }

    /// Counts one forwarded call (whatever its answer).
    #[inline]
    pub fn call(&self) {
        self.call_to(None);
    }

    /// Counts one call forwarded to `upstream`.
    #[inline]
    pub fn call_to(&self, upstream: Option<&str>) {
        self.of(upstream).calls.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one failure (a call that was never sent counts here, not in calls).
    pub fn error(&self, e: &UpstreamError) {
        self.error_at(None, e);
    }

    /// Counts one failure of `upstream`.
    pub fn error_at(&self, upstream: Option<&str>, e: &UpstreamError) {
        self.of(upstream).errors[kind_of(e)].fetch_add(1, Ordering::Relaxed);
    }

    /// Failures of `kind` so far, all upstreams together (a name of the fixed set; 0 for any
    /// other).
    pub fn errors(&self, kind: &str) -> u64 {
        KINDS.iter().position(|k| *k == kind).map_or(0, |i| {
            self.series
                .iter()
                .map(|s| s.errors[i].load(Ordering::Relaxed))
                .sum()
        })
    }

    pub fn write(&self, e: &mut Exposition) {
        let mut f = e.family(
            "intentgate_upstream_calls_total",
            Kind::Counter,
            "Calls forwarded to the upstream after an allow decision (tools, resources, prompts).",
        );
        for s in &*self.series {
            f.sample(
                &Labels(&[("upstream", &s.name)]),
                s.calls.load(Ordering::Relaxed),
            );
        }
        let mut f = e.family(
            "intentgate_upstream_errors_total",
            Kind::Counter,
            "Allowed calls the upstream did not answer, by upstream and kind.",
        );
        for s in &*self.series {
            for (i, kind) in KINDS.iter().enumerate() {
                f.sample(
                    &Labels(&[("upstream", &s.name), ("kind", kind)]),
                    s.errors[i].load(Ordering::Relaxed),
                );
            }
        }
    }
}
