//! The terminal outcome of a request: what `sluice run` writes, one JSON line each.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::json::RawJson;

/// `succeeded` or `failed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The provider answered with a usable response.
    Succeeded,
    /// The request ended without one; `error` says why.
    Failed,
}

/// Token usage as the provider reported it, in one shape for every provider (each
/// provider module converts its own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Every input token, cached ones included (OpenAI's `prompt_tokens`; Anthropic's
    /// `input_tokens` plus its cache reads and writes; Gemini's `promptTokenCount`).
    #[serde(default, alias = "input_tokens")]
    pub prompt_tokens: u64,
    /// Output tokens, reasoning ones included.
    #[serde(default, alias = "output_tokens")]
    pub completion_tokens: u64,
    /// Their sum.
    #[serde(default)]
    pub total_tokens: u64,
    /// Input tokens read from the provider's prompt cache (billed at the cached price).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cached_tokens: u64,
    /// Input tokens written to the prompt cache (Anthropic; billed at the cache-write
    /// price).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_write_tokens: u64,
}

/// For `skip_serializing_if`.
pub(crate) fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Usage {
    /// Input plus output tokens, whatever the provider put in `total_tokens`.
    pub fn total(&self) -> u64 {
        self.total_tokens
            .max(self.prompt_tokens + self.completion_tokens)
    }
}

/// The kinds of failure, stable strings in the output and the summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// 429 rate limit, after the rate-limit wait budget ran out.
    RateLimited,
    /// 500, 502, 503 or another 5xx.
    ServerError,
    /// 529 or an `overloaded_error`: the provider is overloaded.
    Overloaded,
    /// 408 from the provider.
    RequestTimeout,
    /// 409 from the provider.
    Conflict,
    /// The attempt timed out on our side.
    Timeout,
    /// Connection refused, reset, or the body was cut off.
    Connection,
    /// A 2xx whose body is not the JSON it should be.
    InvalidResponse,
    /// 400 and other permanent request errors.
    BadRequest,
    /// The input does not fit the model's context window.
    ContextLengthExceeded,
    /// The provider refused the content.
    ContentPolicy,
    /// 401.
    Authentication,
    /// 403.
    PermissionDenied,
    /// 404: usually an unknown model.
    NotFound,
    /// 422.
    Unprocessable,
    /// Quota or spend limit exhausted: the run stops.
    QuotaExhausted,
    /// The request's deadline passed.
    DeadlineExceeded,
    /// The run stopped (quota exhausted or interrupted) after this request had been tried.
    Stopped,
    /// The run stopped before this request was sent.
    NotAttempted,
    /// The input line could not be read as a request.
    InvalidInput,
}

impl ErrorKind {
    /// The snake_case name used in output and summaries.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::ServerError => "server_error",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Connection => "connection",
            ErrorKind::InvalidResponse => "invalid_response",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::ContextLengthExceeded => "context_length_exceeded",
            ErrorKind::ContentPolicy => "content_policy",
            ErrorKind::Authentication => "authentication",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Unprocessable => "unprocessable",
            ErrorKind::QuotaExhausted => "quota_exhausted",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Stopped => "stopped",
            ErrorKind::NotAttempted => "not_attempted",
            ErrorKind::InvalidInput => "invalid_input",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// The HTTP status of the last attempt, when there was a response.
    pub status: Option<u16>,
    /// The provider's message, or ours.
    pub message: String,
}

/// One request's terminal outcome.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    /// The request's `custom_id`.
    pub custom_id: String,
    /// `succeeded` or `failed`.
    pub status: Status,
    /// The model the request named.
    pub model: String,
    /// The provider's response body, on success.
    pub response: Option<RawJson>,
    /// Why it failed, on failure.
    pub error: Option<ErrorInfo>,
    /// HTTP attempts made, rate-limited ones included.
    pub attempts: u32,
    /// Token usage of the successful attempt.
    pub usage: Option<Usage>,
    /// What the request cost in US dollars: its usage at the catalog price of the model
    /// that answered, plus the estimated cost of attempts that were billed but whose
    /// answer was lost. `None` when the model's price is unknown.
    pub cost_usd: Option<f64>,
    /// From the request's admission to its outcome, waiting included.
    pub latency_ms: u64,
    /// The input's `metadata`, passed through.
    pub metadata: Option<Box<RawValue>>,
    /// Answered from the response cache, or by an identical request of the same run: no
    /// request was sent and nothing was paid.
    pub cached: bool,
    /// 1-based input line (0 when not from a file). Not written to the output.
    #[serde(skip)]
    pub line: u64,
    /// The request's [`crate::Request::cache_key`]. Not written to the output.
    #[serde(skip)]
    pub cache_key: Option<crate::cache::CacheKey>,
}

impl Outcome {
    /// The outcome of an input line that could not be read as a request.
    pub fn invalid_input(bad: &crate::BadLine) -> Outcome {
        Outcome {
            custom_id: bad
                .custom_id
                .clone()
                .unwrap_or_else(|| crate::LineParser::derived_custom_id(bad.line)),
            status: Status::Failed,
            model: String::new(),
            response: None,
            error: Some(ErrorInfo {
                kind: ErrorKind::InvalidInput,
                status: None,
                message: bad.to_string(),
            }),
            attempts: 0,
            usage: None,
            cost_usd: None,
            latency_ms: 0,
            metadata: None,
            cached: false,
            line: bad.line,
            cache_key: None,
        }
    }

