//! Provider responses kept as JSON text: checked in one pass that builds nothing, and
//! carried as that text to the output line and the cache.
//!
//! `serde_json` checks a body as a `RawValue` at about half a gigabyte a second and its
//! `RawValue` cannot be made without checking again; a response is checked on every
//! success, so [`RawJson`] is this crate's own checked text. [`check`] accepts exactly what
//! `serde_json::from_slice::<Box<RawValue>>` accepts (a test holds the two together on
//! generated and mutated inputs): one RFC 8259 value, whitespace around it, UTF-8, string
//! escapes checked (a `\u` escape's four hex digits, not the code point it names), no
//! control characters in strings, no depth limit. On the way it finds one member of the
//! top-level object (`usage`), so that member is read without a second pass.

use std::fmt;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// Why a text is not JSON, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonError {
    /// Byte offset of the fault.
    pub at: usize,
    /// What is wrong.
    pub what: &'static str,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.what, self.at)
    }
}

impl std::error::Error for JsonError {}

/// One JSON value as checked text, without whitespace around it.
#[derive(Clone, PartialEq, Eq)]
pub struct RawJson(Box<str>);

impl RawJson {
    /// Checks `text` and keeps the value in it.
    pub fn parse(text: &str) -> Result<RawJson, JsonError> {
        let (value, _) = check(text, None)?;
        Ok(RawJson(value.into()))
    }

    /// Checks `text`, keeps the value, and returns the text of the top-level object's
    /// member `key` too (its last occurrence, when its name is written without escapes).
    pub fn parse_with_member<'a>(
        text: &'a [u8],
        key: &str,
    ) -> Result<(RawJson, Option<&'a str>), JsonError> {
        let text = utf8(text)?;
        let (value, member) = check(text, Some(key))?;
        Ok((RawJson(value.into()), member))
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for RawJson {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Only `serde_json`'s RawValue can pass JSON through a serializer untouched.
        let raw = RawValue::from_string(self.0.to_string()).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

impl<'de> Deserialize<'de> for RawJson {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        RawJson::parse(raw.get()).map_err(D::Error::custom)
    }
}

/// `b` as text, or where it stops being UTF-8.
pub fn utf8(b: &[u8]) -> Result<&str, JsonError> {
    std::str::from_utf8(b).or_else(|e| fail(e.valid_up_to(), "invalid UTF-8"))
}

fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\n' | b'\r' | b'\t')
}

pub(crate) fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && is_ws(b[i]) {
        i += 1;
    }
    i
}

fn fail<T>(at: usize, what: &'static str) -> Result<T, JsonError> {
    Err(JsonError { at, what })
}

/// Where the first `"`, `\\` or control character at or after `j` is (or `b.len()`):
/// sixteen bytes at a time with SSE2 (part of every x86-64 processor), then eight at a
/// time, as `serde_json` does it.
#[inline]
fn special(b: &[u8], mut j: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
            _mm_setzero_si128, _mm_subs_epu8,
        };
        while j + 16 <= b.len() {
            // SAFETY: `b[j..j + 16]` is in bounds, and the load needs no alignment; the
            // rest is arithmetic on registers.
            let hits = unsafe {
                let v = _mm_loadu_si128(b.as_ptr().add(j).cast());
                let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
                let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
                // At most 0x1f, unsigned: nothing is left once 0x1f is taken away.
                let control =
                    _mm_cmpeq_epi8(_mm_subs_epu8(v, _mm_set1_epi8(0x1f)), _mm_setzero_si128());
                _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), control)) as u32
            };
            if hits != 0 {
                return j + hits.trailing_zeros() as usize;
            }
            j += 16;
        }
    }
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let zero_in = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    while let Some(chunk) = b.get(j..j + 8) {
        let v = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let hits = zero_in(v ^ (ONES * u64::from(b'"')))
            | zero_in(v ^ (ONES * u64::from(b'\\')))
            | (v.wrapping_sub(ONES * 0x20) & !v & HIGHS);
        if hits != 0 {
            return j + (hits.trailing_zeros() / 8) as usize;
        }
        j += 8;
    }
    while j < b.len() && !matches!(b[j], b'"' | b'\\' | 0..=0x1f) {
        j += 1;
    }
    j
}

