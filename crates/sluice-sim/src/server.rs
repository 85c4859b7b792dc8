//! The HTTP server: connection handling, routing, and the life of one request
//! (auth → validation → rate limiting → fault → latency → response).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::hash::{combine, hash_bytes, unit, IdentityBuild};
use crate::limiter::{Cost, LimitKind, LimitView, Limiter, Rejection};
use crate::protocol::{
    self, anthropic_error, gemini_error, openai_error, Generated, Ids, Parsed, Provider,
};
use crate::stats::{inc, Stats};
use crate::text::{go_duration, rfc3339_in};
use crate::{FaultKind, SimConfig};

/// Largest request body accepted.
const MAX_BODY: usize = 64 << 20;

/// Per-fingerprint history: admitted attempts and clean successes.
#[derive(Default, Clone, Copy)]
struct Seen {
    attempts: u32,
    oks: u32,
}

/// The shared state of one simulator.
pub(crate) struct Sim {
    pub config: SimConfig,
    pub stats: Stats,
    limiter: Mutex<Limiter>,
    seen: Mutex<HashMap<u64, Seen, IdentityBuild>>,
    seq: AtomicU64,
    /// Upper ends of each fault's slice of `[0, 1)`.
    fault_table: Vec<(FaultKind, f64)>,
    limited: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sim {
    pub fn new(config: SimConfig) -> Sim {
        let mut acc = 0.0;
        let fault_table = config
            .faults
            .iter()
            .filter(|(_, r)| *r > 0.0)
            .map(|(k, r)| {
                acc = (acc + r.clamp(0.0, 1.0)).min(1.0);
                (*k, acc)
            })
            .collect();
        let limiter = Limiter::new(&config);
        let limited = limiter.any();
        Sim {
            stats: Stats::default(),
            limiter: Mutex::new(limiter),
            seen: Mutex::new(HashMap::default()),
            seq: AtomicU64::new(0),
            fault_table,
            limited,
            config,
        }
    }

    pub fn reset(&self) {
        self.stats.reset();
        lock(&self.limiter).fill(Instant::now());
        lock(&self.seen).clear();
    }

    fn decide_fault(&self, fingerprint: u64, attempt: u32) -> Option<FaultKind> {
        if self.fault_table.is_empty() {
            return None;
        }
        let u = unit(combine(
            combine(self.config.seed, fingerprint),
            u64::from(attempt) ^ 0xfa17,
        ));
        self.fault_table
            .iter()
            .find(|(_, hi)| u < *hi)
            .map(|(k, _)| *k)
    }

    fn latency(&self, rng_seed: u64, tokens: u64, full: bool) -> Duration {
        let c = &self.config;
        let mut base = c.latency;
        if full {
            base += c
                .per_token_latency
                .saturating_mul(tokens.min(u32::MAX as u64) as u32);
        }
        if base.is_zero() || c.jitter <= 0.0 {
            return base;
        }
        let mut rng = SmallRng::seed_from_u64(rng_seed);
        let f = 1.0 + c.jitter * (rng.random::<f64>() * 2.0 - 1.0);
        base.mul_f64(f.max(0.0))
    }
}

/// Closes a connection without a response (the `hang` fault).
#[derive(Clone)]
struct ConnKill(Arc<Notify>);

/// Accept connections until `shutdown` flips, then drain them.
pub(crate) async fn serve(
    listener: TcpListener,
    sim: Arc<Sim>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of file descriptors and the like: back off briefly.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                conns.spawn(connection(stream, sim.clone(), shutdown.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(3), drain)
        .await
        .is_err()
    {
        conns.abort_all();
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    sim: Arc<Sim>,
    mut shutdown: watch::Receiver<bool>,
) {
    let kill = ConnKill(Arc::new(Notify::new()));
    let k = kill.clone();
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        req.extensions_mut().insert(k.clone());
        let sim = sim.clone();
        async move { Ok::<_, Infallible>(handle(sim, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = kill.0.notified() => {}
        _ = async { shutdown.wait_for(|s| *s).await.is_ok() } => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = kill.0.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }
}

async fn handle(sim: Arc<Sim>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    if path.starts_with("/v1/") || path.starts_with("/v1beta/") {
        return api(sim, req).await;
    }
    match (req.method(), path) {
        (&Method::GET, "/_sim/stats") => plain(
            StatusCode::OK,
            "application/json",
            protocol::to_bytes(&sim.stats.snapshot()),
        ),
        (&Method::POST, "/_sim/reset") => {
            sim.reset();
            plain(
                StatusCode::OK,
                "application/json",
                Bytes::from_static(b"{\"ok\":true}"),
            )
        }
        (&Method::GET, "/" | "/healthz") => plain(
            StatusCode::OK,
            "text/plain",
            Bytes::from_static(b"sluice sim\n"),
        ),
        _ => plain(
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found\n"),
        ),
    }
}

fn plain(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Decrements `in_flight` when the request (including a streamed body) is done.
struct InFlight(Arc<Sim>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.stats.leave();
    }
}

/// Holds a concurrency slot until dropped.
struct Slot(Arc<Sim>);

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.0.limiter).release();
    }
}

/// Counts a successful answer: `ok`, its tokens, and whether it answers a request (by its
/// fingerprint) answered before.
fn count_ok(sim: &Sim, fingerprint: u64, prompt: u64, completion: u64) {
    inc(&sim.stats.ok);
    sim.stats.tokens(prompt, completion);
    let first = {
        let mut seen = lock(&sim.seen);
        let s = seen.entry(fingerprint).or_default();
        s.oks += 1;
        s.oks == 1
    };
    if !first {
        inc(&sim.stats.ok_duplicates);
    }
}

/// While a successful answer waits out its latency: dropped (the client went away), it
/// counts the answer as billed ([`SimConfig::bill_abandoned`]); forgotten once the wait is
/// over.
struct Abandoned(Option<(Arc<Sim>, u64, u64, u64)>);

impl Drop for Abandoned {
    fn drop(&mut self) {
        if let Some((sim, fingerprint, prompt, completion)) = self.0.take() {
            count_ok(&sim, fingerprint, prompt, completion);
        }
    }
}

/// Everything a response needs to carry until its body is finished.
struct Guards {
    _in_flight: InFlight,
    _slot: Option<Slot>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Embeddings,
    Messages,
    Models,
    /// Gemini `POST /v1beta/models/{model}:generateContent`.
    Generate,
}

/// The model of a Gemini `generateContent` path.
fn gemini_model(path: &str) -> Option<&str> {
    path.strip_prefix("/v1beta/models/")?
        .strip_suffix(":generateContent")
        .filter(|m| !m.is_empty() && !m.contains('/'))
}

/// Response headers common to one request.
struct Meta {
    provider: Provider,
    request_id: HeaderValue,
}

impl Meta {
    fn response(
        &self,
        status: StatusCode,
        content_type: &'static str,
        body: Body,
    ) -> Response<Body> {
        let mut r = Response::new(body);
        *r.status_mut() = status;
        let h = r.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        h.insert(
            HeaderName::from_static("x-request-id"),
            self.request_id.clone(),
        );
        h.insert(
            HeaderName::from_static("request-id"),
            self.request_id.clone(),
        );
        r
    }

    fn json(&self, status: StatusCode, body: Bytes) -> Response<Body> {
        self.response(status, "application/json", Body::from(body))
    }

    /// An error in the provider's shape. Gemini's body is built from the status: its
    /// `status` names (`INVALID_ARGUMENT`...) follow the HTTP code.
    fn error(&self, status: StatusCode, openai: Bytes, anthropic: Bytes) -> Response<Body> {
        let body = match self.provider {
            Provider::OpenAi => openai,
            Provider::Anthropic => anthropic,
            Provider::Gemini => {
                let message = serde_json::from_slice::<serde_json::Value>(&anthropic)
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                gemini_error(status.as_u16(), gemini_status(status), &message, None)
            }
        };
        self.json(status, body)
    }
}

/// Google's canonical status name for an HTTP code.
fn gemini_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        405 => "UNIMPLEMENTED",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "INTERNAL",
    }
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

async fn api(sim: Arc<Sim>, req: Request<Incoming>) -> Response<Body> {
    inc(&sim.stats.requests);
    sim.stats.enter();
    let in_flight = InFlight(sim.clone());
    let seq = sim.seq.fetch_add(1, Relaxed);
    let unique = combine(sim.config.seed ^ 0x5eed, seq);
    let request_id = HeaderValue::from_str(&format!("req_sim{unique:016x}"))
        .unwrap_or(HeaderValue::from_static("req_sim"));

    let headers = req.headers();
    let path = req.uri().path().to_string();
    let endpoint = match (req.method(), path.as_str()) {
        (&Method::POST, "/v1/chat/completions") => Some(Endpoint::Chat),
        (&Method::POST, "/v1/embeddings") => Some(Endpoint::Embeddings),
        (&Method::POST, "/v1/messages") => Some(Endpoint::Messages),
        (&Method::GET, "/v1/models") => Some(Endpoint::Models),
        (&Method::POST, p) if gemini_model(p).is_some() => Some(Endpoint::Generate),
        _ => None,
    };
    let anthropic_headers =
        headers.contains_key("anthropic-version") || headers.contains_key("x-api-key");
    let provider = match endpoint {
        Some(Endpoint::Messages) => Provider::Anthropic,
        Some(Endpoint::Generate) => Provider::Gemini,
        _ if path.starts_with("/v1beta/") => Provider::Gemini,
        Some(Endpoint::Models) | None if anthropic_headers => Provider::Anthropic,
        _ => Provider::OpenAi,
    };
    let meta = Meta {
        provider,
        request_id,
    };
    let Some(endpoint) = endpoint else {
        inc(&sim.stats.bad_requests);
        let known = matches!(
            req.uri().path(),
            "/v1/chat/completions" | "/v1/embeddings" | "/v1/messages" | "/v1/models"
        ) || gemini_model(&path).is_some();
        let (status, msg) = if known {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "Method {} not allowed for {}",
                    req.method(),
                    req.uri().path()
                ),
            )
        } else {
            (
                StatusCode::NOT_FOUND,
                format!("Invalid URL ({} {})", req.method(), req.uri().path()),
            )
        };
        return meta.error(
            status,
            openai_error(&msg, "invalid_request_error", None, None),
            anthropic_error("not_found_error", &msg),
        );
    };

    if let Some(key) = &sim.config.api_key {
        let given = match provider {
            Provider::OpenAi => {
                header_str(headers, "authorization").and_then(|v| v.strip_prefix("Bearer "))
            }
            // Current Anthropic SDKs (2.x) send the key as a Bearer token; older ones
            // and the API docs use x-api-key. Accept either.
            Provider::Anthropic => header_str(headers, "x-api-key").or_else(|| {
                header_str(headers, "authorization").and_then(|v| v.strip_prefix("Bearer "))
            }),
            // Gemini: the `x-goog-api-key` header, or `?key=` in the URL.
            Provider::Gemini => header_str(headers, "x-goog-api-key").or_else(|| {
                req.uri()
                    .query()
                    .into_iter()
                    .flat_map(|q| q.split('&'))
                    .find_map(|kv| kv.strip_prefix("key="))
            }),
        };
        if given.map(str::trim) != Some(key.as_str()) {
            inc(&sim.stats.unauthorized);
            if provider == Provider::Gemini {
                // What Google answers: 403 without a key, 400 with a wrong one.
                return match given {
                    None => meta.json(
                        StatusCode::FORBIDDEN,
                        gemini_error(
                            403,
                            "PERMISSION_DENIED",
                            "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
                            None,
                        ),
                    ),
                    Some(_) => meta.json(
                        StatusCode::BAD_REQUEST,
                        gemini_error(
                            400,
                            "INVALID_ARGUMENT",
                            "API key not valid. Please pass a valid API key.",
                            Some(serde_json::json!([{
                                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                "reason": "API_KEY_INVALID",
                                "domain": "googleapis.com",
                            }])),
                        ),
                    ),
                };
            }
            let msg = if given.is_none() {
                "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            } else {
                "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys."
            };
            return meta.error(
                StatusCode::UNAUTHORIZED,
                openai_error(msg, "invalid_request_error", None, Some("invalid_api_key")),
                anthropic_error("authentication_error", "invalid x-api-key"),
            );
        }
    }
    if endpoint == Endpoint::Messages && !headers.contains_key("anthropic-version") {
        inc(&sim.stats.bad_requests);
        return meta.json(
            StatusCode::BAD_REQUEST,
            anthropic_error(
                "invalid_request_error",
                "anthropic-version: header is required",
            ),
        );
    }
    if endpoint == Endpoint::Models {
        inc(&sim.stats.ok);
        return meta.json(StatusCode::OK, protocol::models(provider));
    }

    let path_hash = hash_bytes(0, req.uri().path().as_bytes());
    let kill = req.extensions().get::<ConnKill>().cloned();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            inc(&sim.stats.bad_requests);
            return meta.error(
                StatusCode::BAD_REQUEST,
                openai_error(
                    "Could not read the request body.",
                    "invalid_request_error",
                    None,
                    None,
                ),
                anthropic_error("invalid_request_error", "Could not read the request body."),
            );
        }
    };
    let parsed = match endpoint {
        Endpoint::Chat => protocol::parse_chat(&body),
        Endpoint::Embeddings => protocol::parse_embeddings(&body),
        Endpoint::Generate => protocol::parse_generate(&body, gemini_model(&path).unwrap_or("")),
        _ => protocol::parse_messages(&body),
    };
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => {
            inc(&sim.stats.bad_requests);
            return meta.json(StatusCode::BAD_REQUEST, e.body(provider));
        }
    };

    // Rate limiting.
    let cost = parsed.cost(&sim.config);
    let admitted = lock(&sim.limiter).admit(cost, Instant::now());
    if let Err(rejection) = admitted {
        inc(&sim.stats.rate_limited);
        return rate_limited(&sim, &meta, &parsed, rejection);
    }
    let guards = Guards {
        _in_flight: in_flight,
        _slot: Some(Slot(sim.clone())),
    };

    // Fault decision and content, both deterministic.
    let fingerprint = combine(path_hash, hash_bytes(sim.config.seed, &body));
    let attempt = {
        let mut seen = lock(&sim.seen);
        let s = seen.entry(fingerprint).or_default();
        s.attempts += 1;
        s.attempts - 1
    };
    let fault = sim.decide_fault(fingerprint, attempt);
    let latency_seed = combine(fingerprint, u64::from(attempt) ^ 0x1a7e);

    if let Some(kind) = fault {
        if !matches!(
            kind,
            FaultKind::Reset | FaultKind::Truncated | FaultKind::Drip
        ) {
            sim.stats.fault(kind);
            return error_fault(&sim, &meta, kind, latency_seed, guards, kill).await;
        }
    }

    let mut rng = SmallRng::seed_from_u64(combine(sim.config.seed, fingerprint));
    let generated = parsed.generate(&mut rng, &sim.config, &Ids::new(unique));
    let latency = sim.latency(latency_seed, generated.completion, true);
    let content_type = if generated.stream {
        "text/event-stream"
    } else {
        "application/json"
    };

    match fault {
        None => {
            if !generated.stream || latency.is_zero() {
                // Billed even if the client goes away meanwhile (this future dropped), when
                // so configured.
                let abandoned = Abandoned(sim.config.bill_abandoned.then(|| {
                    (
                        sim.clone(),
                        fingerprint,
                        generated.prompt,
                        generated.completion,
                    )
                }));
                tokio::time::sleep(latency).await;
                std::mem::forget(abandoned);
            }
            settle(&sim, &parsed, cost, &generated);
            count_ok(&sim, fingerprint, generated.prompt, generated.completion);
            let limits = limit_view(&sim);
            let body = if generated.stream && !latency.is_zero() {
                paced_body(generated.segments, latency, false, guards)
            } else {
                drop(guards);
                Body::from(generated.concat())
            };
            let mut r = meta.response(StatusCode::OK, content_type, body);
            rate_headers(&mut r, provider, &limits);
            r
        }
        Some(FaultKind::Drip) => {
            sim.stats.fault(FaultKind::Drip);
            tokio::time::sleep(latency).await;
            settle(&sim, &parsed, cost, &generated);
            sim.stats.tokens(generated.prompt, generated.completion);
            let limits = limit_view(&sim);
            let full = generated.concat();
            let len = full.len();
            let chunk = len.div_ceil(20).max(1);
            let pieces: Vec<Bytes> = (0..len)
                .step_by(chunk)
                .map(|i| full.slice(i..(i + chunk).min(len)))
                .collect();
            let mut r = meta.response(
                StatusCode::OK,
                content_type,
                paced_body(pieces, sim.config.drip, false, guards),
            );
            if !generated.stream {
                r.headers_mut()
                    .insert(CONTENT_LENGTH, HeaderValue::from(len));
            }
            rate_headers(&mut r, provider, &limits);
            r
        }
        Some(FaultKind::Reset) => {
            sim.stats.fault(FaultKind::Reset);
            tokio::time::sleep(latency).await;
            let limits = limit_view(&sim);
            let full = generated.concat();
            let half = full.slice(..full.len() / 2);
            let mut r = meta.response(
                StatusCode::OK,
                content_type,
                paced_body(vec![half], Duration::ZERO, true, guards),
            );
            if !generated.stream {
                r.headers_mut()
                    .insert(CONTENT_LENGTH, HeaderValue::from(full.len()));
            }
            rate_headers(&mut r, provider, &limits);
            r
        }
        Some(_) => {
            // Truncated: complete framing, half a body.
            sim.stats.fault(FaultKind::Truncated);
            tokio::time::sleep(latency).await;
            drop(guards);
            let limits = limit_view(&sim);
            let full = generated.concat();
            let mut r = meta.response(
                StatusCode::OK,
                content_type,
                Body::from(full.slice(..full.len() / 2)),
            );
            rate_headers(&mut r, provider, &limits);
            r
        }
    }
}

