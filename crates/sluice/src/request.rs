//! Provider-neutral requests and the input line formats that produce them.
//!
//! One input line is one JSON object, in any of these shapes:
//!
//! * an OpenAI Batch line: `{"custom_id", "method": "POST", "url": "/v1/chat/completions"
//!   | "/v1/embeddings", "body": {...}}`;
//! * a plain chat body: `{"model"?, "messages": [...], ...}` with optional `custom_id` and
//!   `metadata` (both removed from the body before it is sent);
//! * a prompt: `{"prompt": "...", "system"?, "model"?, "custom_id"?, "metadata"?, ...}`,
//!   turned into a chat body with one user message (and a system message when given);
//!   every other field is passed through to the chat body.
//!
//! [`LineParser::parse`] turns a line into a [`Request`] with its body serialised once, its
//! input tokens estimated and its output tokens bounded, or into a [`BadLine`] that names
//! the line, the field and the reason.

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::fmt;

use crate::tokens::TokenEstimator;

/// The API endpoint a request goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/embeddings`.
    Embeddings,
}

impl Endpoint {
    /// The path below the API base URL (which carries `/v1`).
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Embeddings => "/embeddings",
        }
    }

    /// The OpenAI Batch `url` of this endpoint.
    pub fn batch_url(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }

    fn from_batch_url(url: &str) -> Option<Endpoint> {
        match url.trim_end_matches('/') {
            "/v1/chat/completions" | "/chat/completions" => Some(Endpoint::ChatCompletions),
            "/v1/embeddings" | "/embeddings" => Some(Endpoint::Embeddings),
            _ => None,
        }
    }
}

/// One request, ready to send: its body is serialised once and reused by every attempt.
#[derive(Clone, Debug)]
pub struct Request {
    /// The caller's identifier, unique within a run.
    pub custom_id: String,
    /// 1-based line number in the input (0 when the request did not come from a file).
    pub line: u64,
    /// Where it goes.
    pub endpoint: Endpoint,
    /// The model named in the body.
    pub model: String,
    /// The JSON body sent to the provider.
    pub body: Bytes,
    /// Estimated input tokens, reserved against the TPM limit before sending: tiktoken's
    /// count when [`LineParser::count_tokens`] is on, else a quarter of the body's bytes.
    pub input_tokens: u32,
    /// The most output tokens the request may produce, also reserved before sending.
    pub max_output_tokens: u32,
    /// The caller's `metadata`, passed through to the outcome untouched.
    pub metadata: Option<Box<RawValue>>,
}

impl Request {
    /// Tokens reserved against a tokens-per-minute limit before the request is sent.
    pub fn reserved_tokens(&self) -> u64 {
        u64::from(self.input_tokens) + u64::from(self.max_output_tokens)
    }
}

/// A line of input that cannot become a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadLine {
    /// 1-based line number.
    pub line: u64,
    /// The `custom_id` of the line, when it could be read.
    pub custom_id: Option<String>,
    /// The field at fault, when there is one.
    pub field: Option<String>,
    /// What is wrong, in words a user can act on.
    pub reason: String,
}

