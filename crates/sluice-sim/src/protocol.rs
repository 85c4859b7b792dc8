//! Wire formats: request validation and response bodies for the OpenAI and Anthropic
//! endpoints, following the official OpenAPI specs in `shared/specs/`, and for Gemini's
//! `generateContent`, following Google's REST reference (its error messages are those the
//! real API gives for the same mistakes).

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::hash::{combine, hash_bytes};
use crate::limiter::Cost;
use crate::text::{draw_length, push_words, text_tokens, word_pieces};
use crate::SimConfig;

/// Which provider's wire format a request speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Provider {
    OpenAi,
    Anthropic,
    Gemini,
}

/// What is wrong with a request.
#[derive(Clone, Debug)]
pub(crate) enum Problem {
    InvalidJson,
    Missing,
    InvalidType(&'static str),
    TooSmall(i64, i64),
    Empty,
    InvalidValue(String),
    /// A field the API does not know.
    Unknown,
}

/// A validation error; rendered in the provider's error shape by [`ApiError::body`].
#[derive(Clone, Debug)]
pub(crate) struct ApiError {
    pub field: String,
    pub problem: Problem,
}

fn err(field: impl Into<String>, problem: Problem) -> ApiError {
    ApiError {
        field: field.into(),
        problem,
    }
}

impl ApiError {
    /// The 400 body in `provider`'s shape.
    pub fn body(&self, provider: Provider) -> Bytes {
        let f = &self.field;
        match provider {
            Provider::OpenAi => {
                let (message, code) = match &self.problem {
                    Problem::InvalidJson => (
                        "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)".to_string(),
                        None,
                    ),
                    Problem::Missing => (
                        format!("Missing required parameter: '{f}'."),
                        Some("missing_required_parameter"),
                    ),
                    Problem::InvalidType(t) => (
                        format!("Invalid type for '{f}': expected {t}."),
                        Some("invalid_type"),
                    ),
                    Problem::TooSmall(min, got) => (
                        format!("Invalid '{f}': integer below minimum value. Expected a value >= {min}, but got {got} instead."),
                        Some("integer_below_min_value"),
                    ),
                    Problem::Empty => (
                        format!("Invalid '{f}': empty array. Expected an array with minimum length 1, but got an empty array instead."),
                        Some("empty_array"),
                    ),
                    Problem::InvalidValue(m) => (
                        format!("Invalid value for '{f}': {m}"),
                        Some("invalid_value"),
                    ),
                    Problem::Unknown => (
                        format!("Unrecognized request argument supplied: {f}"),
                        None,
                    ),
                };
                let param = if f.is_empty() { None } else { Some(f.as_str()) };
                openai_error(&message, "invalid_request_error", param, code)
            }
            Provider::Anthropic => {
                let message = match &self.problem {
                    Problem::InvalidJson => {
                        "There was an error parsing the body: invalid JSON".to_string()
                    }
                    Problem::Missing => format!("{f}: Field required"),
                    Problem::InvalidType(t) => format!("{f}: Input should be {t}"),
                    Problem::TooSmall(min, _) => {
                        format!("{f}: Input should be greater than or equal to {min}")
                    }
                    Problem::Empty => {
                        format!("{f}: List should have at least 1 item after validation, not 0")
                    }
                    Problem::InvalidValue(m) => format!("{f}: {m}"),
                    Problem::Unknown => format!("{f}: Extra inputs are not permitted"),
                };
                anthropic_error("invalid_request_error", &message)
            }
            Provider::Gemini => {
                let message = match &self.problem {
                    Problem::InvalidJson => {
                        "Invalid JSON payload received. Unexpected token.".to_string()
                    }
                    Problem::Unknown => format!(
                        "Invalid JSON payload received. Unknown name \"{}\" at '{}': Cannot find field.",
                        f.rsplit('.').next().unwrap_or(f),
                        f.rsplit_once('.').map_or("", |(p, _)| p)
                    ),
                    Problem::Missing => format!("* GenerateContentRequest.{f}: {f} is not specified"),
                    Problem::InvalidType(t) => format!(
                        "Invalid value at '{f}': expected {t}"
                    ),
                    Problem::TooSmall(min, got) => format!(
                        "* GenerateContentRequest.{f}: must be at least {min}, got {got}"
                    ),
                    Problem::Empty => format!("* GenerateContentRequest.{f}: must not be empty"),
                    Problem::InvalidValue(m) => format!("* GenerateContentRequest.{f}: {m}"),
                };
                gemini_error(400, "INVALID_ARGUMENT", &message, None)
            }
        }
    }
}

/// `{"error":{"message","type","param","code"}}`.
pub(crate) fn openai_error(
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Bytes {
    #[derive(Serialize)]
    struct Inner<'a> {
        message: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
        param: Option<&'a str>,
        code: Option<&'a str>,
    }
    #[derive(Serialize)]
    struct Outer<'a> {
        error: Inner<'a>,
    }
    to_bytes(&Outer {
        error: Inner {
            message,
            kind,
            param,
            code,
        },
    })
}

