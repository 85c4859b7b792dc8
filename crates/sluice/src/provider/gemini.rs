//! Google Gemini's `generateContent`: `POST {base}/models/{model}:generateContent` (base
//! `https://generativelanguage.googleapis.com/v1beta`) with the key in `x-goog-api-key`.
//!
//! # Translation of an OpenAI-shape chat body
//!
//! | OpenAI | Gemini |
//! |---|---|
//! | `system` / `developer` messages | `systemInstruction.parts[].text` |
//! | `user` / `assistant` messages | `contents[]` with role `user` / `model`; text parts → `{"text"}`, `data:` image URLs → `{"inlineData"}` |
//! | `max_completion_tokens` / `max_tokens` | `generationConfig.maxOutputTokens` |
//! | `temperature`, `top_p`, `top_k`, `stop`, `n`, `seed`, `presence_penalty`, `frequency_penalty` | `generationConfig.{temperature, topP, topK, stopSequences, candidateCount, seed, presencePenalty, frequencyPenalty}` |
//! | `response_format` `json_object` / `json_schema` | `generationConfig.responseMimeType` (+ `responseJsonSchema`) |
//! | `user` | dropped: an end-user tag for abuse monitoring, which Gemini has no field for |
//!
//! The model goes in the URL, not the body. Anything else is refused with the field named.
//!
//! # Errors
//!
//! `{"error": {"code", "message", "status", "details"}}`. 429 `RESOURCE_EXHAUSTED` is a
//! rate limit, waited out for `RetryInfo.retryDelay`, unless its `QuotaFailure` names a
//! per-day quota, or the message says the prepaid credits are depleted or a spending cap is
//! reached: then the run stops. 400 `INVALID_ARGUMENT` and `FAILED_PRECONDITION` are permanent (an
//! `API_KEY_INVALID` reason is an authentication error); 500, 503 `UNAVAILABLE` and 504
//! are retried.

use std::time::SystemTime;

use crate::json::{JsonError, RawJson};
use ::http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::http::TransportBuildError;
use super::ratelimit::go_duration;
use super::{
    body_excerpt, compact, content_text, data_url, kind_of_status, stop_list, ChatTranslation,
    ErrorFacts, HttpResponse, ProviderKind, RateLimits, TranslateError, WireApi,
};
use crate::outcome::{ErrorKind, Usage};
use crate::request::Endpoint;

/// Gemini's wire API.
#[derive(Clone, Copy, Debug)]
pub struct Gemini;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageOnly {
    #[serde(default)]
    usage_metadata: Option<WireUsage>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireUsage {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    thoughts_token_count: u64,
    #[serde(default)]
    total_token_count: u64,
    #[serde(default)]
    cached_content_token_count: u64,
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
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    details: Vec<Value>,
}

fn bad(field: impl Into<String>, reason: impl Into<String>) -> TranslateError {
    (field.into(), reason.into())
}

const NO_EQUIVALENT: &str = "has no Gemini equivalent; remove it";

impl WireApi for Gemini {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Gemini
    }

    fn chat_endpoint(&self) -> Endpoint {
        Endpoint::GenerateContent
    }

