//! Lock-free counters behind [`crate::SimStats`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::{FaultKind, SimStats};

#[derive(Default)]
pub(crate) struct Stats {
    pub requests: AtomicU64,
    pub ok: AtomicU64,
    pub rate_limited: AtomicU64,
    pub faults: [AtomicU64; 11],
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
    pub ok_duplicates: AtomicU64,
    pub bad_requests: AtomicU64,
    pub unauthorized: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
}

pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

impl Stats {
    pub fn enter(&self) {
        let now = self.in_flight.fetch_add(1, Relaxed) + 1;
        self.max_in_flight.fetch_max(now, Relaxed);
    }

    pub fn leave(&self) {
        self.in_flight.fetch_sub(1, Relaxed);
    }

    pub fn fault(&self, kind: FaultKind) {
        inc(&self.faults[kind.index()]);
    }

    pub fn tokens(&self, prompt: u64, completion: u64) {
        self.prompt_tokens.fetch_add(prompt, Relaxed);
        self.completion_tokens.fetch_add(completion, Relaxed);
    }

    pub fn reset(&self) {
        for c in [
            &self.requests,
            &self.ok,
            &self.rate_limited,
            &self.ok_duplicates,
            &self.bad_requests,
            &self.unauthorized,
            &self.prompt_tokens,
            &self.completion_tokens,
        ] {
            c.store(0, Relaxed);
        }
        for c in &self.faults {
            c.store(0, Relaxed);
        }
        self.max_in_flight
            .store(self.in_flight.load(Relaxed), Relaxed);
    }

    pub fn snapshot(&self) -> SimStats {
        let injected_faults: BTreeMap<String, u64> = FaultKind::ALL
            .iter()
            .map(|k| (k.name().to_string(), self.faults[k.index()].load(Relaxed)))
            .collect();
        SimStats {
            requests: self.requests.load(Relaxed),
            ok: self.ok.load(Relaxed),
            rate_limited: self.rate_limited.load(Relaxed),
            injected_faults,
            in_flight: self.in_flight.load(Relaxed),
            max_in_flight: self.max_in_flight.load(Relaxed),
            ok_duplicates: self.ok_duplicates.load(Relaxed),
            bad_requests: self.bad_requests.load(Relaxed),
            unauthorized: self.unauthorized.load(Relaxed),
            prompt_tokens: self.prompt_tokens.load(Relaxed),
            completion_tokens: self.completion_tokens.load(Relaxed),
        }
    }
}