/// `{"type":"error","error":{"type","message"}}`.
pub(crate) fn anthropic_error(kind: &str, message: &str) -> Bytes {
    #[derive(Serialize)]
    struct Inner<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        message: &'a str,
    }
    #[derive(Serialize)]
    struct Outer<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        error: Inner<'a>,
    }
    to_bytes(&Outer {
        kind: "error",
        error: Inner { kind, message },
    })
}

/// `{"error":{"code","message","status","details"?}}`, Google's error shape.
pub(crate) fn gemini_error(
    code: u16,
    status: &str,
    message: &str,
    details: Option<Value>,
) -> Bytes {
    let mut error = serde_json::json!({"code": code, "message": message, "status": status});
    if let Some(d) = details {
        error["details"] = d;
    }
    to_bytes(&serde_json::json!({ "error": error }))
}

pub(crate) fn to_bytes<T: Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

// ---------------------------------------------------------------------------------------
// Validation helpers

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(err("", Problem::InvalidJson)),
        Err(_) => Err(err("", Problem::InvalidJson)),
    }
}

fn req_str<'a>(obj: &'a Map<String, Value>, f: &str) -> Result<&'a str, ApiError> {
    match obj.get(f) {
        None | Some(Value::Null) => Err(err(f, Problem::Missing)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(err(f, Problem::InvalidType("a valid string"))),
    }
}

fn opt_int(obj: &Map<String, Value>, f: &str, min: i64, max: i64) -> Result<Option<u32>, ApiError> {
    match obj.get(f) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) if i < min => Err(err(f, Problem::TooSmall(min, i))),
            Some(i) => Ok(Some(i.min(max) as u32)),
            None => Err(err(f, Problem::InvalidType("a valid integer"))),
        },
        Some(_) => Err(err(f, Problem::InvalidType("a valid integer"))),
    }
}

fn opt_bool(obj: &Map<String, Value>, f: &str) -> Result<bool, ApiError> {
    match obj.get(f) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(err(f, Problem::InvalidType("a valid boolean"))),
    }
}

fn req_array<'a>(obj: &'a Map<String, Value>, f: &str) -> Result<&'a Vec<Value>, ApiError> {
    match obj.get(f) {
        None | Some(Value::Null) => Err(err(f, Problem::Missing)),
        Some(Value::Array(a)) if a.is_empty() => Err(err(f, Problem::Empty)),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(err(f, Problem::InvalidType("a valid array"))),
    }
}

/// Tokens of a `content` value: a string, or an array of parts/blocks with `text`.
fn content_tokens(v: &Value, field: &str, required: bool) -> Result<u64, ApiError> {
    match v {
        Value::String(s) => Ok(text_tokens(s)),
        Value::Null if !required => Ok(0),
        Value::Array(parts) => {
            let mut t = 0;
            for (i, p) in parts.iter().enumerate() {
                let Value::Object(p) = p else {
                    return Err(err(
                        format!("{field}[{i}]"),
                        Problem::InvalidType("a valid object"),
                    ));
                };
                if !matches!(p.get("type"), Some(Value::String(_))) {
                    return Err(err(format!("{field}[{i}].type"), Problem::Missing));
                }
                if let Some(Value::String(s)) = p.get("text") {
                    t += text_tokens(s);
                }
            }
            Ok(t)
        }
        Value::Null => Err(err(field, Problem::Missing)),
        _ => Err(err(field, Problem::InvalidType("a valid string or array"))),
    }
}

// ---------------------------------------------------------------------------------------
// Parsed requests

/// A validated request, ready to be charged and answered.
#[derive(Debug)]
pub(crate) enum Parsed {
    Chat {
        model: String,
        prompt: u64,
        max_out: Option<u32>,
        n: u32,
        stream: bool,
        include_usage: bool,
    },
    Embeddings {
        model: String,
        /// Per input: a hash of its content and its token count.
        inputs: Vec<(u64, u64)>,
        dims: Option<usize>,
        base64: bool,
    },
    Messages {
        model: String,
        input: u64,
        max_tokens: u32,
        stream: bool,
    },
    Generate {
        model: String,
        input: u64,
        max_out: Option<u32>,
        candidates: u32,
    },
}

/// A generated successful response.
pub(crate) struct Generated {
    /// The body, in pieces: one piece for JSON, one per event for SSE.
    pub segments: Vec<Bytes>,
    /// Whether the body is SSE.
    pub stream: bool,
    pub prompt: u64,
    pub completion: u64,
}

