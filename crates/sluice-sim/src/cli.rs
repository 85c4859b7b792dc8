//! The `sluice sim` command: flags, their translation into a [`SimConfig`], and a
//! foreground server that stops on Ctrl-C or SIGTERM.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::{FaultKind, SimConfig};

/// Flags of `sluice sim`.
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// Address to bind. Only loopback addresses are allowed unless --allow-remote.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to bind; 0 picks a free port (the chosen address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests per minute (shared by all endpoints).
    #[arg(long)]
    pub rpm: Option<u32>,
    /// Tokens per minute (OpenAI TPM; Anthropic combined tokens limit).
    #[arg(long)]
    pub tpm: Option<u32>,
    /// Anthropic input tokens per minute.
    #[arg(long)]
    pub itpm: Option<u32>,
    /// Anthropic output tokens per minute (charged max_tokens).
    #[arg(long)]
    pub otpm: Option<u32>,
    /// Maximum concurrent admitted requests.
    #[arg(long)]
    pub concurrency: Option<u32>,
    /// Base latency of every response, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Extra latency per output token, in milliseconds (fractions allowed).
    #[arg(long, default_value_t = 0.0)]
    pub per_token_ms: f64,
    /// Latency jitter as a fraction of the latency (uniform ±).
    #[arg(long, default_value_t = 0.1)]
    pub jitter: f64,
    /// Seed for content, faults and jitter.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Require this API key (Bearer for OpenAI, x-api-key for Anthropic).
    #[arg(long, env = "SLUICE_SIM_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Inject a fault: KIND=RATE with KIND one of 500, 502, 503, 529, 429, quota, hang,
    /// reset, truncated, html, drip and RATE in [0, 1]. Repeatable.
    #[arg(long = "fault", value_name = "KIND=RATE")]
    pub faults: Vec<String>,
    /// How long a `hang` fault holds the request before dropping the connection (ms).
    #[arg(long, default_value_t = 600_000)]
    pub hang_ms: u64,
    /// How long a `drip` body takes to arrive (ms).
    #[arg(long, default_value_t = 5_000)]
    pub drip_ms: u64,
    /// Completion length range in tokens, LO-HI (capped by the request's max tokens).
    #[arg(long, default_value = "16-128", value_name = "LO-HI")]
    pub output_tokens: String,
    /// Bucket capacity, in seconds of rate.
    #[arg(long, default_value_t = 1.0)]
    pub burst_seconds: f64,
    /// Default embedding dimensions (a request's `dimensions` overrides it).
    #[arg(long, default_value_t = 1536)]
    pub embedding_dims: usize,
    /// Bill an answer whose client went away while it was generated (killed, or timed
    /// out), as a provider that goes on generating does: it counts in the stats' `ok` and
    /// tokens.
    #[arg(long)]
    pub bill_abandoned: bool,
    /// Allow binding a non-loopback address (the simulator has no real security).
    #[arg(long)]
    pub allow_remote: bool,
}

impl Default for SimArgs {
    fn default() -> Self {
        SimArgs {
            host: "127.0.0.1".into(),
            port: 8080,
            rpm: None,
            tpm: None,
            itpm: None,
            otpm: None,
            concurrency: None,
            latency_ms: 0,
            per_token_ms: 0.0,
            jitter: 0.1,
            seed: 0,
            api_key: None,
            faults: Vec::new(),
            hang_ms: 600_000,
            drip_ms: 5_000,
            output_tokens: "16-128".into(),
            burst_seconds: 1.0,
            embedding_dims: 1536,
            bill_abandoned: false,
            allow_remote: false,
        }
    }
}

