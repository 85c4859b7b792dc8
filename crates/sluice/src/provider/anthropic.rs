//! Anthropic's Messages API: `POST {base}/messages` with `x-api-key` and
//! `anthropic-version` headers.
//!
//! # Translation of an OpenAI-shape chat body
//!
//! | OpenAI | Anthropic |
//! |---|---|
//! | `system` / `developer` messages | `system` (their texts joined by a blank line) |
//! | `user` / `assistant` messages | `messages`; text parts → `text` blocks, `image_url` parts → `image` blocks (base64 from a `data:` URL, else `url`) |
//! | `max_completion_tokens` / `max_tokens` (or the assumed default) | `max_tokens` (required) |
//! | `stop` | `stop_sequences` |
//! | `temperature` (must be ≤ 1), `top_p`, `top_k` | the same |
//! | `user` | `metadata.user_id` |
//!
//! Anything else (tools, `n` > 1, `response_format`, `seed`...) has no faithful
//! equivalent and is refused with the field named: write a native Anthropic line
//! (`{"custom_id", "params"}`), which is sent untranslated.
//!
//! # Errors
//!
//! `{"type": "error", "error": {"type", "message"}}`. `billing_error`, "credit balance is
//! too low" and `enforced_spend_limit_reached` stop the run; 529 `overloaded_error` is
//! the provider's load, retried with backoff; "prompt is too long" is
//! `context_length_exceeded`.

use std::time::SystemTime;

use crate::json::{JsonError, RawJson};
use ::http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::http::TransportBuildError;
use super::openai::QUOTA_MARKERS;
use super::{
    body_excerpt, compact, content_text, data_url, kind_of_status, ratelimit, stop_list,
    ChatTranslation, ErrorFacts, HttpResponse, ProviderKind, RateLimits, TranslateError, WireApi,
};
use crate::outcome::{ErrorKind, Usage};
use crate::request::Endpoint;

/// The `anthropic-version` header sluice sends.
pub const API_VERSION: &str = "2023-06-01";

/// Anthropic's wire API.
#[derive(Clone, Copy, Debug)]
pub struct Anthropic;

#[derive(Deserialize)]
struct UsageOnly {
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
struct ErrorEnvelope {
    #[serde(default)]
    error: Option<ErrorDetail>,
}

#[derive(Deserialize, Default)]
struct ErrorDetail {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> TranslateError {
    (field.into(), reason.into())
}

const NATIVE_HINT: &str =
    "has no Anthropic equivalent; remove it, or write a native Anthropic line {\"custom_id\", \"params\"}";

impl WireApi for Anthropic {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Anthropic
    }

    fn chat_endpoint(&self) -> Endpoint {
        Endpoint::Messages
    }

    fn default_base_url(&self) -> &'static str {
        "https://api.anthropic.com/v1"
    }

    fn url(&self, base: &str, _endpoint: Endpoint, _model: &str) -> String {
        format!("{base}/messages")
    }

    fn headers(&self, api_key: Option<&str>) -> Result<HeaderMap, TransportBuildError> {
        let mut h = HeaderMap::new();
        h.insert(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(API_VERSION),
        );
        if let Some(k) = api_key {
            let mut v = HeaderValue::from_str(k).map_err(|_| TransportBuildError::BadKey)?;
            v.set_sensitive(true);
            h.insert(HeaderName::from_static("x-api-key"), v);
        }
        Ok(h)
    }

