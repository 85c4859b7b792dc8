//! `sluice status JOURNAL`: where a run stands, read from its journal without changing it.

use std::path::PathBuf;

use clap::Args;
use sluice::journal::Journal;

use crate::exit;

/// Arguments of `sluice status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The run's journal (by default the output file's name + `.journal`).
    pub journal: PathBuf,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Prints the status and returns the exit code: 0 when every request is done, 3 when some
/// are pending, 2 when the journal cannot be read.
pub fn run(args: StatusArgs) -> u8 {
    let journal = match Journal::open_read_only(&args.journal) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::BAD_INPUT;
        }
    };
    let status = match journal.status() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::BAD_INPUT;
        }
    };
    let meta = journal.meta();
    if args.json {
        let v = serde_json::json!({
            "journal": args.journal.display().to_string(),
            "input": meta.input_path,
            "output": meta.output_path,
            "created_at": meta.created_at,
            "settings": meta.settings,
            "by_custom_id": meta.by_custom_id,
            "status": status,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("JSON serialises")
        );
    } else {
        println!(
            "journal {} (made {} by sluice {})",
            args.journal.display(),
            meta.created_at,
            meta.created_by
        );
        println!("input {}  →  output {}", meta.input_path, meta.output_path);
        if meta.by_custom_id {
            println!("(a resume went on with a changed input: requests are matched by custom_id)");
        }
        println!(
            "{} requests: {} done, {} pending; {}",
            status.requests,
            status.done,
            status.pending,
            crate::run::outcome_counts(&status)
        );
        println!(
            "attempts {}, tokens {} in, {} out, cost ${:.4} (of outcomes with a known price)",
            status.attempts, status.prompt_tokens, status.completion_tokens, status.cost_usd
        );
        if status.unrecorded_usd > 0.0 {
            println!(
                "up to ${:.4} more may have been billed with no outcome here: requests on the wire, or answered and not yet journaled, when a session was killed (or in a session running now); a resume's --budget counts it as spent",
                status.unrecorded_usd
            );
        }
        for e in &status.errors {
            println!("  {}: {} (latest: {})", e.kind, e.count, e.example);
        }
        if status.pending > 0 {
            println!("resume: run the same `sluice run` command again");
        }
    }
    if status.pending > 0 {
        exit::STOPPED
    } else {
        exit::OK
    }
}