impl SimArgs {
    /// Validate the flags and build the configuration.
    pub fn to_config(&self) -> Result<SimConfig, String> {
        let mut faults = Vec::new();
        for f in &self.faults {
            let (kind, rate) = f.split_once('=').ok_or_else(|| {
                format!("--fault {f:?}: expected KIND=RATE, e.g. --fault 500=0.05")
            })?;
            let kind: FaultKind = kind
                .trim()
                .parse()
                .map_err(|e| format!("--fault {f:?}: {e}"))?;
            let rate: f64 = rate
                .trim()
                .parse()
                .map_err(|_| format!("--fault {f:?}: RATE must be a number in [0, 1]"))?;
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("--fault {f:?}: RATE must be in [0, 1]"));
            }
            faults.push((kind, rate));
        }
        let total: f64 = faults.iter().map(|f| f.1).sum();
        if total > 1.0 + 1e-9 {
            return Err(format!("--fault rates add up to {total}, more than 1"));
        }
        let output_tokens = {
            let s = &self.output_tokens;
            let (lo, hi) = s.split_once('-').unwrap_or((s, s));
            let parse = |x: &str| {
                x.trim()
                    .parse::<u32>()
                    .map_err(|_| format!("--output-tokens {s:?}: expected LO-HI, e.g. 16-128"))
            };
            let (lo, hi) = (parse(lo)?, parse(hi)?);
            if lo > hi {
                return Err(format!("--output-tokens {s:?}: LO is greater than HI"));
            }
            (lo, hi)
        };
        if !(self.jitter >= 0.0 && self.jitter <= 1.0) {
            return Err("--jitter must be in [0, 1]".into());
        }
        if !(self.per_token_ms >= 0.0 && self.per_token_ms.is_finite()) {
            return Err("--per-token-ms must be a non-negative number".into());
        }
        if !(self.burst_seconds > 0.0 && self.burst_seconds.is_finite()) {
            return Err("--burst-seconds must be a positive number".into());
        }
        for (name, v) in [
            ("--rpm", self.rpm),
            ("--tpm", self.tpm),
            ("--itpm", self.itpm),
            ("--otpm", self.otpm),
            ("--concurrency", self.concurrency),
        ] {
            if v == Some(0) {
                return Err(format!("{name} must be at least 1 (omit it for no limit)"));
            }
        }
        if self.embedding_dims == 0 {
            return Err("--embedding-dims must be at least 1".into());
        }
        Ok(SimConfig {
            rpm: self.rpm,
            tpm: self.tpm,
            itpm: self.itpm,
            otpm: self.otpm,
            concurrency: self.concurrency,
            latency: Duration::from_millis(self.latency_ms),
            per_token_latency: Duration::from_secs_f64(self.per_token_ms / 1000.0),
            jitter: self.jitter,
            seed: self.seed,
            api_key: self.api_key.clone(),
            faults,
            hang: Duration::from_millis(self.hang_ms),
            drip: Duration::from_millis(self.drip_ms),
            output_tokens,
            burst_seconds: self.burst_seconds,
            embedding_dims: self.embedding_dims,
            bill_abandoned: self.bill_abandoned,
        })
    }

    /// The address to bind, refusing non-loopback hosts unless `--allow-remote`.
    pub fn bind_addr(&self) -> Result<SocketAddr, String> {
        let ip: IpAddr = if self.host.eq_ignore_ascii_case("localhost") {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            self.host
                .trim_matches(|c| c == '[' || c == ']')
                .parse()
                .map_err(|_| {
                    format!(
                        "--host {:?} is not an IP address (use e.g. 127.0.0.1)",
                        self.host
                    )
                })?
        };
        if !ip.is_loopback() && !self.allow_remote {
            return Err(format!(
                "refusing to bind {ip}: it is not a loopback address and the simulator has no real security; \
                 pass --allow-remote if you really want it reachable from other machines"
            ));
        }
        Ok(SocketAddr::new(ip, self.port))
    }
}

/// Run the simulator in the foreground: bind, print
/// `sluice sim listening on http://ADDR/v1` to stdout, and serve until Ctrl-C or SIGTERM.
pub async fn run(args: SimArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let config = args.to_config()?;
    let addr = args.bind_addr()?;
    let handle = crate::start(config, addr)
        .await
        .map_err(|e| format!("cannot bind {addr}: {e}"))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "sluice sim listening on {}", handle.base_url())?;
        out.flush()?;
    }
    wait_for_signal().await;
    tracing::info!("sluice sim shutting down");
    handle.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
