//! Durable runs end to end: the journal, resume after `kill -9`, Ctrl-C and SIGTERM, and
//! the refusals that keep a resume from losing or repeating work. The real binary, over
//! real HTTP, against `sluice sim` started in-process on 127.0.0.1 port 0.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use sluice_sim::{FaultKind, SimConfig, SimHandle};

/// The output lines by custom_id, asserting each appears once.
fn by_id(lines: &[Value]) -> HashMap<String, Value> {
    let mut map = HashMap::new();
    for l in lines {
        let id = l["custom_id"].as_str().expect("custom_id").to_string();
        assert!(map.insert(id.clone(), l.clone()).is_none(), "{id} twice");
    }
    map
}

/// An output line without what depends on timing or on the attempt: latency, attempts (a
/// restart may meet a 429 an uninterrupted run did not), and the response's creation time
/// and id (a provider gives every response a fresh one).
fn timeless(line: &Value) -> Value {
    let mut l = line.clone();
    let o = l.as_object_mut().unwrap();
    o.remove("latency_ms");
    o.remove("attempts");
    if let Some(r) = o.get_mut("response").and_then(Value::as_object_mut) {
        r.remove("created");
        r.remove("id");
    }
    l
}

async fn wait_quiet(sim: &SimHandle) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while sim.stats().in_flight > 0 {
        assert!(Instant::now() < deadline, "the simulator never went quiet");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_at_random_moments_then_resume_loses_nothing_and_repeats_only_what_was_in_flight()
{
    let trials: u32 = std::env::var("SLUICE_KILL_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let seed: u64 = std::env::var("SLUICE_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20261122);
    let mut rng = SmallRng::seed_from_u64(seed);
    let n = 3_000;
    let concurrency = 32;
    let config = || SimConfig {
        rpm: Some(36_000),
        latency: Duration::from_millis(40),
        seed: 5,
        ..SimConfig::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &prompts(n));

    // The reference: the same input, uninterrupted, against an identical simulator.
    let reference = {
        let sim = sim(config()).await;
        let output = dir.path().join("reference.jsonl");
        let mut cmd = run_against(&sim, &input, &output);
        cmd.args(["--rpm", "32400", "--concurrency", &concurrency.to_string()]);
        let out = run(cmd).await;
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        sim.shutdown().await;
        by_id(&read_output(&output))
    };
    assert_eq!(reference.len(), n);

    let sim = sim(config()).await;
    let output = dir.path().join("out.jsonl");
    let journal = dir.path().join("out.jsonl.journal");
    let mut kills = 0;
    // Requests answered but not in the journal at each kill: the most a resume can repeat.
    let mut exposed = 0u64;
    for trial in 0..trials {
        let mut cmd = run_against(&sim, &input, &output);
        cmd.args(["--rpm", "32400", "--concurrency", &concurrency.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().unwrap();
        // A random moment: after a random number of further requests reach the simulator.
        let start = sim.stats().requests;
        let wait_for = rng.random_range(20..250u64);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut finished = false;
        while sim.stats().requests < start + wait_for {
            if child.try_wait().unwrap().is_some() {
                finished = true;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "seed {seed} trial {trial}: no progress"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(
            !finished,
            "seed {seed} trial {trial}: the run ended before its kill"
        );
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        wait_quiet(&sim).await;
        let stats = sim.stats();
        let journaled = status_json(&journal)["status"]["succeeded"]
            .as_u64()
            .unwrap();
        let answered = stats.ok - stats.ok_duplicates;
        assert!(
            answered >= journaled,
            "seed {seed}: {stats:?} journaled {journaled}"
        );
        let lost = answered - journaled;
        // Only attempts on the wire (and outcomes not yet committed) can be lost.
        assert!(
            lost <= concurrency as u64 + 64,
            "seed {seed} trial {trial}: {lost} answered requests not journaled"
        );
        exposed += lost;
        // A torn output line is possible only as the very last one.
        let text = std::fs::read_to_string(&output).unwrap_or_default();
        for l in text.lines().take(text.lines().count().saturating_sub(1)) {
            serde_json::from_str::<Value>(l).expect("only the last line may be torn");
        }
    }
    assert_eq!(kills, trials);

    // Resume to the end.
    let mut cmd = run_against(&sim, &input, &output);
    cmd.args(["--rpm", "32400", "--concurrency", &concurrency.to_string()]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "seed {seed}: {err}");
    assert!(err.contains("resuming from"), "{err}");

    let lines = read_output(&output);
    assert_eq!(lines.len(), n, "seed {seed}: one line per request");
    let got = by_id(&lines);
    for (id, line) in &got {
        assert_eq!(line["status"], "succeeded", "seed {seed}: {line}");
        assert_eq!(
            timeless(line),
            timeless(&reference[id]),
            "seed {seed}: {id}"
        );
    }
    let stats = sim.stats();
    assert!(
        stats.ok_duplicates <= exposed,
        "seed {seed}: {} requests paid twice, but only {exposed} were in flight at the kills",
        stats.ok_duplicates
    );
    let status = status_json(&journal);
    assert_eq!(status["status"]["succeeded"], n as u64);
    assert_eq!(status["status"]["pending"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_runs_resume_and_send_nothing_twice() {
    for signal_name in ["INT", "TERM"] {
        let sim = sim(SimConfig {
            latency: Duration::from_millis(200),
            ..SimConfig::default()
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let n = 400;
        let input = write_input(dir.path(), &prompts(n));
        let output = dir.path().join("out.jsonl");
        let mut cmd = run_against(&sim, &input, &output);
        cmd.args(["--rpm", "3000", "--concurrency", "16"]);
        let (_, out) = signal_once_answered(&sim, cmd, 20, signal_name).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(3), "SIG{signal_name}: {err}");
        assert!(err.contains("run the same command again"), "{err}");
        let first = read_output(&output);
        assert!(first.len() < n, "the interrupt stopped the run early");
        // Every request sent finished: nothing is lost to the interrupt.
        assert_eq!(sim.stats().requests, first.len() as u64);

        let mut cmd = run_against(&sim, &input, &output);
        cmd.args(["--rpm", "3000", "--concurrency", "16"]);
        let out = run(cmd).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert!(
            err.contains(&format!(
                "{} of {n} requests already have an outcome",
                first.len()
            )),
            "{err}"
        );
        let lines = read_output(&output);
        assert_eq!(by_id(&lines).len(), n);
        assert!(lines.iter().all(|l| l["status"] == "succeeded"));
        let stats = sim.stats();
        assert_eq!(stats.ok_duplicates, 0, "{stats:?}");
        assert_eq!(
            stats.requests, n as u64,
            "each request sent once: {stats:?}"
        );
        sim.shutdown().await;
    }
}

/// A journal that cannot grow (its disk nearly full; here the file size limit, under which
/// the space it sets aside ahead of its log does not fit) stops the run: the outcomes of
/// the requests already sent, paid for, are journaled and written out, and the resume
/// sends only the others. (Before, the log's writes failed once past the limit, and the
/// outcomes not yet journaled were lost and sent again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_that_cannot_grow_stops_the_run_and_loses_nothing_paid_for() {
    let sim = sim(SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let n = 4000;
    let input = write_input(dir.path(), &prompts(n));
    let output = dir.path().join("out.jsonl");
    // 1 or 2 MB: far below the 8 MiB set aside, far above what the requests in flight
    // answer, and below what the whole run's log would take.
    let limited = with_file_size_limit(&run_against(&sim, &input, &output), 2000);
    let out = run(limited).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("cannot grow by 8 MiB more"), "{err}");
    assert!(err.contains("stopped: the run could not go on"), "{err}");
    assert!(err.contains("run the same command again"), "{err}");
    assert!(!err.contains("could not be journaled"), "{err}");
    let first = read_output(&output);
    assert!(!first.is_empty() && first.len() < n, "{}", first.len());
    assert_eq!(
        sim.stats().requests,
        first.len() as u64,
        "each request sent has its outcome in the output"
    );

    // A resume whose journal cannot be written (a limit of 25 or 50 kB, under one of its
    // 64 KiB pages) is an I/O error (exit 4), not bad usage, and changes nothing.
    let journal = dir.path().join("out.jsonl.journal");
    let before = std::fs::read(&journal).unwrap();
    let out = run(with_file_size_limit(
        &run_against(&sim, &input, &output),
        50,
    ))
    .await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains("out.jsonl.journal") && err.contains("the same command again"),
        "{err}"
    );
    assert_eq!(sim.stats().requests, first.len() as u64, "nothing sent");
    assert_eq!(read_output(&output), first);
    assert_eq!(std::fs::read(&journal).unwrap(), before);

    let out = run(run_against(&sim, &input, &output)).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let lines = read_output(&output);
    assert_eq!(lines.len(), n);
    assert_eq!(by_id(&lines).len(), n);
    let stats = sim.stats();
    assert_eq!(stats.ok_duplicates, 0, "{stats:?}");
    assert_eq!(
        stats.requests, n as u64,
        "each request sent once: {stats:?}"
    );
    sim.shutdown().await;
}

/// Ctrl-C while the rate limit holds requests back: those already admitted but not sent
/// are not sent after it (each would be paid for); they end `not_attempted`, and the resume
/// sends them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupt_sends_nothing_that_was_not_already_on_the_wire() {
    let sim = sim(SimConfig {
        latency: Duration::from_millis(50),
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let n = 30;
    let input = write_input(dir.path(), &prompts(n));
    let output = dir.path().join("out.jsonl");
    // One request a second: the rest of those admitted wait for the limiter.
    let mut cmd = run_against(&sim, &input, &output);
    cmd.args(["--rpm", "60", "--budget", "10"]);
    let (at_signal, out) = signal_once_answered(&sim, cmd, 2, "INT").await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    let sent = sim.stats().requests;
    // At most the one the limiter let go as the signal was on its way.
    assert!(
        sent <= at_signal + 1,
        "{sent} sent, {at_signal} before the interrupt: {err}"
    );
    let first = read_output(&output);
    let succeeded = first.iter().filter(|l| l["status"] == "succeeded").count();
    assert_eq!(succeeded as u64, sent, "every request sent finished: {err}");
    let unsent: Vec<&Value> = first
        .iter()
        .filter(|l| l["status"] != "succeeded")
        .collect();
    assert!(
        !unsent.is_empty(),
        "requests were waiting for the limiter: {err}"
    );
    for l in &unsent {
        assert_eq!(l["error"]["kind"], "not_attempted", "{l}");
        assert_eq!(l["attempts"], 0, "{l}");
    }
    assert!(
        err.contains("requests not sent are marked not_attempted"),
        "{err}"
    );
    // It waited for what was on the wire: nothing is left that a budget must count.
    let journal = dir.path().join("out.jsonl.journal");
    assert_eq!(
        status_json(&journal)["status"]["unrecorded_usd"].as_f64(),
        Some(0.0)
    );

    // The resume sends the rest, each once; the output lacked nothing.
    let mut cmd = run_against(&sim, &input, &output);
    cmd.args(["--rpm", "6000"]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&format!(
            "{} requests a stopped run left unsent go again",
            unsent.len()
        )),
        "{err}"
    );
    assert!(!err.contains("lacked"), "{err}");
    let lines = read_output(&output);
    assert_eq!(by_id(&lines).len(), n);
    assert!(lines.iter().all(|l| l["status"] == "succeeded"));
    let stats = sim.stats();
    assert_eq!(
        (stats.requests, stats.ok_duplicates),
        (n as u64, 0),
        "{stats:?}"
    );
    sim.shutdown().await;
}

/// A second Ctrl-C abandons the requests on the wire: the run exits while the provider
/// still works on them, prints its summary and how many it abandoned (their answers are
/// lost, and may be billed), writes its report, and a resume sends every request that has
/// no final outcome, so each ends with one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_interrupt_abandons_the_requests_on_the_wire_and_says_how_many() {
    let slow = sim(SimConfig {
        latency: Duration::from_secs(5),
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let n = 20;
    let input = write_input(dir.path(), &prompts(n));
    let output = dir.path().join("out.jsonl");
    let report = dir.path().join("report.json");
    let mut cmd = run_against(&slow, &input, &output);
    // A limit given: without one the run starts with one request until the first answer
    // tells it the provider's limits.
    cmd.args([
        "--concurrency",
        "8",
        "--rpm",
        "6000",
        "--budget",
        "10",
        "--report",
    ])
    .arg(&report);
    let child = spawn_when(&slow, cmd, |s| s.in_flight >= 8).await;
    signal(child.id(), "INT");
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(child.id(), "INT");
    let out = finished(child).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_eq!(slow.stats().ok, 0, "the run did not wait for them: {err}");
    assert!(
        err.contains("again: abandoned 8 requests still on the wire"),
        "{err}"
    );
    assert!(err.contains("0 succeeded"), "the summary: {err}");
    assert!(err.contains("the run is resumable"), "{err}");
    let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["succeeded"], 0, "{report}");
    assert!(read_output(&output)
        .iter()
        .all(|l| l["error"]["kind"] == "not_attempted"));
    // What it abandoned may be billed: a budget counts at least their outputs' worst case
    // (8 requests of 32 tokens out at gpt-4.1-mini's $1.60 a million).
    let journal = dir.path().join("out.jsonl.journal");
    let unrecorded = status_json(&journal)["status"]["unrecorded_usd"]
        .as_f64()
        .unwrap();
    assert!(unrecorded >= 8.0 * 32.0 * 1.6e-6, "{unrecorded}");

    // The resume (against a quick simulator: the target is not part of the job) sends all.
    let quick = sim(SimConfig::default()).await;
    let out = run(run_against(&quick, &input, &output)).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines = read_output(&output);
    assert_eq!((lines.len(), by_id(&lines).len()), (n, n));
    assert!(lines.iter().all(|l| l["status"] == "succeeded"));
    assert_eq!(quick.stats().requests, n as u64);
    slow.shutdown().await;
    quick.shutdown().await;
}

/// `--budget` is the run's, over all its sessions: the same command again spends only
/// what the earlier sessions left of it, and a raised budget only up to its new total.
/// (Each resume used to get the whole budget again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_holds_over_all_the_sessions_of_a_run() {
    let sim = sim(SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let n = 200;
    let input = write_input(dir.path(), &prompts(n));
    let output = dir.path().join("out.jsonl");
    let journal = dir.path().join("out.jsonl.journal");
    let session = |usd: &str| {
        let mut cmd = run_against(&sim, &input, &output);
        cmd.args(["--rpm", "60000", "--budget", usd]);
        cmd
    };
    let cost = || {
        status_json(&journal)["status"]["cost_usd"]
            .as_f64()
            .unwrap()
    };

    let out = run(session("0.002")).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let first = cost();
    let sent = sim.stats().requests;
    assert!(first > 0.0 && first <= 0.002, "{first}");
    assert!(sent < n as u64, "the budget stopped it: {sent}");

    let out = run(session("0.002")).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        cost() <= 0.002 + 1e-12,
        "{} over all sessions: {err}",
        cost()
    );

    let before = cost();
    let out = run(session("0.004")).await;
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "the earlier sessions spent ${before:.4} of $0.004"
        )),
        "{err}"
    );
    let total = cost();
    assert!(total > first && total <= 0.004 + 1e-12, "{total}: {err}");
    assert!(sim.stats().requests > sent);

    // Once every request has its outcome, a small budget is no reason to stop.
    assert_eq!(run(session("1")).await.status.code(), Some(0));
    let out = run(session("0.001")).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    sim.shutdown().await;
}

/// `--budget` holds over sessions killed with requests on the wire, against a provider
/// that bills an answer whose client went away: what a killed session may have spent
/// beyond its journaled outcomes (by a bound recorded before its attempts went out)
/// counts as spent when the run resumes. Without it, each kill let the resumed run spend
/// again what the killed one had on the wire or had answered and not yet journaled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_holds_over_sessions_killed_with_requests_on_the_wire() {
    let sim = sim(SimConfig {
        latency: Duration::from_millis(150),
        bill_abandoned: true,
        seed: 9,
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let n = 1_200;
    let input = write_input(dir.path(), &prompts(n));
    let output = dir.path().join("out.jsonl");
    let journal = dir.path().join("out.jsonl.journal");
    // About 700 of the 1,200 requests' worth (gpt-4.1-mini, at most 32 tokens out each).
    let budget = 0.04;
    let session = || {
        let mut cmd = run_against(&sim, &input, &output);
        cmd.args(["--rpm", "60000", "--concurrency", "32"])
            .args(["--budget", &budget.to_string()]);
        cmd
    };
    // What the provider billed: gpt-4.1-mini at $0.40 / $1.60 per million tokens.
    let billed = || {
        let s = sim.stats();
        (s.prompt_tokens as f64 * 0.40 + s.completion_tokens as f64 * 1.60) / 1e6
    };
    let mut rng = SmallRng::seed_from_u64(7);
    for kill in 0..4 {
        let mut cmd = session();
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = cmd.spawn().unwrap();
        let start = sim.stats().requests;
        let wait_for = rng.random_range(60..120u64);
        let deadline = Instant::now() + Duration::from_secs(60);
        while sim.stats().requests < start + wait_for || sim.stats().in_flight < 16 {
            assert!(
                child.try_wait().unwrap().is_none(),
                "kill {kill}: ended first"
            );
            assert!(Instant::now() < deadline, "kill {kill}: no progress");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        wait_quiet(&sim).await;
        let unrecorded = status_json(&journal)["status"]["unrecorded_usd"]
            .as_f64()
            .unwrap();
        assert!(
            unrecorded > 0.0,
            "kill {kill}: the bound on the wire is kept"
        );
    }
    let text = sluice().arg("status").arg(&journal).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("more may have been billed with no outcome here"),
        "{text}"
    );
    let before = billed();
    let out = run(session()).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "the budget stopped it: {err}");
    assert!(
        err.contains("killed sessions may have spent with no outcome kept"),
        "{err}"
    );
    assert!(billed() > before, "the last session sent: {err}");
    assert!(
        billed() <= budget,
        "billed ${} > budget ${budget}: {:?}\n{err}",
        billed(),
        sim.stats()
    );
    assert!(
        billed() > budget * 0.6,
        "the budget was mostly used: ${}",
        billed()
    );
    let lines = read_output(&output);
    assert_eq!(
        (lines.len(), by_id(&lines).len()),
        (n, n),
        "one line a request"
    );
    // Nothing on the wire at its end: the last session leaves no bound.
    let unrecorded_before = status_json(&journal)["status"]["unrecorded_usd"]
        .as_f64()
        .unwrap();
    let out = run(session()).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(
        status_json(&journal)["status"]["unrecorded_usd"].as_f64(),
        Some(unrecorded_before)
    );
    sim.shutdown().await;
}

/// An output that holds outcomes, with no journal to resume them from (deleted, or a
/// run with `--no-journal`), is some earlier run's paid-for answers: a run refuses to
/// write over it, sending nothing, unless told `--fresh`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_with_no_journal_to_resume_it_is_not_written_over() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, input, output) = finished_run(dir.path(), 10).await;
    let before = std::fs::read(&output).unwrap();
    durable_files_removed(&output);
    for extra in [&[][..], &["--no-journal"][..]] {
        let mut cmd = run_against(&sim, &input, &output);
        cmd.args(extra);
        let out = run(cmd).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("already holds outcomes and there is no journal to resume them from")
                && err.contains("--fresh"),
            "{err}"
        );
        assert_eq!(std::fs::read(&output).unwrap(), before, "untouched");
    }
    assert_eq!(sim.stats().requests, 10, "nothing was sent");
    let mut cmd = run_against(&sim, &input, &output);
    cmd.arg("--fresh");
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(read_output(&output).len(), 10);
    assert_eq!(sim.stats().requests, 20);
}

/// Deletes a run's journal (all its files), leaving its output.
fn durable_files_removed(output: &Path) {
    for suffix in [".journal", ".journal-wal", ".journal-shm", ".journal-log"] {
        let mut p = output.as_os_str().to_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
}

/// A finished run of `n` prompts in `dir`, returning the sim, input and output paths.
async fn finished_run(dir: &Path, n: usize) -> (SimHandle, std::path::PathBuf, std::path::PathBuf) {
    let sim = sim(SimConfig::default()).await;
    let input = write_input(dir, &prompts(n));
    let output = dir.join("out.jsonl");
    let out = run(run_against(&sim, &input, &output)).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    (sim, input, output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_of_a_finished_job_sends_nothing_and_repairs_a_torn_output() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, input, output) = finished_run(dir.path(), 50).await;
    let complete = std::fs::read(&output).unwrap();

    // Nothing to do: nothing sent, the output unchanged.
    let out = run(run_against(&sim, &input, &output)).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(sim.stats().requests, 50);
    assert_eq!(std::fs::read(&output).unwrap(), complete);

    // Junk after the last line (a torn line of a crashed session) is cut.
    let mut torn = complete.clone();
    torn.extend_from_slice(b"{\"custom_id\":\"q");
    std::fs::write(&output, &torn).unwrap();
    let out = run(run_against(&sim, &input, &output)).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("cut a torn last line"), "{err}");
    assert_eq!(std::fs::read(&output).unwrap(), complete);
    assert_eq!(sim.stats().requests, 50, "nothing was sent again");

    // Once a run is over its output is the only copy of its lines: an output cut short is
    // refused (nothing sent, nothing changed) ...
    let lines_kept = complete.len() * 2 / 3;
    let cut = lines_kept - 7;
    std::fs::write(&output, &complete[..cut]).unwrap();
    let out = run(run_against(&sim, &input, &output)).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("lines") && err.contains("are missing") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(&output).unwrap(), &complete[..cut]);
    assert_eq!(sim.stats().requests, 50);
    // ... and with --force the missing ones go again: every request has its one line.
    let have = complete[..cut].iter().filter(|&&b| b == b'\n').count();
    let mut cmd = run_against(&sim, &input, &output);
    cmd.arg("--force");
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("their requests go again"), "{err}");
    assert_eq!(sim.stats().requests, 50 + (50 - have) as u64);
    let again = by_id(&read_output(&output));
    assert_eq!(again.len(), 50);
    assert!(again.values().all(|l| l["status"] == "succeeded"));

    // An output that is not this run's is refused, not trusted nor overwritten.
    let foreign = b"{\"custom_id\":\"someone-else\"}\n";
    std::fs::write(&output, foreign).unwrap();
    let out = run(run_against(&sim, &input, &output)).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("does not match the journal"), "{err}");
    assert_eq!(std::fs::read(&output).unwrap(), foreign);

    // --fresh starts over.
    let mut cmd = run_against(&sim, &input, &output);
    cmd.arg("--fresh");
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(sim.stats().requests, 100 + (50 - have) as u64);
    assert_eq!(by_id(&read_output(&output)).len(), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_input_is_refused_unless_forced_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, input, output) = finished_run(dir.path(), 30).await;
    let before = std::fs::read(&output).unwrap();
    let journal = dir.path().join("out.jsonl.journal");

    // Changed settings (another default model) are refused.
    let mut cmd = run_against(&sim, &input, &output);
    cmd.args(["--model", "gpt-4.1-nano"]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("the settings changed") && err.contains("model"),
        "{err}"
    );
    assert_eq!(sim.stats().requests, 30, "nothing was sent");

    let mut lines = prompts(32);
    lines[3] = r#"{"custom_id":"q3","model":"gpt-4.1-mini","prompt":"a different question","max_tokens":32}"#.into();
    write_input(dir.path(), &lines);
    let out = run(run_against(&sim, &input, &output)).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("the input changed since the journal"), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(
        std::fs::read(&output).unwrap(),
        before,
        "the output is untouched"
    );
    assert_eq!(sim.stats().requests, 30, "nothing was sent");

    // Forced: matched by custom_id, only the two new requests go out.
    let mut cmd = run_against(&sim, &input, &output);
    cmd.arg("--force");
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(sim.stats().requests, 32);
    assert_eq!(by_id(&read_output(&output)).len(), 32);
    assert!(std::fs::read(&output).unwrap().starts_with(&before));

    // A journal from a different run (another input) is refused, not reused.
    let other_dir = tempfile::tempdir().unwrap();
    let other_input = write_input(other_dir.path(), &prompts(5));
    let mut cmd = run_against(&sim, &other_input, &other_dir.path().join("o.jsonl"));
    cmd.arg("--journal").arg(&journal);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("the input changed since the journal"), "{err}");
    assert_eq!(
        status_json(&journal)["status"]["succeeded"],
        32,
        "the journal is untouched"
    );
    assert_eq!(sim.stats().requests, 32);
}