fn settle(sim: &Sim, parsed: &Parsed, charged: Cost, generated: &Generated) {
    if sim.limited {
        lock(&sim.limiter).settle(charged, parsed.actual(generated), Instant::now());
    }
}

fn limit_view(sim: &Sim) -> LimitView {
    if sim.limited {
        lock(&sim.limiter).view(Instant::now())
    } else {
        LimitView::default()
    }
}

/// A body that yields `pieces` spread evenly over `total`, then optionally fails so
/// hyper aborts the connection.
fn paced_body(pieces: Vec<Bytes>, total: Duration, fail: bool, guards: Guards) -> Body {
    struct State {
        pieces: std::vec::IntoIter<Bytes>,
        start: Instant,
        step: Duration,
        sent: u32,
        fail: bool,
        _guards: Guards,
    }
    let n = pieces.len().max(1) as u32;
    let state = State {
        pieces: pieces.into_iter(),
        start: Instant::now(),
        step: total / n,
        sent: 0,
        fail,
        _guards: guards,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        match st.pieces.next() {
            Some(b) => {
                st.sent += 1;
                if !st.step.is_zero() {
                    tokio::time::sleep_until(st.start + st.step * st.sent).await;
                }
                Some((Ok::<Bytes, std::io::Error>(b), st))
            }
            None if st.fail => {
                st.fail = false;
                // Let hyper flush what was sent before the connection is aborted.
                tokio::time::sleep(Duration::from_millis(20)).await;
                Some((
                    Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "sluice sim: injected reset",
                    )),
                    st,
                ))
            }
            None => None,
        }
    });
    Body::from_stream(stream)
}

