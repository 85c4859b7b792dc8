//! Every endpoint's response shape, validation and auth errors, determinism and stats.

mod common;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use sluice_sim::SimConfig;
use std::time::Duration;

#[tokio::test]
async fn chat_completion_shape_and_usage() {
    let h = sim(SimConfig::default()).await;
    let c = client();
    // prompt estimate: 3 per request + 4 per message + ceil(11 / 4) = 10
    let r = post(&c, &h, "/chat/completions", &chat_body("hello there")).await;
    assert_eq!(r.status(), 200);
    assert!(header(&r, "x-request-id").unwrap().starts_with("req_"));
    assert!(header(&r, "request-id").is_some());
    assert!(
        header(&r, "x-ratelimit-limit-requests").is_none(),
        "no limits configured, no headers"
    );
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o-mini");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["refusal"].is_null());
    assert!(choice["logprobs"].is_null());
    assert_eq!(choice["finish_reason"], "stop");
    let words = choice["message"]["content"]
        .as_str()
        .unwrap()
        .split(' ')
        .count() as u64;
    assert!((16..=128).contains(&words));
    assert_eq!(v["usage"]["prompt_tokens"], 10);
    assert_eq!(v["usage"]["completion_tokens"], words);
    assert_eq!(v["usage"]["total_tokens"], 10 + words);

    // Capped by max_tokens / max_completion_tokens: finish_reason "length".
    for key in ["max_tokens", "max_completion_tokens"] {
        let mut b = chat_body("hello there");
        b[key] = json!(5);
        let v: Value = post(&c, &h, "/chat/completions", &b)
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 5);
        assert_eq!(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .split(' ')
                .count(),
            5
        );
    }

    // n > 1 and content parts
    let b = json!({"model": "m", "n": 3, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "abcdefgh"}]}]});
    let v: Value = post(&c, &h, "/chat/completions", &b)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"].as_array().unwrap().len(), 3);
    // 3 + (4 + 2) + (4 + 2)
    assert_eq!(v["usage"]["prompt_tokens"], 15);
    let total: u64 = v["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["message"]["content"].as_str().unwrap().split(' ').count() as u64)
        .sum();
    assert_eq!(v["usage"]["completion_tokens"], total);
    h.shutdown().await;
}

#[tokio::test]
async fn chat_stream_with_and_without_usage() {
    let h = sim(SimConfig::default()).await;
    let c = client();
    let mut b = chat_body("stream me");
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    b["max_tokens"] = json!(10); // below the 16-token minimum: always capped
    let r = post(&c, &h, "/chat/completions", &b).await;
    assert_eq!(r.status(), 200);
    assert!(header(&r, "content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text().await.unwrap();
    let events = sse(&text);
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    for ch in &chunks {
        assert_eq!(ch["object"], "chat.completion.chunk");
        assert_eq!(ch["model"], "gpt-4o-mini");
    }
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    let content_chunks = &chunks[..chunks.len() - 1];
    assert!(content_chunks
        .iter()
        .all(|c| c["usage"].is_null() && c.get("usage").is_some()));
    let content: String = content_chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let words = content.split(' ').count() as u64;
    assert_eq!(usage_chunk["usage"]["completion_tokens"], words);
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], 3 + 4 + 3);
    let last = content_chunks.last().unwrap();
    assert!(
        last["choices"][0]["delta"]["content"].is_string(),
        "last content chunk carries finish_reason"
    );
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(words, 10);
    assert!(content_chunks[..content_chunks.len() - 1]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));

    // Without include_usage: no usage key at all, no usage chunk.
    let mut b = chat_body("stream me too");
    b["stream"] = json!(true);
    let text = post(&c, &h, "/chat/completions", &b)
        .await
        .text()
        .await
        .unwrap();
    let events = sse(&text);
    assert_eq!(events.last().unwrap().1, "[DONE]");
    for (_, d) in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        assert!(v.get("usage").is_none());
        assert_eq!(v["choices"].as_array().unwrap().len(), 1);
    }
    let stats = h.stats();
    assert_eq!(stats.ok, 2);
    h.shutdown().await;
}

fn unit_norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt()
}

