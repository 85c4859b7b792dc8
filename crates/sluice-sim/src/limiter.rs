//! The simulator's rate limiter: continuously refilled token buckets plus a concurrency
//! cap, admitted all-or-nothing under one short `std::sync::Mutex` section.

use std::time::Duration;

use tokio::time::Instant;

use crate::SimConfig;

/// Admissions within this much of the needed level are allowed, so a client that waits
/// exactly the advertised time is not refused over floating-point dust.
const EPSILON: f64 = 1e-6;

/// One continuously refilled bucket.
#[derive(Clone, Debug)]
pub(crate) struct Bucket {
    pub limit: u32,
    capacity: f64,
    rate: f64,
    level: f64,
    last: Instant,
}

impl Bucket {
    fn new(limit: u32, burst_seconds: f64, now: Instant) -> Bucket {
        let rate = f64::from(limit) / 60.0;
        let capacity = (burst_seconds * rate).max(f64::MIN_POSITIVE);
        Bucket {
            limit,
            capacity,
            rate,
            level: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.level = (self.level + dt * self.rate).min(self.capacity);
        self.last = now;
    }

    /// `None` if `cost` can be taken now, else how long until it can.
    fn wait_for(&self, cost: f64) -> Option<Duration> {
        if cost <= 0.0 {
            return None;
        }
        let need = cost.min(self.capacity);
        if self.level + EPSILON >= need {
            None
        } else if self.rate <= 0.0 {
            Some(Duration::from_secs(3600))
        } else {
            Some(Duration::from_secs_f64((need - self.level) / self.rate))
        }
    }

    fn refund(&mut self, amount: f64) {
        if amount > 0.0 {
            self.level = (self.level + amount).min(self.capacity);
        }
    }

    fn fill(&mut self, now: Instant) {
        self.level = self.capacity;
        self.last = now;
    }

    /// What the rate-limit headers report.
    fn view(&self) -> BucketView {
        let until_full = if self.rate > 0.0 {
            Duration::from_secs_f64(((self.capacity - self.level) / self.rate).max(0.0))
        } else {
            Duration::ZERO
        };
        BucketView {
            limit: self.limit,
            remaining: self.level.max(0.0).floor() as u64,
            until_full,
        }
    }
}

/// The rate-limit state of one bucket, as reported in headers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BucketView {
    pub limit: u32,
    pub remaining: u64,
    pub until_full: Duration,
}

/// All configured buckets as seen at one instant.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct LimitView {
    pub requests: Option<BucketView>,
    pub tokens: Option<BucketView>,
    pub input_tokens: Option<BucketView>,
    pub output_tokens: Option<BucketView>,
}

/// What a request is charged on admission.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Cost {
    /// Charged to the tokens bucket.
    pub tokens: u64,
    /// Charged to the input-tokens bucket (Anthropic only).
    pub input_tokens: u64,
    /// Charged to the output-tokens bucket (Anthropic only).
    pub output_tokens: u64,
}

/// Which limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LimitKind {
    Requests,
    Tokens,
    InputTokens,
    OutputTokens,
    Concurrency,
}

/// A refusal: the limit with the longest wait, and that wait.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rejection {
    pub kind: LimitKind,
    pub wait: Duration,
    pub limit: u32,
    pub used: u64,
    pub requested: u64,
}

pub(crate) struct Limiter {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    input_tokens: Option<Bucket>,
    output_tokens: Option<Bucket>,
    concurrency: Option<u32>,
    active: u32,
    concurrency_wait: Duration,
}

impl Limiter {
    pub fn new(config: &SimConfig) -> Limiter {
        let now = Instant::now();
        let b = |l: Option<u32>| l.map(|l| Bucket::new(l, config.burst_seconds, now));
        Limiter {
            requests: b(config.rpm),
            tokens: b(config.tpm),
            input_tokens: b(config.itpm),
            output_tokens: b(config.otpm),
            concurrency: config.concurrency,
            active: 0,
            concurrency_wait: config.latency.max(Duration::from_millis(10)),
        }
    }

    fn buckets(&mut self) -> [(LimitKind, Option<&mut Bucket>); 4] {
        [
            (LimitKind::Requests, self.requests.as_mut()),
            (LimitKind::Tokens, self.tokens.as_mut()),
            (LimitKind::InputTokens, self.input_tokens.as_mut()),
            (LimitKind::OutputTokens, self.output_tokens.as_mut()),
        ]
    }

