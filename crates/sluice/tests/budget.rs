//! The budget under concurrency, by deterministic simulation: hundreds of seeded
//! schedules against an in-process fake provider under `tokio::time::pause()`, with random
//! concurrency, latencies, output lengths, 429s, 5xx and truncated (billed) bodies. Each
//! asserts that what the provider billed never exceeds the budget, that the run's own
//! account of its spending is within the budget and not below what was billed, and that
//! every request has exactly one outcome. Most schedules also record a bound on what the
//! run may have spent ([`ExposureGate`]): what the answers so far were billed and the
//! worst case of the attempts on the wire never pass the bound last recorded, and a gate
//! that fails stops the run cleanly.
//!
//! `SLUICE_BUDGET_SCHEDULES` sets how many schedules run (default 300).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::HeaderMap;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sluice::catalog::{Catalog, Router, RouterOptions};
use sluice::engine::{worst_case_cost, StopReason};
use sluice::provider::{AttemptFuture, HttpResponse, Transport};
use sluice::{
    Engine, EngineConfig, ErrorKind, ExposureGate, LineParser, Price, Request, RetryPolicy, Usage,
};

struct Fake {
    rng: Mutex<SmallRng>,
    price: Price,
    /// What the provider billed: every 2xx it produced, whole or cut.
    billed: Mutex<f64>,
    p_truncated: f64,
    p_error: f64,
    /// The worst case of the attempts on the wire, what the answers that came back were
    /// billed, and the bound last recorded by the exposure gate (`None`: no gate).
    exposure: Arc<Mutex<(f64, f64, Option<f64>)>>,
}

impl Transport for Fake {
    fn send(&self, request: &Request) -> AttemptFuture {
        let (latency, roll, completion) = {
            let mut rng = self.rng.lock().unwrap();
            (
                Duration::from_millis(rng.random_range(1..200)),
                rng.random::<f64>(),
                rng.random_range(0..=u64::from(request.max_output_tokens)),
            )
        };
        // The provider's own count of the input may be below sluice's estimate (the
        // margin covers tokenizers that count more), never above it with the margin.
        let prompt = u64::from(request.input_tokens);
        let usage = Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            ..Usage::default()
        };
        let body = format!(
            r#"{{"id":"x","usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion},"total_tokens":{}}}}}"#,
            prompt + completion
        );
        let worst = worst_case_cost(request);
        {
            let mut e = self.exposure.lock().unwrap();
            e.0 += worst;
            if let Some(bound) = e.2 {
                assert!(
                    e.1 + e.0 <= bound + 1e-9,
                    "{} billed and {} on the wire, past the bound recorded, {bound}",
                    e.1,
                    e.0
                );
            }
        }
        let exposure = self.exposure.clone();
        let mut bill = 0.0;
        let (status, body) = if roll < self.p_error / 2.0 {
            (
                429,
                r#"{"error":{"code":"rate_limit_exceeded","message":"slow"}}"#.to_string(),
            )
        } else if roll < self.p_error {
            (500, r#"{"error":{"message":"boom"}}"#.to_string())
        } else if roll < self.p_error + self.p_truncated {
            bill = self.price.cost(&usage);
            (200, body[..body.len() / 2].to_string())
        } else {
            bill = self.price.cost(&usage);
            (200, body)
        };
        *self.billed.lock().unwrap() += bill;
        Box::pin(async move {
            tokio::time::sleep(latency).await;
            {
                let mut e = exposure.lock().unwrap();
                e.0 -= worst;
                e.1 += bill;
            }
            Ok(HttpResponse {
                status,
                headers: HeaderMap::new(),
                body: Bytes::from(body),
            })
        })
    }
}

