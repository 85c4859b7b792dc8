//! The live progress line on a terminal (indicatif), fed from the engine's counters.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sluice::Progress;
use tokio::task::JoinHandle;

/// How often the line is redrawn.
const TICK: Duration = Duration::from_millis(250);
/// Rates are measured over this much recent time.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// A progress bar that redraws itself until [`finish`](Self::finish).
pub struct ProgressView {
    bar: ProgressBar,
    ticker: Option<JoinHandle<()>>,
}

impl ProgressView {
    /// Starts drawing on stderr when `enabled`; otherwise stays silent.
    pub fn start(
        total: u64,
        progress: Arc<Progress>,
        rpm: Option<f64>,
        tpm: Option<f64>,
        budget: Option<f64>,
        enabled: bool,
    ) -> Self {
        if !enabled {
            return ProgressView {
                bar: ProgressBar::hidden(),
                ticker: None,
            };
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} ETA {eta}\n{msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        let b = bar.clone();
        let ticker = tokio::spawn(async move {
            let mut samples: VecDeque<(Instant, u64, u64)> = VecDeque::new();
            let mut tick = tokio::time::interval(TICK);
            loop {
                tick.tick().await;
                let s = progress.snapshot();
                let now = Instant::now();
                let tokens = s.prompt_tokens + s.completion_tokens;
                samples.push_back((now, s.attempts, tokens));
                while samples
                    .front()
                    .is_some_and(|(t, _, _)| now - *t > RATE_WINDOW)
                {
                    samples.pop_front();
                }
                let (t0, a0, k0) = samples[0];
                let dt = (now - t0).as_secs_f64();
                let (req_min, tok_min) = if dt > 0.5 {
                    (
                        (s.attempts - a0) as f64 * 60.0 / dt,
                        (tokens - k0) as f64 * 60.0 / dt,
                    )
                } else {
                    (0.0, 0.0)
                };
                b.set_position(s.succeeded + s.failed);
                let spent = s.cost_micro_usd as f64 / 1e6;
                let cost = match budget {
                    Some(b) => format!("${spent:.4} of ${b:.2}"),
                    None => format!("${spent:.4}"),
                };
                b.set_message(format!(
                    "{} ok · {} failed · {} in flight · {} waiting · {} req/min · {} tok/min · {} retries · {} 429s · {cost}",
                    s.succeeded,
                    s.failed,
                    s.in_flight,
                    s.waiting,
                    rate(req_min, rpm),
                    rate(tok_min, tpm),
                    s.retries,
                    s.rate_limited,
                ));
            }
        });
        ProgressView {
            bar,
            ticker: Some(ticker),
        }
    }

    /// Prints a line above the bar (or to stderr when hidden).
    pub fn println(&self, msg: &str) {
        if self.bar.is_hidden() {
            eprintln!("{msg}");
        } else {
            self.bar.println(msg);
        }
    }

    /// Stops drawing and clears the bar.
    pub fn finish(&self) {
        if let Some(t) = &self.ticker {
            t.abort();
        }
        self.bar.finish_and_clear();
    }
}

fn rate(value: f64, limit: Option<f64>) -> String {
    match limit {
        Some(l) => format!("{value:.0}/{l:.0}"),
        None => format!("{value:.0}"),
    }
}
