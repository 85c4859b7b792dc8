//! Every provider's wire API against `sluice sim` over real HTTP on 127.0.0.1: one input
//! line translated into each wire format, success with usage and cost, and every error
//! class (rate limit, transient, permanent, authentication, quota exhaustion).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use sluice::catalog::{Catalog, Router, RouterOptions};
use sluice::engine::{RunEnd, StopReason};
use sluice::provider::http::{HttpTransport, TargetConfig};
use sluice::{
    Engine, EngineConfig, ErrorKind, LineParser, Outcome, ProviderKind, RetryPolicy, Status,
};
use sluice_sim::{FaultKind, SimConfig, SimHandle, SimStats};

const MODELS: [(&str, ProviderKind); 3] = [
    ("gpt-4.1-mini", ProviderKind::OpenAi),
    ("claude-haiku-4-5", ProviderKind::Anthropic),
    ("gemini-2.5-flash", ProviderKind::Gemini),
];

struct Job {
    sim: SimConfig,
    /// The key each provider's target sends (`None`: the simulator's own key).
    key: Option<&'static str>,
    engine: EngineConfig,
}

impl Default for Job {
    fn default() -> Self {
        Job {
            sim: SimConfig::default(),
            key: None,
            engine: EngineConfig::builder()
                .retry(RetryPolicy {
                    backoff_base: Duration::from_millis(5),
                    backoff_max: Duration::from_millis(50),
                    ..RetryPolicy::default()
                })
                .attempt_timeout(Duration::from_secs(5))
                .build()
                .unwrap(),
        }
    }
}

