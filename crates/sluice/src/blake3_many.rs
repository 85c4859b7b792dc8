//! BLAKE3 of many short inputs at once: a lane of the processor's vectors for each input.
//!
//! The `blake3` crate hashes one input at a time, and an input of one chunk (up to 1,024
//! bytes) at a time is one compression after another: its SIMD code only pays off for long
//! inputs. The cache's keys are a few hundred bytes each, a batch of them at a time, so here
//! the inputs of a batch are hashed side by side, 16 (AVX-512) or 8 (AVX2) at once, the
//! layout BLAKE3's own parallel mode was designed for. No crate offers it: `blake3`'s
//! `hash_many` is an unstable internal for benchmarks, and it takes only whole blocks of
//! equal count. Each lane here has its own length, flags and number of blocks.
//!
//! The result is BLAKE3's, byte for byte (a test holds it to the `blake3` crate for every
//! length). Inputs longer than a chunk, and every input on a processor without AVX2, are
//! hashed by the `blake3` crate.

// Elsewhere than x86-64 every input goes to the `blake3` crate, and BLAKE3's constants
// here are not used.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

/// An input this long at most is one chunk, hashed here.
const CHUNK_LEN: usize = 1024;
const BLOCK_LEN: usize = 64;

const IV: [u32; 8] = [
    0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
];
const CHUNK_START: u32 = 1;
const CHUNK_END: u32 = 2;
const ROOT: u32 = 8;

/// The message words each of the seven rounds takes, in order (the permutation applied
/// round after round).
const SCHEDULE: [[usize; 16]; 7] = schedule();

const fn schedule() -> [[usize; 16]; 7] {
    const PERMUTATION: [usize; 16] = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8];
    let mut s = [[0; 16]; 7];
    let mut i = 0;
    while i < 16 {
        s[0][i] = i;
        i += 1;
    }
    let mut r = 1;
    while r < 7 {
        let mut i = 0;
        while i < 16 {
            s[r][i] = s[r - 1][PERMUTATION[i]];
            i += 1;
        }
        r += 1;
    }
    s
}

/// The chaining value after the first block of an input longer than a block, kept from one
/// call of [`hash_many`] to the next: inputs that begin with that block start from there.
/// A cache key's input begins with the target, the endpoint and the model, most often more
/// than a block of them, the same for every request of a run: a key of four blocks is three
/// compressions instead of four.
#[derive(Default)]
pub(crate) struct FirstBlock(Option<([u8; BLOCK_LEN], [u32; 8])>);

/// BLAKE3 of each input, into `out` (as long as `inputs`), starting from `first` where an
/// input begins with its block (and keeping there the first block of an input that does
/// not, in its place).
pub(crate) fn hash_many(inputs: &[&[u8]], out: &mut [[u8; 32]], first: &mut FirstBlock) {
    assert_eq!(inputs.len(), out.len(), "a hash for each input");
    #[cfg(target_arch = "x86_64")]
    {
        if inputs.len() > 1 {
            // SAFETY: the processor has the instructions of each width used.
            if std::is_x86_feature_detected!("avx512f") {
                return unsafe { with_lanes(inputs, out, 16, first) };
            }
            if std::is_x86_feature_detected!("avx2") {
                return unsafe { with_lanes(inputs, out, 8, first) };
            }
        }
    }
    let _ = first;
    one_at_a_time(inputs, out);
}

fn one_at_a_time(inputs: &[&[u8]], out: &mut [[u8; 32]]) {
    for (input, hash) in inputs.iter().zip(out) {
        *hash = *blake3::hash(input).as_bytes();
    }
}

