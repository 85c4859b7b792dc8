//! The scheduler: one task owns every request's state and the limiters (invariant 2):
//! one lane per model, each with its own limiter, cooldowns, send window and queue, since
//! providers limit each model apart.
//!
//! Each request is a small state machine:
//!
//! ```text
//!            admit                  limiter allows        2xx / permanent / quota
//! input ───────────► Ready ─────────────────────► InFlight ──────────────────────► outcome
//!                      ▲                              │
//!                      │  429: the model's cooldown   │
//!                      ├──────────────────────────────┤
//!                      │  transient: backoff timer    │
//!                      └──── Waiting ◄────────────────┘
//! ```
//!
//! A request holds one concurrency slot from admission to its outcome, retries included,
//! so a retry never takes a second slot. Input is pulled only while a slot is free, so
//! memory is bounded by the concurrency (plus the reorder window in input order), never by
//! the input's length. HTTP attempts run as spawned tasks that classify their own response
//! and report back over a channel; the scheduler reacts to reports, input, timers and a stop
//! signal, and sleeps until the next of them, never polling (invariant 6). The run ends when
//! the input is exhausted and no request is live (invariant 1): a state, not a counter.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use rustc_hash::FxHashMap;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cost::Price;
use crate::limiter::{Limiter, SendWindow, Tokens};
use crate::outcome::{ErrorInfo, ErrorKind, Outcome, Status};
use crate::provider::RateLimits;
use crate::provider::{classify, Transport, TransportError, Verdict};
use crate::request::Request;
use crate::retry::{BreakerPolicy, CircuitBreaker, Held, RetryPolicy};
use crate::wake::{WakeGrid, MIN_PER_STEP};

/// In which order outcomes come out of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Order {
    /// As soon as each request ends: lowest memory.
    #[default]
    Completion,
    /// In input order, through a bounded reordering buffer.
    Input,
}

/// Everything that shapes a run. Build it with [`EngineConfig::builder`].
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Requests per minute, or no limit.
    pub rpm: Option<f64>,
    /// Tokens per minute (input estimate + max output, settled to usage), or no limit.
    pub tpm: Option<f64>,
    /// Requests live at once (in flight or waiting to retry).
    pub concurrency: usize,
    /// Retry budgets and waits.
    pub retry: RetryPolicy,
    /// How long one attempt may take, response body included.
    pub attempt_timeout: Duration,
    /// How long a request may take from admission to outcome, waiting included.
    pub deadline: Option<Duration>,
    /// How much of the RPM/TPM rate may go out at once: the buckets' capacity in time.
    pub burst: Duration,
    /// Outcome order.
    pub order: Order,
    /// In [`Order::Input`], the most requests admitted ahead of the oldest one not yet
    /// emitted.
    pub reorder_window: usize,
    /// Seed of the backoff jitter.
    pub seed: u64,
    /// Waits for the rate limiter end on a grid of this step, so that one wake-up sends
    /// every request that became due since the last (at 100 requests/s and 100 ms, ten at
    /// a time). The buckets still bound what is sent; a request waits at most one step
    /// longer. Zero: wake for each request.
    pub send_quantum: Duration,
    /// Spend limit in US dollars. No attempt is sent unless the money already spent plus
    /// the worst-case cost of every attempt in flight, its own included, stays within it
    /// (see [`worst_case_cost`]); when the next request cannot fit even with nothing in
    /// flight, the run stops with [`StopReason::BudgetExhausted`]. Requests of models
    /// without a price count as free.
    pub budget_usd: Option<f64>,
    /// With a budget, where a bound on what the run may have spent, the worst case of its
    /// attempts in flight included, is made durable before any attempt goes out that
    /// would pass the last bound recorded. After a crash, neither what was on the wire nor
    /// the answers not yet kept by the caller are known to have cost nothing: a resume
    /// counts the bound as spent (see [`ExposureGate`]). `None`: nothing is recorded.
    pub exposure: Option<ExposureGate>,
    /// One circuit breaker per model: while a model's circuit is open its requests move
    /// to their fallback model ([`Request::fallback`]) or wait for the probe. `None`: no
    /// breakers (a request still falls back on a model-specific permanent error).
    pub breaker: Option<BreakerPolicy>,
    /// Learn the limits not set here (requests, tokens, and Anthropic's input and output
    /// tokens) from the provider's rate-limit headers, and pace by them
    /// ([`Limiter::learn`]). Until a response announces one, the send window finds it.
    pub learn_limits: bool,
    /// The runtime's park hook to drive (see [`crate::wake`]): while a rate limit holds
    /// requests back and they go out at least [`MIN_PER_STEP`] per step, the thread
    /// sleeps to the send grid before it waits for I/O, so that one wake-up reads every
    /// response that arrived since the last. `None`: each response wakes the process
    /// (the default; the CLI installs one).
    pub wake_grid: Option<WakeGrid>,
}

/// Records, durably, a bound on what a run may have spent: the cost of its answers and the
/// worst case of its attempts in flight (as the budget reserves it). The engine calls it
/// before an attempt would take that past the bound recorded before, with the new bound;
/// false when it could not be recorded (the run then stops, [`StopReason::Failed`]).
/// Each new bound has room for a quarter more than is in flight, or a 64th of the
/// budget, whichever is more ([`exposure_bound`]): a run records some dozens at most.
#[derive(Clone)]
pub struct ExposureGate(Arc<dyn Fn(f64) -> bool + Send + Sync>);

impl ExposureGate {
    /// A gate that records a bound with `record`.
    pub fn new(record: impl Fn(f64) -> bool + Send + Sync + 'static) -> Self {
        ExposureGate(Arc::new(record))
    }
}

impl std::fmt::Debug for ExposureGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExposureGate")
    }
}

/// The bound an [`ExposureGate`] is asked to record when `spent` and the worst case of the
/// attempts in flight (`in_flight`, the next one's included) would pass the last: room
/// for a quarter more in flight, or a 64th of the `budget` if more, and never past it.
pub fn exposure_bound(spent: f64, in_flight: f64, budget: f64) -> f64 {
    let need = spent + in_flight;
    (need + (in_flight / 4.0).max(budget / 64.0))
        .min(budget)
        .max(need)
}

/// The input-token estimate (tiktoken's `o200k_base`) times this is what a budget
/// reserves: other providers' tokenizers count the same text differently, Anthropic's
/// by up to about a fifth more.
pub const BUDGET_INPUT_MARGIN: f64 = 1.25;

