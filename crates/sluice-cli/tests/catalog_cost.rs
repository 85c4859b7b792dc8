//! The model catalog, cost and budget through the real `sluice` binary: `sluice models`,
//! `sluice estimate`, `sluice run --model claude-... --sim`, and `--budget` against the
//! simulator under concurrency.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use sluice_sim::SimConfig;

fn sluice() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
    for var in ["OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"] {
        c.env_remove(var);
    }
    // No user catalog from the machine running the tests.
    c.env("XDG_CONFIG_HOME", "/nonexistent-sluice-test");
    c
}

fn write(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
    path
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn outcomes(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn models_lists_the_catalog_and_a_user_file_overrides_it() {
    let out = sluice().arg("models").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    for needle in [
        "gpt-4.1-mini",
        "o4-mini",
        "gpt-5",
        "claude-sonnet-4-5",
        "claude-opus-4-1",
        "claude-haiku-4-5",
        "gemini-2.5-pro",
        "gemini-2.5-flash-lite",
        "GEMINI_API_KEY",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    let row = text
        .lines()
        .find(|l| l.starts_with("claude-sonnet-4-5 "))
        .unwrap();
    assert!(
        row.contains("anthropic") && row.contains("3.000") && row.contains("15.000"),
        "{row}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.toml");
    std::fs::write(
        &file,
        "[models.\"my-vllm-model\"]\nprovider = \"openai\"\napi_base = \"http://127.0.0.1:8000/v1\"\ninput_per_mtok = 0.01\noutput_per_mtok = 0.02\n\n[models.\"gpt-4.1-mini\"]\nprovider = \"openai\"\ninput_per_mtok = 9.0\noutput_per_mtok = 9.5\n",
    )
    .unwrap();
    let out = sluice()
        .args(["models", "--json", "--model-config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["models"]["gpt-4.1-mini"]["input_per_mtok"], 9.0);
    assert_eq!(
        v["models"]["my-vllm-model"]["api_base"],
        "http://127.0.0.1:8000/v1"
    );
    assert_eq!(v["models"]["gemini-2.5-flash"]["provider"], "gemini");
    assert_eq!(v["providers"]["anthropic"]["key_env"], "ANTHROPIC_API_KEY");

    std::fs::write(&file, "[models.x]\nprovider = \"openai\"\nprice = 1\n").unwrap();
    let out = sluice()
        .args(["models", "--model-config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("m.toml") && err.contains("price"), "{err}");

    let out = sluice().args(["models", "--toml"]).output().unwrap();
    assert!(stdout(&out).contains("[models.\"gemini-2.5-flash\"]"));
}

#[test]
fn estimate_counts_tokens_and_prices_the_job_without_sending() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(
        dir.path(),
        "in.jsonl",
        &[
            r#"{"prompt":"hello world","max_tokens":100}"#.to_string(),
            r#"{"prompt":"hello world","max_tokens":100,"model":"gemini-2.5-flash"}"#.to_string(),
            r#"{"prompt":"hello world","model":"my-own-model"}"#.to_string(),
        ],
    );
    let out = sluice()
        .arg("estimate")
        .arg(&input)
        .args(["--model", "claude-sonnet-4-5", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap();
    // "hello world" is 2 tokens, + 4 for the message + 3 for the reply.
    let claude = &v["models"]["claude-sonnet-4-5"];
    assert_eq!(claude["requests"], 1);
    assert_eq!(claude["input_tokens"], 9);
    assert_eq!(claude["max_output_tokens"], 100);
    let input_usd = claude["input_usd"].as_f64().unwrap();
    assert!((input_usd - 9.0 * 3.0 / 1e6).abs() < 1e-12, "{input_usd}");
    let max_usd = claude["max_usd"].as_f64().unwrap();
    assert!(
        (max_usd - (9.0 * 3.0 + 100.0 * 15.0) / 1e6).abs() < 1e-12,
        "{max_usd}"
    );
    let gemini = &v["models"]["gemini-2.5-flash"];
    assert!((gemini["max_usd"].as_f64().unwrap() - (9.0 * 0.3 + 100.0 * 2.5) / 1e6).abs() < 1e-12);
    assert_eq!(v["models"]["my-own-model"]["max_usd"], Value::Null);
    assert_eq!(v["unpriced_requests"], 1);
    let total = v["max_usd"].as_f64().unwrap();
    assert!((total - max_usd - gemini["max_usd"].as_f64().unwrap()).abs() < 1e-12);

    let out = sluice()
        .arg("estimate")
        .arg(&input)
        .args(["--model", "mistral:large"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("line 1") && stderr(&out).contains("unknown provider"));
}

#[test]
fn run_against_the_simulator_with_a_claude_and_a_gemini_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines: Vec<String> = (0..20)
        .map(|i| format!(r#"{{"custom_id":"c{i}","prompt":"question {i}","system":"Be brief.","max_tokens":24}}"#))
        .collect();
    lines.push(
        r#"{"custom_id":"g","model":"gemini-2.5-flash","prompt":"hello","max_tokens":24}"#.into(),
    );
    let input = write(dir.path(), "in.jsonl", &lines);
    let output = dir.path().join("out.jsonl");
    let report = dir.path().join("report.json");
    let out = sluice()
        .arg("run")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .args([
            "--model",
            "claude-sonnet-4-5",
            "--sim",
            "--sim-latency-ms",
            "5",
            "--no-progress",
        ])
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let outcomes = outcomes(&output);
    assert_eq!(outcomes.len(), 21);
    let mut total = 0.0;
    for o in &outcomes {
        assert_eq!(o["status"], "succeeded", "{o}");
        let cost = o["cost_usd"].as_f64().unwrap();
        let u = &o["usage"];
        let (pin, pout) = if o["custom_id"] == "g" {
            assert_eq!(o["model"], "gemini-2.5-flash");
            assert!(o["response"]["candidates"].is_array());
            (0.30, 2.50)
        } else {
            assert_eq!(o["model"], "claude-sonnet-4-5");
            assert_eq!(o["response"]["type"], "message");
            (3.0, 15.0)
        };
        let want = (u["prompt_tokens"].as_f64().unwrap() * pin
            + u["completion_tokens"].as_f64().unwrap() * pout)
            / 1e6;
        assert!((cost - want).abs() < 1e-9, "{o}");
        total += cost;
    }
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert!(
        (r["cost_usd"].as_f64().unwrap() - total).abs() < 1e-9,
        "{r}"
    );
    assert_eq!(r["unpriced_requests"], 0);
    assert!(stderr(&out).contains("cost: $"), "{}", stderr(&out));
}

#[test]
fn a_missing_key_names_the_providers_variable() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "in.jsonl", &[r#"{"prompt":"hi"}"#.to_string()]);
    for (model, var) in [
        ("claude-haiku-4-5", "ANTHROPIC_API_KEY"),
        ("gemini-2.5-pro", "GEMINI_API_KEY"),
        ("gpt-4o", "OPENAI_API_KEY"),
    ] {
        let out = sluice()
            .arg("run")
            .arg(&input)
            .args(["--model", model, "--no-progress"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{model}");
        assert!(stderr(&out).contains(var), "{model}: {}", stderr(&out));
    }
}

/// `--budget` under concurrency: nothing is sent that could take spending past the budget,
/// measured on the provider's side (the tokens the simulator billed, at the catalog price).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_stops_before_spending_past_it_under_concurrency() {
    let sim = sluice_sim::start(
        SimConfig {
            latency: std::time::Duration::from_millis(30),
            output_tokens: (20, 120),
            seed: 3,
            ..SimConfig::default()
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let n = 300;
    // No line bounds its output: with a budget, sluice sends the assumed bound (64).
    let lines: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"custom_id":"b{i}","prompt":"item {i}: summarise the water cycle in a sentence"}}"#))
        .collect();
    let input = write(dir.path(), "in.jsonl", &lines);
    let output = dir.path().join("out.jsonl");
    let report = dir.path().join("report.json");
    let budget = 0.05;
    let mut cmd = sluice();
    cmd.arg("run")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .args(["--model", "gpt-4.1", "--base-url", &sim.base_url()])
        .args([
            "--concurrency",
            "32",
            "--assume-output-tokens",
            "64",
            "--no-progress",
        ])
        .args(["--budget", &budget.to_string()])
        .arg("--report")
        .arg(&report)
        .env("OPENAI_API_KEY", "sk-test-not-a-real-key");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "stopped: {}", stderr(&out));
    assert!(stderr(&out).contains("--budget"), "{}", stderr(&out));

    // What the provider billed: gpt-4.1 at $2 / $8 per million tokens.
    let stats = sim.stats();
    let billed = (stats.prompt_tokens as f64 * 2.0 + stats.completion_tokens as f64 * 8.0) / 1e6;
    assert!(
        billed <= budget,
        "billed ${billed} > budget ${budget}: {stats:?}"
    );
    assert!(
        billed > budget * 0.6,
        "the budget was mostly used: ${billed}"
    );
    assert!(
        stats.max_in_flight > 1,
        "requests ran concurrently: {stats:?}"
    );

    let outcomes = outcomes(&output);
    assert_eq!(outcomes.len(), n, "one outcome per line");
    let sent = outcomes
        .iter()
        .filter(|o| o["status"] == "succeeded")
        .count();
    let unsent: Vec<_> = outcomes
        .iter()
        .filter(|o| o["error"]["kind"] == "not_attempted")
        .collect();
    assert_eq!(
        sent + unsent.len(),
        n,
        "every line is sent or not attempted"
    );
    assert!(sent > 0 && !unsent.is_empty(), "{sent} sent");
    assert!(unsent
        .iter()
        .all(|o| o["attempts"] == 0 && o["error"]["message"].as_str().unwrap().contains("budget")));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["stopped"], "budget_exhausted");
    let cost = r["cost_usd"].as_f64().unwrap();
    assert!(
        (cost - billed).abs() < 1e-9,
        "report ${cost} vs billed ${billed}"
    );
    // The bound was sent, so no answer is longer than 64 tokens.
    for o in outcomes.iter().filter(|o| o["status"] == "succeeded") {
        assert!(
            o["usage"]["completion_tokens"].as_u64().unwrap() <= 64,
            "{o}"
        );
    }

    // A model without a price cannot be budgeted.
    let out = sluice()
        .arg("run")
        .arg(&input)
        .args([
            "--model",
            "my-model",
            "--base-url",
            &sim.base_url(),
            "--budget",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("my-model"), "{}", stderr(&out));
}

/// `--model a,b`: the first model's server answers 404 (the simulator serves nothing
/// below `/nope`), so every request finishes on the second, and the output says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_chain_finishes_on_the_second_model_when_the_first_is_not_found() {
    let sim = sluice_sim::start(SimConfig::default(), ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..20)
        .map(|i| format!(r#"{{"custom_id":"f{i}","prompt":"fallback {i}","max_tokens":8}}"#))
        .collect();
    let input = write(dir.path(), "in.jsonl", &lines);
    let output = dir.path().join("out.jsonl");
    let chain = format!(
        "openai-compatible:gpt-4.1-mini@http://{}/nope,gpt-4.1-mini",
        sim.addr
    );
    let mut cmd = sluice();
    cmd.arg("run")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .args([
            "--model",
            &chain,
            "--base-url",
            &sim.base_url(),
            "--no-progress",
        ])
        .env("OPENAI_API_KEY", "sk-test-not-a-real-key");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("fallbacks to the next model: 20"),
        "{}",
        stderr(&out)
    );
    let outcomes = outcomes(&output);
    assert_eq!(outcomes.len(), 20);
    for o in &outcomes {
        assert_eq!(o["status"], "succeeded", "{o}");
        assert_eq!(o["model"], "gpt-4.1-mini");
        assert_eq!(o["attempts"], 2, "one 404, then the second model: {o}");
    }
    let stats = sim.stats();
    assert_eq!(stats.ok, 20);
    assert_eq!(stats.bad_requests, 0, "/nope is not an API path: {stats:?}");
}

/// Limits learned from headers over real HTTP: the simulator enforces 6,000 RPM and says so
/// only in its `x-ratelimit-*` headers; the run is told nothing and gets (almost) no 429s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_learned_from_the_simulators_headers() {
    let sim = sluice_sim::start(
        SimConfig {
            rpm: Some(6000),
            latency: std::time::Duration::from_millis(100),
            ..SimConfig::default()
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let n = 800;
    let lines: Vec<String> = (0..n)
        .map(|i| format!(r#"{{"custom_id":"l{i}","prompt":"learn {i}","max_tokens":8}}"#))
        .collect();
    let input = write(dir.path(), "in.jsonl", &lines);
    let output = dir.path().join("out.jsonl");
    let mut cmd = sluice();
    cmd.arg("run")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .args(["--model", "gpt-4.1-mini", "--base-url", &sim.base_url()])
        .args(["--concurrency", "64", "--no-progress"])
        .env("OPENAI_API_KEY", "sk-test-not-a-real-key");
    let started = std::time::Instant::now();
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stats = sim.stats();
    assert_eq!(stats.ok, n as u64);
    assert!(
        stats.rate_limited as f64 <= 0.005 * n as f64,
        "{} 429s for {n} requests",
        stats.rate_limited
    );
    // 800 requests at 100/s after a one-second burst: about 7 s. A loose end-to-end bound
    // (startup included, on a busy machine); tests/learned_limits.rs checks 95% exactly.
    assert!(wall < 10.0, "{wall:.1} s");
}
