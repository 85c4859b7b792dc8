//! Admission control: requests per minute, tokens per minute (and Anthropic's separate
//! input- and output-token limits), and the coordinated cooldown after a 429 (invariants
//! 3 and 4 of DESIGN.md). Limits come from the settings, or are learned from the
//! provider's rate-limit headers ([`Limiter::learn`]).
//!
//! The limiter is plain state owned by the scheduler task; it never sleeps. The scheduler
//! asks [`Limiter::ready_at`] when the head of its queue may go, sleeps until then, and
//! calls [`Limiter::acquire`] when it sends. Time comes in as a [`tokio::time::Instant`], so
//! the whole thing runs under `tokio::time::pause()`.

use std::time::Duration;
use tokio::time::Instant;

use crate::provider::{LimitReading, RateLimits};

/// Learned limits pace at this share of what the headers announce, to leave room for the
/// difference between sluice's token estimates and the provider's counts.
pub const LEARNED_SHARE: f64 = 0.98;

/// Slack for float rounding when a bucket is checked exactly at its computed ready time.
const EPSILON: f64 = 1e-6;

/// A continuously refilled bucket: `rate` units a second, holding at most `capacity`.
///
/// It starts full. A request that costs more than the whole capacity is admitted when the
/// bucket is full and leaves it in debt, so no request can wait forever.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    level: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A bucket for `per_minute` units a minute, with `burst` worth of them available at
    /// once (at least one unit).
    pub fn per_minute(per_minute: f64, burst: Duration, now: Instant) -> Self {
        let rate = per_minute / 60.0;
        let capacity = (rate * burst.as_secs_f64()).max(1.0);
        TokenBucket {
            rate,
            capacity,
            level: capacity,
            updated: now,
        }
    }

    /// Units a second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The most units available at once.
    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    /// Units available now.
    pub fn level(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.level
    }

    fn refill(&mut self, now: Instant) {
        if now > self.updated {
            let elapsed = (now - self.updated).as_secs_f64();
            self.level = (self.level + elapsed * self.rate).min(self.capacity);
            self.updated = now;
        }
    }

    /// When `cost` units will be available (now, if they are).
    pub fn available_at(&mut self, cost: f64, now: Instant) -> Instant {
        self.refill(now);
        let need = cost.min(self.capacity);
        if self.level + EPSILON >= need {
            now
        } else {
            now + Duration::from_secs_f64((need - self.level) / self.rate)
        }
    }

    /// Takes `cost` units (the caller checked [`available_at`](Self::available_at)).
    pub fn take(&mut self, cost: f64, now: Instant) {
        self.refill(now);
        self.level -= cost;
    }

    /// Gives back `reserved - actual` when a request turned out cheaper than reserved (or
    /// takes the difference when it was dearer).
    pub fn settle(&mut self, reserved: f64, actual: f64, now: Instant) {
        self.refill(now);
        self.level = (self.level + reserved - actual).min(self.capacity);
    }

    /// Paces at `per_minute` from now on, keeping the time span of its burst.
    pub fn set_rate(&mut self, per_minute: f64, burst: Duration, now: Instant) {
        self.refill(now);
        self.rate = per_minute / 60.0;
        self.capacity = (self.rate * burst.as_secs_f64()).max(1.0);
        self.level = self.level.min(self.capacity);
    }

    /// Never more available than `remaining` (what the provider says is left).
    pub fn cap_level(&mut self, remaining: f64, now: Instant) {
        self.refill(now);
        self.level = self.level.min(remaining);
    }
}

/// What a request reserves against token limits: its input estimate and its output bound.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tokens {
    /// Input tokens (estimated).
    pub input: u64,
    /// Output tokens (the bound), or the actual count when settling.
    pub output: u64,
}

impl Tokens {
    /// Input and output together.
    pub fn total(self) -> u64 {
        self.input + self.output
    }
}

/// A cooldown the limiter started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cooldown {
    /// The generation of the attempt whose 429 started it.
    pub trigger_generation: u64,
    /// The generation it starts (attempts sent after it carry this).
    pub generation: u64,
    /// Nothing is sent before this instant.
    pub until: Instant,
}

/// Requests-per-minute and tokens-per-minute buckets (input and output tokens apart
/// when the provider limits them apart), and the shared cooldown.
#[derive(Clone, Debug)]
pub struct Limiter {
    rpm: Option<TokenBucket>,
    tpm: Option<TokenBucket>,
    itpm: Option<TokenBucket>,
    otpm: Option<TokenBucket>,
    /// Which of rpm, tpm, itpm, otpm were learned (the rest were configured and are kept).
    learned: [bool; 4],
    burst: Duration,
    pause_until: Option<Instant>,
    generation: u64,
}

