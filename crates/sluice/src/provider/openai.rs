//! OpenAI's wire API (and every OpenAI-compatible server): reading responses and
//! classifying errors.
//!
//! The decision table, in order:
//!
//! | response | verdict |
//! |---|---|
//! | 2xx with a JSON body | success |
//! | 2xx whose body is not JSON (truncated) | retry (`invalid_response`) |
//! | `insufficient_quota`, `billing_hard_limit_reached`, `enforced_spend_limit_reached`, "credit balance is too low" | stop the run |
//! | `x-should-retry: false` | permanent |
//! | 429 | rate limited: one coordinated cooldown |
//! | `x-should-retry: true` | retry |
//! | 408, 409, 5xx, 529, `overloaded_error` | retry with backoff |
//! | 400 `context_length_exceeded` / content policy, 401, 403, 404, 422, other 4xx | permanent |

use std::time::SystemTime;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{retry_after, should_retry, HttpResponse, Verdict};
use crate::outcome::{ErrorInfo, ErrorKind, Usage};

#[derive(Deserialize)]
struct UsageOnly {
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize, Default)]
struct ErrorEnvelope {
    #[serde(default)]
    error: Option<ErrorDetail>,
}

#[derive(Deserialize, Default)]
struct ErrorDetail {
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
}

/// Codes and types that mean the account cannot pay for more requests.
const QUOTA_MARKERS: [&str; 3] = [
    "insufficient_quota",
    "billing_hard_limit_reached",
    "enforced_spend_limit_reached",
];

