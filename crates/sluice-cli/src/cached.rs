//! The response cache in `sluice run`: requests answered from the cache never reach the
//! engine (so they cost no rate capacity and no money), and identical requests of one run
//! are sent once, the answer fanned out to the others.

use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use rustc_hash::FxHashMap;
use sluice::cache::{self, Batch, Cache, CacheKey, Store};
use sluice::{Outcome, Request, Status};
use tokio::sync::mpsc;

/// A request waiting for an identical one already sent.
struct Follower {
    custom_id: String,
    line: u64,
    metadata: Option<Box<serde_json::value::RawValue>>,
}

/// The requests sent and not yet answered, by key, each with the requests waiting for it.
///
/// The lookups (on the engine's side) and the sink (on the writer's) run on different
/// processors, and a table both write has each of its lines fetched from the other's cache:
/// in a profile of a run of misses, the sink's removing of the answered keys waited on that
/// for two thirds of its time. So the sink leaves the table alone unless someone waits: a
/// request sent carries its key to its outcome ([`Request::cache_key`]), the sink queues
/// the keys answered (`answered`), and the lookups take them out of the table, under the
/// same lock, before they next read it. While any request waits (`followed` is not 0), the
/// sink takes each answered key out itself, so that no request waits for one already
/// answered. (Counting the waiting by key, in a table the sink read for each answer, cost
/// as much as the removing it saved.)
#[derive(Default)]
struct Dedup {
    sent: FxHashMap<CacheKey, Vec<Follower>>,
    /// Keys answered whose entries in `sent` are still to be taken out.
    answered: Vec<CacheKey>,
    /// How many keys of `sent` have requests waiting for them.
    followed: usize,
}

impl Dedup {
    /// Takes the keys the sink answered out of `sent`.
    fn forget_answered(&mut self) {
        for key in self.answered.drain(..) {
            let waited = self.sent.remove(&key);
            debug_assert!(
                waited.is_some_and(|w| w.is_empty()),
                "only keys no one waits for are queued"
            );
        }
    }

    /// Adds a request not in the cache: true when it is to be sent (no identical request
    /// is in flight), else it waits, as `follower()`. The caller forgot the answered keys
    /// first ([`Dedup::forget_answered`]).
    fn lead_or_wait(&mut self, key: CacheKey, follower: impl FnOnce() -> Follower) -> bool {
        match self.sent.entry(key) {
            Entry::Occupied(mut waiting) => {
                if waiting.get().is_empty() {
                    self.followed += 1;
                }
                waiting.get_mut().push(follower());
                false
            }
            Entry::Vacant(none) => {
                none.insert(Vec::new());
                true
            }
        }
    }

    /// Takes `key`, answered, out of `sent`, and returns the requests that waited for it.
    fn answer(&mut self, key: CacheKey) -> Vec<Follower> {
        if self.followed == 0 {
            // No one waits for it: left for the lookups to take out.
            self.answered.push(key);
            return Vec::new();
        }
        let waited = self.sent.remove(&key).unwrap_or_default();
        if !waited.is_empty() {
            self.followed -= 1;
        }
        waited
    }
}

/// What the lookups and the sink share, behind one lock: a profile of a run of misses had
/// taking and releasing the locks (two per request, each an atomic exchange that waits for
/// the processor's pending writes) as most of this layer's own time.
struct Shared {
    cache: Cache,
    dedup: Dedup,
}

/// The cache as `sluice run` uses it, shared by the request stream (lookups) and the sink
/// (fan-out and stores).
#[derive(Clone)]
pub struct CacheLayer {
    shared: Arc<Mutex<Shared>>,
    target: Arc<str>,
}

/// Responses to store at the next commit.
pub type Pending = Batch;

impl CacheLayer {
    /// A layer over `cache` for requests sent to `target` (part of every key).
    pub fn new(cache: Cache, target: &str) -> Self {
        CacheLayer {
            shared: Arc::new(Mutex::new(Shared {
                cache,
                dedup: Dedup::default(),
            })),
            target: target.into(),
        }
    }

