//! The cost of a cache key: nanoseconds per request for 100,000 requests shaped like the
//! engine benchmark's, the best of ROUNDS [15] passes, taken in batches of 16 as `sluice run`
//! takes them (`keys`), and one at a time (`key`).
//!
//!     cargo run --release -p sluice --example cache_key [ROUNDS]
//!
//! Instructions instead of time (steady on a busy machine):
//!
//!     valgrind --tool=callgrind --toggle-collect='sluice::cache::keys' \
//!         target/release/examples/cache_key 1

use sluice::request::LineParser;

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(15, |a| a.parse().expect("ROUNDS is a number"));
    let mut parser = LineParser::new(Some("gpt-4.1-mini".into()));
    parser.count_tokens = false;
    let requests: Vec<_> = (0..100_000u64)
        .map(|i| {
            let line = format!(
                r#"{{"custom_id":"q{i}","model":"gpt-4.1-mini","messages":[{{"role":"user","content":"Question {i}: summarise the plot of a short story in one sentence."}}],"max_tokens":64}}"#
            );
            parser.parse(i + 1, &line).expect("a valid line")
        })
        .collect();
    let target = "openai|http://127.0.0.1:1/v1";
    let mut seen = 0u8;
    let mut time = |what: &str, each: &mut dyn FnMut(&[sluice::Request]) -> u8| {
        let mut best = f64::MAX;
        for _ in 0..rounds {
            let t = std::time::Instant::now();
            for batch in requests.chunks(16) {
                seen ^= each(batch);
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "cache {what}: {:.0} ns/request (best of {rounds})",
            best * 1e9 / requests.len() as f64
        );
    };
    time("keys, 16 at a time", &mut |batch| {
        sluice::cache::keys(target, batch)[0][0]
    });
    time("key, one at a time", &mut |batch| {
        batch
            .iter()
            .fold(0, |x, r| x ^ sluice::cache::key(target, r)[0])
    });
    std::hint::black_box(seen);
}
