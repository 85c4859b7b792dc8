//! Everything that differs between wire APIs lives below this module: how a request is
//! addressed and authenticated, how a body is translated, how a response is read and how
//! an error is classified. Each wire API is one module behind the [`WireApi`] trait:
//!
//! | module | API | endpoints |
//! |---|---|---|
//! | [`openai`] | OpenAI and every OpenAI-compatible server | chat completions, embeddings |
//! | [`anthropic`] | Anthropic Messages | `POST /v1/messages` |
//! | [`gemini`] | Google Gemini | `POST /v1beta/models/{model}:generateContent` |
//!
//! The engine sees a provider through two seams: a [`Transport`], which performs one HTTP
//! attempt (the real one is [`http::HttpTransport`]; tests plug in fakes), and
//! [`classify`], which turns what came back into a [`Verdict`] the scheduler acts on.
//! Each provider reads its own error shape into [`ErrorFacts`]; "what happens on a 429"
//! is then decided in one place for all of them, [`decide`].

pub mod anthropic;
pub mod gemini;
mod h1;
pub mod http;
pub mod openai;
pub mod ratelimit;

use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use crate::json::{JsonError, RawJson};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::outcome::{ErrorInfo, ErrorKind, Usage};
use crate::request::{Endpoint, Request};
pub use ratelimit::{LimitReading, RateLimits};

/// Which provider's wire API a request speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    /// OpenAI, or any server that speaks its API (vLLM, Ollama, llama.cpp, Groq...).
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
    /// Google Gemini `generateContent`.
    Gemini,
}

impl ProviderKind {
    /// Every provider, in a fixed order.
    pub const ALL: [ProviderKind; 3] = [
        ProviderKind::OpenAi,
        ProviderKind::Anthropic,
        ProviderKind::Gemini,
    ];

    /// The name used in model names (`anthropic:claude-haiku-4-5`) and the catalog.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
        }
    }

    /// Reads a provider name.
    pub fn parse(name: &str) -> Option<ProviderKind> {
        ProviderKind::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// The provider's wire API.
    pub fn api(self) -> &'static dyn WireApi {
        match self {
            ProviderKind::OpenAi => &openai::OpenAi,
            ProviderKind::Anthropic => &anthropic::Anthropic,
            ProviderKind::Gemini => &gemini::Gemini,
        }
    }
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A chat request in OpenAI's shape (what users write), and what a provider needs to
/// translate it: the model name to send and the output bound to enforce.
#[derive(Debug)]
pub struct ChatTranslation<'a> {
    /// The model name as the provider knows it (no `anthropic:` prefix).
    pub model: &'a str,
    /// The most output tokens: the request's own bound, or the assumed default.
    pub max_output_tokens: u32,
    /// Whether the body sets that bound itself.
    pub bound_given: bool,
    /// Send the bound even when the body sets none, so the provider enforces it (a budget
    /// relies on it). Anthropic requires a bound and always gets one.
    pub enforce_bound: bool,
}

/// Why a body cannot be translated: the field at fault and the reason.
pub type TranslateError = (String, String);

/// One wire API: how requests are addressed, authenticated and translated, how
/// responses are read, and how errors are classified.
pub trait WireApi: Sync {
    /// Which provider this is.
    fn kind(&self) -> ProviderKind;

    /// The endpoint chat requests go to.
    fn chat_endpoint(&self) -> Endpoint;

    /// The default API base URL.
    fn default_base_url(&self) -> &'static str;

    /// The full URL of `endpoint` below `base` (trimmed of its trailing `/`) for `model`.
    fn url(&self, base: &str, endpoint: Endpoint, model: &str) -> String;

    /// Headers that go with every request: the API key (marked sensitive) and any
    /// version header.
    fn headers(
        &self,
        api_key: Option<&str>,
    ) -> Result<::http::HeaderMap, http::TransportBuildError>;