impl fmt::Display for BadLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}", self.line)?;
        if let Some(id) = &self.custom_id {
            write!(f, " (custom_id {id:?})")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for BadLine {}

/// How lines become requests: the defaults that apply to lines that omit them.
#[derive(Clone, Debug)]
pub struct LineParser {
    /// Model for lines that name none.
    pub default_model: Option<String>,
    /// Output tokens reserved for chat requests that set no `max_tokens` /
    /// `max_completion_tokens`.
    pub assumed_output_tokens: u32,
    /// Count input tokens with tiktoken (needed to pace a tokens-per-minute limit). Off, the
    /// estimate is a quarter of the body's bytes and tiktoken's tables are never loaded.
    pub count_tokens: bool,
    estimator: TokenEstimator,
}

impl Default for LineParser {
    fn default() -> Self {
        LineParser::new(None)
    }
}

/// Output tokens reserved for a chat request that does not bound its own output.
pub const DEFAULT_ASSUMED_OUTPUT_TOKENS: u32 = 512;

impl LineParser {
    /// A parser whose lines without a model get `default_model`.
    pub fn new(default_model: Option<String>) -> Self {
        LineParser {
            default_model,
            assumed_output_tokens: DEFAULT_ASSUMED_OUTPUT_TOKENS,
            count_tokens: true,
            estimator: TokenEstimator::new(),
        }
    }

    /// The `custom_id` given to a line that has none.
    pub fn derived_custom_id(line: u64) -> String {
        format!("line-{line}")
    }

    /// Parses one line into a request. `line` is 1-based.
    pub fn parse(&self, line: u64, text: &str) -> Result<Request, BadLine> {
        self.parse_inner(line, text, true)
    }

    /// Checks one line and returns its `custom_id`, without estimating tokens or building
    /// the body: the cheap pass that finds every bad line before anything is sent.
    pub fn check(&self, line: u64, text: &str) -> Result<String, BadLine> {
        self.parse_inner(line, text, false).map(|r| r.custom_id)
    }

    fn parse_inner(&self, line: u64, text: &str, full: bool) -> Result<Request, BadLine> {
        let bad = |custom_id: Option<&str>, field: Option<&str>, reason: String| BadLine {
            line,
            custom_id: custom_id.map(str::to_owned),
            field: field.map(str::to_owned),
            reason,
        };
        let value: Value = serde_json::from_str(text)
            .map_err(|e| bad(None, None, format!("not valid JSON: {e}")))?;
        let Value::Object(mut obj) = value else {
            return Err(bad(None, None, "expected a JSON object".into()));
        };
        let custom_id = match obj.remove("custom_id") {
            None | Some(Value::Null) => LineParser::derived_custom_id(line),
            Some(Value::String(s)) if !s.is_empty() => s,
            Some(Value::String(_)) => {
                return Err(bad(None, Some("custom_id"), "must not be empty".into()))
            }
            Some(_) => {
                return Err(bad(None, Some("custom_id"), "must be a string".into()));
            }
        };
        let id = Some(custom_id.as_str());
        let metadata = match obj.remove("metadata") {
            None => None,
            Some(v) => Some(
                serde_json::value::to_raw_value(&v)
                    .map_err(|e| bad(id, Some("metadata"), e.to_string()))?,
            ),
        };

        let (endpoint, mut body) = if obj.contains_key("url") || obj.contains_key("body") {
            // OpenAI Batch line.
            match obj.get("method").and_then(Value::as_str) {
                Some(m) if m.eq_ignore_ascii_case("POST") => {}
                Some(m) => return Err(bad(id, Some("method"), format!("{m:?} is not POST"))),
                None => return Err(bad(id, Some("method"), "missing; expected \"POST\"".into())),
            }
            let url = match obj.get("url") {
                Some(Value::String(u)) => u.as_str(),
                _ => return Err(bad(id, Some("url"), "missing or not a string".into())),
            };
            let endpoint = Endpoint::from_batch_url(url).ok_or_else(|| {
                bad(
                    id,
                    Some("url"),
                    format!("{url:?} is not supported; use /v1/chat/completions or /v1/embeddings"),
                )
            })?;
            match obj.remove("body") {
                Some(Value::Object(b)) => (endpoint, b),
                _ => return Err(bad(id, Some("body"), "missing or not an object".into())),
            }
        } else if obj.contains_key("params") {
            return Err(bad(
                id,
                Some("params"),
                "Anthropic batch lines need an Anthropic target, which this build does not support yet"
                    .into(),
            ));
        } else if obj.contains_key("prompt") && obj.contains_key("messages") {
            return Err(bad(
                id,
                Some("prompt"),
                "a line has either `prompt` or `messages`, not both".into(),
            ));
        } else if let Some(prompt) = obj.remove("prompt") {
            let Value::String(prompt) = prompt else {
                return Err(bad(id, Some("prompt"), "must be a string".into()));
            };
            let mut messages = Vec::with_capacity(2);
            match obj.remove("system") {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) => {
                    messages.push(serde_json::json!({"role": "system", "content": s}))
                }
                Some(_) => return Err(bad(id, Some("system"), "must be a string".into())),
            }
            messages.push(serde_json::json!({"role": "user", "content": prompt}));
            obj.insert("messages".into(), Value::Array(messages));
            (Endpoint::ChatCompletions, obj)
        } else if obj.contains_key("messages") {
            (Endpoint::ChatCompletions, obj)
        } else if obj.contains_key("input") && obj.contains_key("model") {
            (Endpoint::Embeddings, obj)
        } else {
            return Err(bad(
                id,
                None,
                "unknown shape: expected an OpenAI Batch line (custom_id, method, url, body), \
                 a chat body with `messages`, or {\"prompt\": ...}"
                    .into(),
            ));
        };

        let model = match body.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(Value::String(_)) | None | Some(Value::Null) => match &self.default_model {
                Some(m) => {
                    body.insert("model".into(), Value::String(m.clone()));
                    m.clone()
                }
                None => {
                    return Err(bad(
                        id,
                        Some("model"),
                        "missing, and no default model is set (pass --model)".into(),
                    ))
                }
            },
            Some(_) => return Err(bad(id, Some("model"), "must be a string".into())),
        };

        let (input_tokens, max_output_tokens) = match endpoint {
            Endpoint::ChatCompletions => {
                let messages = match body.get("messages") {
                    Some(Value::Array(m)) if !m.is_empty() => m,
                    Some(Value::Array(_)) => {
                        return Err(bad(id, Some("messages"), "must not be empty".into()))
                    }
                    _ => return Err(bad(id, Some("messages"), "missing or not an array".into())),
                };
                for (i, m) in messages.iter().enumerate() {
                    match m.get("role") {
                        Some(Value::String(_)) => {}
                        _ => {
                            return Err(bad(
                                id,
                                Some(&format!("messages[{i}].role")),
                                "missing or not a string".into(),
                            ))
                        }
                    }
                }
                let max_out = output_bound(&body)
                    .map_err(|(field, reason)| bad(id, Some(field), reason))?
                    .unwrap_or(self.assumed_output_tokens);
                let input = if full && self.count_tokens {
                    self.estimator.chat_input_tokens(messages)
                } else {
                    0
                };
                (input, max_out)
            }
            Endpoint::Embeddings => {
                let input = match body.get("input") {
                    Some(v @ (Value::String(_) | Value::Array(_))) => v,
                    _ => {
                        return Err(bad(
                            id,
                            Some("input"),
                            "missing, or not a string or an array".into(),
                        ))
                    }
                };
                let tokens = if full && self.count_tokens {
                    self.estimator.embedding_input_tokens(input)
                } else {
                    0
                };
                (tokens, 0)
            }
        };

        let body = if full {
            Bytes::from(serde_json::to_vec(&Value::Object(body)).expect("a JSON map serialises"))
        } else {
            Bytes::new()
        };
        let input_tokens = if full && !self.count_tokens {
            (body.len() / 4) as u32
        } else {
            input_tokens
        };
        Ok(Request {
            custom_id,
            line,
            endpoint,
            model,
            body,
            input_tokens,
            max_output_tokens,
            metadata,
        })
    }
}

