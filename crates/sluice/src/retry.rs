//! How long to wait before trying again, and how many times.

use rand::Rng;
use std::time::Duration;

/// Retry budgets and waits.
///
/// Transient failures (5xx, 529, timeouts, dropped connections, truncated bodies) count
/// against `max_attempts` and back off exponentially with full jitter. 429 rate limits
/// count against `max_rate_limit_waits` instead, and wait for the shared cooldown with no
/// backoff stacked on top.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts that may fail transiently before the request fails (429s not counted).
    pub max_attempts: u32,
    /// 429s a request may wait out before it fails.
    pub max_rate_limit_waits: u32,
    /// The first backoff's upper bound; each later one doubles it.
    pub backoff_base: Duration,
    /// No backoff is longer than this.
    pub backoff_max: Duration,
    /// The cooldown after a 429 that says nothing about how long to wait; doubles for each
    /// further cooldown before a success.
    pub cooldown_base: Duration,
    /// No cooldown without a Retry-After is longer than this.
    pub cooldown_max: Duration,
    /// A Retry-After longer than this is cut to it, so one odd header cannot stall a run.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            max_rate_limit_waits: 30,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            cooldown_base: Duration::from_millis(250),
            cooldown_max: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The wait before retrying after the `failures`-th transient failure (1-based): uniform
    /// in `[0, min(backoff_max, backoff_base * 2^(failures-1))]` ("full jitter").
    pub fn backoff(&self, failures: u32, rng: &mut impl Rng) -> Duration {
        let exp = failures.saturating_sub(1).min(30);
        let ceiling = self
            .backoff_base
            .saturating_mul(1u32 << exp)
            .min(self.backoff_max);
        ceiling.mul_f64(rng.random::<f64>())
    }

    /// The cooldown for a 429 without Retry-After, when `streak` cooldowns came before it
    /// with no success in between.
    pub fn default_cooldown(&self, streak: u32) -> Duration {
        self.cooldown_base
            .saturating_mul(1u32 << streak.min(30))
            .min(self.cooldown_max)
    }

    /// A provider-requested wait, bounded by `max_retry_after`.
    pub fn bound_retry_after(&self, wait: Duration) -> Duration {
        wait.min(self.max_retry_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn full_jitter_stays_under_the_exponential_cap() {
        let p = RetryPolicy::default();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        for failures in 1..12 {
            let cap = p
                .backoff_base
                .saturating_mul(1 << (failures - 1))
                .min(p.backoff_max);
            let mut max_seen = Duration::ZERO;
            for _ in 0..200 {
                let d = p.backoff(failures, &mut rng);
                assert!(d <= cap);
                max_seen = max_seen.max(d);
            }
            assert!(max_seen > cap / 2, "jitter spans the range");
        }
    }

    #[test]
    fn cooldown_doubles_and_caps() {
        let p = RetryPolicy::default();
        assert_eq!(p.default_cooldown(0), Duration::from_millis(250));
        assert_eq!(p.default_cooldown(3), Duration::from_secs(2));
        assert_eq!(p.default_cooldown(20), Duration::from_secs(60));
        assert_eq!(
            p.bound_retry_after(Duration::from_secs(9999)),
            Duration::from_secs(300)
        );
    }
}