/// The most one attempt of `request` can cost: its input estimate (with
/// [`BUDGET_INPUT_MARGIN`]) and its whole output bound at the model's price; zero when the
/// price is unknown.
pub fn worst_case_cost(request: &Request) -> f64 {
    request.price.map_or(0.0, |p: Price| {
        let input = (f64::from(request.input_tokens) * BUDGET_INPUT_MARGIN).ceil() as u64;
        p.bound(input, u64::from(request.max_output_tokens))
    })
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            rpm: None,
            tpm: None,
            concurrency: 64,
            retry: RetryPolicy::default(),
            attempt_timeout: Duration::from_secs(120),
            deadline: None,
            burst: Duration::from_millis(500),
            order: Order::Completion,
            reorder_window: 4096,
            seed: 0,
            send_quantum: Duration::from_millis(100),
            budget_usd: None,
            exposure: None,
            breaker: None,
            learn_limits: false,
            wake_grid: None,
        }
    }
}

/// A setting that cannot work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting `{field}`: {reason}")]
pub struct ConfigError {
    /// The setting.
    pub field: &'static str,
    /// Why.
    pub reason: String,
}

impl EngineConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> EngineConfigBuilder {
        EngineConfigBuilder {
            config: EngineConfig::default(),
        }
    }

    /// Checks that the settings can work together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, reason: &str| {
            Err(ConfigError {
                field,
                reason: reason.into(),
            })
        };
        for (field, v) in [("rpm", self.rpm), ("tpm", self.tpm)] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return err(field, "must be a positive number");
                }
            }
        }
        if self.concurrency == 0 {
            return err("concurrency", "must be at least 1");
        }
        if self.retry.max_attempts == 0 {
            return err("max_attempts", "must be at least 1");
        }
        if self.attempt_timeout.is_zero() {
            return err("timeout", "must be more than zero");
        }
        if self.deadline.is_some_and(|d| d.is_zero()) {
            return err("deadline", "must be more than zero");
        }
        if self.burst.is_zero() {
            return err("burst", "must be more than zero");
        }
        if self.reorder_window == 0 {
            return err("reorder_window", "must be at least 1");
        }
        if self.budget_usd.is_some_and(|b| !(b.is_finite() && b > 0.0)) {
            return err("budget", "must be a positive number of dollars");
        }
        if self.breaker.is_some_and(|b| b.threshold == 0) {
            return err("breaker threshold", "must be at least 1");
        }
        Ok(())
    }
}

/// Builds an [`EngineConfig`].
#[derive(Clone, Debug)]
pub struct EngineConfigBuilder {
    config: EngineConfig,
}

impl EngineConfigBuilder {
    /// Requests per minute.
    pub fn rpm(mut self, rpm: f64) -> Self {
        self.config.rpm = Some(rpm);
        self
    }
    /// Tokens per minute.
    pub fn tpm(mut self, tpm: f64) -> Self {
        self.config.tpm = Some(tpm);
        self
    }
    /// Requests live at once.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n;
        self
    }
    /// Transient failures a request may have before it fails.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.config.retry.max_attempts = n;
        self
    }
    /// 429s a request may wait out before it fails.
    pub fn max_rate_limit_waits(mut self, n: u32) -> Self {
        self.config.retry.max_rate_limit_waits = n;
        self
    }
    /// The whole retry policy.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.config.retry = policy;
        self
    }
    /// Timeout of one attempt.
    pub fn attempt_timeout(mut self, d: Duration) -> Self {
        self.config.attempt_timeout = d;
        self
    }
    /// Deadline of one request, waiting included.
    pub fn deadline(mut self, d: Duration) -> Self {
        self.config.deadline = Some(d);
        self
    }
    /// Bucket capacity, in time at the limit's rate.
    pub fn burst(mut self, d: Duration) -> Self {
        self.config.burst = d;
        self
    }
    /// Outcome order.
    pub fn order(mut self, order: Order) -> Self {
        self.config.order = order;
        self
    }
    /// Reordering window for [`Order::Input`].
    pub fn reorder_window(mut self, n: usize) -> Self {
        self.config.reorder_window = n;
        self
    }
    /// Jitter seed.
    pub fn seed(mut self, seed: u64) -> Self {
        self.config.seed = seed;
        self
    }
    /// Grid step of the limiter's wake-ups.
    pub fn send_quantum(mut self, d: Duration) -> Self {
        self.config.send_quantum = d;
        self
    }
    /// Spend limit in US dollars.
    pub fn budget_usd(mut self, usd: f64) -> Self {
        self.config.budget_usd = Some(usd);
        self
    }
    /// A circuit breaker per model.
    pub fn breaker(mut self, policy: BreakerPolicy) -> Self {
        self.config.breaker = Some(policy);
        self
    }
    /// Learn unset limits from the provider's rate-limit headers.
    pub fn learn_limits(mut self, on: bool) -> Self {
        self.config.learn_limits = on;
        self
    }
    /// Record the bound on the cost in flight with `gate` (see [`EngineConfig::exposure`]).
    pub fn exposure(mut self, gate: ExposureGate) -> Self {
        self.config.exposure = Some(gate);
        self
    }

    /// Drive the runtime's park hook `grid` (see [`EngineConfig::wake_grid`]).
    pub fn wake_grid(mut self, grid: WakeGrid) -> Self {
        self.config.wake_grid = Some(grid);
        self
    }

    /// The checked settings.
    pub fn build(self) -> Result<EngineConfig, ConfigError> {
        self.config.validate()?;
        Ok(self.config)
    }
}

/// Why a run stopped before its input was done.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The provider said the quota or spend limit is exhausted.
    QuotaExhausted,
    /// [`Stopper::stop`] was called (Ctrl-C).
    Interrupted,
    /// The next request could not be sent without risking going over the budget.
    BudgetExhausted,
    /// The caller stopped the run ([`Stopper::stop`]) because it could not go on: its
    /// outcomes could not be kept (say, the disk is full).
    Failed,
}

impl StopReason {
    /// Why, in words, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            StopReason::QuotaExhausted => "quota exhausted",
            StopReason::Interrupted => "interrupted",
            StopReason::BudgetExhausted => "budget reached",
            StopReason::Failed => "could not go on",
        }
    }
}