/// [`hash_many`] `lanes` (16 or 8) at a time.
///
/// # Safety
///
/// The processor has AVX-512 (`lanes` 16) or AVX2 (8).
#[cfg(target_arch = "x86_64")]
unsafe fn with_lanes(inputs: &[&[u8]], out: &mut [[u8; 32]], lanes: usize, first: &mut FirstBlock) {
    for (inputs, out) in inputs.chunks(lanes).zip(out.chunks_mut(lanes)) {
        if inputs.len() == 1 {
            one_at_a_time(inputs, out);
            continue;
        }
        // SAFETY: the caller has seen that the processor has these instructions.
        unsafe {
            if lanes == 16 {
                x86::group16(inputs, out, first);
            } else {
                x86::group8(inputs, out, first);
            }
        }
        for (input, hash) in inputs.iter().zip(out) {
            if input.len() > CHUNK_LEN {
                *hash = *blake3::hash(input).as_bytes();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{FirstBlock, BLOCK_LEN, CHUNK_END, CHUNK_LEN, CHUNK_START, IV, ROOT, SCHEDULE};
    use std::arch::x86_64::*;

    /// Sixteen or eight words, a lane each.
    type Lanes<const L: usize> = [u32; L];

    /// The vector operations the compression takes, as 8 or 16 lanes of 32 bits.
    trait Word: Copy {
        unsafe fn add(self, o: Self) -> Self;
        unsafe fn xor(self, o: Self) -> Self;
        unsafe fn ror16(self) -> Self;
        unsafe fn ror12(self) -> Self;
        unsafe fn ror8(self) -> Self;
        unsafe fn ror7(self) -> Self;
        unsafe fn splat(x: u32) -> Self;
        unsafe fn load(p: *const u32) -> Self;
        unsafe fn store(self, p: *mut u32);
    }

    // The operations are `inline(always)` without target features of their own: inlined
    // into `group8` or `group16`, which have them, they compile to single instructions.

    impl Word for __m256i {
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            unsafe { _mm256_add_epi32(self, o) }
        }
        #[inline(always)]
        unsafe fn xor(self, o: Self) -> Self {
            unsafe { _mm256_xor_si256(self, o) }
        }
        #[inline(always)]
        unsafe fn ror16(self) -> Self {
            // Whole bytes move: one shuffle.
            unsafe {
                _mm256_shuffle_epi8(
                    self,
                    _mm256_set_epi8(
                        13, 12, 15, 14, 9, 8, 11, 10, 5, 4, 7, 6, 1, 0, 3, 2, 13, 12, 15, 14, 9, 8,
                        11, 10, 5, 4, 7, 6, 1, 0, 3, 2,
                    ),
                )
            }
        }
        #[inline(always)]
        unsafe fn ror12(self) -> Self {
            unsafe { _mm256_or_si256(_mm256_srli_epi32::<12>(self), _mm256_slli_epi32::<20>(self)) }
        }
        #[inline(always)]
        unsafe fn ror8(self) -> Self {
            unsafe {
                _mm256_shuffle_epi8(
                    self,
                    _mm256_set_epi8(
                        12, 15, 14, 13, 8, 11, 10, 9, 4, 7, 6, 5, 0, 3, 2, 1, 12, 15, 14, 13, 8,
                        11, 10, 9, 4, 7, 6, 5, 0, 3, 2, 1,
                    ),
                )
            }
        }
        #[inline(always)]
        unsafe fn ror7(self) -> Self {
            unsafe { _mm256_or_si256(_mm256_srli_epi32::<7>(self), _mm256_slli_epi32::<25>(self)) }
        }
        #[inline(always)]
        unsafe fn splat(x: u32) -> Self {
            unsafe { _mm256_set1_epi32(x as i32) }
        }
        #[inline(always)]
        unsafe fn load(p: *const u32) -> Self {
            unsafe { _mm256_loadu_si256(p.cast()) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut u32) {
            unsafe { _mm256_storeu_si256(p.cast(), self) }
        }
    }

    impl Word for __m512i {
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            unsafe { _mm512_add_epi32(self, o) }
        }
        #[inline(always)]
        unsafe fn xor(self, o: Self) -> Self {
            unsafe { _mm512_xor_si512(self, o) }
        }
        #[inline(always)]
        unsafe fn ror16(self) -> Self {
            unsafe { _mm512_ror_epi32::<16>(self) }
        }
        #[inline(always)]
        unsafe fn ror12(self) -> Self {
            unsafe { _mm512_ror_epi32::<12>(self) }
        }
        #[inline(always)]
        unsafe fn ror8(self) -> Self {
            unsafe { _mm512_ror_epi32::<8>(self) }
        }
        #[inline(always)]
        unsafe fn ror7(self) -> Self {
            unsafe { _mm512_ror_epi32::<7>(self) }
        }
        #[inline(always)]
        unsafe fn splat(x: u32) -> Self {
            unsafe { _mm512_set1_epi32(x as i32) }
        }
        #[inline(always)]
        unsafe fn load(p: *const u32) -> Self {
            unsafe { _mm512_loadu_si512(p.cast()) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut u32) {
            unsafe { _mm512_storeu_si512(p.cast(), self) }
        }
    }

    /// BLAKE3's quarter-round on state words `a`, `b`, `c`, `d` with message words `x`, `y`.
    #[inline(always)]
    unsafe fn g<W: Word>(s: &mut [W; 16], [a, b, c, d]: [usize; 4], x: W, y: W) {
        unsafe {
            s[a] = s[a].add(s[b]).add(x);
            s[d] = s[d].xor(s[a]).ror16();
            s[c] = s[c].add(s[d]);
            s[b] = s[b].xor(s[c]).ror12();
            s[a] = s[a].add(s[b]).add(y);
            s[d] = s[d].xor(s[a]).ror8();
            s[c] = s[c].add(s[d]);
            s[b] = s[b].xor(s[c]).ror7();
        }
    }

    /// One block compressed in each lane: from the chaining values `cv` and the block's
    /// words `m`, with each lane's block length and flags (the counter is 0: one chunk).
    /// Returns the new chaining values.
    #[inline(always)]
    unsafe fn compress<W: Word, const L: usize>(
        cv: &[Lanes<L>; 8],
        m: &[Lanes<L>; 16],
        len: &Lanes<L>,
        flags: &Lanes<L>,
    ) -> [Lanes<L>; 8] {
        unsafe {
            let m: [W; 16] = std::array::from_fn(|w| W::load(m[w].as_ptr()));
            let v = |w: usize| W::load(cv[w].as_ptr());
            let mut s: [W; 16] = [
                v(0),
                v(1),
                v(2),
                v(3),
                v(4),
                v(5),
                v(6),
                v(7),
                W::splat(IV[0]),
                W::splat(IV[1]),
                W::splat(IV[2]),
                W::splat(IV[3]),
                W::splat(0),
                W::splat(0),
                W::load(len.as_ptr()),
                W::load(flags.as_ptr()),
            ];
            // The rounds written out, so that the state stays in registers.
            macro_rules! round {
                ($r:expr) => {{
                    const R: [usize; 16] = SCHEDULE[$r];
                    g(&mut s, [0, 4, 8, 12], m[R[0]], m[R[1]]);
                    g(&mut s, [1, 5, 9, 13], m[R[2]], m[R[3]]);
                    g(&mut s, [2, 6, 10, 14], m[R[4]], m[R[5]]);
                    g(&mut s, [3, 7, 11, 15], m[R[6]], m[R[7]]);
                    g(&mut s, [0, 5, 10, 15], m[R[8]], m[R[9]]);
                    g(&mut s, [1, 6, 11, 12], m[R[10]], m[R[11]]);
                    g(&mut s, [2, 7, 8, 13], m[R[12]], m[R[13]]);
                    g(&mut s, [3, 4, 9, 14], m[R[14]], m[R[15]]);
                }};
            }
            round!(0);
            round!(1);
            round!(2);
            round!(3);
            round!(4);
            round!(5);
            round!(6);
            let mut out = [[0u32; L]; 8];
            for (w, out) in out.iter_mut().enumerate() {
                s[w].xor(s[w + 8]).store(out.as_mut_ptr());
            }
            out
        }
    }

    /// BLAKE3 of up to `L` inputs, a lane each, into `out`, those that begin with `first`'s
    /// block from its chaining value. `transpose` turns a block of each lane (64 bytes a
    /// row) into the block's words, a lane each. Inputs longer than a chunk are left to the
    /// caller.
    ///
    /// # Safety
    ///
    /// The processor has the instructions `W` takes.
    #[inline(always)]
    unsafe fn group<W: Word, const L: usize>(
        inputs: &[&[u8]],
        out: &mut [[u8; 32]],
        first: &mut FirstBlock,
        transpose: impl Fn(&[[u8; BLOCK_LEN]; L]) -> [Lanes<L>; 16],
    ) {
        let blocks: [usize; L] = std::array::from_fn(|l| match inputs.get(l) {
            // The empty input is one block of length 0.
            Some(input) if input.len() <= CHUNK_LEN => input.len().max(1).div_ceil(BLOCK_LEN),
            _ => 0,
        });
        let most = blocks.iter().copied().max().unwrap_or(0);
        // The lanes whose first block is `first`'s: they start at their second.
        let (shared, first_cv): ([bool; L], [u32; 8]) = match &first.0 {
            Some((block, cv)) => (
                std::array::from_fn(|l| blocks[l] > 1 && inputs[l][..BLOCK_LEN] == *block),
                *cv,
            ),
            None => ([false; L], [0; 8]),
        };
        let start = |l: usize| usize::from(shared[l]);
        let mut cv: [Lanes<L>; 8] = std::array::from_fn(|w| {
            std::array::from_fn(|l| if shared[l] { first_cv[w] } else { IV[w] })
        });
        let mut rows = [[0u8; BLOCK_LEN]; L];
        // The first block any lane compresses (lanes without an input have no blocks).
        let from = (0..L)
            .filter(|&l| blocks[l] > 0)
            .map(start)
            .min()
            .unwrap_or(0);
        for b in from..most {
            let mut len: Lanes<L> = [0; L];
            let mut flags: Lanes<L> = [0; L];
            for (l, input) in inputs.iter().enumerate() {
                if b < start(l) || b >= blocks[l] {
                    continue;
                }
                let from = b * BLOCK_LEN;
                let part = &input[from..input.len().min(from + BLOCK_LEN)];
                let row = &mut rows[l];
                match <&[u8; BLOCK_LEN]>::try_from(part) {
                    // A whole block: one copy of a known size, no call to `memcpy`.
                    Ok(block) => *row = *block,
                    // The last block, padded with zeros.
                    Err(_) => {
                        *row = [0; BLOCK_LEN];
                        row[..part.len()].copy_from_slice(part);
                    }
                }
                len[l] = part.len() as u32;
                flags[l] = if b == 0 { CHUNK_START } else { 0 }
                    | if b + 1 == blocks[l] {
                        CHUNK_END | ROOT
                    } else {
                        0
                    };
            }
            let m = transpose(&rows);
            #[cfg(test)]
            super::tests::COMPRESSIONS.with(|c| c.set(c.get() + 1));
            // SAFETY: the caller has the instructions `W` takes.
            let next = unsafe { compress::<W, L>(&cv, &m, &len, &flags) };
            for (l, &n) in blocks.iter().enumerate() {
                if start(l) <= b && b < n {
                    for w in 0..8 {
                        cv[w][l] = next[w][l];
                    }
                }
            }
            if b == 0 {
                // The first block of a lane that did not start from `first`'s (and has
                // more), kept for the inputs to come.
                if let Some(l) = (0..inputs.len()).find(|&l| !shared[l] && blocks[l] > 1) {
                    let block = inputs[l][..BLOCK_LEN].try_into().expect("a block");
                    first.0 = Some((block, std::array::from_fn(|w| cv[w][l])));
                }
            }
        }
        for (l, hash) in out.iter_mut().enumerate().take(inputs.len()) {
            for w in 0..8 {
                hash[4 * w..4 * w + 4].copy_from_slice(&cv[w][l].to_le_bytes());
            }
        }
    }

    /// [`group`] of up to 8 inputs with AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn group8(inputs: &[&[u8]], out: &mut [[u8; 32]], first: &mut FirstBlock) {
        // SAFETY: AVX2, as this function.
        unsafe { group::<__m256i, 8>(inputs, out, first, |rows| transpose8(rows)) }
    }

    /// [`group`] of up to 16 inputs with AVX-512.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn group16(inputs: &[&[u8]], out: &mut [[u8; 32]], first: &mut FirstBlock) {
        // SAFETY: AVX-512, as this function.
        unsafe { group::<__m512i, 16>(inputs, out, first, |rows| transpose16(rows)) }
    }

    /// Four rows' words `a`, `b`, `c`, `d` interleaved: in each 128-bit lane `k` of the
    /// `j`th result, word `4k + j` of the four rows.
    macro_rules! interleave4 {
        ($lo32:ident, $hi32:ident, $lo64:ident, $hi64:ident, $a:expr, $b:expr, $c:expr, $d:expr) => {{
            let (ab_lo, ab_hi) = ($lo32($a, $b), $hi32($a, $b));
            let (cd_lo, cd_hi) = ($lo32($c, $d), $hi32($c, $d));
            [
                $lo64(ab_lo, cd_lo),
                $hi64(ab_lo, cd_lo),
                $lo64(ab_hi, cd_hi),
                $hi64(ab_hi, cd_hi),
            ]
        }};
    }

    /// The 8 rows of 16 words as 16 words of 8 lanes.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn transpose8(rows: &[[u8; BLOCK_LEN]; 8]) -> [Lanes<8>; 16] {
        let mut m = [[0u32; 8]; 16];
        for h in 0..2 {
            // SAFETY: each row has 32 bytes from 32 * h.
            let v: [__m256i; 8] = std::array::from_fn(|r| unsafe {
                _mm256_loadu_si256(rows[r][32 * h..].as_ptr().cast())
            });
            let x: [[__m256i; 4]; 2] = std::array::from_fn(|g| {
                interleave4!(
                    _mm256_unpacklo_epi32,
                    _mm256_unpackhi_epi32,
                    _mm256_unpacklo_epi64,
                    _mm256_unpackhi_epi64,
                    v[4 * g],
                    v[4 * g + 1],
                    v[4 * g + 2],
                    v[4 * g + 3]
                )
            });
            for j in 0..4 {
                let low = _mm256_permute2x128_si256::<0x20>(x[0][j], x[1][j]);
                let high = _mm256_permute2x128_si256::<0x31>(x[0][j], x[1][j]);
                // SAFETY: each row of `m` has 8 words.
                unsafe {
                    _mm256_storeu_si256(m[8 * h + j].as_mut_ptr().cast(), low);
                    _mm256_storeu_si256(m[8 * h + 4 + j].as_mut_ptr().cast(), high);
                }
            }
        }
        m
    }

    /// The 16 rows of 16 words as 16 words of 16 lanes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose16(rows: &[[u8; BLOCK_LEN]; 16]) -> [Lanes<16>; 16] {
        // SAFETY: each row has 64 bytes.
        let v: [__m512i; 16] =
            std::array::from_fn(|r| unsafe { _mm512_loadu_si512(rows[r].as_ptr().cast()) });
        let x: [[__m512i; 4]; 4] = std::array::from_fn(|g| {
            interleave4!(
                _mm512_unpacklo_epi32,
                _mm512_unpackhi_epi32,
                _mm512_unpacklo_epi64,
                _mm512_unpackhi_epi64,
                v[4 * g],
                v[4 * g + 1],
                v[4 * g + 2],
                v[4 * g + 3]
            )
        });
        // Then the 128-bit lanes: word 4k + j takes lane k of x[0][j] to x[3][j].
        let mut m = [[0u32; 16]; 16];
        let [x0, x1, x2, x3] = x;
        let quads = x0.into_iter().zip(x1).zip(x2).zip(x3);
        for (j, (((a, b), c), d)) in quads.enumerate() {
            let even01 = _mm512_shuffle_i32x4::<0x88>(a, b);
            let odd01 = _mm512_shuffle_i32x4::<0xDD>(a, b);
            let even23 = _mm512_shuffle_i32x4::<0x88>(c, d);
            let odd23 = _mm512_shuffle_i32x4::<0xDD>(c, d);
            // SAFETY: each row of `m` has 16 words.
            unsafe {
                let mut store = |w: usize, v| _mm512_storeu_si512(m[w].as_mut_ptr().cast(), v);
                store(j, _mm512_shuffle_i32x4::<0x88>(even01, even23));
                store(8 + j, _mm512_shuffle_i32x4::<0xDD>(even01, even23));
                store(4 + j, _mm512_shuffle_i32x4::<0x88>(odd01, odd23));
                store(12 + j, _mm512_shuffle_i32x4::<0xDD>(odd01, odd23));
            }
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::SmallRng, Rng, SeedableRng};

    thread_local! {
        /// How many compressions of a group's lanes this thread has made.
        pub(super) static COMPRESSIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// Inputs that begin with the block kept from the call before take one compression
    /// fewer, and still hash to BLAKE3's.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn inputs_that_begin_alike_skip_their_first_block() {
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        // 13: the group is not full, as the last of a batch most often is not.
        let inputs: Vec<Vec<u8>> = (0..13u8)
            .map(|k| {
                let mut v = vec![7u8; 200];
                v[100] = k;
                v
            })
            .collect();
        let inputs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
        let mut first = FirstBlock::default();
        let compressions = |first: &mut FirstBlock| {
            let before = COMPRESSIONS.with(|c| c.get());
            let mut out = vec![[0u8; 32]; inputs.len()];
            hash_many(&inputs, &mut out, first);
            for (input, hash) in inputs.iter().zip(&out) {
                assert_eq!(blake3::hash(input).as_bytes(), hash);
            }
            COMPRESSIONS.with(|c| c.get()) - before
        };
        let groups = if std::is_x86_feature_detected!("avx512f") {
            1
        } else {
            2
        };
        // 200 bytes are four blocks; the first call keeps the first.
        assert_eq!(compressions(&mut first), 4 * groups);
        assert_eq!(compressions(&mut first), 3 * groups);
        // Another first block: kept in its place.
        let other: Vec<u8> = vec![8u8; 200];
        let mut out = [[0u8; 32]; 2];
        hash_many(&[&other, &other], &mut out, &mut first);
        assert_eq!(out[1], *blake3::hash(&other).as_bytes());
        assert_eq!(compressions(&mut first), 4 * groups);
    }

    /// Returns how many inputs began with the block kept from an earlier call.
    fn check(lanes: Option<usize>) -> usize {
        let mut rng = SmallRng::seed_from_u64(7);
        let data: Vec<u8> = (0..CHUNK_LEN + 200).map(|_| rng.random()).collect();
        let mut first = FirstBlock::default();
        let mut shared = 0;
        // Every length up to past a chunk, in groups of every size up to past 16, each
        // input of the group another length; a third of the groups with their own start
        // for each input, the rest with some or all beginning alike (as keys do).
        for len in 0..=CHUNK_LEN + 80 {
            let inputs: Vec<&[u8]> = (0..=(len % 19))
                .map(|k| {
                    let n = len.saturating_sub(k * 37 % 200);
                    let start = match len % 3 {
                        0 => k,
                        1 => k % 2 * 5,
                        _ => 0,
                    };
                    &data[start..start + n]
                })
                .collect();
            if let Some((block, _)) = &first.0 {
                shared += inputs
                    .iter()
                    .filter(|i| i.len() > BLOCK_LEN && i.len() <= CHUNK_LEN && i.starts_with(block))
                    .count();
            }
            let mut out = vec![[0u8; 32]; inputs.len()];
            match lanes {
                // SAFETY: only the widths the processor has are asked for.
                #[cfg(target_arch = "x86_64")]
                Some(lanes) => unsafe { with_lanes(&inputs, &mut out, lanes, &mut first) },
                _ => hash_many(&inputs, &mut out, &mut first),
            }
            for (input, hash) in inputs.iter().zip(&out) {
                assert_eq!(
                    blake3::hash(input).as_bytes(),
                    hash,
                    "{} bytes in a group of {}",
                    input.len(),
                    inputs.len()
                );
            }
        }
        shared
    }

    #[test]
    fn hashes_are_blake3s() {
        let shared = check(None);
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            assert!(shared > 2_000, "{shared} inputs began with a kept block");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn hashes_are_blake3s_in_each_width_this_processor_has() {
        let mut widths = 0;
        if std::is_x86_feature_detected!("avx2") {
            check(Some(8));
            widths += 1;
        }
        if std::is_x86_feature_detected!("avx512f") {
            check(Some(16));
            widths += 1;
        }
        eprintln!("checked {widths} SIMD widths");
    }
}
