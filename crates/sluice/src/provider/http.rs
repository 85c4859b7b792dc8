//! The real transport: HTTP/1.1 and HTTP/2 over one shared connection pool (hyper's
//! client, rustls with the webpki roots), to one or more targets (a provider's API base
//! URL and key).
//!
//! hyper's client directly rather than reqwest over it: reqwest parses each request's URL
//! again (into a `url::Url`, for its redirect layer even with redirects off, and for its
//! response) and wraps every attempt in tower retry and redirect layers; on the unpaced
//! benchmark those were about a tenth of the client's instructions (callgrind). sluice
//! needs none of it: it follows no redirects (a key goes only to its own target), retries
//! by its own policy, and parses each target's URLs once. It does not read proxy settings
//! from the environment (`HTTPS_PROXY`), as reqwest did.
//!
//! Plain-HTTP targets (the simulator, and local servers: vLLM, Ollama, llama.cpp) are
//! always HTTP/1.1, and go through sluice's own client instead (`provider::h1`): a stack of
//! idle connections per target, each request written in one piece and its response read
//! in the attempt's own future. hyper-util's pool keyed connections by scheme and host
//! (SipHash, twice a request) and hyper ran each connection as a task fed through
//! channels; against a local server that was about a fifth of the client's instructions
//! (callgrind).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Uri};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::h1::H1Pool;
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
    chat_url: Uri,
    embeddings_url: Uri,
    /// Gemini puts the model in the URL: parsed once per model.
    model_urls: Mutex<HashMap<String, Uri>>,
    /// Every request's headers: content type, user agent, the key (sensitive) and
    /// version headers.
    headers: HeaderMap,
    /// The target's own connections, when it is plain HTTP.
    h1: Option<Arc<H1Pool>>,
}

