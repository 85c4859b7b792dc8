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
//!   every other field is passed through to the chat body;
//! * a native Anthropic Message Batches line: `{"custom_id", "params": {...}}`, whose
//!   `params` go to an Anthropic model untranslated.
//!
//! Each request's model is routed ([`crate::catalog::Router`]) to its provider, and a chat
//! body is translated into that provider's wire format ([`crate::provider::WireApi`]).
//!
//! [`LineParser::parse`] turns a line into a [`Request`] with its body serialised once, its
//! input tokens estimated and its output tokens bounded, or into a [`BadLine`] that names
//! the line, the field and the reason.

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::fmt;
use std::sync::Arc;

use crate::cache::{KeyForm, MessagesForm};
use crate::catalog::{Route, Router};
use crate::cost::Price;
use crate::provider::{ChatTranslation, ProviderKind};
use crate::tokens::TokenEstimator;

/// The API endpoint a request goes to; each belongs to one provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// OpenAI `POST /v1/chat/completions`.
    ChatCompletions,
    /// OpenAI `POST /v1/embeddings`.
    Embeddings,
    /// Anthropic `POST /v1/messages`.
    Messages,
    /// Gemini `POST /v1beta/models/{model}:generateContent`.
    GenerateContent,
}

impl Endpoint {
    /// The provider whose endpoint this is.
    pub fn provider(self) -> ProviderKind {
        match self {
            Endpoint::ChatCompletions | Endpoint::Embeddings => ProviderKind::OpenAi,
            Endpoint::Messages => ProviderKind::Anthropic,
            Endpoint::GenerateContent => ProviderKind::Gemini,
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
    /// Where it goes (and so which provider's wire format its body is in).
    pub endpoint: Endpoint,
    /// Which of the transport's targets (base URL and key) it goes to.
    pub target: u16,
    /// The model, as the provider knows it.
    pub model: String,
    /// The model's price, when the catalog knows it.
    pub price: Option<Price>,
    /// The JSON body sent to the provider.
    pub body: Bytes,
    /// Estimated input tokens, reserved against the TPM limit before sending: tiktoken's
    /// count when [`LineParser::count_tokens`] is on, else a quarter of the body's bytes.
    pub input_tokens: u32,
    /// The most output tokens the request may produce, also reserved before sending.
    pub max_output_tokens: u32,
    /// The caller's `metadata`, passed through to the outcome untouched.
    pub metadata: Option<Box<RawValue>>,
    /// The same request for the next model of a fallback chain (`--model a,b,c`), built
    /// when the line is read: the engine moves to it when this model cannot serve the
    /// request (not found, context too long, circuit open).
    pub fallback: Option<Box<Request>>,
    /// How the parser wrote `body` for the response cache's key (in its canonical form, or
    /// with the key's form apart) as it read the line, when [`LineParser::key_forms`] is
    /// on: the key then does not read the body again. Whoever changes `body` must clear it.
    pub key_form: Option<crate::cache::KeyForm>,
    /// The key the response cache keeps this request's answer under, set by the cache
    /// layer that looked it up and sent it on (see [`crate::cache::keys`]). The engine
    /// passes it to the outcome (also from a fallback model's request), so the answer is
    /// stored without a table from requests in flight to their keys.
    pub cache_key: Option<crate::cache::CacheKey>,
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
    /// Send the output bound (`assumed_output_tokens`) to providers even for requests that
    /// set none, so it is a real bound (a budget relies on it).
    pub enforce_output_bound: bool,
    /// Routes models to providers; without one, every request goes to target 0, OpenAI.
    pub router: Option<Arc<Router>>,
    /// Models to fall back to, in order, for lines that name no model (so use
    /// `default_model`).
    pub fallback_models: Vec<String>,
    /// Write each request's [`Request::key_form`] (for a run with a response cache): most
    /// chat lines, which the parser reads member by member anyway, then cost the cache's
    /// key no second reading. Their bodies are then sent in the key's canonical form when
    /// that changes only the order of members and the space between them.
    pub key_forms: bool,
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
            enforce_output_bound: false,
            router: None,
            fallback_models: Vec::new(),
            key_forms: false,
            estimator: TokenEstimator::new(),
        }
    }

    /// The `custom_id` given to a line that has none.
    pub fn derived_custom_id(line: u64) -> String {
        format!("line-{line}")
    }

    /// Parses one line into a request. `line` is 1-based.
    pub fn parse(&self, line: u64, text: &str) -> Result<Request, BadLine> {
        self.parse_chain(line, text, true)
    }

