//! Every fault kind's observable symptom, and deterministic fault decisions.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use sluice_sim::{FaultKind, SimConfig};

fn with_fault(kind: FaultKind) -> SimConfig {
    SimConfig {
        faults: vec![(kind, 1.0)],
        hang: Duration::from_millis(300),
        drip: Duration::from_millis(400),
        ..Default::default()
    }
}

#[test]
fn fault_names_round_trip() {
    for k in FaultKind::ALL {
        assert_eq!(k.name().parse::<FaultKind>().unwrap(), k);
    }
    assert!("nope".parse::<FaultKind>().is_err());
}

#[tokio::test]
async fn error_status_faults_in_both_shapes() {
    let cases = [
        (FaultKind::Http500, 500, "server_error", 500, "api_error"),
        (FaultKind::Http502, 502, "server_error", 502, "api_error"),
        (FaultKind::Http503, 503, "server_error", 503, "api_error"),
        (
            FaultKind::Overloaded529,
            529,
            "overloaded_error",
            529,
            "overloaded_error",
        ),
        (
            FaultKind::RateLimitNoRetryAfter,
            429,
            "requests",
            429,
            "rate_limit_error",
        ),
        (
            FaultKind::InsufficientQuota,
            429,
            "insufficient_quota",
            400,
            "invalid_request_error",
        ),
    ];
    for (kind, openai_status, openai_type, anthropic_status, anthropic_type) in cases {
        let h = sim(SimConfig {
            rpm: Some(6000),
            ..with_fault(kind)
        })
        .await;
        let c = client();
        let r = post(&c, &h, "/chat/completions", &chat_body("x")).await;
        assert_eq!(r.status().as_u16(), openai_status, "{kind}");
        assert!(
            header(&r, "retry-after").is_none(),
            "{kind}: faults never carry retry-after"
        );
        assert!(header(&r, "retry-after-ms").is_none());
        assert_eq!(
            header(&r, "x-ratelimit-limit-requests"),
            Some("6000"),
            "{kind}"
        );
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["type"], openai_type, "{kind}");
        match kind {
            FaultKind::RateLimitNoRetryAfter => {
                assert_eq!(v["error"]["code"], "rate_limit_exceeded")
            }
            FaultKind::InsufficientQuota => assert_eq!(v["error"]["code"], "insufficient_quota"),
            _ => {}
        }
        let r = post_anthropic(&c, &h, &messages_body("x", 10)).await;
        assert_eq!(r.status().as_u16(), anthropic_status, "{kind}");
        assert!(header(&r, "anthropic-ratelimit-requests-limit").is_some());
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], anthropic_type, "{kind}");
        if kind == FaultKind::InsufficientQuota {
            assert!(v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("credit balance"));
        }
        let s = h.stats();
        assert_eq!(s.injected_faults[kind.name()], 2);
        assert_eq!(s.ok, 0);
        assert_eq!(s.in_flight, 0);
        h.shutdown().await;
    }
}

#[tokio::test]
async fn html_502() {
    let h = sim(with_fault(FaultKind::Html502)).await;
    let r = post(&client(), &h, "/chat/completions", &chat_body("x")).await;
    assert_eq!(r.status(), 502);
    assert!(header(&r, "content-type").unwrap().starts_with("text/html"));
    let body = r.text().await.unwrap();
    assert!(body.contains("<title>502 Bad Gateway</title>") && body.contains("nginx"));
    assert!(serde_json::from_str::<Value>(&body).is_err());
    assert_eq!(h.stats().injected_faults["html"], 1);
    h.shutdown().await;
}

#[tokio::test]
async fn hang_holds_then_drops_the_connection() {
    let h = sim(with_fault(FaultKind::Hang)).await;
    let c = client();
    let t = Instant::now();
    let r = c
        .post(format!("{}/chat/completions", h.base_url()))
        .json(&chat_body("x"))
        .send()
        .await;
    assert!(r.is_err(), "no response, the connection is dropped: {r:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(280),
        "held for the hang time"
    );
    // The server is still healthy; the dropped request is no longer in flight.
    let s = h.stats();
    assert_eq!(s.injected_faults["hang"], 1);
    assert_eq!(s.in_flight, 0);
    h.shutdown().await;
}

