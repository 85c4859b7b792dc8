//! Deterministic simulation of the engine: thousands of seeded schedules against an
//! in-process fake provider under `tokio::time::pause()`, each trying to break the
//! invariants of DESIGN.md.
//!
//! Each schedule draws its own settings (concurrency, limits, budgets, timeouts, deadline,
//! output order, a circuit breaker) and its own provider behaviour: 429 storms with and without Retry-After
//! (whose late responses arrive after the cooldown they caused has ended), isolated 429s,
//! 5xx, 529, 408, hangs past the timeout, dropped connections, truncated and HTML bodies,
//! permanently bad requests, one-off 404s and quota exhaustion.
//!
//! `SLUICE_DST_SCHEDULES` sets how many schedules run (default 10,000);
//! `SLUICE_DST_SEED=N` replays one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sluice::engine::EngineEvent;
use sluice::provider::{AttemptFuture, HttpResponse, Transport, TransportError};
use sluice::retry::BreakerPolicy;
use sluice::summary::SummaryBuilder;
use sluice::{
    Engine, EngineConfig, ErrorKind, LineParser, Order, Outcome, Request, RetryPolicy, Status,
};
use tokio::time::Instant;

/// What the fake provider answered to one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Ok,
    RateLimited,
    Transient,
    Hang,
    Permanent,
    Quota,
}

/// The provider's behaviour in one schedule.
#[derive(Debug)]
struct Behaviour {
    /// [start, end) windows in which every arrival gets a 429.
    storms: Vec<(Duration, Duration)>,
    /// How storm 429s announce their wait: 0 none, 1 seconds, 2 ms, 3 HTTP-date.
    retry_after_style: u8,
    p_429: f64,
    p_transient: f64,
    p_hang: f64,
    p_404: f64,
    /// Requests that always get 400.
    poison_every: Option<usize>,
    /// From this time on, every arrival gets insufficient_quota.
    quota_at: Option<Duration>,
    max_latency_ms: u64,
}

struct Fake {
    start: Instant,
    behaviour: Behaviour,
    rng: Mutex<SmallRng>,
    /// Per custom_id: every attempt's answer, in order, and whether the client got it
    /// (an answer slower than the attempt timeout is never seen).
    log: Mutex<HashMap<String, Vec<(Answer, bool)>>>,
}

