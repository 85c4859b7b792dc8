//! Helpers shared by the integration tests.
#![allow(dead_code)]

use serde_json::{json, Value};
use sluice_sim::{SimConfig, SimHandle};

pub async fn sim(config: SimConfig) -> SimHandle {
    sluice_sim::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("bind")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(20))
        .build()
        .unwrap()
}

/// Posts a chat body from a client that gives up after `after`, and asserts it did.
pub async fn post_chat_giving_up_after(h: &SimHandle, after: std::time::Duration) {
    let c = reqwest::Client::builder().timeout(after).build().unwrap();
    let r = c
        .post(format!("{}/chat/completions", h.base_url()))
        .json(&chat_body("x"))
        .send()
        .await;
    assert!(r.unwrap_err().is_timeout());
}

pub fn chat_body(text: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})
}

pub fn messages_body(text: &str, max_tokens: u32) -> Value {
    json!({"model": "claude-haiku-4-5", "max_tokens": max_tokens, "messages": [{"role": "user", "content": text}]})
}

pub async fn post(
    c: &reqwest::Client,
    h: &SimHandle,
    path: &str,
    body: &Value,
) -> reqwest::Response {
    c.post(format!("{}{path}", h.base_url()))
        .json(body)
        .send()
        .await
        .expect("send")
}

pub async fn post_anthropic(c: &reqwest::Client, h: &SimHandle, body: &Value) -> reqwest::Response {
    c.post(format!("{}/messages", h.base_url()))
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .expect("send")
}

pub fn header<'a>(r: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The `data:` payloads of an SSE body, with their `event:` names.
pub fn sse(body: &str) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    for block in body.split("\n\n") {
        if block.trim().is_empty() {
            continue;
        }
        let mut event = None;
        let mut data = String::new();
        for line in block.lines() {
            if let Some(e) = line.strip_prefix("event: ") {
                event = Some(e.to_string());
            } else if let Some(d) = line.strip_prefix("data: ") {
                data.push_str(d);
            }
        }
        out.push((event, data));
    }
    out
}