    fn default_base_url(&self) -> &'static str {
        "https://generativelanguage.googleapis.com/v1beta"
    }

    fn url(&self, base: &str, _endpoint: Endpoint, model: &str) -> String {
        let model = model.strip_prefix("models/").unwrap_or(model);
        format!("{base}/models/{model}:generateContent")
    }

    fn headers(&self, api_key: Option<&str>) -> Result<HeaderMap, TransportBuildError> {
        let mut h = HeaderMap::new();
        if let Some(k) = api_key {
            let mut v = HeaderValue::from_str(k).map_err(|_| TransportBuildError::BadKey)?;
            v.set_sensitive(true);
            h.insert(HeaderName::from_static("x-goog-api-key"), v);
        }
        Ok(h)
    }

    fn translate_chat(
        &self,
        body: Map<String, Value>,
        t: &ChatTranslation<'_>,
    ) -> Result<Map<String, Value>, TranslateError> {
        let mut system_parts = Vec::new();
        let mut contents = Vec::new();
        let source = match body.get("messages") {
            Some(Value::Array(m)) => m,
            _ => return Err(bad("messages", "missing or not an array")),
        };
        for (i, m) in source.iter().enumerate() {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("");
            let field = |f: &str| format!("messages[{i}].{f}");
            if m.get("tool_calls").is_some_and(|v| !v.is_null()) {
                return Err(bad(field("tool_calls"), NO_EQUIVALENT));
            }
            let content = m.get("content").unwrap_or(&Value::Null);
            match role {
                "system" | "developer" => {
                    let text = content_text(content).ok_or_else(|| {
                        bad(
                            field("content"),
                            "a system message must be text to go to Gemini",
                        )
                    })?;
                    system_parts.push(json!({"text": text}));
                }
                "user" | "assistant" => {
                    let parts = match content {
                        Value::String(s) => vec![json!({"text": s})],
                        Value::Array(parts) => parts
                            .iter()
                            .enumerate()
                            .map(|(j, p)| part(p, &format!("messages[{i}].content[{j}]")))
                            .collect::<Result<_, _>>()?,
                        _ => {
                            return Err(bad(
                                field("content"),
                                "must be a string or an array of parts",
                            ))
                        }
                    };
                    let role = if role == "assistant" { "model" } else { "user" };
                    contents.push(json!({"role": role, "parts": parts}));
                }
                other => {
                    return Err(bad(
                        field("role"),
                        format!("{other:?} messages {NO_EQUIVALENT}"),
                    ))
                }
            }
        }
        if contents.is_empty() {
            return Err(bad(
                "messages",
                "needs a user message besides the system ones",
            ));
        }
        let mut config = Map::new();
        if t.bound_given || t.enforce_bound {
            config.insert("maxOutputTokens".into(), Value::from(t.max_output_tokens));
        }
        for (k, v) in body {
            if v.is_null() {
                continue;
            }
            let rename = match k.as_str() {
                "model" | "messages" | "max_tokens" | "max_completion_tokens" | "user" => continue,
                "stream" if v == Value::Bool(false) => continue,
                "stream" => return Err(bad(k, "streamed responses are not supported; remove it")),
                "stop" => {
                    let list = stop_list(&v).map_err(|r| bad("stop", r))?;
                    config.insert("stopSequences".into(), Value::Array(list));
                    continue;
                }
                "response_format" => {
                    match v.get("type").and_then(Value::as_str) {
                        Some("text") => {}
                        Some("json_object") => {
                            config.insert("responseMimeType".into(), "application/json".into());
                        }
                        Some("json_schema") => {
                            let schema = v
                                .get("json_schema")
                                .and_then(|s| s.get("schema"))
                                .ok_or_else(|| {
                                    bad("response_format.json_schema.schema", "missing")
                                })?;
                            config.insert("responseMimeType".into(), "application/json".into());
                            config.insert("responseJsonSchema".into(), schema.clone());
                        }
                        _ => {
                            return Err(bad(
                                "response_format.type",
                                "must be text, json_object or json_schema",
                            ))
                        }
                    }
                    continue;
                }
                "temperature" => "temperature",
                "top_p" => "topP",
                "top_k" => "topK",
                "n" => "candidateCount",
                "seed" => "seed",
                "presence_penalty" => "presencePenalty",
                "frequency_penalty" => "frequencyPenalty",
                _ => return Err(bad(k, NO_EQUIVALENT)),
            };
            if !v.is_number() {
                return Err(bad(k, "must be a number"));
            }
            config.insert(rename.into(), v);
        }
        let mut out = Map::new();
        out.insert("contents".into(), Value::Array(contents));
        if !system_parts.is_empty() {
            out.insert(
                "systemInstruction".into(),
                json!({"parts": Value::Array(system_parts)}),
            );
        }
        if !config.is_empty() {
            out.insert("generationConfig".into(), Value::Object(config));
        }
        Ok(out)
    }

    fn parse_success(&self, body: &[u8]) -> Result<(RawJson, Option<Usage>), JsonError> {
        let body = compact(body);
        let (raw, member) = RawJson::parse_with_member(&body, "usageMetadata")?;
        let usage = match member {
            Some(text) => serde_json::from_str::<WireUsage>(text).ok(),
            None => serde_json::from_str::<UsageOnly>(raw.get())
                .ok()
                .and_then(|u| u.usage_metadata),
        }
        .map(|u| {
            // Thinking tokens are billed as output.
            let completion = u.candidates_token_count + u.thoughts_token_count;
            Usage {
                prompt_tokens: u.prompt_token_count,
                completion_tokens: completion,
                total_tokens: u.total_token_count.max(u.prompt_token_count + completion),
                cached_tokens: u.cached_content_token_count,
                cache_write_tokens: 0,
            }
        });
        Ok((raw, usage))
    }

    fn error_facts(&self, resp: &HttpResponse) -> ErrorFacts {
        let detail = serde_json::from_slice::<ErrorEnvelope>(&resp.body)
            .ok()
            .and_then(|e| e.error)
            .unwrap_or_default();
        let status = detail.status.as_deref().unwrap_or("");
        let message = detail
            .message
            .clone()
            .unwrap_or_else(|| body_excerpt(&resp.body));
        let mut per_day = false;
        let mut key_invalid = false;
        let mut retry_delay = None;
        for d in &detail.details {
            match d.get("@type").and_then(Value::as_str).unwrap_or("") {
                t if t.ends_with("QuotaFailure") => {
                    per_day |= d["violations"].as_array().into_iter().flatten().any(|v| {
                        v.get("quotaId")
                            .and_then(Value::as_str)
                            .is_some_and(|q| q.contains("PerDay"))
                    });
                }
                t if t.ends_with("RetryInfo") => {
                    retry_delay = d
                        .get("retryDelay")
                        .and_then(Value::as_str)
                        .and_then(go_duration);
                }
                t if t.ends_with("ErrorInfo") => {
                    key_invalid |=
                        d.get("reason").and_then(Value::as_str) == Some("API_KEY_INVALID");
                }
                _ => {}
            }
        }
        let lower = message.to_ascii_lowercase();
        let quota = (resp.status == 429 || status == "RESOURCE_EXHAUSTED")
            // Not "billing": the per-minute limit's message says "check your plan and
            // billing details" too.
            && (per_day || lower.contains("credits are depleted") || lower.contains("spending cap"));
        let kind = if key_invalid || status == "UNAUTHENTICATED" {
            ErrorKind::Authentication
        } else if status == "PERMISSION_DENIED" {
            ErrorKind::PermissionDenied
        } else if resp.status == 503 && lower.contains("overloaded") {
            ErrorKind::Overloaded
        } else if resp.status == 400
            && (lower.contains("exceeds the maximum number of tokens")
                || lower.contains("input token count"))
        {
            ErrorKind::ContextLengthExceeded
        } else {
            kind_of_status(resp.status)
        };
        ErrorFacts {
            kind,
            quota,
            message,
            body_retry_after: retry_delay,
        }
    }

    fn rate_limits(&self, _headers: &HeaderMap, _now: SystemTime) -> RateLimits {
        RateLimits::default()
    }
}

