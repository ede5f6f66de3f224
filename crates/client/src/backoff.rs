//! Reconnect delays: exponential backoff with full jitter.

use std::time::Duration;

/// Exponential backoff with full jitter: the n-th delay (from 0) is uniform in
/// `[0, min(max, base * 2^n)]`. Spreads a crowd of clients that lost their node at the same
/// instant over the whole window instead of bunching them at its edges.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The ceiling of the next delay.
    pub(crate) fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The next delay; each call doubles the ceiling up to `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        jitter(ceiling)
    }

    /// Failed attempts since the last reset.
    pub(crate) fn attempt(&self) -> u32 {
        self.attempt
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A uniformly random duration in `[0, max]`.
pub(crate) fn jitter(max: Duration) -> Duration {
    let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(fastrand::u64(0..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(20));
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(b.ceiling().as_millis());
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(20));
        }
        assert_eq!(
            ceilings,
            [
                500, 1000, 2000, 4000, 8000, 16000, 20000, 20000, 20000, 20000
            ]
        );
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(500));
        assert_eq!(b.attempt(), 0);
    }

    #[test]
    fn delays_are_spread_over_the_whole_window() {
        let mut low = 0;
        for _ in 0..1000 {
            let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(1));
            if d < Duration::from_millis(500) {
                low += 1;
            }
        }
        assert!((350..650).contains(&low), "{low} of 1000 below half");
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(30));
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
        let _ = jitter(Duration::MAX);
    }
}
