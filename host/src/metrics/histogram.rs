//! A fixed-bucket histogram on atomics: one `fetch_add` for the bucket, one for the sum, no
//! lock and no allocation when observing. Buckets are stored non-cumulative and summed when
//! exposed, so the `+Inf` bucket and `_count` always agree.
//!
//! This type must never allocate or lock on [`Histogram::observe`]: it is on the request path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::exposition::{Family, Labels};

/// Upper bounds of the latency buckets, in nanoseconds: 10 µs to 10 s, so token checks
/// (microseconds), plugins and commits (milliseconds) and the upstream (up to its timeout)
/// each land in buckets that tell them apart.
pub const LATENCY_BOUNDS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Upper bounds of the size buckets (events per audit batch): powers of two up to 1,024.
pub const SIZE_BOUNDS: [u64; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];

/// What a histogram measures: how its raw values are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Nanoseconds, exposed as seconds.
    Seconds,
    /// Plain counts.
    Count,
}

/// A histogram with `N` finite buckets (plus `+Inf`).
#[derive(Debug)]
pub struct Histogram<const N: usize> {
    bounds: &'static [u64; N],
    unit: Unit,
    /// `buckets[i]` counts values in `(bounds[i-1], bounds[i]]`; `buckets[N]` the rest.
    buckets: [AtomicU64; 33],
    sum: AtomicU64,
}

/// A latency histogram (values in nanoseconds, exposed in seconds).
pub type Latency = Histogram<19>;
/// A size histogram (plain counts).
pub type Sizes = Histogram<11>;

impl Default for Latency {
    fn default() -> Self {
        Histogram::new(&LATENCY_BOUNDS_NS, Unit::Seconds)
    }
}

impl Default for Sizes {
    fn default() -> Self {
        Histogram::new(&SIZE_BOUNDS, Unit::Count)
    }
}

impl<const N: usize> Histogram<N> {
    /// An empty histogram over `bounds` (ascending; at most 32).
    pub const fn new(bounds: &'static [u64; N], unit: Unit) -> Self {
        assert!(N < 33, "at most 32 finite buckets");
        Self {
            bounds,
            unit,
            buckets: [const { AtomicU64::new(0) }; 33],
            sum: AtomicU64::new(0),
        }
    }

    /// Counts one value (nanoseconds for a latency histogram).
    #[inline]
    pub fn observe(&self, value: u64) {
        let i = self.bounds.partition_point(|&b| b < value);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// Counts one duration (saturating at `u64::MAX` nanoseconds, ~584 years).
    #[inline]
    pub fn observe_duration(&self, d: Duration) {
        self.observe(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Values counted so far.
    pub fn count(&self) -> u64 {
        self.buckets[..=N]
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }

    /// Writes the `_bucket`, `_sum` and `_count` samples of this histogram.
    pub fn write(&self, family: &mut Family<'_>, labels: &Labels<'_>) {
        let mut cumulative = 0u64;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let le = match self.unit {
                Unit::Seconds => format_seconds(*bound),
                Unit::Count => bound.to_string(),
            };
            family.sample_le("_bucket", labels, &le, cumulative);
        }
        cumulative += self.buckets[N].load(Ordering::Relaxed);
        family.sample_le("_bucket", labels, "+Inf", cumulative);
        let sum = self.sum.load(Ordering::Relaxed);
        let sum = match self.unit {
            Unit::Seconds => sum as f64 / 1e9,
            Unit::Count => sum as f64,
        };
        family.sample_suffixed("_sum", labels, sum);
        family.sample_suffixed("_count", labels, cumulative);
    }
}

/// A bucket bound in seconds, shortest exact decimal (`0.00001`, `2.5`, `10`).
fn format_seconds(ns: u64) -> String {
    let s = ns as f64 / 1e9;
    format!("{s}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_their_bucket_and_bounds_are_inclusive() {
        let h = Sizes::default();
        for v in [0, 1, 2, 3, 1024, 1025, 5000] {
            h.observe(v);
        }
        let got: Vec<u64> = h.buckets[..=11]
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        // <=1: 0 and 1; <=2: 2; <=4: 3; <=1024: 1024; +Inf: 1025, 5000.
        assert_eq!(got, vec![2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(h.count(), 7);
        assert_eq!(
            h.sum.load(Ordering::Relaxed),
            1 + 2 + 3 + 1024 + 1025 + 5000
        );
    }

    #[test]
    fn seconds_bounds_print_as_decimals() {
        assert_eq!(format_seconds(10_000), "0.00001");
        assert_eq!(format_seconds(2_500_000_000), "2.5");
        assert_eq!(format_seconds(10_000_000_000), "10");
    }
}