/// Live counters of a run, written only by the scheduler and readable at any time (for a
/// progress bar).
#[derive(Debug, Default)]
pub struct Progress {
    /// Requests taken from the input.
    pub admitted: AtomicU64,
    /// Outcomes `succeeded`.
    pub succeeded: AtomicU64,
    /// Outcomes `failed`.
    pub failed: AtomicU64,
    /// Attempts on the wire now.
    pub in_flight: AtomicU64,
    /// Live requests not on the wire: queued for the limiter or backing off.
    pub waiting: AtomicU64,
    /// HTTP attempts sent.
    pub attempts: AtomicU64,
    /// Attempts that were retries.
    pub retries: AtomicU64,
    /// 429 rate-limit responses received.
    pub rate_limited: AtomicU64,
    /// Cooldowns started.
    pub cooldowns: AtomicU64,
    /// Input tokens reported by the provider.
    pub prompt_tokens: AtomicU64,
    /// Output tokens reported by the provider.
    pub completion_tokens: AtomicU64,
    /// Money spent so far, in millionths of a US dollar.
    pub cost_micro_usd: AtomicU64,
    /// Requests moved to their fallback model.
    pub fallbacks: AtomicU64,
}

/// A copy of [`Progress`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[allow(missing_docs)]
pub struct ProgressSnapshot {
    pub admitted: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub in_flight: u64,
    pub waiting: u64,
    pub attempts: u64,
    pub retries: u64,
    pub rate_limited: u64,
    pub cooldowns: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_micro_usd: u64,
    pub fallbacks: u64,
}

impl Progress {
    /// The counters now.
    pub fn snapshot(&self) -> ProgressSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProgressSnapshot {
            admitted: g(&self.admitted),
            succeeded: g(&self.succeeded),
            failed: g(&self.failed),
            in_flight: g(&self.in_flight),
            waiting: g(&self.waiting),
            attempts: g(&self.attempts),
            retries: g(&self.retries),
            rate_limited: g(&self.rate_limited),
            cooldowns: g(&self.cooldowns),
            prompt_tokens: g(&self.prompt_tokens),
            completion_tokens: g(&self.completion_tokens),
            cost_micro_usd: g(&self.cost_micro_usd),
            fallbacks: g(&self.fallbacks),
        }
    }

    fn add(a: &AtomicU64, n: u64) {
        a.fetch_add(n, Ordering::Relaxed);
    }
    fn sub(a: &AtomicU64, n: u64) {
        a.fetch_sub(n, Ordering::Relaxed);
    }
}

/// What the scheduler did, for tests and tracing. Delivered synchronously to the observer.
#[derive(Clone, Debug)]
pub enum EngineEvent {
    /// An attempt went on the wire.
    Sent {
        /// The request.
        custom_id: String,
        /// The model it went to (each model has its own cooldowns and generations).
        model: String,
        /// 1-based attempt number.
        attempt: u32,
        /// The cooldown generation it was sent in.
        generation: u64,
        /// When.
        at: Instant,
    },
    /// A 429 started a cooldown.
    Cooldown {
        /// The model whose sending it pauses.
        model: String,
        /// Generation of the attempt whose 429 started it.
        trigger_generation: u64,
        /// When it started.
        at: Instant,
        /// When it ends.
        until: Instant,
    },
    /// The run began stopping.
    Stopping {
        /// Why.
        reason: StopReason,
        /// When.
        at: Instant,
    },
}

/// Receives [`EngineEvent`]s.
pub type Observer = Arc<dyn Fn(EngineEvent) + Send + Sync>;

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RunEnd {
    /// Why it stopped early, if it did.
    pub stopped: Option<StopReason>,
    /// Whether input was left unread (after an interrupt).
    pub input_left: bool,
}

/// Runs requests against one provider.
pub struct Engine {
    config: EngineConfig,
    transport: Arc<dyn Transport>,
    observer: Option<Observer>,
}

impl Engine {
    /// An engine with these settings, sending through `transport`.
    pub fn new(config: EngineConfig, transport: Arc<dyn Transport>) -> Self {
        Engine {
            config,
            transport,
            observer: None,
        }
    }

    /// Calls `observer` with every [`EngineEvent`].
    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Starts running `requests` and returns the stream of their outcomes.
    ///
    /// Must be called inside a tokio runtime. Every request taken from `requests` comes out
    /// as exactly one [`Outcome`]; the stream ends when the input is exhausted (or the run
    /// stopped) and every taken request has its outcome. `custom_id`s should be unique.
    pub fn run<S>(&self, requests: S) -> Run
    where
        S: Stream<Item = Request> + Send + 'static,
    {
        let (out_tx, out_rx) = mpsc::channel(256);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (report_tx, report_rx) = mpsc::unbounded_channel();
        let progress = Arc::new(Progress::default());
        let now = Instant::now();
        let scheduler = Scheduler {
            lanes: Vec::new(),
            lane_by_model: FxHashMap::default(),
            config: self.config.clone(),
            transport: self.transport.clone(),
            observer: self.observer.clone(),
            progress: progress.clone(),
            rng: SmallRng::seed_from_u64(self.config.seed),
            live: FxHashMap::default(),
            retries: BinaryHeap::new(),
            deadlines: BTreeSet::new(),
            next_seq: 0,
            next_emit: 0,
            reorder: BTreeMap::new(),
            outbox: VecDeque::new(),
            report_tx,
            report_rx,
            spent_usd: 0.0,
            reserved_usd: 0.0,
            exposure_usd: 0.0,
            breakers: FxHashMap::default(),
            halted: None,
            interrupted: false,
            started: now,
            pace: PaceMeter::new(now),
        };
        let task = tokio::spawn(scheduler.run(Box::pin(requests), out_tx, stop_rx));
        Run {
            outcomes: out_rx,
            progress,
            stop_tx,
            task,
            started: now,
            send_quantum: self.config.send_quantum,
        }
    }
}

/// `t` rounded up to the grid of step `quantum` from `origin` (`t` itself when the step is
/// zero or `t` is not after the origin).
fn round_up_to_grid(t: Instant, origin: Instant, quantum: Duration) -> Instant {
    let q = quantum.as_nanos();
    if q == 0 || t <= origin {
        return t;
    }
    let steps = (t - origin).as_nanos().div_ceil(q);
    origin + Duration::from_nanos((steps * q) as u64)
}

