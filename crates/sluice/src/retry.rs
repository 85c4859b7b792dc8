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

/// When a model's circuit opens and how long it stays open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Consecutive transient failures (5xx, 529, timeouts, dropped connections) that
    /// open the circuit.
    pub threshold: u32,
    /// How long it stays open before one probe may go.
    pub cool_off: Duration,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            threshold: 5,
            cool_off: Duration::from_secs(30),
        }
    }
}

/// Where a circuit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests go; `failures` transient failures in a row so far.
    Closed {
        /// Consecutive transient failures.
        failures: u32,
    },
    /// Nothing goes until `until`.
    Open {
        /// When one probe may go.
        until: tokio::time::Instant,
    },
    /// One probe may go (or is out); its result closes or reopens the circuit.
    HalfOpen {
        /// Whether the probe is on the wire.
        probing: bool,
    },
}

/// A model's circuit breaker: opens after [`BreakerPolicy::threshold`] consecutive
/// transient failures, lets one probe through after [`BreakerPolicy::cool_off`], closes
/// on a success and reopens on a failure. Plain state owned by the scheduler; time comes
/// in as an argument.
#[derive(Clone, Debug)]
pub struct CircuitBreaker {
    policy: BreakerPolicy,
    state: BreakerState,
}

/// Why a breaker holds a request back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// Open: a probe may go at this instant.
    Until(tokio::time::Instant),
    /// Half-open with its probe on the wire: wait for its result.
    Probing,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(policy: BreakerPolicy) -> Self {
        CircuitBreaker {
            policy,
            state: BreakerState::Closed { failures: 0 },
        }
    }

    /// Where it is.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether a request may be sent at `now` (an open circuit whose cool-off is over
    /// becomes half-open here).
    pub fn check(&mut self, now: tokio::time::Instant) -> Result<(), Held> {
        match self.state {
            BreakerState::Closed { .. } => Ok(()),
            BreakerState::Open { until } if now >= until => {
                self.state = BreakerState::HalfOpen { probing: false };
                Ok(())
            }
            BreakerState::Open { until } => Err(Held::Until(until)),
            BreakerState::HalfOpen { probing: false } => Ok(()),
            BreakerState::HalfOpen { probing: true } => Err(Held::Probing),
        }
    }

    /// A request was sent (after [`check`](Self::check) allowed it).
    pub fn on_send(&mut self) {
        if let BreakerState::HalfOpen { .. } = self.state {
            self.state = BreakerState::HalfOpen { probing: true };
        }
    }

    /// The model answered (a success, or a refusal that shows it is up).
    pub fn on_success(&mut self) {
        self.state = BreakerState::Closed { failures: 0 };
    }

    /// A transient failure at `now`; returns whether the circuit is open after it.
    pub fn on_failure(&mut self, now: tokio::time::Instant) -> bool {
        let open = BreakerState::Open {
            until: now + self.policy.cool_off,
        };
        self.state = match self.state {
            BreakerState::Closed { failures } if failures + 1 < self.policy.threshold => {
                BreakerState::Closed {
                    failures: failures + 1,
                }
            }
            BreakerState::Open { until } => BreakerState::Open { until },
            _ => open,
        };
        matches!(self.state, BreakerState::Open { .. })
    }

    /// An attempt ended saying nothing about the model's health (a 429): a probe that
    /// got one leaves the circuit half-open for the next probe.
    pub fn on_neutral(&mut self) {
        if let BreakerState::HalfOpen { .. } = self.state {
            self.state = BreakerState::HalfOpen { probing: false };
        }
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
    fn breaker_opens_half_opens_with_one_probe_and_closes() {
        let t0 = tokio::time::Instant::now();
        let sec = Duration::from_secs(1);
        let mut b = CircuitBreaker::new(BreakerPolicy {
            threshold: 3,
            cool_off: Duration::from_secs(10),
        });
        assert!(!b.on_failure(t0) && !b.on_failure(t0));
        b.on_success();
        assert_eq!(
            b.state(),
            BreakerState::Closed { failures: 0 },
            "a success resets the count"
        );
        assert!(!b.on_failure(t0) && !b.on_failure(t0));
        assert!(b.on_failure(t0), "the third in a row opens it");
        let reopen = t0 + Duration::from_secs(10);
        assert_eq!(b.check(t0 + sec), Err(Held::Until(reopen)));
        // Cool-off over: one probe, and only one.
        assert_eq!(b.check(reopen), Ok(()));
        b.on_send();
        assert_eq!(b.check(reopen), Err(Held::Probing));
        // The probe fails: open again for a whole cool-off.
        assert!(b.on_failure(reopen + sec));
        assert_eq!(
            b.check(reopen + sec),
            Err(Held::Until(reopen + sec + Duration::from_secs(10)))
        );
        // Next probe gets a 429: still half-open, another probe may go.
        let later = reopen + Duration::from_secs(20);
        assert_eq!(b.check(later), Ok(()));
        b.on_send();
        b.on_neutral();
        assert_eq!(b.state(), BreakerState::HalfOpen { probing: false });
        assert_eq!(b.check(later), Ok(()));
        b.on_send();
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed { failures: 0 });
        assert_eq!(b.check(later), Ok(()));
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