    /// Checks one line and returns its `custom_id`, without estimating tokens or building
    /// the body: the cheap pass that finds every bad line before anything is sent.
    pub fn check(&self, line: u64, text: &str) -> Result<String, BadLine> {
        self.parse_chain(line, text, false).map(|r| r.custom_id)
    }

    /// The line for the default model, and for each fallback model when it uses the
    /// default.
    fn parse_chain(&self, line: u64, text: &str, full: bool) -> Result<Request, BadLine> {
        let (mut first, defaulted) =
            self.parse_inner(line, text, full, self.default_model.as_deref())?;
        if defaulted && !self.fallback_models.is_empty() {
            let mut next: Option<Box<Request>> = None;
            for model in self.fallback_models.iter().rev() {
                let (mut r, _) =
                    self.parse_inner(line, text, full, Some(model))
                        .map_err(|mut bad| {
                            bad.reason = format!("for fallback model {model:?}: {}", bad.reason);
                            bad
                        })?;
                r.metadata = None;
                r.fallback = next;
                next = Some(Box::new(r));
            }
            first.fallback = next;
        }
        Ok(first)
    }

    fn route(&self, model: &str) -> Result<Route, String> {
        match &self.router {
            Some(r) => r.route(model),
            None => Ok(Route {
                target: 0,
                provider: ProviderKind::OpenAi,
                model: model.to_string(),
                price: None,
            }),
        }
    }

    /// One line for one default model; also says whether the default was used.
    fn parse_inner(
        &self,
        line: u64,
        text: &str,
        full: bool,
        default_model: Option<&str>,
    ) -> Result<(Request, bool), BadLine> {
        match self.fast_lane(line, text, full, default_model) {
            Some(fast) => Ok(fast),
            None => self.parse_full(line, text, full, default_model),
        }
    }

    /// [`LineParser::parse_inner`]'s full road: the line as a JSON tree.
    fn parse_full(
        &self,
        line: u64,
        text: &str,
        full: bool,
        default_model: Option<&str>,
    ) -> Result<(Request, bool), BadLine> {
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

        let (shape, mut body) = if obj.contains_key("url") || obj.contains_key("body") {
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
            let shape = match endpoint {
                Endpoint::Embeddings => Shape::Embeddings,
                _ => Shape::Chat,
            };
            match obj.remove("body") {
                Some(Value::Object(b)) => (shape, b),
                _ => return Err(bad(id, Some("body"), "missing or not an object".into())),
            }
        } else if obj.contains_key("params") {
            // Anthropic Message Batches line: sent as it is.
            match obj.remove("params") {
                Some(Value::Object(p)) => (Shape::AnthropicNative, p),
                _ => return Err(bad(id, Some("params"), "must be an object".into())),
            }
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
            (Shape::Chat, obj)
        } else if obj.contains_key("messages") {
            (Shape::Chat, obj)
        } else if obj.contains_key("input") && obj.contains_key("model") {
            (Shape::Embeddings, obj)
        } else {
            return Err(bad(
                id,
                None,
                "unknown shape: expected an OpenAI Batch line (custom_id, method, url, body), \
                 an Anthropic batch line (custom_id, params), a chat body with `messages`, \
                 or {\"prompt\": ...}"
                    .into(),
            ));
        };

        let model_field = if shape == Shape::AnthropicNative {
            "params.model"
        } else {
            "model"
        };
        let mut defaulted = false;
        let named = match body.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            Some(Value::String(_)) | None | Some(Value::Null) => match default_model {
                Some(m) => {
                    defaulted = true;
                    m.to_string()
                }
                None => {
                    return Err(bad(
                        id,
                        Some(model_field),
                        "missing, and no default model is set (pass --model)".into(),
                    ))
                }
            },
            Some(_) => return Err(bad(id, Some(model_field), "must be a string".into())),
        };
        let route = self
            .route(&named)
            .map_err(|reason| bad(id, Some(model_field), reason))?;
        let wrong_provider = |what: &str, want: &str| {
            bad(
                id,
                Some(model_field),
                format!(
                    "{what} go to {want} models only, and {named:?} is a {} model",
                    route.provider
                ),
            )
        };

