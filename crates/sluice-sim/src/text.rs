//! Text helpers: the word vocabulary, the prompt-token estimate, and the time formats of
//! the rate-limit headers.

use std::time::{Duration, SystemTime};

use rand::rngs::SmallRng;
use rand::{Rng, RngCore};

/// 64 words, so one random byte (6 bits) picks one.
const WORDS: [&str; 64] = [
    "the", "river", "flows", "through", "a", "narrow", "sluice", "gate", "and", "water", "rises",
    "slowly", "over", "stone", "while", "light", "falls", "on", "quiet", "fields", "of", "green",
    "barley", "under", "open", "sky", "birds", "turn", "above", "old", "mills", "where", "wheels",
    "once", "ground", "grain", "into", "flour", "for", "bread", "in", "every", "house", "along",
    "bank", "people", "gather", "at", "dusk", "to", "watch", "boats", "drift", "past", "willow",
    "trees", "bending", "low", "toward", "cool", "deep", "pools", "beneath", "bridges",
];

/// The token estimate of one text piece: `ceil(bytes / 4)`.
#[inline]
pub(crate) fn text_tokens(s: &str) -> u64 {
    (s.len() as u64).div_ceil(4)
}

/// Draw a completion length from `range`, capped by `max`. Returns `(tokens, capped)`.
pub(crate) fn draw_length(rng: &mut SmallRng, range: (u32, u32), max: Option<u32>) -> (u32, bool) {
    let (lo, hi) = if range.0 <= range.1 {
        range
    } else {
        (range.1, range.0)
    };
    let drawn = rng.random_range(lo..=hi);
    match max {
        Some(m) if drawn > m => (m, true),
        _ => (drawn, false),
    }
}

/// Append `count` space-separated words to `out`.
pub(crate) fn push_words(rng: &mut SmallRng, count: u32, out: &mut String) {
    let mut bits = 0u64;
    let mut left = 0;
    for i in 0..count {
        if left == 0 {
            bits = rng.next_u64();
            left = 10;
        }
        if i > 0 {
            out.push(' ');
        }
        out.push_str(WORDS[(bits & 63) as usize]);
        bits >>= 6;
        left -= 1;
    }
}

/// `count` words, each with its leading separator, for streaming: concatenating the
/// pieces gives exactly what [`push_words`] would.
pub(crate) fn word_pieces(rng: &mut SmallRng, count: u32) -> Vec<String> {
    let mut s = String::new();
    push_words(rng, count, &mut s);
    let mut out = Vec::with_capacity(count as usize);
    let mut first = true;
    for w in s.split(' ') {
        if count == 0 {
            break;
        }
        if first {
            out.push(w.to_string());
            first = false;
        } else {
            out.push(format!(" {w}"));
        }
    }
    out
}

/// Format a duration like Go's `time.Duration.String()` at millisecond precision
/// (rounded up): `0s`, `120ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s`.
pub(crate) fn go_duration(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000) as u64;
    if ms == 0 {
        return "0s".to_string();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let h = ms / 3_600_000;
    let m = (ms / 60_000) % 60;
    let s_ms = ms % 60_000;
    let frac_ms = s_ms % 1000;
    let secs = if frac_ms == 0 {
        format!("{}", s_ms / 1000)
    } else {
        let frac = format!("{frac_ms:03}");
        format!("{}.{}", s_ms / 1000, frac.trim_end_matches('0'))
    };
    if h > 0 {
        format!("{h}h{m}m{secs}s")
    } else if m > 0 {
        format!("{m}m{secs}s")
    } else {
        format!("{secs}s")
    }
}

/// The wall-clock time `d` from now as RFC 3339 UTC with whole seconds (rounded up).
pub(crate) fn rfc3339_in(d: Duration) -> String {
    let at = SystemTime::now() + d + Duration::from_millis(999);
    let t = time::OffsetDateTime::from(at);
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(go_duration(Duration::from_millis(120)), "120ms");
        assert_eq!(go_duration(Duration::from_micros(1)), "1ms");
        assert_eq!(go_duration(Duration::from_secs(1)), "1s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_millis(1020)), "1.02s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(go_duration(Duration::from_secs(3723)), "1h2m3s");
        assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
    }

    #[test]
    fn rfc3339_is_utc_seconds() {
        let s = rfc3339_in(Duration::from_secs(5));
        assert!(s.ends_with('Z'), "{s}");
        assert_eq!(s.len(), "2026-01-01T00:00:00Z".len(), "{s}");
    }

    #[test]
    fn pieces_match_words() {
        let mut a = SmallRng::seed_from_u64(7);
        let mut b = SmallRng::seed_from_u64(7);
        let mut s = String::new();
        push_words(&mut a, 25, &mut s);
        assert_eq!(word_pieces(&mut b, 25).concat(), s);
        assert_eq!(s.split(' ').count(), 25);
        assert!(word_pieces(&mut b, 0).is_empty());
    }

    #[test]
    fn token_estimate() {
        assert_eq!(text_tokens(""), 0);
        assert_eq!(text_tokens("abcd"), 1);
        assert_eq!(text_tokens("abcde"), 2);
    }
}