/// One OpenAI content part as a Gemini part.
fn part(p: &Value, field: &str) -> Result<Value, TranslateError> {
    match p.get("type").and_then(Value::as_str) {
        Some("text") => match p.get("text") {
            Some(Value::String(t)) => Ok(json!({"text": t})),
            _ => Err(bad(format!("{field}.text"), "missing or not a string")),
        },
        Some("image_url") => {
            let url = p
                .get("image_url")
                .and_then(|u| u.get("url").or(Some(u)))
                .and_then(Value::as_str)
                .unwrap_or("");
            match data_url(url) {
                Some((media, data)) => Ok(json!({"inlineData": {"mimeType": media, "data": data}})),
                None => Err(bad(
                    format!("{field}.image_url.url"),
                    "Gemini takes images inline: use a data: URL",
                )),
            }
        }
        Some(other) => Err(bad(
            format!("{field}.type"),
            format!("{other:?} parts {NO_EQUIVALENT}"),
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

    fn resp(status: u16, body: Value) -> HttpResponse {
        HttpResponse {
            status,
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_string()),
        }
    }

    fn gerr(code: u16, status: &str, message: &str, details: Value) -> Value {
        json!({"error": {"code": code, "message": message, "status": status, "details": details}})
    }

    fn classify(r: &HttpResponse) -> Verdict {
        classify_response(r, ProviderKind::Gemini)
    }

    fn tr(body: Value, given: bool) -> Result<Value, TranslateError> {
        let Value::Object(b) = body else { panic!() };
        Gemini
            .translate_chat(
                b,
                &ChatTranslation {
                    model: "gemini-2.5-flash",
                    max_output_tokens: 99,
                    bound_given: given,
                    enforce_bound: false,
                },
            )
            .map(Value::Object)
    }

    #[test]
    fn translates_a_chat_body() {
        let out = tr(
            json!({"model": "gemini-2.5-flash", "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/"}}]},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Again"}],
             "max_tokens": 99, "temperature": 1.2, "top_p": 0.5, "stop": ["x"], "seed": 3,
             "response_format": {"type": "json_object"}, "user": "dropped"}),
            true,
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"contents": [
                    {"role": "user", "parts": [{"text": "Hi"}, {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/"}}]},
                    {"role": "model", "parts": [{"text": "Hello"}]},
                    {"role": "user", "parts": [{"text": "Again"}]}],
                "systemInstruction": {"parts": [{"text": "Be brief."}]},
                "generationConfig": {"maxOutputTokens": 99, "temperature": 1.2, "topP": 0.5,
                    "stopSequences": ["x"], "seed": 3, "responseMimeType": "application/json"}})
        );
        // No bound given and none enforced: no generationConfig at all.
        let out = tr(
            json!({"messages": [{"role": "user", "content": "Hi"}]}),
            false,
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]})
        );
    }

    #[test]
    fn refuses_what_has_no_equivalent() {
        let user = json!([{"role": "user", "content": "hi"}]);
        for (body, field) in [
            (json!({"messages": user, "tools": []}), "tools"),
            (json!({"messages": user, "logprobs": true}), "logprobs"),
            (
                json!({"messages": user, "temperature": "hot"}),
                "temperature",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}),
                "messages[0].content[0].image_url.url",
            ),
        ] {
            assert_eq!(tr(body.clone(), false).unwrap_err().0, field, "{body}");
        }
    }

    #[test]
    fn usage_metadata_counts_thoughts_as_output() {
        let (_, u) = Gemini
            .parse_success(br#"{"candidates":[],"usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":4,"thoughtsTokenCount":6,"totalTokenCount":20,"cachedContentTokenCount":8}}"#)
            .unwrap();
        let u = u.unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total()),
            (10, 10, 20)
        );
        assert_eq!(u.cached_tokens, 8);
    }

    #[test]
    fn error_classes() {
        let per_minute = gerr(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota, please check your plan and billing details. For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.", json!([
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaId": "GenerateRequestsPerMinutePerProjectPerModel"}]},
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]));
        let v = classify(&resp(429, per_minute));
        assert!(
            matches!(v, Verdict::RateLimited { retry_after: Some(d), .. } if d == Duration::from_secs(7)),
            "{v:?}"
        );
        let per_day = gerr(
            429,
            "RESOURCE_EXHAUSTED",
            "Quota exceeded",
            json!([
            {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]}]),
        );
        assert!(matches!(
            classify(&resp(429, per_day)),
            Verdict::QuotaExhausted { .. }
        ));
        let credits = gerr(
            429,
            "RESOURCE_EXHAUSTED",
            "Your prepayment credits are depleted.",
            json!([]),
        );
        assert!(matches!(
            classify(&resp(429, credits)),
            Verdict::QuotaExhausted { .. }
        ));

        let v = classify(&resp(
            503,
            gerr(
                503,
                "UNAVAILABLE",
                "The model is overloaded. Please try again later.",
                json!([]),
            ),
        ));
        assert!(
            matches!(&v, Verdict::Retry { error, .. } if error.kind == ErrorKind::Overloaded),
            "{v:?}"
        );
        let v = classify(&resp(
            500,
            gerr(
                500,
                "INTERNAL",
                "An internal error has occurred.",
                json!([]),
            ),
        ));
        assert!(matches!(&v, Verdict::Retry { error, .. } if error.kind == ErrorKind::ServerError));
        for (status, body, kind) in [
            (400, gerr(400, "INVALID_ARGUMENT", "Invalid JSON payload received. Unknown name \"messages\"", json!([])), ErrorKind::BadRequest),
            (400, gerr(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", json!([{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}])), ErrorKind::Authentication),
            (400, gerr(400, "INVALID_ARGUMENT", "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).", json!([])), ErrorKind::ContextLengthExceeded),
            (403, gerr(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers", json!([])), ErrorKind::PermissionDenied),
            (404, gerr(404, "NOT_FOUND", "models/gemini-nope is not found", json!([])), ErrorKind::NotFound),
        ] {
            let v = classify(&resp(status, body));
            assert!(matches!(&v, Verdict::Permanent { error } if error.kind == kind), "{status}: {v:?}");
        }
    }

    #[test]
    fn url_and_key_header() {
        assert_eq!(
            Gemini.url(
                "http://h/v1beta",
                Endpoint::GenerateContent,
                "models/gemini-2.5-flash"
            ),
            "http://h/v1beta/models/gemini-2.5-flash:generateContent"
        );
        let h = Gemini.headers(Some("AIza-test")).unwrap();
        assert_eq!(h["x-goog-api-key"], "AIza-test");
        assert!(h["x-goog-api-key"].is_sensitive() && !h.contains_key("authorization"));
    }
}
