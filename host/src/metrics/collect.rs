//! One scrape: every family, in a fixed order, from the gateway's [`super::Metrics`] and from
//! what is read at scrape time (audit writers, revocation set, bundle swaps, plugin runtime).
//!
//! This module must never block on the store or a lock held across a call: a scrape reads
//! atomics and snapshots only.

use super::exposition::{Exposition, Kind, Labels};
use crate::gateway::Gateway;

/// The scrape answer's body (Prometheus text format 0.0.4).
pub fn render(gw: &Gateway) -> String {
    let m = gw.metrics();
    let mut e = Exposition::new();
    e.family(
        "intentgate_build_info",
        Kind::Gauge,
        "Always 1; the version of the running gateway.",
    )
    .sample(&Labels(&[("version", env!("CARGO_PKG_VERSION"))]), 1u64);
    e.single(
        "intentgate_uptime_seconds",
        Kind::Gauge,
        "Seconds since the gateway started.",
        m.uptime_seconds(),
    );
    m.decisions.write(&mut e);
    m.stages.write(&mut e);
    m.upstream.write(&mut e);
    let audit = gw.pipeline.audit();
    audit.commits().write(&mut e, &audit.stats());
    m.plugins.write(&mut e, gw.pipeline.registry().runtime());
    let mut f = e.family(
        "intentgate_bundle_swaps_total",
        Kind::Counter,
        "Active bundles swapped in this process, by action (promote, rollback, sync from the store).",
    );
    for (action, n) in gw.pipeline.registry().swap_counts() {
        f.sample(&Labels(&[("action", action)]), n);
    }
    let outbox = gw.outbox.stats();
    use std::sync::atomic::Ordering::Relaxed;
    e.single(
        "intentgate_outbox_backlog",
        Kind::Gauge,
        "Recorded events not yet delivered to their destinations (all lanes, last reading).",
        outbox.backlog.load(Relaxed).max(0) as u64,
    );
    e.single(
        "intentgate_outbox_backlog_alarm",
        Kind::Gauge,
        "1 when the backlog is over INTENTGATE_OUTBOX_BACKLOG_ALARM (events are kept).",
        u64::from(outbox.alarm.load(Relaxed)),
    );
    e.single(
        "intentgate_outbox_dead_letters",
        Kind::Gauge,
        "Deliveries set aside after INTENTGATE_OUTBOX_DEAD_AFTER_SECS (re-drivable).",
        outbox.dead_letters.load(Relaxed).max(0) as u64,
    );
    e.single(
        "intentgate_outbox_delivered_total",
        Kind::Counter,
        "Events delivered by this process.",
        outbox.delivered.load(Relaxed),
    );
    e.single(
        "intentgate_outbox_failed_attempts_total",
        Kind::Counter,
        "Failed delivery attempts of this process (each retried or dead-lettered).",
        outbox.failed.load(Relaxed),
    );
    let revocations = &gw.revocations;
    e.single(
        "intentgate_revocation_sync_age_seconds",
        Kind::Gauge,
        "Seconds since the revocation set last caught up with the store (+Inf before the first \
         sync); calls fail closed beyond INTENTGATE_REVOCATION_MAX_STALENESS_SECS.",
        revocations
            .sync_age()
            .map_or(f64::INFINITY, |d| d.as_secs_f64()),
    );
    e.single(
        "intentgate_revocation_max_staleness_seconds",
        Kind::Gauge,
        "The staleness bound of the revocation set (INTENTGATE_REVOCATION_MAX_STALENESS_SECS).",
        gw.config.revocation_max_staleness.as_secs_f64(),
    );
    e.single(
        "intentgate_revoked_tokens",
        Kind::Gauge,
        "Token ids in the revocation set.",
        revocations.len(),
    );
    m.server.write(&mut e, gw.config.max_connections);
    if let Some(x) = gw.tracer.exporter() {
        e.single(
            "intentgate_trace_spans_dropped_total",
            Kind::Counter,
            "Spans of sampled calls dropped because the export queue was full (calls never wait).",
            x.dropped.load(Relaxed),
        );
        e.single(
            "intentgate_trace_spans_exported_total",
            Kind::Counter,
            "Spans accepted by the OTLP collector.",
            x.exported.load(Relaxed),
        );
        e.single(
            "intentgate_trace_export_failed_spans_total",
            Kind::Counter,
            "Spans of exports that failed (not retried).",
            x.failed.load(Relaxed),
        );
    }
    e.finish()
}
