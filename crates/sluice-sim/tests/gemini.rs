//! Gemini `generateContent` on the simulator: shape, usage, validation, keys, limits and
//! faults in Google's error shape; and Anthropic's refusal of fields its spec lacks.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use sluice_sim::{FaultKind, SimConfig, SimHandle};

fn origin(h: &SimHandle) -> String {
    format!("http://{}", h.addr)
}

async fn generate(
    c: &reqwest::Client,
    h: &SimHandle,
    model: &str,
    key: Option<&str>,
    body: &Value,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut req = c.post(format!(
        "{}/v1beta/models/{model}:generateContent",
        origin(h)
    ));
    if let Some(k) = key {
        req = req.header("x-goog-api-key", k);
    }
    let r = req.json(body).send().await.expect("send");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body: Value = r.json().await.expect("a JSON body");
    (status, body, headers)
}

fn text_body(text: &str) -> Value {
    json!({"contents": [{"role": "user", "parts": [{"text": text}]}]})
}

#[tokio::test]
async fn generate_content_shape_and_usage_metadata() {
    let h = sim(SimConfig {
        output_tokens: (5, 5),
        ..SimConfig::default()
    })
    .await;
    let c = client();
    let body = json!({
        "contents": [{"role": "user", "parts": [{"text": "12345678"}]},
                     {"role": "model", "parts": [{"text": "1234"}]},
                     {"role": "user", "parts": [{"text": "again"}]}],
        "systemInstruction": {"parts": [{"text": "1234"}]},
        "generationConfig": {"maxOutputTokens": 3, "temperature": 0.5, "stopSequences": ["x"]},
    });
    let (status, v, headers) = generate(&c, &h, "gemini-2.5-flash", None, &body).await;
    assert_eq!(status, 200, "{v}");
    let cand = &v["candidates"][0];
    assert_eq!(cand["content"]["role"], "model");
    let text = cand["content"]["parts"][0]["text"].as_str().unwrap();
    assert_eq!(
        text.split(' ').count(),
        3,
        "capped by maxOutputTokens: {text}"
    );
    assert_eq!(cand["finishReason"], "MAX_TOKENS");
    // 3 + (4 + 2) + (4 + 1) + (4 + 2) + system 1
    let u = &v["usageMetadata"];
    assert_eq!(u["promptTokenCount"], 21, "{u}");
    assert_eq!(u["candidatesTokenCount"], 3);
    assert_eq!(u["totalTokenCount"], 24);
    assert_eq!(v["modelVersion"], "gemini-2.5-flash");
    assert!(
        !headers.contains_key("x-ratelimit-limit-requests")
            && !headers.contains_key("anthropic-ratelimit-requests-limit"),
        "Gemini sends no rate-limit headers"
    );
    let (status, v, _) = generate(&c, &h, "gemini-2.5-pro", None, &text_body("hi")).await;
    assert_eq!(status, 200);
    assert_eq!(v["candidates"][0]["finishReason"], "STOP");
    assert_eq!(h.stats().ok, 2);
}

#[tokio::test]
async fn generate_content_validation_errors_in_googles_shape() {
    let h = sim(SimConfig::default()).await;
    let c = client();
    let cases = [
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            "Unknown name \"messages\"",
        ),
        (json!({"contents": []}), "contents is not specified"),
        (
            json!({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}),
            "valid role: user, model",
        ),
        (
            json!({"contents": [{"role": "user", "parts": []}]}),
            "contents[0].parts",
        ),
        (
            json!({"contents": [{"role": "user", "parts": [{"content": "x"}]}]}),
            "Unknown name \"content\"",
        ),
        (
            json!({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"max_tokens": 5}}),
            "Unknown name \"max_tokens\"",
        ),
        (
            json!({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"temperature": 3}}),
            "temperature must be between 0 and 2",
        ),
        (
            json!({"contents": [{"parts": [{"text": "x"}]}], "generationConfig": {"maxOutputTokens": 0}}),
            "maxOutputTokens",
        ),
    ];
    for (body, needle) in cases {
        let (status, v, _) = generate(&c, &h, "gemini-2.5-flash", None, &body).await;
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["error"]["code"], 400);
        assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body}: {msg}");
    }
    let r = c
        .post(format!(
            "{}/v1beta/models/gemini-2.5-flash:generateContent",
            origin(&h)
        ))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Invalid JSON payload"));
    let r = c
        .post(format!(
            "{}/v1beta/models/gemini-2.5-flash:countTokens",
            origin(&h)
        ))
        .json(&text_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["status"], "NOT_FOUND");
    assert_eq!(h.stats().bad_requests, 10);
}

