//! The gateway's own account of a measured window: `/metrics` read at the window's start and
//! end, and the difference of its histograms turned into where an average call's time went
//! (each check, the audit stage from hand-in to durable answer, the upstream) and what the
//! audit writer did meanwhile (events a commit, a commit's and a sync's time).
//!
//! Counters only: the figures are means over the window, from the gateway's own clocks, so
//! they say where time goes, not how the load generator saw it. Nothing here may make a run
//! fail: a scrape that fails leaves the row out.

use std::collections::HashMap;
use std::net::SocketAddr;

use hyper::Method;

/// Every sample of one `/metrics` text, by its full name with labels.
#[derive(Debug, Default, Clone)]
pub struct Scrape(HashMap<String, f64>);

impl Scrape {
    /// Reads the exposition format's sample lines (comments and malformed lines skipped).
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect();
        Self(samples)
    }

    fn get(&self, name: &str) -> f64 {
        self.0.get(name).copied().unwrap_or(0.0)
    }
}

/// Reads the gateway's `/metrics` (admin token); `None` when it cannot.
pub async fn scrape(addr: SocketAddr, admin_token: &str) -> Option<Scrape> {
    let (status, body) = crate::loadgen::admin(addr, Method::GET, "/metrics", admin_token, "")
        .await
        .ok()?;
    status
        .is_success()
        .then(|| Scrape::parse(&String::from_utf8_lossy(&body)))
}

/// Stages in the order a call passes them.
const STAGES: [&str; 7] = [
    "token",
    "capability",
    "intent",
    "policy",
    "budget",
    "audit",
    "upstream",
];

/// Means over a window, in microseconds (events a commit as a count).
#[derive(Debug, Clone, PartialEq)]
pub struct Breakdown {
    pub calls: f64,
    /// Mean time in each of [`STAGES`].
    pub stages: Vec<f64>,
    pub events_per_commit: f64,
    pub commit_us: f64,
    pub sync_us: f64,
}

fn mean(a: &Scrape, b: &Scrape, sum: &str, count: &str) -> (f64, f64) {
    let n = b.get(count) - a.get(count);
    let total = b.get(sum) - a.get(sum);
    if n > 0.0 {
        (total / n * 1e6, n)
    } else {
        (f64::NAN, 0.0)
    }
}

/// What happened between `a` and `b`; `None` when no call was decided.
pub fn between(a: &Scrape, b: &Scrape) -> Option<Breakdown> {
    let (_, calls) = mean(
        a,
        b,
        "intentgate_decision_duration_seconds_sum",
        "intentgate_decision_duration_seconds_count",
    );
    if calls == 0.0 {
        return None;
    }
    let stages = STAGES
        .iter()
        .map(|s| {
            mean(
                a,
                b,
                &format!("intentgate_stage_duration_seconds_sum{{stage=\"{s}\"}}"),
                &format!("intentgate_stage_duration_seconds_count{{stage=\"{s}\"}}"),
            )
            .0
        })
        .collect();
    let (commit_us, commits) = mean(
        a,
        b,
        "intentgate_audit_commit_duration_seconds_sum",
        "intentgate_audit_commit_duration_seconds_count",
    );
    let events =
        b.get("intentgate_audit_batch_events_sum") - a.get("intentgate_audit_batch_events_sum");
    let (sync_us, _) = mean(
        a,
        b,
        "intentgate_audit_sync_duration_seconds_sum",
        "intentgate_audit_sync_duration_seconds_count",
    );
    Some(Breakdown {
        calls,
        stages,
        events_per_commit: if commits > 0.0 {
            events / commits
        } else {
            f64::NAN
        },
        commit_us,
        sync_us,
    })
}

/// The table's header (after the run's name and load).
pub fn header() -> String {
    let names: Vec<String> = STAGES.iter().map(|s| format!("{s} µs")).collect();
    format!(
        "| system | load | calls | {} | events a commit | commit µs | sync µs |\n|---|---|---:|{}---:|---:|---:|",
        names.join(" | "),
        "---:|".repeat(STAGES.len())
    )
}

/// One row of [`header`]'s table.
pub fn row(system: &str, load: &str, b: &Breakdown) -> String {
    let f = |v: f64| {
        if v.is_finite() {
            format!("{v:.1}")
        } else {
            "-".into()
        }
    };
    let stages: Vec<String> = b.stages.iter().map(|v| f(*v)).collect();
    format!(
        "| {system} | {load} | {:.0} | {} | {} | {} | {} |",
        b.calls,
        stages.join(" | "),
        f(b.events_per_commit),
        f(b.commit_us),
        f(b.sync_us)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(calls: u64, policy_s: f64, commits: u64, events: u64) -> String {
        format!(
            "# HELP intentgate_decision_duration_seconds Latency.\n\
             # TYPE intentgate_decision_duration_seconds histogram\n\
             intentgate_decision_duration_seconds_sum {}\n\
             intentgate_decision_duration_seconds_count {calls}\n\
             intentgate_stage_duration_seconds_sum{{stage=\"policy\"}} {policy_s}\n\
             intentgate_stage_duration_seconds_count{{stage=\"policy\"}} {calls}\n\
             intentgate_audit_batch_events_sum {events}\n\
             intentgate_audit_commit_duration_seconds_sum {}\n\
             intentgate_audit_commit_duration_seconds_count {commits}\n\
             intentgate_decisions_total{{tenant=\"a b\",outcome=\"allow\"}} 3\n\
             a malformed line\n",
            calls as f64 * 0.001,
            commits as f64 * 0.0005
        )
    }

    #[test]
    fn a_window_is_the_difference_of_two_scrapes() {
        let a = Scrape::parse(&text(100, 0.002, 10, 100));
        let b = Scrape::parse(&text(1_100, 0.022, 110, 1_100));
        let d = between(&a, &b).expect("calls in the window");
        assert_eq!(d.calls, 1_000.0);
        // 0.020 s over 1,000 calls.
        assert!((d.stages[3] - 20.0).abs() < 1e-9, "{:?}", d.stages);
        assert!(d.stages[0].is_nan(), "no token samples: no mean");
        assert!((d.events_per_commit - 10.0).abs() < 1e-9);
        assert!((d.commit_us - 500.0).abs() < 1e-9);
        assert!(d.sync_us.is_nan());
        let line = row("sqlite/2t", "closed c=64", &d);
        assert!(
            line.contains("| 20.0 |") && line.contains("| - |"),
            "{line}"
        );
        assert_eq!(
            header().lines().next().map(|h| h.matches('|').count()),
            line.lines().next().map(|l| l.matches('|').count())
        );
    }

    #[test]
    fn a_window_without_calls_has_no_row() {
        let a = Scrape::parse(&text(100, 0.002, 10, 100));
        assert_eq!(between(&a, &a), None);
    }
}