        let (endpoint, body, input_tokens, max_output_tokens) = match shape {
            Shape::Chat => {
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
                let given = output_bound(&body, &["max_completion_tokens", "max_tokens"])
                    .map_err(|(field, reason)| bad(id, Some(field), reason))?;
                let max_out = given.unwrap_or(self.assumed_output_tokens);
                let input = if full && self.count_tokens {
                    self.estimator.chat_input_tokens(messages)
                } else {
                    0
                };
                if !body.contains_key("model") || body.get("model").is_some_and(Value::is_null) {
                    body.insert("model".into(), Value::String(named.clone()));
                }
                let api = route.provider.api();
                let translation = ChatTranslation {
                    model: &route.model,
                    max_output_tokens: max_out,
                    bound_given: given.is_some(),
                    enforce_bound: self.enforce_output_bound,
                };
                let body = api
                    .translate_chat(body, &translation)
                    .map_err(|(field, reason)| bad(id, Some(&field), reason))?;
                (api.chat_endpoint(), body, input, max_out)
            }
            Shape::Embeddings => {
                if route.provider != ProviderKind::OpenAi {
                    return Err(wrong_provider("embeddings", "OpenAI-compatible"));
                }
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
                if body.get("model").and_then(Value::as_str) != Some(route.model.as_str()) {
                    body.insert("model".into(), Value::String(route.model.clone()));
                }
                (Endpoint::Embeddings, body, tokens, 0)
            }
            Shape::AnthropicNative => {
                if route.provider != ProviderKind::Anthropic {
                    return Err(wrong_provider("Anthropic batch lines", "Anthropic"));
                }
                let max_out = output_bound(&body, &["max_tokens"])
                    .map_err(|(_, reason)| bad(id, Some("params.max_tokens"), reason))?
                    .ok_or_else(|| {
                        bad(
                            id,
                            Some("params.max_tokens"),
                            "missing; Anthropic requires it".into(),
                        )
                    })?;
                let messages = match body.get("messages") {
                    Some(Value::Array(m)) if !m.is_empty() => m,
                    _ => {
                        return Err(bad(
                            id,
                            Some("params.messages"),
                            "missing, empty or not an array".into(),
                        ))
                    }
                };
                let input = if full && self.count_tokens {
                    let system = match body.get("system") {
                        Some(Value::String(s)) => self.estimator.text_tokens(s),
                        Some(v @ Value::Array(_)) => self
                            .estimator
                            .chat_input_tokens(&[serde_json::json!({"content": v})]),
                        _ => 0,
                    };
                    self.estimator.chat_input_tokens(messages) + system
                } else {
                    0
                };
                if body.get("model").and_then(Value::as_str) != Some(route.model.as_str()) {
                    body.insert("model".into(), Value::String(route.model.clone()));
                }
                (Endpoint::Messages, body, input, max_out)
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
        let request = Request {
            custom_id,
            line,
            endpoint,
            target: route.target,
            model: route.model,
            price: route.price,
            body,
            input_tokens,
            max_output_tokens,
            metadata,
            fallback: None,
            key_form: None,
            cache_key: None,
        };
        Ok((request, defaulted))
    }
}

/// The fast lane: the commonest lines (a chat body or an OpenAI Batch chat line, for an
/// OpenAI-compatible model, tokens not counted) read without building a JSON tree. The
/// line's top level (and a Batch line's `body`) is read as members whose values stay text
/// borrowed from the line; `messages` is walked only to check each role; the body sent is
/// the members' text copied as written, less `custom_id` and `metadata`, with `model` set.
///
/// It only ever says yes: anything it does not recognise, or that the full reading would
/// refuse, returns `None` and takes the full road ([`LineParser::parse_full`]), which
/// gives the same request (its body's members in another order) or names the fault.
impl LineParser {
    fn fast_lane(
        &self,
        line: u64,
        text: &str,
        full: bool,
        default_model: Option<&str>,
    ) -> Option<(Request, bool)> {
        if full && self.count_tokens {
            return None; // the token estimator walks the messages as JSON values
        }
        let mut form = (full && self.key_forms).then(|| MessagesForm::new(text));
        let (top, top_roles) = Members::of_line(text, form.as_mut())?;
        let custom_id = match top.get("custom_id") {
            None | Some("null") => LineParser::derived_custom_id(line),
            Some(raw) => string_value(raw).filter(|s| !s.is_empty())?,
        };
        let metadata = match top.get("metadata") {
            None => None,
            // As the full road writes it (compact, members sorted).
            Some(raw) => Some(
                serde_json::value::to_raw_value(&serde_json::from_str::<Value>(raw).ok()?).ok()?,
            ),
        };
        let batch;
        let (body, plain) = if top.get("url").is_some() || top.get("body").is_some() {
            let method = string_value(top.get("method")?)?;
            let url = string_value(top.get("url")?)?;
            if !method.eq_ignore_ascii_case("POST")
                || Endpoint::from_batch_url(&url)? != Endpoint::ChatCompletions
            {
                return None;
            }
            batch = Members::of(top.get("body")?)?;
            (&batch, false)
        } else if top.get("params").is_some() || top.get("prompt").is_some() {
            return None;
        } else {
            (&top, true)
        };
        let mut defaulted = false;
        let named = match body.get("model") {
            None | Some("null" | "\"\"") => {
                defaulted = true;
                default_model?.to_string()
            }
            Some(raw) => string_value(raw).filter(|s| !s.is_empty())?,
        };
        let route = self.route(&named).ok()?;
        if route.provider != ProviderKind::OpenAi {
            return None; // translated from a JSON tree
        }
        let roles = match plain {
            true => body.get("messages").is_some() && top_roles,
            false => {
                if let Some(f) = form.as_mut() {
                    f.clear();
                }
                roles_checked(body.get("messages")?, form.as_mut())
            }
        };
        if !roles {
            return None;
        }
        let mut given = None;
        for field in ["max_completion_tokens", "max_tokens"] {
            match body.get(field) {
                None | Some("null") => {}
                Some(raw) => {
                    // What `Value::as_u64` takes: digits only (JSON has no leading zeros).
                    if !raw.bytes().all(|c| c.is_ascii_digit()) {
                        return None;
                    }
                    let n: u64 = raw.parse().ok()?;
                    if n == 0 || n > u64::from(u32::MAX) {
                        return None;
                    }
                    given = Some(n as u32);
                    break;
                }
            }
        }
        let max_output_tokens = given.unwrap_or(self.assumed_output_tokens);
        let mut key_form = None;
        let body = if full {
            let model = serde_json::to_string(&route.model).expect("a string serialises");
            let bound = (self.enforce_output_bound && given.is_none())
                .then(|| max_output_tokens.to_string());
            // The body's members: the model first when the line names none (the route's
            // in place of the line's when it does), the output bound last.
            let members = || {
                // With whether each value is written as the key form writes it (the model
                // is when serde_json escaped nothing in it).
                let model_plain = model.len() == route.model.len() + 2;
                let model = model.as_bytes();
                let head = (body.get("model").is_none()).then_some(("model", model, model_plain));
                head.into_iter()
                    .chain(
                        body.0
                            .iter()
                            .filter_map(move |&(key, raw, written)| match key {
                                "custom_id" | "metadata" if plain => None,
                                "model" => Some((key, model, model_plain)),
                                _ => Some((key, raw.as_bytes(), written)),
                            }),
                    )
                    .chain(
                        bound
                            .as_deref()
                            .map(|b| ("max_completion_tokens", b.as_bytes(), true)),
                    )
            };
            let mut out = Vec::with_capacity(text.len() + route.model.len());
            if let Some(form) = &form {
                key_form = crate::cache::write_body(text, members(), Some(form), &mut out);
            }
            if !matches!(key_form, Some(KeyForm::Body(_))) {
                out.clear();
                out.push(b'{');
                for (key, value, _) in members() {
                    if out.len() > 1 {
                        out.push(b',');
                    }
                    serde_json::to_writer(&mut out, key).expect("a string serialises");
                    out.push(b':');
                    out.extend_from_slice(value);
                }
                out.push(b'}');
            }
            Bytes::from(out)
        } else {
            Bytes::new()
        };
        let input_tokens = (body.len() / 4) as u32;
        let request = Request {
            custom_id,
            line,
            endpoint: Endpoint::ChatCompletions,
            target: route.target,
            model: route.model,
            price: route.price,
            body,
            input_tokens,
            max_output_tokens,
            metadata,
            fallback: None,
            key_form,
            cache_key: None,
        };
        Some((request, defaulted))
    }
}

/// A JSON object's members in order, each value's text borrowed from the line, and whether
/// it is written as the cache's key form writes it (see [`crate::json::walk_plain`]).
struct Members<'a>(Vec<(&'a str, &'a str, bool)>);

impl<'a> Members<'a> {
    /// The members of `text` when it is a JSON object whose member names are written
    /// without escapes and are all different (the full road reads the rest).
    fn of(text: &'a str) -> Option<Members<'a>> {
        let mut members = Vec::with_capacity(8);
        crate::json::walk_plain(text, false, 1, |depth, name, value, plain| {
            if let (1, Some(name)) = (depth, name) {
                members.push((name, value, plain));
            }
        })
        .ok()?
        .starts_with('{')
        .then_some(())?;
        Members::checked(members)
    }

    /// [`Members::of`] for a whole line, strict about numbers (the JSON tree refuses one
    /// too big for an f64, the walker need not), and in the same walk whether a top-level
    /// `messages` passes [`roles_checked`].
    /// When `form` is given, it gets the messages of a top-level `messages`.
    fn of_line(
        text: &'a str,
        mut form: Option<&mut MessagesForm<'a>>,
    ) -> Option<(Members<'a>, bool)> {
        let mut members = Vec::with_capacity(8);
        let mut roles = Roles::default();
        let mut checked = false;
        crate::json::walk_plain(text, true, 3, |depth, name, value, plain| {
            match (depth, name) {
                // Inside a top-level member: the members of its elements, then its elements.
                (3, Some(name)) => roles.member_to(form.as_deref_mut(), name, value, plain),
                (2, None) => roles.message_to(form.as_deref_mut(), value),
                (1, Some(name)) => {
                    if name == "messages" {
                        checked = roles.passed(value);
                        // Kept: what comes after is not the messages'.
                        form = None;
                    } else if let Some(f) = form.as_deref_mut() {
                        f.clear();
                    }
                    members.push((name, value, plain));
                    roles = Roles::default();
                }
                _ => {}
            }
        })
        .ok()?
        .starts_with('{')
        .then_some(())?;
        let m = Members::checked(members)?;
        Some((m, checked))
    }

    fn checked(m: Vec<(&'a str, &'a str, bool)>) -> Option<Members<'a>> {
        let plain = m.iter().all(|(k, _, _)| !k.contains('\\'));
        let unique = (1..m.len()).all(|i| m[..i].iter().all(|(k, _, _)| *k != m[i].0));
        (plain && unique).then_some(Members(m))
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        self.0
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, v, _)| *v)
    }
}