/// Classifies a complete HTTP response.
pub fn classify_response(resp: &HttpResponse) -> Verdict {
    let status = resp.status;
    if (200..300).contains(&status) {
        return match parse_success(&resp.body) {
            Ok((response, usage)) => Verdict::Success { response, usage },
            Err(e) => Verdict::Retry {
                retry_after: None,
                error: ErrorInfo {
                    kind: ErrorKind::InvalidResponse,
                    status: Some(status),
                    message: format!("response body is not valid JSON: {e}"),
                },
            },
        };
    }

    let detail = serde_json::from_slice::<ErrorEnvelope>(&resp.body)
        .ok()
        .and_then(|e| e.error)
        .unwrap_or_default();
    let code = match &detail.code {
        Some(serde_json::Value::String(s)) => s.as_str(),
        _ => "",
    };
    let etype = detail.kind.as_deref().unwrap_or("");
    let message = detail
        .message
        .clone()
        .unwrap_or_else(|| body_excerpt(&resp.body));
    let error = |kind| ErrorInfo {
        kind,
        status: Some(status),
        message: message.clone(),
    };

    let quota = QUOTA_MARKERS.iter().any(|m| code == *m || etype == *m)
        || message.contains("credit balance is too low");
    if quota {
        return Verdict::QuotaExhausted {
            error: error(ErrorKind::QuotaExhausted),
        };
    }

    let wait = retry_after(&resp.headers, SystemTime::now());
    let natural = natural_kind(status, code, etype, &message);
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

fn natural_kind(status: u16, code: &str, etype: &str, message: &str) -> ErrorKind {
    if status == 529 || etype == "overloaded_error" {
        return ErrorKind::Overloaded;
    }
    if code == "context_length_exceeded" || message.contains("maximum context length") {
        return ErrorKind::ContextLengthExceeded;
    }
    if code == "content_policy_violation" || code == "content_filter" {
        return ErrorKind::ContentPolicy;
    }
    match status {
        408 => ErrorKind::RequestTimeout,
        409 => ErrorKind::Conflict,
        429 => ErrorKind::RateLimited,
        401 => ErrorKind::Authentication,
        403 => ErrorKind::PermissionDenied,
        404 => ErrorKind::NotFound,
        422 => ErrorKind::Unprocessable,
        500..=599 => ErrorKind::ServerError,
        _ => ErrorKind::BadRequest,
    }
}

fn parse_success(body: &[u8]) -> Result<(Box<RawValue>, Option<Usage>), serde_json::Error> {
    let raw: Box<RawValue> = serde_json::from_slice(&compact(body))?;
    let usage = serde_json::from_str::<UsageOnly>(raw.get())
        .ok()
        .and_then(|u| u.usage);
    Ok((raw, usage))
}

/// A JSON text without its insignificant whitespace, so that a pretty-printed response
/// stays on one output line. Compact bodies (the usual case) are returned as they are.
///
/// Whitespace outside strings is all that is removed; a raw newline cannot occur inside a
/// valid JSON string, so a body without one needs no work.
fn compact(body: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !body.contains(&b'\n') {
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
fn body_excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    let squeezed: Vec<&str> = text.split_whitespace().collect();
    if squeezed.is_empty() {
        "empty response body".to_string()
    } else {
        squeezed.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, HeaderValue};
    use std::time::Duration;

    fn resp(status: u16, body: &str, headers: &[(&'static str, &str)]) -> HttpResponse {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        HttpResponse {
            status,
            headers: h,
            body: Bytes::copy_from_slice(body.as_bytes()),
        }
    }

    fn err(code: &str, etype: &str) -> String {
        format!(r#"{{"error":{{"message":"m","type":"{etype}","param":null,"code":"{code}"}}}}"#)
    }

    #[test]
    fn success_reads_usage() {
        let v = classify_response(&resp(
            200,
            r#"{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#,
            &[],
        ));
        match v {
            Verdict::Success { usage, response } => {
                assert_eq!(usage.unwrap().total(), 7);
                assert!(response.get().contains("\"id\""));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pretty_printed_success_is_compacted_to_one_line() {
        let body = "{\n  \"id\": \"a b\",\n  \"s\": \"q\\\" x\\n\",\n  \"usage\": {\"prompt_tokens\": 1,\n \"completion_tokens\": 2, \"total_tokens\": 3}\n}\n";
        match classify_response(&resp(200, body, &[])) {
            Verdict::Success { response, usage } => {
                assert_eq!(
                    response.get(),
                    r#"{"id":"a b","s":"q\" x\n","usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#
                );
                assert_eq!(usage.unwrap().total(), 3);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_success_is_retried() {
        let v = classify_response(&resp(200, r#"{"id":"x","choi"#, &[]));
        assert!(
            matches!(v, Verdict::Retry { error, .. } if error.kind == ErrorKind::InvalidResponse)
        );
    }

    #[test]
    fn rate_limit_and_quota() {
        let v = classify_response(&resp(
            429,
            &err("rate_limit_exceeded", "requests"),
            &[("retry-after", "2")],
        ));
        assert!(
            matches!(v, Verdict::RateLimited { retry_after: Some(d), .. } if d == Duration::from_secs(2))
        );
        let v = classify_response(&resp(
            429,
            &err("insufficient_quota", "insufficient_quota"),
            &[],
        ));
        assert!(matches!(v, Verdict::QuotaExhausted { .. }));
        let v = classify_response(&resp(
            400,
            r#"{"type":"error","error":{"type":"invalid_request_error","message":"Your credit balance is too low to access the API."}}"#,
            &[],
        ));
        assert!(matches!(v, Verdict::QuotaExhausted { .. }));
    }

    #[test]
    fn transient_and_permanent() {
        for (status, kind) in [
            (500, ErrorKind::ServerError),
            (502, ErrorKind::ServerError),
            (503, ErrorKind::ServerError),
            (529, ErrorKind::Overloaded),
            (408, ErrorKind::RequestTimeout),
            (409, ErrorKind::Conflict),
        ] {
            let v = classify_response(&resp(status, "<html>bad gateway</html>", &[]));
            assert!(
                matches!(&v, Verdict::Retry { error, .. } if error.kind == kind),
                "{status}: {v:?}"
            );
        }
        for (status, body, kind) in [
            (400, err("", "invalid_request_error"), ErrorKind::BadRequest),
            (
                400,
                err("context_length_exceeded", "invalid_request_error"),
                ErrorKind::ContextLengthExceeded,
            ),
            (
                400,
                err("content_policy_violation", "invalid_request_error"),
                ErrorKind::ContentPolicy,
            ),
            (
                401,
                err("invalid_api_key", "invalid_request_error"),
                ErrorKind::Authentication,
            ),
            (403, err("", ""), ErrorKind::PermissionDenied),
            (404, err("model_not_found", ""), ErrorKind::NotFound),
            (422, err("", ""), ErrorKind::Unprocessable),
        ] {
            let v = classify_response(&resp(status, &body, &[]));
            assert!(
                matches!(&v, Verdict::Permanent { error } if error.kind == kind),
                "{status}: {v:?}"
            );
        }
    }

    #[test]
    fn should_retry_header_overrides() {
        let v = classify_response(&resp(400, &err("", ""), &[("x-should-retry", "true")]));
        assert!(matches!(v, Verdict::Retry { .. }));
        let v = classify_response(&resp(503, &err("", ""), &[("x-should-retry", "false")]));
        assert!(matches!(v, Verdict::Permanent { .. }));
        let v = classify_response(&resp(503, "", &[("retry-after", "4")]));
        assert!(
            matches!(v, Verdict::Retry { retry_after: Some(d), .. } if d == Duration::from_secs(4))
        );
    }

    #[test]
    fn html_error_page_message_is_an_excerpt() {
        let v = classify_response(&resp(
            502,
            "<html>\n <body>502 Bad Gateway</body>\n</html>",
            &[],
        ));
        match v {
            Verdict::Retry { error, .. } => {
                assert_eq!(error.message, "<html> <body>502 Bad Gateway</body> </html>")
            }
            other => panic!("{other:?}"),
        }
    }
}