#[tokio::test]
async fn hang_is_cut_by_a_client_timeout() {
    let h = sim(SimConfig {
        hang: Duration::from_secs(600),
        ..with_fault(FaultKind::Hang)
    })
    .await;
    post_chat_giving_up_after(&h, Duration::from_millis(200)).await;
    // shutdown must not wait 600 s for the hanging request
    tokio::time::timeout(Duration::from_secs(10), h.shutdown())
        .await
        .expect("shutdown");
}

#[tokio::test]
async fn reset_sends_headers_then_aborts() {
    let h = sim(with_fault(FaultKind::Reset)).await;
    let c = client();
    for stream in [false, true] {
        let mut b = chat_body("x");
        b["stream"] = json!(stream);
        let r = post(&c, &h, "/chat/completions", &b).await;
        assert_eq!(r.status(), 200, "status and headers arrive");
        let body = r.bytes().await;
        assert!(body.is_err(), "the body is cut by a connection abort");
    }
    assert_eq!(h.stats().injected_faults["reset"], 2);
    assert_eq!(h.stats().ok, 0);
    h.shutdown().await;
}

#[tokio::test]
async fn truncated_body_with_clean_framing() {
    let h = sim(with_fault(FaultKind::Truncated)).await;
    let c = client();
    let r = post(&c, &h, "/chat/completions", &chat_body("x")).await;
    assert_eq!(r.status(), 200);
    let len: usize = header(&r, "content-length").unwrap().parse().unwrap();
    let body = r.bytes().await.expect("framing is complete");
    assert_eq!(body.len(), len);
    assert!(
        serde_json::from_slice::<Value>(&body).is_err(),
        "cut in half"
    );
    assert!(body.starts_with(b"{\"id\":\"chatcmpl-"));

    let mut b = messages_body("x", 50);
    b["stream"] = json!(true);
    let text = post_anthropic(&c, &h, &b).await.text().await.unwrap();
    assert!(text.starts_with("event: message_start"));
    assert!(!text.contains("message_stop"));
    h.shutdown().await;
}

#[tokio::test]
async fn drip_delivers_the_right_body_slowly() {
    let h = sim(with_fault(FaultKind::Drip)).await;
    let c = client();
    let t = Instant::now();
    let r = post(&c, &h, "/chat/completions", &chat_body("x")).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(350));
    assert_eq!(v["object"], "chat.completion");
    let s = h.stats();
    assert_eq!(s.injected_faults["drip"], 1);
    assert_eq!(s.ok, 0, "drip counts as a fault, not a clean ok");
    assert_eq!(
        s.completion_tokens,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );

    // Without the fault, the same body is the same content.
    let clean = sim(SimConfig::default()).await;
    let w: Value = post(&c, &clean, "/chat/completions", &chat_body("x"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"], w["choices"]);
    h.shutdown().await;
    clean.shutdown().await;
}

/// Status per attempt for each body.
async fn outcomes(order: &[(usize, usize)]) -> BTreeMap<usize, Vec<u16>> {
    let h = sim(SimConfig {
        seed: 11,
        faults: vec![(FaultKind::Http500, 0.3), (FaultKind::Http503, 0.3)],
        ..Default::default()
    })
    .await;
    let c = client();
    let mut out: BTreeMap<usize, Vec<u16>> = BTreeMap::new();
    for &(body, _attempt) in order {
        let r = post(
            &c,
            &h,
            "/chat/completions",
            &chat_body(&format!("body {body}")),
        )
        .await;
        out.entry(body).or_default().push(r.status().as_u16());
    }
    h.shutdown().await;
    out
}

#[tokio::test]
async fn faults_replay_identically_in_any_arrival_order() {
    let mut body_major = Vec::new();
    for b in 0..15 {
        for a in 0..4 {
            body_major.push((b, a));
        }
    }
    let mut round_robin = Vec::new();
    for a in 0..4 {
        for b in (0..15).rev() {
            round_robin.push((b, a));
        }
    }
    let x = outcomes(&body_major).await;
    let y = outcomes(&round_robin).await;
    assert_eq!(x, y);
    let all: Vec<u16> = x.values().flatten().copied().collect();
    assert!(
        all.contains(&200) && all.contains(&500) && all.contains(&503),
        "{all:?}"
    );
}