fn rate_headers(r: &mut Response<Body>, provider: Provider, v: &LimitView) {
    if provider == Provider::Gemini {
        // Gemini sends no rate-limit headers.
        return;
    }
    let h = r.headers_mut();
    let mut put = |name: String, value: String| {
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            h.insert(n, v);
        }
    };
    match provider {
        Provider::OpenAi => {
            for (name, b) in [("requests", v.requests), ("tokens", v.tokens)] {
                if let Some(b) = b {
                    put(format!("x-ratelimit-limit-{name}"), b.limit.to_string());
                    put(
                        format!("x-ratelimit-remaining-{name}"),
                        b.remaining.to_string(),
                    );
                    put(
                        format!("x-ratelimit-reset-{name}"),
                        go_duration(b.until_full),
                    );
                }
            }
        }
        Provider::Gemini => {}
        Provider::Anthropic => {
            for (name, b) in [
                ("requests", v.requests),
                ("tokens", v.tokens),
                ("input-tokens", v.input_tokens),
                ("output-tokens", v.output_tokens),
            ] {
                if let Some(b) = b {
                    put(
                        format!("anthropic-ratelimit-{name}-limit"),
                        b.limit.to_string(),
                    );
                    put(
                        format!("anthropic-ratelimit-{name}-remaining"),
                        b.remaining.to_string(),
                    );
                    put(
                        format!("anthropic-ratelimit-{name}-reset"),
                        rfc3339_in(b.until_full),
                    );
                }
            }
        }
    }
}