    fn translate_chat(
        &self,
        body: Map<String, Value>,
        t: &ChatTranslation<'_>,
    ) -> Result<Map<String, Value>, TranslateError> {
        let mut out = Map::new();
        out.insert("model".into(), Value::String(t.model.to_string()));
        let mut system: Vec<String> = Vec::new();
        let mut messages = Vec::new();
        let source = match body.get("messages") {
            Some(Value::Array(m)) => m,
            _ => return Err(bad("messages", "missing or not an array")),
        };
        for (i, m) in source.iter().enumerate() {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("");
            let field = |f: &str| format!("messages[{i}].{f}");
            if m.get("tool_calls").is_some_and(|v| !v.is_null()) {
                return Err(bad(field("tool_calls"), NATIVE_HINT));
            }
            let content = m.get("content").unwrap_or(&Value::Null);
            match role {
                "system" | "developer" => {
                    let text = content_text(content).ok_or_else(|| {
                        bad(
                            field("content"),
                            "a system message must be text to go to Anthropic",
                        )
                    })?;
                    system.push(text);
                }
                "user" | "assistant" => {
                    let content = match content {
                        Value::String(s) => Value::String(s.clone()),
                        Value::Array(parts) => Value::Array(
                            parts
                                .iter()
                                .enumerate()
                                .map(|(j, p)| block(p, &format!("messages[{i}].content[{j}]")))
                                .collect::<Result<_, _>>()?,
                        ),
                        _ => {
                            return Err(bad(
                                field("content"),
                                "must be a string or an array of parts",
                            ))
                        }
                    };
                    messages.push(json!({"role": role, "content": content}));
                }
                other => {
                    return Err(bad(
                        field("role"),
                        format!("{other:?} messages {NATIVE_HINT}"),
                    ))
                }
            }
        }
        if messages.is_empty() {
            return Err(bad(
                "messages",
                "needs a user message besides the system ones",
            ));
        }
        if !system.is_empty() {
            out.insert("system".into(), Value::String(system.join("\n\n")));
        }
        out.insert("messages".into(), Value::Array(messages));
        out.insert("max_tokens".into(), Value::from(t.max_output_tokens));
        for (k, v) in body {
            if v.is_null() {
                continue;
            }
            match k.as_str() {
                "model" | "messages" | "max_tokens" | "max_completion_tokens" => {}
                "stop" => {
                    let list = stop_list(&v).map_err(|r| bad("stop", r))?;
                    out.insert("stop_sequences".into(), Value::Array(list));
                }
                "temperature" => match v.as_f64() {
                    Some(x) if (0.0..=1.0).contains(&x) => {
                        out.insert(k, v);
                    }
                    _ => return Err(bad(k, "must be a number from 0 to 1 for Anthropic")),
                },
                "top_p" | "top_k" => {
                    out.insert(k, v);
                }
                "user" => {
                    out.insert("metadata".into(), json!({"user_id": v}));
                }
                "n" if v.as_u64() == Some(1) => {}
                "stream" if v == Value::Bool(false) => {}
                "stream" => return Err(bad(k, "streamed responses are not supported; remove it")),
                _ => return Err(bad(k, NATIVE_HINT)),
            }
        }
        Ok(out)
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
        .map(|u| {
            // `input_tokens` counts only the uncached part; the neutral usage counts
            // every input token, with the cached ones broken out.
            let read = u.cache_read_input_tokens.unwrap_or(0);
            let write = u.cache_creation_input_tokens.unwrap_or(0);
            let prompt = u.input_tokens + read + write;
            Usage {
                prompt_tokens: prompt,
                completion_tokens: u.output_tokens,
                total_tokens: prompt + u.output_tokens,
                cached_tokens: read,
                cache_write_tokens: write,
            }
        });
        Ok((raw, usage))
    }

