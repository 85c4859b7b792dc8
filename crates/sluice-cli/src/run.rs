//! `sluice run`: input file → engine → output file, with progress and a summary.

use std::collections::{HashMap, HashSet};
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use futures::{FutureExt, StreamExt};
use sluice::catalog::{Router, RouterOptions};
use sluice::engine::{EngineConfig, ExposureGate, Order, StopReason};
use sluice::input::{self, Done};
use sluice::journal::{Journal, JournalError, JournalMeta, JournalStatus};
use sluice::summary::Summary;
use sluice::{Engine, LineParser, Outcome, Request};
use tokio::sync::mpsc;

use crate::cached::CacheLayer;
use crate::durable::{self, Sink};
use crate::exit;
use crate::progress::ProgressView;

/// Arguments of `sluice run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Input JSONL: OpenAI Batch lines, chat bodies, or {"prompt": ...} lines. `-` reads stdin.
    pub input: String,

    /// Where outcome lines go (default, or `-`: stdout).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Output order: `completion` (lowest memory) or `input` (bounded reordering buffer).
    #[arg(long, value_enum, default_value_t = OrderArg::Completion)]
    pub order: OrderArg,

    /// What to do with unreadable lines: `abort` before sending anything (after listing every
    /// bad line), or `skip` them (each gets a failed outcome line) and run the rest.
    #[arg(long, value_enum, default_value_t = OnBadLine::Abort)]
    pub on_bad_line: OnBadLine,

    /// Base URL of OpenAI-compatible models, including `/v1` (default: OpenAI's, from the
    /// catalog). A URL other than OpenAI's may be used without a key.
    #[arg(long)]
    pub base_url: Option<String>,

    /// Model for lines that name none: a catalog name (`sluice models` lists them),
    /// `openai:NAME`, `anthropic:NAME`, `gemini:NAME` or `openai-compatible:NAME@URL`.
    /// A list `a,b,c` is a fallback chain: a request moves to the next model when one
    /// does not have it (404), its context is too small, or its circuit is open (5
    /// transient failures in a row; one probe after 30 s).
    #[arg(long)]
    pub model: Option<String>,

    /// Environment variable holding the OpenAI API key (default: the catalog's,
    /// OPENAI_API_KEY). Anthropic's is ANTHROPIC_API_KEY, Gemini's GEMINI_API_KEY.
    #[arg(long)]
    pub api_key_env: Option<String>,

    /// A model catalog file (TOML, like `sluice models --toml`) overriding the built-in
    /// one and ~/.config/sluice/models.toml.
    #[arg(long, value_name = "FILE")]
    pub model_config: Option<PathBuf>,

    /// Stop sending before spending could exceed this many US dollars: an attempt goes
    /// out only if what was spent plus the worst case of everything in flight, its own
    /// included, fits. Output bounds are then sent to every provider. Over all the
    /// sessions of a run: a resume spends only what the earlier ones left.
    #[arg(long, value_name = "USD")]
    pub budget: Option<f64>,

    /// Start an in-process simulator on 127.0.0.1 and run against it (no API key needed).
    #[arg(long)]
    pub sim: bool,

    /// Simulator: base latency per request, in milliseconds.
    #[arg(long, default_value_t = 200, requires = "sim")]
    pub sim_latency_ms: u64,

    /// Simulator: inject a fault, KIND=RATE (kinds: 500 502 503 529 429 quota hang reset
    /// truncated html drip). Repeatable.
    #[arg(long = "sim-fault", value_name = "KIND=RATE", requires = "sim")]
    pub sim_faults: Vec<String>,

    /// Simulator: its own requests-per-minute limit (default: --rpm).
    #[arg(long, requires = "sim")]
    pub sim_rpm: Option<u32>,

    /// Simulator: its own tokens-per-minute limit (default: --tpm).
    #[arg(long, requires = "sim")]
    pub sim_tpm: Option<u32>,

    /// Requests per minute to pace at.
    #[arg(long)]
    pub rpm: Option<f64>,

    /// Tokens per minute to pace at (input estimate + max output tokens, settled to usage).
    #[arg(long)]
    pub tpm: Option<f64>,

    /// Do not learn the limits not given here (requests, tokens, Anthropic's input and
    /// output tokens) from the provider's rate-limit headers; find them with the send
    /// window alone.
    #[arg(long)]
    pub no_learn_limits: bool,

    /// Requests live at once (in flight or waiting to retry).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,

    /// Transient failures (5xx, 529, timeouts, resets) a request may have before it fails.
    #[arg(long, default_value_t = 6)]
    pub max_attempts: u32,

    /// 429 rate limits a request may wait out before it fails.
    #[arg(long, default_value_t = 30)]
    pub max_rate_limit_waits: u32,

    /// Timeout of one attempt (e.g. 90s, 2m, 500ms).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Deadline of one request from its admission, waiting and retries included.
    #[arg(long, value_parser = parse_duration)]
    pub deadline: Option<Duration>,

    /// Output tokens reserved for chat requests that set no max_tokens.
    #[arg(long, default_value_t = sluice::request::DEFAULT_ASSUMED_OUTPUT_TOKENS)]
    pub assume_output_tokens: u32,

    /// No progress bar (it is off anyway when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,

    /// Also write the summary as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,

    /// Seed of the retry jitter (and of the simulator with --sim).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// The park hook of the runtime this run is on, if it has one (see `sluice::wake`).
    #[arg(skip)]
    pub wake_grid: Option<sluice::WakeGrid>,

    /// The run's journal (SQLite), which makes it resumable: running the same command
    /// again continues where it stopped. Default: the output file's name + `.journal`.
    #[arg(long, value_name = "FILE", conflicts_with = "no_journal")]
    pub journal: Option<PathBuf>,

    /// No journal: the run cannot be resumed.
    #[arg(long)]
    pub no_journal: bool,

    /// Insist on resuming: fail when there is no journal to resume from.
    #[arg(long, conflicts_with_all = ["fresh", "no_journal"])]
    pub resume: bool,

    /// Discard an existing journal and the output, and start over. (Without a journal to
    /// resume from, an output that already holds outcomes is written over only with it.)
    #[arg(long)]
    pub fresh: bool,

    /// Resume even though the input or the settings changed since the journal was made
    /// (requests are then matched by custom_id).
    #[arg(long)]
    pub force: bool,

    /// On resume, send again the requests that failed with a transient error (rate limit,
    /// server error, timeout, connection, deadline, quota).
    #[arg(long)]
    pub retry_failed: bool,

    /// Response cache, shared across runs (a SQLite index, and FILE-data beside it): a
    /// request answered before is answered from it, without being sent; identical requests
    /// of a run are sent once.
    #[arg(long, value_name = "FILE", env = "SLUICE_CACHE")]
    pub cache: Option<PathBuf>,

    /// No response cache, even when --cache or SLUICE_CACHE names one.
    #[arg(long)]
    pub no_cache: bool,

    /// Answer from the cache but store nothing new in it.
    #[arg(long, requires = "cache")]
    pub cache_read_only: bool,
}

