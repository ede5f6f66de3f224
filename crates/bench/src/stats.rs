//! Latency histograms (microseconds) and the way they travel between processes.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency recorded exactly: one minute, in microseconds. Longer ones saturate.
const MAX_US: u64 = 60_000_000;

pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, took: Duration) {
    h.saturating_record(u64::try_from(took.as_micros()).unwrap_or(MAX_US).max(1));
}

pub fn record_us(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.max(1));
}

/// A histogram as (value, count) pairs: exact at the histogram's precision, and plain JSON.
pub type HistData = Vec<(u64, u64)>;

pub fn export(h: &Histogram<u64>) -> HistData {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

pub fn import(h: &mut Histogram<u64>, data: &HistData) {
    for &(value, count) in data {
        h.saturating_record_n(value, count);
    }
}

/// Counts by reason (errors, close codes), merged across processes.
pub type Counts = BTreeMap<String, u64>;

pub fn bump(counts: &mut Counts, reason: impl Into<String>) {
    *counts.entry(reason.into()).or_default() += 1;
}

pub fn merge(into: &mut Counts, from: &Counts) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

pub fn total(counts: &Counts) -> u64 {
    counts.values().sum()
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_export() {
        let mut a = new_hist();
        for us in [5, 50, 500, 5_000, 50_000, 120_000_000] {
            record_us(&mut a, us);
        }
        let mut b = new_hist();
        import(&mut b, &export(&a));
        assert_eq!(a.len(), b.len());
        assert_eq!(a.max(), b.max());
        assert_eq!(a.value_at_quantile(0.5), b.value_at_quantile(0.5));
        let p = Percentiles::of(&b);
        assert!(p.p50_ms <= p.p90_ms && p.p90_ms <= p.p99_ms && p.p99_ms <= p.max_ms);
        assert!(p.max_ms >= 59_000.0, "saturated at a minute: {p:?}");
    }
}