impl Generated {
    pub fn concat(&self) -> Bytes {
        if self.segments.len() == 1 {
            return self.segments[0].clone();
        }
        let len = self.segments.iter().map(|s| s.len()).sum();
        let mut v = Vec::with_capacity(len);
        for s in &self.segments {
            v.extend_from_slice(s);
        }
        Bytes::from(v)
    }
}

pub(crate) fn parse_chat(body: &[u8]) -> Result<Parsed, ApiError> {
    let obj = parse_object(body)?;
    let model = req_str(&obj, "model")?.to_string();
    let messages = req_array(&obj, "messages")?;
    let mut prompt = 3;
    for (i, m) in messages.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(err(
                format!("messages[{i}]"),
                Problem::InvalidType("a valid object"),
            ));
        };
        req_str(m, "role").map_err(|e| err(format!("messages[{i}].{}", e.field), e.problem))?;
        let content = m.get("content").unwrap_or(&Value::Null);
        prompt += 4 + content_tokens(content, &format!("messages[{i}].content"), false)?;
    }
    let max_out = match opt_int(&obj, "max_completion_tokens", 1, u32::MAX as i64)? {
        Some(m) => Some(m),
        None => opt_int(&obj, "max_tokens", 1, u32::MAX as i64)?,
    };
    let n = opt_int(&obj, "n", 1, 128)?.unwrap_or(1);
    let stream = opt_bool(&obj, "stream")?;
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => opt_bool(o, "include_usage")
            .map_err(|e| err(format!("stream_options.{}", e.field), e.problem))?,
        Some(_) => {
            return Err(err(
                "stream_options",
                Problem::InvalidType("a valid object"),
            ))
        }
    };
    Ok(Parsed::Chat {
        model,
        prompt,
        max_out,
        n,
        stream,
        include_usage,
    })
}

fn token_array(a: &[Value]) -> Option<Vec<u8>> {
    let mut bytes = Vec::with_capacity(a.len() * 4);
    for v in a {
        let t = v.as_u64()?;
        bytes.extend_from_slice(&(t as u32).to_le_bytes());
    }
    Some(bytes)
}

pub(crate) fn parse_embeddings(body: &[u8]) -> Result<Parsed, ApiError> {
    let obj = parse_object(body)?;
    let model = req_str(&obj, "model")?.to_string();
    // Inputs are keyed by content only (seeded later), so the same text gets the same
    // vector whatever request it arrives in. Token inputs get a distinct key space.
    let text = |s: &str| (hash_bytes(1, s.as_bytes()), text_tokens(s));
    let tokens = |b: Vec<u8>| (hash_bytes(2, &b), (b.len() / 4) as u64);
    let bad = || {
        err("input", Problem::InvalidType("a string, an array of strings, an array of integers, or an array of arrays of integers"))
    };
    let inputs = match obj.get("input") {
        None | Some(Value::Null) => return Err(err("input", Problem::Missing)),
        Some(Value::String(s)) => vec![text(s)],
        Some(Value::Array(a)) if a.is_empty() => return Err(err("input", Problem::Empty)),
        Some(Value::Array(a)) => match &a[0] {
            Value::String(_) => a
                .iter()
                .map(|v| v.as_str().map(text).ok_or_else(bad))
                .collect::<Result<Vec<_>, _>>()?,
            Value::Number(_) => vec![tokens(token_array(a).ok_or_else(bad)?)],
            Value::Array(_) => a
                .iter()
                .map(|v| {
                    v.as_array()
                        .filter(|x| !x.is_empty())
                        .and_then(|x| token_array(x))
                        .map(tokens)
                        .ok_or_else(bad)
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => return Err(bad()),
        },
        Some(_) => return Err(bad()),
    };
    if inputs.len() > 2048 {
        return Err(err(
            "input",
            Problem::InvalidValue("at most 2048 inputs are allowed".into()),
        ));
    }
    let dims = opt_int(&obj, "dimensions", 1, 16384)?.map(|d| d as usize);
    let base64 = match obj.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) if s == "float" => false,
        Some(Value::String(s)) if s == "base64" => true,
        Some(_) => {
            return Err(err(
                "encoding_format",
                Problem::InvalidValue("expected 'float' or 'base64'".into()),
            ))
        }
    };
    Ok(Parsed::Embeddings {
        model,
        inputs,
        dims,
        base64,
    })
}

/// The top-level fields of Anthropic's `CreateMessageParams` (its spec forbids others).
const MESSAGES_FIELDS: [&str; 18] = [
    "cache_control",
    "container",
    "inference_geo",
    "max_tokens",
    "messages",
    "metadata",
    "model",
    "output_config",
    "service_tier",
    "stop_sequences",
    "stream",
    "system",
    "temperature",
    "thinking",
    "tool_choice",
    "tools",
    "top_k",
    "top_p",
];