    fn error_facts(&self, resp: &HttpResponse) -> ErrorFacts {
        let detail = serde_json::from_slice::<ErrorEnvelope>(&resp.body)
            .ok()
            .and_then(|e| e.error)
            .unwrap_or_default();
        let etype = detail.kind.as_deref().unwrap_or("");
        let message = detail
            .message
            .clone()
            .unwrap_or_else(|| body_excerpt(&resp.body));
        let quota = etype == "billing_error"
            || message.contains("credit balance is too low")
            || QUOTA_MARKERS
                .iter()
                .any(|m| etype == *m || message.contains(m));
        let kind = match etype {
            _ if resp.status == 529 || etype == "overloaded_error" => ErrorKind::Overloaded,
            _ if message.contains("prompt is too long") => ErrorKind::ContextLengthExceeded,
            "api_error" | "timeout_error" => ErrorKind::ServerError,
            "authentication_error" => ErrorKind::Authentication,
            "permission_error" => ErrorKind::PermissionDenied,
            "not_found_error" => ErrorKind::NotFound,
            "request_too_large" | "invalid_request_error" if resp.status < 500 => {
                ErrorKind::BadRequest
            }
            _ => kind_of_status(resp.status),
        };
        ErrorFacts {
            kind,
            quota,
            message,
            body_retry_after: None,
        }
    }

    fn rate_limits(&self, headers: &HeaderMap, now: SystemTime) -> RateLimits {
        ratelimit::anthropic(headers, now)
    }
}

