//! A small, fast, platform-independent 64-bit hash (wyhash-style multiply-mix).
//!
//! Determinism across machines matters more than quality here: fingerprints, content
//! seeds and fault decisions must be the same for the same seed and body everywhere.

use std::hash::{BuildHasherDefault, Hasher};

const P0: u64 = 0xa076_1d64_78bd_642f;
const P1: u64 = 0xe703_7ed1_a0b4_28db;
const P2: u64 = 0x8ebc_6af0_9c88_c6e3;

#[inline]
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    let r = (a as u128).wrapping_mul(b as u128);
    (r as u64) ^ ((r >> 64) as u64)
}

/// Hash `data` with `seed`.
pub(crate) fn hash_bytes(seed: u64, data: &[u8]) -> u64 {
    let mut h = seed ^ P0;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = mix(h ^ w ^ P1, P2 ^ 0x9e37_79b9_7f4a_7c15);
    }
    let rest = chunks.remainder();
    let mut tail = [0u8; 8];
    tail[..rest.len()].copy_from_slice(rest);
    h = mix(h ^ u64::from_le_bytes(tail) ^ P1, P2 ^ data.len() as u64);
    mix(h ^ P0, P1)
}

/// splitmix64's finaliser: a bijection on u64 in which every input bit flips about half of
/// the output bits.
#[inline]
fn finalize(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Combine two 64-bit values into one.
///
/// Decisions drawn from `combine(key, n)` for n = 0, 1, 2, ... must be independent of each
/// other (a fault on one attempt says nothing about the next), so both inputs go through a
/// full-avalanche finaliser. A multiply-fold alone is not enough: for some keys it yields
/// small values whatever `n` is, which made a few requests fault on every attempt.
///
/// `b` must keep all its 64 bits: an earlier `b ^ b.rotate_left(32)` here kept only 32
/// (its two halves are always equal), so a million request fingerprints had ~120 collisions,
/// each counted as a request paid twice.
#[inline]
pub(crate) fn combine(a: u64, b: u64) -> u64 {
    finalize(finalize(a) ^ finalize(b ^ 0x6a09_e667_f3bc_c908))
}

/// A uniform number in `[0, 1)` from a hash.
#[inline]
pub(crate) fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// A `Hasher` for keys that are already hashes.
#[derive(Default)]
pub(crate) struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub(crate) type IdentityBuild = BuildHasherDefault<IdentityHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_collisions_among_a_million_similar_bodies() {
        // The bodies of the million-request benchmark, fingerprinted as the server does: the
        // `combine` used before gave 121 colliding pairs among them, each counted as a
        // request paid twice.
        let path_hash = hash_bytes(0, b"/v1/chat/completions");
        let mut seen = std::collections::HashSet::new();
        for i in 0..1_000_000u32 {
            let body = format!(
                r#"{{"model":"gpt-4.1-mini","messages":[{{"role":"user","content":"Question {i}: summarise the plot of a short story in one sentence."}}],"max_tokens":64}}"#
            );
            let fingerprint = combine(path_hash, hash_bytes(0, body.as_bytes()));
            assert!(seen.insert(fingerprint), "collision at {i}");
        }
    }

    #[test]
    fn hash_is_stable_and_seeded() {
        assert_eq!(hash_bytes(1, b"hello"), hash_bytes(1, b"hello"));
        assert_ne!(hash_bytes(1, b"hello"), hash_bytes(2, b"hello"));
        assert_ne!(hash_bytes(1, b"hello"), hash_bytes(1, b"hellp"));
        assert_ne!(hash_bytes(1, b""), hash_bytes(1, b"\0"));
        let u = unit(hash_bytes(0, b"x"));
        assert!((0.0..1.0).contains(&u));
    }
}

#[cfg(test)]
mod independence_tests {
    use super::*;

    /// With a 10% fault rate, three faulted attempts in a row should happen to about 0.1% of
    /// requests (20 of 20,000), not to a fixed set of unlucky ones.
    #[test]
    fn consecutive_draws_for_one_key_are_independent() {
        let seed = 11;
        let mut all_three = 0;
        let mut first = 0;
        for fp in 0..20_000u64 {
            let key = combine(seed, hash_bytes(seed, format!("request {fp}").as_bytes()));
            let draws: Vec<bool> = (0..3u64)
                .map(|n| unit(combine(key, n ^ 0xfa17)) < 0.1)
                .collect();
            first += draws[0] as u32;
            all_three += draws.iter().all(|d| *d) as u32;
        }
        assert!((1_700..2_300).contains(&first), "first draws: {first}");
        assert!(
            all_three < 60,
            "{all_three} keys faulted three times in a row"
        );
    }
}