#[tokio::test]
async fn embeddings_float_base64_and_inputs() {
    let h = sim(SimConfig::default()).await;
    let c = client();
    let v: Value = post(
        &c,
        &h,
        "/embeddings",
        &json!({"model": "text-embedding-3-small", "input": "hello world"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "text-embedding-3-small");
    assert_eq!(v["data"][0]["object"], "embedding");
    assert_eq!(v["data"][0]["index"], 0);
    let floats: Vec<f32> = serde_json::from_value(v["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(floats.len(), 1536);
    assert!((unit_norm(&floats) - 1.0).abs() < 1e-4);
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    assert_eq!(v["usage"]["total_tokens"], 3);

    // base64: little-endian f32, same vector as the float form.
    let v: Value = post(
        &c,
        &h,
        "/embeddings",
        &json!({"model": "m", "input": ["x", "hello world"], "encoding_format": "base64"}),
    )
    .await
    .json()
    .await
    .unwrap();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v["data"][1]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(
        decoded, floats,
        "same input, same vector, whichever request it is in"
    );
    assert_eq!(v["data"][1]["index"], 1);

    // dimensions, token arrays, array of token arrays
    let v: Value = post(
        &c,
        &h,
        "/embeddings",
        &json!({"model": "m", "input": [1, 2, 3], "dimensions": 8}),
    )
    .await
    .json()
    .await
    .unwrap();
    let e: Vec<f32> = serde_json::from_value(v["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(e.len(), 8);
    assert!((unit_norm(&e) - 1.0).abs() < 1e-4);
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    let v: Value = post(
        &c,
        &h,
        "/embeddings",
        &json!({"model": "m", "input": [[1, 2], [3, 4, 5]], "dimensions": 4}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["usage"]["prompt_tokens"], 5);

    // bad inputs
    for bad in [
        json!({"model": "m"}),
        json!({"model": "m", "input": []}),
        json!({"model": "m", "input": [{}]}),
        json!({"model": "m", "input": "x", "encoding_format": "hex"}),
    ] {
        let r = post(&c, &h, "/embeddings", &bad).await;
        assert_eq!(r.status(), 400, "{bad}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["type"], "invalid_request_error");
    }
    h.shutdown().await;
}

#[tokio::test]
async fn anthropic_messages_json_and_stream() {
    let h = sim(SimConfig::default()).await;
    let c = client();
    let mut b = messages_body("hello there", 1000);
    b["system"] = json!([{"type": "text", "text": "abcd"}]);
    let r = post_anthropic(&c, &h, &b).await;
    assert_eq!(r.status(), 200);
    assert!(header(&r, "request-id").is_some());
    let v: Value = r.json().await.unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "claude-haiku-4-5");
    assert_eq!(v["content"][0]["type"], "text");
    assert_eq!(v["stop_reason"], "end_turn");
    assert!(v["stop_sequence"].is_null());
    let words = v["content"][0]["text"].as_str().unwrap().split(' ').count() as u64;
    assert_eq!(v["usage"]["output_tokens"], words);
    // 3 + 4 + ceil(11/4) + system ceil(4/4)
    assert_eq!(v["usage"]["input_tokens"], 11);
    assert_eq!(v["usage"]["cache_creation_input_tokens"], 0);
    assert_eq!(v["usage"]["cache_read_input_tokens"], 0);

    let v: Value = post_anthropic(&c, &h, &messages_body("hi", 3))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["usage"]["output_tokens"], 3);

    // content blocks
    let b = json!({"model": "c", "max_tokens": 10, "system": "sys!", "messages": [{"role": "user", "content": [{"type": "text", "text": "12345678"}]}]});
    let v: Value = post_anthropic(&c, &h, &b).await.json().await.unwrap();
    assert_eq!(v["usage"]["input_tokens"], 3 + 4 + 2 + 1);

    let mut b = messages_body("stream", 8);
    b["stream"] = json!(true);
    let r = post_anthropic(&c, &h, &b).await;
    assert!(header(&r, "content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let events = sse(&r.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_deref().unwrap()).collect();
    assert_eq!(names[0], "message_start");
    assert_eq!(names[1], "content_block_start");
    assert_eq!(names[names.len() - 3], "content_block_stop");
    assert_eq!(names[names.len() - 2], "message_delta");
    assert_eq!(names[names.len() - 1], "message_stop");
    let mut text = String::new();
    for (e, d) in &events {
        let v: Value = serde_json::from_str(d).unwrap();
        assert_eq!(v["type"], e.as_deref().unwrap());
        if e.as_deref() == Some("content_block_delta") {
            text.push_str(v["delta"]["text"].as_str().unwrap());
        }
        if e.as_deref() == Some("message_delta") {
            assert_eq!(v["usage"]["output_tokens"], 8);
            assert_eq!(v["delta"]["stop_reason"], "max_tokens");
        }
    }
    assert_eq!(text.split(' ').count(), 8);
    h.shutdown().await;
}

#[tokio::test]
async fn models_in_both_shapes() {
    let h = sim(SimConfig::default()).await;
    let c = client();
    let v: Value = c
        .get(format!("{}/models", h.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["object"], "model");
    assert!(v["data"][0]["id"].is_string());
    let v: Value = c
        .get(format!("{}/models", h.base_url()))
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["type"], "model");
    assert!(v["data"][0]["display_name"].is_string());
    assert!(v["data"][0]["created_at"].is_string());
    assert_eq!(v["has_more"], false);
    assert_eq!(v["first_id"], v["data"][0]["id"]);
    assert!(v["last_id"].is_string());
    h.shutdown().await;
}

#[tokio::test]
async fn validation_errors_in_both_shapes() {
    let h = sim(SimConfig::default()).await;
    let c = client();
    let url = format!("{}/chat/completions", h.base_url());
    let r = c.post(&url).body("{not json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"].get("param").is_some() && v["error"].get("code").is_some());

    for (body, param) in [
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
        (json!({"model": "m"}), "messages"),
        (json!({"model": "m", "messages": []}), "messages"),
        (json!({"model": "m", "messages": "x"}), "messages"),
        (
            json!({"model": "m", "messages": [{"content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
            "max_tokens",
        ),
    ] {
        let r = post(&c, &h, "/chat/completions", &body).await;
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], param, "{body}");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(param.split('[').next().unwrap()));
    }

    // Anthropic
    let r = c
        .post(format!("{}/messages", h.base_url()))
        .json(&messages_body("x", 10))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "missing anthropic-version");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("anthropic-version"));
    for (body, field) in [
        (
            json!({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
        (
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
            "max_tokens",
        ),
        (json!({"model": "m", "max_tokens": 5}), "messages"),
        (
            json!({"model": "m", "max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}),
            "messages.0.role",
        ),
    ] {
        let r = post_anthropic(&c, &h, &body).await;
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(
            v["error"]["message"].as_str().unwrap().starts_with(field),
            "{v}"
        );
    }
    let r = c
        .post(format!("{}/messages", h.base_url()))
        .header("anthropic-version", "2023-06-01")
        .body("][")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "invalid_request_error"
    );

    // unknown path
    let r = post(&c, &h, "/nope", &json!({})).await;
    assert_eq!(r.status(), 404);
    let s = h.stats();
    assert_eq!(s.bad_requests, 1 + 6 + 1 + 4 + 1 + 1);
    assert_eq!(s.requests, s.bad_requests);
    assert_eq!(s.ok, 0);
    h.shutdown().await;
}

#[tokio::test]
async fn auth_errors_in_both_shapes() {
    let h = sim(SimConfig {
        api_key: Some("sk-test-123".into()),
        ..Default::default()
    })
    .await;
    let c = client();
    let url = format!("{}/chat/completions", h.base_url());
    for auth in [None, Some("Bearer wrong"), Some("sk-test-123")] {
        let mut rb = c.post(&url).json(&chat_body("x"));
        if let Some(a) = auth {
            rb = rb.header("authorization", a);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 401);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert!(!v.to_string().contains("wrong"), "never echo keys");
    }
    let r = c
        .post(&url)
        .bearer_auth("sk-test-123")
        .json(&chat_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let murl = format!("{}/messages", h.base_url());
    for key in [None, Some("wrong")] {
        let mut rb = c
            .post(&murl)
            .header("anthropic-version", "2023-06-01")
            .json(&messages_body("x", 5));
        if let Some(k) = key {
            rb = rb.header("x-api-key", k);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 401);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "authentication_error");
    }
    let r = c
        .post(&murl)
        .header("anthropic-version", "2023-06-01")
        .header("x-api-key", "sk-test-123")
        .json(&messages_body("x", 5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Anthropic SDK 2.x sends the key as a Bearer token: accepted too.
    let r = c
        .post(&murl)
        .header("anthropic-version", "2023-06-01")
        .bearer_auth("sk-test-123")
        .json(&messages_body("x", 5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let s = h.stats();
    assert_eq!(s.unauthorized, 5);
    assert_eq!(s.ok, 3);
    h.shutdown().await;
}

async fn content_of(seed: u64, body: &Value) -> String {
    let h = sim(SimConfig {
        seed,
        ..Default::default()
    })
    .await;
    let v: Value = post(&client(), &h, "/chat/completions", body)
        .await
        .json()
        .await
        .unwrap();
    h.shutdown().await;
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn content_is_deterministic_per_seed_and_body() {
    let b = chat_body("determinism");
    let a1 = content_of(7, &b).await;
    let a2 = content_of(7, &b).await;
    assert_eq!(a1, a2, "same seed, same body");
    let other_seed = content_of(8, &b).await;
    assert_ne!(a1, other_seed, "different seed");
    let other_body = content_of(7, &chat_body("determinism!")).await;
    assert_ne!(a1, other_body, "different body");

    // Within one server, replays are identical too.
    let h = sim(SimConfig {
        seed: 7,
        ..Default::default()
    })
    .await;
    let c = client();
    let v: Value = post(&c, &h, "/chat/completions", &b)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], a1.as_str());
    h.shutdown().await;
}

#[tokio::test]
async fn stats_counters_and_reset() {
    let h = sim(SimConfig::default()).await;
    let c = client();
    let b = chat_body("same body");
    let mut prompt = 0;
    let mut completion = 0;
    for _ in 0..3 {
        let v: Value = post(&c, &h, "/chat/completions", &b)
            .await
            .json()
            .await
            .unwrap();
        prompt += v["usage"]["prompt_tokens"].as_u64().unwrap();
        completion += v["usage"]["completion_tokens"].as_u64().unwrap();
    }
    let v: Value = post(&c, &h, "/chat/completions", &chat_body("other body"))
        .await
        .json()
        .await
        .unwrap();
    prompt += v["usage"]["prompt_tokens"].as_u64().unwrap();
    completion += v["usage"]["completion_tokens"].as_u64().unwrap();
    post(&c, &h, "/chat/completions", &json!({})).await;
    let s = h.stats();
    assert_eq!(s.requests, 5);
    assert_eq!(s.ok, 4);
    assert_eq!(s.ok_duplicates, 2);
    assert_eq!(s.bad_requests, 1);
    assert_eq!(s.prompt_tokens, prompt);
    assert_eq!(s.completion_tokens, completion);
    assert_eq!(s.in_flight, 0);
    assert!(s.max_in_flight >= 1);
    assert_eq!(s.injected_faults.len(), 11);
    assert!(s.injected_faults.values().all(|v| *v == 0));

    // Same snapshot over HTTP.
    let root = h.base_url().trim_end_matches("/v1").to_string();
    let over_http: sluice_sim::SimStats = c
        .get(format!("{root}/_sim/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(over_http, h.stats());

    // Reset over HTTP forgets fingerprints: the same body is not a duplicate any more.
    let r = c.post(format!("{root}/_sim/reset")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(h.stats().requests, 0);
    post(&c, &h, "/chat/completions", &b).await;
    let s = h.stats();
    assert_eq!((s.requests, s.ok, s.ok_duplicates), (1, 1, 0));
    h.reset();
    assert_eq!(h.stats().ok, 0);
    h.shutdown().await;
}

#[tokio::test]
async fn streaming_latency_is_spread_over_chunks() {
    let h = sim(SimConfig {
        latency: std::time::Duration::from_millis(300),
        jitter: 0.0,
        ..Default::default()
    })
    .await;
    let c = client();
    let mut b = chat_body("slow");
    b["stream"] = json!(true);
    let t = std::time::Instant::now();
    let r = post(&c, &h, "/chat/completions", &b).await;
    let headers_after = t.elapsed();
    let text = r.text().await.unwrap();
    assert!(t.elapsed() >= std::time::Duration::from_millis(290));
    assert!(headers_after < t.elapsed());
    assert!(text.ends_with("data: [DONE]\n\n"));
    let t = std::time::Instant::now();
    let r = post(&c, &h, "/chat/completions", &chat_body("slow json")).await;
    assert_eq!(r.status(), 200);
    assert!(t.elapsed() >= std::time::Duration::from_millis(260));
    h.shutdown().await;
}

/// A client that goes away while its answer is generated: not billed by default, billed
/// (`ok` and the tokens) with `bill_abandoned`, as a provider that goes on generating bills.
#[tokio::test]
async fn an_abandoned_answer_is_billed_only_when_so_configured() {
    for bill in [false, true] {
        let h = sim(SimConfig {
            latency: Duration::from_millis(400),
            jitter: 0.0,
            bill_abandoned: bill,
            ..Default::default()
        })
        .await;
        post_chat_giving_up_after(&h, Duration::from_millis(100)).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while h.stats().in_flight > 0 || h.stats().requests == 0 {
            assert!(std::time::Instant::now() < deadline, "{:?}", h.stats());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Past the latency, had the answer still been generated.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = h.stats();
        assert_eq!(s.ok, u64::from(bill), "bill_abandoned {bill}: {s:?}");
        assert_eq!(s.prompt_tokens > 0, bill, "bill_abandoned {bill}: {s:?}");
        h.shutdown().await;
    }
}