/// The end of the string whose opening quote is at `i` (just past its closing quote), and
/// whether it has escapes.
#[inline]
pub(crate) fn string_end_escaped(b: &[u8], i: usize) -> Result<(usize, bool), JsonError> {
    let j = special(b, i + 1);
    if b.get(j) == Some(&b'"') {
        return Ok((j + 1, false));
    }
    Ok((string_end(b, i)?, true))
}

/// The end of the string whose opening quote is at `i` (just past its closing quote).
pub(crate) fn string_end(b: &[u8], i: usize) -> Result<usize, JsonError> {
    let mut j = i + 1;
    loop {
        j = special(b, j);
        match b.get(j) {
            None => return fail(b.len(), "EOF while parsing a string"),
            Some(b'"') => return Ok(j + 1),
            Some(b'\\') => {}
            Some(_) => return fail(j, "control character in a string"),
        }
        // An escape.
        match b.get(j + 1) {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => j += 2,
            Some(b'u') => {
                let hex = b.get(j + 2..j + 6);
                if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                    return fail(j, "invalid \\u escape");
                }
                j += 6;
            }
            Some(_) => return fail(j, "invalid escape"),
            None => return fail(b.len(), "EOF while parsing a string"),
        }
    }
}

/// The end of the number that starts at `i`.
pub(crate) fn number_end(b: &[u8], mut i: usize) -> Result<usize, JsonError> {
    let digits = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        i
    };
    if b[i] == b'-' {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i = digits(i + 1),
        _ => return fail(i, "invalid number"),
    }
    if b.get(i) == Some(&b'.') {
        let end = digits(i + 1);
        if end == i + 1 {
            return fail(end, "invalid number");
        }
        i = end;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let end = digits(i);
        if end == i {
            return fail(end, "invalid number");
        }
        i = end;
    }
    Ok(i)
}

/// Checks that `text` is one JSON value with only whitespace around it. Returns the value
/// and, when `key` is given and the value is an object, the value of its last member
/// named `key` (written without escapes).
pub fn check<'t>(
    text: &'t str,
    key: Option<&str>,
) -> Result<(&'t str, Option<&'t str>), JsonError> {
    let mut member = None;
    let value = walk_with(text, false, 1, |depth, name, value| {
        if depth == 1 && name.is_some() && name == key {
            member = Some(value);
        }
    })?;
    Ok((value, member))
}

/// The members of the JSON object `text` (each name's text as written, without its
/// quotes, and its value's text), or `None` when `text` is JSON but not an object.
pub fn members(text: &str) -> Result<Option<Vec<(&str, &str)>>, JsonError> {
    let mut members = Vec::with_capacity(8);
    let value = walk_with(text, false, 1, |depth, name, value| {
        if let (1, Some(name)) = (depth, name) {
            members.push((name, value));
        }
    })?;
    Ok(value.starts_with('{').then_some(members))
}

/// Whether the number `n` (valid JSON) may be 1e300 or more.
fn huge(n: &[u8]) -> bool {
    if n.len() < 20 && !n.iter().any(|&c| c == b'e' || c == b'E') {
        return false;
    }
    let n = n.strip_prefix(b"-").unwrap_or(n);
    let whole = n.iter().take_while(|c| c.is_ascii_digit()).count() as i64;
    let exponent = match n.iter().position(|&c| c == b'e' || c == b'E') {
        Some(at) => {
            let digits = &n[at + 1..];
            let (negative, digits) = match digits.first() {
                Some(b'-') => (true, &digits[1..]),
                Some(b'+') => (false, &digits[1..]),
                _ => (false, digits),
            };
            // Big enough either way once past six digits.
            let value = digits
                .iter()
                .take(6)
                .fold(0i64, |v, &c| v * 10 + i64::from(c - b'0'));
            let value = if digits.len() > 6 { 1_000_000 } else { value };
            if negative {
                -value
            } else {
                value
            }
        }
        None => 0,
    };
    whole + exponent >= 300
}

