//! The end-of-run summary, added up from the outcomes themselves (never from counters
//! that several code paths bump), plus the engine's retry and 429 counters.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::engine::{ProgressSnapshot, RunEnd, StopReason};
use crate::outcome::{ErrorKind, Outcome, Status};

/// Failures of one kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FailureGroup {
    /// How many.
    pub count: u64,
    /// One of them.
    pub example_custom_id: String,
    /// Its message.
    pub example_message: String,
}

/// Everything a user wants to know when a run ends. Serialises to the `--report` JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Outcomes written.
    pub total: u64,
    /// Outcomes `succeeded`.
    pub succeeded: u64,
    /// Outcomes `failed`.
    pub failed: u64,
    /// Outcomes answered from the cache or by an identical request of the run (not sent).
    pub cache_hits: u64,
    /// Failures by kind, with an example each.
    pub failures: BTreeMap<ErrorKind, FailureGroup>,
    /// HTTP attempts made.
    pub attempts: u64,
    /// Attempts that were retries.
    pub retries: u64,
    /// 429 responses.
    pub rate_limited: u64,
    /// Cooldowns started by 429 bursts.
    pub cooldowns: u64,
    /// Requests moved to their fallback model.
    pub fallbacks: u64,
    /// Input tokens of successful requests.
    pub prompt_tokens: u64,
    /// Output tokens of successful requests.
    pub completion_tokens: u64,
    /// What the run cost in US dollars: every answer at its model's price, plus
    /// estimates for attempts billed although their answer was lost.
    pub cost_usd: f64,
    /// Requests sent to models without a known price, not in `cost_usd`.
    pub unpriced_requests: u64,
    /// Wall time of the run, seconds.
    pub wall_secs: f64,
    /// The least time the rate limits allowed for the requests that were sent, seconds
    /// (absent without limits).
    pub ideal_secs: Option<f64>,
    /// Why the run stopped early, if it did.
    pub stopped: Option<StopReason>,
    /// Whether input was left unread.
    pub input_left: bool,
}

/// Adds outcomes up into a [`Summary`].
#[derive(Clone, Debug, Default)]
pub struct SummaryBuilder {
    total: u64,
    succeeded: u64,
    failed: u64,
    cache_hits: u64,
    sent: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost_usd: f64,
    unpriced_requests: u64,
    failures: BTreeMap<ErrorKind, FailureGroup>,
}

impl SummaryBuilder {
    /// A builder with nothing counted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one outcome.
    pub fn add(&mut self, outcome: &Outcome) {
        self.total += 1;
        if outcome.attempts > 0 {
            self.sent += 1;
        }
        match outcome.status {
            Status::Succeeded => self.succeeded += 1,
            Status::Failed => self.failed += 1,
        }
        if outcome.cached {
            self.cache_hits += 1;
        }
        match outcome.cost_usd {
            Some(c) => self.cost_usd += c,
            None if outcome.attempts > 0 => self.unpriced_requests += 1,
            None => {}
        }
        // Nothing was sent or paid for a cached outcome.
        if let Some(u) = outcome.usage.filter(|_| !outcome.cached) {
            self.prompt_tokens += u.prompt_tokens;
            self.completion_tokens += u.completion_tokens;
        }
        if let Some(e) = &outcome.error {
            self.failures
                .entry(e.kind)
                .and_modify(|g| g.count += 1)
                .or_insert_with(|| FailureGroup {
                    count: 1,
                    example_custom_id: outcome.custom_id.clone(),
                    example_message: e.message.clone(),
                });
        }
    }

