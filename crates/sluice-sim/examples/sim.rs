//! A stand-alone simulator binary for the crate's own tests (the real entry point is
//! `sluice sim`). Accepts an optional leading `sim`, so `sim sim --port 0` behaves like
//! `sluice sim --port 0`.

use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: sluice_sim::cli::SimArgs,
}

#[tokio::main]
async fn main() {
    let argv: Vec<String> = std::env::args()
        .enumerate()
        .filter(|(i, a)| !(*i == 1 && a == "sim"))
        .map(|(_, a)| a)
        .collect();
    let cli = Cli::parse_from(argv);
    if let Err(e) = sluice_sim::cli::run(cli.args).await {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}