/// The elements of the JSON array `text`, or `None` when `text` is JSON but not an array.
pub fn elements(text: &str) -> Result<Option<Vec<&str>>, JsonError> {
    let mut elements = Vec::with_capacity(4);
    let value = walk_with(text, false, 1, |depth, name, value| {
        if depth == 1 && name.is_none() {
            elements.push(value);
        }
    })?;
    Ok(value.starts_with('[').then_some(elements))
}

/// How deep [`walk`] reports items.
pub const WALK_DEPTH: usize = 2;

/// The deepest [`walk_with`] reports items.
pub const MAX_WALK_DEPTH: usize = 3;

/// Checks that `text` is one JSON value with only whitespace around it, and returns it.
/// `item` is called with the depth (1 for the value's own), the name (as written, without
/// quotes) and the value of every member of an object, and the depth and value of every
/// element of an array (no name), down to [`WALK_DEPTH`], each when its value ends (so the
/// items inside an item come before it).
pub fn walk<'t>(
    text: &'t str,
    item: impl FnMut(usize, Option<&'t str>, &'t str),
) -> Result<&'t str, JsonError> {
    walk_with(text, false, WALK_DEPTH, item)
}

/// [`walk`] down to `depth` (at most [`MAX_WALK_DEPTH`]), refusing numbers that may be too
/// big for an `f64` when `strict`.
pub fn walk_with<'t>(
    text: &'t str,
    strict: bool,
    depth: usize,
    mut item: impl FnMut(usize, Option<&'t str>, &'t str),
) -> Result<&'t str, JsonError> {
    walk_plain(text, strict, depth, |depth, name, value, _| {
        item(depth, name, value)
    })
}

/// Whether a number as written is written as a key's canonical form writes it: a whole
/// number an `f64` holds exactly (at most 15 digits), not `-0`.
pub(crate) fn plain_int(v: &[u8]) -> bool {
    let digits = v.strip_prefix(b"-").unwrap_or(v);
    digits.len() <= 15 && digits.iter().all(u8::is_ascii_digit) && v != b"-0"
}