pub(crate) fn parse_messages(body: &[u8]) -> Result<Parsed, ApiError> {
    let obj = parse_object(body)?;
    if let Some(extra) = obj.keys().find(|k| !MESSAGES_FIELDS.contains(&k.as_str())) {
        return Err(err(extra.as_str(), Problem::Unknown));
    }
    let model = req_str(&obj, "model")?.to_string();
    let max_tokens = match opt_int(&obj, "max_tokens", 1, u32::MAX as i64)? {
        Some(m) => m,
        None => return Err(err("max_tokens", Problem::Missing)),
    };
    let messages = req_array(&obj, "messages")?;
    let mut input = 3;
    for (i, m) in messages.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(err(
                format!("messages.{i}"),
                Problem::InvalidType("a valid dictionary"),
            ));
        };
        let role = req_str(m, "role").map_err(|e| err(format!("messages.{i}.role"), e.problem))?;
        if role != "user" && role != "assistant" {
            return Err(err(
                format!("messages.{i}.role"),
                Problem::InvalidValue("Input should be 'user' or 'assistant'".into()),
            ));
        }
        let content = m.get("content").unwrap_or(&Value::Null);
        input += 4 + content_tokens(content, &format!("messages.{i}.content"), true)?;
    }
    match obj.get("system") {
        None | Some(Value::Null) => {}
        Some(v) => input += content_tokens(v, "system", false)?,
    }
    let stream = opt_bool(&obj, "stream")?;
    Ok(Parsed::Messages {
        model,
        input,
        max_tokens,
        stream,
    })
}

const GENERATE_FIELDS: [&str; 8] = [
    "contents",
    "systemInstruction",
    "generationConfig",
    "safetySettings",
    "tools",
    "toolConfig",
    "cachedContent",
    "labels",
];

const GENERATION_CONFIG_FIELDS: [&str; 19] = [
    "stopSequences",
    "responseMimeType",
    "responseSchema",
    "responseJsonSchema",
    "responseModalities",
    "candidateCount",
    "maxOutputTokens",
    "temperature",
    "topP",
    "topK",
    "seed",
    "presencePenalty",
    "frequencyPenalty",
    "responseLogprobs",
    "logprobs",
    "thinkingConfig",
    "mediaResolution",
    "speechConfig",
    "enableEnhancedCivicAnswers",
];

/// The data fields of a `Part`: exactly one must be set.
const PART_FIELDS: [&str; 7] = [
    "text",
    "inlineData",
    "fileData",
    "functionCall",
    "functionResponse",
    "executableCode",
    "codeExecutionResult",
];

/// Tokens of a `Content`'s `parts` (text only), after checking them.
fn gemini_parts(v: Option<&Value>, field: &str) -> Result<u64, ApiError> {
    let parts = match v {
        None | Some(Value::Null) => return Err(err(format!("{field}.parts"), Problem::Empty)),
        Some(Value::Array(p)) if p.is_empty() => {
            return Err(err(format!("{field}.parts"), Problem::Empty))
        }
        Some(Value::Array(p)) => p,
        Some(_) => {
            return Err(err(
                format!("{field}.parts"),
                Problem::InvalidType("a list"),
            ))
        }
    };
    let mut tokens = 0;
    for (j, p) in parts.iter().enumerate() {
        let pf = format!("{field}.parts[{j}]");
        let Value::Object(p) = p else {
            return Err(err(pf, Problem::InvalidType("an object")));
        };
        if let Some(k) = p.keys().find(|k| {
            !PART_FIELDS.contains(&k.as_str()) && *k != "thought" && *k != "thoughtSignature"
        }) {
            return Err(err(format!("{pf}.{k}"), Problem::Unknown));
        }
        let data = p
            .keys()
            .filter(|k| PART_FIELDS.contains(&k.as_str()))
            .count();
        if data != 1 {
            return Err(err(
                pf,
                Problem::InvalidValue("a part must set exactly one of text, inlineData, fileData, functionCall, functionResponse, executableCode, codeExecutionResult".into()),
            ));
        }
        match p.get("text") {
            Some(Value::String(s)) => tokens += text_tokens(s),
            Some(_) => return Err(err(format!("{pf}.text"), Problem::InvalidType("a string"))),
            None => {}
        }
    }
    Ok(tokens)
}