/// `--order`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OrderArg {
    /// As each request ends.
    Completion,
    /// In input order.
    Input,
}

/// `--on-bad-line`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnBadLine {
    /// List every bad line and send nothing.
    Abort,
    /// Report bad lines as failed outcomes and run the rest.
    Skip,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    if let Ok(secs) = s.parse::<f64>() {
        if secs.is_finite() && secs > 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
        return Err("must be more than zero".into());
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (try 30s, 2m, 500ms)"))
}

/// Runs `sluice run` and returns the exit code.
pub async fn run(mut args: RunArgs) -> u8 {
    // `-o -` is stdout, as `-` is stdin for the input.
    if args.output.as_deref() == Some(Path::new("-")) {
        args.output = None;
    }
    match run_inner(args).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit::ERROR
        }
    }
}

/// A usage error: printed, and the run exits with [`exit::BAD_INPUT`].
struct Usage(String);

/// Why a run was refused before it sent anything, and its exit code: bad usage or input
/// ([`exit::BAD_INPUT`]), or a journal that could not be read or written (a full disk, an
/// I/O error: [`exit::ERROR`]).
struct Refused {
    message: String,
    code: u8,
}

/// A refusal for bad usage or input.
fn bad_usage(message: String) -> Refused {
    Usage(message).into()
}

impl From<Usage> for Refused {
    fn from(Usage(message): Usage) -> Refused {
        Refused {
            message,
            code: exit::BAD_INPUT,
        }
    }
}

/// A journal's error, as a refusal: [`exit::ERROR`] when the disk or the file system
/// failed, [`exit::BAD_INPUT`] when the journal is not usable or not this run's.
fn journal_refused(e: JournalError) -> Refused {
    Refused {
        code: if e.is_io() {
            exit::ERROR
        } else {
            exit::BAD_INPUT
        },
        message: e.to_string(),
    }
}

async fn run_inner(args: RunArgs) -> anyhow::Result<u8> {
    // The simulator starts first: the catalog's targets are pointed at its address.
    let sim = if args.sim {
        match start_sim(&args).await {
            Ok(h) => Some(h),
            Err(e) => {
                eprintln!("error: {e:#}");
                return Ok(exit::BAD_INPUT);
            }
        }
    } else {
        None
    };
    match prepare(&args, sim.as_ref()) {
        Ok(Some(prepared)) => execute(args, prepared, sim).await,
        Ok(None) => Ok(exit::BAD_INPUT),
        Err(Refused { message, code }) => {
            eprintln!("error: {message}");
            Ok(code)
        }
    }
}

struct Prepared {
    config: EngineConfig,
    parser: LineParser,
    router: Arc<Router>,
    input: InputFile,
    scan: input::ScanReport,
    done: Done,
    journal: JournalPlan,
}

/// What the run does about its journal.
enum JournalPlan {
    /// No journal (`--no-journal`, or output to stdout without `--journal`).
    None,
    /// A new journal at this path.
    Create(PathBuf),
    /// Resume from this journal.
    Resume(Box<Journal>),
}

