//! A log-linear latency histogram (HdrHistogram's bucket layout with 7 significant bits):
//! exact below 128, otherwise 64 linear sub-buckets per power of two, so any recorded value
//! is reported within 1/64 (1.6 %) of itself. Fixed size (3776 counters), no allocation on
//! record, mergeable.

const SUB_BITS: u32 = 7;
/// Values below this are counted exactly.
const EXACT: u64 = 1 << SUB_BITS;
const HALF: u64 = EXACT / 2;
/// Enough buckets for any u64.
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * HALF as usize + HALF as usize;

#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

fn index(v: u64) -> usize {
    if v < EXACT {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb + 1 - SUB_BITS;
    (u64::from(shift) * HALF + (v >> shift)) as usize
}

/// The lowest and highest value that land in bucket `idx`.
fn bounds(idx: usize) -> (u64, u64) {
    let idx = idx as u64;
    if idx < EXACT {
        return (idx, idx);
    }
    let shift = idx / HALF - 1;
    let top = idx % HALF + HALF;
    let low = u128::from(top) << shift;
    let high = (u128::from(top + 1) << shift) - 1;
    (
        u64::try_from(low).unwrap_or(u64::MAX),
        u64::try_from(high).unwrap_or(u64::MAX),
    )
}

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    pub fn record(&mut self, v: u64) {
        if let Some(c) = self.counts.get_mut(index(v)) {
            *c += 1;
        }
        self.total += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    pub fn min(&self) -> Option<u64> {
        (self.total > 0).then_some(self.min)
    }

    pub fn merge(&mut self, other: &Histogram) {
        if other.total == 0 {
            return;
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    pub fn reset(&mut self) {
        if self.total > 0 {
            self.counts.iter_mut().for_each(|c| *c = 0);
        }
        self.total = 0;
        self.min = u64::MAX;
        self.max = 0;
    }

    /// The smallest value v such that at least `p` percent of the recorded values are <= v
    /// (within the bucket precision, never above the largest value recorded). None if empty.
    pub fn percentile(&self, p: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let p = p.clamp(0.0, 100.0);
        let rank = ((p / 100.0 * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (idx, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                // The bucket holds a recorded value, so max >= its low bound.
                return Some(bounds(idx).1.min(self.max));
            }
        }
        Some(self.max)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_cover_u64() {
        assert_eq!(index(0), 0);
        assert_eq!(index(127), 127);
        assert_eq!(index(128), 128);
        assert_eq!(index(255), 191);
        assert_eq!(index(256), 192);
        assert_eq!(index(u64::MAX), BUCKETS - 1);
        let mut prev_high = None;
        for idx in 0..BUCKETS {
            let (low, high) = bounds(idx);
            assert!(low <= high);
            assert_eq!(index(low), idx, "low of {idx}");
            assert_eq!(index(high), idx, "high of {idx}");
            if let Some(p) = prev_high {
                assert_eq!(low, p + 1_u64, "gap before bucket {idx}");
            }
            prev_high = (high < u64::MAX).then_some(high);
        }
    }

    #[test]
    fn precision_is_within_one_in_64() {
        for v in [1_000u64, 12_345, 999_999, 1_234_567_890, 1 << 40] {
            let (low, high) = bounds(index(v));
            assert!(low <= v && v <= high);
            assert!(
                (high - low) as f64 / v as f64 <= 1.0 / 64.0,
                "{v}: {low}..{high}"
            );
        }
    }

    #[test]
    fn percentiles_of_a_uniform_range() {
        let mut h = Histogram::new();
        assert_eq!(h.percentile(50.0), None);
        for v in 1..=100u64 {
            h.record(v);
        }
        assert_eq!(h.count(), 100);
        assert_eq!(h.percentile(50.0), Some(50));
        assert_eq!(h.percentile(95.0), Some(95));
        assert_eq!(h.percentile(99.0), Some(99));
        assert_eq!(h.percentile(100.0), Some(100));
        assert_eq!(h.percentile(0.0), Some(1));
        assert_eq!(h.min(), Some(1));
        assert_eq!(h.max(), 100);
    }

    #[test]
    fn large_values_are_close_and_capped_at_max() {
        let mut h = Histogram::new();
        for _ in 0..99 {
            h.record(1_000_000);
        }
        h.record(50_000_000);
        let p50 = h.percentile(50.0).unwrap();
        assert!((p50 as f64 - 1e6).abs() / 1e6 < 1.0 / 64.0, "{p50}");
        assert_eq!(h.percentile(99.0), Some(p50));
        assert_eq!(h.percentile(99.5), Some(50_000_000));
        // A single value is reported exactly thanks to the max cap.
        let mut h = Histogram::new();
        h.record(123_456_789);
        assert_eq!(h.percentile(50.0), Some(123_456_789));
    }

    #[test]
    fn merge_and_reset() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        for v in 0..10 {
            a.record(v);
            b.record(v + 10);
        }
        a.merge(&b);
        assert_eq!(a.count(), 20);
        assert_eq!(a.percentile(50.0), Some(9));
        assert_eq!(a.max(), 19);
        assert_eq!(a.min(), Some(0));
        a.reset();
        assert_eq!(a.count(), 0);
        assert_eq!(a.percentile(50.0), None);
        assert_eq!(a.min(), None);
        a.merge(&Histogram::new());
        assert_eq!(a.count(), 0);
    }
}
