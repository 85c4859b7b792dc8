//! Using sluice as a library: start a simulator in-process, run 200 requests through the
//! engine at 1,200 requests a minute, and print each outcome and the summary.
//!
//! ```sh
//! cargo run --release -p sluice --example library
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sluice::provider::http::HttpTransport;
use sluice::summary::SummaryBuilder;
use sluice::{Engine, EngineConfig, LineParser, Status};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A local OpenAI-compatible server that enforces 1,200 RPM and fails 5% of attempts.
    let sim = sluice_sim::start(
        sluice_sim::SimConfig {
            rpm: Some(1_200),
            latency: Duration::from_millis(100),
            faults: vec![(sluice_sim::FaultKind::Http503, 0.05)],
            ..Default::default()
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .await?;

    let config = EngineConfig::builder()
        .rpm(1_200.0)
        .concurrency(32)
        .max_attempts(5)
        .build()?;
    let transport = HttpTransport::new(&sim.base_url(), None, 32)?;
    let parser = LineParser::new(Some("gpt-4.1-mini".into()));
    let requests = (1..=200u64).map(move |i| {
        let line =
            format!(r#"{{"custom_id":"item-{i}","prompt":"Name a colour ({i})","max_tokens":16}}"#);
        parser.parse(i, &line).expect("a valid line")
    });

    let started = Instant::now();
    let mut run =
        Engine::new(config.clone(), Arc::new(transport)).run(futures::stream::iter(requests));
    let progress = run.progress();
    let mut summary = SummaryBuilder::new();
    while let Some(outcome) = run.next().await {
        if outcome.status == Status::Succeeded && outcome.attempts > 1 {
            println!(
                "{} succeeded after {} attempts",
                outcome.custom_id, outcome.attempts
            );
        }
        summary.add(&outcome);
    }
    let end = run.finish().await;
    let summary = summary.finish(
        &progress.snapshot(),
        Some(&end),
        started.elapsed(),
        config.rpm,
        config.tpm,
    );
    print!("{summary}");
    sim.shutdown().await;
    Ok(())
}