/// The settings that change what a request means: a resume with others is refused unless
/// forced.
fn journal_settings(args: &RunArgs) -> serde_json::Value {
    serde_json::json!({
        "model": args.model,
        "target": if args.sim { Some("--sim".to_string()) } else { args.base_url.clone() },
    })
}

/// The input as a file: stdin is spooled to a temporary file first, so every bad line can
/// be found before anything is sent, and memory stays flat.
enum InputFile {
    Path(PathBuf),
    Spooled(tempfile::NamedTempFile),
}

impl InputFile {
    fn path(&self) -> &Path {
        match self {
            InputFile::Path(p) => p,
            InputFile::Spooled(f) => f.path(),
        }
    }
}

/// Checks settings and input. `Ok(None)`: bad lines were listed and the run must not start.
fn prepare(
    args: &RunArgs,
    sim: Option<&sluice_sim::SimHandle>,
) -> Result<Option<Prepared>, Refused> {
    let mut builder = EngineConfig::builder()
        .concurrency(args.concurrency)
        .max_attempts(args.max_attempts)
        .max_rate_limit_waits(args.max_rate_limit_waits)
        .attempt_timeout(args.timeout)
        .order(match args.order {
            OrderArg::Completion => Order::Completion,
            OrderArg::Input => Order::Input,
        })
        .seed(args.seed);
    if let Some(r) = args.rpm {
        builder = builder.rpm(r);
    }
    if let Some(t) = args.tpm {
        builder = builder.tpm(t);
    }
    if let Some(d) = args.deadline {
        builder = builder.deadline(d);
    }
    if let Some(b) = args.budget {
        builder = builder.budget_usd(b);
    }
    builder = builder.learn_limits(!args.no_learn_limits);
    if let Some(grid) = &args.wake_grid {
        builder = builder.wake_grid(grid.clone());
    }
    let chain: Vec<String> = args
        .model
        .iter()
        .flat_map(|m| m.split(','))
        .map(|m| m.trim().to_string())
        .collect();
    if chain.len() > 1 {
        builder = builder.breaker(sluice::retry::BreakerPolicy::default());
    }
    let config = builder.build().map_err(|e| Usage(e.to_string()))?;
    let catalog = crate::targets::load_catalog(args.model_config.as_deref()).map_err(Usage)?;
    let router = Arc::new(Router::new(
        catalog,
        RouterOptions {
            sim_origin: sim.map(|h| format!("http://{}", h.addr)),
            openai_base: args.base_url.clone(),
            openai_key_env: args.api_key_env.clone(),
        },
    ));
    for m in &chain {
        // Checked only: a default no line uses needs no target (nor its key).
        router
            .catalog()
            .resolve(m)
            .map_err(|e| Usage(format!("--model: {e}")))?;
    }

    let input = if args.input == "-" {
        let mut spool = tempfile::NamedTempFile::new()
            .map_err(|e| Usage(format!("cannot create a temporary file for stdin: {e}")))?;
        io::copy(&mut io::stdin().lock(), &mut spool)
            .map_err(|e| Usage(format!("cannot read stdin: {e}")))?;
        InputFile::Spooled(spool)
    } else {
        let p = PathBuf::from(&args.input);
        if !p.is_file() {
            return Err(bad_usage(format!(
                "input file {} does not exist",
                p.display()
            )));
        }
        InputFile::Path(p)
    };

    let mut parser = LineParser::new(chain.first().cloned());
    parser.fallback_models = chain.iter().skip(1).cloned().collect();
    parser.assumed_output_tokens = args.assume_output_tokens;
    // Token estimates only matter for pacing a tokens-per-minute limit or for a budget.
    parser.count_tokens = config.tpm.is_some() || config.budget_usd.is_some();
    // A budget needs every request's output bounded by the provider, not only reserved.
    parser.enforce_output_bound = config.budget_usd.is_some();
    parser.router = Some(router.clone());
    // With a cache, the parser writes the form each request's key hashes as it reads the
    // line, so the key does not read the body a second time.
    parser.key_forms = args.cache.is_some() && !args.no_cache;

    let journal_path = if args.no_journal {
        None
    } else {
        durable::journal_path(args.journal.as_deref(), args.output.as_deref())
    };
    if let Some(path) = journal_path.as_deref().filter(|_| args.fresh) {
        durable::remove_journal(path).map_err(|e| match e {
            e @ sluice::journal::JournalError::InUse { .. } => Usage(e.to_string()),
            e => Usage(format!("--fresh: cannot remove {}: {e}", path.display())),
        })?;
    }
    let existing = match &journal_path {
        Some(p) if p.exists() => Some(
            Journal::open(p).map_err(journal_refused)?,
        ),
        Some(p) if args.resume => {
            return Err(bad_usage(format!(
                "--resume: there is no journal at {} to resume from",
                p.display()
            )))
        }
        None if args.resume => {
            return Err(bad_usage(
                "--resume needs a journal: give -o FILE (the journal is FILE.journal) or --journal FILE".into(),
            ))
        }
        _ => None,
    };
    // An output with outcomes in it and no journal to resume from is some earlier run's
    // answers, paid for: not emptied unless asked.
    if let (None, Some(out), false) = (&existing, args.output.as_deref(), args.fresh) {
        let holds_lines = std::fs::metadata(out).is_ok_and(|m| m.is_file() && m.len() > 0);
        if holds_lines {
            return Err(bad_usage(format!(
                "the output {} already holds outcomes and there is no journal to resume them from; nothing was sent. Pass --fresh to write over it, or choose another -o",
                out.display()
            )));
        }
    }
    let mut existing = existing;
    let mut done = match &mut existing {
        // A session went on with another input (forced): the rows' lines may be an earlier
        // input's, so their requests are known by custom_id.
        Some(j) if j.meta().by_custom_id => {
            Done::Ids(j.done_ids(args.retry_failed).map_err(journal_refused)?)
        }
        Some(j) => Done::Lines(j.done_lines(args.retry_failed).map_err(journal_refused)?),
        None => Done::Nothing,
    };
    let read = |done: &Done| {
        input::scan(input.path(), &parser, done)
            .map_err(|e| Usage(format!("cannot read {}: {e}", args.input)))
    };
    let mut scan = read(&done)?;
    if let Some(j) = &mut existing {
        let then = j.meta().clone();
        let then = &then;
        let fresh_hint = "or --fresh to discard it and start over";
        if then.input != scan.fingerprint {
            let change = durable::input_change(&then.input, &scan.fingerprint);
            if !args.force {
                return Err(bad_usage(format!(
                    "the input changed since the journal {} was made ({change}); nothing was sent. Pass --force to resume anyway (requests whose custom_id already has an outcome are skipped), {fresh_hint}",
                    j.path().display()
                )));
            }
            eprintln!("warning: the input changed since the journal was made ({change}); resuming by custom_id (--force)");
            done = Done::Ids(j.done_ids(args.retry_failed).map_err(journal_refused)?);
            scan = read(&done)?;
        }
        // Another model changes what the answers are; another target (a new port, a proxy)
        // need not.
        let changes = durable::settings_changes(then, &journal_settings(args));
        let (refused, noted): (Vec<_>, Vec<_>) =
            changes.into_iter().partition(|(key, _)| key == "model");
        let words = |v: &[(String, String)]| {
            v.iter()
                .map(|(_, w)| w.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        };
        if !refused.is_empty() {
            if !args.force {
                return Err(bad_usage(format!(
                    "the settings changed since the journal {} was made ({}); nothing was sent. Pass --force to resume with the new settings, {fresh_hint}",
                    j.path().display(),
                    words(&refused)
                )));
            }
            eprintln!(
                "warning: resuming with changed settings (--force): {}",
                words(&refused)
            );
        }
        if !noted.is_empty() {
            eprintln!("note: resuming with {}", words(&noted));
        }
        // The output must hold the lines only it holds (all but those in the journal's
        // log).
        if let Some(out) = args.output.as_deref() {
            match j.check_output(out) {
                Ok(()) => {}
                Err(JournalError::OutputMissing { have, expected, .. }) if args.force => {
                    eprintln!(
                        "warning: the output {} lacks lines {} to {expected} the journal recorded; their requests go again (--force)",
                        out.display(),
                        have + 1
                    );
                    j.truncate_rows(have).map_err(journal_refused)?;
                    done = match done {
                        Done::Ids(_) => {
                            Done::Ids(j.done_ids(args.retry_failed).map_err(journal_refused)?)
                        }
                        _ => Done::Lines(j.done_lines(args.retry_failed).map_err(journal_refused)?),
                    };
                    scan = read(&done)?;
                }
                Err(e) => return Err(journal_refused(e)),
            }
        }
    }
    if !scan.bad.is_empty() {
        for bad in &scan.bad {
            eprintln!("bad input: {bad}");
        }
        if args.on_bad_line == OnBadLine::Abort {
            eprintln!(
                "error: {} of {} lines are bad; nothing was sent. Fix them, or pass --on-bad-line skip to run the rest.",
                scan.bad.len(),
                scan.requests
            );
            return Ok(None);
        }
        eprintln!(
            "warning: skipping {} bad lines (each gets a failed outcome line)",
            scan.bad.len()
        );
    }
    if config.budget_usd.is_some() {
        let unpriced = router.unpriced_models();
        if !unpriced.is_empty() {
            return Err(bad_usage(format!(
                "--budget needs a price for every model, and the catalog has none for {}; add input_per_mtok and output_per_mtok for it in a --model-config file",
                unpriced.join(", ")
            )));
        }
    }
    let journal = match (existing, journal_path) {
        (Some(j), _) => JournalPlan::Resume(Box::new(j)),
        (None, Some(p)) => JournalPlan::Create(p),
        (None, None) => JournalPlan::None,
    };
    Ok(Some(Prepared {
        config,
        parser,
        router,
        input,
        scan,
        done,
        journal,
    }))
}

/// The in-process simulator of `--sim`.
async fn start_sim(args: &RunArgs) -> anyhow::Result<sluice_sim::SimHandle> {
    let mut faults = Vec::new();
    for f in &args.sim_faults {
        let (kind, rate) = f
            .split_once('=')
            .with_context(|| format!("--sim-fault {f:?}: expected KIND=RATE"))?;
        let kind: sluice_sim::FaultKind = kind
            .parse()
            .map_err(|e| anyhow::anyhow!("--sim-fault {f:?}: {e}"))?;
        let rate: f64 = rate
            .parse()
            .ok()
            .filter(|r| (0.0..=1.0).contains(r))
            .with_context(|| format!("--sim-fault {f:?}: RATE must be a number in [0, 1]"))?;
        faults.push((kind, rate));
    }
    let config = sluice_sim::SimConfig {
        rpm: args.sim_rpm.or(args.rpm.map(|r| r.ceil() as u32)),
        tpm: args.sim_tpm.or(args.tpm.map(|t| t.ceil() as u32)),
        latency: Duration::from_millis(args.sim_latency_ms),
        seed: args.seed,
        faults,
        ..sluice_sim::SimConfig::default()
    };
    let handle = sluice_sim::start(config, ([127, 0, 0, 1], 0).into())
        .await
        .context("starting the simulator")?;
    Ok(handle)
}

async fn execute(
    args: RunArgs,
    prepared: Prepared,
    sim: Option<sluice_sim::SimHandle>,
) -> anyhow::Result<u8> {
    let Prepared {
        mut config,
        parser,
        router,
        input,
        scan,
        done,
        journal,
    } = prepared;
    // Listen first: from here on a signal stops the run instead of killing the process.
    let mut signals = Signals::new()?;

    if let Some(h) = &sim {
        eprintln!("simulator listening on http://{}", h.addr);
    }
    // Every target the input's models need; a local OpenAI-compatible server (Ollama,
    // vLLM, llama.cpp) may need no key.
    let transport = match crate::targets::transport(&router, sim.is_some(), config.concurrency) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(exit::BAD_INPUT);
        }
    };

    // Before the journal and the output are made: a cache that cannot be opened leaves
    // nothing behind.
    let cache = match args.cache.as_deref().filter(|_| !args.no_cache) {
        None => None,
        Some(path) => match sluice::cache::Cache::open(path, args.cache_read_only) {
            Ok(mut c) => {
                c.reserve(scan.good() as usize);
                // The target is part of every key: the same request to another server is
                // another request.
                let target = if args.sim {
                    "sim".to_string()
                } else {
                    args.base_url.clone().unwrap_or_else(|| "catalog".into())
                };
                Some(CacheLayer::new(c, &target))
            }
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(if e.is_io() {
                    exit::ERROR
                } else {
                    exit::BAD_INPUT
                });
            }
        },
    };

    // Held before the journal is made or a resume repairs it (see `durable::hold_output`).
    let output = match &args.output {
        None => None,
        Some(path) => match durable::hold_output(path) {
            Ok(file) => Some(file),
            // Refused, like a journal in use.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                eprintln!("error: cannot open {}: {e}", path.display());
                return Ok(exit::BAD_INPUT);
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("cannot open {}", path.display())))
            }
        },
    };

    let output_name = args
        .output
        .as_ref()
        .map_or("-".to_string(), |p| p.display().to_string());
    let resumed = matches!(journal, JournalPlan::Resume(_));
    // The cost of the journal's outcomes as this session begins, when there is a budget.
    let mut journaled_usd = 0.0;
    let journal = match journal {
        JournalPlan::None => None,
        JournalPlan::Create(path) => {
            let meta = JournalMeta {
                input: scan.fingerprint.clone(),
                input_path: args.input.clone(),
                output_path: output_name.clone(),
                settings: journal_settings(&args),
                created_by: env!("CARGO_PKG_VERSION").to_string(),
                created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    .to_string(),
                by_custom_id: false,
                orphans: 0,
            };
            Some(Journal::create(&path, meta)?)
        }
        JournalPlan::Resume(mut j) => {
            // What a killed session may have spent with no outcome kept counts from now on
            // as spent.
            j.settle_exposure()?;
            // --budget is the run's, over all its sessions: what the earlier ones spent
            // (the requests a resume sends again included, and at most what was on the
            // wire when one was killed) comes off it.
            if let Some(budget) = config.budget_usd.filter(|_| scan.good() > 0) {
                let status = j.status()?;
                journaled_usd = status.cost_usd;
                let spent = status.cost_usd + status.unrecorded_usd;
                let left = budget - spent;
                let unrecorded = || {
                    if status.unrecorded_usd > 0.0 {
                        eprintln!(
                            "  (of which up to ${:.4} is what killed sessions may have spent with no outcome kept: requests on the wire, or answered and not yet journaled)",
                            status.unrecorded_usd
                        );
                    }
                };
                if left <= 0.0 {
                    eprintln!(
                        "stopped: the earlier sessions of this run spent ${spent:.4} of --budget ${budget}; nothing was sent. Raise --budget to go on"
                    );
                    unrecorded();
                    return Ok(exit::STOPPED);
                }
                if spent > 0.0 {
                    eprintln!(
                        "budget: the earlier sessions spent ${spent:.4} of ${budget}; this one may spend ${left:.4}"
                    );
                    unrecorded();
                }
                config.budget_usd = Some(left);
            }
            // The responses a killed session journaled since its last checkpoint may not
            // be in the cache: stored from the log before the resume empties it.
            if let Some(layer) = cache.as_ref().filter(|_| !args.cache_read_only) {
                let mut unstored = HashMap::new();
                j.log_outcomes(|line, text| {
                    unstored.insert(line, text.to_vec());
                })?;
                restore_unstored(layer, input.path(), &parser, &unstored);
            }
            let (plan, repair) =
                durable::resume(&mut j, args.output.as_deref(), args.retry_failed)?;
            // This session's paths, and what it goes on with: a forced resume's input and
            // settings are the run's from now on, so the same command again resumes without
            // --force (by custom_id, as the rows' lines may be the earlier input's).
            let settings = journal_settings(&args);
            let by_custom_id = j.meta().by_custom_id || j.meta().input != scan.fingerprint;
            // The outcomes kept of requests this input does not have (a forced resume's
            // input may leave some out): the scan counted those it has.
            let orphans = match by_custom_id {
                true => j.status()?.outcomes.saturating_sub(scan.done),
                false => 0,
            };
            j.update_meta(|m| {
                m.input_path = args.input.clone();
                m.output_path = output_name.clone();
                if m.input != scan.fingerprint {
                    m.input = scan.fingerprint.clone();
                    m.by_custom_id = true;
                }
                m.orphans = orphans;
                m.settings = settings;
            })?;
            eprintln!(
                "resuming from {}: {} of {} requests already have an outcome; sending {}",
                j.path().display(),
                scan.done,
                scan.requests,
                scan.good()
            );
            if plan.requeued_unfinished > 0 {
                eprintln!(
                    "  {} requests a stopped run left unsent go again",
                    plan.requeued_unfinished
                );
            }
            if plan.requeued_failed > 0 {
                eprintln!(
                    "  {} transient failures go again (--retry-failed)",
                    plan.requeued_failed
                );
            }
            if let Some(r) = repair {
                if r.torn_bytes > 0 {
                    eprintln!(
                        "  cut a torn last line ({} bytes) from the output",
                        r.torn_bytes
                    );
                }
                // Lines written back from the journal: those of requests done after one
                // that goes again move up over its line (which was cut); any more were
                // missing from the output.
                let moved = r.restored.min(r.cut);
                if moved > 0 {
                    eprintln!(
                        "  moved {moved} outcome lines up in the output, over those of the requests that go again"
                    );
                }
                if r.restored > moved {
                    eprintln!(
                        "  restored {} outcome lines the output lacked, from the journal",
                        r.restored - moved
                    );
                }
            }
            Some(*j)
        }
    };
    let writer: Box<dyn Write + Send> = match output {
        Some(file) => {
            if !resumed {
                durable::empty_output(&file).with_context(|| {
                    format!(
                        "cannot empty {}",
                        args.output.as_deref().unwrap_or(Path::new("-")).display()
                    )
                })?;
            }
            Box::new(file)
        }
        None => Box::new(io::stdout()),
    };

    let good_lines = scan.good();
    let (bad_tx, mut bad_rx) = mpsc::unbounded_channel();
    let requests = input::stream(
        input.path().to_path_buf(),
        parser,
        scan.bad,
        done,
        16,
        bad_tx,
    );
    let read_error: Arc<Mutex<Option<io::Error>>> = Arc::default();
    let requests = request_stream(requests, read_error.clone());
    let (hits_tx, mut hits_rx) = mpsc::channel(256);
    let requests: Pin<Box<dyn futures::Stream<Item = Request> + Send>> = match &cache {
        Some(layer) => Box::pin(layer.filter(requests, hits_tx)),
        None => {
            drop(hits_tx);
            Box::pin(requests.flat_map(futures::stream::iter))
        }
    };

    // With a budget, a bound on what this session may have spent (what is on the wire at
    // its worst included) is recorded before an attempt goes out that would pass it: a
    // crash cannot hide from the next session's budget what was on the wire, or answered
    // and not yet journaled.
    let exposure = match (&journal, config.budget_usd) {
        (Some(j), Some(_)) if good_lines > 0 => {
            let recorder = Arc::new(j.exposure_recorder(journaled_usd)?);
            let failed: Arc<Mutex<Option<JournalError>>> = Arc::default();
            let (r, f) = (recorder.clone(), failed.clone());
            config.exposure = Some(ExposureGate::new(move |usd| match r.record(usd) {
                Ok(()) => true,
                Err(e) => {
                    *f.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    false
                }
            }));
            Some((recorder, failed))
        }
        _ => None,
    };
    let engine = Engine::new(config.clone(), Arc::new(transport));
    let started = Instant::now();
    let mut run = engine.run(requests);
    let show = !args.no_progress && io::stderr().is_terminal();
    // The bar counts what the engine runs; skipped bad lines are reported apart.
    let view = ProgressView::start(
        good_lines,
        run.progress(),
        config.rpm,
        config.tpm,
        config.budget_usd,
        show,
    );
    let stopper = run.stopper();
    let mut sink = Sink::new(writer, journal, cache);
    let mut interrupts = 0u32;
    let mut flush_tick = tokio::time::interval(Duration::from_secs(1));
    let mut bad_open = true;
    let mut hits_open = true;
    // Group commit: outcomes wait at most COMMIT_DELAY, rounded up to the send grid, to
    // share a journal transaction.
    let commit_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(commit_timer);
    let mut commit_armed = false;
    // The engine's outcomes, taken as they come, a burst at a time.
    let mut burst = Vec::new();

    loop {
        tokio::select! {
            outcome = run.next() => match outcome {
                Some(o) => {
                    burst.push(o);
                    let mut ended = false;
                    for _ in 1..durable::MAX_BATCH {
                        match run.next().now_or_never() {
                            Some(Some(o)) => burst.push(o),
                            Some(None) => {
                                ended = true;
                                break;
                            }
                            None => break,
                        }
                    }
                    sink.add_sent(&mut burst);
                    if ended {
                        break;
                    }
                    if sink.pending() >= durable::GROUP_COMMIT {
                        sink.commit();
                        commit_armed = false;
                    } else if !commit_armed && sink.pending() > 0 {
                        commit_timer
                            .as_mut()
                            .reset(run.on_send_grid(tokio::time::Instant::now() + durable::COMMIT_DELAY));
                        commit_armed = true;
                    }
                }
                None => break,
            },
            _ = &mut commit_timer, if commit_armed => {
                sink.commit();
                commit_armed = false;
            }
            hit = hits_rx.recv(), if hits_open => match hit {
                Some(o) => {
                    sink.add_unsent(&o);
                    if sink.pending() >= durable::GROUP_COMMIT {
                        sink.commit();
                    } else if !commit_armed {
                        commit_timer
                            .as_mut()
                            .reset(run.on_send_grid(tokio::time::Instant::now() + durable::COMMIT_DELAY));
                        commit_armed = true;
                    }
                }
                None => hits_open = false,
            },
            bad = bad_rx.recv(), if bad_open => match bad {
                Some(b) => {
                    sink.add_unsent(&Outcome::invalid_input(&b));
                    sink.commit();
                }
                None => bad_open = false,
            },
            signal = signals.next() => {
                interrupts += 1;
                if interrupts == 1 {
                    stopper.stop();
                    view.println(&format!("{signal}: sending nothing more; waiting for the requests on the wire to finish (Ctrl-C again to abandon them)"));
                } else {
                    let progress = run.progress().snapshot();
                    sink.flush();
                    view.finish();
                    let summary = std::mem::take(&mut sink.summary).finish(
                        &progress,
                        None,
                        started.elapsed(),
                        config.rpm,
                        config.tpm,
                    );
                    eprint!("{summary}");
                    let n = progress.in_flight;
                    eprintln!(
                        "{signal} again: abandoned {n} {} still on the wire, with no outcome: the provider may still answer {} (and bill {}), and a resume sends {} again; the outcomes written so far are in the output",
                        if n == 1 { "request" } else { "requests" },
                        if n == 1 { "it" } else { "them" },
                        if n == 1 { "it" } else { "them" },
                        if n == 1 { "it" } else { "them" },
                    );
                    if let Some(j) = sink.journal() {
                        eprintln!("{}", resume_hint(j));
                    }
                    write_report(args.report.as_deref(), &summary)?;
                    return Ok(exit::STOPPED);
                }
            }
            _ = flush_tick.tick() => sink.flush(),
        }
        if sink.error.is_some() {
            stopper.stop();
        }
    }
    while let Ok(b) = bad_rx.try_recv() {
        sink.add_unsent(&Outcome::invalid_input(&b));
    }
    while let Ok(o) = hits_rx.try_recv() {
        sink.add_unsent(&o);
    }
    let progress = run.progress().snapshot();
    let mut end = run.finish().await;
    // Stopped for the sink's error, not by a signal.
    if interrupts == 0 && sink.error.is_some() && end.stopped == Some(StopReason::Interrupted) {
        end.stopped = Some(StopReason::Failed);
    }
    sink.flush();
    // Nothing is on the wire now: unless outcomes could not be kept (their requests go
    // again, and the bound stays for the next session to count), none is left unrecorded.
    let mut exposure_error = None;
    if let Some((recorder, failed)) = &exposure {
        exposure_error = failed.lock().unwrap_or_else(|e| e.into_inner()).take();
        if sink.error.is_none() && exposure_error.is_none() {
            if let Err(e) = recorder.record(0.0) {
                // Only cautious: the next session counts the bound as spent.
                eprintln!("warning: {e}");
            }
        }
    }
    view.finish();
    let summary: Summary = std::mem::take(&mut sink.summary).finish(
        &progress,
        Some(&end),
        started.elapsed(),
        config.rpm,
        config.tpm,
    );
    eprint!("{summary}");
    // Over every session of a resumed run, from the journal.
    let overall: Option<JournalStatus> = match sink.journal() {
        Some(j) if resumed && sink.error.is_none() => Some(j.status()?),
        _ => None,
    };
    if let (true, Some(s)) = (resumed, &overall) {
        eprintln!(
            "all sessions: {} of {} requests done, {} pending; {}, cost ${:.4}",
            s.done,
            s.requests,
            s.pending,
            outcome_counts(s),
            s.cost_usd
        );
    }
    if let Some(path) = &args.output {
        eprintln!("outcomes: {}", path.display());
    }
    if let (Some(j), Some(_)) = (sink.journal(), end.stopped) {
        eprintln!("{}", resume_hint(j));
    }
    write_report(args.report.as_deref(), &summary)?;
    if let Some(h) = sim {
        h.shutdown().await;
    }
    if sink.uncached > 0 {
        eprintln!(
            "cache: {} responses could not be stored (see the warning above)",
            sink.uncached
        );
    }
    match (sink.lost, sink.journal()) {
        (0, _) => {}
        (n, Some(_)) => eprintln!(
            "{n} outcomes of requests that were sent (and paid for) are in neither the journal nor the output: a resume sends those requests again"
        ),
        (n, None) => eprintln!(
            "{n} outcomes of requests that were sent (and paid for) are not in the output: it failed before taking them, and its last line may be cut short. With --no-journal, nothing else holds them"
        ),
    }
    if let Some(e) = sink.error {
        return Err(e);
    }
    if let Some(e) = exposure_error {
        return Err(anyhow::Error::new(e).context(
            "cannot record in the journal what is on the wire, which --budget needs; nothing more was sent",
        ));
    }
    if let Some(e) = read_error.lock().expect("not poisoned").take() {
        bail!("reading the input failed part-way: {e}");
    }
    let failed = overall.map_or(summary.failed, |s| s.failed);
    Ok(if end.stopped.is_some() {
        exit::STOPPED
    } else if failed > 0 {
        exit::SOME_FAILED
    } else {
        exit::OK
    })
}