    /// The summary, with the engine's counters, the wall time and the limits it ran under.
    pub fn finish(
        self,
        progress: &ProgressSnapshot,
        end: Option<&RunEnd>,
        wall: Duration,
        rpm: Option<f64>,
        tpm: Option<f64>,
    ) -> Summary {
        let by_requests = rpm.map(|r| self.sent as f64 * 60.0 / r);
        let tokens = (self.prompt_tokens + self.completion_tokens) as f64;
        let by_tokens = tpm.map(|t| tokens * 60.0 / t);
        let ideal_secs = match (by_requests, by_tokens) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        Summary {
            total: self.total,
            succeeded: self.succeeded,
            failed: self.failed,
            cache_hits: self.cache_hits,
            failures: self.failures,
            attempts: progress.attempts,
            retries: progress.retries,
            rate_limited: progress.rate_limited,
            cooldowns: progress.cooldowns,
            fallbacks: progress.fallbacks,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cost_usd: self.cost_usd,
            unpriced_requests: self.unpriced_requests,
            wall_secs: wall.as_secs_f64(),
            ideal_secs,
            stopped: end.and_then(|e| e.stopped),
            input_left: end.is_some_and(|e| e.input_left),
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {} succeeded, {} failed",
            self.total,
            if self.total == 1 {
                "request"
            } else {
                "requests"
            },
            self.succeeded,
            self.failed
        )?;
        let cut_short: u64 = self
            .failures
            .iter()
            .filter(|(kind, _)| !crate::journal::is_final(Some(**kind)))
            .map(|(_, g)| g.count)
            .sum();
        if cut_short > 0 {
            write!(f, " ({cut_short} of them only cut short by the run's stop)")?;
        }
        writeln!(f)?;
        if self.cache_hits > 0 {
            writeln!(
                f,
                "  {} answered from the cache or by an identical request (not sent)",
                self.cache_hits
            )?;
        }
        for (kind, g) in &self.failures {
            writeln!(
                f,
                "  {kind}: {} (e.g. {}: {})",
                g.count, g.example_custom_id, g.example_message
            )?;
        }
        writeln!(
            f,
            "attempts {}, retries {}, 429s {}, cooldowns {}",
            self.attempts, self.retries, self.rate_limited, self.cooldowns
        )?;
        if self.fallbacks > 0 {
            writeln!(f, "fallbacks to the next model: {}", self.fallbacks)?;
        }
        writeln!(
            f,
            "tokens: {} in, {} out",
            self.prompt_tokens, self.completion_tokens
        )?;
        write!(f, "cost: ${:.4}", self.cost_usd)?;
        if self.unpriced_requests > 0 {
            write!(
                f,
                " (not counting {} requests to models without a known price)",
                self.unpriced_requests
            )?;
        }
        writeln!(f)?;
        write!(f, "wall time {:.2}s", self.wall_secs)?;
        // Under a second the limits do not bound the run (the buckets hold about a
        // second's worth): its time is latency, and the ideal nothing to measure it by.
        if let Some(ideal) = self.ideal_secs.filter(|&i| i >= 1.0) {
            write!(
                f,
                ", ideal {ideal:.2}s under the limits ({:.1}% of ideal)",
                100.0 * self.wall_secs / ideal
            )?;
        }
        writeln!(f)?;
        match self.stopped {
            Some(StopReason::QuotaExhausted) => writeln!(
                f,
                "stopped: the provider reports the quota or spend limit exhausted; requests not sent are marked not_attempted"
            )?,
            Some(StopReason::BudgetExhausted) => writeln!(
                f,
                "stopped: the next request could have taken spending past --budget; requests not sent are marked not_attempted"
            )?,
            Some(reason @ (StopReason::Interrupted | StopReason::Failed)) => writeln!(
                f,
                "stopped: {}; requests not sent are marked {}{}",
                match reason {
                    StopReason::Failed => "the run could not go on (the error is below)",
                    _ => "interrupted",
                },
                ErrorKind::NotAttempted,
                if self.input_left { ", input left unread" } else { "" }
            )?,
            None => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(kind: ErrorKind) -> Outcome {
        Outcome {
            custom_id: "x".into(),
            status: Status::Failed,
            model: "m".into(),
            response: None,
            error: Some(crate::outcome::ErrorInfo {
                kind,
                status: None,
                message: "why".into(),
            }),
            attempts: 0,
            usage: None,
            latency_ms: 0,
            metadata: None,
            cost_usd: None,
            cached: false,
            line: 1,
            cache_key: None,
        }
    }

    #[test]
    fn failures_a_stop_cut_short_are_told_apart_from_the_others() {
        let mut b = SummaryBuilder::new();
        for kind in [
            ErrorKind::NotAttempted,
            ErrorKind::NotAttempted,
            ErrorKind::Stopped,
            ErrorKind::BadRequest,
        ] {
            b.add(&failed(kind));
        }
        let progress = ProgressSnapshot::default();
        let text = b
            .finish(&progress, None, Duration::from_secs(1), None, None)
            .to_string();
        assert!(
            text.starts_with(
                "4 requests: 0 succeeded, 4 failed (3 of them only cut short by the run's stop)\n"
            ),
            "{text}"
        );
        let mut b = SummaryBuilder::new();
        b.add(&failed(ErrorKind::BadRequest));
        let text = b
            .finish(&progress, None, Duration::from_secs(1), None, None)
            .to_string();
        assert!(
            text.starts_with("1 request: 0 succeeded, 1 failed\n"),
            "{text}"
        );
    }

    #[test]
    fn the_ideal_time_is_given_only_where_the_limits_bound_the_run() {
        let progress = ProgressSnapshot::default();
        let summary = |rpm: f64| {
            let mut b = SummaryBuilder::new();
            b.sent = 5;
            b.finish(&progress, None, Duration::from_secs(2), Some(rpm), None)
                .to_string()
        };
        // 5 requests at 60 a minute: 5 s, and the run took 2.
        let text = summary(60.0);
        assert!(
            text.contains("wall time 2.00s, ideal 5.00s under the limits (40.0% of ideal)"),
            "{text}"
        );
        // At 600 a minute they fit in the buckets' first second: no ideal to speak of.
        let text = summary(600.0);
        assert!(text.contains("wall time 2.00s\n"), "{text}");
    }
}
