//! `sluice models` (the catalog) and `sluice estimate` (what a job would cost, with
//! nothing sent).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use serde::Serialize;
use sluice::catalog::{Router, RouterOptions};
use sluice::LineParser;

use crate::exit;
use crate::targets::load_catalog;

/// Arguments of `sluice models`.
#[derive(Args, Debug)]
pub struct ModelsArgs {
    /// A catalog file overriding the built-in one (see `--toml` for the format).
    #[arg(long, value_name = "FILE")]
    pub model_config: Option<PathBuf>,

    /// Print the catalog as JSON.
    #[arg(long, conflicts_with = "toml")]
    pub json: bool,

    /// Print the built-in catalog's TOML: a starting point for a `--model-config` file.
    #[arg(long)]
    pub toml: bool,
}

fn money(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.3}"))
}

fn count(v: Option<u64>) -> String {
    match v {
        None => "-".into(),
        Some(n) if n >= 1_000_000 && n % 1_000 == 0 => format!("{}M", n as f64 / 1e6),
        Some(n) if n >= 10_000 => format!("{}k", n / 1000),
        Some(n) => n.to_string(),
    }
}

/// Runs `sluice models`.
pub fn models(args: ModelsArgs) -> u8 {
    if args.toml {
        print!("{}", sluice::catalog::BUILTIN);
        return exit::OK;
    }
    let catalog = match load_catalog(args.model_config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::BAD_INPUT;
        }
    };
    if args.json {
        #[derive(Serialize)]
        struct Listing<'a> {
            providers: BTreeMap<String, &'a sluice::catalog::ProviderEntry>,
            models: &'a BTreeMap<String, sluice::catalog::ModelEntry>,
        }
        let listing = Listing {
            providers: catalog
                .providers
                .iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            models: &catalog.models,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&listing).expect("the catalog serialises")
        );
        return exit::OK;
    }
    println!(
        "{:<26} {:<10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>8}",
        "MODEL", "PROVIDER", "IN $/M", "OUT $/M", "CACHE $/M", "CONTEXT", "MAX OUT", "RPM", "TPM"
    );
    let mut rows: Vec<_> = catalog.models.iter().collect();
    rows.sort_by_key(|(name, m)| (m.provider, name.as_str()));
    for (name, m) in rows {
        let tpm = m.tpm.or(m.itpm);
        println!(
            "{:<26} {:<10} {:>8} {:>8} {:>9} {:>8} {:>8} {:>6} {:>8}",
            name,
            m.provider.as_str(),
            money(m.input_per_mtok),
            money(m.output_per_mtok),
            money(m.cached_input_per_mtok),
            count(m.context_window),
            count(m.max_output_tokens),
            count(m.rpm),
            count(tpm),
        );
    }
    println!();
    for (p, e) in &catalog.providers {
        println!(
            "{p}: {} (key in {})",
            e.api_base.as_deref().unwrap_or("-"),
            e.key_env.as_deref().unwrap_or("-")
        );
    }
    println!("Prices are USD per million tokens; RPM/TPM are typical tier-1 limits (Anthropic: input TPM), for reference only.");
    exit::OK
}

/// Arguments of `sluice estimate`.
#[derive(Args, Debug)]
pub struct EstimateArgs {
    /// Input JSONL, as for `sluice run`.
    pub input: PathBuf,

    /// Model for lines that name none.
    #[arg(long)]
    pub model: Option<String>,

    /// A catalog file overriding the built-in one.
    #[arg(long, value_name = "FILE")]
    pub model_config: Option<PathBuf>,

    /// Output tokens assumed for chat requests that set no max_tokens.
    #[arg(long, default_value_t = sluice::request::DEFAULT_ASSUMED_OUTPUT_TOKENS)]
    pub assume_output_tokens: u32,