/// A resume forced onto another input makes it the run's input: the same command again
/// resumes without `--force`, and by `custom_id`, since the journal's rows carry the line
/// numbers of both inputs. Here the new input puts a request before the old ones, so by
/// line the last old request would look unfinished (and be paid for twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_resume_adopts_the_new_input_and_later_resumes_go_by_custom_id() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, input, output) = finished_run(dir.path(), 20).await;
    let journal = dir.path().join("out.jsonl.journal");
    let mut lines: Vec<String> = (0..10)
        .map(|i| format!(r#"{{"custom_id":"new{i}","model":"gpt-4.1-mini","prompt":"new question {i}","max_tokens":32}}"#))
        .collect();
    lines.splice(1..1, prompts(20));
    write_input(dir.path(), &lines);

    // Forced, and interrupted once two of the new requests are answered.
    let mut cmd = run_against(&sim, &input, &output);
    cmd.args(["--force", "--rpm", "60"]);
    let (_, out) = signal_once_answered(&sim, cmd, 22, "INT").await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("resuming by custom_id (--force)"), "{err}");
    let sent = sim.stats().requests;
    assert!((22..30).contains(&sent), "{sent} sent: {err}");
    let status = status_json(&journal);
    assert_eq!(
        status["status"]["requests"], 30,
        "the new input's: {status}"
    );
    assert_eq!(status["by_custom_id"], true, "{status}");

    // The same command, not forced: no refusal, the rest go, each once.
    let out = run(run_against(&sim, &input, &output)).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("input changed"), "{err}");
    assert!(
        err.contains(&format!("sending {}", 30 - sent)),
        "{sent} sent before: {err}"
    );
    let lines = read_output(&output);
    assert_eq!(lines.len(), 30);
    assert_eq!(by_id(&lines).len(), 30);
    assert!(lines.iter().all(|l| l["status"] == "succeeded"));
    let stats = sim.stats();
    assert_eq!((stats.requests, stats.ok_duplicates), (30, 0), "{stats:?}");
    let status = status_json(&journal);
    assert_eq!(
        (&status["status"]["requests"], &status["status"]["done"]),
        (&Value::from(30), &Value::from(30)),
        "{status}"
    );
    sim.shutdown().await;
}