pub(crate) fn parse_generate(body: &[u8], model: &str) -> Result<Parsed, ApiError> {
    let obj = parse_object(body)?;
    if let Some(extra) = obj.keys().find(|k| !GENERATE_FIELDS.contains(&k.as_str())) {
        return Err(err(extra.as_str(), Problem::Unknown));
    }
    let contents = match obj.get("contents") {
        None | Some(Value::Null) => return Err(err("contents", Problem::Missing)),
        Some(Value::Array(c)) if c.is_empty() => return Err(err("contents", Problem::Missing)),
        Some(Value::Array(c)) => c,
        Some(_) => return Err(err("contents", Problem::InvalidType("a list"))),
    };
    let mut input = 3;
    for (i, c) in contents.iter().enumerate() {
        let field = format!("contents[{i}]");
        let Value::Object(c) = c else {
            return Err(err(field, Problem::InvalidType("an object")));
        };
        if let Some(k) = c.keys().find(|k| *k != "role" && *k != "parts") {
            return Err(err(format!("{field}.{k}"), Problem::Unknown));
        }
        match c.get("role") {
            None | Some(Value::Null) => {}
            Some(Value::String(r)) if r == "user" || r == "model" => {}
            Some(_) => {
                return Err(err(
                    format!("{field}.role"),
                    Problem::InvalidValue("Please use a valid role: user, model.".into()),
                ))
            }
        }
        input += 4 + gemini_parts(c.get("parts"), &field)?;
    }
    match obj.get("systemInstruction") {
        None | Some(Value::Null) => {}
        Some(Value::Object(s)) => {
            if let Some(k) = s.keys().find(|k| *k != "role" && *k != "parts") {
                return Err(err(format!("systemInstruction.{k}"), Problem::Unknown));
            }
            input += gemini_parts(s.get("parts"), "systemInstruction")?;
        }
        Some(_) => return Err(err("systemInstruction", Problem::InvalidType("an object"))),
    }
    let (max_out, candidates) = match obj.get("generationConfig") {
        None | Some(Value::Null) => (None, 1),
        Some(Value::Object(g)) => {
            if let Some(k) = g
                .keys()
                .find(|k| !GENERATION_CONFIG_FIELDS.contains(&k.as_str()))
            {
                return Err(err(format!("generationConfig.{k}"), Problem::Unknown));
            }
            let scoped = |e: ApiError| err(format!("generationConfig.{}", e.field), e.problem);
            let max_out = opt_int(g, "maxOutputTokens", 1, u32::MAX as i64).map_err(scoped)?;
            let n = opt_int(g, "candidateCount", 1, 8)
                .map_err(scoped)?
                .unwrap_or(1);
            match g.get("temperature") {
                None | Some(Value::Null) => {}
                Some(v) if v.as_f64().is_some_and(|t| (0.0..=2.0).contains(&t)) => {}
                Some(_) => {
                    return Err(err(
                        "generationConfig.temperature",
                        Problem::InvalidValue("temperature must be between 0 and 2".into()),
                    ))
                }
            }
            match g.get("stopSequences") {
                None | Some(Value::Null) => {}
                Some(Value::Array(s)) if s.len() <= 5 && s.iter().all(Value::is_string) => {}
                Some(_) => {
                    return Err(err(
                        "generationConfig.stopSequences",
                        Problem::InvalidValue("at most 5 strings".into()),
                    ))
                }
            }
            (max_out, n)
        }
        Some(_) => return Err(err("generationConfig", Problem::InvalidType("an object"))),
    };
    Ok(Parsed::Generate {
        model: model.to_string(),
        input,
        max_out,
        candidates,
    })
}

// ---------------------------------------------------------------------------------------
// Costs and generation

/// Ids and timestamps of one response.
pub(crate) struct Ids {
    pub unique: u64,
    pub created: u64,
}

