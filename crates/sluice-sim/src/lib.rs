//! A local OpenAI-, Anthropic- and Gemini-compatible provider simulator that enforces
//! rate limits and injects faults, so sluice (and any other client) can be tested against something
//! that behaves like the real APIs under load.
//!
//! Start it in-process with [`start`] or from the command line with `sluice sim`
//! (see [`cli`]). It serves:
//!
//! | Endpoint                    | Shape                                                        |
//! |-----------------------------|--------------------------------------------------------------|
//! | `POST /v1/chat/completions` | OpenAI chat completions, JSON or SSE (`stream: true`)        |
//! | `POST /v1/embeddings`       | OpenAI embeddings, `float` or `base64`                       |
//! | `POST /v1/messages`         | Anthropic Messages, JSON or SSE (fields outside the spec's `CreateMessageParams` are refused, as Anthropic does) |
//! | `POST /v1beta/models/{model}:generateContent` | Gemini `generateContent`, JSON, with `usageMetadata`; unknown fields are refused with Google's "Unknown name" error |
//! | `GET /v1/models`            | OpenAI list, or the Anthropic list when the request carries `anthropic-version` or `x-api-key` |
//! | `GET /_sim/stats`           | [`SimStats`] as JSON                                         |
//! | `POST /_sim/reset`          | zero the stats, refill the buckets, forget fingerprints      |
//!
//! # Content
//!
//! Responses are deterministic for a given request body and [`SimConfig::seed`]: the
//! content RNG is seeded from `hash(seed, path, body)`. Completions are words from a small
//! vocabulary; **one word is one completion token**, so `usage` is exact. The completion
//! length is drawn uniformly from [`SimConfig::output_tokens`] and capped by `max_tokens` /
//! `max_completion_tokens` (then `finish_reason` is `"length"`, or `stop_reason` is
//! `"max_tokens"`). Embeddings are unit-length vectors seeded from `hash(seed, input)`,
//! so the same input text always gets the same vector.
//!
//! # Prompt token estimate
//!
//! The simulator does not run a tokenizer (it must be fast). For chat and messages:
//!
//! ```text
//! prompt_tokens = 3 + Σ_messages (4 + Σ_text_pieces ceil(bytes / 4)) + Σ_system_pieces ceil(bytes / 4)
//! ```
//!
//! where text pieces are a string `content`, or the `text` of each content part/block.
//! For embeddings: `Σ_inputs ceil(bytes / 4)` for strings, the array length for token
//! arrays, with no per-request overhead. This is what the simulator reports in `usage`
//! and charges to the token buckets; a tiktoken count of English text is close to it.
//!
//! # Rate limits
//!
//! Each configured limit is a token bucket refilled continuously (tokio time) at
//! `limit / 60` per second, with capacity `burst_seconds × limit / 60`, starting full.
//! All endpoints share the same buckets (like an organisation-wide limit).
//!
//! * requests bucket (`rpm`): every request to a limited endpoint costs 1;
//! * tokens bucket (`tpm`): OpenAI chat is charged `prompt estimate + max output`, where
//!   max output is `max_completion_tokens`/`max_tokens` if present, else
//!   `output_tokens.1` (× `n`); embeddings are charged the input estimate; Anthropic is
//!   charged `input estimate + max_tokens`;
//! * input tokens bucket (`itpm`, Anthropic only): charged the input estimate;
//! * output tokens bucket (`otpm`, Anthropic only): charged `max_tokens`;
//! * concurrency: at most `concurrency` admitted requests in flight (a streamed response
//!   holds its slot until the body ends).
//!
//! Admission is all-or-nothing. A request costing more than a bucket's capacity is
//! admitted when that bucket is full (its level goes negative), so nothing is unservable.
//! **Settlement:** on a successful response the token buckets are refunded
//! `charged − actual usage` (the unused part of the output reservation), exactly like the
//! sluice client settles its own reservation. Failed and faulted attempts are not refunded.
//!
//! Over a limit the answer is 429 with `retry-after` (whole seconds, rounded up, ≥ 1) and
//! `retry-after-ms` (time until the bucket holds enough; for the concurrency limit the
//! base latency, at least 10 ms). Every response from a limited endpoint carries the
//! provider's rate-limit headers for the configured limits (OpenAI
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` with Go-duration resets;
//! Anthropic `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`
//! with RFC 3339 resets), plus `x-request-id` and `request-id`.
//!
//! # Authentication
//!
//! With [`SimConfig::api_key`] set, OpenAI endpoints want `Authorization: Bearer KEY`
//! (401 `invalid_api_key` otherwise) and Anthropic endpoints want `x-api-key: KEY`; they
//! also accept `Authorization: Bearer KEY`, which is what the official Anthropic Python
//! SDK 2.x sends (401 `authentication_error` otherwise). Gemini wants `x-goog-api-key: KEY`
//! or `?key=KEY` (403 `PERMISSION_DENIED` without one, 400 `INVALID_ARGUMENT` with reason
//! `API_KEY_INVALID` for a wrong one). Keys are never echoed back.
//!
//! # Gemini
//!
//! Errors are `{"error": {"code", "message", "status", "details"?}}`. Gemini sends no
//! rate-limit headers: over a limit the answer is 429 `RESOURCE_EXHAUSTED` with a
//! per-minute `QuotaFailure` and the wait in `RetryInfo.retryDelay` (no `retry-after`).
//! The `quota` fault is a 429 whose `QuotaFailure` names a per-day quota; `529` and `503`
//! are 503 `UNAVAILABLE` "The model is overloaded". Prompt tokens follow the estimate
//! below, with `contents` as messages and `systemInstruction` as the system text.
//!
//! # Faults
//!
//! Each [`FaultKind`] has a rate in `[0, 1]`. After authentication, validation and rate
//! limiting have admitted a request, one uniform number `u = hash(seed, fingerprint, n)`
//! picks at most one fault (the kinds partition `[0, 1)` in configuration order), where
//! the fingerprint is the hash of the path and raw body bytes and `n` is the number of
//! earlier *admitted* attempts with that fingerprint. A replay with the same seed and the
//! same inputs therefore sees the same faults on the same attempts, whatever the arrival
//! order and however many 429s happened in between. `/v1/models` never gets faults.
//!
//! # Stats
//!
//! Every request to a `/v1/...` path counts in [`SimStats::requests`] and, once finished,
//! in exactly one of `ok`, `rate_limited`, `injected_faults[kind]`, `bad_requests` or
//! `unauthorized`, except requests abandoned by the client before they have an outcome
//! (a disconnect or client timeout during the latency sleep or the body read), which
//! count only in `requests`.

#![warn(missing_docs)]

pub mod cli;
mod hash;
mod limiter;
mod protocol;
mod server;
mod stats;
mod text;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything that shapes the simulator's behaviour. Build one with
/// `SimConfig { rpm: Some(600), ..Default::default() }` or from CLI flags with
/// [`cli::SimArgs::to_config`]. Its `Debug` output redacts the API key.
#[derive(Clone)]
pub struct SimConfig {
    /// Requests per minute (one bucket shared by all endpoints). `None`: unlimited.
    pub rpm: Option<u32>,
    /// Tokens per minute: OpenAI TPM, and Anthropic's combined tokens limit.
    pub tpm: Option<u32>,
    /// Anthropic input tokens per minute.
    pub itpm: Option<u32>,
    /// Anthropic output tokens per minute (charged `max_tokens` on admission).
    pub otpm: Option<u32>,
    /// Maximum number of admitted requests in flight at once.
    pub concurrency: Option<u32>,
    /// Base latency of every response (default 0).
    pub latency: Duration,
    /// Extra latency per output token (default 0).
    pub per_token_latency: Duration,
    /// Jitter as a fraction of the latency, uniform ± (default 0.1).
    pub jitter: f64,
    /// Seed for content, faults and jitter.
    pub seed: u64,
    /// If set, requests must carry this key (`Authorization: Bearer` for OpenAI,
    /// `x-api-key` for Anthropic), otherwise 401.
    pub api_key: Option<String>,
    /// Faults to inject, each with a rate in `[0, 1]`; see the crate docs.
    pub faults: Vec<(FaultKind, f64)>,
    /// How long a `hang` fault holds the request before dropping the connection
    /// (default 600 s).
    pub hang: Duration,
    /// Total time a `drip` body takes to arrive (default 5 s).
    pub drip: Duration,
    /// Inclusive range the completion length is drawn from (default 16–128 tokens),
    /// then capped by the request's max tokens.
    pub output_tokens: (u32, u32),
    /// Bucket capacity in seconds of rate (default 1.0).
    pub burst_seconds: f64,
    /// Default embedding dimensions (default 1536), overridden by `dimensions`.
    pub embedding_dims: usize,
    /// Bill a successful answer whose client went away before it came (counted in `ok`
    /// and the tokens), as a provider that goes on generating does. Default false: a
    /// request dropped while waiting out its latency is not counted.
    pub bill_abandoned: bool,
}

impl std::fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimConfig")
            .field("rpm", &self.rpm)
            .field("tpm", &self.tpm)
            .field("itpm", &self.itpm)
            .field("otpm", &self.otpm)
            .field("concurrency", &self.concurrency)
            .field("latency", &self.latency)
            .field("per_token_latency", &self.per_token_latency)
            .field("jitter", &self.jitter)
            .field("seed", &self.seed)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("faults", &self.faults)
            .field("hang", &self.hang)
            .field("drip", &self.drip)
            .field("output_tokens", &self.output_tokens)
            .field("burst_seconds", &self.burst_seconds)
            .field("embedding_dims", &self.embedding_dims)
            .field("bill_abandoned", &self.bill_abandoned)
            .finish()
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            rpm: None,
            tpm: None,
            itpm: None,
            otpm: None,
            concurrency: None,
            latency: Duration::ZERO,
            per_token_latency: Duration::ZERO,
            jitter: 0.1,
            seed: 0,
            api_key: None,
            faults: Vec::new(),
            hang: Duration::from_secs(600),
            drip: Duration::from_secs(5),
            output_tokens: (16, 128),
            burst_seconds: 1.0,
            embedding_dims: 1536,
            bill_abandoned: false,
        }
    }
}

/// A fault the simulator can inject into an admitted request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// `500` with a server error body.
    Http500,
    /// `502` with a JSON bad-gateway body.
    Http502,
    /// `503` with a JSON "overloaded, try later" body.
    Http503,
    /// `529` with an `overloaded_error` body (Anthropic's provider-wide overload).
    Overloaded529,
    /// `429` rate-limit body without `retry-after` / `retry-after-ms` headers.
    RateLimitNoRetryAfter,
    /// Quota exhausted: OpenAI `429 insufficient_quota`; Anthropic `400` "credit balance
    /// is too low". A client must stop, not retry.
    InsufficientQuota,
    /// Hold the request for [`SimConfig::hang`], then drop the connection without a response.
    Hang,
    /// Send status 200, headers and part of the body, then abort the connection.
    Reset,
    /// `200` with the body cut in half, with complete HTTP framing.
    Truncated,
    /// `502` with `content-type: text/html` and an nginx-style page.
    Html502,
    /// `200` with the correct body streamed in small chunks over [`SimConfig::drip`].
    Drip,
}

impl FaultKind {
    /// Every kind, in a fixed order.
    pub const ALL: [FaultKind; 11] = [
        FaultKind::Http500,
        FaultKind::Http502,
        FaultKind::Http503,
        FaultKind::Overloaded529,
        FaultKind::RateLimitNoRetryAfter,
        FaultKind::InsufficientQuota,
        FaultKind::Hang,
        FaultKind::Reset,
        FaultKind::Truncated,
        FaultKind::Html502,
        FaultKind::Drip,
    ];

    /// The kind's name, as used by `--fault NAME=RATE` and as the key in
    /// [`SimStats::injected_faults`].
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::Http500 => "500",
            FaultKind::Http502 => "502",
            FaultKind::Http503 => "503",
            FaultKind::Overloaded529 => "529",
            FaultKind::RateLimitNoRetryAfter => "429",
            FaultKind::InsufficientQuota => "quota",
            FaultKind::Hang => "hang",
            FaultKind::Reset => "reset",
            FaultKind::Truncated => "truncated",
            FaultKind::Html502 => "html",
            FaultKind::Drip => "drip",
        }
    }

    pub(crate) fn index(&self) -> usize {
        FaultKind::ALL.iter().position(|k| k == self).unwrap_or(0)
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The error returned when parsing an unknown fault name.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown fault kind {0:?} (expected one of 500, 502, 503, 529, 429, quota, hang, reset, truncated, html, drip)")]
pub struct UnknownFaultKind(pub String);

impl std::str::FromStr for FaultKind {
    type Err = UnknownFaultKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FaultKind::ALL
            .iter()
            .copied()
            .find(|k| k.name() == s)
            .ok_or_else(|| UnknownFaultKind(s.to_string()))
    }
}

/// A snapshot of the simulator's counters (also served at `GET /_sim/stats`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// All requests to `/v1/...` paths.
    pub requests: u64,
    /// Clean 200 responses (no fault injected).
    pub ok: u64,
    /// 429s from the rate limiter (the `429` fault counts under `injected_faults`).
    pub rate_limited: u64,
    /// Injected faults by [`FaultKind::name`]; every kind is present, zero or not.
    pub injected_faults: BTreeMap<String, u64>,
    /// Requests being handled right now (a streamed body counts until it ends).
    pub in_flight: u64,
    /// The largest `in_flight` seen since start or reset.
    pub max_in_flight: u64,
    /// Clean 200 responses beyond the first for the same fingerprint (hash of path and
    /// raw body bytes): a client that never duplicates work keeps this at 0.
    pub ok_duplicates: u64,
    /// 400s from validation (malformed JSON, missing fields, bad values), and 404/405.
    pub bad_requests: u64,
    /// 401s from a missing or wrong API key.
    pub unauthorized: u64,
    /// Prompt/input tokens reported in the `usage` of complete successful bodies
    /// (clean 200s and `drip` faults, which deliver a correct body).
    pub prompt_tokens: u64,
    /// Completion/output tokens reported in the same bodies.
    pub completion_tokens: u64,
}

/// A running simulator. Dropping it stops the server (without waiting);
/// [`SimHandle::shutdown`] stops it and waits.
pub struct SimHandle {
    /// The address the server is bound to.
    pub addr: SocketAddr,
    sim: Arc<server::Sim>,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SimHandle {
    /// The OpenAI-style base URL, `http://ADDR/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        self.sim.stats.snapshot()
    }

    /// Zero the stats, refill the buckets and forget fingerprints (like `POST /_sim/reset`).
    pub fn reset(&self) {
        self.sim.reset();
    }

    /// Stop accepting connections, let open connections finish their current response
    /// (at most 2 s; hanging requests are dropped), and wait for the server task.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Bind `addr` (port 0 picks a free port) and spawn the simulator on the current tokio
/// runtime. The server runs until the returned handle is shut down or dropped.
pub async fn start(config: SimConfig, addr: SocketAddr) -> std::io::Result<SimHandle> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let sim = Arc::new(server::Sim::new(config));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(server::serve(listener, sim.clone(), rx));
    Ok(SimHandle {
        addr,
        sim,
        shutdown: tx,
        task: Some(task),
    })
}
