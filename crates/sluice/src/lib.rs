//! sluice runs large volumes of LLM API requests as fast as the provider's rate limits
//! allow, with exactly one outcome per request.
//!
//! The pieces, in the order a request meets them:
//!
//! * [`request`]: input lines in OpenAI Batch, Anthropic batch, chat-body or prompt form
//!   become [`Request`]s with their input tokens estimated ([`tokens`]), routed by the model
//!   [`catalog`] to their provider and translated into its wire format ([`provider`]:
//!   OpenAI and compatible servers, Anthropic Messages, Gemini `generateContent`).
//! * [`engine`]: the scheduler. It owns every request's state, admits requests through the
//!   [`limiter`] (RPM, TPM, cooldown after 429), sends attempts through a
//!   [`provider::Transport`], classifies what comes back ([`provider::classify`]) and retries
//!   by the [`retry::RetryPolicy`].
//! * [`outcome`]: what comes out, one [`Outcome`] per request, priced by [`cost`];
//!   [`summary`] adds them up.
//!
//! ```no_run
//! use std::sync::Arc;
//! use futures::StreamExt;
//! use sluice::{Engine, EngineConfig, LineParser, provider::http::HttpTransport};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = EngineConfig::builder().rpm(500.0).tpm(200_000.0).concurrency(32).build()?;
//! let transport = HttpTransport::new("http://127.0.0.1:8080/v1", Some("sk-test"), 32)?;
//! let parser = LineParser::new(Some("gpt-4.1-mini".into()));
//! let requests = (1..=3u64).map(move |i| parser.parse(i, r#"{"prompt": "Say hi"}"#).unwrap());
//! let mut run = Engine::new(config, Arc::new(transport)).run(futures::stream::iter(requests));
//! while let Some(outcome) = run.next().await {
//!     println!("{} {:?}", outcome.custom_id, outcome.status);
//! }
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod blake3_many;
pub mod cache;
pub mod catalog;
pub mod cost;
pub mod engine;
pub mod input;
pub mod journal;
pub mod json;
pub mod limiter;
pub mod outcome;
pub mod provider;
pub mod request;
pub mod retry;
pub mod summary;
pub mod tokens;
pub mod wake;

pub use catalog::{Catalog, Router};
pub use cost::Price;
pub use engine::{
    Engine, EngineConfig, EngineConfigBuilder, EngineEvent, ExposureGate, Order, Progress,
    ProgressSnapshot, Run, RunEnd, StopReason, Stopper,
};
pub use outcome::{ErrorInfo, ErrorKind, Outcome, Status, Usage};
pub use provider::ProviderKind;
pub use request::{BadLine, Endpoint, LineParser, Request};
pub use retry::RetryPolicy;
pub use wake::WakeGrid;
