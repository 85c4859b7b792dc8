//! What requests cost: a model's prices, and the dollars a usage or a reservation is worth.

use serde::{Deserialize, Serialize};

use crate::outcome::Usage;

/// A model's prices in US dollars per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Price {
    /// Input tokens.
    pub input_per_mtok: f64,
    /// Output tokens (reasoning included).
    pub output_per_mtok: f64,
    /// Input tokens read from the prompt cache (default: the input price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_input_per_mtok: Option<f64>,
    /// Input tokens written to the prompt cache (Anthropic; default: the input price).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_per_mtok: Option<f64>,
}

const MILLION: f64 = 1_000_000.0;

impl Price {
    /// The cost of a reported usage.
    pub fn cost(&self, u: &Usage) -> f64 {
        let cached = u.cached_tokens.min(u.prompt_tokens);
        let written = u.cache_write_tokens.min(u.prompt_tokens - cached);
        let plain = u.prompt_tokens - cached - written;
        (plain as f64 * self.input_per_mtok
            + cached as f64 * self.cached_input_per_mtok.unwrap_or(self.input_per_mtok)
            + written as f64 * self.cache_write_per_mtok.unwrap_or(self.input_per_mtok)
            + u.completion_tokens as f64 * self.output_per_mtok)
            / MILLION
    }

    /// The most `input` tokens and at most `output` tokens can cost: every input token at
    /// the full input price (the cache can only make it cheaper, except for cache writes,
    /// which a translated request never asks for).
    pub fn bound(&self, input: u64, output: u64) -> f64 {
        (input as f64 * self.input_per_mtok + output as f64 * self.output_per_mtok) / MILLION
    }

    /// Checks that every price is a finite, non-negative number.
    pub fn validate(&self) -> Result<(), String> {
        let all = [
            ("input_per_mtok", Some(self.input_per_mtok)),
            ("output_per_mtok", Some(self.output_per_mtok)),
            ("cached_input_per_mtok", self.cached_input_per_mtok),
            ("cache_write_per_mtok", self.cache_write_per_mtok),
        ];
        for (name, v) in all {
            if let Some(v) = v {
                if !(v.is_finite() && v >= 0.0) {
                    return Err(format!("`{name}` must be a non-negative number, not {v}"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_cost_splits_cached_and_written_input() {
        let p = Price {
            input_per_mtok: 3.0,
            output_per_mtok: 15.0,
            cached_input_per_mtok: Some(0.30),
            cache_write_per_mtok: Some(3.75),
        };
        let u = Usage {
            prompt_tokens: 1_000_000 + 2_000_000 + 100_000,
            completion_tokens: 10_000,
            total_tokens: 0,
            cached_tokens: 2_000_000,
            cache_write_tokens: 100_000,
        };
        let want = 3.0 + 2.0 * 0.30 + 0.1 * 3.75 + 0.01 * 15.0;
        assert!(
            (p.cost(&u) - want).abs() < 1e-12,
            "{} != {want}",
            p.cost(&u)
        );
        // Without cache prices the cached tokens cost the input price.
        let plain = Price {
            cached_input_per_mtok: None,
            cache_write_per_mtok: None,
            ..p
        };
        assert!((plain.cost(&u) - (3.1 * 3.0 + 0.15)).abs() < 1e-12);
        assert!((p.bound(1000, 500) - (0.003 + 0.0075)).abs() < 1e-15);
        assert!(Price {
            input_per_mtok: -1.0,
            ..p
        }
        .validate()
        .is_err());
    }
}
