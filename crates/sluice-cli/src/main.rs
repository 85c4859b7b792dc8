//! `sluice`: run a JSONL file of LLM requests at exactly the provider's rate limits, or
//! serve the provider simulator.
//!
//! The binary is a thin layer over the `sluice` library (the engine) and `sluice-sim`
//! (the simulator): argument parsing, input and output files, progress, the summary and
//! exit codes.

mod cached;
mod durable;
mod models;
mod progress;
mod run;
mod status;
mod targets;

use std::process::ExitCode;

/// mimalloc instead of glibc's malloc: allocating and freeing were about a tenth of the
/// client's instructions per request. Measured (unpaced, journal on): 23.0 → 20.7 µs per
/// request at 1,000,000 requests, 21.2 → 19.7 at 300,000; peak RSS 25.7 → 46.9 MB and
/// 26.1 → 38.3 MB (it keeps freed memory for reuse).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};

/// Exit codes, distinct per situation so scripts can tell them apart.
pub mod exit {
    /// Every request succeeded.
    pub const OK: u8 = 0;
    /// The run finished, and some requests failed.
    pub const SOME_FAILED: u8 = 1;
    /// Bad usage or bad input: nothing was sent.
    pub const BAD_INPUT: u8 = 2;
    /// The run stopped early (quota exhausted, interrupted): some requests were not sent.
    pub const STOPPED: u8 = 3;
    /// The run could not go on (an I/O error, say).
    pub const ERROR: u8 = 4;
}

#[derive(Parser, Debug)]
#[command(
    name = "sluice",
    version,
    about = "Run large volumes of LLM API requests as fast as the provider's rate limits allow",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send every request of a JSONL file and write one outcome line per request.
    Run(Box<run::RunArgs>),
    /// Serve a local OpenAI-, Anthropic- and Gemini-compatible simulator with rate limits
    /// and faults.
    Sim(sluice_sim::cli::SimArgs),
    /// Show where a run stands, from its journal, without changing it.
    Status(status::StatusArgs),
    /// List the model catalog: providers, prices, context windows, typical limits.
    Models(models::ModelsArgs),
    /// Count an input's tokens and price it, sending nothing.
    Estimate(models::EstimateArgs),
}

/// Keeps a run's memory in 4 KiB pages. A run's heap is a few MB, reused request after
/// request, so a 2 MiB transparent huge page saves it little, while each is zeroed whole
/// when first touched, used or not. mimalloc's `no_thp` feature stops it asking for them
/// (`MADV_HUGEPAGE`, for every command); this covers systems that give them unasked
/// (THP `always`), from here on. Measured on 20,000 unpaced requests (BENCHMARKS.md,
/// thirteenth session): peak RSS 23 → 15 MB with `--no-journal`, 35 → 19 MB with the
/// journal, 37 → 22 MB with the cache too; client CPU 1% to 4% lower.
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes integers only and changes no memory of ours; on a
    // kernel without it the call fails and nothing changes.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// A write past the file size limit (`ulimit -f`) fails with `EFBIG`, an error the run
/// handles like a full disk (it stops, keeping what was paid for), rather than killing the
/// process by the signal `SIGXFSZ`.
fn no_file_size_signal() {
    #[cfg(target_os = "linux")]
    // SAFETY: sets the signal's disposition to "ignore", which runs no code of ours.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Run(_)) {
        no_huge_pages();
        no_file_size_signal();
    }
    match cli.command {
        Command::Status(args) => return ExitCode::from(status::run(args)),
        Command::Models(args) => return ExitCode::from(models::models(args)),
        Command::Estimate(args) => return ExitCode::from(models::estimate(args)),
        _ => {}
    }
    // The client's own work per request is a few microseconds: one thread does it with no
    // cross-thread wake-ups (measured: less CPU per request than the multi-thread runtime).
    let mut builder = match &cli.command {
        Command::Run(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    // In a paced run the thread sleeps to the send grid before it waits for responses, so
    // one wake-up reads all that arrived since the last (see `sluice::wake`).
    let grid = sluice::WakeGrid::new();
    if matches!(cli.command, Command::Run(_)) {
        builder.on_thread_park(grid.park_hook());
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::from(exit::ERROR);
        }
    };
    match cli.command {
        Command::Run(mut args) => {
            args.wake_grid = Some(grid);
            ExitCode::from(runtime.block_on(run::run(*args)))
        }
        Command::Sim(args) => match runtime.block_on(sluice_sim::cli::run(args)) {
            Ok(()) => ExitCode::from(exit::OK),
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(exit::BAD_INPUT)
            }
        },
        Command::Status(_) | Command::Models(_) | Command::Estimate(_) => {
            unreachable!("handled above")
        }
    }
}