    /// Filters `batches` of requests (as the input reader hands them over): cache hits
    /// become outcomes on `hits`, requests identical to one already sent wait for its
    /// answer, the rest go on to the engine, one at a time.
    pub fn filter(
        &self,
        batches: impl Stream<Item = Vec<Request>> + Send + 'static,
        hits: mpsc::Sender<Outcome>,
    ) -> impl Stream<Item = Request> + Send + 'static {
        let layer = self.clone();
        batches
            .then(move |batch| {
                let (send, answered) = layer.sort(batch);
                // A batch of misses needs no sender (cloning one is two atomic operations).
                let hits = (!answered.is_empty()).then(|| hits.clone());
                async move {
                    if let Some(hits) = hits {
                        for outcome in answered {
                            // The receiver lives as long as the run; if it is gone the run
                            // is over and nothing is lost by dropping this.
                            let _ = hits.send(outcome).await;
                        }
                    }
                    futures::stream::iter(send)
                }
            })
            .flatten()
    }

    /// Splits a batch into the requests to send and the outcomes of those the cache
    /// answered (requests that wait for an identical one are held here until it is).
    fn sort(&self, mut batch: Vec<Request>) -> (Vec<Request>, Vec<Outcome>) {
        let keys = cache::keys(&self.target, &batch);
        let mut answered = Vec::new();
        let mut shared = self.shared.lock().expect("not poisoned");
        let Shared { cache, dedup } = &mut *shared;
        dedup.forget_answered();
        // The first thing each lookup reads, most often not in the processor's cache, asked
        // for all at once: the fetches overlap rather than each lookup waiting on its own
        // (in a profile of a run of misses, that wait was most of the lookup).
        for key in &keys {
            cache.prefetch(key);
        }
        let mut keys = keys.into_iter();
        // The requests to send stay in the batch, in order: a batch of misses is not moved
        // at all, nor a second vector allocated for it.
        batch.retain_mut(|request| {
            let key = keys.next().expect("a key for each request");
            let hit = match cache.get(&key) {
                Ok(hit) => hit,
                Err(e) => {
                    tracing::warn!("cache lookup failed, sending the request: {e}");
                    None
                }
            };
            if let Some(hit) = hit {
                answered.push(Outcome {
                    custom_id: std::mem::take(&mut request.custom_id),
                    status: Status::Succeeded,
                    model: std::mem::take(&mut request.model),
                    response: Some(hit.response),
                    error: None,
                    attempts: 0,
                    usage: hit.usage,
                    latency_ms: 0,
                    metadata: request.metadata.take(),
                    // Nothing was paid for it.
                    cost_usd: Some(0.0),
                    cached: true,
                    line: request.line,
                    cache_key: None,
                });
                return false;
            }
            let lead = dedup.lead_or_wait(key, || Follower {
                custom_id: std::mem::take(&mut request.custom_id),
                line: request.line,
                metadata: request.metadata.take(),
            });
            if lead {
                request.cache_key = Some(key);
            }
            lead
        });
        (batch, answered)
    }

    /// Takes the outcomes of requests that were sent: queues their responses for the
    /// cache (on success) and adds to `followers` the outcomes of the requests that waited
    /// for them. One lock for all of them.
    pub fn answered(
        &self,
        outcomes: &[Outcome],
        pending: &mut Pending,
        followers: &mut Vec<Outcome>,
    ) {
        let mut shared = self.shared.lock().expect("not poisoned");
        let dedup = &mut shared.dedup;
        for outcome in outcomes {
            let Some(key) = outcome.cache_key else {
                continue;
            };
            if let (Status::Succeeded, Some(response)) = (outcome.status, &outcome.response) {
                pending.push(&Store {
                    key,
                    model: &outcome.model,
                    response,
                    usage: outcome.usage,
                });
            }
            let waited = dedup.answer(key);
            // A request the run's stop cut short answers nothing: those that waited for it
            // are cut short too (a resume sends them), not answered by it.
            let answers = sluice::journal::is_final(outcome.error.as_ref().map(|e| e.kind));
            followers.extend(waited.into_iter().map(|f| Outcome {
                custom_id: f.custom_id,
                status: outcome.status,
                model: outcome.model.clone(),
                response: outcome.response.clone(),
                error: outcome.error.clone(),
                attempts: 0,
                usage: outcome.usage,
                latency_ms: outcome.latency_ms,
                metadata: f.metadata,
                cost_usd: Some(0.0),
                cached: answers,
                line: f.line,
                cache_key: None,
            }));
        }
    }

    /// Stores the responses that the cache lacks of the outcomes a killed session
    /// journaled but may not have stored (see `sluice::journal::Journal::log_outcomes`):
    /// `lines[i]` is the output line of the outcome of `requests[i]` (read again from the
    /// input). An outcome is taken only when it was sent
    /// (not itself from the cache) and names the request's `custom_id`, so a response is
    /// never stored under another request's key. Returns how many were stored.
    pub fn restore(
        &self,
        requests: &[Request],
        lines: &[&[u8]],
    ) -> Result<usize, sluice::cache::CacheError> {
        assert_eq!(requests.len(), lines.len(), "a line for each request");
        /// What an output line says that storing it needs.
        #[derive(serde::Deserialize)]
        struct Line {
            custom_id: String,
            status: Status,
            model: String,
            response: Option<sluice::json::RawJson>,
            usage: Option<sluice::Usage>,
            #[serde(default)]
            cached: bool,
        }
        let keys = cache::keys(&self.target, requests);
        let mut shared = self.shared.lock().expect("not poisoned");
        let mut pending = Pending::with_capacity(requests.len());
        let mut seen = std::collections::HashSet::new();
        for ((request, text), key) in requests.iter().zip(lines).zip(keys) {
            let Ok(line) = serde_json::from_slice::<Line>(text) else {
                continue;
            };
            let Some(response) = line.response.as_ref() else {
                continue;
            };
            if line.status != Status::Succeeded
                || line.cached
                || line.custom_id != request.custom_id
                || !seen.insert(key)
                || shared.cache.get(&key)?.is_some()
            {
                continue;
            }
            pending.push(&Store {
                key,
                model: &line.model,
                response,
                usage: line.usage,
            });
        }
        let stored = pending.len();
        if stored > 0 {
            shared.cache.put_batch(&mut pending)?;
        }
        Ok(stored)
    }

    /// Stores the queued responses.
    pub fn store(&self, pending: &mut Pending) -> Result<(), sluice::cache::CacheError> {
        if pending.is_empty() {
            return Ok(());
        }
        let mut shared = self.shared.lock().expect("not poisoned");
        shared.cache.put_batch(pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice::request::LineParser;
    use sluice::{ErrorInfo, ErrorKind};

    fn layer(dir: &std::path::Path) -> CacheLayer {
        let cache = Cache::open(&dir.join("cache.sqlite"), false).unwrap();
        CacheLayer::new(cache, "openai|http://127.0.0.1:1/v1")
    }

    fn twins() -> Vec<Request> {
        let parser = LineParser::new(Some("gpt-4.1-mini".into()));
        (1..=2)
            .map(|line| {
                let text = format!(r#"{{"custom_id":"c{line}","prompt":"the same question"}}"#);
                parser.parse(line, &text).unwrap()
            })
            .collect()
    }

    fn failed(request: &Request, kind: ErrorKind) -> Outcome {
        Outcome {
            custom_id: request.custom_id.clone(),
            status: Status::Failed,
            model: request.model.clone(),
            response: None,
            error: Some(ErrorInfo {
                kind,
                status: None,
                message: "why".into(),
            }),
            attempts: u32::from(kind != ErrorKind::NotAttempted),
            usage: None,
            latency_ms: 0,
            metadata: None,
            cost_usd: None,
            cached: false,
            line: request.line,
            cache_key: request.cache_key,
        }
    }

    #[test]
    fn a_restore_stores_only_responses_that_were_paid_for_under_their_own_request() {
        let dir = tempfile::tempdir().unwrap();
        let layer = layer(dir.path());
        let parser = LineParser::new(Some("gpt-4.1-mini".into()));
        let request = |line: u64| {
            let text = format!(r#"{{"custom_id":"c{line}","prompt":"question {line}"}}"#);
            parser.parse(line, &text).unwrap()
        };
        let line = |id: &str, status: &str, cached: bool| {
            format!(r#"{{"custom_id":"{id}","status":"{status}","model":"gpt-4.1-mini","response":{{"answer":"{id}"}},"error":null,"attempts":1,"usage":{{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}},"cost_usd":0.001,"latency_ms":5,"metadata":null,"cached":{cached}}}"#)
            .into_bytes()
        };
        let (good, other, hit, failed) = (
            line("c1", "succeeded", false),
            line("c9", "succeeded", false),
            line("c3", "succeeded", true),
            line("c4", "failed", false),
        );
        let requests: Vec<Request> = (1..=4).map(request).collect();
        let lines = [
            good.as_slice(),
            // Another request's answer (the line was another input's): never stored.
            other.as_slice(),
            // From the cache, or from an identical request: stored with that one.
            hit.as_slice(),
            failed.as_slice(),
        ];
        assert_eq!(layer.restore(&requests, &lines).unwrap(), 1);
        let keys = cache::keys(&layer.target, &requests);
        let shared = layer.shared.lock().unwrap();
        let stored = shared.cache.get(&keys[0]).unwrap().expect("stored");
        assert_eq!(stored.response.get(), r#"{"answer":"c1"}"#);
        assert_eq!(stored.usage.map(|u| u.completion_tokens), Some(4));
        for key in &keys[1..] {
            assert!(shared.cache.get(key).unwrap().is_none());
        }
        drop(shared);
        assert_eq!(
            layer.restore(&requests, &lines).unwrap(),
            0,
            "not stored twice"
        );
    }

    #[test]
    fn those_waiting_for_a_request_the_stop_cut_short_are_cut_short_not_answered() {
        for (kind, answered) in [
            (ErrorKind::NotAttempted, false),
            (ErrorKind::Stopped, false),
            (ErrorKind::BadRequest, true),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let layer = layer(dir.path());
            let requests = twins();
            let (send, hits) = layer.sort(requests.clone());
            assert!(hits.is_empty());
            assert_eq!(send.len(), 1, "the second waits for the first");
            let mut pending = Pending::with_capacity(1);
            let mut followers = Vec::new();
            layer.answered(&[failed(&send[0], kind)], &mut pending, &mut followers);
            assert_eq!(followers.len(), 1);
            let f = &followers[0];
            assert_eq!((f.custom_id.as_str(), f.line), ("c2", 2));
            assert_eq!(f.error.as_ref().map(|e| e.kind), Some(kind));
            assert_eq!(f.cached, answered, "{kind}");
            assert_eq!((f.attempts, f.cost_usd), (0, Some(0.0)));
            assert!(pending.is_empty(), "a failure is not cached");
        }
    }

    /// A request identical to one already answered (its answer not yet stored) is sent
    /// again, not held for an answer that has gone by: the sink queued the key, and the
    /// next lookups took it out of the table of requests in flight first.
    #[test]
    fn a_request_identical_to_one_answered_is_sent_not_held() {
        let dir = tempfile::tempdir().unwrap();
        let layer = layer(dir.path());
        let mut twins = twins();
        let second = twins.pop().unwrap();
        let (send, _) = layer.sort(twins);
        assert_eq!(send.len(), 1);
        let mut pending = Pending::with_capacity(1);
        let mut followers = Vec::new();
        layer.answered(
            &[failed(&send[0], ErrorKind::ServerError)],
            &mut pending,
            &mut followers,
        );
        assert!(followers.is_empty());
        let (send, hits) = layer.sort(vec![second]);
        assert!(hits.is_empty());
        assert_eq!(send.len(), 1, "sent, not waiting");
        assert_eq!(send[0].custom_id, "c2");
        let shared = layer.shared.lock().unwrap();
        assert_eq!(shared.dedup.sent.len(), 1, "only the second is in flight");
        assert!(shared.dedup.answered.is_empty());
    }

    /// The table of requests in flight, against a plain model of it, through a seeded
    /// random run of sends and answers over a few keys (so that keys with and without
    /// followers are answered side by side, and the sink's taking out of keys goes from
    /// one way to the other): every request waiting is answered once, by the request it
    /// waited for, and none is left behind.
    #[test]
    fn the_requests_in_flight_are_answered_as_a_plain_table_would() {
        use rand::{Rng, SeedableRng};
        for seed in 0..20u64 {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            let mut dedup = Dedup::default();
            // The model: each key in flight, with the lines waiting for it.
            let mut model: std::collections::HashMap<CacheKey, Vec<u64>> = Default::default();
            let mut line = 0;
            for _ in 0..2000 {
                if rng.random_bool(0.55) {
                    dedup.forget_answered();
                    for _ in 0..rng.random_range(1..4) {
                        let mut key = [0u8; 32];
                        key[31] = rng.random_range(0..24);
                        line += 1;
                        let lead = dedup.lead_or_wait(key, || Follower {
                            custom_id: format!("c{line}"),
                            line,
                            metadata: None,
                        });
                        match model.entry(key) {
                            std::collections::hash_map::Entry::Occupied(mut e) => {
                                assert!(!lead, "seed {seed}: a twin of one in flight waits");
                                e.get_mut().push(line);
                            }
                            std::collections::hash_map::Entry::Vacant(e) => {
                                assert!(lead, "seed {seed}: sent");
                                e.insert(Vec::new());
                            }
                        }
                    }
                } else if !model.is_empty() {
                    let mut keys: Vec<CacheKey> = model.keys().copied().collect();
                    keys.sort();
                    let key = keys[rng.random_range(0..keys.len())];
                    let want = model.remove(&key).unwrap();
                    let got: Vec<u64> = dedup.answer(key).iter().map(|f| f.line).collect();
                    assert_eq!(got, want, "seed {seed}");
                }
            }
            for (key, want) in model.drain() {
                let got: Vec<u64> = dedup.answer(key).iter().map(|f| f.line).collect();
                assert_eq!(got, want, "seed {seed}");
            }
            dedup.forget_answered();
            assert!(dedup.sent.is_empty(), "seed {seed}");
            assert_eq!(dedup.followed, 0, "seed {seed}");
        }
    }
}