impl Fake {
    fn answer(&self, request: &Request) -> (Answer, HttpResponse, Duration, usize) {
        let now = Instant::now() - self.start;
        let mut rng = self.rng.lock().unwrap();
        let latency = Duration::from_millis(rng.random_range(0..=self.behaviour.max_latency_ms));
        let b = &self.behaviour;
        let idx: usize = request.custom_id[1..].parse().unwrap();
        let mut headers = HeaderMap::new();
        let (answer, status, body): (Answer, u16, String) = if b
            .poison_every
            .is_some_and(|k| idx.is_multiple_of(k))
        {
            (
                Answer::Permanent,
                400,
                err_body("invalid_request_error", "bad_param"),
            )
        } else if b.quota_at.is_some_and(|q| now >= q) {
            (
                Answer::Quota,
                429,
                err_body("insufficient_quota", "insufficient_quota"),
            )
        } else if let Some(&(_, end)) = b.storms.iter().find(|(s, e)| now >= *s && now < *e) {
            let wait = end - now;
            match b.retry_after_style {
                1 => {
                    headers.insert("retry-after", HeaderValue::from(wait.as_secs() + 1));
                }
                2 => {
                    headers.insert(
                        "retry-after-ms",
                        HeaderValue::from(wait.as_millis() as u64 + 1),
                    );
                }
                3 => {
                    // HTTP-dates are wall-clock; with paused tokio time they read as "now".
                    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
                    headers.insert("retry-after", HeaderValue::from_str(&date).unwrap());
                }
                _ => {}
            }
            (
                Answer::RateLimited,
                429,
                err_body("requests", "rate_limit_exceeded"),
            )
        } else if rng.random_bool(b.p_429) {
            (
                Answer::RateLimited,
                429,
                err_body("tokens", "rate_limit_exceeded"),
            )
        } else if rng.random_bool(b.p_hang) {
            (Answer::Hang, 0, String::new())
        } else if rng.random_bool(b.p_transient) {
            let (status, body) = match rng.random_range(0..8) {
                0 => (500, err_body("server_error", "")),
                1 => (502, "<html><body>502 Bad Gateway</body></html>".to_string()),
                2 => {
                    headers.insert("retry-after", HeaderValue::from_static("1"));
                    (503, err_body("server_error", ""))
                }
                3 => (529, r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#.into()),
                4 => (408, err_body("timeout", "")),
                5 => (200, r#"{"id":"chatcmpl-1","choices":[{"mess"#.to_string()), // truncated
                6 => (0, "drop".to_string()),                                       // dropped connection
                _ => (0, "refused".to_string()),                                    // connect error
            };
            (Answer::Transient, status, body)
        } else if rng.random_bool(b.p_404) {
            (
                Answer::Permanent,
                404,
                err_body("invalid_request_error", "model_not_found"),
            )
        } else {
            let out = rng.random_range(1..=request.max_output_tokens.max(1));
            let body = format!(
                r#"{{"id":"chatcmpl-{idx}","object":"chat.completion","choices":[{{"index":0,"message":{{"role":"assistant","content":"ok"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{},"completion_tokens":{out},"total_tokens":{}}}}}"#,
                request.input_tokens,
                request.input_tokens + out
            );
            (Answer::Ok, 200, body)
        };
        let mut log = self.log.lock().unwrap();
        // A livelock retries without moving the clock, so no timeout catches it: bound the
        // attempts instead (the budgets allow at most a few dozen per request).
        let attempts: usize = log.values().map(Vec::len).sum();
        assert!(attempts < 20_000, "runaway: {attempts} attempts");
        let entry = log.entry(request.custom_id.clone()).or_default();
        entry.push((answer, false));
        let index = entry.len() - 1;
        let resp = HttpResponse {
            status,
            headers,
            body: Bytes::from(body),
        };
        (answer, resp, latency, index)
    }
}

fn err_body(etype: &str, code: &str) -> String {
    format!(
        r#"{{"error":{{"message":"simulated {etype}","type":"{etype}","param":null,"code":"{code}"}}}}"#
    )
}

struct FakeTransport(Arc<Fake>);

impl Transport for FakeTransport {
    fn send(&self, request: &Request) -> AttemptFuture {
        let (answer, resp, latency, index) = self.0.answer(request);
        let fake = self.0.clone();
        let id = request.custom_id.clone();
        Box::pin(async move {
            tokio::time::sleep(latency).await;
            if answer != Answer::Hang {
                fake.log.lock().unwrap().get_mut(&id).unwrap()[index].1 = true;
            }
            match (answer, resp.status, &resp.body[..]) {
                (Answer::Hang, _, _) => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Err(TransportError::Dropped("hung".into()))
                }
                (_, 0, b"drop") => Err(TransportError::Dropped("connection reset by peer".into())),
                (_, 0, _) => Err(TransportError::Connect("connection refused".into())),
                _ => Ok(resp),
            }
        })
    }
}

struct Schedule {
    n: usize,
    /// Lines name this many models in turn (each has its own limits and cooldowns).
    models: usize,
    config: EngineConfig,
    behaviour: Behaviour,
}

fn draw(seed: u64) -> Schedule {
    let mut rng = SmallRng::seed_from_u64(seed);
    let n = rng.random_range(1..=40);
    let storms = (0..rng.random_range(0..=3))
        .map(|_| {
            let s = Duration::from_millis(rng.random_range(0..20_000));
            (s, s + Duration::from_millis(rng.random_range(200..5_000)))
        })
        .collect();
    let behaviour = Behaviour {
        storms,
        retry_after_style: rng.random_range(0..4),
        p_429: if rng.random_bool(0.5) {
            rng.random_range(0.0..0.2)
        } else {
            0.0
        },
        p_transient: if rng.random_bool(0.7) {
            rng.random_range(0.0..0.4)
        } else {
            0.0
        },
        p_hang: if rng.random_bool(0.3) {
            rng.random_range(0.0..0.1)
        } else {
            0.0
        },
        p_404: if rng.random_bool(0.2) { 0.05 } else { 0.0 },
        poison_every: rng.random_bool(0.3).then(|| rng.random_range(2..10)),
        quota_at: rng
            .random_bool(0.15)
            .then(|| Duration::from_millis(rng.random_range(0..10_000))),
        max_latency_ms: rng.random_range(1..3_000),
    };
    let retry = RetryPolicy {
        max_attempts: rng.random_range(1..=5),
        max_rate_limit_waits: rng.random_range(0..=6),
        backoff_base: Duration::from_millis(rng.random_range(10..1_000)),
        backoff_max: Duration::from_secs(rng.random_range(1..20)),
        cooldown_base: Duration::from_millis(rng.random_range(100..2_000)),
        cooldown_max: Duration::from_secs(10),
        max_retry_after: Duration::from_secs(60),
    };
    let mut b = EngineConfig::builder()
        .concurrency(rng.random_range(1..=16))
        .retry(retry)
        .attempt_timeout(Duration::from_millis(rng.random_range(500..5_000)))
        .order(if rng.random_bool(0.5) {
            Order::Input
        } else {
            Order::Completion
        })
        .reorder_window(rng.random_range(1..64))
        .send_quantum(Duration::from_millis(if rng.random_bool(0.5) {
            0
        } else {
            50
        }))
        .seed(seed);
    if rng.random_bool(0.5) {
        b = b.rpm(rng.random_range(30.0..3_000.0));
    }
    if rng.random_bool(0.3) {
        b = b.tpm(rng.random_range(1_000.0..200_000.0));
    }
    if rng.random_bool(0.3) {
        b = b.deadline(Duration::from_secs(rng.random_range(2..60)));
    }
    if rng.random_bool(0.3) {
        // The model's circuit opens on transient failures; with no fallback model its
        // requests wait for the probe.
        b = b.breaker(BreakerPolicy {
            threshold: rng.random_range(1..6),
            cool_off: Duration::from_millis(rng.random_range(100..10_000)),
        });
    }
    let models = if rng.random_bool(1.0 / 3.0) { 2 } else { 1 };
    Schedule {
        n,
        models,
        config: b.build().unwrap(),
        behaviour,
    }
}

const MODELS: [&str; 2] = ["gpt-4.1-mini", "gpt-4.1-nano"];

fn requests(n: usize, models: usize) -> Vec<Request> {
    let parser = LineParser::new(Some("gpt-4.1-mini".into()));
    (0..n)
        .map(|i| {
            let line = format!(
                r#"{{"custom_id":"r{i}","model":"{}","prompt":"question number {i}","max_tokens":{}}}"#,
                MODELS[i % models],
                16 + i * 7
            );
            parser.parse(i as u64 + 1, &line).unwrap()
        })
        .collect()
}

/// Runs one schedule and checks every invariant; returns a description of the first
/// violation.
fn check(seed: u64) -> Result<(), String> {
    std::panic::catch_unwind(|| check_inner(seed)).unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(format!("panicked: {msg}"))
    })
}

