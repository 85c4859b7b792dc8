//! Rate-limit headers: what the provider says about the limits it enforces, read into
//! one neutral shape.
//!
//! * OpenAI: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, resets as Go
//!   durations (`6m0s`, `12ms`, `1h2m3s`, `0.5s`).
//! * Anthropic: `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
//!   {limit,remaining,reset}`, resets as RFC 3339 instants.
//! * Gemini sends none.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ::http::HeaderMap;

/// One limit as a response reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LimitReading {
    /// The limit (per minute).
    pub limit: u64,
    /// What is left of it now.
    pub remaining: u64,
    /// How long until it is whole again.
    pub reset: Duration,
}

/// Every limit a response reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimits {
    /// Requests per minute.
    pub requests: Option<LimitReading>,
    /// Tokens per minute (input and output together).
    pub tokens: Option<LimitReading>,
    /// Input tokens per minute (Anthropic).
    pub input_tokens: Option<LimitReading>,
    /// Output tokens per minute (Anthropic).
    pub output_tokens: Option<LimitReading>,
}

/// Whether any header's name starts with `prefix`: one look over the names spares the
/// lookups of every limit header on responses that carry none (local servers, or a
/// provider told to send none).
fn any_named(h: &HeaderMap, prefix: &str) -> bool {
    h.keys().any(|k| k.as_str().starts_with(prefix))
}

fn num(h: &HeaderMap, name: &str) -> Option<u64> {
    super::header_str(h, name)?.trim().parse().ok()
}

/// Header names of one limit: limit, remaining, reset. Static, so reading them on every
/// response allocates nothing.
type Names = [&'static str; 3];

/// OpenAI's `x-ratelimit-*` headers.
pub fn openai(h: &HeaderMap) -> RateLimits {
    const REQUESTS: Names = [
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
    ];
    const TOKENS: Names = [
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    ];
    if !any_named(h, "x-ratelimit-") {
        return RateLimits::default();
    }
    let read = |[limit, remaining, reset]: Names| {
        Some(LimitReading {
            limit: num(h, limit)?,
            remaining: num(h, remaining)?,
            reset: super::header_str(h, reset)
                .and_then(go_duration)
                .unwrap_or_default(),
        })
    };
    RateLimits {
        requests: read(REQUESTS),
        tokens: read(TOKENS),
        ..RateLimits::default()
    }
}

/// Anthropic's `anthropic-ratelimit-*` headers; `now` turns reset instants into waits.
pub fn anthropic(h: &HeaderMap, now: SystemTime) -> RateLimits {
    const UNITS: [Names; 4] = [
        [
            "anthropic-ratelimit-requests-limit",
            "anthropic-ratelimit-requests-remaining",
            "anthropic-ratelimit-requests-reset",
        ],
        [
            "anthropic-ratelimit-tokens-limit",
            "anthropic-ratelimit-tokens-remaining",
            "anthropic-ratelimit-tokens-reset",
        ],
        [
            "anthropic-ratelimit-input-tokens-limit",
            "anthropic-ratelimit-input-tokens-remaining",
            "anthropic-ratelimit-input-tokens-reset",
        ],
        [
            "anthropic-ratelimit-output-tokens-limit",
            "anthropic-ratelimit-output-tokens-remaining",
            "anthropic-ratelimit-output-tokens-reset",
        ],
    ];
    if !any_named(h, "anthropic-ratelimit-") {
        return RateLimits::default();
    }
    let read = |[limit, remaining, reset]: Names| {
        Some(LimitReading {
            limit: num(h, limit)?,
            remaining: num(h, remaining)?,
            reset: super::header_str(h, reset)
                .and_then(rfc3339)
                .map(|t| t.duration_since(now).unwrap_or_default())
                .unwrap_or_default(),
        })
    };
    let [requests, tokens, input, output] = UNITS;
    RateLimits {
        requests: read(requests),
        tokens: read(tokens),
        input_tokens: read(input),
        output_tokens: read(output),
    }
}

/// A Go duration as OpenAI writes it: `1h2m3.5s`, `6m0s`, `12ms`, `250us`.
pub fn go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total = 0.0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|i| *i > 0)?;
        let value: f64 = rest[..split].parse().ok()?;
        rest = &rest[split..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * scale;
        rest = &rest[unit_len..];
    }
    total.is_finite().then(|| Duration::from_secs_f64(total))
}

