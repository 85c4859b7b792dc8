//! Helpers shared by the end-to-end tests of the `sluice` binary.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

use serde_json::Value;
use sluice_sim::{SimConfig, SimHandle};

pub fn sluice() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
    c.env_remove("OPENAI_API_KEY").env("NO_COLOR", "1");
    c
}

pub async fn sim(config: SimConfig) -> SimHandle {
    sluice_sim::start(config, ([127, 0, 0, 1], 0).into())
        .await
        .expect("the simulator starts")
}

/// Runs the binary off the async runtime (the simulator lives on it).
pub async fn run(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().expect("sluice runs"))
        .await
        .unwrap()
}

pub fn write_input(dir: &Path, lines: &[String]) -> PathBuf {
    let path = dir.join("input.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
    path
}

pub fn prompts(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!(r#"{{"custom_id":"q{i}","model":"gpt-4.1-mini","prompt":"question {i}: what is {i} squared?","max_tokens":32}}"#))
        .collect()
}

pub fn read_output(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every output line is JSON"))
        .collect()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn run_against(sim: &SimHandle, input: &Path, output: &Path) -> Command {
    let mut c = sluice();
    c.arg("run")
        .arg(input)
        .arg("-o")
        .arg(output)
        .arg("--base-url")
        .arg(sim.base_url())
        .arg("--no-progress")
        .env("OPENAI_API_KEY", "sk-test-not-a-real-key");
    c
}

/// `sluice status JOURNAL --json`.
pub fn status_json(journal: &Path) -> Value {
    let out = sluice()
        .arg("status")
        .arg(journal)
        .arg("--json")
        .output()
        .expect("sluice status runs");
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "status failed: {}",
        stderr(&out)
    );
    serde_json::from_slice(&out.stdout).expect("status prints JSON")
}

/// Sends `signal` (INT, TERM, KILL) to a process.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Spawns `cmd` (its stdout dropped, its stderr captured) and returns once the
/// simulator's counters satisfy `ready` (failing after a minute without).
pub async fn spawn_when(
    sim: &SimHandle,
    mut cmd: Command,
    ready: impl Fn(&sluice_sim::SimStats) -> bool,
) -> Child {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("sluice starts");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !ready(&sim.stats()) {
        assert!(std::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    child
}

/// Waits for `child` to exit, off the async runtime.
pub async fn finished(child: Child) -> Output {
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap()
}

/// Spawns `cmd` (its stderr captured), sends it `signal` once the simulator has answered
/// `answered` requests, and waits for it to exit. Returns the requests the simulator had
/// received when the signal went, and the output.
pub async fn signal_once_answered(
    sim: &SimHandle,
    cmd: Command,
    answered: u64,
    signal_name: &str,
) -> (u64, Output) {
    let child = spawn_when(sim, cmd, |s| s.ok >= answered).await;
    let at_signal = sim.stats().requests;
    signal(child.id(), signal_name);
    (at_signal, finished(child).await)
}

/// `cmd` run by `sh` under a file size limit (`ulimit -f`) of `blocks` (512 or 1024 bytes
/// each, by the shell).
pub fn with_file_size_limit(cmd: &Command, blocks: u32) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("ulimit -f {blocks} && exec \"$@\""))
        .arg("sh")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}