/// A running job: a [`Stream`] of [`Outcome`]s, plus its progress and a stop switch.
pub struct Run {
    outcomes: mpsc::Receiver<Outcome>,
    progress: Arc<Progress>,
    stop_tx: watch::Sender<bool>,
    task: JoinHandle<RunEnd>,
    started: Instant,
    send_quantum: Duration,
}

impl Run {
    /// Live counters.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// `t` rounded up to the scheduler's send grid (see [`EngineConfig::send_quantum`]):
    /// the instants at which a paced run wakes up to send anyway. Work a consumer times
    /// for then (a group commit, say) shares that wake-up instead of costing one of its
    /// own.
    pub fn on_send_grid(&self, t: Instant) -> Instant {
        round_up_to_grid(t, self.started, self.send_quantum)
    }

    /// A handle that stops the run gracefully: no more input is taken, live requests finish.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.stop_tx.clone())
    }

    /// Waits for the scheduler after the outcome stream has ended, and says how the run
    /// ended. Outcomes not yet read are dropped.
    pub async fn finish(self) -> RunEnd {
        drop(self.outcomes);
        self.task.await.expect("the scheduler task does not panic")
    }
}

/// Stops a [`Run`] gracefully. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Stopper(watch::Sender<bool>);

impl Stopper {
    /// Take no more input and send nothing more: requests on the wire finish; those
    /// waiting for the limiter or a retry end unsent (`not_attempted`, or `stopped` after
    /// the attempts they had).
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}

impl Stream for Run {
    type Item = Outcome;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Outcome>> {
        self.outcomes.poll_recv(cx)
    }
}

/// One live request.
struct Live {
    request: Request,
    admitted_at: Instant,
    deadline: Option<Instant>,
    /// HTTP attempts sent.
    attempts: u32,
    /// Transient failures (counted against `max_attempts`).
    failures: u32,
    /// 429s waited out.
    rate_limit_waits: u32,
    /// Tokens reserved by the attempt in flight.
    reserved: Tokens,
    /// Worst-case cost reserved by the attempt in flight.
    reserved_usd: f64,
    /// Estimated cost of attempts billed although their answer was lost.
    billed_usd: f64,
    in_flight: bool,
}

/// What a finished attempt reports to the scheduler.
struct Report {
    seq: u64,
    generation: u64,
    verdict: Verdict,
    /// The rate limits the response announced, when learning them.
    limits: Option<RateLimits>,
}

/// The pacing of one model: its own limiter (limits, learned limits, cooldowns), send
/// window and queue. Providers limit each model apart, so a burst of 429s or a learned
/// limit of one model never holds back another (a fallback model goes at its own pace).
/// `--rpm` / `--tpm` are the limits of each model.
struct Lane {
    limiter: Limiter,
    /// Attempts allowed in flight, halved by each burst of 429s; only when no RPM or TPM
    /// limit is set (a bucket paces the release after a cooldown instead).
    window: Option<SendWindow>,
    /// Requests waiting for the limiter, oldest (or retried) first.
    ready: VecDeque<u64>,
    /// Attempts of this model on the wire.
    in_flight: usize,
    /// Cooldowns since the last success, for the default cooldown's doubling.
    cooldown_streak: u32,
}

impl Lane {
    fn new(config: &EngineConfig, now: Instant) -> Self {
        Lane {
            limiter: Limiter::new(config.rpm, config.tpm, config.burst, now),
            window: (config.rpm.is_none() && config.tpm.is_none()).then(|| {
                if config.learn_limits {
                    SendWindow::starting_at(1, config.concurrency)
                } else {
                    SendWindow::new(config.concurrency)
                }
            }),
            ready: VecDeque::new(),
            in_flight: 0,
            cooldown_streak: 0,
        }
    }
}

/// What stopped [`Scheduler::dispatch_lane`].
enum LaneHeld {
    /// Nothing to send, or its window is full (a report reopens it).
    Idle,
    /// The head may go at this instant.
    Until(Instant),
    /// The budget holds every lane until an answer comes in.
    Budget,
}

struct Scheduler {
    config: EngineConfig,
    transport: Arc<dyn Transport>,
    observer: Option<Observer>,
    progress: Arc<Progress>,
    /// One lane per model, in the order they were first seen.
    lanes: Vec<Lane>,
    lane_by_model: FxHashMap<String, usize>,
    rng: SmallRng,
    /// Every admitted request without an outcome, by sequence number.
    live: FxHashMap<u64, Live>,
    /// Backoffs in progress: when each request goes back to the queue.
    retries: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Deadlines of live requests (removed when they end, so this stays bounded).
    deadlines: BTreeSet<(Instant, u64)>,
    next_seq: u64,
    /// In input order: the next sequence number to emit.
    next_emit: u64,
    /// In input order: outcomes waiting for earlier ones.
    reorder: BTreeMap<u64, Outcome>,
    /// Outcomes ready to hand to the consumer.
    outbox: VecDeque<Outcome>,
    report_tx: mpsc::UnboundedSender<Report>,
    report_rx: mpsc::UnboundedReceiver<Report>,
    /// Money spent: the cost of every answer, plus estimates for billed lost answers.
    spent_usd: f64,
    /// Worst-case cost of the attempts in flight.
    reserved_usd: f64,
    /// The bound on `spent_usd + reserved_usd` last recorded by [`EngineConfig::exposure`].
    exposure_usd: f64,
    /// Circuit breakers by model, when [`EngineConfig::breaker`] is set.
    breakers: FxHashMap<String, CircuitBreaker>,
    /// Quota exhausted or budget reached: nothing more is sent; the rest of the input is
    /// reported not attempted.
    halted: Option<StopReason>,
    /// Interrupted: no more input is taken and nothing more sent; requests on the wire finish.
    interrupted: bool,
    /// When the run started: the origin of the send grid.
    started: Instant,
    /// Attempts sent per second, for the wake grid.
    pace: PaceMeter,
}

/// Attempts sent per second, over the last [`PACE_WINDOW`].
struct PaceMeter {
    since: Instant,
    sent: u32,
    per_sec: f64,
}

/// How long the send rate is measured over, for the wake grid: at 100 requests/s, 50 sends.
const PACE_WINDOW: Duration = Duration::from_millis(500);

impl PaceMeter {
    fn new(now: Instant) -> Self {
        PaceMeter {
            since: now,
            sent: 0,
            per_sec: 0.0,
        }
    }