impl Limiter {
    /// A limiter for the given limits (either may be absent), with buckets of `burst`.
    pub fn new(rpm: Option<f64>, tpm: Option<f64>, burst: Duration, now: Instant) -> Self {
        Limiter {
            rpm: rpm.map(|r| TokenBucket::per_minute(r, burst, now)),
            tpm: tpm.map(|t| TokenBucket::per_minute(t, burst, now)),
            itpm: None,
            otpm: None,
            learned: [false; 4],
            burst,
            pause_until: None,
            generation: 0,
        }
    }

    /// Takes in the limits a response's headers announce. A limit that was not configured
    /// gets a bucket at [`LEARNED_SHARE`] of it, starting conservatively from what the
    /// provider says is left; a learned one follows later announcements of the limit.
    /// Later `remaining` figures are not applied: they were counted when the attempt was
    /// admitted, a latency ago, before the refills and refunds since, and capping by them
    /// halves throughput (measured). Configured limits are left alone. Returns whether
    /// any limit is now known.
    pub fn learn(&mut self, limits: &RateLimits, now: Instant) -> bool {
        let readings: [Option<LimitReading>; 4] = [
            limits.requests,
            limits.tokens,
            limits.input_tokens,
            limits.output_tokens,
        ];
        let burst = self.burst;
        for (i, reading) in readings.into_iter().enumerate() {
            let Some(r) = reading.filter(|r| r.limit > 0) else {
                continue;
            };
            let rate = r.limit as f64 * LEARNED_SHARE;
            let slot = match i {
                0 => &mut self.rpm,
                1 => &mut self.tpm,
                2 => &mut self.itpm,
                _ => &mut self.otpm,
            };
            match slot {
                None => {
                    let mut b = TokenBucket::per_minute(rate, burst, now);
                    b.cap_level(r.remaining as f64, now);
                    *slot = Some(b);
                    self.learned[i] = true;
                }
                Some(b) if self.learned[i] => {
                    if (b.rate() * 60.0 - rate).abs() > 1e-9 {
                        b.set_rate(rate, burst, now);
                    }
                }
                Some(_) => {}
            }
        }
        self.rpm.is_some() || self.tpm.is_some() || self.itpm.is_some() || self.otpm.is_some()
    }

    /// The requests-per-minute and tokens-per-minute rates paced at now (configured or
    /// learned).
    pub fn rates(&self) -> (Option<f64>, Option<f64>) {
        (
            self.rpm.as_ref().map(|b| b.rate() * 60.0),
            self.tpm.as_ref().map(|b| b.rate() * 60.0),
        )
    }

    /// The cooldown generation: bumped by every cooldown. Attempts record it when sent.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The end of the current cooldown, if one is running at `now`.
    pub fn paused_until(&self, now: Instant) -> Option<Instant> {
        self.pause_until.filter(|p| *p > now)
    }

    /// When a request reserving `tokens` may be sent: after any cooldown, and when every
    /// bucket holds enough.
    pub fn ready_at(&mut self, tokens: Tokens, now: Instant) -> Instant {
        let mut at = now;
        if let Some(p) = self.pause_until {
            at = at.max(p);
        }
        if let Some(b) = &mut self.rpm {
            at = at.max(b.available_at(1.0, now));
        }
        if let Some(b) = &mut self.tpm {
            at = at.max(b.available_at(tokens.total() as f64, now));
        }
        if let Some(b) = &mut self.itpm {
            at = at.max(b.available_at(tokens.input as f64, now));
        }
        if let Some(b) = &mut self.otpm {
            at = at.max(b.available_at(tokens.output as f64, now));
        }
        at
    }

    /// Takes one request and `tokens` from the buckets.
    pub fn acquire(&mut self, tokens: Tokens, now: Instant) {
        debug_assert!(self.ready_at(tokens, now) <= now, "acquire before ready");
        if let Some(b) = &mut self.rpm {
            b.take(1.0, now);
        }
        if let Some(b) = &mut self.tpm {
            b.take(tokens.total() as f64, now);
        }
        if let Some(b) = &mut self.itpm {
            b.take(tokens.input as f64, now);
        }
        if let Some(b) = &mut self.otpm {
            b.take(tokens.output as f64, now);
        }
    }

    /// Settles a reservation to the `actual` usage the provider reported.
    pub fn settle(&mut self, reserved: Tokens, actual: Tokens, now: Instant) {
        if let Some(b) = &mut self.tpm {
            b.settle(reserved.total() as f64, actual.total() as f64, now);
        }
        if let Some(b) = &mut self.itpm {
            b.settle(reserved.input as f64, actual.input as f64, now);
        }
        if let Some(b) = &mut self.otpm {
            b.settle(reserved.output as f64, actual.output as f64, now);
        }
    }

