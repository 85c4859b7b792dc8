//! The response cache end to end: hits are never sent (no rate capacity, no money),
//! identical requests of a run are sent once, and the key ignores what does not change the
//! answer. The real binary over real HTTP against `sluice sim` on 127.0.0.1 port 0.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use serde_json::Value;
use sluice_sim::SimConfig;

fn report(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Runs `input` with `cache` at 6 requests a minute (so that anything sent would take
/// minutes), writing `output`; checks that it succeeded and returns its report.
async fn run_at_six_a_minute(
    sim: &sluice_sim::SimHandle,
    input: &Path,
    output: &Path,
    cache: &Path,
) -> Value {
    let rep = output.with_extension("report.json");
    let mut cmd = run_against(sim, input, output);
    cmd.args(["--rpm", "6", "--report"])
        .arg(&rep)
        .arg("--cache")
        .arg(cache);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    report(&rep)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_identical_run_sends_nothing_and_does_not_wait_on_the_rate_limit() {
    let sim = sim(SimConfig {
        rpm: Some(6_000),
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &prompts(60));
    let cache = dir.path().join("cache.sqlite");

    let first = dir.path().join("first.jsonl");
    let mut cmd = run_against(&sim, &input, &first);
    cmd.args(["--rpm", "6000", "--cache"]).arg(&cache);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(sim.stats().requests, 60);

    // Field order and whitespace changed, custom_ids and metadata new: still the same
    // requests. At 6 requests per minute they would take ten minutes if they were sent.
    let reordered: Vec<String> = (0..60)
        .map(|i| format!(r#"{{ "max_tokens": 32, "prompt": "question {i}: what is {i} squared?", "metadata": {{"n": {i}}}, "model": "gpt-4.1-mini", "custom_id": "again-{i}" }}"#))
        .collect();
    let dir2 = tempfile::tempdir().unwrap();
    let input2 = write_input(dir2.path(), &reordered);
    let second = dir.path().join("second.jsonl");
    let r = run_at_six_a_minute(&sim, &input2, &second, &cache).await;
    assert_eq!(sim.stats().requests, 60, "nothing was sent");
    assert_eq!(r["cache_hits"], 60);
    assert_eq!(r["attempts"], 0);
    assert_eq!(r["prompt_tokens"], 0, "a hit is never charged");
    assert_eq!(r["completion_tokens"], 0, "a hit is never charged");
    assert!(
        r["wall_secs"].as_f64().unwrap() < 60.0,
        "no rate-limit wait: {r}"
    );

    let answers: HashMap<String, Value> = read_output(&first)
        .into_iter()
        .map(|l| {
            (
                l["custom_id"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches('q')
                    .to_string(),
                l,
            )
        })
        .collect();
    for l in read_output(&second) {
        let n = l["custom_id"]
            .as_str()
            .unwrap()
            .trim_start_matches("again-")
            .to_string();
        assert_eq!(l["cached"], true);
        assert_eq!(l["attempts"], 0);
        assert_eq!(
            l["metadata"]["n"].to_string(),
            n,
            "metadata is the line's own"
        );
        assert_eq!(l["response"], answers[&n]["response"], "the stored answer");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_requests_in_one_run_are_sent_once_and_fanned_out() {
    let sim = sim(SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<String> = (0..30)
        .map(|i| {
            let q = i % 10;
            format!(r#"{{"custom_id":"c{i}","metadata":{{"i":{i}}},"model":"gpt-4.1-mini","prompt":"question {q}","max_tokens":16}}"#)
        })
        .collect();
    let input = write_input(dir.path(), &lines);
    let output = dir.path().join("out.jsonl");
    let rep = dir.path().join("report.json");
    let mut cmd = run_against(&sim, &input, &output);
    cmd.arg("--cache")
        .arg(dir.path().join("cache.sqlite"))
        .arg("--report")
        .arg(&rep);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stats = sim.stats();
    assert_eq!(
        stats.requests, 10,
        "one request per distinct body: {stats:?}"
    );
    let out = read_output(&output);
    assert_eq!(out.len(), 30);
    let by_q: HashMap<u64, Vec<&Value>> = out.iter().fold(HashMap::new(), |mut m, l| {
        let i: u64 = l["custom_id"].as_str().unwrap()[1..].parse().unwrap();
        assert_eq!(l["metadata"]["i"], i);
        m.entry(i % 10).or_default().push(l);
        m
    });
    for group in by_q.values() {
        assert_eq!(group.len(), 3);
        assert!(group.iter().all(|l| l["response"] == group[0]["response"]));
        assert_eq!(group.iter().filter(|l| l["cached"] == false).count(), 1);
    }
    let r = report(&rep);
    assert_eq!(r["cache_hits"], 20);
    // `sluice status` counts the tokens paid for, as the summary does: not those of the
    // 20 answers fanned out (each carries its original's usage).
    let sent_tokens: u64 = out
        .iter()
        .filter(|l| l["cached"] == false)
        .map(|l| l["usage"]["prompt_tokens"].as_u64().unwrap())
        .sum();
    assert!(sent_tokens > 0);
    assert_eq!(r["prompt_tokens"], sent_tokens);
    let status = status_json(&output.with_extension("jsonl.journal"))["status"].clone();
    assert_eq!(status["prompt_tokens"], sent_tokens, "{status}");
    assert_eq!(
        status["completion_tokens"], r["completion_tokens"],
        "{status}"
    );
    assert_eq!(status["attempts"], 10, "{status}");
}

/// Hits and misses side by side in every batch the input reader hands over: only the misses
/// are sent, every line is answered once, and each hit is the answer stored for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_half_in_the_cache_sends_only_the_other_half() {
    let sim = sim(SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache.sqlite");
    let all = prompts(80);
    let even: Vec<String> = all.iter().step_by(2).cloned().collect();

    let first = dir.path().join("first.jsonl");
    let input = write_input(dir.path(), &even);
    let mut cmd = run_against(&sim, &input, &first);
    cmd.arg("--cache").arg(&cache);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(sim.stats().requests, 40);
    let stored: HashMap<String, Value> = read_output(&first)
        .into_iter()
        .map(|l| (l["custom_id"].as_str().unwrap().to_string(), l))
        .collect();

    let dir2 = tempfile::tempdir().unwrap();
    let input2 = write_input(dir2.path(), &all);
    let second = dir.path().join("second.jsonl");
    let rep = dir.path().join("report.json");
    let mut cmd = run_against(&sim, &input2, &second);
    cmd.arg("--cache").arg(&cache).arg("--report").arg(&rep);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(sim.stats().requests, 80, "only the 40 odd lines were sent");
    assert_eq!(report(&rep)["cache_hits"], 40);

    let lines = read_output(&second);
    assert_eq!(lines.len(), 80);
    let mut seen = std::collections::HashSet::new();
    for l in &lines {
        let id = l["custom_id"].as_str().unwrap();
        assert!(seen.insert(id.to_string()), "{id} answered twice");
        let n: usize = id[1..].parse().unwrap();
        assert_eq!(l["status"], "succeeded", "{l}");
        if n.is_multiple_of(2) {
            assert_eq!(l["cached"], true, "{l}");
            assert_eq!(l["response"], stored[id]["response"], "the stored answer");
        } else {
            assert_eq!(l["cached"], false, "{l}");
            assert_eq!(l["attempts"], 1, "{l}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_and_no_cache() {
    let sim = sim(SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &prompts(5));
    let cache = dir.path().join("cache.sqlite");
    let go = |name: &str, extra: &[&str]| {
        let mut cmd = run_against(&sim, &input, &dir.path().join(name));
        cmd.arg("--no-journal").args(extra);
        cmd
    };
    // Fill the cache.
    let out = run(go("a.jsonl", &["--cache", cache.to_str().unwrap()])).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(sim.stats().requests, 5);
    // --no-cache wins over SLUICE_CACHE: sent again.
    let mut cmd = go("b.jsonl", &["--no-cache"]);
    cmd.env("SLUICE_CACHE", &cache);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(sim.stats().requests, 10);
    // SLUICE_CACHE alone is used.
    let mut cmd = go("c.jsonl", &[]);
    cmd.env("SLUICE_CACHE", &cache);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(sim.stats().requests, 10);
    // Read-only: new requests are answered but not stored.
    let input2 = write_input(&dir.path().join(""), &prompts(7));
    let mut cmd = run_against(&sim, &input2, &dir.path().join("d.jsonl"));
    cmd.args(["--no-journal", "--cache-read-only", "--cache"])
        .arg(&cache);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(sim.stats().requests, 12, "the 2 new ones were sent");
    let mut cmd = run_against(&sim, &input2, &dir.path().join("e.jsonl"));
    cmd.args(["--no-journal", "--cache"]).arg(&cache);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(sim.stats().requests, 14, "read-only stored nothing");
    // A file that is not a cache: a clear error, nothing sent.
    std::fs::write(dir.path().join("junk"), b"junk").unwrap();
    let mut cmd = run_against(&sim, &input, &dir.path().join("f.jsonl"));
    cmd.arg("--cache").arg(dir.path().join("junk"));
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("junk"), "{}", stderr(&out));
    assert_eq!(sim.stats().requests, 14);
    // Nor is anything made: a journal left behind would make the next run a resume.
    for made in ["f.jsonl", "f.jsonl.journal"] {
        assert!(!dir.path().join(made).exists(), "{made} was made");
    }
}

/// A cache the disk cannot write (here a file size limit under one of its pages) is an
/// I/O error, exit 4, said as such: not "not a sluice response cache" (which would invite
/// deleting a sound cache) nor bad usage. Nothing is sent or made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_the_disk_cannot_write_is_an_io_error_not_a_bad_cache() {
    let sim = sim(SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &prompts(200));
    let cache = dir.path().join("cache.sqlite");
    let mut cmd = run_against(&sim, &input, &dir.path().join("a.jsonl"));
    cmd.arg("--cache").arg(&cache);
    assert_eq!(run(cmd).await.status.code(), Some(0));
    let sent = sim.stats().requests;

    let output = dir.path().join("b.jsonl");
    let mut cmd = run_against(&sim, &input, &output);
    cmd.arg("--cache").arg(&cache);
    let out = run(with_file_size_limit(&cmd, 50)).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("cache.sqlite"), "{err}");
    assert!(!err.contains("not a sluice response cache"), "{err}");
    assert_eq!(sim.stats().requests, sent, "nothing sent");
    assert!(!output.exists() && !dir.path().join("b.jsonl.journal").exists());

    // The cache is sound: without the limit every request is answered from it.
    let mut cmd = run_against(&sim, &input, &output);
    cmd.arg("--cache").arg(&cache);
    assert_eq!(run(cmd).await.status.code(), Some(0));
    assert_eq!(sim.stats().requests, sent);
    assert!(read_output(&output).iter().all(|l| l["cached"] == true));
}

/// Two runs sharing one cache at the same time (each storing more than one batch) lose
/// nothing of each other's: a third run over both inputs is answered wholly from the
/// cache, with the answers each run got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runs_sharing_a_cache_at_once_lose_nothing() {
    let sim = sim(SimConfig {
        latency: std::time::Duration::from_millis(2),
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache.sqlite");
    let lines = |set: &str| -> Vec<String> {
        (0..1500)
            .map(|i| format!(r#"{{"custom_id":"{set}{i}","model":"gpt-4.1-mini","prompt":"{set} question {i}","max_tokens":16}}"#))
            .collect()
    };
    let mut cmds = Vec::new();
    for set in ["a", "b"] {
        let sub = dir.path().join(set);
        std::fs::create_dir(&sub).unwrap();
        let input = write_input(&sub, &lines(set));
        let mut cmd = run_against(&sim, &input, &sub.join("out.jsonl"));
        cmd.arg("--cache").arg(&cache);
        cmds.push(cmd);
    }
    let b = cmds.pop().unwrap();
    let a = cmds.pop().unwrap();
    let (a, b) = tokio::join!(run(a), run(b));
    for out in [&a, &b] {
        assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
    }
    assert_eq!(sim.stats().requests, 3000);

    let both = dir.path().join("both");
    std::fs::create_dir(&both).unwrap();
    let input = write_input(&both, &[lines("a"), lines("b")].concat());
    let r = run_at_six_a_minute(&sim, &input, &both.join("out.jsonl"), &cache).await;
    assert_eq!(sim.stats().requests, 3000, "nothing was sent");
    assert_eq!(r["cache_hits"], 3000);
    let first: HashMap<String, Value> = ["a", "b"]
        .iter()
        .flat_map(|set| read_output(&dir.path().join(set).join("out.jsonl")))
        .map(|l| (l["custom_id"].as_str().unwrap().to_string(), l))
        .collect();
    let again = read_output(&both.join("out.jsonl"));
    assert_eq!(again.len(), 3000);
    for l in again {
        let id = l["custom_id"].as_str().unwrap();
        assert_eq!(l["cached"], true, "{id}");
        assert_eq!(l["response"], first[id]["response"], "{id}");
    }
}

/// A `kill -9` leaves the last responses journaled (and in the output) but not yet stored
/// in the cache, which stores a batch at a time. The resume stores them, so a later job
/// with the same cache pays for none of them again. Killed three times, the first a third
/// of a second in at 2,000 a second (hundreds of outcomes journaled, and neither a
/// second's store nor a batch of 1,024 due), the others after a seeded random number of
/// further answers, each maybe in the middle of the last resume's storing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kills_and_resumes_the_cache_holds_every_response_paid_for() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(20261202);
    let sim = sim(SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let n = 6000;
    let input = write_input(dir.path(), &prompts(n));
    let cache = dir.path().join("cache.sqlite");
    let output = dir.path().join("out.jsonl");
    let cached_run = |output: &Path| {
        let mut cmd = run_against(&sim, &input, output);
        cmd.args(["--rpm", "120000", "--cache"]).arg(&cache);
        cmd
    };
    let mut wait_for = 600;
    for _ in 0..3 {
        let from = sim.stats().ok;
        let child = spawn_when(&sim, cached_run(&output), |s| s.ok >= from + wait_for).await;
        signal(child.id(), "KILL");
        finished(child).await;
        wait_for = rng.random_range(100..1500);
    }

    let out = run(cached_run(&output)).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let lines = read_output(&output);
    assert_eq!(lines.len(), n, "{err}");
    let paid = sim.stats().requests;

    let again = dir.path().join("again.jsonl");
    let out = run(cached_run(&again)).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        sim.stats().requests,
        paid,
        "the new job sent nothing: every response paid for is in the cache (the resume said: {err})"
    );
    let lines = read_output(&again);
    assert_eq!(lines.len(), n);
    assert!(lines.iter().all(|l| l["cached"] == true));
}
