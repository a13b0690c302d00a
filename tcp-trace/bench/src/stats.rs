//! Small statistics: a latency histogram with fixed memory, and median + spread over rounds.
use std::time::Duration;

/// Bucket width and count of the linear part: 5 µs buckets up to 50 ms. Slower samples are kept
/// exactly, so a long tail is reported as it is, not clipped.
const BUCKET_NS: u64 = 5_000;
const BUCKETS: usize = 10_000;

#[derive(Clone, Debug)]
pub struct Histogram {
    buckets: Vec<u64>,
    overflow: Vec<u64>,
    count: u64,
    max_ns: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: vec![0; BUCKETS],
            overflow: Vec::new(),
            count: 0,
            max_ns: 0,
        }
    }
}

impl Histogram {
    pub fn record(&mut self, ns: u64) {
        self.count += 1;
        self.max_ns = self.max_ns.max(ns);
        match usize::try_from(ns / BUCKET_NS) {
            Ok(i) if i < BUCKETS => self.buckets[i] += 1,
            _ => self.overflow.push(ns),
        }
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.overflow.extend_from_slice(&other.overflow);
        self.count += other.count;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    /// The `q` quantile (0..=1): the upper edge of its bucket, or the exact value past 50 ms.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let upper = (i as u64 + 1) * BUCKET_NS;
                return Some(Duration::from_nanos(upper.min(self.max_ns)));
            }
        }
        let mut tail = self.overflow.clone();
        tail.sort_unstable();
        let at = (rank - seen - 1) as usize;
        tail.get(at).map(|&ns| Duration::from_nanos(ns))
    }
}

/// Median and range of one figure over the rounds of a phase.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len().is_multiple_of(2) {
            (v[mid - 1] + v[mid]) / 2.0
        } else {
            v[mid]
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[v.len() - 1],
            n: v.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_quantiles_come_from_buckets_and_the_exact_tail() {
        let mut h = Histogram::default();
        for us in 1..=99 {
            h.record(us * 1_000);
        }
        h.record(80_000_000);
        // 50 µs falls in the [50, 55) µs bucket, reported by its upper edge.
        assert_eq!(h.quantile(0.5), Some(Duration::from_micros(55)));
        assert_eq!(h.quantile(1.0), Some(Duration::from_millis(80)));
    }

    #[test]
    fn spread_is_the_median_and_range_of_finite_values() {
        let s = Spread::of([3.0, 1.0, 2.0, 10.0, f64::NAN]).expect("values");
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 10.0, 4));
    }
}