#[tokio::test]
async fn generate_content_wants_its_key_in_x_goog_api_key() {
    let h = sim(SimConfig {
        api_key: Some("AIza-sim".into()),
        ..SimConfig::default()
    })
    .await;
    let c = client();
    let (status, v, _) = generate(&c, &h, "gemini-2.5-flash", None, &text_body("x")).await;
    assert_eq!(
        (status, v["error"]["status"].as_str()),
        (403, Some("PERMISSION_DENIED"))
    );
    let (status, v, _) = generate(&c, &h, "gemini-2.5-flash", Some("wrong"), &text_body("x")).await;
    assert_eq!(
        (status, v["error"]["status"].as_str()),
        (400, Some("INVALID_ARGUMENT"))
    );
    assert_eq!(v["error"]["details"][0]["reason"], "API_KEY_INVALID");
    assert!(
        !v.to_string().contains("AIza-sim"),
        "the key is never echoed"
    );
    // A bearer token is not Gemini's way.
    let r = c
        .post(format!("{}/v1beta/models/m:generateContent", origin(&h)))
        .bearer_auth("AIza-sim")
        .json(&text_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (status, _, _) = generate(
        &c,
        &h,
        "gemini-2.5-flash",
        Some("AIza-sim"),
        &text_body("x"),
    )
    .await;
    assert_eq!(status, 200);
    let r = c
        .post(format!(
            "{}/v1beta/models/m:generateContent?key=AIza-sim",
            origin(&h)
        ))
        .json(&text_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "?key= works too");
    assert_eq!(h.stats().unauthorized, 3);
}

#[tokio::test]
async fn generate_content_rate_limit_is_resource_exhausted_with_retry_info() {
    let h = sim(SimConfig {
        rpm: Some(60),
        ..SimConfig::default()
    })
    .await;
    let c = client();
    let (status, _, _) = generate(&c, &h, "gemini-2.5-flash", None, &text_body("a")).await;
    assert_eq!(status, 200);
    let (status, v, headers) = generate(&c, &h, "gemini-2.5-flash", None, &text_body("b")).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
    assert!(
        !headers.contains_key("retry-after"),
        "Google puts the wait in the body"
    );
    let details = v["error"]["details"].as_array().unwrap();
    let delay = details
        .iter()
        .find(|d| d["@type"].as_str().unwrap().ends_with("RetryInfo"))
        .and_then(|d| d["retryDelay"].as_str())
        .unwrap();
    let secs: f64 = delay.trim_end_matches('s').parse().unwrap();
    assert!(secs > 0.5 && secs <= 1.0, "{delay}");
    let quota = details
        .iter()
        .find(|d| d["@type"].as_str().unwrap().ends_with("QuotaFailure"))
        .unwrap();
    assert!(quota["violations"][0]["quotaId"]
        .as_str()
        .unwrap()
        .contains("PerMinute"));
    assert_eq!(h.stats().rate_limited, 1);
}

#[tokio::test]
async fn generate_content_faults_in_googles_shape() {
    let c = client();
    for (kind, status, gstatus) in [
        (FaultKind::Http500, 500, "INTERNAL"),
        (FaultKind::Http503, 503, "UNAVAILABLE"),
        (FaultKind::Overloaded529, 503, "UNAVAILABLE"),
        (FaultKind::InsufficientQuota, 429, "RESOURCE_EXHAUSTED"),
    ] {
        let h = sim(SimConfig {
            faults: vec![(kind, 1.0)],
            ..SimConfig::default()
        })
        .await;
        let (s, v, _) = generate(&c, &h, "gemini-2.5-flash", None, &text_body("x")).await;
        assert_eq!(
            (s, v["error"]["status"].as_str()),
            (status, Some(gstatus)),
            "{kind}: {v}"
        );
        assert_eq!(v["error"]["code"], status);
        if kind == FaultKind::InsufficientQuota {
            assert!(v.to_string().contains("PerDay"), "{v}");
        }
        if kind == FaultKind::Overloaded529 {
            assert!(v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("overloaded"));
        }
    }
    // A truncated body is cut in half with correct framing.
    let h = sim(SimConfig {
        faults: vec![(FaultKind::Truncated, 1.0)],
        ..SimConfig::default()
    })
    .await;
    let r = c
        .post(format!("{}/v1beta/models/m:generateContent", origin(&h)))
        .json(&text_body("x"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).is_err());
}

#[tokio::test]
async fn anthropic_refuses_fields_its_spec_lacks() {
    let h = sim(SimConfig::default()).await;
    let c = client();
    let mut body = messages_body("hi", 10);
    body["max_completion_tokens"] = json!(10);
    let r = post_anthropic(&c, &h, &body).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(
        v["error"]["message"],
        "max_completion_tokens: Extra inputs are not permitted"
    );
    let mut body = messages_body("hi", 10);
    body["stop_sequences"] = json!(["x"]);
    body["metadata"] = json!({"user_id": "u"});
    body["temperature"] = json!(0.2);
    assert_eq!(post_anthropic(&c, &h, &body).await.status(), 200);
}
