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

/// Combine two 64-bit values into one.
#[inline]
pub(crate) fn combine(a: u64, b: u64) -> u64 {
    mix(a ^ P0, b ^ P1) ^ mix(b ^ P2, a ^ P0)
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
    fn hash_is_stable_and_seeded() {
        assert_eq!(hash_bytes(1, b"hello"), hash_bytes(1, b"hello"));
        assert_ne!(hash_bytes(1, b"hello"), hash_bytes(2, b"hello"));
        assert_ne!(hash_bytes(1, b"hello"), hash_bytes(1, b"hellp"));
        assert_ne!(hash_bytes(1, b""), hash_bytes(1, b"\0"));
        let u = unit(hash_bytes(0, b"x"));
        assert!((0.0..1.0).contains(&u));
    }
}
