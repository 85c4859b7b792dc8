//! Contract: every request body `sluice run` sends to an OpenAI endpoint validates against
//! OpenAI's official OpenAPI spec (`../shared/specs/openai-openapi.yaml`).
//!
//! The spec is served by steady (npm `@stdy/cli`, pinned in `tests/contract/package.json`;
//! `scripts/install-steady.sh` installs it) on 127.0.0.1, and the real `sluice` binary runs
//! `tests/contract/openai-requests.jsonl` (every input shape sluice accepts) against it.
//!
//! steady answers 400 only for structural errors (a missing required field, a wrong type, an
//! unknown enum or discriminator value). Other mismatches (a value matching no `oneOf` /
//! `anyOf` variant, a number out of range, an array too long) get a 200 and a diagnostic in
//! its log. So the test reads steady's JSON log (`--log-format json --log-bodies`) and fails
//! on any diagnostic at all, of any severity, for any request sluice sent; it first proves
//! both halves of that on hand-made requests. The log also holds each body as steady
//! received it, which the test compares with what the input line documents (so a field
//! sluice should have removed, which the spec would tolerate as an extra property, is caught
//! too).
//!
//! Where things are: `STEADY_BIN` (the steady executable; default: the one installed under
//! `tests/contract/node_modules`) and `SLUICE_SPECS` (the specs directory; default:
//! `../shared/specs` beside the workspace).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// How long steady may take to load the spec and accept connections.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long steady may take to log a request it has answered.
const LOG_TIMEOUT: Duration = Duration::from_secs(10);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn contract_dir() -> PathBuf {
    workspace_root().join("tests/contract")
}

fn specs_dir() -> PathBuf {
    match std::env::var_os("SLUICE_SPECS") {
        Some(dir) => PathBuf::from(dir),
        None => workspace_root().join("../shared/specs"),
    }
}

/// The steady executable: `STEADY_BIN`, else the copy installed in `tests/contract`.
fn steady_bin() -> PathBuf {
    const HOW: &str = "install it with `scripts/install-steady.sh` (needs node and npm; it \
                       installs the version pinned in tests/contract/package.json into \
                       tests/contract/node_modules), or set STEADY_BIN to a steady executable";
    if let Some(bin) = std::env::var_os("STEADY_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "STEADY_BIN={} is not a file; {HOW}",
            bin.display()
        );
        return bin;
    }
    let modules = contract_dir().join("node_modules");
    // The native executable first: the npm wrapper `.bin/steady` is a node script that
    // does not pass SIGKILL on to it.
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        "windows" => "win32",
        os => os,
    };
    let arch = match std::env::consts::ARCH {
        "x86_64" => "x64",
        "aarch64" => "arm64",
        arch => arch,
    };
    let exe = if cfg!(windows) {
        "steady.exe"
    } else {
        "steady"
    };
    let native = modules.join(format!("@stdy/cli-{os}-{arch}/bin/{exe}"));
    let wrapper = modules.join(".bin/steady");
    for bin in [native, wrapper.clone()] {
        if bin.is_file() {
            return bin;
        }
    }
    panic!(
        "steady (npm @stdy/cli) is not installed: neither STEADY_BIN nor {} exists; {HOW}",
        wrapper.display()
    );
}

