//! The real transport: HTTP over one shared `reqwest` connection pool (rustls).

use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use super::{AttemptFuture, HttpResponse, Transport, TransportError};
use crate::request::{Endpoint, Request};

/// Sends requests to one API base URL with one API key.
///
/// The key goes only to that base URL: redirects are not followed, and the key header is
/// marked sensitive so it never shows in debug output.
#[derive(Clone)]
pub struct HttpTransport {
    client: reqwest::Client,
    base_url: String,
    /// The full URL of each endpoint, parsed once.
    chat_url: reqwest::Url,
    embeddings_url: reqwest::Url,
    auth: Option<HeaderValue>,
}

impl std::fmt::Debug for HttpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTransport")
            .field("base_url", &self.base_url)
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
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
    /// A transport for `base_url` (e.g. `https://api.openai.com/v1`), sending `api_key` as a
    /// bearer token when given, keeping up to `max_idle` idle connections.
    pub fn new(
        base_url: &str,
        api_key: Option<&str>,
        max_idle: usize,
    ) -> Result<Self, TransportBuildError> {
        if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
            return Err(TransportBuildError::BadBaseUrl(base_url.to_string()));
        }
        let auth = match api_key {
            None => None,
            Some(k) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {k}"))
                    .map_err(|_| TransportBuildError::BadKey)?;
                v.set_sensitive(true);
                Some(v)
            }
        };
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
        let base_url = base_url.trim_end_matches('/').to_string();
        let url = |endpoint: Endpoint| {
            reqwest::Url::parse(&format!("{base_url}{}", endpoint.path()))
                .map_err(|_| TransportBuildError::BadBaseUrl(base_url.clone()))
        };
        Ok(HttpTransport {
            client,
            chat_url: url(Endpoint::ChatCompletions)?,
            embeddings_url: url(Endpoint::Embeddings)?,
            base_url,
            auth,
        })
    }
}

impl Transport for HttpTransport {
    fn send(&self, request: &Request) -> AttemptFuture {
        let url = match request.endpoint {
            Endpoint::ChatCompletions => &self.chat_url,
            Endpoint::Embeddings => &self.embeddings_url,
        };
        let mut builder = self.client.post(url.clone()).body(request.body.clone());
        if let Some(auth) = &self.auth {
            builder = builder.header(http::header::AUTHORIZATION, auth.clone());
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
            let body = resp
                .bytes()
                .await
                .map_err(|e| TransportError::Dropped(error_chain(&e)))?;
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