/// Reads `max_completion_tokens` or `max_tokens` from a chat body.
fn output_bound(body: &Map<String, Value>) -> Result<Option<u32>, (&'static str, String)> {
    for field in ["max_completion_tokens", "max_tokens"] {
        match body.get(field) {
            None | Some(Value::Null) => {}
            Some(v) => {
                let n = v
                    .as_u64()
                    .filter(|n| *n > 0 && *n <= u64::from(u32::MAX))
                    .ok_or((field, "must be a positive integer".to_string()))?;
                return Ok(Some(n as u32));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parser() -> LineParser {
        LineParser::new(Some("gpt-4.1-mini".into()))
    }

    #[test]
    fn batch_line_keeps_id_and_body() {
        let r = parser()
            .parse(
                3,
                r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[{"role":"user","content":"hello world"}],"max_tokens":7}}"#,
            )
            .unwrap();
        assert_eq!(r.custom_id, "a");
        assert_eq!(r.endpoint, Endpoint::ChatCompletions);
        assert_eq!(r.model, "m");
        assert_eq!(r.max_output_tokens, 7);
        assert!(r.input_tokens >= 2, "{}", r.input_tokens);
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["max_tokens"], 7);
        assert!(body.get("custom_id").is_none());
    }

    #[test]
    fn prompt_line_becomes_chat_with_default_model_and_derived_id() {
        let r = parser()
            .parse(
                9,
                r#"{"prompt":"hi","system":"be brief","metadata":{"k":1}}"#,
            )
            .unwrap();
        assert_eq!(r.custom_id, "line-9");
        assert_eq!(r.model, "gpt-4.1-mini");
        assert_eq!(r.max_output_tokens, DEFAULT_ASSUMED_OUTPUT_TOKENS);
        assert_eq!(r.metadata.unwrap().get(), r#"{"k":1}"#);
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["messages"][0]["role"], "system");
        assert_eq!(body["messages"][1]["content"], "hi");
        assert!(body.get("metadata").is_none() && body.get("prompt").is_none());
    }

    #[test]
    fn embeddings_batch_line() {
        let r = parser()
            .parse(
                1,
                r#"{"custom_id":"e","method":"POST","url":"/v1/embeddings","body":{"model":"text-embedding-3-small","input":["a b c","d"]}}"#,
            )
            .unwrap();
        assert_eq!(r.endpoint, Endpoint::Embeddings);
        assert_eq!(r.max_output_tokens, 0);
        assert!(r.input_tokens >= 2);
    }

    #[test]
    fn bad_lines_name_line_field_and_reason() {
        let p = LineParser::new(None);
        let cases = [
            ("{not json", None, "not valid JSON"),
            ("[1,2]", None, "expected a JSON object"),
            (r#"{"foo":1}"#, None, "unknown shape"),
            (r#"{"prompt":3}"#, Some("prompt"), "must be a string"),
            (r#"{"prompt":"x"}"#, Some("model"), "--model"),
            (r#"{"model":"m","messages":[]}"#, Some("messages"), "empty"),
            (
                r#"{"model":"m","messages":[{"content":"x"}]}"#,
                Some("messages[0].role"),
                "missing",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#,
                Some("max_tokens"),
                "positive",
            ),
            (
                r#"{"prompt":"x","model":"m","messages":[{"role":"user","content":"y"}]}"#,
                Some("prompt"),
                "not both",
            ),
            (
                r#"{"custom_id":5,"prompt":"x"}"#,
                Some("custom_id"),
                "string",
            ),
            (
                r#"{"custom_id":"a","method":"GET","url":"/v1/chat/completions","body":{}}"#,
                Some("method"),
                "POST",
            ),
            (
                r#"{"custom_id":"a","method":"POST","url":"/v1/images","body":{}}"#,
                Some("url"),
                "not supported",
            ),
            (
                r#"{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"m"}}"#,
                Some("input"),
                "missing",
            ),
        ];
        for (text, field, reason) in cases {
            let err = p.parse(42, text).unwrap_err();
            assert_eq!(err.line, 42);
            assert_eq!(err.field.as_deref(), field, "{text}");
            assert!(err.reason.contains(reason), "{text}: {}", err.reason);
            assert!(err.to_string().starts_with("line 42"));
        }
    }

    #[test]
    fn check_agrees_with_parse() {
        let p = parser();
        assert_eq!(
            p.check(5, r#"{"prompt":"x","custom_id":"z"}"#).unwrap(),
            "z"
        );
        assert!(p.check(5, r#"{"prompt":1}"#).is_err());
    }
}