/// An RFC 3339 instant in UTC (`2025-01-01T00:00:30Z`, fractions and `+00:00` allowed).
pub fn rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let (date, time) = s.split_once(['T', 't', ' '])?;
    let mut d = date.split('-');
    let (y, mo, da): (i64, u32, u32) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let (clock, offset_secs) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
        (c, 0i64)
    } else {
        let i = time.rfind(['+', '-'])?;
        let (c, off) = time.split_at(i);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (oh, om) = off[1..].split_once(':')?;
        (
            c,
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().ok()? * 60),
        )
    };
    let mut c = clock.split(':');
    let (h, mi): (i64, i64) = (c.next()?.parse().ok()?, c.next()?.parse().ok()?);
    let sec: f64 = c.next()?.parse().ok()?;
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || h > 23 || mi > 59 || sec >= 61.0 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let m = i64::from(mo);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(da) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 - offset_secs;
    let total = secs as f64 + sec;
    (total >= 0.0).then(|| UNIX_EPOCH + Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(go_duration("12ms"), Some(Duration::from_millis(12)));
        assert_eq!(go_duration("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(go_duration("0.5s"), Some(Duration::from_millis(500)));
        assert_eq!(
            go_duration("1m30.25s"),
            Some(Duration::from_secs_f64(90.25))
        );
        for bad in ["", "5", "s", "5x", "1h-3m"] {
            assert_eq!(go_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn rfc3339_instants() {
        let t = |s| rfc3339(s).map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64());
        assert_eq!(t("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(t("2025-01-01T00:00:30Z"), Some(1_735_689_630.0));
        assert_eq!(t("2025-01-01T01:00:30+01:00"), Some(1_735_689_630.0));
        assert_eq!(t("2024-02-29T12:00:00.5Z"), Some(1_709_208_000.5));
        assert_eq!(t("2025-13-01T00:00:00Z"), None);
        assert_eq!(t("yesterday"), None);
    }

    #[test]
    fn reads_each_providers_headers() {
        let h = headers(&[
            ("x-ratelimit-limit-requests", "500"),
            ("x-ratelimit-remaining-requests", "499"),
            ("x-ratelimit-reset-requests", "120ms"),
            ("x-ratelimit-limit-tokens", "200000"),
            ("x-ratelimit-remaining-tokens", "199000"),
            ("x-ratelimit-reset-tokens", "300ms"),
        ]);
        let r = openai(&h);
        assert_eq!(
            r.requests,
            Some(LimitReading {
                limit: 500,
                remaining: 499,
                reset: Duration::from_millis(120)
            })
        );
        assert_eq!(r.tokens.unwrap().remaining, 199_000);
        assert_eq!(r.input_tokens, None);

        let now = UNIX_EPOCH + Duration::from_secs(1_735_689_600);
        let h = headers(&[
            ("anthropic-ratelimit-input-tokens-limit", "30000"),
            ("anthropic-ratelimit-input-tokens-remaining", "29000"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2025-01-01T00:00:02Z",
            ),
            ("anthropic-ratelimit-requests-limit", "50"),
        ]);
        let r = anthropic(&h, now);
        assert_eq!(
            r.input_tokens,
            Some(LimitReading {
                limit: 30_000,
                remaining: 29_000,
                reset: Duration::from_secs(2)
            })
        );
        assert_eq!(r.requests, None, "a limit without `remaining` is not read");
        assert_eq!(openai(&HeaderMap::new()), RateLimits::default());
    }
}