/// The string a JSON value's text holds, when it is a string.
fn string_value(raw: &str) -> Option<String> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        serde_json::from_str(raw).ok()
    } else {
        Some(inner.to_string())
    }
}

/// Whether a `messages` array's text is not empty and every element is an object with one
/// `role` (written without escapes) that is a string.
/// When `form` is given, it gets the messages.
fn roles_checked<'a>(raw: &'a str, mut form: Option<&mut MessagesForm<'a>>) -> bool {
    let mut roles = Roles::default();
    let walked = crate::json::walk_plain(raw, false, 2, |depth, name, value, plain| {
        match (depth, name) {
            (2, Some(name)) => roles.member_to(form.as_deref_mut(), name, value, plain),
            (1, None) => roles.message_to(form.as_deref_mut(), value),
            _ => {}
        }
    });
    walked.is_ok_and(|v| roles.passed(v))
}

/// The check of [`roles_checked`], fed by a walk: each message's members, then the
/// message as it ends, then the array.
struct Roles {
    /// Every message so far passed.
    ok: bool,
    /// Messages so far.
    messages: usize,
    /// `role` members of the message being read, and whether the last was a string.
    roles: usize,
    string: bool,
}

impl Default for Roles {
    fn default() -> Self {
        Roles {
            ok: true,
            messages: 0,
            roles: 0,
            string: false,
        }
    }
}

