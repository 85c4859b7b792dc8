//! Limits learned from the provider's headers, under paused time: a fake provider
//! enforces a limit sluice is not told, announcing it only in its rate-limit headers
//! (OpenAI's requests limit; Anthropic's output-tokens limit), and sluice must converge
//! to at least 95% of it with at most 0.5% of requests getting a 429.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue};
use sluice::catalog::{Catalog, Router, RouterOptions};
use sluice::provider::{AttemptFuture, HttpResponse, Transport};
use sluice::{Engine, EngineConfig, LineParser, Request, Status};
use tokio::time::Instant;

/// The provider's limit, and which header family announces it.
#[derive(Clone, Copy)]
enum Limit {
    /// OpenAI: requests per minute.
    Requests(u64),
    /// Anthropic: output tokens per minute, charged `max_tokens` at admission and
    /// refunded the unused part on success.
    OutputTokens(u64),
}

struct Provider {
    limit: Limit,
    latency: Duration,
    /// Bucket level and when it was last refilled (one second of burst, like the
    /// simulator).
    bucket: Mutex<(f64, Instant)>,
    /// Every answer: when it was admitted and whether it was a 429.
    log: Mutex<Vec<(Instant, bool)>>,
    start: Instant,
}

impl Provider {
    fn new(limit: Limit, latency: Duration) -> Provider {
        let per_minute = match limit {
            Limit::Requests(n) | Limit::OutputTokens(n) => n,
        };
        Provider {
            limit,
            latency,
            bucket: Mutex::new((per_minute as f64 / 60.0, Instant::now())),
            log: Mutex::new(Vec::new()),
            start: Instant::now(),
        }
    }
}

impl Transport for Provider {
    fn send(&self, request: &Request) -> AttemptFuture {
        let now = Instant::now();
        let (per_minute, cost, used) = match self.limit {
            Limit::Requests(n) => (n, 1.0, 0.0),
            // The answer uses a third of its bound.
            Limit::OutputTokens(n) => {
                let max = f64::from(request.max_output_tokens);
                (n, max, (max / 3.0).floor())
            }
        };
        let rate = per_minute as f64 / 60.0;
        let (admitted, remaining) = {
            let mut b = self.bucket.lock().unwrap();
            b.0 = (b.0 + (now - b.1).as_secs_f64() * rate).min(rate);
            b.1 = now;
            if b.0 >= cost {
                b.0 -= cost;
                (true, b.0)
            } else {
                (false, b.0)
            }
        };
        self.log.lock().unwrap().push((now, !admitted));
        let mut headers = HeaderMap::new();
        let mut put = |k: &'static str, v: String| {
            headers.insert(k, HeaderValue::from_str(&v).unwrap());
        };
        let body = match self.limit {
            Limit::Requests(_) => {
                put("x-ratelimit-limit-requests", per_minute.to_string());
                put(
                    "x-ratelimit-remaining-requests",
                    (remaining.floor() as u64).to_string(),
                );
                put("x-ratelimit-reset-requests", "1s".into());
                format!(
                    r#"{{"id":"c","usage":{{"prompt_tokens":5,"completion_tokens":{used},"total_tokens":5}}}}"#
                )
            }
            Limit::OutputTokens(_) => {
                put(
                    "anthropic-ratelimit-output-tokens-limit",
                    per_minute.to_string(),
                );
                put(
                    "anthropic-ratelimit-output-tokens-remaining",
                    (remaining.floor() as u64).to_string(),
                );
                put(
                    "anthropic-ratelimit-output-tokens-reset",
                    "2030-01-01T00:00:00Z".into(),
                );
                format!(
                    r#"{{"id":"m","type":"message","usage":{{"input_tokens":5,"output_tokens":{used}}}}}"#
                )
            }
        };
        let (status, body) = if admitted {
            if let Limit::OutputTokens(_) = self.limit {
                // Settle: give back what the answer did not use.
                let mut b = self.bucket.lock().unwrap();
                b.0 = (b.0 + cost - used).min(rate);
            }
            (200, body)
        } else {
            headers.insert("retry-after", HeaderValue::from_static("1"));
            (
                429,
                r#"{"error":{"code":"rate_limit_exceeded","message":"slow down"},"type":"error"}"#
                    .to_string(),
            )
        };
        let latency = self.latency;
        Box::pin(async move {
            tokio::time::sleep(latency).await;
            Ok(HttpResponse {
                status,
                headers,
                body: Bytes::from(body),
            })
        })
    }
}