    fn tick(&mut self, now: Instant) {
        let span = now.saturating_duration_since(self.since);
        if span >= PACE_WINDOW {
            self.per_sec = f64::from(self.sent) / span.as_secs_f64();
            self.sent = 0;
            self.since = now;
        }
    }
}

impl Scheduler {
    async fn run(
        mut self,
        mut input: Pin<Box<dyn Stream<Item = Request> + Send>>,
        out_tx: mpsc::Sender<Outcome>,
        mut stop_rx: watch::Receiver<bool>,
    ) -> RunEnd {
        let mut input_done = false;
        let mut stop_seen = false;
        if let Some(grid) = &self.config.wake_grid {
            grid.set_grid(self.started.into_std(), self.config.send_quantum);
        }
        loop {
            let now = Instant::now();
            self.fire_timers(now);
            let next_send = self.dispatch(now);
            self.pace.tick(now);
            if let Some(grid) = &self.config.wake_grid {
                // Holding responses back to the grid costs nothing while a limiter holds
                // the next requests back anyway, and saves wake-ups unless the pace is so
                // slow that most steps would have nothing to do.
                let per_step = self.pace.per_sec * self.config.send_quantum.as_secs_f64();
                grid.set_active(next_send.is_some() && per_step >= MIN_PER_STEP);
            }
            while let Some(outcome) = self.outbox.pop_front() {
                if out_tx.send(outcome).await.is_err() {
                    // The consumer is gone: nobody can see further outcomes.
                    if let Some(grid) = &self.config.wake_grid {
                        grid.set_active(false);
                    }
                    return RunEnd {
                        stopped: Some(StopReason::Interrupted),
                        input_left: !input_done,
                    };
                }
            }
            if self.live.is_empty() && (input_done || self.interrupted) {
                if let Some(grid) = &self.config.wake_grid {
                    grid.set_active(false);
                }
                debug_assert!(
                    self.reorder.is_empty() && self.lanes.iter().all(|l| l.ready.is_empty())
                );
                return RunEnd {
                    stopped: self.stop_reason(),
                    input_left: !input_done,
                };
            }
            // After a quota stop the rest of the input is read and reported not attempted.
            let can_pull = !input_done
                && !self.interrupted
                && (self.halted.is_some()
                    || (self.live.len() < self.config.concurrency && self.window_open()));
            let wake = [
                next_send.map(|t| self.on_grid(t)),
                self.retries.peek().map(|Reverse((t, _))| *t),
                self.deadlines.first().map(|(t, _)| *t),
            ]
            .into_iter()
            .flatten()
            .min();

            tokio::select! {
                biased;
                Some(report) = self.report_rx.recv() => self.on_report(report),
                changed = stop_rx.changed(), if !stop_seen => {
                    stop_seen = true;
                    if changed.is_ok() && *stop_rx.borrow() {
                        self.interrupted = true;
                        self.observe(|| EngineEvent::Stopping {
                            reason: StopReason::Interrupted,
                            at: Instant::now(),
                        });
                        // Only what is on the wire finishes: the requests waiting for the
                        // limiter or a retry end now, unsent (a resume sends them), rather
                        // than going out, and being paid for, after the user said stop.
                        self.end_unsent(StopReason::Interrupted);
                    }
                }
                item = input.next(), if can_pull => match item {
                    Some(request) => self.admit(request),
                    None => input_done = true,
                },
                _ = tokio::time::sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
            }
        }
    }

    /// `t` rounded up to the send grid (see [`EngineConfig::send_quantum`]).
    fn on_grid(&self, t: Instant) -> Instant {
        round_up_to_grid(t, self.started, self.config.send_quantum)
    }

    /// Attempts on the wire (the gauge only the scheduler writes).
    fn in_flight(&self) -> usize {
        self.progress.in_flight.load(Ordering::Relaxed) as usize
    }

    /// Why the run is stopping, if it is: nothing more is sent.
    fn stop_reason(&self) -> Option<StopReason> {
        if self.halted.is_some() {
            self.halted
        } else if self.interrupted {
            Some(StopReason::Interrupted)
        } else {
            None
        }
    }

    fn observe(&self, event: impl FnOnce() -> EngineEvent) {
        if let Some(obs) = &self.observer {
            obs(event());
        }
    }

    /// In input order, admission stops when the oldest unemitted request is too far behind.
    fn window_open(&self) -> bool {
        match self.config.order {
            Order::Completion => true,
            Order::Input => self.next_seq - self.next_emit < self.config.reorder_window as u64,
        }
    }

    fn admit(&mut self, request: Request) {
        let seq = self.next_seq;
        self.next_seq += 1;
        Progress::add(&self.progress.admitted, 1);
        let now = Instant::now();
        if let Some(reason) = self.halted {
            let outcome = failed_outcome(
                request,
                ErrorInfo {
                    kind: ErrorKind::NotAttempted,
                    status: None,
                    message: format!("not sent: the run stopped ({})", reason.describe()),
                },
                0,
                Duration::ZERO,
                0.0,
            );
            self.emit(seq, outcome);
            return;
        }
        let deadline = self.config.deadline.map(|d| now + d);
        if let Some(d) = deadline {
            self.deadlines.insert((d, seq));
        }
        self.live.insert(
            seq,
            Live {
                request,
                admitted_at: now,
                deadline,
                attempts: 0,
                failures: 0,
                rate_limit_waits: 0,
                reserved: Tokens::default(),
                reserved_usd: 0.0,
                billed_usd: 0.0,
                in_flight: false,
            },
        );
        let lane = self.lane_of(seq);
        self.lanes[lane].ready.push_back(seq);
        Progress::add(&self.progress.waiting, 1);
    }

    /// The lane of the model live request `seq` is for now (made on first use).
    fn lane_of(&mut self, seq: u64) -> usize {
        let model = &self.live[&seq].request.model;
        if let Some(&lane) = self.lane_by_model.get(model) {
            return lane;
        }
        let lane = self.lanes.len();
        self.lanes.push(Lane::new(&self.config, Instant::now()));
        self.lane_by_model.insert(model.clone(), lane);
        lane
    }