    /// A 429 arrived for an attempt sent in `sent_generation`, asking to wait `wait`.
    ///
    /// If that attempt was sent in the current generation, this is the first 429 of a
    /// burst: pause until `now + wait` (never shortening a running pause) and start a new
    /// generation. A 429 from an older generation belongs to a burst that already has its
    /// cooldown, so it changes nothing: it can never restart an expired cooldown.
    pub fn on_rate_limited(
        &mut self,
        sent_generation: u64,
        wait: Duration,
        now: Instant,
    ) -> Option<Cooldown> {
        if sent_generation != self.generation {
            return None;
        }
        let until = self.pause_until.map_or(now + wait, |p| p.max(now + wait));
        self.pause_until = Some(until);
        self.generation += 1;
        Some(Cooldown {
            trigger_generation: sent_generation,
            generation: self.generation,
            until,
        })
    }
}

/// How many attempts may be in flight when no rate limit is known, adapted like TCP's
/// congestion window in slow start: the first 429 of a burst halves it, and each success
/// grows it by one (so it doubles every round trip) up to the configured concurrency.
///
/// Without it, a run whose rate limit is unknown releases every queued request the moment
/// a cooldown ends, and all but the first few meet another 429: the herd never shrinks.
/// With a known limit the bucket paces the release instead, and the engine does not use
/// the window: a stray 429 should not cut throughput for minutes (measured: halving on
/// random 429s with a slow linear regrowth took a paced run to 5× its ideal time).
#[derive(Clone, Debug)]
pub struct SendWindow {
    size: f64,
    max: f64,
}

impl SendWindow {
    /// A window that starts fully open at `max` attempts.
    pub fn new(max: usize) -> Self {
        let max = max.max(1) as f64;
        SendWindow { size: max, max }
    }

    /// A window that starts at `initial` attempts and grows to `max` (slow start: when
    /// the limit is about to be learned from the first responses, sending a whole
    /// window blind would only collect 429s).
    pub fn starting_at(initial: usize, max: usize) -> Self {
        let max = max.max(1) as f64;
        SendWindow {
            size: (initial.max(1) as f64).min(max),
            max,
        }
    }

    /// Whether one more attempt may go out while `in_flight` are out. One always may when
    /// none is.
    pub fn allows(&self, in_flight: usize) -> bool {
        (in_flight as f64) < self.size.floor().max(1.0)
    }

    /// The current size.
    pub fn size(&self) -> f64 {
        self.size
    }

    /// An attempt succeeded.
    pub fn on_success(&mut self) {
        self.size = (self.size + 1.0).min(self.max);
    }