impl Roles {
    /// A member of a message: its role, or a name that might be one (written with escapes).
    fn member(&mut self, name: &str, value: &str) {
        if name == "role" {
            self.roles += 1;
            self.string = value.starts_with('"');
        } else {
            self.ok &= !name.contains('\\');
        }
    }

    /// A message, as it ends.
    fn message(&mut self, value: &str) {
        self.ok &= value.starts_with('{') && self.roles == 1 && self.string;
        self.messages += 1;
        (self.roles, self.string) = (0, false);
    }

    /// [`Roles::member`], and the member to `form` when one is written (`plain`: see
    /// [`MessagesForm::member`]).
    #[inline]
    fn member_to<'a>(
        &mut self,
        form: Option<&mut MessagesForm<'a>>,
        name: &'a str,
        value: &'a str,
        plain: bool,
    ) {
        self.member(name, value);
        if let Some(f) = form {
            f.member(name, value, plain);
        }
    }

    /// [`Roles::message`], and the message's end to `form` when one is written.
    #[inline]
    fn message_to(&mut self, form: Option<&mut MessagesForm<'_>>, value: &str) {
        self.message(value);
        if let Some(f) = form {
            f.message_end();
        }
    }

    /// Whether the array `value` whose messages were fed passes.
    fn passed(&self, value: &str) -> bool {
        value.starts_with('[') && self.ok && self.messages > 0
    }
}