/// "N succeeded, M failed", and the outcomes of requests no longer in the input when a
/// forced resume left some out.
pub fn outcome_counts(s: &JournalStatus) -> String {
    let counts = format!("{} succeeded, {} failed", s.succeeded, s.failed);
    match s.orphans {
        0 => counts,
        n => format!(
            "{counts} (of which {n} {} of requests no longer in the input)",
            if n == 1 {
                "is the outcome"
            } else {
                "are outcomes"
            }
        ),
    }
}

/// Writes the run's summary as JSON to `path` (`--report`), if given.
fn write_report(path: Option<&Path>, summary: &Summary) -> anyhow::Result<()> {
    if let Some(path) = path {
        let json = serde_json::to_vec_pretty(summary).expect("summaries serialise");
        std::fs::write(path, json)
            .with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    Ok(())
}

/// How to go on after a stopped run.
fn resume_hint(journal: &Journal) -> String {
    format!(
        "the run is resumable: run the same command again to send the rest (journal {})",
        journal.path().display()
    )
}

/// Requests from the input thread as a stream of the batches it hands over; a read error
/// ends it and is kept for the end of the run.
/// Stores in the cache the responses a killed session journaled but may not have stored
/// (`unstored`, output lines by input line), reading their requests again from `input`.
/// A failure is a warning: the run goes on, and only the cache misses them.
fn restore_unstored(
    layer: &CacheLayer,
    input: &Path,
    parser: &LineParser,
    unstored: &HashMap<u64, Vec<u8>>,
) {
    if unstored.is_empty() {
        return;
    }
    let wanted: HashSet<u64> = unstored.keys().copied().collect();
    let restored = input::lines_at(input, &wanted)
        .map_err(anyhow::Error::from)
        .and_then(|lines| {
            let (requests, outputs): (Vec<Request>, Vec<&[u8]>) = lines
                .iter()
                .filter_map(|(line, text)| {
                    let request = parser.parse(*line, text).ok()?;
                    Some((request, unstored[line].as_slice()))
                })
                .unzip();
            Ok(layer.restore(&requests, &outputs)?)
        });
    match restored {
        Ok(0) => {}
        Ok(n) => eprintln!(
            "cache: stored {n} responses that the interrupted session had journaled but not stored"
        ),
        Err(e) => eprintln!(
            "warning: could not store the interrupted session's last responses in the cache: {e}"
        ),
    }
}

fn request_stream(
    rx: mpsc::Receiver<io::Result<Vec<Request>>>,
    error: Arc<Mutex<Option<io::Error>>>,
) -> impl futures::Stream<Item = Vec<Request>> + Send + 'static {
    futures::stream::unfold((rx, error), |(mut rx, error)| async move {
        match rx.recv().await {
            Some(Ok(batch)) => Some((batch, (rx, error))),
            Some(Err(e)) => {
                *error.lock().expect("not poisoned") = Some(e);
                None
            }
            None => None,
        }
    })
}

/// Ctrl-C (SIGINT) and SIGTERM: both stop the run the same way. The listeners live for the
/// whole run, so a signal that lands while the loop is busy (committing, writing) is kept
/// until the loop looks again rather than lost.
struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                int: signal(SignalKind::interrupt())?,
                term: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// Waits for the next signal and names it.
    async fn next(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.int.recv() => "interrupted",
                _ = self.term.recv() => "terminated",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "interrupted"
        }
    }
}
