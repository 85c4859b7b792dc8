//! Fallback chains and circuit breakers, against a fake provider under paused time: a
//! request moves to the next model on a model-specific error (404, context too long) or
//! when its model's circuit is open, and only then.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::HeaderMap;
use sluice::provider::{AttemptFuture, HttpResponse, Transport};
use sluice::retry::BreakerPolicy;
use sluice::{Engine, EngineConfig, ErrorKind, LineParser, Outcome, Request, RetryPolicy, Status};

/// Answers by model: a fixed status and body for each, and counts attempts per model.
struct ByModel {
    answers: HashMap<&'static str, (u16, &'static str)>,
    attempts: Mutex<HashMap<String, u32>>,
}

impl Transport for ByModel {
    fn send(&self, request: &Request) -> AttemptFuture {
        *self
            .attempts
            .lock()
            .unwrap()
            .entry(request.model.clone())
            .or_default() += 1;
        let (status, body) = self.answers[request.model.as_str()];
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(HttpResponse {
                status,
                headers: HeaderMap::new(),
                body: Bytes::from_static(body.as_bytes()),
            })
        })
    }
}

const OK: (u16, &str) = (
    200,
    r#"{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
);
const NOT_FOUND: (u16, &str) = (
    404,
    r#"{"error":{"message":"The model does not exist","type":"invalid_request_error","code":"model_not_found"}}"#,
);
const TOO_LONG: (u16, &str) = (
    400,
    r#"{"error":{"message":"This model's maximum context length is 8192 tokens","code":"context_length_exceeded"}}"#,
);
const BAD: (u16, &str) = (
    400,
    r#"{"error":{"message":"Invalid value for 'temperature'","code":"invalid_value"}}"#,
);
const DOWN: (u16, &str) = (503, r#"{"error":{"message":"unavailable"}}"#);

async fn run(
    answers: &[(&'static str, (u16, &'static str))],
    chain: &[&str],
    n: usize,
    config: EngineConfig,
) -> (Vec<Outcome>, HashMap<String, u32>, u64) {
    let fake = Arc::new(ByModel {
        answers: answers.iter().copied().collect(),
        attempts: Mutex::new(HashMap::new()),
    });
    let mut parser = LineParser::new(Some(chain[0].to_string()));
    parser.fallback_models = chain[1..].iter().map(|m| m.to_string()).collect();
    let requests: Vec<Request> = (0..n)
        .map(|i| {
            let mut request = parser
                .parse(
                    i as u64 + 1,
                    &format!(r#"{{"prompt":"q{i}","metadata":{{"i":{i}}}}}"#),
                )
                .unwrap();
            request.cache_key = Some(key_of(i));
            request
        })
        .collect();
    let mut run = Engine::new(config, fake.clone()).run(futures::stream::iter(requests));
    let progress = run.progress();
    let mut outcomes = Vec::new();
    while let Some(o) = run.next().await {
        outcomes.push(o);
    }
    run.finish().await;
    outcomes.sort_by_key(|o| o.line);
    let attempts = fake.attempts.lock().unwrap().clone();
    (outcomes, attempts, progress.snapshot().fallbacks)
}

/// The cache key given to the `i`th request (the engine passes it to the outcome).
fn key_of(i: usize) -> [u8; 32] {
    [i as u8 + 1; 32]
}

fn quick() -> EngineConfig {
    EngineConfig::builder()
        .concurrency(1)
        .retry(RetryPolicy {
            backoff_base: Duration::from_millis(100),
            ..RetryPolicy::default()
        })
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_404_or_a_too_long_context_moves_the_request_to_the_next_model() {
    let (outcomes, attempts, fallbacks) = run(
        &[("a", NOT_FOUND), ("b", TOO_LONG), ("c", OK)],
        &["a", "b", "c"],
        4,
        quick(),
    )
    .await;
    for (i, o) in outcomes.iter().enumerate() {
        assert_eq!(o.status, Status::Succeeded, "{o:?}");
        assert_eq!(o.model, "c", "the output says which model answered");
        assert_eq!(o.attempts, 3);
        assert_eq!(
            o.cache_key,
            Some(key_of(i)),
            "the first model's key, where the cache layer waits for the answer"
        );
        assert_eq!(
            o.metadata.as_ref().unwrap().get(),
            format!(r#"{{"i":{i}}}"#)
        );
    }
    assert_eq!(attempts["a"], 4);
    assert_eq!(attempts["b"], 4);
    assert_eq!(fallbacks, 8);
}

#[tokio::test(start_paused = true)]
async fn other_errors_do_not_fall_back_and_the_last_model_fails() {
    let (outcomes, attempts, _) = run(&[("a", BAD), ("b", OK)], &["a", "b"], 2, quick()).await;
    for o in &outcomes {
        assert_eq!(o.error.as_ref().unwrap().kind, ErrorKind::BadRequest);
        assert_eq!((o.model.as_str(), o.attempts), ("a", 1));
    }
    assert!(
        !attempts.contains_key("b"),
        "a bad request is bad for every model"
    );

    let (outcomes, _, _) = run(
        &[("a", NOT_FOUND), ("b", NOT_FOUND)],
        &["a", "b"],
        1,
        quick(),
    )
    .await;
    assert_eq!(
        outcomes[0].error.as_ref().unwrap().kind,
        ErrorKind::NotFound
    );
    assert_eq!((outcomes[0].model.as_str(), outcomes[0].attempts), ("b", 2));
    assert_eq!(outcomes[0].cache_key, Some(key_of(0)), "on failure too");
}

#[tokio::test(start_paused = true)]
async fn an_open_circuit_sends_requests_to_the_fallback_without_trying_its_model() {
    let mut config = quick();
    config.breaker = Some(BreakerPolicy {
        threshold: 3,
        cool_off: Duration::from_secs(3600),
    });
    let (outcomes, attempts, fallbacks) =
        run(&[("a", DOWN), ("b", OK)], &["a", "b"], 10, config).await;
    assert!(outcomes
        .iter()
        .all(|o| o.status == Status::Succeeded && o.model == "b"));
    // The first request met three 503s in a row: the circuit opened and it moved on
    // without waiting out a backoff; every later request skipped `a` altogether.
    assert_eq!(attempts["a"], 3, "{attempts:?}");
    assert_eq!(outcomes[0].attempts, 4);
    assert!(outcomes[1..].iter().all(|o| o.attempts == 1));
    assert_eq!(fallbacks, 10);

    // Without a breaker, every request exhausts its retries on `a` first.
    let mut config = quick();
    config.retry.max_attempts = 2;
    let (outcomes, attempts, _) = run(&[("a", DOWN), ("b", OK)], &["a", "b"], 3, config).await;
    assert_eq!(attempts["a"], 6);
    assert!(outcomes
        .iter()
        .all(|o| o.status == Status::Failed && o.model == "a"));
}

#[tokio::test(start_paused = true)]
async fn with_no_fallback_an_open_circuit_waits_for_its_probe() {
    // `a` fails twice, then recovers; the breaker opens after 2 and the one request
    // waits out the cool-off, then its probe succeeds.
    struct Flaky(Mutex<u32>);
    impl Transport for Flaky {
        fn send(&self, _: &Request) -> AttemptFuture {
            let mut n = self.0.lock().unwrap();
            *n += 1;
            let (status, body) = if *n <= 2 { DOWN } else { OK };
            Box::pin(async move {
                Ok(HttpResponse {
                    status,
                    headers: HeaderMap::new(),
                    body: Bytes::from_static(body.as_bytes()),
                })
            })
        }
    }
    let config = EngineConfig::builder()
        .breaker(BreakerPolicy {
            threshold: 2,
            cool_off: Duration::from_secs(60),
        })
        .retry(RetryPolicy {
            backoff_base: Duration::from_millis(10),
            ..RetryPolicy::default()
        })
        .build()
        .unwrap();
    let parser = LineParser::new(Some("a".into()));
    let request = parser.parse(1, r#"{"prompt":"x"}"#).unwrap();
    let start = tokio::time::Instant::now();
    let mut run = Engine::new(config, Arc::new(Flaky(Mutex::new(0))))
        .run(futures::stream::iter(vec![request]));
    let o = run.next().await.unwrap();
    assert_eq!(o.status, Status::Succeeded);
    assert_eq!(o.attempts, 3);
    assert!(
        start.elapsed() >= Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
}