fn check_inner(seed: u64) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let Schedule {
            n,
            models,
            config,
            behaviour,
        } = draw(seed);
        let fake = Arc::new(Fake {
            start: Instant::now(),
            behaviour,
            rng: Mutex::new(SmallRng::seed_from_u64(seed ^ 0x5eed)),
            log: Mutex::new(HashMap::new()),
        });
        let events: Arc<Mutex<Vec<EngineEvent>>> = Arc::default();
        let sink = events.clone();
        let engine = Engine::new(config.clone(), Arc::new(FakeTransport(fake.clone())))
            .with_observer(Arc::new(move |e| sink.lock().unwrap().push(e)));
        let reqs = requests(n, models);
        let started = Instant::now();
        let mut run = engine.run(futures::stream::iter(reqs));
        let progress = run.progress();
        let mut outcomes: Vec<Outcome> = Vec::new();
        let collect = async {
            while let Some(o) = run.next().await {
                outcomes.push(o);
            }
            run.finish().await
        };
        // Invariant 1: the run terminates. Under paused time a stuck engine makes the
        // clock jump straight to this timeout.
        let end = tokio::time::timeout(Duration::from_secs(24 * 3600), collect)
            .await
            .map_err(|_| "the run did not terminate".to_string())?;
        let wall = Instant::now() - started;

        // Invariant 1: exactly one outcome per request.
        let mut by_id: HashMap<&str, &Outcome> = HashMap::new();
        for o in &outcomes {
            if by_id.insert(&o.custom_id, o).is_some() {
                return Err(format!("two outcomes for {}", o.custom_id));
            }
        }
        if by_id.len() != n {
            return Err(format!("{} outcomes for {n} requests", by_id.len()));
        }
        if config.order == Order::Input {
            let ids: Vec<&str> = outcomes.iter().map(|o| o.custom_id.as_str()).collect();
            let want: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
            if ids != want.iter().map(String::as_str).collect::<Vec<_>>() {
                return Err("input order not kept".into());
            }
        }

        // The summary's counts equal the outcomes, and so do the live counters.
        let snap = progress.snapshot();
        let mut summary = SummaryBuilder::new();
        for o in &outcomes {
            summary.add(o);
        }
        let summary = summary.finish(&snap, Some(&end), wall, config.rpm, config.tpm);
        let ok = outcomes
            .iter()
            .filter(|o| o.status == Status::Succeeded)
            .count() as u64;
        if summary.total != n as u64 || summary.succeeded != ok || summary.failed != n as u64 - ok {
            return Err(format!("summary {summary:?} disagrees with {ok} ok of {n}"));
        }
        if summary.failures.values().map(|g| g.count).sum::<u64>() != summary.failed {
            return Err("failure groups do not add up".into());
        }
        if snap.succeeded != ok || snap.failed != n as u64 - ok || snap.admitted != n as u64 {
            return Err(format!("progress {snap:?} disagrees with {ok} ok of {n}"));
        }
        if snap.in_flight != 0 || snap.waiting != 0 {
            return Err(format!("gauges not back to zero: {snap:?}"));
        }

        let log = fake.log.lock().unwrap();
        let total_attempts: usize = log.values().map(Vec::len).sum();
        if snap.attempts != total_attempts as u64 {
            return Err(format!(
                "{} attempts counted, {total_attempts} made",
                snap.attempts
            ));
        }
        let rl = &config.retry;
        for o in &outcomes {
            let sent = log.get(&o.custom_id).map(Vec::as_slice).unwrap_or(&[]);
            if o.attempts as usize != sent.len() {
                return Err(format!(
                    "{}: outcome says {} attempts, provider saw {}",
                    o.custom_id,
                    o.attempts,
                    sent.len()
                ));
            }
            // What the client saw: an undelivered answer is a timeout, a transient failure.
            let answers: Vec<Answer> = sent
                .iter()
                .map(|(a, delivered)| if *delivered { *a } else { Answer::Hang })
                .collect();
            // Budgets: transient failures within max_attempts, 429s within the wait budget.
            let failures = answers
                .iter()
                .filter(|a| matches!(a, Answer::Transient | Answer::Hang))
                .count();
            let waits = answers
                .iter()
                .filter(|a| **a == Answer::RateLimited)
                .count();
            if failures > rl.max_attempts as usize || waits > rl.max_rate_limit_waits as usize + 1 {
                return Err(format!(
                    "{}: {failures} failures, {waits} 429s exceed the budgets {rl:?}",
                    o.custom_id
                ));
            }
            // Permanent errors are tried once and end the request.
            if let Some(p) = answers.iter().position(|a| *a == Answer::Permanent) {
                if p != answers.len() - 1 {
                    return Err(format!("{}: retried after a permanent error", o.custom_id));
                }
                let kind = o.error.as_ref().map(|e| e.kind);
                if !matches!(kind, Some(ErrorKind::BadRequest | ErrorKind::NotFound)) {
                    return Err(format!(
                        "{}: permanent error reported as {kind:?}",
                        o.custom_id
                    ));
                }
            }
            match o.status {
                Status::Succeeded => {
                    if answers.last() != Some(&Answer::Ok)
                        || o.response.is_none()
                        || o.usage.is_none()
                    {
                        return Err(format!("{}: succeeded without a 200", o.custom_id));
                    }
                }
                Status::Failed => {
                    if o.error.is_none() || answers.contains(&Answer::Ok) {
                        return Err(format!(
                            "{}: failed but had a 200, or no error",
                            o.custom_id
                        ));
                    }
                }
            }
            if let Some(d) = config.deadline {
                if Duration::from_millis(o.latency_ms) > d + Duration::from_millis(1) {
                    return Err(format!(
                        "{}: took {}ms past its {d:?} deadline",
                        o.custom_id, o.latency_ms
                    ));
                }
            }
        }

        // Invariant 4: one cooldown per burst, and nothing sent during one, for each
        // model (each has its own cooldowns and generations).
        let events = events.lock().unwrap();
        let mut triggers = std::collections::HashSet::new();
        let mut cooldowns = Vec::new();
        let mut sends = Vec::new();
        let mut stop_index = None;
        for (i, e) in events.iter().enumerate() {
            match e {
                EngineEvent::Cooldown {
                    model,
                    trigger_generation,
                    at,
                    until,
                } => {
                    if !triggers.insert((model.clone(), *trigger_generation)) {
                        return Err(format!(
                            "two cooldowns of {model} from generation {trigger_generation}"
                        ));
                    }
                    cooldowns.push((i, model.as_str(), *at, *until));
                }
                EngineEvent::Sent {
                    model,
                    at,
                    generation,
                    ..
                } => sends.push((i, model.as_str(), *at, *generation)),
                EngineEvent::Stopping { .. } => stop_index = stop_index.or(Some(i)),
            }
        }
        if cooldowns.len() as u64 != snap.cooldowns {
            return Err("cooldown count disagrees with events".into());
        }
        if snap.rate_limited > 0 && cooldowns.is_empty() {
            return Err("429s without any cooldown".into());
        }
        // A send at the very instant a cooldown starts, but before the 429 arrived, is
        // fine: compare starts by event order and ends by time.
        for (i, model, at, _) in &sends {
            if let Some((s, u)) = cooldowns
                .iter()
                .find(|(ci, m, _, u)| m == model && i > ci && at < u)
                .map(|(_, _, s, u)| (s, u))
            {
                return Err(format!(
                    "{model} sent at {:?} during its cooldown [{:?}, {:?})",
                    *at - fake.start,
                    *s - fake.start,
                    *u - fake.start
                ));
            }
        }
        // Generations only grow, one per cooldown of the model.
        for model in &MODELS[..models] {
            let gens: Vec<u64> = sends
                .iter()
                .filter(|s| s.1 == *model)
                .map(|s| s.3)
                .collect();
            let own = cooldowns.iter().filter(|c| c.1 == *model).count() as u64;
            if gens.windows(2).any(|w| w[1] < w[0]) || gens.last().is_some_and(|g| *g > own) {
                return Err(format!("generations of {model} out of order"));
            }
        }
        // Quota exhaustion: nothing is sent after the engine learns of it.
        let quota_seen = log
            .values()
            .flatten()
            .any(|(a, delivered)| *a == Answer::Quota && *delivered);
        if quota_seen != end.stopped.is_some() {
            return Err(format!("quota seen {quota_seen}, run end {end:?}"));
        }
        if let Some(si) = stop_index {
            if sends.iter().any(|(i, ..)| *i > si) {
                return Err("sent after the quota stop".into());
            }
        }
        Ok(())
    })
}

#[test]
fn deterministic_simulation() {
    if let Ok(seed) = std::env::var("SLUICE_DST_SEED") {
        let seed: u64 = seed.parse().expect("SLUICE_DST_SEED is a number");
        if let Err(e) = check(seed) {
            panic!("seed {seed}: {e}");
        }
        return;
    }
    let count: u64 = std::env::var("SLUICE_DST_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (0..count)
                        .filter(|seed| seed % threads == t)
                        .filter_map(|seed| check(seed).err().map(|e| format!("seed {seed}: {e}")))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {count} schedules failed (replay one with SLUICE_DST_SEED=N):\n{}",
        failures.len(),
        failures
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
