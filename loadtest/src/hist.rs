//! Latency histograms that merge across processes: log-linear buckets (64 per power of
//! two, about 1.5% precision) over microseconds, serialised sparsely so a worker can send
//! one per second in its JSON line and the parent can add them up.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Values below this are their own bucket.
const LINEAR: u64 = 128;

/// A mergeable histogram of microsecond values.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct Hist {
    /// Bucket index -> count (sparse).
    #[serde(default)]
    buckets: BTreeMap<u32, u64>,
    /// Samples.
    #[serde(default)]
    pub count: u64,
    /// Largest sample, exact.
    #[serde(default)]
    pub max: u64,
}

fn index(v: u64) -> u32 {
    if v < LINEAR {
        return v as u32;
    }
    let e = 63 - v.leading_zeros(); // >= 7
    let sub = (v >> (e - 6)) & 63;
    LINEAR as u32 + (e - 7) * 64 + sub as u32
}

/// A representative value (the bucket's middle) of bucket `i`.
fn value(i: u32) -> u64 {
    if u64::from(i) < LINEAR {
        return u64::from(i);
    }
    let j = i - LINEAR as u32;
    let e = j / 64 + 7;
    let sub = u64::from(j % 64);
    let low = (64 + sub) << (e - 6);
    low + (1u64 << (e - 6)) / 2
}

impl Hist {
    /// Records one value.
    pub(crate) fn record(&mut self, v: u64) {
        *self.buckets.entry(index(v)).or_insert(0) += 1;
        self.count += 1;
        self.max = self.max.max(v);
    }

    /// Adds another histogram's samples.
    pub(crate) fn merge(&mut self, other: &Hist) {
        for (k, c) in &other.buckets {
            *self.buckets.entry(*k).or_insert(0) += c;
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
    }

    /// The `p`th percentile (0-100), or 0 when empty; `p = 100` is the exact max.
    pub(crate) fn percentile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        if p >= 100.0 {
            return self.max;
        }
        let rank = ((p / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (k, c) in &self.buckets {
            seen += c;
            if seen >= rank {
                return value(*k).min(self.max);
            }
        }
        self.max
    }

    /// Percentile in milliseconds.
    pub(crate) fn ms(&self, p: f64) -> f64 {
        self.percentile(p) as f64 / 1000.0
    }

    /// Takes the samples out, leaving an empty histogram.
    pub(crate) fn take(&mut self) -> Hist {
        std::mem::take(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_close() {
        let mut last = 0;
        for v in [0u64, 1, 127, 128, 129, 1000, 65_535, 1_000_000, 123_456_789] {
            let i = index(v);
            assert!(i >= last);
            last = i;
            let back = value(i);
            let err = (back as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err < 0.02, "{v} -> {back}");
        }
    }

    #[test]
    fn percentiles_merge() {
        let mut a = Hist::default();
        let mut b = Hist::default();
        for v in 1..=500 {
            a.record(v * 1000);
        }
        for v in 501..=1000 {
            b.record(v * 1000);
        }
        a.merge(&b);
        assert_eq!(a.count, 1000);
        assert_eq!(a.max, 1_000_000);
        let p50 = a.percentile(50.0) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.02, "{p50}");
        let json = serde_json::to_string(&a).unwrap();
        let back: Hist = serde_json::from_str(&json).unwrap();
        assert_eq!(back, a);
    }
}
