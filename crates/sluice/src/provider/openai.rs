//! OpenAI's wire API (and every OpenAI-compatible server): addressing, response reading
//! and error classification. Bodies are already in OpenAI's shape, so there is nothing to
//! translate.
//!
//! Errors are `{"error": {"message", "type", "param", "code"}}`. `insufficient_quota`,
//! `billing_hard_limit_reached` and `enforced_spend_limit_reached` (as code or type) stop
//! the run; so does Anthropic's "credit balance is too low", which OpenAI-compatible
//! proxies in front of Claude pass on.

use std::time::SystemTime;

use crate::json::{JsonError, RawJson};
use ::http::{HeaderMap, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::http::TransportBuildError;
use super::{
    body_excerpt, compact, kind_of_status, ratelimit, ChatTranslation, ErrorFacts, HttpResponse,
    ProviderKind, RateLimits, TranslateError, WireApi,
};
use crate::outcome::{ErrorKind, Usage};
use crate::request::Endpoint;

/// OpenAI's wire API.
#[derive(Clone, Copy, Debug)]
pub struct OpenAi;

#[derive(Deserialize)]
struct UsageOnly {
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    total_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: u64,
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
pub const QUOTA_MARKERS: [&str; 3] = [
    "insufficient_quota",
    "billing_hard_limit_reached",
    "enforced_spend_limit_reached",
];

impl WireApi for OpenAi {
    fn kind(&self) -> ProviderKind {
        ProviderKind::OpenAi
    }

    fn chat_endpoint(&self) -> Endpoint {
        Endpoint::ChatCompletions
    }

    fn default_base_url(&self) -> &'static str {
        "https://api.openai.com/v1"
    }

    fn url(&self, base: &str, endpoint: Endpoint, _model: &str) -> String {
        let path = match endpoint {
            Endpoint::Embeddings => "/embeddings",
            _ => "/chat/completions",
        };
        format!("{base}{path}")
    }

    fn headers(&self, api_key: Option<&str>) -> Result<HeaderMap, TransportBuildError> {
        let mut h = HeaderMap::new();
        if let Some(k) = api_key {
            let mut v = HeaderValue::from_str(&format!("Bearer {k}"))
                .map_err(|_| TransportBuildError::BadKey)?;
            v.set_sensitive(true);
            h.insert(::http::header::AUTHORIZATION, v);
        }
        Ok(h)
    }

    fn translate_chat(
        &self,
        mut body: Map<String, Value>,
        t: &ChatTranslation<'_>,
    ) -> Result<Map<String, Value>, TranslateError> {
        if t.model != body.get("model").and_then(Value::as_str).unwrap_or("") {
            body.insert("model".into(), Value::String(t.model.to_string()));
        }
        if t.enforce_bound && !t.bound_given {
            // `max_completion_tokens`: the reasoning models refuse `max_tokens`.
            body.insert(
                "max_completion_tokens".into(),
                Value::from(t.max_output_tokens),
            );
        }
        Ok(body)
    }

    fn parse_success(&self, body: &[u8]) -> Result<(RawJson, Option<Usage>), JsonError> {
        let body = compact(body);
        let (raw, member) = RawJson::parse_with_member(&body, "usage")?;
        let usage = match member {
            Some(text) => serde_json::from_str::<WireUsage>(text).ok(),
            None => serde_json::from_str::<UsageOnly>(raw.get())
                .ok()
                .and_then(|u| u.usage),
        }
        .map(|u| Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
            cached_tokens: u.prompt_tokens_details.map_or(0, |d| d.cached_tokens),
            cache_write_tokens: 0,
        });
        Ok((raw, usage))
    }

    fn error_facts(&self, resp: &HttpResponse) -> ErrorFacts {
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
        let quota = QUOTA_MARKERS.iter().any(|m| code == *m || etype == *m)
            || message.contains("credit balance is too low");
        ErrorFacts {
            kind: natural_kind(resp.status, code, etype, &message),
            quota,
            message,
            body_retry_after: None,
        }
    }

    fn rate_limits(&self, headers: &HeaderMap, _now: SystemTime) -> RateLimits {
        ratelimit::openai(headers)
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
    kind_of_status(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Verdict;
    use std::time::Duration;

    fn classify_response(r: &HttpResponse) -> Verdict {
        crate::provider::classify_response(r, ProviderKind::OpenAi)
    }
    use bytes::Bytes;

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
    fn usage_is_read_wherever_it_stands() {
        let usage = r#""usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11,"prompt_tokens_details":{"cached_tokens":2}}"#;
        let near_end = format!(
            r#"{{"id":"x","choices":[],{usage},"service_tier":"default","system_fingerprint":"fp"}}"#
        );
        let first = format!(r#"{{{usage},"a":1,"b":"}}","c":[{{}}],"d":null,"e":true}}"#);
        for body in [near_end, first] {
            let (_, usage) = OpenAi.parse_success(body.as_bytes()).unwrap();
            let u = usage.unwrap_or_else(|| panic!("{body}"));
            assert_eq!(
                (u.prompt_tokens, u.completion_tokens, u.cached_tokens),
                (5, 6, 2)
            );
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
