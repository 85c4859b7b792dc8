//! Every limit kind: bursts over the limit get 429s with the right headers and bodies,
//! paced clients get none, and settlement refunds unused output reservations.

mod common;

use std::time::Duration;

use common::*;
use futures::future::join_all;
use serde_json::{json, Value};
use sluice_sim::SimConfig;

fn go_duration_like(s: &str) -> bool {
    s.ends_with("ms")
        || s.ends_with('s')
            && s[..s.len() - 1]
                .chars()
                .all(|c| c.is_ascii_digit() || "hm.".contains(c))
}

#[tokio::test]
async fn rpm_burst_gets_429_with_headers() {
    let h = sim(SimConfig {
        rpm: Some(60),
        burst_seconds: 10.0, // capacity 10, refilled at 1/s: robust on a busy machine
        ..Default::default()
    })
    .await;
    let c = client();
    let bodies: Vec<Value> = (0..30).map(|i| chat_body(&format!("{i}"))).collect();
    let rs = join_all(bodies.iter().map(|b| post(&c, &h, "/chat/completions", b))).await;
    let mut ok = 0;
    let mut limited = 0;
    for r in rs {
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), Some("60"));
        assert!(
            header(&r, "x-ratelimit-remaining-requests")
                .unwrap()
                .parse::<u64>()
                .unwrap()
                <= 10
        );
        assert!(go_duration_like(
            header(&r, "x-ratelimit-reset-requests").unwrap()
        ));
        assert!(
            header(&r, "x-ratelimit-limit-tokens").is_none(),
            "only configured limits"
        );
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {
                limited += 1;
                let secs: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
                let ms: u64 = header(&r, "retry-after-ms").unwrap().parse().unwrap();
                assert_eq!(secs, 1);
                assert!((1..=1000).contains(&ms), "{ms}");
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["error"]["type"], "requests");
                assert_eq!(v["error"]["code"], "rate_limit_exceeded");
                assert!(v["error"]["param"].is_null());
                assert!(v["error"]["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("Rate limit reached for"));
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert!((10..=15).contains(&ok), "{ok}");
    assert!(limited >= 15, "{limited}");
    let s = h.stats();
    assert_eq!(s.rate_limited, limited);
    assert_eq!(s.ok, ok);
    h.shutdown().await;
}

/// Send requests costing `cost` units of a `limit`-per-minute bucket at 95% of the
/// limit for 3 s; none may be refused.
async fn paced(config: SimConfig, body: Value, cost: f64, limit: f64) {
    let h = sim(config).await;
    let c = client();
    let interval = Duration::from_secs_f64(60.0 * cost / (0.95 * limit));
    let start = tokio::time::Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep_until(start + interval * n).await;
        let r = post(&c, &h, "/chat/completions", &body).await;
        assert_eq!(r.status(), 200, "request {n}");
        n += 1;
    }
    assert!(n >= 10, "{n}");
    assert_eq!(h.stats().rate_limited, 0);
    h.shutdown().await;
}

#[tokio::test]
async fn paced_at_95_percent_of_the_limit_gets_no_429() {
    // rpm 600: one request every 105 ms.
    let rpm = paced(
        SimConfig {
            rpm: Some(600),
            ..Default::default()
        },
        chat_body("paced"),
        1.0,
        600.0,
    );
    // tpm 6000: each request is charged 10 prompt + 10 max output = 20 tokens, and
    // uses all of it, so no refund helps: one request every 210 ms.
    let mut b = chat_body("hello there");
    b["max_tokens"] = json!(10);
    let tpm = paced(
        SimConfig {
            tpm: Some(6000),
            output_tokens: (10, 10),
            ..Default::default()
        },
        b,
        20.0,
        6000.0,
    );
    tokio::join!(rpm, tpm);
}