impl Ids {
    pub fn new(unique: u64) -> Ids {
        Ids {
            unique,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
}

impl Parsed {
    /// What admission charges.
    pub fn cost(&self, config: &SimConfig) -> Cost {
        match self {
            Parsed::Chat {
                prompt, max_out, n, ..
            } => {
                let out = u64::from(max_out.unwrap_or(config.output_tokens.1)) * u64::from(*n);
                Cost {
                    tokens: prompt + out,
                    ..Default::default()
                }
            }
            Parsed::Embeddings { inputs, .. } => Cost {
                tokens: inputs.iter().map(|i| i.1).sum(),
                ..Default::default()
            },
            Parsed::Messages {
                input, max_tokens, ..
            } => Cost {
                tokens: input + u64::from(*max_tokens),
                input_tokens: *input,
                output_tokens: u64::from(*max_tokens),
            },
            Parsed::Generate {
                input,
                max_out,
                candidates,
                ..
            } => Cost {
                tokens: input
                    + u64::from(max_out.unwrap_or(config.output_tokens.1)) * u64::from(*candidates),
                ..Default::default()
            },
        }
    }

    /// Actual usage of a generated response, in the same terms as [`Parsed::cost`].
    pub fn actual(&self, g: &Generated) -> Cost {
        match self {
            Parsed::Messages { .. } => Cost {
                tokens: g.prompt + g.completion,
                input_tokens: g.prompt,
                output_tokens: g.completion,
            },
            _ => Cost {
                tokens: g.prompt + g.completion,
                ..Default::default()
            },
        }
    }

    pub fn model(&self) -> &str {
        match self {
            Parsed::Chat { model, .. }
            | Parsed::Embeddings { model, .. }
            | Parsed::Messages { model, .. }
            | Parsed::Generate { model, .. } => model,
        }
    }

    /// Generate the successful response body.
    pub fn generate(&self, rng: &mut SmallRng, config: &SimConfig, ids: &Ids) -> Generated {
        match self {
            Parsed::Chat {
                model,
                prompt,
                max_out,
                n,
                stream,
                include_usage,
            } => {
                if *stream {
                    chat_stream(
                        rng,
                        config,
                        ids,
                        model,
                        *prompt,
                        *max_out,
                        *n,
                        *include_usage,
                    )
                } else {
                    chat_json(rng, config, ids, model, *prompt, *max_out, *n)
                }
            }
            Parsed::Embeddings {
                model,
                inputs,
                dims,
                base64,
            } => embeddings(
                config,
                model,
                inputs,
                dims.unwrap_or(config.embedding_dims),
                *base64,
            ),
            Parsed::Messages {
                model,
                input,
                max_tokens,
                stream,
            } => {
                if *stream {
                    messages_stream(rng, config, ids, model, *input, *max_tokens)
                } else {
                    messages_json(rng, config, ids, model, *input, *max_tokens)
                }
            }
            Parsed::Generate {
                model,
                input,
                max_out,
                candidates,
            } => generate_json(rng, config, ids, model, *input, *max_out, *candidates),
        }
    }
}

/// A `GenerateContentResponse`.
#[allow(clippy::too_many_arguments)]
fn generate_json(
    rng: &mut SmallRng,
    config: &SimConfig,
    ids: &Ids,
    model: &str,
    prompt: u64,
    max_out: Option<u32>,
    n: u32,
) -> Generated {
    let mut completion = 0u64;
    let candidates: Vec<Value> = (0..n)
        .map(|index| {
            let (len, capped) = draw_length(rng, config.output_tokens, max_out);
            completion += u64::from(len);
            let mut text = String::with_capacity(len as usize * 7);
            push_words(rng, len, &mut text);
            serde_json::json!({
                "content": {"parts": [{"text": text}], "role": "model"},
                "finishReason": if capped { "MAX_TOKENS" } else { "STOP" },
                "index": index,
            })
        })
        .collect();
    let body = serde_json::json!({
        "candidates": candidates,
        "usageMetadata": {
            "promptTokenCount": prompt,
            "candidatesTokenCount": completion,
            "totalTokenCount": prompt + completion,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
        },
        "modelVersion": model,
        "responseId": format!("sim{:016x}", ids.unique),
    });
    Generated {
        segments: vec![to_bytes(&body)],
        stream: false,
        prompt,
        completion,
    }
}

#[derive(Serialize, Clone, Copy)]
struct ChatUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

fn chat_id(ids: &Ids) -> String {
    format!("chatcmpl-sim{:016x}", ids.unique)
}

#[allow(clippy::too_many_arguments)]
fn chat_json(
    rng: &mut SmallRng,
    config: &SimConfig,
    ids: &Ids,
    model: &str,
    prompt: u64,
    max_out: Option<u32>,
    n: u32,
) -> Generated {
    #[derive(Serialize)]
    struct Message {
        role: &'static str,
        content: String,
        refusal: Option<()>,
    }
    #[derive(Serialize)]
    struct Choice {
        index: u32,
        message: Message,
        finish_reason: &'static str,
        logprobs: Option<()>,
    }
    #[derive(Serialize)]
    struct Completion<'a> {
        id: &'a str,
        object: &'static str,
        created: u64,
        model: &'a str,
        choices: Vec<Choice>,
        usage: ChatUsage,
        system_fingerprint: &'static str,
    }
    let mut completion = 0;
    let choices = (0..n)
        .map(|index| {
            let (len, capped) = draw_length(rng, config.output_tokens, max_out);
            completion += u64::from(len);
            let mut content = String::with_capacity(len as usize * 7);
            push_words(rng, len, &mut content);
            Choice {
                index,
                message: Message {
                    role: "assistant",
                    content,
                    refusal: None,
                },
                finish_reason: if capped { "length" } else { "stop" },
                logprobs: None,
            }
        })
        .collect();
    let body = Completion {
        id: &chat_id(ids),
        object: "chat.completion",
        created: ids.created,
        model,
        choices,
        usage: ChatUsage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        },
        system_fingerprint: "fp_sluice_sim",
    };
    Generated {
        segments: vec![to_bytes(&body)],
        stream: false,
        prompt,
        completion,
    }
}

fn sse_data<T: Serialize>(v: &T) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    let _ = serde_json::to_writer(&mut out, v);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn sse_event<T: Serialize>(event: &str, v: &T) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    let _ = serde_json::to_writer(&mut out, v);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