/// [`walk_with`], also telling each item whether its value is written as the response
/// cache's key form writes it: a string without escapes, a [`plain_int`], a literal, an
/// empty object or array without space inside (anything else, `false`).
pub(crate) fn walk_plain<'t>(
    text: &'t str,
    strict: bool,
    depth: usize,
    mut item: impl FnMut(usize, Option<&'t str>, &'t str, bool),
) -> Result<&'t str, JsonError> {
    assert!(
        depth <= MAX_WALK_DEPTH,
        "walks go {MAX_WALK_DEPTH} deep at most"
    );
    let b = text.as_bytes();
    let n = b.len();
    // Open containers, innermost last: `{` or `[`.
    let mut open: Vec<u8> = Vec::new();
    // The item being read at each depth: its name, and where its value starts.
    let mut names: [Option<&'t str>; MAX_WALK_DEPTH + 1] = [None; MAX_WALK_DEPTH + 1];
    let mut starts: [Option<usize>; MAX_WALK_DEPTH + 1] = [None; MAX_WALK_DEPTH + 1];
    let (name, item_start) = (&mut names[..=depth], &mut starts[..=depth]);
    let start = skip_ws(b, 0);
    let mut i = start;
    // Whether the value that ended last is written plain.
    let mut plain;
    // Reads the member name at `i` (after `{` or `,` and whitespace) and its colon;
    // returns the name and where its value starts.
    let member = |i: usize| -> Result<(&'t str, usize), JsonError> {
        if b.get(i) != Some(&b'"') {
            return fail(i, "expected a member name");
        }
        let end = string_end(b, i)?;
        let colon = skip_ws(b, end);
        if b.get(colon) != Some(&b':') {
            return fail(colon, "expected `:`");
        }
        Ok((&text[i + 1..end - 1], skip_ws(b, colon + 1)))
    };
    'value: loop {
        // A value starts at `i`.
        match b.get(i) {
            None => return fail(i, "EOF while parsing a value"),
            Some(b'{') => {
                let j = skip_ws(b, i + 1);
                if b.get(j) == Some(&b'}') {
                    plain = j == i + 1;
                    i = j + 1;
                } else {
                    open.push(b'{');
                    let (key, value) = member(j)?;
                    if let Some(d) = name.get_mut(open.len()) {
                        (*d, item_start[open.len()]) = (Some(key), Some(value));
                    }
                    i = value;
                    continue 'value;
                }
            }
            Some(b'[') => {
                let j = skip_ws(b, i + 1);
                if b.get(j) == Some(&b']') {
                    plain = j == i + 1;
                    i = j + 1;
                } else {
                    open.push(b'[');
                    if let Some(d) = item_start.get_mut(open.len()) {
                        *d = Some(j);
                    }
                    i = j;
                    continue 'value;
                }
            }
            Some(b'"') => {
                let (end, escaped) = string_end_escaped(b, i)?;
                plain = !escaped;
                i = end;
            }
            Some(b'-' | b'0'..=b'9') => {
                let end = number_end(b, i)?;
                if strict && huge(&b[i..end]) {
                    return fail(i, "number too big for an f64");
                }
                plain = plain_int(&b[i..end]);
                i = end;
            }
            Some(&c @ (b't' | b'f' | b'n')) => {
                let word: &[u8] = match c {
                    b't' => b"true",
                    b'f' => b"false",
                    _ => b"null",
                };
                if !b[i..].starts_with(word) {
                    return fail(i, "expected a value");
                }
                plain = true;
                i += word.len();
            }
            Some(_) => return fail(i, "expected a value"),
        }
        // A value ended at `i`: close what it closes, then find the next value.
        loop {
            let at = open.len();
            if let Some(Some(from)) = item_start.get_mut(at).map(Option::take) {
                item(at, name[at].take(), &text[from..i], plain);
            }
            i = skip_ws(b, i);
            match open.last() {
                None => {
                    if i != n {
                        return fail(i, "trailing characters");
                    }
                    let end = b.iter().rposition(|&c| !is_ws(c)).map_or(0, |p| p + 1);
                    return Ok(&text[start..end]);
                }
                Some(b'[') => match b.get(i) {
                    Some(b',') => {
                        i = skip_ws(b, i + 1);
                        if let Some(d) = item_start.get_mut(open.len()) {
                            *d = Some(i);
                        }
                        continue 'value;
                    }
                    Some(b']') => {
                        open.pop();
                        plain = false;
                        i += 1;
                    }
                    _ => return fail(i, "expected `,` or `]`"),
                },
                Some(_) => match b.get(i) {
                    Some(b',') => {
                        let (key, value) = member(skip_ws(b, i + 1))?;
                        if let Some(d) = name.get_mut(open.len()) {
                            (*d, item_start[open.len()]) = (Some(key), Some(value));
                        }
                        i = value;
                        continue 'value;
                    }
                    Some(b'}') => {
                        open.pop();
                        plain = false;
                        i += 1;
                    }
                    _ => return fail(i, "expected `,` or `}`"),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use serde_json::Value;

    /// `special` finds the first `"`, `\\` or control character from any start, whatever
    /// the text's length (the 16- and 8-byte steps and the byte-wise tail), and nothing
    /// else: not a space, DEL, or a byte of a multi-byte character.
    #[test]
    fn special_finds_the_first_quote_backslash_or_control_character() {
        let naive = |b: &[u8], j: usize| {
            (j..b.len())
                .find(|&k| matches!(b[k], b'"' | b'\\' | 0..=0x1f))
                .unwrap_or(b.len())
        };
        for filler in [b'a', b' ', 0x7f, 0x80, 0xc3, 0xff] {
            for len in 0..=48 {
                let mut b = vec![filler; len];
                for start in 0..=len {
                    assert_eq!(special(&b, start), len, "none: {filler:#x} {len} {start}");
                }
                for at in 0..len {
                    for mark in [b'"', b'\\', 0x00, 0x0a, 0x1f] {
                        b[at] = mark;
                        for start in 0..=len {
                            assert_eq!(special(&b, start), naive(&b, start), "{mark:#x} at {at}");
                        }
                        b[at] = filler;
                    }
                }
            }
        }
    }

    fn serde_says(b: &[u8]) -> bool {
        serde_json::from_slice::<Box<RawValue>>(b).is_ok()
    }

    #[test]
    fn accepts_and_refuses_what_serde_json_does() {
        let cases: &[&str] = &[
            "{}",
            " [ ] ",
            "0",
            "-0",
            "-0.5e+3",
            "1E5",
            "12.25",
            "\"\"",
            "true",
            "null",
            "false",
            "{\"a\":[1,{\"b\":null}],\"c\":\"\\u00e9\\n\\\"\"}",
            "\"\\ud800\"",
            "\u{feff}{}",
            "",
            "  ",
            "{",
            "}",
            "[1,]",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{a:1}",
            "01",
            "1.",
            ".5",
            "+1",
            "1e",
            "1e+",
            "-",
            "--1",
            "tru",
            "truex",
            "nul",
            "[1 2]",
            "\"\\x\"",
            "\"\\u12g4\"",
            "\"\\u12\"",
            "\"a\u{1}\"",
            "\"a\tb\"",
            "\"abc",
            "\"a\\",
            "{} {}",
            "[]]",
            "[[]",
            "{\"a\":}",
            "{,}",
            "[,1]",
            "NaN",
            "Infinity",
            "{\"usage\":{\"x\":1}}\n",
            "\t\r\n1\n",
        ];
        let deep = |n: usize, close: &str| {
            let open: String = (0..n)
                .map(|k| if k % 3 == 0 { "{\"a\":" } else { "[" })
                .collect();
            let shut: String = (0..n)
                .rev()
                .map(|k| if k % 3 == 0 { "}" } else { "]" })
                .collect();
            format!("{open}1{shut}{close}")
        };
        let deep_cases = [deep(100, ""), deep(100, "]"), deep(33, ""), deep(40, "}")];
        let mut shut_early = deep(70, "");
        shut_early.remove(shut_early.len() - 20);
        let cases: Vec<&str> = cases
            .iter()
            .copied()
            .chain(deep_cases.iter().map(String::as_str))
            .chain([shut_early.as_str()])
            .collect();
        for c in cases {
            assert_eq!(check(c, None).is_ok(), serde_says(c.as_bytes()), "{c:?}");
        }
        assert!(utf8(b"\"\xff\"").is_err());
        assert!(!serde_says(b"\"\xff\""));
    }

    /// A random JSON value, sometimes with a `usage` member, up to `depth` deep.
    fn value(rng: &mut SmallRng, depth: u32, out: &mut String) {
        let pick = if depth == 0 {
            rng.random_range(0..5)
        } else {
            rng.random_range(0..7)
        };
        let ws = |rng: &mut SmallRng, out: &mut String| {
            if rng.random_bool(0.2) {
                out.push_str([" ", "\n", "\t", "\r\n  "][rng.random_range(0..4)]);
            }
        };
        match pick {
            0 => out.push_str(["true", "false", "null"][rng.random_range(0..3)]),
            1 => out.push_str(
                [
                    "0",
                    "-1",
                    "12.5",
                    "3e7",
                    "-0.0E-2",
                    "18446744073709551616",
                    "1.5e+300",
                ][rng.random_range(0..7)],
            ),
            2..=4 => {
                let parts = [
                    "a", "é", "\\\"", "\\\\", "\\n", "\\u00e9", "\\ud83d", "{", "]", "usage", " ",
                    "日本",
                ];
                out.push('"');
                for _ in 0..rng.random_range(0..5) {
                    out.push_str(parts[rng.random_range(0..parts.len())]);
                }
                out.push('"');
            }
            5 => {
                out.push('[');
                for k in 0..rng.random_range(0..4) {
                    if k > 0 {
                        out.push(',');
                    }
                    ws(rng, out);
                    value(rng, depth - 1, out);
                    ws(rng, out);
                }
                out.push(']');
            }
            _ => {
                out.push('{');
                for k in 0..rng.random_range(0..5) {
                    if k > 0 {
                        out.push(',');
                    }
                    ws(rng, out);
                    let name =
                        ["usage", "id", "choices", "us\\u0061ge", "x"][rng.random_range(0..5)];
                    out.push_str(&format!("\"{name}\""));
                    ws(rng, out);
                    out.push(':');
                    ws(rng, out);
                    value(rng, depth - 1, out);
                    ws(rng, out);
                }
                out.push('}');
            }
        }
    }

    /// On generated values, and on them with bytes changed, inserted and cut, `check`
    /// agrees with `serde_json`, and the member it finds is the one `serde_json` reads.
    #[test]
    fn agrees_with_serde_json_on_generated_and_mutated_values() {
        let mut rng = SmallRng::seed_from_u64(7);
        let alphabet = b"{}[]\":,\\ \n0123456789-+.eEtrufalsnu\x01\x7f";
        let (mut valid, mut invalid) = (0, 0);
        for round in 0..30_000 {
            let mut text = String::new();
            value(&mut rng, 4, &mut text);
            let mut bytes = text.into_bytes();
            if round % 2 == 1 {
                for _ in 0..rng.random_range(1..4) {
                    let at = rng.random_range(0..=bytes.len());
                    let c = alphabet[rng.random_range(0..alphabet.len())];
                    match rng.random_range(0..3) {
                        0 if at < bytes.len() => bytes[at] = c,
                        1 if at < bytes.len() => {
                            bytes.remove(at);
                        }
                        _ => bytes.insert(at, c),
                    }
                }
            }
            let ours = utf8(&bytes).and_then(|t| check(t, Some("usage")));
            let shown = String::from_utf8_lossy(&bytes).into_owned();
            assert_eq!(ours.is_ok(), serde_says(&bytes), "{shown:?}: {ours:?}");
            let Ok((value, member)) = ours else {
                invalid += 1;
                continue;
            };
            valid += 1;
            let raw: Box<RawValue> = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(value, raw.get(), "{shown:?}");
            // serde_json keeps the last of repeated names, as `check` does; an escaped
            // name is the same name to serde_json, and `check` does not look for it.
            let escaped = shown.contains("us\\u0061ge");
            // (A lone surrogate escape is JSON, but not a string serde_json reads.)
            let Ok(tree) = serde_json::from_slice::<Value>(&bytes) else {
                continue;
            };
            // The items `walk` reports at depth 2 are those of the items at depth 1.
            let text = utf8(&bytes).unwrap();
            let (mut firsts, mut seconds, mut inner) = (Vec::new(), Vec::new(), Vec::new());
            walk(text, |depth, name, value| match depth {
                1 => firsts.push(value),
                2 => seconds.push((name, value)),
                _ => panic!("depth {depth}"),
            })
            .unwrap();
            for first in firsts {
                walk(first, |depth, name, value| {
                    if depth == 1 {
                        inner.push((name, value));
                    }
                })
                .unwrap();
            }
            assert_eq!(seconds, inner, "{shown:?}");
            // And at depth 3, those two levels down.
            let (mut thirds, mut deeper) = (Vec::new(), Vec::new());
            walk_with(text, false, 3, |depth, name, value| {
                if depth == 3 {
                    thirds.push((name, value));
                }
            })
            .unwrap();
            walk(text, |depth, _, value| {
                if depth == 1 {
                    walk(value, |depth, name, value| {
                        if depth == 2 {
                            deeper.push((name, value));
                        }
                    })
                    .unwrap();
                }
            })
            .unwrap();
            assert_eq!(thirds, deeper, "{shown:?}");
            // `members` and `elements` give the object's members and the array's elements.
            match (&tree, members(text).unwrap(), elements(text).unwrap()) {
                (Value::Object(map), Some(ms), None) => {
                    let mut mine = serde_json::Map::new();
                    for (k, v) in ms {
                        let k: String = serde_json::from_str(&format!("\"{k}\"")).unwrap();
                        mine.insert(k, serde_json::from_str(v).unwrap());
                    }
                    assert_eq!(&mine, map, "{shown:?}");
                }
                (Value::Array(items), None, Some(es)) => {
                    let mine: Vec<Value> = es
                        .iter()
                        .map(|e| serde_json::from_str(e).unwrap())
                        .collect();
                    assert_eq!(&mine, items, "{shown:?}");
                }
                (_, None, None) => {}
                (t, m, e) => panic!("{shown:?}: {t:?} {m:?} {e:?}"),
            }
            if let Value::Object(map) = tree {
                let theirs = map.get("usage");
                match (member, theirs) {
                    (Some(m), Some(v)) if !escaped => {
                        let mine: Value = serde_json::from_str(m).unwrap();
                        assert_eq!(&mine, v, "{shown:?}");
                    }
                    (None, None) => {}
                    (m, _) => assert!(escaped, "{shown:?}: {m:?}"),
                }
            } else {
                assert!(member.is_none());
            }
        }
        assert!(
            valid > 15_000 && invalid > 5_000,
            "{valid} valid, {invalid} invalid"
        );
    }

    /// What a strict walk takes, a `serde_json::Value` takes: no number too big for an
    /// f64 passes it, at any depth.
    #[test]
    fn strict_walks_refuse_what_the_tree_refuses() {
        let long = "9".repeat(310);
        let numbers = [
            "1e308",
            "1.7976931348623157e308",
            "1e309",
            "-1e400",
            "0.5e299",
            "1e-999",
            long.as_str(),
            "123",
            "-0.0",
            "1E+2",
        ];
        for n in numbers {
            for text in [
                format!("{{\"n\":{n}}}"),
                format!("{{\"a\":[{{\"b\":{n}}}]}}"),
            ] {
                let tree = serde_json::from_str::<Value>(&text).is_ok();
                match walk_with(&text, true, 1, |_, _, _| {}) {
                    Ok(_) => assert!(tree, "{text}"),
                    Err(_) => assert!(check(&text, None).is_ok()),
                }
            }
        }
        assert!(walk_with("{\"n\":1E+2,\"m\":-0.25e-400}", true, 1, |_, _, _| {}).is_ok());
        assert!(walk_with("{\"n\":1e400}", true, 1, |_, _, _| {}).is_err());
    }

    #[test]
    fn raw_json_keeps_the_value_and_serialises_as_it_is() {
        let (raw, usage) =
            RawJson::parse_with_member(b" {\"id\":1,\"usage\": {\"a\":2} }\n", "usage").unwrap();
        assert_eq!(raw.get(), "{\"id\":1,\"usage\": {\"a\":2} }");
        assert_eq!(usage, Some("{\"a\":2}"));
        assert_eq!(
            serde_json::to_string(&raw).unwrap(),
            "{\"id\":1,\"usage\": {\"a\":2} }"
        );
        let back: RawJson = serde_json::from_str("[1, 2]").unwrap();
        assert_eq!(back.get(), "[1, 2]");
        let err = RawJson::parse("{\"a\":01}").unwrap_err();
        assert_eq!(err.to_string(), "expected `,` or `}` at byte 6");
    }
}