fn free_port() -> u16 {
    // Never the same port for two tests of this binary (they run side by side, and the
    // kernel may hand a port just let go to the next to ask).
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    loop {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port on 127.0.0.1")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A running steady, killed (with its process group) when dropped.
struct Steady {
    child: Child,
    port: u16,
    log: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Steady {
    /// Starts steady on 127.0.0.1 serving `spec`, and waits until it accepts connections.
    /// steady prints `127.0.0.1:0` when given port 0, so the port is picked here (and
    /// picked again should another process take it first).
    fn start(bin: &Path, spec: &Path) -> Steady {
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Steady::try_start(bin, spec) {
                Ok(steady) => return steady,
                Err(e) => failures.push(e),
            }
        }
        panic!("steady did not start:\n{}", failures.join("\n---\n"));
    }

    fn try_start(bin: &Path, spec: &Path) -> Result<Steady, String> {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("steady.ndjson");
        let stderr = dir.path().join("steady.stderr");
        let port = free_port();
        let mut cmd = Command::new(bin);
        cmd.args(["--host", "127.0.0.1", "-p", &port.to_string()])
            // Exactly one `oneOf` variant must match (the default accepts any).
            .arg("--validator-strict-oneof")
            .args(["--log-format", "json", "--log-bodies", "--no-color"])
            .arg(spec)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(File::create(&log).unwrap())
            .stderr(File::create(&stderr).unwrap());
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run steady at {}: {e}", bin.display()));
        let mut steady = Steady {
            child,
            port,
            log,
            stderr,
            _dir: dir,
        };
        let started = Instant::now();
        loop {
            if let Some(status) = steady.child.try_wait().unwrap() {
                return Err(format!(
                    "steady on port {port} exited with {status}:\n{}",
                    steady.output()
                ));
            }
            // Ready once it accepts connections and has logged its start. A connection
            // alone may be to another server: the port picked here can be taken by
            // another process before steady binds it, and steady then exits. (One CI run
            // failed with its first request to steady reset; a port given to two tests
            // at once is one way that happens, now ruled out by `free_port`.)
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() && steady.started() {
                return Ok(steady);
            }
            if started.elapsed() > STARTUP_TIMEOUT {
                return Err(format!(
                    "steady did not accept connections on port {port} within {STARTUP_TIMEOUT:?}:\n{}",
                    steady.output()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether steady has logged its `startup` record.
    fn started(&self) -> bool {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|v| v["type"] == "startup")
    }

    /// What steady printed, for failure messages.
    fn output(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let log = read(&self.log);
        let head: String = log.chars().take(4_000).collect();
        format!("stdout: {head}\nstderr: {}", read(&self.stderr))
    }

    /// The request records of steady's log, in the order it answered them.
    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["type"] == "request")
            .collect()
    }

    /// Waits until steady has logged at least `n` requests and returns them.
    fn wait_for_requests(&self, n: usize) -> Vec<Value> {
        let started = Instant::now();
        loop {
            let requests = self.requests();
            if requests.len() >= n || started.elapsed() > LOG_TIMEOUT {
                return requests;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Steady {
    fn drop(&mut self) {
        #[cfg(unix)]
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// POSTs a JSON body over plain HTTP/1.1; returns the status and the whole response.
fn post(port: u16, path: &str, body: &Value) -> (u16, String) {
    let body = body.to_string();
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connect to steady");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer sk-contract-test\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read steady's response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    (status, response)
}

/// Everything steady found wrong with one logged request: a non-2xx answer, or any
/// diagnostic, whatever its severity.
fn problems(record: &Value) -> Vec<String> {
    let mut found = Vec::new();
    let status = record["response"]["status"].as_u64().unwrap_or(0);
    if !(200..300).contains(&status) {
        found.push(format!("steady answered {status}"));
    }
    for d in record["diagnostics"].as_array().into_iter().flatten() {
        found.push(format!(
            "{} {} at {}: {} ({})",
            d["severity"].as_str().unwrap_or("?"),
            d["code"].as_str().unwrap_or("?"),
            d["requestPath"].as_str().unwrap_or("?"),
            d["message"].as_str().unwrap_or("?"),
            d["specPointer"].as_str().unwrap_or(""),
        ));
    }
    found
}

/// What one input line should become, per the formats documented in `sluice::request`.
struct Expected {
    custom_id: String,
    path: &'static str,
    body: Value,
}

fn expected(line_no: usize, line: &str, default_model: &str) -> Expected {
    let mut line: Map<String, Value> = serde_json::from_str(line).expect("fixture line is JSON");
    let custom_id = match line.remove("custom_id") {
        Some(Value::String(id)) => id,
        _ => format!("line-{line_no}"),
    };
    line.remove("metadata");
    let (path, mut body) = if let Some(url) = line.get("url") {
        let path = if url.as_str().unwrap().ends_with("/embeddings") {
            "/embeddings"
        } else {
            "/chat/completions"
        };
        let Some(Value::Object(body)) = line.remove("body") else {
            panic!("fixture batch line without a body")
        };
        (path, body)
    } else if let Some(prompt) = line.remove("prompt") {
        let mut messages = Vec::new();
        if let Some(system) = line.remove("system") {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": prompt}));
        line.insert("messages".into(), Value::Array(messages));
        ("/chat/completions", line)
    } else if line.contains_key("messages") {
        ("/chat/completions", line)
    } else {
        ("/embeddings", line)
    };
    body.entry("model")
        .or_insert_with(|| Value::String(default_model.into()));
    Expected {
        custom_id,
        path,
        body: Value::Object(body),
    }
}

/// The `contract:<custom_id>` marker every fixture line carries in a message or in `user`.
fn marker(body: &Value) -> Option<String> {
    let text = body.to_string();
    let start = text.find("contract:")? + "contract:".len();
    let id: String = text[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .collect();
    Some(id)
}

#[test]
fn every_request_body_sluice_sends_validates_against_the_openai_spec() {
    let spec = specs_dir().join("openai-openapi.yaml");
    assert!(
        spec.is_file(),
        "{} not found; set SLUICE_SPECS to the directory holding openai-openapi.yaml",
        spec.display()
    );
    let steady = Steady::start(&steady_bin(), &spec);

    // 1. steady really validates, and the log check catches what its status codes do not.
    let valid = json!({"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}]});
    let no_messages = json!({"model": "gpt-4.1-mini", "max_tokens": 8});
    // `stop` is a string or an array of strings: a number matches neither variant, which
    // steady answers with a 200 and a warning.
    let bad_stop = json!({"model": "gpt-4.1-mini", "messages": [{"role": "user", "content": "hi"}], "stop": 5});
    let (status, response) = post(steady.port, "/chat/completions", &no_messages);
    assert!(
        (400..500).contains(&status) && response.contains("messages"),
        "steady must reject a chat body without `messages` with a 4xx naming it; got:\n{response}"
    );
    let (status, response) = post(steady.port, "/chat/completions", &valid);
    assert!(
        (200..300).contains(&status),
        "steady must accept a minimal valid chat body; got:\n{response}"
    );
    let json_start = response.find("\r\n\r\n").map_or(0, |i| i + 4);
    assert!(
        response[json_start..].contains("\"choices\""),
        "steady answers a valid chat body with a generated completion; got:\n{response}"
    );
    post(steady.port, "/chat/completions", &bad_stop);
    let probes = steady.wait_for_requests(3);
    assert_eq!(
        probes.len(),
        3,
        "steady logs every request:\n{}",
        steady.output()
    );
    assert_eq!(probes[0]["request"]["body"], no_messages);
    assert!(!problems(&probes[0]).is_empty());
    assert_eq!(
        probes[1]["request"]["body"], valid,
        "the log holds each body"
    );
    assert_eq!(problems(&probes[1]), Vec::<String>::new());
    let stop_problems = problems(&probes[2]);
    assert!(
        stop_problems.iter().any(|p| p.contains("body.stop")),
        "a `stop` matching no variant must show up in steady's log: {stop_problems:?}"
    );

    // 2. The real binary sends every input shape.
    let default_model = "gpt-4.1-mini";
    let input = contract_dir().join("openai-requests.jsonl");
    let text = std::fs::read_to_string(&input).unwrap();
    let expected: Vec<Expected> = text
        .lines()
        .enumerate()
        .map(|(i, l)| expected(i + 1, l, default_model))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .args(["--base-url", &format!("http://127.0.0.1:{}", steady.port)])
        .args(["--model", default_model])
        .args([
            "--no-progress",
            "--max-attempts",
            "1",
            "--max-rate-limit-waits",
            "0",
        ])
        .args(["--timeout", "20s"])
        .env("OPENAI_API_KEY", "sk-contract-test")
        .env("NO_COLOR", "1")
        .output()
        .expect("sluice runs");
    let stderr = String::from_utf8_lossy(&out.stderr);

    // Every body steady received is valid and is what its input line documents.
    let sent = steady.wait_for_requests(probes.len() + expected.len());
    let sent = &sent[probes.len()..];
    let mut failures = Vec::new();
    let mut seen = BTreeMap::new();
    for record in sent {
        let path = record["request"]["path"].as_str().unwrap_or("?");
        let body = &record["request"]["body"];
        let Some(id) = marker(body) else {
            failures.push(format!(
                "POST {path}: a body with no contract marker: {body}"
            ));
            continue;
        };
        *seen.entry(id.clone()).or_insert(0) += 1;
        for p in problems(record) {
            failures.push(format!("{id}: POST {path}: {p}\n    body: {body}"));
        }
        match expected.iter().find(|e| e.custom_id == id) {
            None => failures.push(format!("{id}: not a custom_id of the input: {body}")),
            Some(e) if e.path != path => {
                failures.push(format!("{id}: sent to {path}, expected {}", e.path))
            }
            Some(e) if &e.body != body => failures.push(format!(
                "{id}: the body sent is not the one its input line documents\n    sent:     {body}\n    expected: {}",
                e.body
            )),
            Some(_) => {}
        }
    }
    for e in &expected {
        match seen.get(&e.custom_id) {
            Some(1) => {}
            n => failures.push(format!(
                "{}: steady received it {} times, expected once",
                e.custom_id,
                n.unwrap_or(&0)
            )),
        }
    }

    // And sluice took every answer as a success. The outcome file is read as a stream of
    // JSON values, not line by line: sluice embeds the response body verbatim, and steady
    // pretty-prints its responses.
    let outcomes = std::fs::read_to_string(&output).unwrap_or_default();
    let outcomes: Vec<Value> = serde_json::Deserializer::from_str(&outcomes)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("the outcome file is not JSON values ({e}):\n{outcomes}"));
    let mut succeeded = BTreeSet::new();
    for o in &outcomes {
        let id = o["custom_id"].as_str().unwrap_or("?");
        if o["status"] == "succeeded" {
            succeeded.insert(id.to_owned());
        } else {
            failures.push(format!(
                "{id}: outcome {}: error {}",
                o["status"], o["error"]
            ));
        }
    }
    for e in &expected {
        if !outcomes
            .iter()
            .any(|o| o["custom_id"] == e.custom_id.as_str())
        {
            failures.push(format!("{}: no outcome", e.custom_id));
        }
    }
    if out.status.code() != Some(0) {
        failures.push(format!("sluice exited with {}", out.status));
    }

    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}\n\nsluice stderr:\n{stderr}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(succeeded.len(), expected.len());
}

/// The outcome file is JSONL: one outcome per line, even when the provider pretty-prints
/// its response (steady does; so does api.openai.com).
#[test]
fn outcome_file_is_one_json_object_per_line_when_responses_are_pretty_printed() {
    let steady = Steady::start(&steady_bin(), &specs_dir().join("openai-openapi.yaml"));
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let output = dir.path().join("out.jsonl");
    std::fs::write(
        &input,
        "{\"custom_id\":\"a\",\"model\":\"gpt-4.1-mini\",\"prompt\":\"contract:a hi\"}\n\
         {\"custom_id\":\"b\",\"model\":\"text-embedding-3-small\",\"input\":\"contract:b\"}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .args(["--base-url", &format!("http://127.0.0.1:{}", steady.port)])
        .args(["--no-progress", "--max-attempts", "1"])
        .env("OPENAI_API_KEY", "sk-contract-test")
        .output()
        .expect("sluice runs");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&output).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "two outcomes, two lines:\n{text}");
    for l in lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
        assert_eq!(v["status"], "succeeded", "{l}");
    }
}

/// Contract: every Anthropic Messages body `sluice run` sends, translated from any input
/// shape or passed through from a native `{"custom_id", "params"}` line, validates against
/// Anthropic's official spec (`../shared/specs/anthropic-openapi.json`), and is exactly the
/// body its input line documents in `metadata.expect`.
#[test]
fn every_anthropic_body_sluice_sends_validates_against_the_anthropic_spec() {
    let spec = specs_dir().join("anthropic-openapi.json");
    assert!(spec.is_file(), "{} not found", spec.display());
    let steady = Steady::start(&steady_bin(), &spec);

    // 1. steady validates Messages bodies: a missing `max_tokens` is refused, and an
    // OpenAI field (`stop`) shows up as an unknown property.
    let valid = json!({"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]});
    let leaked = json!({"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "stop": "x"});
    let no_max =
        json!({"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "hi"}]});
    let (status, response) = post(steady.port, "/v1/messages", &no_max);
    assert!(
        (400..500).contains(&status) && response.contains("max_tokens"),
        "steady must refuse a Messages body without max_tokens; got:\n{response}"
    );
    let (status, response) = post(steady.port, "/v1/messages", &valid);
    assert!((200..300).contains(&status), "{response}");
    post(steady.port, "/v1/messages", &leaked);
    let probes = steady.wait_for_requests(3);
    assert_eq!(probes.len(), 3, "{}", steady.output());
    assert_eq!(problems(&probes[1]), Vec::<String>::new());
    assert!(
        problems(&probes[2]).iter().any(|p| p.contains("stop")),
        "an unknown property must show up: {:?}",
        problems(&probes[2])
    );

    // 2. The real binary, with Anthropic's base URL pointed at steady by a catalog file.
    let input = contract_dir().join("anthropic-requests.jsonl");
    let text = std::fs::read_to_string(&input).unwrap();
    let mut expected: BTreeMap<String, Value> = BTreeMap::new();
    for l in text.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        let id = v["custom_id"].as_str().unwrap().to_string();
        let want = if v.get("params").is_some() {
            v["params"].clone()
        } else {
            v["metadata"]["expect"].clone()
        };
        assert!(want.is_object(), "{id}: the fixture documents its body");
        expected.insert(id, want);
    }
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("models.toml");
    std::fs::write(
        &catalog,
        format!(
            "[providers.anthropic]\napi_base = \"http://127.0.0.1:{}/v1\"\n",
            steady.port
        ),
    )
    .unwrap();
    let output = dir.path().join("out.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .arg("--model-config")
        .arg(&catalog)
        .args(["--model", "claude-haiku-4-5", "--no-progress"])
        .args(["--max-attempts", "1", "--max-rate-limit-waits", "0"])
        .env("ANTHROPIC_API_KEY", "sk-ant-contract-test")
        .env_remove("OPENAI_API_KEY")
        .env("XDG_CONFIG_HOME", dir.path())
        .output()
        .expect("sluice runs");
    let stderr = String::from_utf8_lossy(&out.stderr);

    let sent = steady.wait_for_requests(probes.len() + expected.len());
    let sent = &sent[probes.len()..];
    let mut failures = Vec::new();
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    for record in sent {
        let path = record["request"]["path"].as_str().unwrap_or("?");
        let body = &record["request"]["body"];
        let Some(id) = marker(body) else {
            failures.push(format!("POST {path}: no contract marker: {body}"));
            continue;
        };
        *seen.entry(id.clone()).or_insert(0) += 1;
        if path != "/v1/messages" {
            failures.push(format!("{id}: sent to {path}"));
        }
        for p in problems(record) {
            failures.push(format!("{id}: {p}\n    body: {body}"));
        }
        match expected.get(&id) {
            None => failures.push(format!("{id}: not a custom_id of the input")),
            Some(want) if want != body => failures.push(format!(
                "{id}: not the body its line documents\n    sent:     {body}\n    expected: {want}"
            )),
            Some(_) => {}
        }
    }
    for id in expected.keys() {
        if seen.get(id) != Some(&1) {
            failures.push(format!(
                "{id}: received {:?} times, expected once",
                seen.get(id)
            ));
        }
    }
    let outcomes: Vec<Value> = std::fs::read_to_string(&output)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON outcome per line"))
        .collect();
    for o in &outcomes {
        if o["status"] != "succeeded" {
            failures.push(format!("{}: {}", o["custom_id"], o["error"]));
        }
        if !o["cost_usd"].as_f64().is_some_and(|c| c > 0.0) {
            failures.push(format!("{}: no cost: {}", o["custom_id"], o["cost_usd"]));
        }
    }
    if outcomes.len() != expected.len() {
        failures.push(format!(
            "{} outcomes for {} lines",
            outcomes.len(),
            expected.len()
        ));
    }
    if out.status.code() != Some(0) {
        failures.push(format!("sluice exited with {}", out.status));
    }
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}\n\nsluice stderr:\n{stderr}",
        failures.len(),
        failures.join("\n")
    );
}