#[allow(clippy::too_many_arguments)]
fn chat_stream(
    rng: &mut SmallRng,
    config: &SimConfig,
    ids: &Ids,
    model: &str,
    prompt: u64,
    max_out: Option<u32>,
    n: u32,
    include_usage: bool,
) -> Generated {
    #[derive(Serialize)]
    struct Delta<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        role: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        content: Option<&'a str>,
    }
    #[derive(Serialize)]
    struct Choice<'a> {
        index: u32,
        delta: Delta<'a>,
        logprobs: Option<()>,
        finish_reason: Option<&'static str>,
    }
    #[derive(Serialize)]
    struct Chunk<'a> {
        id: &'a str,
        object: &'static str,
        created: u64,
        model: &'a str,
        system_fingerprint: &'static str,
        choices: Vec<Choice<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        usage: Option<Option<ChatUsage>>,
    }
    let id = chat_id(ids);
    let usage_null = if include_usage { Some(None) } else { None };
    let chunk = |choices: Vec<Choice>, usage: Option<Option<ChatUsage>>| {
        sse_data(&Chunk {
            id: &id,
            object: "chat.completion.chunk",
            created: ids.created,
            model,
            system_fingerprint: "fp_sluice_sim",
            choices,
            usage,
        })
    };
    let mut segments = Vec::new();
    let mut completion = 0;
    for index in 0..n {
        let (len, capped) = draw_length(rng, config.output_tokens, max_out);
        completion += u64::from(len);
        let finish = if capped { "length" } else { "stop" };
        let pieces = word_pieces(rng, len);
        segments.push(chunk(
            vec![Choice {
                index,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(""),
                },
                logprobs: None,
                finish_reason: None,
            }],
            usage_null,
        ));
        if pieces.is_empty() {
            segments.push(chunk(
                vec![Choice {
                    index,
                    delta: Delta {
                        role: None,
                        content: None,
                    },
                    logprobs: None,
                    finish_reason: Some(finish),
                }],
                usage_null,
            ));
        }
        let last = pieces.len().saturating_sub(1);
        for (i, p) in pieces.iter().enumerate() {
            segments.push(chunk(
                vec![Choice {
                    index,
                    delta: Delta {
                        role: None,
                        content: Some(p),
                    },
                    logprobs: None,
                    finish_reason: (i == last).then_some(finish),
                }],
                usage_null,
            ));
        }
    }
    if include_usage {
        segments.push(chunk(
            Vec::new(),
            Some(Some(ChatUsage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                total_tokens: prompt + completion,
            })),
        ));
    }
    segments.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Generated {
        segments,
        stream: true,
        prompt,
        completion,
    }
}

