//! Prometheus metrics: counters and histograms on atomics, updated on the request path, and a
//! hand-written text exposition served at `GET /metrics` ([`endpoint`]).
//!
//! | file | concept |
//! |---|---|
//! | [`decisions`] | decisions by tenant (bounded), check and outcome |
//! | [`stages`] | latency of each stage of a call, and of the whole decision |
//! | [`upstream`] | forwarded calls and upstream failures by kind |
//! | [`plugins`] | check failures (traps, timeouts) and the runtime's instances |
//! | [`server`] | open connections, sessions issued |
//! | [`audit`] | audit batch sizes and commit latency, the writers' counters |
//! | [`collect`] | one scrape: the above plus what is read at scrape time (audit, revocations, bundles) |
//! | [`endpoint`] | `/metrics` on the main listener or a separate one, and who may scrape |
//! | [`histogram`], [`exposition`] | the building blocks |
//!
//! Costs: recording a call is a few relaxed `fetch_add`s, one lock-free map read for the tenant
//! and a clock read per stage (measured by `intentgate-bench micro metrics`); everything else is
//! done when scraped. Labels are bounded: a tenant label (at most
//! [`decisions::MAX_TENANT_LABELS`] values, the rest folded into `(other)`), and otherwise fixed
//! sets (check, outcome, stage, kind, the configured upstream names). This module must never
//! label a metric with an agent, a token, a tool, an argument or a remote address.

use std::time::Instant;

pub mod audit;
pub mod collect;
pub mod decisions;
pub mod endpoint;
pub mod exposition;
pub mod histogram;
pub mod plugins;
pub mod server;
pub mod stages;
pub mod upstream;

pub use decisions::{Check, Outcome};
pub use endpoint::serve;
pub use stages::Stage;

use crate::pipeline::{Denial, Permit};
use crate::upstream::UpstreamError;

/// A gateway's metrics (one per [`crate::pipeline::Pipeline`]).
#[derive(Debug)]
pub struct Metrics {
    pub decisions: decisions::Decisions,
    pub stages: stages::Stages,
    pub upstream: upstream::Upstream,
    pub plugins: plugins::Plugins,
    pub server: server::Server,
    started: Instant,
}

impl Metrics {
    /// Empty metrics; `upstream_name` labels the upstream's series.
    pub fn new(upstream_name: &str) -> Self {
        Self {
            decisions: decisions::Decisions::default(),
            stages: stages::Stages::default(),
            upstream: upstream::Upstream::new(upstream_name),
            plugins: plugins::Plugins::default(),
            server: server::Server::default(),
            started: Instant::now(),
        }
    }

    /// Records a decision of the pipeline: its outcome and deciding check for the tenant, its
    /// latency since `started`, and a check that failed closed.
    #[inline]
    pub fn decided(&self, tenant: &str, started: Instant, result: &Result<Permit, Denial>) {
        self.stages.decision_since(started);
        let (check, outcome) = match result {
            Ok(_) => (Check::None, Outcome::Allow),
            Err(d @ (Denial::Escalated(_) | Denial::ApprovalPending(_))) => {
                (Check::from_name(d.check()), Outcome::Escalate)
            }
            Err(d) => (Check::from_name(d.check()), Outcome::Block),
        };
        if let Err(Denial::CheckFailed { stage, error }) = result {
            self.plugins.failure(*stage, error);
        }
        self.decisions.record(tenant, check, outcome);
    }

    /// Empty metrics with one upstream series per name (configuration order).
    pub fn with_upstreams(names: &[&str]) -> Self {
        Self {
            upstream: upstream::Upstream::named(names),
            ..Self::new("default")
        }
    }

    /// Records a call forwarded to the upstream at `started` and what came back (whatever the
    /// answer's type).
    #[inline]
    pub fn forwarded<T>(&self, started: Instant, result: &Result<T, UpstreamError>) {
        self.forwarded_to(None, started, result);
    }

    /// [`Metrics::forwarded`] for the upstream named `upstream`.
    #[inline]
    pub fn forwarded_to<T>(
        &self,
        upstream: Option<&str>,
        started: Instant,
        result: &Result<T, UpstreamError>,
    ) {
        if let Err(e) = result {
            crate::telemetry::trace::upstream_failed(e);
        }
        self.stages.since(Stage::Upstream, started);
        self.upstream.call_to(upstream);
        if let Err(e) = result {
            self.upstream.error_at(upstream, e);
        }
    }

    /// Seconds since these metrics were created (the gateway's start).
    pub fn uptime_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}