    /// Turns a chat body in OpenAI's shape (`model` and `messages` present and checked)
    /// into this provider's body.
    fn translate_chat(
        &self,
        body: Map<String, Value>,
        t: &ChatTranslation<'_>,
    ) -> Result<Map<String, Value>, TranslateError>;

    /// Reads a successful body: the body as validated JSON (compacted onto one line) and
    /// its usage.
    fn parse_success(&self, body: &[u8]) -> Result<(RawJson, Option<Usage>), JsonError>;

    /// Reads an error body (status not 2xx) into the facts [`decide`] needs.
    fn error_facts(&self, resp: &HttpResponse) -> ErrorFacts;

    /// The provider's rate-limit headers, where it sends them.
    fn rate_limits(&self, headers: &::http::HeaderMap, now: SystemTime) -> RateLimits;
}

/// What one HTTP attempt brought back: status, headers and the whole body.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    /// HTTP status code.
    pub status: u16,
    /// Response headers.
    pub headers: ::http::HeaderMap,
    /// The complete body.
    pub body: Bytes,
}

/// An attempt that brought back no complete response.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The connection could not be made.
    #[error("could not connect: {0}")]
    Connect(String),
    /// The connection broke before the whole response arrived.
    #[error("connection dropped: {0}")]
    Dropped(String),
    /// The status and headers arrived, then the body was cut off. A 2xx cut off was
    /// billed by the provider.
    #[error("response with status {status} cut off: {message}")]
    BodyCut {
        /// The HTTP status that arrived.
        status: u16,
        /// What broke.
        message: String,
    },
    /// The attempt ran past its timeout (set by the engine).
    #[error("no complete response within {0:?}")]
    Timeout(Duration),
}

/// The future of one attempt.
pub type AttemptFuture = Pin<Box<dyn Future<Output = Result<HttpResponse, TransportError>> + Send>>;

/// Performs HTTP attempts. One transport serves a whole run and is shared by all attempts.
pub trait Transport: Send + Sync + 'static {
    /// Sends `request` once. The engine bounds the future with its own timeout, so an
    /// implementation need not.
    fn send(&self, request: &Request) -> AttemptFuture;
}

/// What the scheduler should do with the result of an attempt.
#[derive(Debug)]
pub enum Verdict {
    /// Done: the provider's body and usage.
    Success {
        /// The response body, validated JSON.
        response: RawJson,
        /// Token usage, when the provider reported it.
        usage: Option<Usage>,
    },
    /// 429 rate limit: cool down (everyone), then try again.
    RateLimited {
        /// How long the provider asked us to wait.
        retry_after: Option<Duration>,
        /// What it said.
        error: ErrorInfo,
    },
    /// A transient failure: back off (this request only), then try again.
    Retry {
        /// How long the provider asked us to wait, if it did.
        retry_after: Option<Duration>,
        /// What went wrong.
        error: ErrorInfo,
    },
    /// A permanent failure: trying again cannot help.
    Permanent {
        /// What went wrong.
        error: ErrorInfo,
    },
    /// Quota or spend exhausted: stop the run.
    QuotaExhausted {
        /// What the provider said.
        error: ErrorInfo,
    },
}

impl Verdict {
    /// Whether the provider billed the attempt although it failed: a 2xx whose body did
    /// not arrive whole, cut off or truncated (the work was done, its answer lost).
    pub fn billed_failure(&self) -> bool {
        matches!(self, Verdict::Retry { error, .. }
            if matches!(error.kind, ErrorKind::InvalidResponse | ErrorKind::Connection)
                && error.status.is_some_and(|s| (200..300).contains(&s)))
    }
}

/// What a provider's error response says, in provider-neutral terms.
#[derive(Clone, Debug)]
pub struct ErrorFacts {
    /// The kind of failure the status and body name.
    pub kind: ErrorKind,
    /// Whether it means the account cannot pay for more requests (stop the run).
    pub quota: bool,
    /// The provider's message (or an excerpt of a non-JSON body).
    pub message: String,
    /// A wait the body asks for (Gemini's `RetryInfo.retryDelay`), when the headers name
    /// none.
    pub body_retry_after: Option<Duration>,
}