fn embeddings(
    config: &SimConfig,
    model: &str,
    inputs: &[(u64, u64)],
    dims: usize,
    base64: bool,
) -> Generated {
    #[derive(Serialize)]
    #[serde(untagged)]
    enum Vector {
        Float(Vec<f32>),
        Base64(String),
    }
    #[derive(Serialize)]
    struct Item {
        object: &'static str,
        index: usize,
        embedding: Vector,
    }
    #[derive(Serialize)]
    struct Usage {
        prompt_tokens: u64,
        total_tokens: u64,
    }
    #[derive(Serialize)]
    struct Response<'a> {
        object: &'static str,
        data: Vec<Item>,
        model: &'a str,
        usage: Usage,
    }
    let dims = dims.max(1);
    let data = inputs
        .iter()
        .enumerate()
        .map(|(index, (key, _))| {
            let mut rng = SmallRng::seed_from_u64(combine(config.seed, *key));
            let mut v: Vec<f32> = (0..dims).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
            let norm = v
                .iter()
                .map(|x| f64::from(*x) * f64::from(*x))
                .sum::<f64>()
                .sqrt();
            if norm > 0.0 {
                for x in &mut v {
                    *x = (f64::from(*x) / norm) as f32;
                }
            } else {
                v[0] = 1.0;
            }
            let embedding = if base64 {
                let mut raw = Vec::with_capacity(dims * 4);
                for x in &v {
                    raw.extend_from_slice(&x.to_le_bytes());
                }
                Vector::Base64(base64::engine::general_purpose::STANDARD.encode(raw))
            } else {
                Vector::Float(v)
            };
            Item {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    let prompt: u64 = inputs.iter().map(|i| i.1).sum();
    Generated {
        segments: vec![to_bytes(&Response {
            object: "list",
            data,
            model,
            usage: Usage {
                prompt_tokens: prompt,
                total_tokens: prompt,
            },
        })],
        stream: false,
        prompt,
        completion: 0,
    }
}

#[derive(Serialize, Clone, Copy)]
struct MessageUsage {
    input_tokens: u64,
    output_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
}

#[derive(Serialize)]
struct TextBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

#[derive(Serialize)]
struct Message<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<TextBlock<'a>>,
    stop_reason: Option<&'static str>,
    stop_sequence: Option<()>,
    usage: MessageUsage,
}

fn msg_id(ids: &Ids) -> String {
    format!("msg_sim{:016x}", ids.unique)
}

fn messages_json(
    rng: &mut SmallRng,
    config: &SimConfig,
    ids: &Ids,
    model: &str,
    input: u64,
    max_tokens: u32,
) -> Generated {
    let (len, capped) = draw_length(rng, config.output_tokens, Some(max_tokens));
    let mut text = String::with_capacity(len as usize * 7);
    push_words(rng, len, &mut text);
    let body = Message {
        id: &msg_id(ids),
        kind: "message",
        role: "assistant",
        model,
        content: vec![TextBlock {
            kind: "text",
            text: &text,
        }],
        stop_reason: Some(if capped { "max_tokens" } else { "end_turn" }),
        stop_sequence: None,
        usage: MessageUsage {
            input_tokens: input,
            output_tokens: u64::from(len),
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 0,
        },
    };
    Generated {
        segments: vec![to_bytes(&body)],
        stream: false,
        prompt: input,
        completion: u64::from(len),
    }
}

fn messages_stream(
    rng: &mut SmallRng,
    config: &SimConfig,
    ids: &Ids,
    model: &str,
    input: u64,
    max_tokens: u32,
) -> Generated {
    let (len, capped) = draw_length(rng, config.output_tokens, Some(max_tokens));
    let pieces = word_pieces(rng, len);
    let id = msg_id(ids);
    let mut segments = Vec::with_capacity(pieces.len() + 6);
    #[derive(Serialize)]
    struct Start<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        message: Message<'a>,
    }
    segments.push(sse_event(
        "message_start",
        &Start {
            kind: "message_start",
            message: Message {
                id: &id,
                kind: "message",
                role: "assistant",
                model,
                content: Vec::new(),
                stop_reason: None,
                stop_sequence: None,
                usage: MessageUsage {
                    input_tokens: input,
                    output_tokens: 1,
                    cache_creation_input_tokens: 0,
                    cache_read_input_tokens: 0,
                },
            },
        },
    ));
    segments.push(sse_event(
        "content_block_start",
        &serde_json::json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
    ));
    segments.push(sse_event("ping", &serde_json::json!({"type":"ping"})));
    #[derive(Serialize)]
    struct Delta<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        text: &'a str,
    }
    #[derive(Serialize)]
    struct BlockDelta<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        index: u32,
        delta: Delta<'a>,
    }
    for p in &pieces {
        segments.push(sse_event(
            "content_block_delta",
            &BlockDelta {
                kind: "content_block_delta",
                index: 0,
                delta: Delta {
                    kind: "text_delta",
                    text: p,
                },
            },
        ));
    }
    segments.push(sse_event(
        "content_block_stop",
        &serde_json::json!({"type":"content_block_stop","index":0}),
    ));
    segments.push(sse_event(
        "message_delta",
        &serde_json::json!({
            "type": "message_delta",
            "delta": {"stop_reason": if capped { "max_tokens" } else { "end_turn" }, "stop_sequence": null},
            "usage": {"output_tokens": len},
        }),
    ));
    segments.push(sse_event(
        "message_stop",
        &serde_json::json!({"type":"message_stop"}),
    ));
    Generated {
        segments,
        stream: true,
        prompt: input,
        completion: u64::from(len),
    }
}

// ---------------------------------------------------------------------------------------
// Models

const OPENAI_MODELS: [&str; 6] = [
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
];

const ANTHROPIC_MODELS: [(&str, &str); 4] = [
    ("claude-opus-4-1", "Claude Opus 4.1"),
    ("claude-sonnet-4-5", "Claude Sonnet 4.5"),
    ("claude-haiku-4-5", "Claude Haiku 4.5"),
    ("claude-3-5-haiku-latest", "Claude Haiku 3.5"),
];

pub(crate) fn models(provider: Provider) -> Bytes {
    match provider {
        // `GET /v1/models` is never Gemini's; its listing would be `/v1beta/models`.
        Provider::OpenAi | Provider::Gemini => {
            let data: Vec<Value> = OPENAI_MODELS
                .iter()
                .map(|id| serde_json::json!({"id": id, "object": "model", "created": 1_700_000_000u64, "owned_by": "sluice-sim"}))
                .collect();
            to_bytes(&serde_json::json!({"object": "list", "data": data}))
        }
        Provider::Anthropic => {
            let data: Vec<Value> = ANTHROPIC_MODELS
                .iter()
                .map(|(id, name)| serde_json::json!({"type": "model", "id": id, "display_name": name, "created_at": "2025-01-01T00:00:00Z"}))
                .collect();
            to_bytes(&serde_json::json!({
                "data": data,
                "has_more": false,
                "first_id": ANTHROPIC_MODELS[0].0,
                "last_id": ANTHROPIC_MODELS[ANTHROPIC_MODELS.len() - 1].0,
            }))
        }
    }
}