#[tokio::test]
async fn tpm_limit_charges_prompt_plus_max_output() {
    let h = sim(SimConfig {
        tpm: Some(600),
        burst_seconds: 10.0, // capacity 100 tokens, refilled at 10/s
        output_tokens: (50, 50),
        ..Default::default()
    })
    .await;
    let c = client();
    let mut b = chat_body("hello there"); // 10 prompt tokens
    b["max_tokens"] = json!(50);
    let r = post(&c, &h, "/chat/completions", &b).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), Some("600"));
    assert!(header(&r, "x-ratelimit-limit-requests").is_none());
    let remaining: u64 = header(&r, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!((40..=50).contains(&remaining), "{remaining}");
    let r = post(&c, &h, "/chat/completions", &b).await;
    assert_eq!(r.status(), 429);
    let ms: u64 = header(&r, "retry-after-ms").unwrap().parse().unwrap();
    assert!(ms > 1000 && ms <= 2000, "about 20 tokens at 10/s: {ms}");
    assert!(header(&r, "retry-after").is_some());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "tokens");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");

    // Without max_tokens the charge is prompt + output_tokens.1 (embeddings: input only).
    h.reset();
    let r = post(
        &c,
        &h,
        "/embeddings",
        &json!({"model": "e", "input": "x".repeat(40)}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let remaining: u64 = header(&r, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!((90..=100).contains(&remaining), "{remaining}");
    h.shutdown().await;
}

#[tokio::test]
async fn settlement_refunds_unused_output() {
    let h = sim(SimConfig {
        tpm: Some(600),
        burst_seconds: 10.0, // capacity 100, refilled at 10/s
        output_tokens: (5, 5),
        ..Default::default()
    })
    .await;
    let c = client();
    let mut b = chat_body("hello there"); // 10 prompt
    b["max_tokens"] = json!(80); // charged 90, actual 15
    let r = post(&c, &h, "/chat/completions", &b).await;
    assert_eq!(r.status(), 200);
    let remaining: u64 = header(&r, "x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!((85..=100).contains(&remaining), "refunded: {remaining}");
    // Without the refund (level 10) this second request (charged 80) would be refused.
    b["max_tokens"] = json!(70);
    let r = post(&c, &h, "/chat/completions", &b).await;
    assert_eq!(r.status(), 200);
    h.shutdown().await;
}

#[tokio::test]
async fn oversized_request_is_admitted_when_the_bucket_is_full() {
    let h = sim(SimConfig {
        tpm: Some(600), // capacity 10
        ..Default::default()
    })
    .await;
    let c = client();
    let mut b = chat_body("big");
    b["max_tokens"] = json!(1000);
    let r = post(&c, &h, "/chat/completions", &b).await;
    assert_eq!(r.status(), 200);
    let r = post(&c, &h, "/chat/completions", &b).await;
    assert_eq!(r.status(), 429);
    let secs: u64 = header(&r, "retry-after").unwrap().parse().unwrap();
    assert!(secs >= 1);
    h.shutdown().await;
}

#[tokio::test]
async fn anthropic_token_limits_and_headers() {
    for (config, limit_type, header_prefix) in [
        (
            SimConfig {
                otpm: Some(60),
                ..Default::default()
            },
            "output-tokens",
            "anthropic-ratelimit-output-tokens",
        ),
        (
            SimConfig {
                itpm: Some(30),
                ..Default::default()
            },
            "input-tokens",
            "anthropic-ratelimit-input-tokens",
        ),
        (
            SimConfig {
                tpm: Some(60),
                ..Default::default()
            },
            "tokens",
            "anthropic-ratelimit-tokens",
        ),
        (
            SimConfig {
                rpm: Some(6),
                ..Default::default()
            },
            "requests",
            "anthropic-ratelimit-requests",
        ),
    ] {
        let h = sim(SimConfig {
            output_tokens: (8, 8),
            // small capacities and slow refill: the second request is refused however
            // slow the machine is
            burst_seconds: 10.0,
            ..config
        })
        .await;
        let c = client();
        // input 3 + 4 + 3 = 10 tokens, max_tokens 8
        let b = messages_body("hello there", 8);
        let r = post_anthropic(&c, &h, &b).await;
        assert_eq!(r.status(), 200, "{limit_type}");
        assert!(
            header(&r, &format!("{header_prefix}-limit")).is_some(),
            "{limit_type}"
        );
        assert!(header(&r, &format!("{header_prefix}-remaining")).is_some());
        let reset = header(&r, &format!("{header_prefix}-reset")).unwrap();
        assert!(reset.ends_with('Z') && reset.contains('T'), "{reset}");
        assert!(header(&r, "x-ratelimit-limit-requests").is_none());
        let r = post_anthropic(&c, &h, &b).await;
        assert_eq!(r.status(), 429, "{limit_type}");
        assert!(header(&r, "retry-after").unwrap().parse::<u64>().unwrap() >= 1);
        assert!(
            header(&r, "retry-after-ms")
                .unwrap()
                .parse::<u64>()
                .unwrap()
                >= 1
        );
        let remaining: u64 = header(&r, &format!("{header_prefix}-remaining"))
            .unwrap()
            .parse()
            .unwrap();
        assert!(remaining < 8, "{limit_type}: {remaining}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "rate_limit_error");
        h.shutdown().await;
    }
}

#[tokio::test]
async fn concurrency_limit() {
    let h = sim(SimConfig {
        concurrency: Some(2),
        latency: Duration::from_millis(1500),
        jitter: 0.0,
        ..Default::default()
    })
    .await;
    let c = client();
    let bodies: Vec<Value> = (0..6).map(|i| chat_body(&format!("{i}"))).collect();
    let rs = join_all(bodies.iter().map(|b| post(&c, &h, "/chat/completions", b))).await;
    let statuses: Vec<u16> = rs.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        4,
        "{statuses:?}"
    );
    for r in rs.iter().filter(|r| r.status() == 429) {
        assert!(header(r, "retry-after").is_some());
    }
    let s = h.stats();
    assert!(s.max_in_flight >= 2);
    assert_eq!(s.in_flight, 0);
    // Slots are released: the next request is admitted.
    let r = post(&c, &h, "/chat/completions", &chat_body("after")).await;
    assert_eq!(r.status(), 200);
    h.shutdown().await;
}

#[tokio::test]
async fn reset_refills_buckets() {
    let h = sim(SimConfig {
        rpm: Some(6), // capacity 0.1: admitted when full, then 10 s to refill
        ..Default::default()
    })
    .await;
    let c = client();
    assert_eq!(
        post(&c, &h, "/chat/completions", &chat_body("a"))
            .await
            .status(),
        200
    );
    assert_eq!(
        post(&c, &h, "/chat/completions", &chat_body("a"))
            .await
            .status(),
        429
    );
    h.reset();
    assert_eq!(
        post(&c, &h, "/chat/completions", &chat_body("a"))
            .await
            .status(),
        200
    );
    h.shutdown().await;
}