/// A line parser routing model names through the built-in catalog.
fn parser(default_model: Option<&str>) -> LineParser {
    let mut parser = LineParser::new(default_model.map(Into::into));
    parser.router = Some(Arc::new(Router::new(
        Catalog::builtin(),
        RouterOptions::default(),
    )));
    parser
}

/// `n` chat requests (max_tokens 64), request `i` for `model(i)`.
fn chat_requests(n: usize, model: impl Fn(usize) -> &'static str) -> Vec<Request> {
    let parser = parser(None);
    (0..n)
        .map(|i| {
            let line = format!(
                r#"{{"model":"{}","messages":[{{"role":"user","content":"request {i}"}}],"max_tokens":64}}"#,
                model(i)
            );
            parser.parse(i as u64 + 1, &line).unwrap()
        })
        .collect()
}

/// Runs `n` requests for `model`, learning limits; returns the provider and the
/// outcomes' completion times.
async fn run(
    limit: Limit,
    model: &str,
    max_tokens: u32,
    n: usize,
) -> (Arc<Provider>, Vec<Duration>) {
    let provider = Arc::new(Provider::new(limit, Duration::from_millis(300)));
    let parser = parser(Some(model));
    let requests: Vec<Request> = (0..n)
        .map(|i| {
            parser
                .parse(
                    i as u64 + 1,
                    &format!(r#"{{"prompt":"request {i}","max_tokens":{max_tokens}}}"#),
                )
                .unwrap()
        })
        .collect();
    let config = EngineConfig::builder()
        .concurrency(64)
        .learn_limits(true)
        .build()
        .unwrap();
    let mut run = Engine::new(config, provider.clone()).run(futures::stream::iter(requests));
    let mut done = Vec::new();
    while let Some(o) = run.next().await {
        assert_eq!(o.status, Status::Succeeded, "{o:?}");
        done.push(provider.start.elapsed());
    }
    run.finish().await;
    assert_eq!(done.len(), n);
    (provider, done)
}

fn check(provider: &Provider, done: &[Duration], per_second: f64, n: usize) {
    let log = provider.log.lock().unwrap();
    let rejected = log.iter().filter(|(_, r)| *r).count();
    assert!(
        rejected as f64 <= 0.005 * n as f64,
        "{rejected} 429s for {n} requests"
    );
    // Converged: over the middle of the run, completions at 95% of the limit or more.
    let from = Duration::from_secs(10);
    let to = *done.last().unwrap() - Duration::from_secs(5);
    let in_window = done.iter().filter(|t| **t >= from && **t < to).count() as f64;
    let rate = in_window / (to - from).as_secs_f64();
    assert!(
        rate >= 0.95 * per_second,
        "{rate:.2}/s against a limit of {per_second:.2}/s"
    );
}

#[tokio::test(start_paused = true)]
async fn an_openai_requests_limit_is_learned_from_headers() {
    // 1,200 RPM = 20/s; 1,600 requests take about 80 s.
    let n = 1600;
    let (provider, done) = run(Limit::Requests(1200), "gpt-4.1-mini", 64, n).await;
    check(&provider, &done, 20.0, n);
}

#[tokio::test(start_paused = true)]
async fn an_anthropic_output_tokens_limit_is_learned_and_paced_apart() {
    // 60,000 output tokens a minute (1,000/s), each request reserving 100 when admitted;
    // each answer uses a third of its bound and the rest is refunded on both sides, so
    // the sustained rate is 1,000 / 33.3 = 30 requests/s. (Requests are not limited.)
    let n = 1500;
    let (provider, done) = run(Limit::OutputTokens(60_000), "claude-haiku-4-5", 100, n).await;
    check(&provider, &done, 30.0, n);
}

/// Two models behind one transport, each with its own limit (as OpenAI and Anthropic
/// limit each model apart).
struct ByModel {
    slow: Arc<Provider>,
    fast: Arc<Provider>,
}

impl Transport for ByModel {
    fn send(&self, request: &Request) -> AttemptFuture {
        if request.model == "gpt-4.1-mini" {
            self.slow.send(request)
        } else {
            self.fast.send(request)
        }
    }
}

#[tokio::test(start_paused = true)]
async fn each_model_learns_and_keeps_its_own_limit() {
    // gpt-4.1-mini allows 120 RPM (2/s), gpt-4.1-nano 1,200 (20/s). One line in ten is
    // for the slow model, so it never backs the queue up to the concurrency limit. With
    // one set of limits for the run, the slow model's limit would hold the fast one back
    // (or the fast one's would overrun the slow one: 429s).
    let latency = Duration::from_millis(300);
    let slow = Arc::new(Provider::new(Limit::Requests(120), latency));
    let fast = Arc::new(Provider::new(Limit::Requests(1200), latency));
    let transport = Arc::new(ByModel {
        slow: slow.clone(),
        fast: fast.clone(),
    });
    let n = 1500;
    let requests = chat_requests(n, |i| {
        if i % 10 == 0 {
            "gpt-4.1-mini"
        } else {
            "gpt-4.1-nano"
        }
    });
    let config = EngineConfig::builder()
        .concurrency(64)
        .learn_limits(true)
        .build()
        .unwrap();
    let mut run = Engine::new(config, transport).run(futures::stream::iter(requests));
    let (mut done_slow, mut done_fast) = (Vec::new(), Vec::new());
    while let Some(o) = run.next().await {
        assert_eq!(o.status, Status::Succeeded, "{o:?}");
        if o.model == "gpt-4.1-mini" {
            done_slow.push(slow.start.elapsed());
        } else {
            done_fast.push(fast.start.elapsed());
        }
    }
    run.finish().await;
    assert_eq!((done_slow.len(), done_fast.len()), (n / 10, n - n / 10));
    // The fast model at 95% of its own limit or more, with at most 0.5% 429s...
    check(&fast, &done_fast, 20.0, n - n / 10);
    // ...and the slow one never pushed past its limit.
    let slow_429s = slow.log.lock().unwrap().iter().filter(|(_, r)| *r).count();
    assert!(
        slow_429s as f64 <= 0.005 * n as f64,
        "{slow_429s} 429s on the slow model"
    );
}

/// gpt-4.1-mini answers every first attempt with a 429 asking for 10 s; every other
/// model, and every later attempt, succeeds.
struct Cooling {
    tried: Mutex<std::collections::HashSet<String>>,
}

impl Transport for Cooling {
    fn send(&self, request: &Request) -> AttemptFuture {
        let first = request.model == "gpt-4.1-mini"
            && self.tried.lock().unwrap().insert(request.custom_id.clone());
        let mut headers = HeaderMap::new();
        let (status, body) = if first {
            headers.insert("retry-after", HeaderValue::from_static("10"));
            (
                429,
                r#"{"error":{"code":"rate_limit_exceeded","message":"slow down"}}"#,
            )
        } else {
            (
                200,
                r#"{"id":"c","usage":{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10}}"#,
            )
        };
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Ok(HttpResponse {
                status,
                headers,
                body: Bytes::from(body),
            })
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_cooldown_of_one_model_does_not_hold_back_another() {
    // 600 RPM: the 60 gpt-4.1-nano requests go out over about six seconds; the
    // gpt-4.1-mini request at the head gets a 429 asking for 10 s at 0.3 s. Only that
    // model waits.
    let requests = chat_requests(61, |i| {
        if i == 0 {
            "gpt-4.1-mini"
        } else {
            "gpt-4.1-nano"
        }
    });
    let config = EngineConfig::builder()
        .concurrency(64)
        .rpm(600.0)
        .build()
        .unwrap();
    let transport = Arc::new(Cooling {
        tried: Mutex::default(),
    });
    let start = Instant::now();
    let mut run = Engine::new(config, transport).run(futures::stream::iter(requests));
    let (mut last_nano, mut mini) = (Duration::ZERO, None);
    while let Some(o) = run.next().await {
        assert_eq!(o.status, Status::Succeeded, "{o:?}");
        if o.model == "gpt-4.1-mini" {
            assert_eq!(o.attempts, 2);
            mini = Some(start.elapsed());
        } else {
            last_nano = last_nano.max(start.elapsed());
        }
    }
    run.finish().await;
    let mini = mini.expect("the mini request ended");
    assert!(mini >= Duration::from_secs(10), "mini done at {mini:?}");
    assert!(
        last_nano < Duration::from_secs(8),
        "the last nano request ended at {last_nano:?}, held by the other model's cooldown"
    );
}