/// Runs one schedule; returns whether the budget stopped it.
async fn schedule(seed: u64) -> bool {
    let mut rng = SmallRng::seed_from_u64(seed);
    let n = rng.random_range(1..120usize);
    let concurrency = rng.random_range(1..64usize);
    let budget = rng.random_range(0.0001..0.05f64);
    let router = Arc::new(Router::new(Catalog::builtin(), RouterOptions::default()));
    let mut parser = LineParser::new(Some("gpt-4.1".into()));
    parser.router = Some(router);
    parser.enforce_output_bound = true;
    parser.assumed_output_tokens = rng.random_range(1..400);
    let requests: Vec<Request> = (0..n)
        .map(|i| {
            let words = "lorem ipsum dolor ".repeat(rng.random_range(1..50));
            parser
                .parse(i as u64 + 1, &format!(r#"{{"prompt":"{i} {words}"}}"#))
                .unwrap()
        })
        .collect();
    let price = requests[0].price.unwrap();
    let fake = Arc::new(Fake {
        rng: Mutex::new(SmallRng::seed_from_u64(seed ^ 0xfa4e)),
        price,
        billed: Mutex::new(0.0),
        p_truncated: rng.random_range(0.0..0.2),
        p_error: rng.random_range(0.0..0.3),
        exposure: Arc::default(),
    });
    // Most schedules record the bound; one in five of those has the gate fail at its
    // third bound.
    let gated = !seed.is_multiple_of(4);
    let fails_at = if seed.is_multiple_of(5) { 3 } else { u32::MAX };
    let gate_failed = Arc::new(Mutex::new(false));
    let mut config = EngineConfig::builder()
        .concurrency(concurrency)
        .budget_usd(budget)
        .seed(seed)
        .retry(RetryPolicy {
            max_attempts: 4,
            backoff_base: Duration::from_millis(10),
            cooldown_base: Duration::from_millis(10),
            ..RetryPolicy::default()
        })
        .build()
        .unwrap();
    if gated {
        fake.exposure.lock().unwrap().2 = Some(0.0);
        let (exposure, failed) = (fake.exposure.clone(), gate_failed.clone());
        let calls = Mutex::new(0u32);
        config.exposure = Some(ExposureGate::new(move |usd| {
            let mut calls = calls.lock().unwrap();
            *calls += 1;
            if *calls >= fails_at {
                *failed.lock().unwrap() = true;
                return false;
            }
            assert!(
                usd <= budget + 1e-9,
                "a bound {usd} past the budget {budget}"
            );
            exposure.lock().unwrap().2 = Some(usd);
            true
        }));
    }
    let mut run = Engine::new(config, fake.clone()).run(futures::stream::iter(requests));
    let mut outcomes = Vec::new();
    while let Some(o) = run.next().await {
        outcomes.push(o);
    }
    let end = run.finish().await;

    let billed = *fake.billed.lock().unwrap();
    let accounted: f64 = outcomes.iter().map(|o| o.cost_usd.unwrap()).sum();
    let eps = 1e-9;
    assert!(
        billed <= budget + eps,
        "seed {seed}: billed {billed} > budget {budget}"
    );
    assert!(
        accounted <= budget + eps,
        "seed {seed}: accounted {accounted} > budget {budget}"
    );
    assert!(
        accounted + eps >= billed,
        "seed {seed}: accounted {accounted} < billed {billed}"
    );
    assert_eq!(outcomes.len(), n, "seed {seed}: one outcome per request");
    let mut ids: Vec<_> = outcomes.iter().map(|o| o.custom_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "seed {seed}: no request twice");
    let unsent = outcomes
        .iter()
        .filter(|o| {
            o.error
                .as_ref()
                .is_some_and(|e| e.kind == ErrorKind::NotAttempted)
        })
        .count();
    let gate_failed = *gate_failed.lock().unwrap();
    match end.stopped {
        Some(StopReason::Failed) if gate_failed => {}
        _ if gate_failed => panic!("seed {seed}: the gate failed, the run ended {end:?}"),
        Some(StopReason::BudgetExhausted) => {}
        None => assert_eq!(unsent, 0, "seed {seed}: not attempted without a stop"),
        other => panic!("seed {seed}: stopped for {other:?}"),
    }
    for o in &outcomes {
        if o.attempts == 0 {
            assert_eq!(o.cost_usd, Some(0.0), "seed {seed}: unsent but charged");
        }
    }
    end.stopped.is_some()
}

#[tokio::test(start_paused = true)]
async fn the_budget_is_never_exceeded_under_concurrency() {
    let schedules: u64 = std::env::var("SLUICE_BUDGET_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut stopped = 0;
    for seed in 0..schedules {
        if schedule(seed).await {
            stopped += 1;
        }
    }
    // Both kinds of schedule were tried: budgets that bind and budgets that do not.
    assert!(
        stopped > schedules / 4 && stopped < schedules,
        "{stopped} of {schedules} schedules hit the budget"
    );
}
