//! Input-token estimates with tiktoken's `o200k_base` encoding (the GPT-4o / 4.1 / 5
//! family), used to reserve tokens-per-minute capacity before a request is sent.
//!
//! The estimate follows OpenAI's chat accounting: the tokens of every text piece, plus
//! 4 per message and 3 to prime the reply. Image and audio parts are not counted.

use serde_json::Value;
use tiktoken_rs::CoreBPE;

/// Per-message overhead in OpenAI's chat token accounting.
const TOKENS_PER_MESSAGE: u32 = 4;
/// Tokens that prime the assistant's reply.
const TOKENS_PER_REPLY: u32 = 3;

/// Counts tokens of request bodies. Free to create: the BPE tables (about 40 MB, 0.2 s of
/// CPU) are loaded once per process, on the first count.
#[derive(Clone, Copy)]
pub struct TokenEstimator;

impl std::fmt::Debug for TokenEstimator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenEstimator(o200k_base)")
    }
}

impl Default for TokenEstimator {
    fn default() -> Self {
        TokenEstimator::new()
    }
}

impl TokenEstimator {
    /// The estimator for the `o200k_base` encoding.
    pub fn new() -> Self {
        TokenEstimator
    }

    fn bpe(&self) -> &'static CoreBPE {
        tiktoken_rs::o200k_base_singleton()
    }

    /// Tokens of one text.
    pub fn text_tokens(&self, text: &str) -> u32 {
        self.bpe().count_ordinary(text) as u32
    }

    /// Input tokens of a chat request's `messages`.
    pub fn chat_input_tokens(&self, messages: &[Value]) -> u32 {
        let mut total = TOKENS_PER_REPLY;
        for m in messages {
            total += TOKENS_PER_MESSAGE;
            if let Some(Value::String(name)) = m.get("name") {
                total += self.text_tokens(name);
            }
            match m.get("content") {
                Some(Value::String(s)) => total += self.text_tokens(s),
                Some(Value::Array(parts)) => {
                    for p in parts {
                        if let Some(Value::String(t)) = p.get("text") {
                            total += self.text_tokens(t);
                        }
                    }
                }
                _ => {}
            }
        }
        total
    }

    /// Input tokens of an embeddings request's `input`: a string, an array of strings,
    /// an array of token ids, or an array of such arrays.
    pub fn embedding_input_tokens(&self, input: &Value) -> u32 {
        match input {
            Value::String(s) => self.text_tokens(s),
            Value::Number(_) => 1,
            Value::Array(items) => items.iter().map(|i| self.embedding_input_tokens(i)).sum(),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_text_and_overhead() {
        let e = TokenEstimator::new();
        assert_eq!(e.text_tokens("hello world"), 2);
        let msgs = json!([{"role":"user","content":"hello world"}]);
        assert_eq!(e.chat_input_tokens(msgs.as_array().unwrap()), 2 + 4 + 3);
        let parts = json!([{"role":"user","content":[{"type":"text","text":"hello world"},{"type":"image_url","image_url":{"url":"x"}}]}]);
        assert_eq!(e.chat_input_tokens(parts.as_array().unwrap()), 9);
        assert_eq!(
            e.embedding_input_tokens(&json!(["hello world", [1, 2, 3]])),
            5
        );
    }
}