/// Sends requests to their targets, each with its own key.
///
/// A key goes only to its own target's base URL: redirects are not followed, and key
/// headers are marked sensitive so they never show in debug output.
pub struct HttpTransport {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
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
    /// The TLS settings could not be built.
    #[error("could not build the HTTP client: {0}")]
    Client(String),
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
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| TransportBuildError::Client(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(max_idle)
            .build(https);
        let targets = targets
            .iter()
            .map(|t| {
                let base = t.base_url.trim_end_matches('/').to_string();
                if !(base.starts_with("http://") || base.starts_with("https://")) {
                    return Err(TransportBuildError::BadBaseUrl(t.base_url.clone()));
                }
                let api = t.provider.api();
                let url = |endpoint| {
                    api.url(&base, endpoint, "model")
                        .parse::<Uri>()
                        .map_err(|_| TransportBuildError::BadBaseUrl(base.clone()))
                };
                let mut headers = HeaderMap::new();
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                headers.insert(
                    http::header::USER_AGENT,
                    HeaderValue::from_static(concat!("sluice/", env!("CARGO_PKG_VERSION"))),
                );
                headers.extend(api.headers(t.api_key.as_deref())?);
                let chat_url = url(api.chat_endpoint())?;
                // Plain HTTP is always HTTP/1.1 here, where the client would build the
                // `Host` header on every request (some 4% of the client's work per request
                // against a local server); built once instead, as the client builds it.
                // Over TLS the connection may be HTTP/2, which carries no `Host`, so there
                // the client still decides.
                let mut h1 = None;
                if chat_url.scheme() == Some(&http::uri::Scheme::HTTP) {
                    let host = chat_url.host().unwrap_or_default();
                    let value = match chat_url.port_u16() {
                        Some(port) if port != 80 => format!("{host}:{port}"),
                        _ => host.to_string(),
                    };
                    let value = HeaderValue::from_str(&value)
                        .map_err(|_| TransportBuildError::BadBaseUrl(base.clone()))?;
                    headers.insert(http::header::HOST, value);
                    h1 = Some(Arc::new(H1Pool::new(
                        // An IPv6 literal without its brackets, as sockets take it.
                        host.trim_start_matches('[')
                            .trim_end_matches(']')
                            .to_string(),
                        chat_url.port_u16().unwrap_or(80),
                        &headers,
                        max_idle,
                    )));
                }
                Ok(Target {
                    provider: t.provider,
                    chat_url,
                    embeddings_url: url(Endpoint::Embeddings)?,
                    model_urls: Mutex::new(HashMap::new()),
                    headers,
                    h1,
                    base_url: base,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(HttpTransport { client, targets })
    }

    fn url(&self, target: &Target, request: &Request) -> Result<Uri, TransportError> {
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
                let u = text
                    .parse::<Uri>()
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
        if let Some(pool) = &target.h1 {
            let pool = pool.clone();
            let body = request.body.clone();
            return Box::pin(async move {
                let path = url.path_and_query().map_or("/", |p| p.as_str());
                pool.send(path, &body).await
            });
        }
        let mut req = http::Request::new(Full::new(request.body.clone()));
        *req.method_mut() = Method::POST;
        *req.headers_mut() = target.headers.clone();
        *req.uri_mut() = url;
        let sent = self.client.request(req);
        Box::pin(async move {
            let resp = sent.await.map_err(|e| {
                if e.is_connect() {
                    TransportError::Connect(error_chain(&e))
                } else {
                    TransportError::Dropped(error_chain(&e))
                }
            })?;
            read_whole(resp).await
        })
    }
}

/// A response with its whole body (a body cut short is [`TransportError::BodyCut`]).
async fn read_whole(
    resp: http::Response<hyper::body::Incoming>,
) -> Result<HttpResponse, TransportError> {
    let (parts, body) = resp.into_parts();
    let status = parts.status.as_u16();
    let body = body
        .collect()
        .await
        .map_err(|e| TransportError::BodyCut {
            status,
            message: error_chain(&e),
        })?
        .to_bytes();
    Ok(HttpResponse {
        status,
        headers: parts.headers,
        body,
    })
}

/// The client's error with its sources, which carry the useful part ("connection reset").
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LineParser;
    use std::io::{Read, Write};

    fn request() -> Request {
        LineParser::new(Some("gpt-4.1-mini".into()))
            .parse(1, r#"{"custom_id": "a", "prompt": "hi", "max_tokens": 8}"#)
            .unwrap()
    }

    #[test]
    fn builds_for_https_and_refuses_other_schemes() {
        // The TLS configuration (ring, webpki roots) is built without touching the network.
        assert!(HttpTransport::new("https://api.openai.com/v1", Some("sk-x"), 4).is_ok());
        assert!(matches!(
            HttpTransport::new("ftp://example.com/v1", None, 4),
            Err(TransportBuildError::BadBaseUrl(_))
        ));
        assert!(matches!(
            HttpTransport::new("http://127.0.0.1:1/v1", Some("bad\nkey"), 4),
            Err(TransportBuildError::BadKey)
        ));
    }

    #[tokio::test]
    async fn a_closed_port_is_a_connect_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let t = HttpTransport::new(&format!("http://127.0.0.1:{port}/v1"), None, 4).unwrap();
        match t.send(&request()).await {
            Err(TransportError::Connect(_)) => {}
            other => panic!("expected a connect error, got {other:?}"),
        }
    }

    /// A one-shot HTTP server on a thread: reads one request, answers with `reply`, and
    /// returns what it read.
    fn one_shot(reply: &'static [u8]) -> (u16, std::thread::JoinHandle<String>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let handle = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers, then the body by its content-length.
            loop {
                let n = s.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    if got.len() >= end + 4 + len {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            s.write_all(reply).unwrap();
            String::from_utf8_lossy(&got).to_string()
        });
        (port, handle)
    }

    #[tokio::test]
    async fn sends_the_body_and_headers_and_reads_status_headers_and_body() {
        let (port, server) = one_shot(
            b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 2\r\nretry-after: 3\r\n\r\n{}",
        );
        let t =
            HttpTransport::new(&format!("http://127.0.0.1:{port}/v1"), Some("sk-t"), 4).unwrap();
        let req = request();
        let resp = t.send(&req).await.unwrap();
        assert_eq!(resp.status, 429);
        assert_eq!(resp.headers["retry-after"], "3");
        assert_eq!(&resp.body[..], b"{}");
        let got = server.join().unwrap();
        assert!(
            got.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
            "{got}"
        );
        assert!(got.contains("authorization: Bearer sk-t\r\n"), "{got}");
        assert!(got.contains("content-type: application/json\r\n"), "{got}");
        assert!(
            got.contains(&format!("host: 127.0.0.1:{port}\r\n")),
            "{got}"
        );
        assert_eq!(
            got.to_ascii_lowercase().matches("\r\nhost:").count(),
            1,
            "{got}"
        );
        assert!(
            got.ends_with(std::str::from_utf8(&req.body).unwrap()),
            "{got}"
        );
    }

    #[tokio::test]
    async fn a_body_cut_short_is_body_cut_with_its_status() {
        let (port, server) = one_shot(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"id\":");
        let t = HttpTransport::new(&format!("http://127.0.0.1:{port}/v1"), None, 4).unwrap();
        let result = t.send(&request()).await;
        server.join().unwrap();
        match result {
            Err(TransportError::BodyCut { status: 200, .. }) => {}
            other => panic!("expected a cut body, got {other:?}"),
        }
    }

    /// How [`counting_server`] ends its connections.
    #[derive(Clone, Copy, PartialEq)]
    enum Ends {
        /// It keeps them open.
        Never,
        /// After one answer that says `connection: close`.
        Saying,
        /// Silently, a moment after one answer.
        Silently,
    }

    /// A server answering every request with 200 `{}`, counting connections; with
    /// [`Ends::Saying`], it answers one request per connection, saying it will close it, and
    /// answers 500 to a request sent on it all the same.
    fn counting_server(ends: Ends) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        let close = ends == Ends::Saying;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        let text = String::from_utf8_lossy(&got).to_string();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let len = text
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length: "))
                                .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                            if got.len() >= end + 4 + len {
                                got.drain(..end + 4 + len);
                                let reply: &[u8] = if close {
                                    b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}"
                                } else {
                                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
                                };
                                if s.write_all(reply).is_err() {
                                    return;
                                }
                                if ends == Ends::Silently {
                                    std::thread::sleep(std::time::Duration::from_millis(20));
                                    return;
                                }
                                if close {
                                    // The client closes its end; a request sent on this
                                    // connection all the same is answered 500.
                                    if matches!(s.read(&mut buf), Ok(n) if n > 0) {
                                        let _ = s.write_all(
                                            b"HTTP/1.1 500 Reused\r\ncontent-length: 0\r\n\r\n",
                                        );
                                    }
                                    return;
                                }
                                continue;
                            }
                        }
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                });
            }
        });
        (port, accepted)
    }

    #[tokio::test]
    async fn plain_http_connections_are_kept_and_used_again() {
        let (port, accepted) = counting_server(Ends::Never);
        let t = HttpTransport::new(&format!("http://127.0.0.1:{port}/v1"), None, 4).unwrap();
        for _ in 0..5 {
            assert_eq!(&t.send(&request()).await.unwrap().body[..], b"{}");
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Three at once need three connections; all are kept, none is opened again.
        let (a, b, c) = tokio::join!(t.send(&request()), t.send(&request()), t.send(&request()));
        assert!(a.is_ok() && b.is_ok() && c.is_ok());
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
        for _ in 0..5 {
            t.send(&request()).await.unwrap();
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    /// A server that closes each connection after its answer: every request gets its
    /// answer, each on a new connection.
    #[tokio::test]
    async fn a_server_that_closes_every_connection_answers_every_request() {
        let (port, accepted) = counting_server(Ends::Saying);
        let t = HttpTransport::new(&format!("http://127.0.0.1:{port}/v1"), None, 4).unwrap();
        for _ in 0..20 {
            assert_eq!(t.send(&request()).await.unwrap().status, 200);
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 20);
    }

    /// A server that closes idle connections without saying so: a request is not sent on
    /// one it has closed, but on a new one.
    #[tokio::test]
    async fn an_idle_connection_the_server_closed_is_not_used() {
        let (port, accepted) = counting_server(Ends::Silently);
        let t = HttpTransport::new(&format!("http://127.0.0.1:{port}/v1"), None, 4).unwrap();
        for n in 1..=5 {
            assert_eq!(&t.send(&request()).await.unwrap().body[..], b"{}");
            // The server closes it meanwhile; the runtime sees the end of the connection.
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), n);
        }
    }

    /// What `reply` (one server's whole answer, then the end of its connection) reads as.
    async fn answer(reply: &'static [u8]) -> Result<HttpResponse, TransportError> {
        let (port, server) = one_shot(reply);
        let t = HttpTransport::new(&format!("http://127.0.0.1:{port}/v1"), None, 4).unwrap();
        let result = t.send(&request()).await;
        server.join().unwrap();
        result
    }

    #[tokio::test]
    async fn responses_framed_every_way_are_read_whole() {
        let chunked = answer(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-ratelimit-remaining-requests: 7\r\n\r\n\
              4\r\n{\"a\"\r\n3;ext=1\r\n:1}\r\n0\r\nx-trailer: y\r\n\r\n",
        )
        .await
        .unwrap();
        assert_eq!(&chunked.body[..], br#"{"a":1}"#);
        assert_eq!(chunked.headers["x-ratelimit-remaining-requests"], "7");
        let interim = answer(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}",
        )
        .await
        .unwrap();
        assert_eq!((interim.status, &interim.body[..]), (201, &b"{}"[..]));
        let to_the_end =
            answer(b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n{\"x\":2}")
                .await
                .unwrap();
        assert_eq!(&to_the_end.body[..], br#"{"x":2}"#);
        let empty = answer(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap();
        assert_eq!((empty.status, empty.body.len()), (204, 0));
        // A body far larger than one read.
        let big = format!("\"{}\"", "a".repeat(3 << 20));
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{big}",
            big.len()
        );
        let whole = answer(Vec::leak(reply.into_bytes())).await.unwrap();
        assert_eq!(whole.body, big.as_bytes());
    }

    /// `reply` gives a dropped attempt whose message says `what`.
    async fn dropped_saying(reply: &'static [u8], what: &str) {
        match answer(reply).await {
            Err(TransportError::Dropped(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("expected a dropped attempt, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn broken_responses_are_errors_that_say_what_broke() {
        match answer(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n").await {
            Err(TransportError::BodyCut {
                status: 200,
                message,
            }) => {
                assert!(message.contains("chunk size"), "{message}")
            }
            other => panic!("expected a cut body, got {other:?}"),
        }
        match answer(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10\r\n{}").await {
            Err(TransportError::BodyCut { status: 200, .. }) => {}
            other => panic!("expected a cut body, got {other:?}"),
        }
        dropped_saying(b"SMTP ready\r\n\r\n", "not HTTP").await;
        dropped_saying(b"HTTP/1.1 200 OK\r\ncontent-len", "head").await;
        dropped_saying(b"", "before a response").await;
        dropped_saying(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}",
            "content-length",
        )
        .await;
    }
}