/// A resume forced onto an input that leaves requests out keeps their outcomes (paid for,
/// in the output) but does not count them as done: `status` and the summary say 20 of 20,
/// not 25 of 20, and name the 5 that are no longer in the input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_of_requests_a_forced_input_left_out_are_not_counted_as_done() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, input, output) = finished_run(dir.path(), 20).await;
    let journal = dir.path().join("out.jsonl.journal");
    let mut lines = prompts(15);
    lines.extend((0..5).map(|i| format!(r#"{{"custom_id":"new{i}","model":"gpt-4.1-mini","prompt":"new question {i}","max_tokens":32}}"#)));
    write_input(dir.path(), &lines);

    let mut cmd = run_against(&sim, &input, &output);
    cmd.arg("--force");
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("all sessions: 20 of 20 requests done, 0 pending; 25 succeeded, 0 failed (of which 5 are outcomes of requests no longer in the input)"),
        "{err}"
    );
    assert_eq!(
        read_output(&output).len(),
        25,
        "nothing paid for is thrown away"
    );
    for _ in 0..2 {
        let status = status_json(&journal)["status"].clone();
        for (field, n) in [
            ("requests", 20),
            ("done", 20),
            ("pending", 0),
            ("outcomes", 25),
            ("orphans", 5),
        ] {
            assert_eq!(status[field], n, "{field}: {status}");
        }
        // The same command again: nothing to send, the same counts.
        let out = run(run_against(&sim, &input, &output)).await;
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    }
    assert_eq!(sim.stats().requests, 25);
    sim.shutdown().await;
}

/// A job started twice: while the first run holds the journal, the second is refused
/// before it changes or sends anything (with `--fresh` too; a run without a journal, or
/// with a journal of its own, is refused by the output's lock and does not empty the
/// output or make its journal), `sluice status` still reads the journal, and once the
/// first has stopped the same command resumes, each request
/// sent once. (Both used to run: the second resumed from under the first, sent what the
/// first was sending, and the first failed on the journal.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_of_a_job_whose_journal_is_in_use_is_refused() {
    let sim = sim(SimConfig {
        latency: Duration::from_millis(50),
        ..SimConfig::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let n = 40;
    let input = write_input(dir.path(), &prompts(n));
    let output = dir.path().join("out.jsonl");
    let journal = dir.path().join("out.jsonl.journal");
    let mut first = run_against(&sim, &input, &output);
    first.args(["--rpm", "60"]);
    let first = spawn_when(&sim, first, |s| s.ok >= 2).await;
    let at_start = sim.stats().requests;
    for fresh in [false, true] {
        // Unpaced: had it run, it would have sent the rest at once.
        let mut cmd = run_against(&sim, &input, &output);
        cmd.args(["--rpm", "60000"]);
        if fresh {
            cmd.arg("--fresh");
        }
        let out = run(cmd).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("is in use by another sluice run") && err.contains("nothing was"),
            "{err}"
        );
        assert!(journal.exists(), "--fresh removed a journal in use");
    }
    // Nor does a run without a journal write over its output.
    let before = std::fs::read(&output).unwrap();
    assert!(
        !before.is_empty(),
        "the first run's answers are written out"
    );
    let mut cmd = run_against(&sim, &input, &output);
    cmd.args(["--rpm", "60000", "--no-journal", "--fresh"]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("another sluice run is writing it; nothing was changed or sent"),
        "{err}"
    );
    assert!(
        std::fs::read(&output).unwrap().starts_with(&before),
        "the output was not emptied"
    );
    // Nor a run with a journal of its own: refused before it makes that journal (or, had
    // it one to resume, before it repaired the output).
    let other = dir.path().join("other.journal");
    let mut cmd = run_against(&sim, &input, &output);
    cmd.args(["--rpm", "60000", "--fresh", "--journal"])
        .arg(&other);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("another sluice run is writing it; nothing was changed or sent"),
        "{err}"
    );
    assert!(!other.exists(), "a journal was made: {err}");
    assert!(std::fs::read(&output).unwrap().starts_with(&before));
    // The first run, at one request a second, sent at most one more meanwhile.
    assert!(sim.stats().requests <= at_start + 1, "{:?}", sim.stats());
    let status = status_json(&journal);
    assert!(
        status["status"]["pending"].as_u64().unwrap() > 0,
        "{status}"
    );

    signal(first.id(), "INT");
    let out = finished(first).await;
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let mut cmd = run_against(&sim, &input, &output);
    cmd.args(["--rpm", "60000"]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let lines = read_output(&output);
    assert_eq!((lines.len(), by_id(&lines).len()), (n, n));
    assert!(lines.iter().all(|l| l["status"] == "succeeded"));
    let stats = sim.stats();
    assert_eq!(
        (stats.requests, stats.ok_duplicates),
        (n as u64, 0),
        "{stats:?}"
    );
    sim.shutdown().await;
}

/// An output or a journal that cannot be made (its directory does not exist) is an error
/// that names it, once, and nothing is sent. (The output is opened first: a run that
/// cannot make it makes no journal either.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_or_a_journal_that_cannot_be_made_is_named_in_the_error() {
    let sim = sim(SimConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), &prompts(3));
    let missing = dir.path().join("missing");
    let output = missing.join("out.jsonl");
    let out = run(run_against(&sim, &input, &output)).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains(&format!("cannot open {}: ", output.display())),
        "{err}"
    );
    assert_eq!(err.matches("os error").count(), 1, "said once: {err}");

    let output = dir.path().join("out.jsonl");
    let journal = missing.join("out.journal");
    let mut cmd = run_against(&sim, &input, &output);
    cmd.arg("--journal").arg(&journal);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains(&format!(
            "cannot create the journal {}: ",
            journal.display()
        )),
        "{err}"
    );
    assert_eq!(err.matches("os error").count(), 1, "said once: {err}");
    assert_eq!(sim.stats().requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_foreign_version_journal_is_a_clear_error_never_a_fresh_start() {
    let dir = tempfile::tempdir().unwrap();
    let (sim, input, output) = finished_run(dir.path(), 10).await;
    let journal = dir.path().join("out.jsonl.journal");
    let before = std::fs::read(&output).unwrap();

    // Another format version.
    {
        let conn = rusqlite::Connection::open(&journal).unwrap();
        conn.execute(
            "UPDATE meta SET value = '99' WHERE key = 'schema_version'",
            [],
        )
        .unwrap();
    }
    let out = run(run_against(&sim, &input, &output)).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("format version 99"), "{err}");
    assert_eq!(std::fs::read(&output).unwrap(), before);

    // Not a database at all.
    super_remove_side_files(&journal);
    std::fs::write(&journal, b"this is not a journal").unwrap();
    let out = run(run_against(&sim, &input, &output)).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not a usable sluice journal"), "{err}");
    assert_eq!(std::fs::read(&journal).unwrap(), b"this is not a journal");
    assert_eq!(std::fs::read(&output).unwrap(), before);
    assert_eq!(sim.stats().requests, 10, "nothing was sent");

    let out = sluice().arg("status").arg(&journal).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not a usable sluice journal"));

    // --resume without a journal.
    let mut cmd = run_against(&sim, &input, &dir.path().join("new.jsonl"));
    cmd.arg("--resume");
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no journal"), "{}", stderr(&out));
}