    /// Puts live request `seq` at the front of its model's queue.
    fn requeue_front(&mut self, seq: u64) {
        let lane = self.lane_of(seq);
        self.lanes[lane].ready.push_front(seq);
    }

    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, seq))) = self.retries.peek().copied() {
            if at > now {
                break;
            }
            self.retries.pop();
            if self.live.contains_key(&seq) {
                self.requeue_front(seq);
            }
        }
        while let Some((at, seq)) = self.deadlines.first().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            if self.live[&seq].in_flight {
                // Its attempt's timeout ends at the deadline; the report fails it.
                continue;
            }
            let lane = self.lane_of(seq);
            self.lanes[lane].ready.retain(|s| *s != seq);
            self.retries.retain(|Reverse((_, s))| *s != seq);
            Progress::sub(&self.progress.waiting, 1);
            let error = self.deadline_error(seq);
            self.fail(seq, error);
        }
    }

    /// Sends what each model's limiter allows; returns when the head of a queue may go
    /// next (a full send window is waited out by the next report, not a timer).
    fn dispatch(&mut self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        // A request whose circuit is open moves to its fallback model's lane, which may
        // have had its turn already: go round again until no request moved.
        loop {
            let mut moved = false;
            for lane in 0..self.lanes.len() {
                if self.stop_reason().is_some() {
                    return None;
                }
                match self.dispatch_lane(lane, now, &mut moved) {
                    LaneHeld::Idle => {}
                    LaneHeld::Until(t) => next = Some(next.map_or(t, |n| n.min(t))),
                    LaneHeld::Budget => return None,
                }
            }
            if !moved {
                return next;
            }
        }
    }

    /// Sends what the limiter of `lane` allows, oldest first.
    fn dispatch_lane(&mut self, lane: usize, now: Instant, moved: &mut bool) -> LaneHeld {
        while let Some(&seq) = self.lanes[lane].ready.front() {
            let l = &self.lanes[lane];
            if l.window.as_ref().is_some_and(|w| !w.allows(l.in_flight)) {
                return LaneHeld::Idle;
            }
            if let Some(policy) = self.config.breaker {
                let model = &self.live[&seq].request.model;
                if !self.breakers.contains_key(model) {
                    self.breakers
                        .insert(model.clone(), CircuitBreaker::new(policy));
                }
                let breaker = self.breakers.get_mut(model).expect("inserted");
                if let Err(held) = breaker.check(now) {
                    if self.fall_back(seq) {
                        // The same request, now for its next model, in that model's lane.
                        self.lanes[lane].ready.pop_front();
                        self.requeue_front(seq);
                        *moved = true;
                        continue;
                    }
                    return match held {
                        Held::Until(t) => LaneHeld::Until(t),
                        // The probe's report wakes the scheduler.
                        Held::Probing => LaneHeld::Idle,
                    };
                }
            }
            let request = &self.live[&seq].request;
            let tokens = Tokens {
                input: u64::from(request.input_tokens),
                output: u64::from(request.max_output_tokens),
            };
            let cost = match self.config.budget_usd {
                Some(budget) => {
                    let cost = worst_case_cost(request);
                    if self.spent_usd + self.reserved_usd + cost > budget {
                        if self.in_flight() == 0 {
                            // Spending only grows: it will never fit.
                            self.halt(StopReason::BudgetExhausted);
                        }
                        // Otherwise an answer may come in cheaper than reserved.
                        return LaneHeld::Budget;
                    }
                    if let Some(gate) = self.config.exposure.as_ref() {
                        let in_flight = self.reserved_usd + cost;
                        if self.spent_usd + in_flight > self.exposure_usd {
                            let bound = exposure_bound(self.spent_usd, in_flight, budget);
                            if !(gate.0)(bound) {
                                self.halt(StopReason::Failed);
                                return LaneHeld::Budget;
                            }
                            self.exposure_usd = bound;
                        }
                    }
                    cost
                }
                None => 0.0,
            };
            let l = &mut self.lanes[lane];
            let at = l.limiter.ready_at(tokens, now);
            if at > now {
                return LaneHeld::Until(at);
            }
            l.ready.pop_front();
            l.limiter.acquire(tokens, now);
            self.reserved_usd += cost;
            self.live
                .get_mut(&seq)
                .expect("queued requests are live")
                .reserved_usd = cost;
            if self.config.breaker.is_some() {
                if let Some(b) = self.breakers.get_mut(&self.live[&seq].request.model) {
                    b.on_send();
                }
            }
            self.send(seq, lane, tokens, now);
        }
        LaneHeld::Idle
    }

    /// Moves a live request (not in flight) to its fallback model; false when it has
    /// none. Its transient-failure count starts again; its attempts keep counting.
    fn fall_back(&mut self, seq: u64) -> bool {
        let live = self
            .live
            .get_mut(&seq)
            .expect("falling back a live request");
        debug_assert!(!live.in_flight);
        let Some(next) = live.request.fallback.take() else {
            return false;
        };
        let mut next = *next;
        next.metadata = live.request.metadata.take();
        next.cache_key = live.request.cache_key;
        live.request = next;
        live.failures = 0;
        Progress::add(&self.progress.fallbacks, 1);
        true
    }

    /// Tells the breaker of the model an attempt went to what came back; returns whether
    /// its circuit is open after it.
    fn feed_breaker(&mut self, model: &str, verdict: &Verdict, now: Instant) -> bool {
        let Some(b) = self.breakers.get_mut(model) else {
            return false;
        };
        match verdict {
            Verdict::Success { .. } => b.on_success(),
            Verdict::Permanent { error } if model_specific(error.kind) => b.on_neutral(),
            // A refusal shows the model is up.
            Verdict::Permanent { .. } => b.on_success(),
            Verdict::RateLimited { .. } | Verdict::QuotaExhausted { .. } => b.on_neutral(),
            Verdict::Retry { .. } => return b.on_failure(now),
        }
        matches!(b.state(), crate::retry::BreakerState::Open { .. })
    }

    fn send(&mut self, seq: u64, lane: usize, tokens: Tokens, now: Instant) {
        let generation = self.lanes[lane].limiter.generation();
        self.lanes[lane].in_flight += 1;
        self.pace.sent += 1;
        let live = self.live.get_mut(&seq).expect("queued requests are live");
        live.attempts += 1;
        live.in_flight = true;
        live.reserved = tokens;
        let timeout = match live.deadline {
            Some(d) => self
                .config
                .attempt_timeout
                .min(d.saturating_duration_since(now)),
            None => self.config.attempt_timeout,
        };
        Progress::sub(&self.progress.waiting, 1);
        Progress::add(&self.progress.in_flight, 1);
        Progress::add(&self.progress.attempts, 1);
        if live.attempts > 1 {
            Progress::add(&self.progress.retries, 1);
        }
        if let Some(obs) = &self.observer {
            obs(EngineEvent::Sent {
                custom_id: live.request.custom_id.clone(),
                model: live.request.model.clone(),
                attempt: live.attempts,
                generation,
                at: now,
            });
        }
        let attempt = self.transport.send(&live.request);
        let provider = live.request.endpoint.provider();
        let learn = self.config.learn_limits;
        let tx = self.report_tx.clone();
        tokio::spawn(async move {
            let result = match tokio::time::timeout(timeout, attempt).await {
                Ok(result) => result,
                Err(_) => Err(TransportError::Timeout(timeout)),
            };
            let limits = match (&result, learn) {
                (Ok(resp), true) => Some(
                    provider
                        .api()
                        .rate_limits(&resp.headers, std::time::SystemTime::now()),
                ),
                _ => None,
            };
            let verdict = classify(result, provider);
            // The scheduler outlives every attempt it spawned, except when the consumer
            // dropped the run; then nobody is listening and the report can go.
            let _ = tx.send(Report {
                seq,
                generation,
                verdict,
                limits,
            });
        });
    }

    fn on_report(&mut self, report: Report) {
        let now = Instant::now();
        let seq = report.seq;
        let live = self
            .live
            .get_mut(&seq)
            .expect("an attempt's request stays live");
        debug_assert!(live.in_flight);
        live.in_flight = false;
        Progress::sub(&self.progress.in_flight, 1);
        // The lane of the model this attempt went to (a request changes model only
        // between attempts).
        let lane = self.lane_of(seq);
        self.lanes[lane].in_flight -= 1;
        if let Some(limits) = &report.limits {
            // Once a limit is known the buckets pace; the send window was for finding it.
            let l = &mut self.lanes[lane];
            if l.limiter.learn(limits, now) {
                l.window = None;
            }
        }
        let live = self.live.get_mut(&seq).expect("live");
        let reserved_usd = std::mem::take(&mut live.reserved_usd);
        // Back to exactly zero when nothing is in flight, whatever the float rounding.
        self.reserved_usd = if self.progress.in_flight.load(Ordering::Relaxed) == 0 {
            0.0
        } else {
            (self.reserved_usd - reserved_usd).max(0.0)
        };
        if report.verdict.billed_failure() {
            let estimate = worst_case_cost(&live.request);
            live.billed_usd += estimate;
            self.spend(estimate);
        }
        let circuit_open = if self.config.breaker.is_some() {
            let model = self.live[&seq].request.model.clone();
            self.feed_breaker(&model, &report.verdict, now)
        } else {
            false
        };
        let live = self.live.get_mut(&seq).expect("live");
        match report.verdict {
            Verdict::Success { response, usage } => {
                let actual = usage.map_or(live.reserved, |u| Tokens {
                    input: u.prompt_tokens,
                    output: u.completion_tokens,
                });
                let l = &mut self.lanes[lane];
                l.limiter.settle(live.reserved, actual, now);
                l.cooldown_streak = 0;
                if let Some(w) = &mut l.window {
                    w.on_success();
                }
                if let Some(u) = usage {
                    Progress::add(&self.progress.prompt_tokens, u.prompt_tokens);
                    Progress::add(&self.progress.completion_tokens, u.completion_tokens);
                }
                let live = self.end(seq);
                // A success without usage was billed all the same: count its worst case.
                let cost = match usage {
                    Some(u) => live.request.price.map_or(0.0, |p| p.cost(&u)),
                    None => worst_case_cost(&live.request),
                };
                self.spend(cost);
                let cost_usd = live
                    .request
                    .price
                    .map(|_| round_usd(cost + live.billed_usd));
                let outcome = Outcome {
                    custom_id: live.request.custom_id,
                    status: Status::Succeeded,
                    model: live.request.model,
                    response: Some(response),
                    error: None,
                    attempts: live.attempts,
                    usage,
                    cost_usd,
                    latency_ms: millis(now - live.admitted_at),
                    metadata: live.request.metadata,
                    cached: false,
                    line: live.request.line,
                    cache_key: live.request.cache_key,
                };
                self.emit(seq, outcome);
            }
            Verdict::Permanent { error } => {
                if model_specific(error.kind) && self.stop_reason().is_none() && self.fall_back(seq)
                {
                    self.requeue_front(seq);
                    Progress::add(&self.progress.waiting, 1);
                } else {
                    self.fail(seq, error);
                }
            }
            Verdict::QuotaExhausted { error } => {
                self.fail(seq, error);
                self.halt(StopReason::QuotaExhausted);
            }
            Verdict::RateLimited { retry_after, error } => {
                Progress::add(&self.progress.rate_limited, 1);
                let l = &mut self.lanes[lane];
                let wait = match retry_after {
                    Some(w) => self.config.retry.bound_retry_after(w),
                    None => self.config.retry.default_cooldown(l.cooldown_streak),
                };
                if let Some(c) = l.limiter.on_rate_limited(report.generation, wait, now) {
                    l.cooldown_streak += 1;
                    // Every attempt of this model out now was sent into the same burst, as
                    // was this one.
                    let in_flight = l.in_flight + 1;
                    if let Some(w) = &mut l.window {
                        w.on_cooldown(in_flight);
                    }
                    Progress::add(&self.progress.cooldowns, 1);
                    let model = &self.live[&seq].request.model;
                    self.observe(|| EngineEvent::Cooldown {
                        model: model.clone(),
                        trigger_generation: c.trigger_generation,
                        at: now,
                        until: c.until,
                    });
                }
                let stopping = self.stop_reason().is_some();
                let live = self.live.get_mut(&seq).expect("live");
                live.rate_limit_waits += 1;
                let waits = live.rate_limit_waits;
                if stopping {
                    self.fail_stopped(seq, error);
                } else if waits > self.config.retry.max_rate_limit_waits {
                    let error = ErrorInfo {
                        message: format!(
                            "gave up after {} rate-limit waits: {}",
                            waits - 1,
                            error.message
                        ),
                        ..error
                    };
                    self.fail(seq, error);
                } else if live
                    .deadline
                    .is_some_and(|d| self.lanes[lane].limiter.paused_until(now).unwrap_or(now) >= d)
                {
                    let error = self.deadline_error(seq);
                    self.fail(seq, error);
                } else {
                    // Straight back to the front of the queue; the cooldown holds it.
                    self.lanes[lane].ready.push_front(seq);
                    Progress::add(&self.progress.waiting, 1);
                }
            }
            Verdict::Retry { retry_after, error } => {
                live.failures += 1;
                let failures = live.failures;
                if self.stop_reason().is_some() {
                    self.fail_stopped(seq, error);
                    return;
                }
                // Its model's circuit just opened: straight to the fallback, no backoff.
                if circuit_open && self.fall_back(seq) {
                    self.requeue_front(seq);
                    Progress::add(&self.progress.waiting, 1);
                    return;
                }
                let live = self.live.get_mut(&seq).expect("live");
                if failures >= self.config.retry.max_attempts {
                    let error = ErrorInfo {
                        message: format!(
                            "gave up after {failures} failed attempt{}: {}",
                            if failures == 1 { "" } else { "s" },
                            error.message
                        ),
                        ..error
                    };
                    self.fail(seq, error);
                    return;
                }
                let delay = match retry_after {
                    Some(w) => self.config.retry.bound_retry_after(w),
                    None => self.config.retry.backoff(failures, &mut self.rng),
                };
                let at = now + delay;
                if live.deadline.is_some_and(|d| at >= d) {
                    let error = self.deadline_error(seq);
                    self.fail(seq, error);
                    return;
                }
                self.retries.push(Reverse((at, seq)));
                Progress::add(&self.progress.waiting, 1);
            }
        }
    }

    fn deadline_error(&self, seq: u64) -> ErrorInfo {
        let live = &self.live[&seq];
        let deadline = self.config.deadline.unwrap_or_default();
        ErrorInfo {
            kind: ErrorKind::DeadlineExceeded,
            status: None,
            message: format!(
                "no success within the {deadline:?} deadline after {} attempts",
                live.attempts
            ),
        }
    }

    /// Removes a request from the live set (and its deadline).
    fn end(&mut self, seq: u64) -> Live {
        let live = self.live.remove(&seq).expect("ending a live request");
        if let Some(d) = live.deadline {
            self.deadlines.remove(&(d, seq));
        }
        live
    }

    /// Ends a live request as failed.
    fn fail(&mut self, seq: u64, error: ErrorInfo) {
        let live = self.end(seq);
        let latency = Instant::now() - live.admitted_at;
        let outcome = failed_outcome(live.request, error, live.attempts, latency, live.billed_usd);
        self.emit(seq, outcome);
    }

    /// Counts money spent.
    fn spend(&mut self, usd: f64) {
        self.spent_usd += usd;
        Progress::add(
            &self.progress.cost_micro_usd,
            (usd * 1e6).round().max(0.0) as u64,
        );
    }

    /// Ends a live request that cannot be retried because the run is stopping.
    fn fail_stopped(&mut self, seq: u64, last: ErrorInfo) {
        let reason = self.stop_reason().unwrap_or(StopReason::QuotaExhausted);
        let error = ErrorInfo {
            kind: ErrorKind::Stopped,
            status: last.status,
            message: format!(
                "run stopped ({}) before a retry; last error: {}",
                reason.describe(),
                last.message
            ),
        };
        self.fail(seq, error);
    }

    /// Quota exhausted or budget reached: nothing more is sent; everything not on the
    /// wire ends now.
    fn halt(&mut self, reason: StopReason) {
        if self.halted.is_some() {
            return;
        }
        self.halted = Some(reason);
        self.observe(|| EngineEvent::Stopping {
            reason,
            at: Instant::now(),
        });
        self.end_unsent(reason);
    }

    /// Ends every live request that is not on the wire (queued for the limiter or waiting
    /// to retry): not attempted, or stopped after the attempts it had.
    fn end_unsent(&mut self, reason: StopReason) {
        let mut waiting: Vec<u64> = self
            .live
            .iter()
            .filter(|(_, l)| !l.in_flight)
            .map(|(s, _)| *s)
            .collect();
        waiting.sort_unstable();
        for lane in &mut self.lanes {
            lane.ready.clear();
        }
        self.retries.clear();
        for seq in waiting {
            Progress::sub(&self.progress.waiting, 1);
            let attempts = self.live[&seq].attempts;
            let error = if attempts == 0 {
                ErrorInfo {
                    kind: ErrorKind::NotAttempted,
                    status: None,
                    message: format!("not sent: the run stopped ({})", reason.describe()),
                }
            } else {
                ErrorInfo {
                    kind: ErrorKind::Stopped,
                    status: None,
                    message: format!(
                        "run stopped ({}) after {attempts} attempts",
                        reason.describe()
                    ),
                }
            };
            self.fail(seq, error);
        }
    }

    /// Hands an outcome to the output, in the configured order.
    fn emit(&mut self, seq: u64, outcome: Outcome) {
        match outcome.status {
            Status::Succeeded => Progress::add(&self.progress.succeeded, 1),
            Status::Failed => Progress::add(&self.progress.failed, 1),
        }
        match self.config.order {
            Order::Completion => self.outbox.push_back(outcome),
            Order::Input => {
                self.reorder.insert(seq, outcome);
                while let Some(o) = self.reorder.remove(&self.next_emit) {
                    self.outbox.push_back(o);
                    self.next_emit += 1;
                }
            }
        }
    }
}

fn failed_outcome(
    request: Request,
    error: ErrorInfo,
    attempts: u32,
    latency: Duration,
    billed_usd: f64,
) -> Outcome {
    Outcome {
        cost_usd: request.price.map(|_| round_usd(billed_usd)),
        custom_id: request.custom_id,
        status: Status::Failed,
        model: request.model,
        response: None,
        error: Some(error),
        attempts,
        usage: None,
        latency_ms: millis(latency),
        metadata: request.metadata,
        cached: false,
        line: request.line,
        cache_key: request.cache_key,
    }
}

/// Errors that belong to one model, not to the request: another model may succeed.
fn model_specific(kind: ErrorKind) -> bool {
    matches!(kind, ErrorKind::NotFound | ErrorKind::ContextLengthExceeded)
}

/// Dollars to a billionth, so float noise does not show in the output.
fn round_usd(usd: f64) -> f64 {
    (usd * 1e9).round() / 1e9
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u128::from(u64::MAX)) as u64
}