    /// The outcome as one JSON line, newline included: the bytes `serde_json` writes for
    /// it, written by hand (field names as constants, the response and metadata copied as
    /// they are), which spares a third of the work per outcome.
    pub fn to_json_line(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.write_json_line(&mut v);
        v
    }

    /// [`to_json_line`](Self::to_json_line), appended to `v`.
    pub fn write_json_line(&self, v: &mut Vec<u8>) {
        let raw_len = |r: Option<&str>| r.map_or(4, str::len);
        v.reserve(
            200 + self.custom_id.len()
                + self.model.len()
                + raw_len(self.response.as_ref().map(RawJson::get))
                + raw_len(self.metadata.as_deref().map(RawValue::get)),
        );
        let mut int = itoa::Buffer::new();
        let string = |v: &mut Vec<u8>, s: &str| {
            serde_json::to_writer(&mut *v, s).expect("a string serialises")
        };
        let raw = |v: &mut Vec<u8>, r: Option<&str>| match r {
            Some(r) => v.extend_from_slice(r.as_bytes()),
            None => v.extend_from_slice(b"null"),
        };
        v.extend_from_slice(b"{\"custom_id\":");
        string(v, &self.custom_id);
        v.extend_from_slice(match self.status {
            Status::Succeeded => b",\"status\":\"succeeded\",\"model\":",
            Status::Failed => b",\"status\":\"failed\",\"model\":",
        });
        string(v, &self.model);
        v.extend_from_slice(b",\"response\":");
        raw(v, self.response.as_ref().map(RawJson::get));
        v.extend_from_slice(b",\"error\":");
        match &self.error {
            Some(e) => serde_json::to_writer(&mut *v, e).expect("an error serialises"),
            None => v.extend_from_slice(b"null"),
        }
        v.extend_from_slice(b",\"attempts\":");
        v.extend_from_slice(int.format(self.attempts).as_bytes());
        v.extend_from_slice(b",\"usage\":");
        match &self.usage {
            Some(u) => {
                v.extend_from_slice(b"{\"prompt_tokens\":");
                v.extend_from_slice(int.format(u.prompt_tokens).as_bytes());
                v.extend_from_slice(b",\"completion_tokens\":");
                v.extend_from_slice(int.format(u.completion_tokens).as_bytes());
                v.extend_from_slice(b",\"total_tokens\":");
                v.extend_from_slice(int.format(u.total_tokens).as_bytes());
                if u.cached_tokens != 0 {
                    v.extend_from_slice(b",\"cached_tokens\":");
                    v.extend_from_slice(int.format(u.cached_tokens).as_bytes());
                }
                if u.cache_write_tokens != 0 {
                    v.extend_from_slice(b",\"cache_write_tokens\":");
                    v.extend_from_slice(int.format(u.cache_write_tokens).as_bytes());
                }
                v.push(b'}');
            }
            None => v.extend_from_slice(b"null"),
        }
        v.extend_from_slice(b",\"cost_usd\":");
        serde_json::to_writer(&mut *v, &self.cost_usd).expect("a number serialises");
        v.extend_from_slice(b",\"latency_ms\":");
        v.extend_from_slice(int.format(self.latency_ms).as_bytes());
        v.extend_from_slice(b",\"metadata\":");
        raw(v, self.metadata.as_deref().map(RawValue::get));
        v.extend_from_slice(if self.cached {
            b",\"cached\":true}\n"
        } else {
            b",\"cached\":false}\n"
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written line is byte for byte what `serde_json` writes for the outcome.
    #[test]
    fn json_line_is_what_serde_writes() {
        let raw = |s: &str| Some(RawValue::from_string(s.to_string()).unwrap());
        let ok = Outcome {
            custom_id: "q\"1\u{e9}\u{1}\\".into(),
            status: Status::Succeeded,
            model: "gpt-4.1-mini".into(),
            response: Some(RawJson::parse(r#"{"id":"x","usage":{"prompt_tokens":3}}"#).unwrap()),
            error: None,
            attempts: 2,
            usage: Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 5,
                total_tokens: 8,
                cached_tokens: 0,
                cache_write_tokens: 0,
            }),
            cost_usd: Some(0.0000588),
            latency_ms: 312,
            metadata: raw(r#"{"k":[1,"two"]}"#),
            cached: false,
            line: 4,
            cache_key: None,
        };
        let mut cached = ok.clone();
        cached.cached = true;
        cached.usage.as_mut().unwrap().cached_tokens = 2;
        cached.usage.as_mut().unwrap().cache_write_tokens = 7;
        cached.cost_usd = Some(1e-12);
        let mut failed = Outcome::invalid_input(&crate::BadLine {
            line: 9,
            custom_id: None,
            field: Some("model".into()),
            reason: "must be a \"string\"\n".into(),
        });
        let mut http = failed.clone();
        http.error = Some(ErrorInfo {
            kind: ErrorKind::ServerError,
            status: Some(503),
            message: String::new(),
        });
        http.cost_usd = Some(f64::NAN);
        http.attempts = u32::MAX;
        http.latency_ms = u64::MAX;
        failed.cost_usd = Some(12345678.5);
        for o in [ok, cached, failed, http] {
            let mut want = serde_json::to_vec(&o).unwrap();
            want.push(b'\n');
            assert_eq!(
                String::from_utf8(o.to_json_line()).unwrap(),
                String::from_utf8(want).unwrap()
            );
        }
    }
}