    /// A burst of 429s began while `in_flight` attempts were out.
    pub fn on_cooldown(&mut self, in_flight: usize) {
        self.size = (in_flight as f64 / 2.0).max(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bucket_paces_after_its_burst() {
        let t0 = Instant::now();
        // 600/min = 10/s, burst 0.5 s = 5.
        let mut b = TokenBucket::per_minute(600.0, Duration::from_millis(500), t0);
        assert_eq!(b.capacity(), 5.0);
        for _ in 0..5 {
            assert_eq!(b.available_at(1.0, t0), t0);
            b.take(1.0, t0);
        }
        let next = b.available_at(1.0, t0);
        assert_eq!(next - t0, Duration::from_millis(100));
        // Refills continuously, capped at capacity.
        assert!((b.level(t0 + Duration::from_secs(60)) - 5.0).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn oversized_request_waits_for_a_full_bucket_then_goes_into_debt() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_minute(600.0, Duration::from_secs(1), t0); // cap 10
        b.take(10.0, t0);
        let at = b.available_at(50.0, t0);
        assert_eq!(at - t0, Duration::from_secs(1), "needs only a full bucket");
        b.take(50.0, at);
        assert!(b.level(at) < 0.0);
    }

    #[tokio::test(start_paused = true)]
    async fn settle_refunds_unused_reservation_up_to_capacity() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_minute(6000.0, Duration::from_secs(1), t0); // cap 100
        b.take(80.0, t0);
        b.settle(80.0, 30.0, t0);
        assert!((b.level(t0) - 70.0).abs() < 1e-9);
        b.settle(80.0, 0.0, t0);
        assert!((b.level(t0) - 100.0).abs() < 1e-9, "capped");
    }

    #[test]
    fn window_halves_on_a_burst_and_grows_back() {
        let mut w = SendWindow::new(64);
        assert!(w.allows(63) && !w.allows(64));
        w.on_cooldown(40);
        assert_eq!(w.size(), 20.0);
        assert!(!w.allows(20));
        // One more per success: a window's worth of successes doubles it.
        for _ in 0..20 {
            w.on_success();
        }
        assert_eq!(w.size(), 40.0);
        // A burst with one attempt out still leaves room for one.
        w.on_cooldown(1);
        assert_eq!(w.size(), 1.0);
        assert!(w.allows(0) && !w.allows(1));
        // Never past the maximum.
        let mut w = SendWindow::new(8);
        w.on_cooldown(2);
        for _ in 0..1000 {
            w.on_success();
        }
        assert_eq!(w.size(), 8.0);
    }

    #[tokio::test(start_paused = true)]
    async fn learns_unconfigured_limits_from_headers_and_keeps_configured_ones() {
        let t0 = Instant::now();
        let reading = |limit, remaining| {
            Some(LimitReading {
                limit,
                remaining,
                reset: Duration::ZERO,
            })
        };
        // RPM configured at 6000; TPM, input and output tokens unknown.
        let mut l = Limiter::new(Some(6000.0), None, Duration::from_secs(1), t0);
        assert!(l.learn(
            &RateLimits {
                requests: reading(6000, 6000),
                tokens: None,
                input_tokens: reading(60_000, 500),
                output_tokens: reading(6_000, 6_000),
            },
            t0
        ));
        assert_eq!(l.rates(), (Some(6000.0), None), "the configured RPM stays");
        // Input tokens: 980/s, but only 500 left now.
        let big_input = Tokens {
            input: 800,
            output: 10,
        };
        let at = l.ready_at(big_input, t0);
        let wait = (at - t0).as_secs_f64();
        assert!((wait - 300.0 / 980.0).abs() < 1e-3, "{wait}");
        // Output tokens are paced apart: 98/s with a one-second burst.
        let long_output = Tokens {
            input: 1,
            output: 98,
        };
        assert_eq!(l.ready_at(long_output, t0), t0);
        l.acquire(long_output, t0);
        let at = l.ready_at(long_output, t0);
        assert!(((at - t0).as_secs_f64() - 1.0).abs() < 1e-3);
        // A later announcement changes the learned rate (and the burst with it).
        let t2 = t0 + Duration::from_secs(2);
        l.learn(
            &RateLimits {
                output_tokens: reading(600, 0),
                ..RateLimits::default()
            },
            t2,
        );
        let all = Tokens {
            input: 0,
            output: 9,
        };
        assert_eq!(l.ready_at(all, t2), t2, "a full bucket of the new size");
        l.acquire(all, t2);
        let at = l.ready_at(
            Tokens {
                input: 0,
                output: 5,
            },
            t2,
        );
        let wait = (at - t2).as_secs_f64();
        assert!((wait - (5.0 - 0.8) / 9.8).abs() < 1e-3, "{wait}");
        // Settling refunds each bucket its own way.
        l.settle(
            Tokens {
                input: 0,
                output: 5,
            },
            Tokens {
                input: 0,
                output: 0,
            },
            t0 + Duration::from_secs(2),
        );
        let mut none = Limiter::new(None, None, Duration::from_secs(1), t0);
        assert!(
            !none.learn(&RateLimits::default(), t0),
            "nothing announced, nothing known"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_cooldown_per_generation_and_late_429s_do_nothing() {
        let t0 = Instant::now();
        let mut l = Limiter::new(None, None, Duration::from_secs(1), t0);
        let g = l.generation();
        let c = l
            .on_rate_limited(g, Duration::from_secs(2), t0)
            .expect("first 429 cools down");
        assert_eq!(c.until, t0 + Duration::from_secs(2));
        // The other in-flight requests of the same burst report their 429s.
        for _ in 0..10 {
            assert!(l.on_rate_limited(g, Duration::from_secs(30), t0).is_none());
        }
        assert_eq!(
            l.ready_at(Tokens::default(), t0),
            t0 + Duration::from_secs(2)
        );
        // After it expired, a late 429 from the old generation does not restart it.
        let later = t0 + Duration::from_secs(5);
        assert!(l
            .on_rate_limited(g, Duration::from_secs(2), later)
            .is_none());
        assert_eq!(l.ready_at(Tokens::default(), later), later);
        assert_eq!(l.paused_until(later), None);
        // A 429 from the new generation starts the next cooldown.
        assert!(l
            .on_rate_limited(l.generation(), Duration::from_secs(1), later)
            .is_some());
        assert_eq!(l.paused_until(later), Some(later + Duration::from_secs(1)));
    }
}