/// Classifies the result of one attempt sent to `provider`.
pub fn classify(result: Result<HttpResponse, TransportError>, provider: ProviderKind) -> Verdict {
    match result {
        Ok(resp) => classify_response(&resp, provider),
        Err(e) => {
            let (kind, status) = match e {
                TransportError::Timeout(_) => (ErrorKind::Timeout, None),
                TransportError::Connect(_) | TransportError::Dropped(_) => {
                    (ErrorKind::Connection, None)
                }
                TransportError::BodyCut { status, .. } => (ErrorKind::Connection, Some(status)),
            };
            Verdict::Retry {
                retry_after: None,
                error: ErrorInfo {
                    kind,
                    status,
                    message: e.to_string(),
                },
            }
        }
    }
}

/// Classifies a complete HTTP response from `provider`.
pub fn classify_response(resp: &HttpResponse, provider: ProviderKind) -> Verdict {
    let api = provider.api();
    if (200..300).contains(&resp.status) {
        return match api.parse_success(&resp.body) {
            Ok((response, usage)) => Verdict::Success { response, usage },
            Err(e) => Verdict::Retry {
                retry_after: None,
                error: ErrorInfo {
                    kind: ErrorKind::InvalidResponse,
                    status: Some(resp.status),
                    message: format!("response body is not valid JSON: {e}"),
                },
            },
        };
    }
    decide(resp, api.error_facts(resp))
}

/// The decision table for an error response, the same for every provider once its body
/// has been read into [`ErrorFacts`], in order:
///
/// | response | verdict |
/// |---|---|
/// | quota or spend exhausted | stop the run |
/// | `x-should-retry: false` | permanent |
/// | 429 | rate limited: one coordinated cooldown |
/// | `x-should-retry: true` | retry |
/// | 408, 409, 5xx, 529 / overloaded | retry with backoff |
/// | anything else (400, 401, 403, 404, 422, context too long, content policy) | permanent |
pub fn decide(resp: &HttpResponse, facts: ErrorFacts) -> Verdict {
    let status = resp.status;
    let error = |kind| ErrorInfo {
        kind,
        status: Some(status),
        message: facts.message.clone(),
    };
    if facts.quota {
        return Verdict::QuotaExhausted {
            error: error(ErrorKind::QuotaExhausted),
        };
    }
    let wait = retry_after(&resp.headers, SystemTime::now()).or(facts.body_retry_after);
    let natural = facts.kind;
    match should_retry(&resp.headers) {
        Some(false) => {
            return Verdict::Permanent {
                error: error(natural),
            }
        }
        Some(true) if status != 429 => {
            return Verdict::Retry {
                retry_after: wait,
                error: error(natural),
            }
        }
        _ => {}
    }
    if status == 429 {
        return Verdict::RateLimited {
            retry_after: wait,
            error: error(ErrorKind::RateLimited),
        };
    }
    match natural {
        ErrorKind::ServerError
        | ErrorKind::Overloaded
        | ErrorKind::RequestTimeout
        | ErrorKind::Conflict => Verdict::Retry {
            retry_after: wait,
            error: error(natural),
        },
        _ => Verdict::Permanent {
            error: error(natural),
        },
    }
}

/// The error kind a status code names when the body says nothing more specific.
pub fn kind_of_status(status: u16) -> ErrorKind {
    match status {
        408 => ErrorKind::RequestTimeout,
        409 => ErrorKind::Conflict,
        429 => ErrorKind::RateLimited,
        401 => ErrorKind::Authentication,
        403 => ErrorKind::PermissionDenied,
        404 => ErrorKind::NotFound,
        422 => ErrorKind::Unprocessable,
        529 => ErrorKind::Overloaded,
        500..=599 => ErrorKind::ServerError,
        _ => ErrorKind::BadRequest,
    }
}

