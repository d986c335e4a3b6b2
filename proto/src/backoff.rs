//! Exponential back-off, defined once: the agent's restart delay for a
//! crashing instance and the controller's retry delay for a failed start
//! both double from their first delay up to a cap. Each caller keeps its
//! own first delay and cap; this module only does the arithmetic.

use std::time::Duration;

/// Doublings after which the delay stops growing before the cap (2^20
/// times the first delay is past any cap halo uses).
const MAX_DOUBLINGS: u32 = 20;

/// Delays that start at `initial` and double per failure up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Backoff {
    /// Starts at `initial`, never longer than `max`.
    pub const fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { initial, max }
    }

    /// The delay after the `failures`-th failure in a row:
    /// `initial` × 2^(failures − 1), capped at `max` (0 failures counts as
    /// the first). Saturates instead of overflowing.
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(MAX_DOUBLINGS);
        self.initial.saturating_mul(1 << exp).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn delays_double_from_the_first_up_to_the_cap() {
        // The controller's start retries: 500 ms doubling to 30 s.
        let b = Backoff::new(ms(500), Duration::from_secs(30));
        let got: Vec<Duration> = (1..=9).map(|f| b.delay(f)).collect();
        let want = [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000].map(ms);
        assert_eq!(got, want);
    }

    #[test]
    fn zero_failures_is_the_first_delay() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(b.delay(0), Duration::from_secs(1));
        assert_eq!(b.delay(1), Duration::from_secs(1));
        assert_eq!(b.delay(2), Duration::from_secs(2));
    }

    #[test]
    fn growth_stops_after_twenty_doublings_and_never_overflows() {
        let b = Backoff::new(ms(1), Duration::MAX);
        assert_eq!(b.delay(21), ms(1 << 20));
        assert_eq!(b.delay(u32::MAX), ms(1 << 20));
        let huge = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(huge.delay(u32::MAX), Duration::MAX);
    }

    #[test]
    fn a_cap_below_the_first_delay_wins() {
        let b = Backoff::new(Duration::from_secs(10), Duration::from_secs(3));
        assert_eq!(b.delay(1), Duration::from_secs(3));
    }
}