fn retry_headers(r: &mut Response<Body>, wait: Duration) {
    let ms = wait.as_nanos().div_ceil(1_000_000).max(1) as u64;
    let secs = ms.div_ceil(1000).max(1);
    let h = r.headers_mut();
    h.insert(
        HeaderName::from_static("retry-after"),
        HeaderValue::from(secs),
    );
    h.insert(
        HeaderName::from_static("retry-after-ms"),
        HeaderValue::from(ms),
    );
}

fn rate_limited(sim: &Sim, meta: &Meta, parsed: &Parsed, rej: Rejection) -> Response<Body> {
    let (unit, openai_type) = match rej.kind {
        LimitKind::Requests => ("requests per min (RPM)", "requests"),
        LimitKind::Tokens => ("tokens per min (TPM)", "tokens"),
        LimitKind::InputTokens => ("input tokens per minute", "tokens"),
        LimitKind::OutputTokens => ("output tokens per minute", "tokens"),
        LimitKind::Concurrency => ("concurrent requests", "requests"),
    };
    let wait = go_duration(rej.wait);
    let message = format!(
        "Rate limit reached for {unit} on {} in organization org-sluice-sim: Limit {}, Used {}, Requested {}. Please try again in {wait}.",
        parsed.model(),
        rej.limit,
        rej.used,
        rej.requested
    );
    let anthropic_message = format!(
        "This request would exceed the rate limit for your organization of {} {unit}. Please try again in {wait}.",
        rej.limit
    );
    if meta.provider == Provider::Gemini {
        // No retry headers: the wait is in the body's RetryInfo, as Google sends it.
        let quota_id = match rej.kind {
            LimitKind::Requests | LimitKind::Concurrency => {
                "GenerateRequestsPerMinutePerProjectPerModel"
            }
            _ => "GenerateContentInputTokensPerModelPerMinute",
        };
        let delay = format!("{:.3}s", rej.wait.as_secs_f64().max(0.001));
        return meta.json(
            StatusCode::TOO_MANY_REQUESTS,
            gemini_error(
                429,
                "RESOURCE_EXHAUSTED",
                "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
                Some(serde_json::json!([
                    {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                     "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests", "quotaId": quota_id, "quotaValue": rej.limit.to_string()}]},
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay},
                ])),
            ),
        );
    }
    let mut r = meta.error(
        StatusCode::TOO_MANY_REQUESTS,
        openai_error(&message, openai_type, None, Some("rate_limit_exceeded")),
        anthropic_error("rate_limit_error", &anthropic_message),
    );
    retry_headers(&mut r, rej.wait);
    rate_headers(&mut r, meta.provider, &limit_view(sim));
    r
}