/// A JSON text without its insignificant whitespace, so that a pretty-printed response
/// stays on one output line. Compact bodies (the usual case) are returned as they are.
///
/// Whitespace outside strings is all that is removed; a raw newline cannot occur inside a
/// valid JSON string, so a body without one needs no work.
pub fn compact(body: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if memchr::memchr(b'\n', body).is_none() {
        return std::borrow::Cow::Borrowed(body);
    }
    let mut out = Vec::with_capacity(body.len());
    let mut in_string = false;
    let mut escaped = false;
    for &b in body {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            out.push(b);
            in_string = b == b'"';
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The start of a non-JSON body (an HTML error page, say), as one line.
pub fn body_excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    let squeezed: Vec<&str> = text.split_whitespace().collect();
    if squeezed.is_empty() {
        "empty response body".to_string()
    } else {
        squeezed.join(" ")
    }
}

/// The text of an OpenAI message `content`: a string, or the `text` of its text parts
/// joined by blank lines. `None` when a part is not text.
pub(crate) fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => {
                        if !out.is_empty() {
                            out.push_str("\n\n");
                        }
                        out.push_str(t);
                    }
                    _ => return None,
                }
            }
            Some(out)
        }
        _ => None,
    }
}

/// A `data:` URL's media type and base64 payload.
pub(crate) fn data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    let media = meta.strip_suffix(";base64")?;
    Some((media, data))
}

/// OpenAI's `stop`: a string or an array of strings, as a list.
pub(crate) fn stop_list(v: &Value) -> Result<Vec<Value>, String> {
    match v {
        Value::String(_) => Ok(vec![v.clone()]),
        Value::Array(a) if a.iter().all(Value::is_string) => Ok(a.clone()),
        _ => Err("must be a string or an array of strings".into()),
    }
}

/// How long the response asks us to wait, from `retry-after-ms` (milliseconds), or
/// `retry-after` as seconds (fractions allowed) or an HTTP-date. `now` is the wall clock,
/// used only for HTTP-dates.
pub fn retry_after(headers: &::http::HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) =
        header_str(headers, "retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok())
    {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_secs_f64(ms / 1000.0));
        }
    }
    let value = header_str(headers, "retry-after")?.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `x-should-retry: true|false`, the provider's explicit word on retrying.
pub fn should_retry(headers: &::http::HeaderMap) -> Option<bool> {
    match header_str(headers, "x-should-retry")?.trim() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

pub(crate) fn header_str<'a>(headers: &'a ::http::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::http::{HeaderMap, HeaderValue};

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn retry_after_in_every_form() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7")]), now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "0.5")]), now),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            retry_after(
                &headers(&[("retry-after", "3"), ("retry-after-ms", "1250")]),
                now
            ),
            Some(Duration::from_millis(1250)),
            "retry-after-ms is the more precise and wins"
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &date)]), now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &past)]), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "-3")]), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn cut_off_and_truncated_2xx_bodies_were_billed() {
        let cut = |status| {
            classify(
                Err(TransportError::BodyCut {
                    status,
                    message: "reset".into(),
                }),
                ProviderKind::Anthropic,
            )
        };
        assert!(cut(200).billed_failure());
        assert!(!cut(503).billed_failure(), "an error page is not billed");
        let dropped = classify(
            Err(TransportError::Dropped("reset".into())),
            ProviderKind::OpenAi,
        );
        assert!(matches!(dropped, Verdict::Retry { .. }) && !dropped.billed_failure());
        let truncated = classify(
            Ok(HttpResponse {
                status: 200,
                headers: HeaderMap::new(),
                body: Bytes::from_static(b"{\"candidates\":[{"),
            }),
            ProviderKind::Gemini,
        );
        assert!(truncated.billed_failure(), "{truncated:?}");
    }

    #[test]
    fn should_retry_header() {
        assert_eq!(
            should_retry(&headers(&[("x-should-retry", "true")])),
            Some(true)
        );
        assert_eq!(
            should_retry(&headers(&[("x-should-retry", "false")])),
            Some(false)
        );
        assert_eq!(should_retry(&HeaderMap::new()), None);
    }
}
