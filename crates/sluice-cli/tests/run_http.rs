//! `sluice run` end to end: the real binary over real HTTP against `sluice sim` started
//! in-process on 127.0.0.1 port 0.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::Value;
use sluice_sim::{FaultKind, SimConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_requests_through_transient_faults_all_succeed_once() {
    let faults = vec![
        (FaultKind::Http500, 0.01),
        (FaultKind::Http502, 0.01),
        (FaultKind::Http503, 0.01),
        (FaultKind::Overloaded529, 0.01),
        (FaultKind::RateLimitNoRetryAfter, 0.003),
        (FaultKind::Reset, 0.01),
        (FaultKind::Truncated, 0.01),
        (FaultKind::Html502, 0.01),
        (FaultKind::Hang, 0.002),
        (FaultKind::Drip, 0.005),
    ];
    let sim = sim(SimConfig {
        faults,
        seed: 11,
        hang: Duration::from_secs(30),
        drip: Duration::from_millis(200),
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let n = 10_000;
    let input = write_input(dir.path(), &prompts(n));
    let output = dir.path().join("out.jsonl");
    let report = dir.path().join("report.json");
    let mut cmd = run_against(&sim, &input, &output);
    cmd.args([
        "--timeout",
        "5s",
        "--max-attempts",
        "12",
        "--concurrency",
        "64",
        "--report",
    ])
    .arg(&report);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    let lines = read_output(&output);
    assert_eq!(lines.len(), n, "one output line per input line");
    let ids: HashSet<&str> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), n, "no custom_id twice");
    for l in &lines {
        assert_eq!(l["status"], "succeeded", "{l}");
        assert!(l["usage"]["total_tokens"].as_u64().unwrap() > 0);
        assert!(l["attempts"].as_u64().unwrap() >= 1);
    }
    let stats = sim.stats();
    assert_eq!(
        stats.ok_duplicates, 0,
        "a request was paid for twice: {stats:?}"
    );
    // A slow-dripping body is a correct 200 that the simulator counts as a fault, not `ok`.
    let dripped = stats.injected_faults.get("drip").copied().unwrap_or(0);
    assert!(dripped > 0);
    assert_eq!(stats.ok + dripped, n as u64, "{stats:?}");
    let injected: u64 = stats.injected_faults.values().sum();
    assert!(injected > 500, "faults were injected: {stats:?}");
    let retried = lines
        .iter()
        .filter(|l| l["attempts"].as_u64().unwrap() > 1)
        .count();
    assert!(
        retried as u64 >= injected / 2,
        "faulted requests were retried"
    );

    let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["total"], n);
    assert_eq!(report["succeeded"], n);
    assert_eq!(report["attempts"], stats.requests);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_run_at_the_known_limits_gets_no_429s() {
    let sim = sim(SimConfig {
        rpm: Some(1_200),
        tpm: Some(40_000),
        latency: Duration::from_millis(50),
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &prompts(150));
    let output = dir.path().join("out.jsonl");
    let report = dir.path().join("report.json");
    let mut cmd = run_against(&sim, &input, &output);
    cmd.args(["--rpm", "1200", "--tpm", "40000", "--report"])
        .arg(&report);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stats = sim.stats();
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    assert_eq!(stats.ok, 150);
    let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["rate_limited"], 0);
    // 150 requests at 20/s after a burst of 10 take at least 7 s: pacing happened.
    assert!(report["wall_secs"].as_f64().unwrap() >= 6.5, "{report}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursting_past_the_limit_is_cooled_down_not_failed() {
    // The client is told nothing and learns nothing from headers; the simulator enforces
    // 600 RPM (burst 10).
    let sim = sim(SimConfig {
        rpm: Some(600),
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &prompts(40));
    let output = dir.path().join("out.jsonl");
    let report = dir.path().join("report.json");
    let mut cmd = run_against(&sim, &input, &output);
    cmd.args(["--concurrency", "40", "--no-learn-limits", "--report"])
        .arg(&report);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let stats = sim.stats();
    assert!(stats.rate_limited > 0, "the burst hit the limit: {stats:?}");
    assert_eq!(report["rate_limited"], stats.rate_limited);
    // One cooldown per burst: far fewer cooldowns than 429s.
    let cooldowns = report["cooldowns"].as_u64().unwrap();
    assert!(cooldowns >= 1 && cooldowns < stats.rate_limited, "{report}");
    assert_eq!(stats.ok, 40);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_abort_before_anything_is_sent_and_every_one_is_listed() {
    let sim = sim(SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut lines = prompts(5);
    lines.insert(1, "{not json".into());
    lines.insert(3, r#"{"custom_id":"q0","model":"m","prompt":"dup"}"#.into());
    lines.push(r#"{"model":"m","messages":"hello"}"#.into());
    lines.push(r#"{"what":"is this"}"#.into());
    let input = write_input(dir.path(), &lines);
    let output = dir.path().join("out.jsonl");
    let out = run(run_against(&sim, &input, &output)).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    for needle in [
        "line 2: not valid JSON",
        "line 4 (custom_id \"q0\"): field `custom_id`: duplicate: line 1 has the same custom_id",
        "line 8 (custom_id \"line-8\"): field `messages`: missing or not an array",
        "line 9 (custom_id \"line-9\"): unknown shape",
        "4 of 9 lines are bad; nothing was sent",
    ] {
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    }
    assert_eq!(sim.stats().requests, 0, "nothing was sent");
    assert!(read_output(&output).is_empty());
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_skipped_get_a_failed_line_and_the_rest_run() {
    let sim = sim(SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut lines = prompts(6);
    lines.insert(2, r#"{"custom_id":"broken","prompt":42}"#.into());
    let input = write_input(dir.path(), &lines);
    let output = dir.path().join("out.jsonl");
    let mut cmd = run_against(&sim, &input, &output);
    cmd.args(["--on-bad-line", "skip"]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(1), "some failed: {}", stderr(&out));
    let out_lines = read_output(&output);
    assert_eq!(out_lines.len(), 7);
    let broken = out_lines
        .iter()
        .find(|l| l["custom_id"] == "broken")
        .unwrap();
    assert_eq!(broken["status"], "failed");
    assert_eq!(broken["error"]["kind"], "invalid_input");
    assert!(broken["error"]["message"]
        .as_str()
        .unwrap()
        .contains("line 3"));
    assert_eq!(
        out_lines
            .iter()
            .filter(|l| l["status"] == "succeeded")
            .count(),
        6
    );
    assert_eq!(sim.stats().ok, 6);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_input_in_input_order_with_metadata_passed_through() {
    let sim = sim(SimConfig {
        latency: Duration::from_millis(5),
        jitter: 0.9,
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.jsonl");
    let input: String = (0..200)
        .map(|i| format!("{{\"prompt\":\"p{i}\",\"metadata\":{{\"row\":{i}}}}}\n"))
        .collect();
    let mut cmd = sluice();
    cmd.args([
        "run",
        "-",
        "--order",
        "input",
        "--model",
        "gpt-4.1-mini",
        "--no-progress",
        "--base-url",
    ])
    .arg(sim.base_url())
    .arg("-o")
    .arg(&output)
    .env("OPENAI_API_KEY", "sk-test")
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines = read_output(&output);
    assert_eq!(lines.len(), 200);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["custom_id"], format!("line-{}", i + 1), "input order");
        assert_eq!(l["metadata"]["row"], i);
        assert_eq!(l["model"], "gpt-4.1-mini");
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exhaustion_stops_cleanly_with_one_line_per_request() {
    let sim = sim(SimConfig {
        faults: vec![(FaultKind::InsufficientQuota, 0.05)],
        seed: 3,
        latency: Duration::from_millis(10),
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &prompts(400));
    let output = dir.path().join("out.jsonl");
    let mut cmd = run_against(&sim, &input, &output);
    cmd.args(["--concurrency", "4"]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("quota"), "{}", stderr(&out));
    let lines = read_output(&output);
    assert_eq!(lines.len(), 400, "every request has its line");
    let kinds: Vec<&str> = lines
        .iter()
        .filter_map(|l| l["error"]["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"quota_exhausted"));
    let not_attempted = kinds.iter().filter(|k| **k == "not_attempted").count();
    assert!(
        not_attempted > 300,
        "the rest was not sent: {not_attempted}"
    );
    // Nothing was sent after the stop beyond what was already in flight.
    assert!(sim.stats().requests < 100 + 4, "{:?}", sim.stats());
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errors_are_tried_once() {
    let sim = sim(SimConfig {
        api_key: Some("sk-right".into()),
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &prompts(5));
    let output = dir.path().join("out.jsonl");
    let mut cmd = run_against(&sim, &input, &output);
    cmd.env("OPENAI_API_KEY", "sk-wrong");
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    for l in read_output(&output) {
        assert_eq!(l["status"], "failed");
        assert_eq!(l["error"]["kind"], "authentication");
        assert_eq!(l["error"]["status"], 401);
        assert_eq!(l["attempts"], 1);
    }
    assert_eq!(sim.stats().requests, 5);
    let err = stderr(&out);
    assert!(
        err.contains("authentication: 5"),
        "summary groups failures: {err}"
    );
    assert!(!err.contains("sk-wrong"), "the key never shows");
    sim.shutdown().await;
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &prompts(1));
    // No API key and no --sim.
    let out = sluice()
        .arg("run")
        .arg(&input)
        .arg("--no-progress")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("OPENAI_API_KEY"), "{}", stderr(&out));
    // Impossible settings.
    let out = sluice()
        .arg("run")
        .arg(&input)
        .args(["--concurrency", "0", "--sim"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("concurrency"), "{}", stderr(&out));
    let out = sluice()
        .arg("run")
        .arg(&input)
        .args(["--timeout", "soon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // Missing input file.
    let out = sluice()
        .args(["run", "/nonexistent/in.jsonl", "--sim"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("does not exist"));
}

#[test]
fn sim_flag_runs_without_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &prompts(20));
    let output = dir.path().join("out.jsonl");
    let out = sluice()
        .arg("run")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .args(["--sim", "--sim-latency-ms", "1", "--no-progress"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(read_output(&output).len(), 20);
    assert!(stderr(&out).contains("20 requests: 20 succeeded, 0 failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_and_sigterm_stop_taking_input_and_finish_live_requests() {
    for signal in ["INT", "TERM"] {
        let sim = sim(SimConfig {
            latency: Duration::from_millis(300),
            ..SimConfig::default()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let input = write_input(dir.path(), &prompts(2_000));
        let output = dir.path().join("out.jsonl");
        let report = dir.path().join("report.json");
        let mut cmd = run_against(&sim, &input, &output);
        cmd.args(["--rpm", "600", "--concurrency", "8", "--report"])
            .arg(&report);
        // Once some outcomes exist.
        let (_, out) = signal_once_answered(&sim, cmd, 5, signal).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(3), "SIG{signal}: {err}");
        let word = if signal == "INT" {
            "interrupted"
        } else {
            "terminated"
        };
        assert!(
            err.contains(&format!("{word}: sending nothing more")),
            "{err}"
        );
        assert!(err.contains("input left unread"), "{err}");
        let lines = read_output(&output);
        assert!(!lines.is_empty() && lines.len() < 2_000, "{}", lines.len());
        // Every request sent got its outcome; none was sent twice or left without a line.
        // Those still waiting for the limiter were not sent after the signal.
        let stats = sim.stats();
        let sent: Vec<&Value> = lines.iter().filter(|l| l["attempts"] != 0).collect();
        assert_eq!(stats.requests, sent.len() as u64, "{stats:?}");
        assert!(sent.iter().all(|l| l["status"] == "succeeded"));
        assert!(lines
            .iter()
            .filter(|l| l["attempts"] == 0)
            .all(|l| l["error"]["kind"] == "not_attempted"));
        let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        assert_eq!(report["stopped"], "interrupted");
        assert_eq!(report["total"], lines.len());
        sim.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_rate_limit_is_found_by_the_send_window_and_nothing_fails() {
    // The simulator enforces 500 RPM; the client is told nothing. Without the adaptive
    // send window every cooldown released all queued requests at once and requests ran
    // out of rate-limit waits.
    let sim = sim(SimConfig {
        rpm: Some(500),
        latency: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &prompts(100));
    let output = dir.path().join("out.jsonl");
    let report = dir.path().join("report.json");
    let mut cmd = run_against(&sim, &input, &output);
    cmd.args([
        "--concurrency",
        "64",
        "--max-rate-limit-waits",
        "10",
        "--no-learn-limits",
        "--report",
    ])
    .arg(&report);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["succeeded"], 100, "{report}");
    let stats = sim.stats();
    assert_eq!(stats.ok, 100);
    // Far fewer 429s than the herd would produce (64 per cooldown).
    let cooldowns = report["cooldowns"].as_u64().unwrap();
    assert!(
        stats.rate_limited < 64 * cooldowns.max(1) / 2,
        "{stats:?} {report}"
    );
    sim.shutdown().await;
}

/// A run keeps its memory in small pages: the kernel is told not to back it with
/// transparent huge pages (`THP_enabled: 0`), and mimalloc no longer asks for them
/// (`hg`, `MADV_HUGEPAGE`, on none of its mappings). Each huge page is zeroed whole when
/// first touched; with them a run's peak RSS was about twice as large (BENCHMARKS.md).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_asks_for_no_transparent_huge_pages() {
    let sim = sim(SimConfig {
        latency: Duration::from_millis(200),
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &prompts(200));
    let output = dir.path().join("out.jsonl");
    let mut cmd = run_against(&sim, &input, &output);
    cmd.args(["--rpm", "600", "--no-journal"]);
    // Once it is sending, its allocator has mapped what a run uses.
    let mut child = spawn_when(&sim, cmd, |s| s.ok >= 3).await;
    let proc_file = |name: &str| {
        std::fs::read_to_string(format!("/proc/{}/{name}", child.id())).expect("readable")
    };
    let status = proc_file("status");
    let smaps = proc_file("smaps");
    child.kill().unwrap();
    child.wait().unwrap();
    let thp = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .expect("the kernel reports THP_enabled");
    assert_eq!(thp.trim(), "0", "THP_enabled");
    let huge: Vec<&str> = smaps
        .lines()
        .filter(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "hg"))
        .collect();
    assert!(huge.is_empty(), "mappings asking for huge pages: {huge:?}");
}

/// `-o -` is stdout, as `-` is stdin: no file named `-`, and no journal beside one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_dash_is_stdout() {
    let sim = sim(SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &prompts(5));
    let mut cmd = run_against(&sim, &input, Path::new("-"));
    cmd.current_dir(dir.path());
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON lines on stdout"))
        .collect();
    assert_eq!(lines.len(), 5);
    let made: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "input.jsonl")
        .collect();
    assert!(made.is_empty(), "files made: {made:?}");
}

/// With `--no-journal`, an output that fails part way (here a file size limit) holds no
/// one else's copy of what it did not take: the run stops, and every request answered is
/// either a whole line of the output or counted in the message, those still in the output's
/// buffer when it failed included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_journal_every_answer_the_output_did_not_take_is_counted() {
    let sim = sim(SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &prompts(2000));
    let output = dir.path().join("out.jsonl");
    let mut cmd = run_against(&sim, &input, &output);
    cmd.arg("--no-journal");
    // 100 blocks: 50 or 100 kB, a few hundred lines, and more than one buffer of them.
    let out = run(with_file_size_limit(&cmd, 100)).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    let lost: u64 = err
        .lines()
        .find_map(|l| {
            l.split_once(
                " outcomes of requests that were sent (and paid for) are not in the output",
            )
            .and_then(|(n, _)| n.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("the lost outcomes are said: {err}"));
    let written = std::fs::read(&output).unwrap();
    let whole = written.iter().filter(|&&b| b == b'\n').count() as u64;
    assert!(whole > 0 && lost > 0, "{whole} {lost}");
    let stats = sim.stats();
    assert_eq!(
        whole + lost,
        stats.ok,
        "each answer is in the output or counted: {stats:?}"
    );
    sim.shutdown().await;
}