const HTML_502: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

async fn error_fault(
    sim: &Arc<Sim>,
    meta: &Meta,
    kind: FaultKind,
    latency_seed: u64,
    guards: Guards,
    kill: Option<ConnKill>,
) -> Response<Body> {
    let latency = sim.latency(latency_seed, 0, false);
    if kind == FaultKind::Hang {
        tokio::time::sleep(sim.config.hang).await;
        // Dropping the connection also drops this future (and the guards with it).
        if let Some(kill) = kill {
            kill.0.notify_one();
        }
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(latency).await;
    drop(guards);
    let limits = limit_view(sim);
    let (status, openai, anthropic) = match kind {
        FaultKind::Http500 => (
            StatusCode::INTERNAL_SERVER_ERROR,
            openai_error(
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
                None,
                None,
            ),
            anthropic_error("api_error", "Internal server error"),
        ),
        FaultKind::Http502 => (
            StatusCode::BAD_GATEWAY,
            openai_error("Bad gateway.", "server_error", None, None),
            anthropic_error("api_error", "Bad gateway"),
        ),
        FaultKind::Http503 => (
            StatusCode::SERVICE_UNAVAILABLE,
            openai_error(
                "The server is overloaded or not ready yet.",
                "server_error",
                None,
                None,
            ),
            anthropic_error("api_error", "Service unavailable"),
        ),
        FaultKind::Overloaded529 => (
            StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            openai_error(
                "The engine is currently overloaded, please try again later.",
                "overloaded_error",
                None,
                None,
            ),
            anthropic_error("overloaded_error", "Overloaded"),
        ),
        FaultKind::RateLimitNoRetryAfter => (
            StatusCode::TOO_MANY_REQUESTS,
            openai_error(
                "Rate limit reached for requests. Please try again later.",
                "requests",
                None,
                Some("rate_limit_exceeded"),
            ),
            anthropic_error(
                "rate_limit_error",
                "This request would exceed your organization's rate limit. Please try again later.",
            ),
        ),
        FaultKind::InsufficientQuota if meta.provider == Provider::Gemini => {
            // A per-day quota: no point waiting for the next minute.
            let mut r = meta.json(
                StatusCode::TOO_MANY_REQUESTS,
                gemini_error(
                    429,
                    "RESOURCE_EXHAUSTED",
                    "You exceeded your current quota, please check your plan and billing details.",
                    Some(serde_json::json!([
                        {"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                         "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_requests", "quotaId": "GenerateRequestsPerDayPerProjectPerModel", "quotaValue": "10000"}]},
                    ])),
                ),
            );
            rate_headers(&mut r, meta.provider, &limits);
            return r;
        }
        FaultKind::InsufficientQuota => {
            let status = match meta.provider {
                Provider::Anthropic => StatusCode::BAD_REQUEST,
                _ => StatusCode::TOO_MANY_REQUESTS,
            };
            (
                status,
                openai_error("You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.", "insufficient_quota", None, Some("insufficient_quota")),
                anthropic_error("invalid_request_error", "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."),
            )
        }
        _ => {
            let mut r = meta.response(StatusCode::BAD_GATEWAY, "text/html", Body::from(HTML_502));
            r.headers_mut()
                .insert(http::header::SERVER, HeaderValue::from_static("nginx"));
            return r;
        }
    };
    let (status, anthropic) = match (meta.provider, kind) {
        // Gemini has no 529: its overload is a 503 UNAVAILABLE.
        (Provider::Gemini, FaultKind::Overloaded529 | FaultKind::Http503) => (
            StatusCode::SERVICE_UNAVAILABLE,
            anthropic_error(
                "overloaded_error",
                "The model is overloaded. Please try again later.",
            ),
        ),
        _ => (status, anthropic),
    };
    let mut r = meta.error(status, openai, anthropic);
    rate_headers(&mut r, meta.provider, &limits);
    r
}