    /// Admit a request costing `cost` (plus one request), taking a concurrency slot, or
    /// refuse it without charging anything.
    pub fn admit(&mut self, cost: Cost, now: Instant) -> Result<(), Rejection> {
        let costs = [
            1.0,
            cost.tokens as f64,
            cost.input_tokens as f64,
            cost.output_tokens as f64,
        ];
        let mut worst: Option<Rejection> = None;
        for ((kind, bucket), c) in self.buckets().into_iter().zip(costs) {
            let Some(bucket) = bucket else { continue };
            bucket.refill(now);
            if let Some(wait) = bucket.wait_for(c) {
                if worst.is_none_or(|w| wait > w.wait) {
                    worst = Some(Rejection {
                        kind,
                        wait,
                        limit: bucket.limit,
                        used: (bucket.capacity - bucket.level).max(0.0).ceil() as u64,
                        requested: c as u64,
                    });
                }
            }
        }
        if worst.is_none() {
            if let Some(max) = self.concurrency {
                if self.active >= max {
                    worst = Some(Rejection {
                        kind: LimitKind::Concurrency,
                        wait: self.concurrency_wait,
                        limit: max,
                        used: u64::from(self.active),
                        requested: 1,
                    });
                }
            }
        }
        if let Some(r) = worst {
            return Err(r);
        }
        for ((_, bucket), c) in self.buckets().into_iter().zip(costs) {
            if let Some(bucket) = bucket {
                bucket.level -= c;
            }
        }
        self.active += 1;
        Ok(())
    }

    /// Give back a concurrency slot taken by [`Limiter::admit`].
    pub fn release(&mut self) {
        self.active = self.active.saturating_sub(1);
    }

    /// Settle a successful request: refund what was charged beyond actual usage.
    pub fn settle(&mut self, charged: Cost, actual: Cost, now: Instant) {
        let refunds = [
            charged.tokens.saturating_sub(actual.tokens),
            charged.input_tokens.saturating_sub(actual.input_tokens),
            charged.output_tokens.saturating_sub(actual.output_tokens),
        ];
        let buckets = [
            self.tokens.as_mut(),
            self.input_tokens.as_mut(),
            self.output_tokens.as_mut(),
        ];
        for (bucket, r) in buckets.into_iter().zip(refunds) {
            if let Some(b) = bucket {
                b.refill(now);
                b.refund(r as f64);
            }
        }
    }

    /// Refill every bucket to capacity.
    pub fn fill(&mut self, now: Instant) {
        for (_, b) in self.buckets() {
            if let Some(b) = b {
                b.fill(now);
            }
        }
    }

    /// Whether any header-visible limit is configured.
    pub fn any(&self) -> bool {
        self.requests.is_some()
            || self.tokens.is_some()
            || self.input_tokens.is_some()
            || self.output_tokens.is_some()
    }

    /// The header view at `now`.
    pub fn view(&mut self, now: Instant) -> LimitView {
        let v = |b: &mut Option<Bucket>| {
            b.as_mut().map(|b| {
                b.refill(now);
                b.view()
            })
        };
        LimitView {
            requests: v(&mut self.requests),
            tokens: v(&mut self.tokens),
            input_tokens: v(&mut self.input_tokens),
            output_tokens: v(&mut self.output_tokens),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rpm: u32, tpm: u32) -> SimConfig {
        SimConfig {
            rpm: Some(rpm),
            tpm: Some(tpm),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_refills_continuously() {
        let mut l = Limiter::new(&cfg(600, 1_000_000));
        let now = Instant::now();
        for _ in 0..10 {
            l.admit(Cost::default(), now).unwrap();
            l.release();
        }
        let r = l.admit(Cost::default(), now).unwrap_err();
        assert_eq!(r.kind, LimitKind::Requests);
        assert!((r.wait.as_secs_f64() - 0.1).abs() < 1e-6);
        let later = now + Duration::from_millis(100);
        l.admit(Cost::default(), later).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn oversized_request_admitted_when_full() {
        let mut l = Limiter::new(&cfg(600, 60));
        let now = Instant::now();
        // capacity 1 token; cost 50 is admitted because the bucket is full
        l.admit(
            Cost {
                tokens: 50,
                ..Default::default()
            },
            now,
        )
        .unwrap();
        l.release();
        let r = l
            .admit(
                Cost {
                    tokens: 50,
                    ..Default::default()
                },
                now,
            )
            .unwrap_err();
        assert_eq!(r.kind, LimitKind::Tokens);
        // level is -49: needs 50 tokens at 1/s
        assert!((r.wait.as_secs_f64() - 50.0).abs() < 1e-6);
    }

    #[tokio::test(start_paused = true)]
    async fn settle_refunds_unused() {
        let mut l = Limiter::new(&cfg(600, 6000)); // capacity 100 tokens
        let now = Instant::now();
        let charged = Cost {
            tokens: 100,
            ..Default::default()
        };
        l.admit(charged, now).unwrap();
        assert_eq!(l.view(now).tokens.unwrap().remaining, 0);
        l.settle(
            charged,
            Cost {
                tokens: 30,
                ..Default::default()
            },
            now,
        );
        assert_eq!(l.view(now).tokens.unwrap().remaining, 70);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_cap() {
        let c = SimConfig {
            concurrency: Some(2),
            ..Default::default()
        };
        let mut l = Limiter::new(&c);
        let now = Instant::now();
        l.admit(Cost::default(), now).unwrap();
        l.admit(Cost::default(), now).unwrap();
        assert_eq!(
            l.admit(Cost::default(), now).unwrap_err().kind,
            LimitKind::Concurrency
        );
        l.release();
        l.admit(Cost::default(), now).unwrap();
    }
}