/// The input shapes, once recognised.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Chat,
    Embeddings,
    AnthropicNative,
}

/// Reads the first of `fields` (an output bound) that a body sets.
fn output_bound(
    body: &Map<String, Value>,
    fields: &[&'static str],
) -> Result<Option<u32>, (&'static str, String)> {
    for &field in fields {
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

    fn routed() -> LineParser {
        let mut p = LineParser::new(Some("claude-haiku-4-5".into()));
        p.router = Some(Arc::new(Router::new(
            crate::catalog::Catalog::builtin(),
            crate::catalog::RouterOptions::default(),
        )));
        p
    }

    #[test]
    fn one_line_in_each_wire_format() {
        let p = routed();
        let line = r#"{"custom_id":"x","prompt":"Name a colour.","system":"Be brief.","max_tokens":20,"temperature":0.5,"stop":["\n"]}"#;
        let r = p.parse(1, line).unwrap();
        assert_eq!(
            (r.endpoint, r.model.as_str()),
            (Endpoint::Messages, "claude-haiku-4-5")
        );
        assert_eq!(r.price.unwrap().input_per_mtok, 1.0);
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"model": "claude-haiku-4-5", "system": "Be brief.",
                "messages": [{"role": "user", "content": "Name a colour."}],
                "max_tokens": 20, "temperature": 0.5, "stop_sequences": ["\n"]})
        );

        let gemini = line.replacen('{', r#"{"model":"gemini-2.5-flash","#, 1);
        let r = p.parse(2, &gemini).unwrap();
        assert_eq!(
            (r.endpoint, r.model.as_str()),
            (Endpoint::GenerateContent, "gemini-2.5-flash")
        );
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"contents": [{"role": "user", "parts": [{"text": "Name a colour."}]}],
                "systemInstruction": {"parts": [{"text": "Be brief."}]},
                "generationConfig": {"maxOutputTokens": 20, "temperature": 0.5, "stopSequences": ["\n"]}})
        );

        let openai = line.replacen('{', r#"{"model":"openai:gpt-4.1-mini","#, 1);
        let r = p.parse(3, &openai).unwrap();
        assert_eq!(
            (r.endpoint, r.model.as_str()),
            (Endpoint::ChatCompletions, "gpt-4.1-mini")
        );
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["model"], "gpt-4.1-mini");
        assert_eq!(
            body["messages"][0],
            serde_json::json!({"role": "system", "content": "Be brief."})
        );
        assert_eq!(body["stop"], serde_json::json!(["\n"]));
        // Each provider is its own target.
        let targets = p.router.as_ref().unwrap().targets();
        assert_eq!(targets.len(), 3);
    }

    #[test]
    fn anthropic_native_lines_pass_through_untranslated() {
        let p = routed();
        let line = r#"{"custom_id":"n1","params":{"model":"claude-sonnet-4-5","max_tokens":50,"system":[{"type":"text","text":"Terse.","cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":"hi"}],"top_k":5}}"#;
        let r = p.parse(1, line).unwrap();
        assert_eq!(
            (r.custom_id.as_str(), r.endpoint),
            ("n1", Endpoint::Messages)
        );
        assert_eq!(r.max_output_tokens, 50);
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        let want: Value = serde_json::from_str(line).unwrap();
        assert_eq!(body, want["params"]);
        assert!(r.input_tokens > 4);
    }

    #[test]
    fn enforced_bound_is_sent_to_every_provider() {
        let mut p = routed();
        p.enforce_output_bound = true;
        p.assumed_output_tokens = 77;
        for (model, path) in [
            ("gpt-4.1-mini", "/max_completion_tokens"),
            ("gemini-2.5-flash", "/generationConfig/maxOutputTokens"),
            ("claude-haiku-4-5", "/max_tokens"),
        ] {
            let r = p
                .parse(1, &format!(r#"{{"model":"{model}","prompt":"hi"}}"#))
                .unwrap();
            let body: Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(
                body.pointer(path),
                Some(&Value::from(77)),
                "{model}: {body}"
            );
            assert_eq!(r.max_output_tokens, 77);
        }
    }

    #[test]
    fn routing_errors_name_the_field() {
        let p = routed();
        for (text, field, reason) in [
            (
                r#"{"model":"mistral:large","prompt":"x"}"#,
                "model",
                "unknown provider",
            ),
            (
                r#"{"model":"claude-haiku-4-5","input":"x"}"#,
                "model",
                "OpenAI-compatible models only",
            ),
            (
                r#"{"custom_id":"a","params":{"model":"gpt-4.1","max_tokens":5,"messages":[{"role":"user","content":"x"}]}}"#,
                "params.model",
                "Anthropic models only",
            ),
            (
                r#"{"custom_id":"a","params":{"messages":[{"role":"user","content":"x"}]}}"#,
                "params.max_tokens",
                "requires",
            ),
            (
                r#"{"custom_id":"a","params":{"max_tokens":5}}"#,
                "params.messages",
                "missing",
            ),
            (
                r#"{"prompt":"x","temperature":1.7}"#,
                "temperature",
                "0 to 1",
            ),
            (
                r#"{"model":"gemini-2.5-pro","prompt":"x","logprobs":true}"#,
                "logprobs",
                "Gemini",
            ),
        ] {
            let err = p.parse(7, text).unwrap_err();
            assert_eq!(err.field.as_deref(), Some(field), "{text}: {err}");
            assert!(err.reason.contains(reason), "{text}: {err}");
            assert_eq!(p.check(7, text).unwrap_err(), err, "check finds it too");
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

    /// Lines for the fast lane: the ones it must take, and the ones it must leave to the
    /// full road (which refuses some of them and reads the rest differently).
    const LANE_LINES: &[&str] = &[
        r#"{"custom_id":"a","model":"gpt-4.1-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":64}"#,
        r#"{"messages":[{"role":"system","content":"x"},{"content":"y","role":"user"}],"temperature":0.2}"#,
        r#"{"custom_id":"b","method":"post","url":"/v1/chat/completions","body":{"model":"gpt-4.1","messages":[{"role":"user","content":"a \"quoted\" \u00e9 word"}],"max_completion_tokens":5,"max_tokens":9}}"#,
        r#" { "custom_id" : "c" , "model" : "" , "messages" : [ { "role" : "user" , "content" : [ {"type":"text","text":"t"} ] } ] , "metadata" : { "z" : 1 , "a" : [ 2 ] } } "#,
        r#"{"custom_id":null,"model":null,"messages":[{"role":"user","content":"x"}],"max_tokens":null,"max_completion_tokens":null,"stop":["\n","}"]}"#,
        r#"{"custom_id":"d","body":{"messages":[{"role":"user","content":"x"}]},"url":"/v1/chat/completions","method":"POST","metadata":null}"#,
        r#"{"custom_id":"e\u0301\\\"","model":"gpt\u002d4.1-mini","messages":[{"role":"user","content":"x"}],"max_tokens":4294967295}"#,
        r#"{"model":"m","messages":[{"role":"user"}],"temperature":1.5E+3,"n":-0.25e-400}"#,
        // Left to the full road.
        r#"{"model":"m","messages":[{"role":"user"}],"temperature":1e400}"#,
        r#"{"custom_id":"e","model":"m","messages":[{"role":"user","content":"x"}],"model":"n"}"#,
        r#"{"custom_i\u0064":"f","model":"m","messages":[{"role":"user","content":"x"}]}"#,
        r#"{"model":"m","messages":[{"role":"user","role":"assistant","content":"x"}]}"#,
        r#"{"model":"m","messages":[["role","user"]]}"#,
        r#"{"model":"m","messages":[{"role":7}]}"#,
        r#"{"model":"m","messages":[{"content":"x"}]}"#,
        r#"{"model":"m","messages":[]}"#,
        r#"{"model":"m","messages":{"role":"user"}}"#,
        r#"{"model":"m","messages":[{"role":"user"}],"max_tokens":0}"#,
        r#"{"model":"m","messages":[{"role":"user"}],"max_tokens":4294967296}"#,
        r#"{"model":"m","messages":[{"role":"user"}],"max_tokens":64.0}"#,
        r#"{"model":"m","messages":[{"role":"user"}],"max_tokens":"64"}"#,
        r#"{"model":7,"messages":[{"role":"user"}]}"#,
        r#"{"custom_id":"","model":"m","messages":[{"role":"user"}]}"#,
        r#"{"custom_id":5,"model":"m","messages":[{"role":"user"}]}"#,
        r#"{"model":"m","messages":[{"role":"user"}]} x"#,
        r#"{"model":"m","messages":[{"role":"user"}],"prompt":"p"}"#,
        r#"{"prompt":"p","model":"m"}"#,
        r#"{"custom_id":"g","method":"GET","url":"/v1/chat/completions","body":{"model":"m","messages":[{"role":"user"}]}}"#,
        r#"{"custom_id":"h","method":"POST","url":"/v1/embeddings","body":{"model":"m","input":"x"}}"#,
        r#"{"custom_id":"i","method":"POST","url":"/v1/chat/completions","body":[1]}"#,
        r#"{"custom_id":"j","url":"/v1/chat/completions","body":{"model":"m","messages":[{"role":"user"}]}}"#,
        r#"{"custom_id":"k","params":{"model":"claude-haiku-4-5","max_tokens":5,"messages":[{"role":"user","content":"x"}]}}"#,
        r#"{"model":"claude-haiku-4-5","messages":[{"role":"user","content":"x"}]}"#,
        r#"{"model":"text-embedding-3-small","input":"x"}"#,
        r#"[{"model":"m","messages":[{"role":"user"}]}]"#,
        r#"{"model":"m","messages":[{"role":"user"}"#,
    ];

    /// Whatever the fast lane takes, the full road takes too and reads as the same request
    /// (the body's members may come in another order); the commonest lines take the lane.
    #[test]
    fn fast_lane_agrees_with_the_full_road() {
        let mut parsers = Vec::new();
        for default in [None, Some("gpt-4.1-mini")] {
            for enforce in [false, true] {
                let mut p = LineParser::new(default.map(str::to_owned));
                p.count_tokens = false;
                p.enforce_output_bound = enforce;
                parsers.push(p);
            }
        }
        let mut r = routed();
        r.count_tokens = false;
        parsers.push(r);
        let mut taken = vec![0; LANE_LINES.len()];
        for p in &parsers {
            let default = p.default_model.as_deref();
            for (i, text) in LANE_LINES.iter().enumerate() {
                for full in [false, true] {
                    let line = i as u64 + 1;
                    let Some((fast, fast_defaulted)) = p.fast_lane(line, text, full, default)
                    else {
                        continue;
                    };
                    taken[i] += 1;
                    let (slow, slow_defaulted) = p
                        .parse_full(line, text, full, default)
                        .unwrap_or_else(|e| panic!("lane took {text}; the full road says {e}"));
                    assert_eq!(fast_defaulted, slow_defaulted, "{text}");
                    assert_eq!(
                        (&fast.custom_id, fast.line, fast.endpoint, fast.target),
                        (&slow.custom_id, slow.line, slow.endpoint, slow.target),
                        "{text}"
                    );
                    assert_eq!(fast.model, slow.model, "{text}");
                    assert_eq!(fast.max_output_tokens, slow.max_output_tokens, "{text}");
                    assert_eq!(
                        fast.metadata.as_ref().map(|m| m.get()),
                        slow.metadata.as_ref().map(|m| m.get()),
                        "{text}"
                    );
                    assert_eq!(fast.body.is_empty(), !full);
                    if full {
                        let a: Value = serde_json::from_slice(&fast.body).unwrap();
                        let b: Value = serde_json::from_slice(&slow.body).unwrap();
                        assert_eq!(a, b, "{text}");
                        assert_eq!(fast.input_tokens as usize, fast.body.len() / 4);
                    } else {
                        assert_eq!(fast.input_tokens, 0);
                    }
                }
            }
        }
        let must_take = 8;
        for (i, n) in taken.iter().enumerate() {
            if i < must_take {
                // Lines 1, 2, 5 and 6 need a default model where they name none.
                assert!(*n >= 4, "line {} took the lane {n} times", i + 1);
            } else if LANE_LINES[i].starts_with(r#"{"model":"claude"#) {
                // Only where no router sends it to Anthropic (all but the last parser).
                assert_eq!(*n, 8, "{}", LANE_LINES[i]);
            } else {
                assert_eq!(*n, 0, "{} took the lane", LANE_LINES[i]);
            }
        }
        // Numbers too big for an f64: the tree refuses them, so the lane leaves them.
        let p = &parsers[1];
        let digits = "9".repeat(400);
        for text in [
            format!(r#"{{"model":"m","messages":[{{"role":"user"}}],"n":{digits}}}"#),
            r#"{"model":"m","messages":[{"role":"user"}],"n":1e400}"#.to_string(),
        ] {
            assert!(p.fast_lane(1, &text, true, None).is_none(), "{text}");
            assert!(p.parse_full(1, &text, true, None).is_err(), "{text}");
        }
        // The token estimator needs the full road.
        let p = LineParser::new(Some("gpt-4.1-mini".into()));
        assert!(p.fast_lane(1, LANE_LINES[0], true, None).is_none());
        assert!(p.fast_lane(1, LANE_LINES[0], false, None).is_some());
    }
}
