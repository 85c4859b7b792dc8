//! The real transport: HTTP over one shared `reqwest` connection pool (rustls), to one
//! or more targets (a provider's API base URL and key).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use super::{AttemptFuture, HttpResponse, ProviderKind, Transport, TransportError};
use crate::request::{Endpoint, Request};

/// Where one group of requests goes: a provider's wire API at a base URL, with its key.
#[derive(Clone)]
pub struct TargetConfig {
    /// The wire API.
    pub provider: ProviderKind,
    /// The API base URL, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// The API key, if the target needs one.
    pub api_key: Option<String>,
}

impl std::fmt::Debug for TargetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetConfig")
            .field("provider", &self.provider)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// One target, ready to send to: its URLs parsed once, its headers built once.
struct Target {
    provider: ProviderKind,
    base_url: String,
    /// Chat and embeddings URLs (the same for every model).
    chat_url: reqwest::Url,
    embeddings_url: reqwest::Url,
    /// Gemini puts the model in the URL: parsed once per model.
    model_urls: Mutex<HashMap<String, reqwest::Url>>,
    /// The key (sensitive) and version headers.
    headers: HeaderMap,
}

/// Sends requests to their targets, each with its own key.
///
/// A key goes only to its own target's base URL: redirects are not followed, and key
/// headers are marked sensitive so they never show in debug output.
pub struct HttpTransport {
    client: reqwest::Client,
    targets: Vec<Target>,
}

impl std::fmt::Debug for HttpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let targets: Vec<_> = self
            .targets
            .iter()
            .map(|t| format!("{} {}", t.provider, t.base_url))
            .collect();
        f.debug_struct("HttpTransport")
            .field("targets", &targets)
            .finish()
    }
}

/// Why a transport could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TransportBuildError {
    /// The API key has characters an HTTP header cannot carry.
    #[error("the API key contains characters that cannot go in an HTTP header")]
    BadKey,
    /// The base URL is not an http(s) URL.
    #[error("base URL {0:?} must be an http:// or https:// URL")]
    BadBaseUrl(String),
    /// reqwest refused the settings.
    #[error("could not build the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

impl HttpTransport {
    /// A transport to one OpenAI-compatible `base_url` (e.g. `https://api.openai.com/v1`),
    /// sending `api_key` as a bearer token when given, keeping up to `max_idle` idle
    /// connections. Every request goes to it.
    pub fn new(
        base_url: &str,
        api_key: Option<&str>,
        max_idle: usize,
    ) -> Result<Self, TransportBuildError> {
        HttpTransport::with_targets(
            &[TargetConfig {
                provider: ProviderKind::OpenAi,
                base_url: base_url.to_string(),
                api_key: api_key.map(str::to_string),
            }],
            max_idle,
        )
    }

    /// A transport to several targets; a request goes to `targets[request.target]`.
    pub fn with_targets(
        targets: &[TargetConfig],
        max_idle: usize,
    ) -> Result<Self, TransportBuildError> {
        let mut defaults = HeaderMap::new();
        defaults.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let client = reqwest::Client::builder()
            .default_headers(defaults)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(max_idle)
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let targets = targets
            .iter()
            .map(|t| {
                let base = t.base_url.trim_end_matches('/').to_string();
                if !(base.starts_with("http://") || base.starts_with("https://")) {
                    return Err(TransportBuildError::BadBaseUrl(t.base_url.clone()));
                }
                let api = t.provider.api();
                let url = |endpoint| {
                    reqwest::Url::parse(&api.url(&base, endpoint, "model"))
                        .map_err(|_| TransportBuildError::BadBaseUrl(base.clone()))
                };
                Ok(Target {
                    provider: t.provider,
                    chat_url: url(api.chat_endpoint())?,
                    embeddings_url: url(Endpoint::Embeddings)?,
                    model_urls: Mutex::new(HashMap::new()),
                    headers: api.headers(t.api_key.as_deref())?,
                    base_url: base,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(HttpTransport { client, targets })
    }

    fn url(&self, target: &Target, request: &Request) -> Result<reqwest::Url, TransportError> {
        match request.endpoint {
            Endpoint::ChatCompletions | Endpoint::Messages => Ok(target.chat_url.clone()),
            Endpoint::Embeddings => Ok(target.embeddings_url.clone()),
            Endpoint::GenerateContent => {
                let mut urls = target.model_urls.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(u) = urls.get(&request.model) {
                    return Ok(u.clone());
                }
                let text =
                    target
                        .provider
                        .api()
                        .url(&target.base_url, request.endpoint, &request.model);
                let u = reqwest::Url::parse(&text)
                    .map_err(|e| TransportError::Connect(format!("bad URL {text:?}: {e}")))?;
                urls.insert(request.model.clone(), u.clone());
                Ok(u)
            }
        }
    }
}

impl Transport for HttpTransport {
    fn send(&self, request: &Request) -> AttemptFuture {
        let target = match self.targets.get(usize::from(request.target)) {
            Some(t) if t.provider == request.endpoint.provider() => t,
            _ => {
                let msg = format!(
                    "no {} target #{} in this transport",
                    request.endpoint.provider(),
                    request.target
                );
                return Box::pin(async move { Err(TransportError::Connect(msg)) });
            }
        };
        let url = match self.url(target, request) {
            Ok(u) => u,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let mut builder = self.client.post(url).body(request.body.clone());
        for (name, value) in &target.headers {
            builder = builder.header(name.clone(), value.clone());
        }
        Box::pin(async move {
            let resp = builder.send().await.map_err(|e| {
                if e.is_connect() {
                    TransportError::Connect(error_chain(&e))
                } else {
                    TransportError::Dropped(error_chain(&e))
                }
            })?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp.bytes().await.map_err(|e| TransportError::BodyCut {
                status,
                message: error_chain(&e),
            })?;
            Ok(HttpResponse {
                status,
                headers,
                body,
            })
        })
    }
}

/// reqwest's error with its sources, which carry the useful part ("connection reset").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