async fn run(job: Job, lines: &[String]) -> (Vec<Outcome>, RunEnd, SimStats) {
    let sim_key = "sim-key";
    let handle: SimHandle = sluice_sim::start(
        SimConfig {
            api_key: Some(sim_key.into()),
            ..job.sim
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .await
    .unwrap();
    let router = Arc::new(Router::new(
        Catalog::builtin(),
        RouterOptions {
            sim_origin: Some(format!("http://{}", handle.addr)),
            ..RouterOptions::default()
        },
    ));
    let mut parser = LineParser::new(None);
    parser.router = Some(router.clone());
    let requests: Vec<_> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            parser
                .parse(i as u64 + 1, l)
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    let targets: Vec<TargetConfig> = router
        .targets()
        .into_iter()
        .map(|t| TargetConfig {
            provider: t.provider,
            base_url: t.base_url,
            api_key: Some(job.key.unwrap_or(sim_key).to_string()),
        })
        .collect();
    let transport = HttpTransport::with_targets(&targets, 16).unwrap();
    let mut run = Engine::new(job.engine, Arc::new(transport)).run(futures::stream::iter(requests));
    let mut outcomes = Vec::new();
    while let Some(o) = run.next().await {
        outcomes.push(o);
    }
    let end = run.finish().await;
    let stats = handle.stats();
    handle.shutdown().await;
    outcomes.sort_by_key(|o| o.line);
    (outcomes, end, stats)
}

fn line(model: &str, id: &str, extra: &str) -> String {
    format!(
        r#"{{"custom_id":"{id}","model":"{model}","system":"Answer in one word.","prompt":"{id}: what colour is the sky on a clear day?","max_tokens":16{extra}}}"#
    )
}

fn kind(o: &Outcome) -> Option<ErrorKind> {
    o.error.as_ref().map(|e| e.kind)
}

#[tokio::test]
async fn one_line_in_each_wire_format_succeeds_with_usage_and_cost() {
    let lines: Vec<String> = MODELS
        .iter()
        .enumerate()
        .map(|(i, (m, _))| line(m, &format!("x{i}"), r#","temperature":0.2,"stop":["END"]"#))
        .collect();
    let (outcomes, end, stats) = run(Job::default(), &lines).await;
    assert_eq!(end.stopped, None);
    assert_eq!(stats.ok, 3, "{stats:?}");
    assert_eq!(stats.bad_requests + stats.unauthorized, 0, "{stats:?}");
    let catalog = Catalog::builtin();
    let mut prompts = Vec::new();
    for (o, (model, provider)) in outcomes.iter().zip(MODELS) {
        assert_eq!(o.status, Status::Succeeded, "{model}: {:?}", o.error);
        assert_eq!(o.model, model);
        let response: Value = serde_json::from_str(o.response.as_ref().unwrap().get()).unwrap();
        let text = match provider {
            ProviderKind::OpenAi => &response["choices"][0]["message"]["content"],
            ProviderKind::Anthropic => &response["content"][0]["text"],
            ProviderKind::Gemini => &response["candidates"][0]["content"]["parts"][0]["text"],
        };
        assert!(
            text.as_str().is_some_and(|t| !t.is_empty()),
            "{model}: {response}"
        );
        let usage = o.usage.unwrap();
        assert!(
            usage.completion_tokens > 0 && usage.completion_tokens <= 16,
            "{usage:?}"
        );
        let price = catalog.get(model).unwrap().1.price().unwrap();
        let cost = o.cost_usd.unwrap();
        assert!(
            cost > 0.0 && (cost - price.cost(&usage)).abs() < 1e-15,
            "{model}: {cost}"
        );
        prompts.push(usage.prompt_tokens);
    }
    // The simulator counts 4 tokens per message plus the system text: the system prompt
    // arrived as a message for OpenAI, and in its own field (`system`,
    // `systemInstruction`) for Anthropic and Gemini, not dropped.
    assert_eq!(prompts[1], prompts[0] - 4, "{prompts:?}");
    assert_eq!(prompts[2], prompts[1], "{prompts:?}");
}

#[tokio::test]
async fn anthropic_batch_line_passes_through() {
    let native = r#"{"custom_id":"native","params":{"model":"claude-sonnet-4-5","max_tokens":8,"system":[{"type":"text","text":"Be terse."}],"messages":[{"role":"user","content":[{"type":"text","text":"Hello"}]}],"top_k":3,"metadata":{"user_id":"u1"}}}"#;
    let (outcomes, _, stats) = run(Job::default(), &[native.to_string()]).await;
    assert_eq!(
        outcomes[0].status,
        Status::Succeeded,
        "{:?}",
        outcomes[0].error
    );
    assert!(outcomes[0].usage.unwrap().completion_tokens <= 8);
    assert_eq!(stats.ok, 1);
}

#[tokio::test]
async fn a_wrong_key_is_an_authentication_error_tried_once() {
    let lines: Vec<String> = MODELS.iter().map(|(m, _)| line(m, m, "")).collect();
    let (outcomes, end, stats) = run(
        Job {
            key: Some("wrong-key"),
            ..Job::default()
        },
        &lines,
    )
    .await;
    assert_eq!(end.stopped, None);
    for o in &outcomes {
        assert_eq!(
            kind(o),
            Some(ErrorKind::Authentication),
            "{}: {:?}",
            o.model,
            o.error
        );
        assert_eq!(o.attempts, 1);
        assert!(!o.error.as_ref().unwrap().message.contains("wrong-key"));
    }
    assert_eq!(stats.unauthorized, 3);
}

#[tokio::test]
async fn transient_faults_are_retried_for_every_provider() {
    let mut lines = Vec::new();
    for (m, _) in MODELS {
        for i in 0..12 {
            lines.push(line(m, &format!("{m}-{i}"), ""));
        }
    }
    let mut job = Job::default();
    job.sim.seed = 5;
    job.sim.faults = vec![
        (FaultKind::Http500, 0.1),
        (FaultKind::Http503, 0.1),
        (FaultKind::Overloaded529, 0.1),
        (FaultKind::Truncated, 0.1),
        (FaultKind::Reset, 0.1),
    ];
    job.engine.retry.max_attempts = 12;
    let (outcomes, _, stats) = run(job, &lines).await;
    for (m, _) in MODELS {
        let mine: Vec<_> = outcomes.iter().filter(|o| o.model == m).collect();
        assert!(
            mine.iter().all(|o| o.status == Status::Succeeded),
            "{m}: {mine:?}"
        );
        assert!(
            mine.iter().any(|o| o.attempts > 1),
            "{m}: no request was retried"
        );
    }
    assert_eq!(stats.ok_duplicates, 0);
    // A truncated or cut-off 200 was billed: its worst-case estimate is in its request's
    // cost, on top of the cost of the answer that finally came.
    assert!(stats.injected_faults["truncated"] > 0 && stats.injected_faults["reset"] > 0);
    let catalog = Catalog::builtin();
    let answered: f64 = outcomes
        .iter()
        .map(|o| {
            catalog
                .get(&o.model)
                .unwrap()
                .1
                .price()
                .unwrap()
                .cost(&o.usage.unwrap())
        })
        .sum();
    let charged: f64 = outcomes.iter().map(|o| o.cost_usd.unwrap()).sum();
    assert!(charged > answered, "{charged} <= {answered}");
}

#[tokio::test]
async fn rate_limits_are_waited_out_not_failed_for_every_provider() {
    // 600 RPM with a one-second burst: 10 at once, then one every 100 ms. 36 requests
    // at up to 36 in flight meet 429s; with `max_attempts` 1 a 429 classified as anything
    // but a rate limit would fail its request.
    let mut lines = Vec::new();
    for i in 0..12 {
        for (m, _) in MODELS {
            lines.push(line(m, &format!("{m}-{i}"), ""));
        }
    }
    let mut job = Job::default();
    job.sim.rpm = Some(600);
    job.engine.retry.max_attempts = 1;
    job.engine.concurrency = 36;
    let (outcomes, _, stats) = run(job, &lines).await;
    assert!(stats.rate_limited > 0, "{stats:?}");
    for (m, _) in MODELS {
        let mine: Vec<_> = outcomes.iter().filter(|o| o.model == m).collect();
        assert!(
            mine.iter().all(|o| o.status == Status::Succeeded),
            "{m}: {:?}",
            mine.iter().find(|o| o.status == Status::Failed)
        );
        assert!(mine.iter().any(|o| o.attempts > 1), "{m}: none met a 429");
    }
}

#[tokio::test]
async fn bodies_the_provider_refuses_fail_once_as_bad_requests() {
    let lines = vec![
        // OpenAI: `n` below its minimum.
        line("gpt-4.1-mini", "openai", r#","n":0"#),
        // Anthropic: a field outside CreateMessageParams, in a native line.
        r#"{"custom_id":"anthropic","params":{"model":"claude-haiku-4-5","max_tokens":8,"messages":[{"role":"user","content":"hi"}],"frequency_penalty":1}}"#.to_string(),
        // Gemini: a temperature above 2 passes translation and is refused by the API.
        line("gemini-2.5-flash", "gemini", r#","temperature":3"#),
    ];
    let (outcomes, end, stats) = run(Job::default(), &lines).await;
    assert_eq!(end.stopped, None);
    for o in &outcomes {
        assert_eq!(
            kind(o),
            Some(ErrorKind::BadRequest),
            "{}: {:?}",
            o.custom_id,
            o.error
        );
        assert_eq!(o.attempts, 1);
        assert_eq!(o.error.as_ref().unwrap().status, Some(400));
    }
    assert_eq!(stats.bad_requests, 3);
}

#[tokio::test]
async fn quota_exhaustion_stops_the_run_for_every_provider() {
    for (m, _) in MODELS {
        let lines: Vec<String> = (0..5).map(|i| line(m, &format!("q{i}"), "")).collect();
        let mut job = Job::default();
        job.sim.faults = vec![(FaultKind::InsufficientQuota, 1.0)];
        job.engine.concurrency = 1;
        let (outcomes, end, _) = run(job, &lines).await;
        assert_eq!(end.stopped, Some(StopReason::QuotaExhausted), "{m}");
        assert_eq!(outcomes.len(), 5);
        assert_eq!(
            kind(&outcomes[0]),
            Some(ErrorKind::QuotaExhausted),
            "{m}: {:?}",
            outcomes[0].error
        );
        assert_eq!(outcomes[0].attempts, 1);
        for o in &outcomes[1..] {
            assert_eq!(kind(o), Some(ErrorKind::NotAttempted), "{m}");
            assert_eq!(o.attempts, 0);
            assert_eq!(o.cost_usd, Some(0.0), "a request never sent costs nothing");
        }
    }
}
