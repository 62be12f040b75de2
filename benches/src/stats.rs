//! Latency statistics from a sorted vector of samples (exact, no histogram error) and the
//! small formatting helpers the report uses.
//!
//! Percentiles use the nearest-rank definition: the p-th percentile of n sorted samples is the
//! sample at rank `ceil(p/100 * n)` (1-based), so it is always a value that was observed and
//! p100 is the maximum. Nothing here measures time; the callers do.

use std::time::Duration;

/// Latency samples in nanoseconds, collected unsorted and sorted once by [`Samples::summary`].
#[derive(Debug, Default, Clone)]
pub struct Samples {
    ns: Vec<u64>,
}

impl Samples {
    pub fn with_capacity(n: usize) -> Self {
        Samples {
            ns: Vec::with_capacity(n),
        }
    }

    pub fn push(&mut self, d: Duration) {
        self.ns
            .push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    #[cfg(test)]
    pub fn push_ns(&mut self, ns: u64) {
        self.ns.push(ns);
    }

    pub fn extend(&mut self, other: Samples) {
        self.ns.extend(other.ns);
    }

    /// Sorts the samples and summarises them.
    pub fn summary(mut self) -> Summary {
        self.ns.sort_unstable();
        Summary::from_sorted(&self.ns)
    }
}

/// Nearest-rank percentile of sorted samples; `None` when there are none.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let p = p.clamp(0.0, 100.0);
    let n = sorted.len();
    // rank in 1..=n; p = 0 is the minimum. The tolerance keeps binary rounding of p (99.9 is
    // 99.900000000000006) from pushing an exact rank such as 999 of 1000 to the next sample.
    let exact = p / 100.0 * n as f64;
    let rank = (exact - 1e-9 * exact.max(1.0)).ceil() as usize;
    let idx = rank.clamp(1, n) - 1;
    Some(sorted[idx])
}

/// What the report prints for one set of latency samples (all in nanoseconds).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub min: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Summary {
    pub fn from_sorted(sorted: &[u64]) -> Summary {
        debug_assert!(sorted.windows(2).all(|w| w[0] <= w[1]));
        if sorted.is_empty() {
            return Summary::default();
        }
        let sum: u128 = sorted.iter().map(|&v| u128::from(v)).sum();
        let p = |q| percentile(sorted, q).unwrap_or(0);
        Summary {
            count: sorted.len(),
            min: sorted[0],
            p50: p(50.0),
            p90: p(90.0),
            p99: p(99.0),
            p999: p(99.9),
            max: sorted[sorted.len() - 1],
            mean: sum as f64 / sorted.len() as f64,
        }
    }
}

/// The median of a few measurements (e.g. throughput of each repetition).
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Nanoseconds as a short human figure: `850ns`, `12.3µs`, `1.84ms`, `2.10s`.
pub fn fmt_ns(ns: u64) -> String {
    let f = ns as f64;
    if ns < 1_000 {
        format!("{ns}ns")
    } else if ns < 1_000_000 {
        format!("{:.1}µs", f / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.2}ms", f / 1e6)
    } else {
        format!("{:.2}s", f / 1e9)
    }
}

/// Parses `500ms`, `10s`, `2m` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => v / 1e3,
        "s" => v,
        "m" => v * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (use ms, s or m)")),
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 99.9), Some(100));
        assert_eq!(percentile(&v, 100.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&v, 0.5), Some(1));
        assert_eq!(percentile(&v, 1.0), Some(1));
        assert_eq!(percentile(&v, 1.01), Some(2));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7], 99.9), Some(7));
    }

    #[test]
    fn percentile_of_1000_samples() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 99.9), Some(999));
        assert_eq!(percentile(&v, 99.0), Some(990));
        assert_eq!(percentile(&v, 50.0), Some(500));
        // Out-of-range p is clamped, never panics.
        assert_eq!(percentile(&v, 150.0), Some(1000));
        assert_eq!(percentile(&v, -3.0), Some(1));
    }

    #[test]
    fn summary_of_unsorted_samples() {
        let mut s = Samples::default();
        for v in [5u64, 1, 4, 2, 3] {
            s.push_ns(v);
        }
        let sum = s.summary();
        assert_eq!(sum.count, 5);
        assert_eq!((sum.min, sum.p50, sum.max), (1, 3, 5));
        assert_eq!(sum.p99, 5);
        assert!((sum.mean - 3.0).abs() < 1e-9);
        assert_eq!(Samples::default().summary(), Summary::default());
    }

    #[test]
    fn median_odd_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn durations_and_formatting() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2h").is_err());
        assert_eq!(fmt_ns(850), "850ns");
        assert_eq!(fmt_ns(12_345), "12.3µs");
        assert_eq!(fmt_ns(1_840_000), "1.84ms");
    }
}
