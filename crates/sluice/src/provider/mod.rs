//! Everything that differs between wire APIs lives below this module: how a request is
//! sent, how a response is read and how an error is classified.
//!
//! The engine sees a provider through two seams: a [`Transport`], which performs one HTTP
//! attempt (the real one is [`http::HttpTransport`]; tests plug in fakes), and
//! [`classify`], which turns what came back into a [`Verdict`] the scheduler acts on.
//! "What happens on a 429" is decided in [`openai::classify_response`].

pub mod http;
pub mod openai;

use bytes::Bytes;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use serde_json::value::RawValue;

use crate::outcome::{ErrorInfo, ErrorKind, Usage};
use crate::request::Request;

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
        response: Box<RawValue>,
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

/// Classifies the result of one attempt.
pub fn classify(result: Result<HttpResponse, TransportError>) -> Verdict {
    match result {
        Ok(resp) => openai::classify_response(&resp),
        Err(e) => {
            let kind = match e {
                TransportError::Timeout(_) => ErrorKind::Timeout,
                TransportError::Connect(_) | TransportError::Dropped(_) => ErrorKind::Connection,
            };
            Verdict::Retry {
                retry_after: None,
                error: ErrorInfo {
                    kind,
                    status: None,
                    message: e.to_string(),
                },
            }
        }
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

fn header_str<'a>(headers: &'a ::http::HeaderMap, name: &str) -> Option<&'a str> {
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
