//! When the engine turns the runtime's wake grid on (`sluice::wake`): only while a rate
//! limit holds requests back and requests go out at least `MIN_PER_STEP` per send step.
//! Against an in-process fake provider under `tokio::time::pause()`.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::HeaderMap;
use sluice::provider::{AttemptFuture, HttpResponse, Transport};
use sluice::{Engine, EngineConfig, LineParser, Request, WakeGrid};
use std::sync::Arc;

/// Answers every request after a fixed latency.
struct Fixed(Duration);

impl Transport for Fixed {
    fn send(&self, _request: &Request) -> AttemptFuture {
        let latency = self.0;
        Box::pin(async move {
            tokio::time::sleep(latency).await;
            Ok(HttpResponse {
                status: 200,
                headers: HeaderMap::new(),
                body: Bytes::from_static(
                    br#"{"id":"x","usage":{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10}}"#,
                ),
            })
        })
    }
}

/// Settings with `grid`, at `rpm` (none: unpaced) and `concurrency`.
fn config(grid: &WakeGrid, rpm: Option<f64>, concurrency: usize) -> EngineConfig {
    let mut b = EngineConfig::builder()
        .concurrency(concurrency)
        .wake_grid(grid.clone());
    if let Some(r) = rpm {
        b = b.rpm(r);
    }
    b.build().unwrap()
}

/// Runs `n` requests and returns, for each outcome in arrival order, whether the grid was
/// on when it came out, and whether it was on after the run.
async fn run(
    config: EngineConfig,
    grid: &WakeGrid,
    n: u64,
    latency: Duration,
) -> (Vec<bool>, bool) {
    let parser = LineParser::new(Some("gpt-4.1-mini".into()));
    let requests: Vec<_> = (1..=n)
        .map(|i| {
            parser
                .parse(i, r#"{"prompt": "hi", "max_tokens": 8}"#)
                .unwrap()
        })
        .collect();
    let mut run =
        Engine::new(config, Arc::new(Fixed(latency))).run(futures::stream::iter(requests));
    let mut seen = Vec::new();
    while let Some(outcome) = run.next().await {
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        seen.push(grid.is_active());
    }
    run.finish().await;
    (seen, grid.is_active())
}

#[tokio::test(start_paused = true)]
async fn on_while_a_fast_rate_limit_holds_requests_back() {
    let grid = WakeGrid::new();
    let config = config(&grid, Some(6000.0), 256);
    let (seen, after) = run(config, &grid, 600, Duration::from_millis(300)).await;
    assert_eq!(seen.len(), 600);
    // The pace is measured over half a second, and the last requests drain with nothing
    // held.
    let on = seen.iter().filter(|&&a| a).count();
    assert!(on >= 300, "on for only {on} of 600 outcomes");
    assert!(
        seen[150..450].iter().all(|&a| a),
        "off in the middle of the run"
    );
    assert!(!after, "left on after the run");
}

#[tokio::test(start_paused = true)]
async fn on_at_500_rpm() {
    // 0.83 requests per 100 ms step: most steps send one anyway.
    let grid = WakeGrid::new();
    let config = config(&grid, Some(500.0), 64);
    let (seen, after) = run(config, &grid, 200, Duration::from_millis(300)).await;
    assert!(
        seen[50..150].iter().all(|&a| a),
        "off in the middle of the run"
    );
    assert!(!after);
}

#[tokio::test(start_paused = true)]
async fn off_when_nothing_is_paced() {
    let grid = WakeGrid::new();
    let config = config(&grid, None, 16);
    let (seen, after) = run(config, &grid, 2000, Duration::from_millis(5)).await;
    assert_eq!(seen.len(), 2000);
    assert!(seen.iter().all(|&a| !a), "on in an unpaced run");
    assert!(!after);
}

#[tokio::test(start_paused = true)]
async fn off_at_a_slow_pace() {
    // One request a second: fewer than two responses per 100 ms step.
    let grid = WakeGrid::new();
    let config = config(&grid, Some(60.0), 16);
    let (seen, _) = run(config, &grid, 8, Duration::from_millis(300)).await;
    assert!(seen.iter().all(|&a| !a), "on at one request a second");
}