    /// Print the estimate as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The estimate of one model's share of a job.
#[derive(Clone, Debug, Default, Serialize)]
struct ModelEstimate {
    requests: u64,
    input_tokens: u64,
    max_output_tokens: u64,
    /// Input cost; `None` when the model's price is unknown.
    input_usd: Option<f64>,
    /// Input plus every request's whole output bound.
    max_usd: Option<f64>,
}

#[derive(Serialize)]
struct Estimate {
    models: BTreeMap<String, ModelEstimate>,
    bad_lines: u64,
    input_usd: f64,
    max_usd: f64,
    unpriced_requests: u64,
}

/// Runs `sluice estimate`.
pub fn estimate(args: EstimateArgs) -> u8 {
    let catalog = match load_catalog(args.model_config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::BAD_INPUT;
        }
    };
    let router = Arc::new(Router::new(catalog, RouterOptions::default()));
    // Of a fallback chain, the first model is the one estimated.
    let mut parser = LineParser::new(
        args.model
            .as_deref()
            .and_then(|m| m.split(',').next())
            .map(|m| m.trim().to_string()),
    );
    parser.assumed_output_tokens = args.assume_output_tokens;
    parser.count_tokens = true;
    parser.router = Some(router);
    let file = match std::fs::File::open(&args.input) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", args.input.display());
            return exit::BAD_INPUT;
        }
    };
    let mut est = Estimate {
        models: BTreeMap::new(),
        bad_lines: 0,
        input_usd: 0.0,
        max_usd: 0.0,
        unpriced_requests: 0,
    };
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: reading {}: {e}", args.input.display());
                return exit::ERROR;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let r = match parser.parse(i as u64 + 1, &line) {
            Ok(r) => r,
            Err(bad) => {
                eprintln!("bad input: {bad}");
                est.bad_lines += 1;
                continue;
            }
        };
        let m = est.models.entry(r.model.clone()).or_insert(ModelEstimate {
            input_usd: r.price.map(|_| 0.0),
            max_usd: r.price.map(|_| 0.0),
            ..ModelEstimate::default()
        });
        m.requests += 1;
        m.input_tokens += u64::from(r.input_tokens);
        m.max_output_tokens += u64::from(r.max_output_tokens);
        match r.price {
            Some(p) => {
                let input = p.bound(u64::from(r.input_tokens), 0);
                let max = p.bound(u64::from(r.input_tokens), u64::from(r.max_output_tokens));
                *m.input_usd.get_or_insert(0.0) += input;
                *m.max_usd.get_or_insert(0.0) += max;
                est.input_usd += input;
                est.max_usd += max;
            }
            None => est.unpriced_requests += 1,
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&est).expect("estimates serialise")
        );
    } else {
        println!(
            "{:<28} {:>9} {:>13} {:>14} {:>12} {:>12}",
            "MODEL", "REQUESTS", "INPUT TOKENS", "MAX OUTPUT", "INPUT $", "AT MOST $"
        );
        for (name, m) in &est.models {
            let usd = |v: Option<f64>| v.map_or_else(|| "no price".into(), |v| format!("{v:.4}"));
            println!(
                "{:<28} {:>9} {:>13} {:>14} {:>12} {:>12}",
                name,
                m.requests,
                m.input_tokens,
                m.max_output_tokens,
                usd(m.input_usd),
                usd(m.max_usd)
            );
        }
        println!(
            "total: ${:.4} of input; at most ${:.4} if every request used its whole output bound",
            est.input_usd, est.max_usd
        );
        if est.unpriced_requests > 0 {
            println!(
                "{} requests go to models without a price in the catalog and are not counted",
                est.unpriced_requests
            );
        }
        println!("Input tokens are counted with tiktoken's o200k_base; Claude's and Gemini's own tokenizers may count up to about a quarter more.");
    }
    if est.bad_lines > 0 {
        eprintln!("{} bad lines were left out", est.bad_lines);
        return exit::BAD_INPUT;
    }
    exit::OK
}