fn super_remove_side_files(journal: &Path) {
    for suffix in ["-wal", "-shm"] {
        let mut p = journal.as_os_str().to_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_stop_resumes_and_retry_failed_sends_transient_failures_again() {
    let dir = tempfile::tempdir().unwrap();
    let n = 200;
    let input = write_input(dir.path(), &prompts(n));
    let output = dir.path().join("out.jsonl");
    let journal = dir.path().join("out.jsonl.journal");

    // Quota runs out part-way: in-flight requests finish, the rest are not_attempted.
    let quota = sim(SimConfig {
        faults: vec![(FaultKind::InsufficientQuota, 0.02)],
        seed: 3,
        ..SimConfig::default()
    })
    .await;
    let mut cmd = run_against(&quota, &input, &output);
    cmd.args(["--concurrency", "4"]);
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("resumable"), "{err}");
    let first = read_output(&output);
    assert_eq!(first.len(), n, "one line per request even when stopped");
    let unsent = first.iter().filter(|l| l["status"] == "failed").count();
    assert!(unsent > 0);
    let status = status_json(&journal);
    assert_eq!(
        status["status"]["pending"].as_u64().unwrap() as usize,
        unsent
    );

    // A server that fails everything: the rest fail as server errors.
    let broken = sim(SimConfig {
        faults: vec![(FaultKind::Http500, 1.0)],
        ..SimConfig::default()
    })
    .await;
    let mut cmd = run_against(&broken, &input, &output);
    cmd.args(["--max-attempts", "1"]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let lines = by_id(&read_output(&output));
    assert_eq!(lines.len(), n);
    let failed: HashSet<&String> = lines
        .iter()
        .filter(|(_, l)| l["status"] == "failed")
        .map(|(id, _)| id)
        .collect();
    assert_eq!(failed.len(), unsent, "exactly the unsent ones were sent");
    assert!(lines
        .values()
        .all(|l| l["error"].is_null() || l["error"]["kind"] == "server_error"));

    // Without --retry-failed they stay failed: nothing to do.
    let healthy = sim(SimConfig::default()).await;
    let out = run(run_against(&healthy, &input, &output)).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(healthy.stats().requests, 0);

    // With it, they go again and succeed; every request has one line.
    let mut cmd = run_against(&healthy, &input, &output);
    cmd.arg("--retry-failed");
    let out = run(cmd).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("transient failures go again"), "{err}");
    assert_eq!(healthy.stats().requests, unsent as u64);
    let lines = by_id(&read_output(&output));
    assert_eq!(lines.len(), n);
    assert!(lines.values().all(|l| l["status"] == "succeeded"));
    let status = status_json(&journal);
    assert_eq!(status["status"]["succeeded"], n as u64);
}