/// One OpenAI content part as an Anthropic content block.
fn block(part: &Value, field: &str) -> Result<Value, TranslateError> {
    match part.get("type").and_then(Value::as_str) {
        Some("text") => match part.get("text") {
            Some(Value::String(t)) => Ok(json!({"type": "text", "text": t})),
            _ => Err(bad(format!("{field}.text"), "missing or not a string")),
        },
        Some("image_url") => {
            let url = part
                .get("image_url")
                .and_then(|u| u.get("url").or(Some(u)))
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("{field}.image_url.url"), "missing or not a string"))?;
            Ok(match data_url(url) {
                Some((media, data)) => json!({"type": "image", "source":
                    {"type": "base64", "media_type": media, "data": data}}),
                None => json!({"type": "image", "source": {"type": "url", "url": url}}),
            })
        }
        Some(other) => Err(bad(
            format!("{field}.type"),
            format!("{other:?} parts {NATIVE_HINT}"),
        )),
        None => Err(bad(format!("{field}.type"), "missing")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{classify_response, Verdict};
    use bytes::Bytes;
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

    fn err(etype: &str, message: &str) -> String {
        json!({"type": "error", "error": {"type": etype, "message": message}}).to_string()
    }

    fn classify(r: &HttpResponse) -> Verdict {
        classify_response(r, ProviderKind::Anthropic)
    }

    fn tr(body: Value, max: u32) -> Result<Value, TranslateError> {
        let Value::Object(b) = body else { panic!() };
        Anthropic
            .translate_chat(
                b,
                &ChatTranslation {
                    model: "claude-haiku-4-5",
                    max_output_tokens: max,
                    bound_given: false,
                    enforce_bound: false,
                },
            )
            .map(Value::Object)
    }

    #[test]
    fn translates_a_chat_body() {
        let out = tr(
            json!({"model": "anthropic:claude-haiku-4-5", "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use French."}]},
                {"role": "user", "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}]},
                {"role": "assistant", "content": "Un chat."},
                {"role": "user", "content": "Sure?"}],
             "max_tokens": 64, "stop": "END", "temperature": 0.3, "top_p": 0.9, "user": "u1", "n": 1}),
            64,
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"model": "claude-haiku-4-5", "system": "Be brief.\n\nUse French.",
                "messages": [
                    {"role": "user", "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"}}]},
                    {"role": "assistant", "content": "Un chat."},
                    {"role": "user", "content": "Sure?"}],
                "max_tokens": 64, "stop_sequences": ["END"], "temperature": 0.3, "top_p": 0.9,
                "metadata": {"user_id": "u1"}})
        );
    }

    #[test]
    fn refuses_what_has_no_equivalent_naming_the_field() {
        let user = json!([{"role": "user", "content": "hi"}]);
        for (body, field) in [
            (json!({"messages": user, "temperature": 1.5}), "temperature"),
            (json!({"messages": user, "seed": 1}), "seed"),
            (json!({"messages": user, "n": 2}), "n"),
            (json!({"messages": user, "tools": []}), "tools"),
            (json!({"messages": user, "stream": true}), "stream"),
            (
                json!({"messages": [{"role": "system", "content": "x"}]}),
                "messages",
            ),
            (
                json!({"messages": [{"role": "tool", "content": "x", "tool_call_id": "a"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
                "messages[0].content[0].type",
            ),
        ] {
            let (f, reason) = tr(body.clone(), 10).unwrap_err();
            assert_eq!(f, field, "{body}: {reason}");
            assert!(!reason.is_empty());
        }
    }

    #[test]
    fn usage_counts_cache_reads_and_writes_as_input() {
        let (_, usage) = Anthropic
            .parse_success(br#"{"id":"msg_1","usage":{"input_tokens":10,"output_tokens":5,"cache_creation_input_tokens":100,"cache_read_input_tokens":1000}}"#)
            .unwrap();
        let u = usage.unwrap();
        assert_eq!(u.prompt_tokens, 1110);
        assert_eq!(u.completion_tokens, 5);
        assert_eq!(u.total(), 1115);
        assert_eq!((u.cached_tokens, u.cache_write_tokens), (1000, 100));
    }

    #[test]
    fn error_classes() {
        let v = classify(&resp(
            429,
            &err("rate_limit_error", "slow down"),
            &[("retry-after", "3")],
        ));
        assert!(
            matches!(v, Verdict::RateLimited { retry_after: Some(d), .. } if d == Duration::from_secs(3))
        );
        let v = classify(&resp(529, &err("overloaded_error", "Overloaded"), &[]));
        assert!(
            matches!(&v, Verdict::Retry { error, .. } if error.kind == ErrorKind::Overloaded),
            "{v:?}"
        );
        let v = classify(&resp(500, &err("api_error", "boom"), &[]));
        assert!(matches!(&v, Verdict::Retry { error, .. } if error.kind == ErrorKind::ServerError));
        for body in [
            err(
                "invalid_request_error",
                "Your credit balance is too low to access the Anthropic API.",
            ),
            err("billing_error", "billing"),
            err(
                "invalid_request_error",
                "enforced_spend_limit_reached: your workspace spend limit",
            ),
        ] {
            let v = classify(&resp(400, &body, &[]));
            assert!(matches!(v, Verdict::QuotaExhausted { .. }), "{body}: {v:?}");
        }
        for (status, body, kind) in [
            (
                400,
                err("invalid_request_error", "max_tokens: Field required"),
                ErrorKind::BadRequest,
            ),
            (
                400,
                err(
                    "invalid_request_error",
                    "prompt is too long: 210000 tokens > 200000 maximum",
                ),
                ErrorKind::ContextLengthExceeded,
            ),
            (
                401,
                err("authentication_error", "invalid x-api-key"),
                ErrorKind::Authentication,
            ),
            (
                403,
                err("permission_error", "no"),
                ErrorKind::PermissionDenied,
            ),
            (
                404,
                err("not_found_error", "model: claude-nope"),
                ErrorKind::NotFound,
            ),
            (
                413,
                err("request_too_large", "too big"),
                ErrorKind::BadRequest,
            ),
        ] {
            let v = classify(&resp(status, &body, &[]));
            assert!(
                matches!(&v, Verdict::Permanent { error } if error.kind == kind),
                "{status}: {v:?}"
            );
        }
    }

    #[test]
    fn headers_carry_the_key_and_version() {
        let h = Anthropic.headers(Some("sk-ant-test")).unwrap();
        assert_eq!(h["x-api-key"], "sk-ant-test");
        assert!(h["x-api-key"].is_sensitive());
        assert_eq!(h["anthropic-version"], API_VERSION);
        assert!(!h.contains_key("authorization"));
        assert_eq!(
            Anthropic.url("http://h/v1", Endpoint::Messages, "m"),
            "http://h/v1/messages"
        );
    }
}
