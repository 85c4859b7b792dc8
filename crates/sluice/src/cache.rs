//! The response cache (SQLite, shared across runs): a request whose twin has already been
//! answered is answered from here, before the rate limiter, at no cost.
//!
//! The key is a BLAKE3 hash of the target, the endpoint, the model and the request body in
//! a canonical form: object keys sorted at every level, numbers written one way (`1`,
//! `1.0` and `1e0` are the same number), and the fields that do not change the answer
//! removed ([`NON_SEMANTIC_FIELDS`]). Two requests that differ only in field order,
//! whitespace or those fields share an entry.
//!
//! Only successful responses are stored. Writes are batched like the journal's.
//!
//! The cache is two files: the SQLite database at the path given, which holds the index,
//! and the responses themselves beside it (`PATH-data`). Both are needed; a cache moved
//! without its data file answers nothing it held.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::blake3_many::FirstBlock;
use crate::json::RawJson;
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use rustc_hash::FxHashMap;
use serde_json::Value;

use crate::outcome::Usage;
use crate::request::Request;

/// Body fields that do not change what the model answers: who is asking, how the answer
/// is delivered, what is stored where.
pub const NON_SEMANTIC_FIELDS: &[&str] = &[
    "user",
    "metadata",
    "stream",
    "stream_options",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
];

/// The cache format this build reads and writes.
pub const CACHE_VERSION: u32 = 4;

/// A cache key: 32 bytes of BLAKE3.
pub type CacheKey = [u8; 32];

/// Why the cache could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// SQLite failed.
    #[error("cache {path}: {source}")]
    Sqlite {
        /// The cache file.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// Its data file (`PATH-data`) could not be opened or written.
    #[error("cache {}: {source}", data_path(path).display())]
    Data {
        /// The cache file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Not a sluice cache, or another version of one.
    #[error("cache {path} is not a sluice response cache of version {CACHE_VERSION}: {reason}")]
    Incompatible {
        /// The cache file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl CacheError {
    /// Whether the disk or the file system failed (full, unreadable, not writable), rather
    /// than the file not being a cache this version reads.
    pub fn is_io(&self) -> bool {
        match self {
            CacheError::Sqlite { source, .. } => crate::journal::sqlite_io(source),
            CacheError::Data { .. } => true,
            CacheError::Incompatible { .. } => false,
        }
    }
}

/// A response as a row holds it.
enum Stored {
    /// JSON text.
    Text(Vec<u8>),
    /// An LZ4 block after its length (version 2).
    Lz4(Vec<u8>),
}

/// A cached response.
#[derive(Clone, Debug)]
pub struct Hit {
    /// The provider's response body.
    pub response: RawJson,
    /// Its usage when it was first answered.
    pub usage: Option<Usage>,
}

/// The canonical key of a request sent to `target` (the provider and API base).
pub fn key(target: &str, request: &Request) -> CacheKey {
    keys(target, std::slice::from_ref(request))[0]
}

/// [`key`] of each of `requests`, in order. A batch is hashed at once, many inputs side by
/// side in the processor's vectors (one at a time, hashing had been about a third of a
/// key's cost).
pub fn keys(target: &str, requests: &[Request]) -> Vec<CacheKey> {
    thread_local! {
        /// The buffers of [`keys`], kept between calls.
        static BUFFERS: std::cell::RefCell<(Vec<u8>, Vec<usize>, Canon, FirstBlock)> =
            Default::default();
    }
    BUFFERS.with_borrow_mut(|(bytes, ends, canon, first)| {
        // What each key hashes, laid out one after another.
        bytes.clear();
        ends.clear();
        // The bodies were written by the input thread, most often on the other core: each
        // is fetched from there when first read. Asked for a few requests ahead, those
        // fetches overlap the reading of the ones before.
        for request in requests.iter().take(PREFETCH_AHEAD) {
            prefetch_text(&request.body);
        }
        // The prefix of the request before, copied whole when the next one's is the same
        // (most often: one endpoint and model).
        let mut prefix: Option<(&Request, std::ops::Range<usize>)> = None;
        for (n, request) in requests.iter().enumerate() {
            if let Some(ahead) = requests.get(n + PREFETCH_AHEAD) {
                prefetch_text(&ahead.body);
            }
            let start = bytes.len();
            match &prefix {
                Some((before, at))
                    if before.endpoint == request.endpoint && before.model == request.model =>
                {
                    bytes.extend_from_within(at.clone());
                }
                _ => {
                    key_prefix(target, request, bytes);
                    prefix = Some((request, start..bytes.len()));
                }
            }
            key_rest(request, canon, bytes);
            ends.push(bytes.len());
        }
        let mut from = 0;
        let inputs: Vec<&[u8]> = ends
            .iter()
            .map(|&end| {
                let input = &bytes[from..end];
                from = end;
                input
            })
            .collect();
        let mut out = vec![CacheKey::default(); requests.len()];
        crate::blake3_many::hash_many(&inputs, &mut out, first);
        out
    })
}

/// How many requests ahead of the one whose key is being read [`keys`] asks for a body.
const PREFETCH_AHEAD: usize = 4;

/// Asks the processor to bring the first 256 bytes of `text` into its cache (a hint,
/// which changes nothing the program sees).
#[inline]
fn prefetch_text(text: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in text.chunks(64).take(4) {
        // SAFETY: a prefetch reads nothing the program sees and never faults; the address
        // is in bounds. `sse`, which it needs, is part of every x86_64 target.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast());
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = text;
}

/// Appends to `out` what the key of `request` hashes: the key version, the target, the
/// endpoint, the model, and the canonical form of the body ([`keys`] writes it in two
/// parts).
#[cfg(test)]
fn key_input(target: &str, request: &Request, canon: &mut Canon, out: &mut Vec<u8>) {
    key_prefix(target, request, out);
    key_rest(request, canon, out);
}

/// The start of what the key of `request` hashes: the key version, the target, the
/// endpoint and the model.
fn key_prefix(target: &str, request: &Request, out: &mut Vec<u8>) {
    out.extend_from_slice(b"sluice-cache-v1\0");
    out.extend_from_slice(target.as_bytes());
    out.push(0);
    out.extend_from_slice(endpoint_name(request.endpoint).as_bytes());
    out.push(0);
    out.extend_from_slice(request.model.as_bytes());
    out.push(0);
}

/// The rest of what the key of `request` hashes after [`key_prefix`]: the canonical form
/// of its body.
fn key_rest(request: &Request, canon: &mut Canon, out: &mut Vec<u8>) {
    if let Some(form) = &request.key_form {
        let head = out.len();
        match form {
            KeyForm::Body(len) => {
                out.extend_from_slice(&request.body[..*len as usize]);
                out.push(b'}');
            }
            KeyForm::Apart(form) => out.extend_from_slice(form),
        }
        // What the input parser wrote is what reading the body gives: a debug build (plain
        // `cargo test`) checks every key so computed.
        #[cfg(debug_assertions)]
        {
            let mut read = Vec::new();
            key_body(&request.body, canon, &mut read);
            assert!(
                read == out[head..],
                "the key form of line {} is not its body's",
                request.line
            );
        }
        #[cfg(not(debug_assertions))]
        let _ = head;
        return;
    }
    key_body(&request.body, canon, out);
}

/// Appends to `out` the canonical form of `body` (less its non-semantic fields), or the
/// body itself when it is not a JSON object.
fn key_body(body: &[u8], canon: &mut Canon, out: &mut Vec<u8>) {
    let head = out.len();
    if canon.text(body, out).is_none() {
        out.truncate(head);
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(mut body)) => {
                for field in NON_SEMANTIC_FIELDS {
                    body.remove(*field);
                }
                canonical(&Value::Object(body), out);
            }
            // Bodies are JSON objects by construction; anything else is keyed by its bytes.
            _ => out.extend_from_slice(body),
        }
    }
}

/// The endpoint as keys name it (its `Debug` form, which earlier versions hashed).
fn endpoint_name(e: crate::request::Endpoint) -> &'static str {
    use crate::request::Endpoint::*;
    match e {
        ChatCompletions => "ChatCompletions",
        Embeddings => "Embeddings",
        Messages => "Messages",
        GenerateContent => "GenerateContent",
    }
}

/// [`canonical`] of the JSON text `text` without building a tree (less the non-semantic
/// fields at the top): the same bytes, held to them by a test. One pass (see [`Canon`]).
/// `None` (and `out` in any state) for text that is not one JSON object, has a member name
/// written with escapes or given twice, or is nested deeper than [`CANON_DEPTH`]; [`key`]
/// then builds the tree.
#[cfg(test)]
fn canonical_text(text: &[u8], out: &mut Vec<u8>) -> Option<()> {
    Canon::default().text(text, out)
}

/// How deep [`Canon`] reads (as deep as `serde_json` builds a tree): a body nested deeper
/// is keyed by its bytes, and never overflows the stack.
const CANON_DEPTH: u32 = 127;

/// The buffers of [`canonical_text`], which reads the text once, writing as it goes. Text
/// already in its canonical form (no spaces, no escapes, numbers written one way) is not
/// copied piece by piece but a run at a time, when something in it has to change or the
/// text ends. An object whose members are out of order is put in order in the output when
/// it closes: its members, each already in canonical form, are copied in order to a
/// scratch buffer and back. Most bodies have one or two such objects (`model` comes before
/// `messages`, `role` before `content`), and moving their bytes costs less than keeping a
/// tree of the whole body (which an earlier version did, at twice the instructions).
#[derive(Default)]
struct Canon {
    /// The members of the objects being read, the innermost object's last.
    members: Vec<Member>,
    /// An object's members, in order.
    scratch: Vec<u8>,
}

/// A member of an object read by [`Canon`].
#[derive(Clone, Copy)]
struct Member {
    /// The name's first 8 bytes, big-endian, zeros after a shorter name. In the names'
    /// order (an unescaped name holds no zero byte), so most comparisons need only these.
    head: u64,
    /// The name's span in the text, without its quotes.
    name: (u32, u32),
    /// The span of `"name":value` in the output (from the start of the body's form).
    at: (u32, u32),
}

impl Member {
    /// The order of the names (in the text `b`).
    fn order(&self, other: &Member, b: &[u8]) -> std::cmp::Ordering {
        self.head.cmp(&other.head).then_with(|| {
            let (x, y) = (span(self.name), span(other.name));
            if x.len() <= 8 && y.len() <= 8 {
                // The heads are the names.
                std::cmp::Ordering::Equal
            } else {
                b[x].cmp(&b[y])
            }
        })
    }
}

fn span((from, to): (u32, u32)) -> std::ops::Range<usize> {
    from as usize..to as usize
}

/// [`Member::head`] of the name at `b[from..to]`.
fn name_head(b: &[u8], from: usize, to: usize) -> u64 {
    let len = to - from;
    match b.get(from..from + 8) {
        // Eight bytes read at once (copying fewer into a buffer and reading it whole
        // stalls the load), less those past the name.
        Some(eight) => {
            let v = u64::from_be_bytes(eight.try_into().expect("8 bytes"));
            if len >= 8 {
                v
            } else {
                v & !(u64::MAX >> (len * 8))
            }
        }
        None => {
            let mut v = 0u64;
            for (n, &c) in b[from..to].iter().take(8).enumerate() {
                v |= u64::from(c) << (56 - 8 * n);
            }
            v
        }
    }
}

/// Whether a top-level member named `name` is left out of the key ([`NON_SEMANTIC_FIELDS`],
/// held to the same list by a test).
fn non_semantic(name: &[u8]) -> bool {
    matches!(
        name,
        b"user"
            | b"metadata"
            | b"stream"
            | b"stream_options"
            | b"store"
            | b"service_tier"
            | b"safety_identifier"
            | b"prompt_cache_key"
    )
}

impl Canon {
    /// [`canonical_text`].
    fn text(&mut self, text: &[u8], out: &mut Vec<u8>) -> Option<()> {
        if text.len() >= u32::MAX as usize {
            return None;
        }
        if !text.is_ascii() {
            std::str::from_utf8(text).ok()?;
        }
        self.members.clear();
        let i = crate::json::skip_ws(text, 0);
        if text.get(i) != Some(&b'{') {
            return None;
        }
        out.reserve(text.len() + 2);
        let mut w = Writer {
            b: text,
            base: out.len(),
            out,
            from: i,
            members: &mut self.members,
            scratch: &mut self.scratch,
            renumbered: false,
        };
        let end = w.object(i, CANON_DEPTH, true)?;
        if crate::json::skip_ws(text, end) != text.len() {
            return None;
        }
        w.flush(end);
        Some(())
    }
}

impl Canon {
    /// The canonical form of the one JSON value that is all of `text` (no space around
    /// it), whose values are allowed `depth` more levels; and whether a number in it was
    /// written otherwise (its value is the same to anyone who reads it as an `f64`).
    fn value(&mut self, text: &[u8], depth: u32, out: &mut Vec<u8>) -> Option<bool> {
        if text.len() >= u32::MAX as usize {
            return None;
        }
        self.members.clear();
        let mut w = Writer {
            b: text,
            base: out.len(),
            out,
            from: 0,
            members: &mut self.members,
            scratch: &mut self.scratch,
            renumbered: false,
        };
        if w.value(0, depth)? != text.len() {
            return None;
        }
        w.flush(text.len());
        Some(w.renumbered)
    }
}

/// The form a key hashes (see [`key`]) of a chat body's `messages`, written as the input
/// parser reads them: each message's members as they come, then its end.
pub(crate) struct MessagesForm<'a> {
    /// The line read.
    line: &'a [u8],
    /// The members of the message being read: the name (without quotes or escapes), the
    /// value as written and whether it is written as its form writes it.
    members: arrayvec::ArrayVec<(&'a str, &'a [u8], bool), MESSAGE_MEMBERS>,
    /// The messages read so far, in their form, with commas between.
    out: Vec<u8>,
    /// A number in them is written otherwise in their form.
    renumbered: bool,
    /// A message was not one this reads (the key then reads the body).
    failed: bool,
}

/// The most members a message read by [`MessagesForm`] has.
const MESSAGE_MEMBERS: usize = 12;

thread_local! {
    /// The buffer of [`MessagesForm`], kept between lines.
    static MESSAGES_FORM: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

impl Drop for MessagesForm<'_> {
    fn drop(&mut self) {
        MESSAGES_FORM.set(std::mem::take(&mut self.out));
    }
}

impl<'a> MessagesForm<'a> {
    /// An empty form of messages read from `line`, in the thread's buffer.
    pub(crate) fn new(line: &'a str) -> Self {
        let mut out = MESSAGES_FORM.take();
        out.clear();
        MessagesForm {
            line: line.as_bytes(),
            members: arrayvec::ArrayVec::new(),
            out,
            renumbered: false,
            failed: false,
        }
    }

    /// Forgets what was read.
    pub(crate) fn clear(&mut self) {
        self.out.clear();
        self.members.clear();
        self.renumbered = false;
        self.failed = false;
    }

    /// A member of the message being read (its name written without escapes), and
    /// whether its value is written as its form writes it.
    #[inline]
    pub(crate) fn member(&mut self, name: &'a str, value: &'a str, plain: bool) {
        if self
            .members
            .try_push((name, value.as_bytes(), plain))
            .is_err()
        {
            self.failed = true;
        }
    }

    /// The message being read has ended: it is written, its members in order.
    pub(crate) fn message_end(&mut self) {
        if !self.failed && self.two_written() {
            self.members.clear();
            return;
        }
        let members = &mut self.members;
        let mut order = arrayvec::ArrayVec::<u128, MESSAGE_MEMBERS>::new();
        order.extend(members.iter().enumerate().map(|(n, m)| head_of(m.0, n)));
        if self.failed || name_order(&mut order, |n| members[n].0).is_none() {
            self.failed = true;
            return;
        }
        let out = &mut self.out;
        if !out.is_empty() {
            out.push(b',');
        }
        out.push(b'{');
        for (n, &at) in order.iter().enumerate() {
            let (name, value, plain) = members[at as u8 as usize];
            if n > 0 {
                out.push(b',');
            }
            // The body, `messages`, the message: three levels down.
            match member_form(self.line, name, value, plain, CANON_DEPTH - 3, out) {
                Some(renumbered) => self.renumbered |= renumbered,
                None => {
                    self.failed = true;
                    return;
                }
            }
        }
        out.push(b'}');
        members.clear();
    }

    /// [`MessagesForm::message_end`] of the most usual message: two members (`role` and
    /// `content`) whose names differ in their first 8 bytes, each written in the line as
    /// its form writes it. Whether it was one.
    #[inline]
    fn two_written(&mut self) -> bool {
        let [(a, a_value, true), (b, b_value, true)] = self.members[..] else {
            return false;
        };
        let (a_head, b_head) = (head_of(a, 0) >> 64, head_of(b, 0) >> 64);
        if a_head == b_head {
            return false;
        }
        let (Some(a), Some(b)) = (
            written_member(self.line, a, a_value),
            written_member(self.line, b, b_value),
        ) else {
            return false;
        };
        let (first, second) = if a_head < b_head { (a, b) } else { (b, a) };
        let out = &mut self.out;
        if !out.is_empty() {
            out.push(b',');
        }
        out.push(b'{');
        out.extend_from_slice(first);
        out.push(b',');
        out.extend_from_slice(second);
        out.push(b'}');
        true
    }

    /// The messages' form (without the brackets), unless one could not be read; and
    /// whether a number in it is written otherwise.
    fn form(&self) -> Option<(&[u8], bool)> {
        (!self.failed && self.members.is_empty()).then_some((&self.out[..], self.renumbered))
    }
}

/// How the input parser wrote a body for the response cache (see
/// [`crate::request::LineParser::key_forms`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyForm {
    /// The body is written in its canonical form, its non-semantic members last: what the
    /// key hashes is its first this many bytes, then `}`.
    Body(u32),
    /// What the key hashes, written apart (the body is as the line has it).
    Apart(Vec<u8>),
}

/// Writes a chat body for a run with a response cache, from what the input parser has read
/// of the line: the body's top-level `members` (name, value as written, valid JSON, and
/// whether it is written as its canonical form writes it; the names without escapes, at
/// most 32 that are not [`NON_SEMANTIC_FIELDS`]) and the [`MessagesForm`] of its
/// `messages`, when it has one. So a chat body's text is not walked a second time for its
/// key.
///
/// The body is written in its canonical form when that changes nothing but the order of
/// its members and the space between them ([`KeyForm::Body`]): the same JSON to whoever
/// reads it, less the bytes the key would otherwise copy out of it. Otherwise (a number
/// written otherwise than the form writes it, `1.0` or `0.7`), the key's form is returned
/// apart ([`KeyForm::Apart`]) and the caller writes the body as the line has it, as it does
/// when this returns `None` (a name given twice, or a value [`Canon`] does not read: the
/// key then reads the body); in both cases the caller empties `out` first.
pub(crate) fn write_body<'m>(
    line: &str,
    members: impl Iterator<Item = (&'m str, &'m [u8], bool)> + Clone,
    messages: Option<&MessagesForm<'_>>,
    out: &mut Vec<u8>,
) -> Option<KeyForm> {
    let line = line.as_bytes();
    let messages = messages.and_then(MessagesForm::form);
    let mut kept = arrayvec::ArrayVec::<_, 32>::new();
    let mut order = arrayvec::ArrayVec::<u128, 32>::new();
    let mut left_out = false;
    for (name, value, plain) in members.clone() {
        if non_semantic(name.as_bytes()) {
            left_out = true;
        } else {
            order.try_push(head_of(name, kept.len())).ok()?;
            kept.try_push((name, value, plain)).ok()?;
        }
    }
    name_order(&mut order, |n| kept[n].0)?;
    let head = out.len();
    out.push(b'{');
    let mut renumbered = false;
    for (n, &at) in order.iter().enumerate() {
        let (name, value, plain) = kept[at as u8 as usize];
        if n > 0 {
            out.push(b',');
        }
        match messages {
            Some((form, messages_renumbered)) if name == "messages" => {
                member_name(name, out);
                out.push(b'[');
                out.extend_from_slice(form);
                out.push(b']');
                renumbered |= messages_renumbered;
            }
            _ => renumbered |= member_form(line, name, value, plain, CANON_DEPTH - 1, out)?,
        }
    }
    if !renumbered {
        let form = out.len() - head;
        if left_out {
            for (name, value, _) in members.filter(|m| non_semantic(m.0.as_bytes())) {
                if out.len() > head + 1 {
                    out.push(b',');
                }
                member_name(name, out);
                out.extend_from_slice(value);
            }
        }
        out.push(b'}');
        return Some(KeyForm::Body(form as u32));
    }
    // The key's form apart (and the body is for the caller to write as the line has it).
    out.push(b'}');
    Some(KeyForm::Apart(out.split_off(head)))
}

/// Puts members in order of their names: `order` holds for each its [`head_of`], and
/// `name` gives its name. An insertion sort (there are few), of the heads, then of the
/// names of those whose heads are alike; `None` if a name is given twice.
#[inline]
fn name_order<'n>(order: &mut [u128], name: impl Fn(usize) -> &'n str) -> Option<()> {
    for n in 1..order.len() {
        let key = order[n];
        let mut at = n;
        while at > 0 && order[at - 1] > key {
            order[at] = order[at - 1];
            at -= 1;
        }
        order[at] = key;
    }
    let head = |key: u128| (key >> 64) as u64;
    let index = |key: u128| key as u8 as usize;
    let mut n = 1;
    while n < order.len() {
        if head(order[n]) != head(order[n - 1]) {
            n += 1;
            continue;
        }
        // Names alike in their first 8 bytes (or the same name).
        let from = n - 1;
        let mut to = n + 1;
        while to < order.len() && head(order[to]) == head(order[from]) {
            to += 1;
        }
        let run = &mut order[from..to];
        run.sort_unstable_by(|x, y| name(index(*x)).cmp(name(index(*y))));
        if run
            .windows(2)
            .any(|w| name(index(w[0])) == name(index(w[1])))
        {
            return None;
        }
        n = to;
    }
    Some(())
}

/// What [`name_order`] sorts a name by: its [`Member::head`] above the member's index.
#[inline]
fn head_of(name: &str, index: usize) -> u128 {
    let mut head = [0u8; 8];
    let n = name.len().min(8);
    head[..n].copy_from_slice(&name.as_bytes()[..n]);
    (u128::from(u64::from_be_bytes(head)) << 64) | index as u128
}

/// `"name":`, for a name written without escapes.
#[inline]
fn member_name(name: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

/// Appends `"name":` and the canonical form of `value` (`plain` when it is written so);
/// when the line has them one after the other, they are copied from it at once. Returns
/// whether a number was written otherwise (see [`Canon::value`]).
#[inline(always)]
fn member_form(
    line: &[u8],
    name: &str,
    value: &[u8],
    plain: bool,
    depth: u32,
    out: &mut Vec<u8>,
) -> Option<bool> {
    if plain {
        match written_member(line, name, value) {
            Some(written) => out.extend_from_slice(written),
            None => {
                member_name(name, out);
                out.extend_from_slice(value);
            }
        }
        return Some(false);
    }
    member_name(name, out);
    value_form(value, depth, out)
}

/// `"name":value` in `line`, when `name` and `value` are parts of it written so.
#[inline]
fn written_member<'l>(line: &'l [u8], name: &str, value: &[u8]) -> Option<&'l [u8]> {
    let base = line.as_ptr() as usize;
    let at = (name.as_ptr() as usize).checked_sub(base)?;
    let value_at = (value.as_ptr() as usize).checked_sub(base)?;
    let end = value_at.checked_add(value.len())?;
    // The name and the value lie in the line (so are its bytes there), with only `":`
    // between them and a quote before.
    let joined = at >= 1
        && value_at == at + name.len() + 2
        && end <= line.len()
        && line[at - 1] == b'"'
        && line[at + name.len()] == b'"'
        && line[at + name.len() + 1] == b':';
    joined.then(|| &line[at - 1..end])
}

/// Appends the canonical form of the JSON value `value` (valid JSON, as written, with no
/// space around it), whose values are allowed `depth` more levels: a string without
/// escapes, a small whole number or a literal as it is, anything else as [`Canon`] reads
/// it. Returns whether a number was written otherwise (see [`Canon::value`]).
fn value_form(value: &[u8], depth: u32, out: &mut Vec<u8>) -> Option<bool> {
    let plain = match value.first()? {
        b'"' => !has_backslash(value),
        b't' | b'f' | b'n' => true,
        b'0'..=b'9' | b'-' => crate::json::plain_int(value),
        _ => false,
    };
    if plain {
        out.extend_from_slice(value);
        return Some(false);
    }
    thread_local! {
        /// The buffers of the values read by [`Canon`].
        static CANON: std::cell::RefCell<Canon> = Default::default();
    }
    CANON.with_borrow_mut(|canon| canon.value(value, depth, out))
}

/// Whether `text` holds a `\\`: sixteen bytes at a time with SSE2 (part of every x86-64
/// processor).
#[inline]
fn has_backslash(text: &[u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{
            _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi8,
        };
        let mut chunks = text.chunks_exact(16);
        for chunk in &mut chunks {
            // SAFETY: `chunk` is 16 bytes, and the load needs no alignment; the rest is
            // arithmetic on registers.
            let hits = unsafe {
                let v = _mm_loadu_si128(chunk.as_ptr().cast());
                _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8)))
            };
            if hits != 0 {
                return true;
            }
        }
        chunks.remainder().contains(&b'\\')
    }
    #[cfg(not(target_arch = "x86_64"))]
    text.contains(&b'\\')
}

/// One body being written by [`Canon`].
struct Writer<'a> {
    /// The text.
    b: &'a [u8],
    out: &'a mut Vec<u8>,
    /// Where the body's form starts in `out`.
    base: usize,
    /// The text from here to where reading has got to is its own canonical form, not yet
    /// copied to `out`.
    from: usize,
    members: &'a mut Vec<Member>,
    scratch: &'a mut Vec<u8>,
    /// A number was written otherwise than the text has it.
    renumbered: bool,
}

impl Writer<'_> {
    /// Where the text at `i` (not before [`Writer::from`]) is in the output, from the
    /// start of the body's form.
    #[inline]
    fn pos(&self, i: usize) -> u32 {
        (self.out.len() - self.base + (i - self.from)) as u32
    }

    /// Copies the text up to `i` as it is.
    #[inline]
    fn flush(&mut self, i: usize) {
        self.out.extend_from_slice(&self.b[self.from..i]);
        self.from = i;
    }

    /// Where the whitespace at `i` ends (it is left out).
    #[inline]
    fn skip(&mut self, i: usize) -> usize {
        match self.b.get(i) {
            Some(b' ' | b'\n' | b'\r' | b'\t') => {
                self.flush(i);
                self.from = crate::json::skip_ws(self.b, i);
                self.from
            }
            _ => i,
        }
    }

    /// Reads the value at `i` (`depth` more levels allowed) and writes its form; returns
    /// where it ends.
    fn value(&mut self, i: usize, depth: u32) -> Option<usize> {
        use crate::json::{number_end, string_end_escaped};
        let b = self.b;
        match *b.get(i)? {
            b'{' => self.object(i, depth, false),
            b'[' => self.array(i, depth),
            b'"' => {
                let (end, escaped) = string_end_escaped(b, i).ok()?;
                if escaped {
                    // As serde_json writes the string.
                    self.flush(i);
                    let s: String = serde_json::from_slice(&b[i..end]).ok()?;
                    serde_json::to_writer(&mut *self.out, &s).ok()?;
                    self.from = end;
                }
                Some(end)
            }
            c @ (b't' | b'f' | b'n') => {
                let word: &[u8] = match c {
                    b't' => b"true",
                    b'f' => b"false",
                    _ => b"null",
                };
                if !b[i..].starts_with(word) {
                    return None;
                }
                Some(i + word.len())
            }
            _ => {
                let end = number_end(b, i).ok()?;
                let v = &b[i..end];
                // A whole number that an f64 holds exactly is written as it is; any other
                // as `canonical` writes it.
                if !crate::json::plain_int(v) {
                    self.flush(i);
                    let n: serde_json::Number = serde_json::from_slice(v).ok()?;
                    canonical(&Value::Number(n), self.out);
                    self.renumbered = true;
                    self.from = end;
                }
                Some(end)
            }
        }
    }

    /// [`Writer::value`] of the object at `i`; at the `top`, the non-semantic members are
    /// left out.
    fn object(&mut self, i: usize, depth: u32, top: bool) -> Option<usize> {
        use crate::json::string_end_escaped;
        let depth = depth.checked_sub(1)?;
        let b = self.b;
        let first = self.members.len();
        let mut in_order = true;
        // A member was left out before any was kept: the comma after it goes too.
        let mut drop_comma = false;
        let mut j = self.skip(i + 1);
        if b.get(j) != Some(&b'}') {
            loop {
                if b.get(j) != Some(&b'"') {
                    return None;
                }
                let (name_end, escaped) = string_end_escaped(b, j).ok()?;
                if escaped {
                    return None;
                }
                let at = self.pos(j);
                let mut colon = name_end;
                if b.get(colon) != Some(&b':') {
                    colon = self.skip(colon);
                    if b.get(colon) != Some(&b':') {
                        return None;
                    }
                }
                let v = self.skip(colon + 1);
                let end = self.value(v, depth)?;
                let name = (j + 1, name_end - 1);
                if top && non_semantic(&b[name.0..name.1]) {
                    // Left out, with the comma before it if a member was kept before it.
                    self.flush(end);
                    let kept = self.members.len() > first;
                    self.out
                        .truncate(self.base + at as usize - usize::from(kept));
                    drop_comma = !kept;
                } else {
                    let m = Member {
                        head: name_head(b, name.0, name.1),
                        name: (name.0 as u32, name.1 as u32),
                        at: (at, self.pos(end)),
                    };
                    if let Some(last) = self.members[first..].last() {
                        in_order &= last.order(&m, b).is_lt();
                    }
                    self.members.push(m);
                }
                j = self.skip(end);
                match b.get(j) {
                    Some(b',') => {
                        if std::mem::take(&mut drop_comma) {
                            self.flush(j);
                            self.from = j + 1;
                        }
                        j = self.skip(j + 1);
                    }
                    Some(b'}') => break,
                    _ => return None,
                }
            }
        }
        if !in_order {
            self.put_in_order(first, j, b)?;
        }
        self.members.truncate(first);
        Some(j + 1)
    }

    /// Puts the members of the object read from `first` on (its `}` at `close`) in order
    /// in the output; `None` if a name is given twice.
    fn put_in_order(&mut self, first: usize, close: usize, b: &[u8]) -> Option<()> {
        let ms = &mut self.members[first..];
        // Where the first member is, in the output and in the text.
        let (start, text_start) = (ms[0].at.0 as usize, ms[0].name.0 as usize - 1);
        // Most objects are small: insertion sort for those.
        if ms.len() > 16 {
            ms.sort_unstable_by(|x, y| x.order(y, b));
        } else {
            for n in 1..ms.len() {
                let mut m = n;
                while m > 0 && ms[m].order(&ms[m - 1], b).is_lt() {
                    ms.swap(m - 1, m);
                    m -= 1;
                }
            }
        }
        // Strictly in order now, or a name is given twice.
        if ms.windows(2).any(|w| !w[0].order(&w[1], b).is_lt()) {
            return None;
        }
        let out = &mut *self.out;
        if self.from <= text_start {
            // The object is written as it is, less its order (most are): its members are
            // copied from the text, in order.
            out.extend_from_slice(&b[self.from..text_start]);
            // From the output to the text: less when what came before was written longer
            // than it is in the text (`1e5` as `100000`), hence the wrapping.
            let shift = text_start.wrapping_sub(start);
            for (n, m) in ms.iter().enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                let at = (m.at.0 as usize).wrapping_add(shift);
                out.extend_from_slice(&b[at..at + (m.at.1 - m.at.0) as usize]);
            }
            self.from = close;
            return Some(());
        }
        // Its members, in the output one after another with a comma between, are copied
        // out in order and back.
        out.extend_from_slice(&b[self.from..close]);
        self.from = close;
        let scratch = &mut *self.scratch;
        scratch.clear();
        for (n, m) in ms.iter().enumerate() {
            if n > 0 {
                scratch.push(b',');
            }
            scratch.extend_from_slice(
                &out[self.base + m.at.0 as usize..][..(m.at.1 - m.at.0) as usize],
            );
        }
        let start = self.base + start;
        out[start..start + scratch.len()].copy_from_slice(scratch);
        Some(())
    }

    /// [`Writer::value`] of the array at `i`.
    fn array(&mut self, i: usize, depth: u32) -> Option<usize> {
        let depth = depth.checked_sub(1)?;
        let b = self.b;
        let mut j = self.skip(i + 1);
        if b.get(j) != Some(&b']') {
            loop {
                let end = self.value(j, depth)?;
                j = self.skip(end);
                match b.get(j) {
                    Some(b',') => j = self.skip(j + 1),
                    Some(b']') => break,
                    _ => return None,
                }
            }
        }
        Some(j + 1)
    }
}

/// Writes `v` with sorted keys and one spelling per number.
fn canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k).expect("strings serialise");
                out.push(b':');
                canonical(&map[k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(item, out);
            }
            out.push(b']');
        }
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() == 0.0 && f.abs() < 9.0e15 {
                out.extend_from_slice((f as i64).to_string().as_bytes());
            } else if let Some(i) = n.as_i64() {
                out.extend_from_slice(i.to_string().as_bytes());
            } else if let Some(u) = n.as_u64() {
                out.extend_from_slice(u.to_string().as_bytes());
            } else {
                out.extend_from_slice(format!("{f:e}").as_bytes());
            }
        }
        other => serde_json::to_writer(&mut *out, other).expect("JSON serialises"),
    }
}

/// A response to store.
pub struct Store<'a> {
    /// Its key.
    pub key: CacheKey,
    /// The model that answered.
    pub model: &'a str,
    /// The response body.
    pub response: &'a RawJson,
    /// Its usage.
    pub usage: Option<Usage>,
}

/// Responses waiting to be stored, already laid out as the data file holds them (so
/// nothing is copied but the response, once, and it is written with one call).
#[derive(Default)]
pub struct Batch {
    buf: Vec<u8>,
    /// Each record's key (first 8 bytes) and offset in `buf`.
    records: Vec<(i64, usize)>,
}

impl Batch {
    /// A batch for about `responses` responses at a time: its buffer is sized by the
    /// first response (up to [`BATCH_RESERVE_MAX`]), not grown (copied, and its fresh
    /// memory zeroed) as they come. Twice the first response's size a response: responses
    /// vary, and a batch takes a few more than `responses` before it is stored (room set
    /// aside and never written takes no memory).
    pub fn with_capacity(responses: usize) -> Batch {
        Batch {
            buf: Vec::new(),
            records: Vec::with_capacity(responses),
        }
    }

    /// Adds a response.
    pub fn push(&mut self, s: &Store<'_>) {
        if self.buf.capacity() == 0 {
            let record = RECORD_HEADER + s.model.len() + s.response.get().len() + RECORD_TRAILER;
            let room = self.records.capacity().max(1) * 2 * record;
            self.buf.reserve(room.min(BATCH_RESERVE_MAX));
        }
        self.records.push((short(&s.key), self.buf.len()));
        encode(&mut self.buf, s);
    }

    /// Responses waiting.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Forgets them.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.records.clear();
    }
}

/// The response cache.
///
/// Responses are appended to the data file (`PATH-data`), a batch at a time, as records:
/// the key, the usage, the model, the response and a CRC of them. Each batch is a *region*
/// of the file, listed in `regions`; the file's end is the last region's end, read in the
/// write transaction that appends the next one, so writers in several processes take turns
/// and never overlap. A write that was never committed (a crash between the two) lies past
/// that end and is written over by the next. The responses are written once: through
/// SQLite they were written twice (its WAL, then the database) and read back in between,
/// which cost more than the rest of the cache together.
///
/// The index maps the first 8 bytes of a key to its record's place. It is `key_blocks`:
/// rows of up to [`BLOCK_KEYS`] pairs (key, place) in the order of the keys, each row
/// holding the keys from its `lo` to the next row's. The keys are random, so each one
/// written to the index dirties a page of its own unless many are written at once, in
/// order. So the keys of new records are first held here (in `fresh`, at most
/// [`MERGE_ROWS`] of them, about 16 bytes each), then merged into the blocks together:
/// each block is read, merged and written once, which costs a tenth of what a row per key
/// did (SQLite seeking and inserting each one). Until then their regions are listed in
/// `unmerged_regions`; a cache opened after a crash merges what is listed there.
///
/// A record is read with its CRC checked: one that does not check (a torn write after a
/// power loss, a damaged file) is a miss, never a wrong answer.
///
/// Version 3 held the records in SQLite, many to a row of `chunks` (and `unmerged` listed
/// those not yet merged), and its index as a row per key (`keys`). Its records still
/// answer where they are; its index is converted to blocks the first time it is opened to
/// write, and it is version 4 from then on. Version 2 (one row per response, keyed by the whole key) cost
/// SQLite a page write per response; a cache of version 1 or 2 is converted the first time
/// it is opened to write.
pub struct Cache {
    conn: Connection,
    path: PathBuf,
    read_only: bool,
    /// The data file (`None` when read-only and there is none).
    data: Option<File>,
    /// Lookups made in the read transaction now open (0: none is open).
    reads: std::cell::Cell<u32>,
    /// Lookups the filter answered since SQLite was last asked whether another connection
    /// wrote.
    unasked: std::cell::Cell<u32>,
    /// Records whose keys are not yet in the index.
    fresh: Fresh,
    /// The keys in the index and in `fresh`, as a filter: a key it does not hold is a miss
    /// without asking SQLite (whose pages of the index, pushed out of its page cache by what
    /// is written, were read from the file again for each miss). Built when the cache is
    /// opened, kept up to date as this connection stores...
    filter: Option<KeyFilter>,
    /// ...and no longer used once another connection has written (`filter_stale`), which
    /// SQLite's count of other connections' commits (`data_version`) tells.
    filter_stale: std::cell::Cell<bool>,
    data_version: std::cell::Cell<i64>,
    /// Lookups that asked SQLite (for tests).
    probes: std::cell::Cell<u64>,
}

/// A split-block Bloom filter of the first 8 bytes of keys (random already: they are
/// BLAKE3 output), in parts that double in size as keys are added. No crate offers one
/// over precomputed 64-bit hashes that grows without the keys it holds.
struct KeyFilter {
    /// Each part: blocks of 8 words, a key setting one bit in each word of one block.
    parts: Vec<Vec<[u64; 8]>>,
    /// Keys in the last part.
    last_len: usize,
}

/// Bits of filter per key: about 0.2% of misses still ask SQLite.
const FILTER_BITS_PER_KEY: usize = 16;
/// A cache with more keys than this is opened without a filter (it would take over 64 MiB).
const FILTER_MAX_KEYS: usize = 1 << 25;

impl KeyFilter {
    fn with_capacity(keys: usize) -> KeyFilter {
        let mut f = KeyFilter {
            parts: Vec::new(),
            last_len: 0,
        };
        f.add_part(keys);
        f
    }

    fn add_part(&mut self, keys: usize) {
        let blocks = (keys.max(1 << 12) * FILTER_BITS_PER_KEY)
            .div_ceil(512)
            .next_power_of_two();
        self.parts.push(vec![[0; 8]; blocks]);
        self.last_len = 0;
    }

    /// The keys a part of `blocks` blocks is sized for.
    fn capacity(blocks: usize) -> usize {
        blocks * 512 / FILTER_BITS_PER_KEY
    }

    /// The block of `k` in a part of `blocks` blocks, and its bit in each word.
    fn place(k: i64, blocks: usize) -> (usize, [u64; 8]) {
        let k = k as u64;
        let block = (k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize & (blocks - 1);
        let bits = k.rotate_left(29).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
        (
            block,
            std::array::from_fn(|i| 1 << ((bits >> (i * 8)) & 63)),
        )
    }

    fn insert(&mut self, k: i64) {
        let last = self.parts.last().map_or(0, Vec::len);
        if self.last_len >= KeyFilter::capacity(last) {
            let total = KeyFilter::capacity(self.parts.iter().map(Vec::len).sum());
            self.add_part(total);
        }
        let part = self.parts.last_mut().expect("a part");
        let (block, bits) = KeyFilter::place(k, part.len());
        for (word, bit) in part[block].iter_mut().zip(bits) {
            *word |= bit;
        }
        self.last_len += 1;
    }

    /// Makes room for `more` keys in one part: a miss reads a line of every part, and a
    /// filter grown part by part to a million keys has five. A filter that holds nothing
    /// yet is made again at that size.
    fn reserve(&mut self, more: usize) {
        let last = self.parts.last().map_or(0, Vec::len);
        if self.last_len + more <= KeyFilter::capacity(last) {
            return;
        }
        if self.parts.len() == 1 && self.last_len == 0 {
            *self = KeyFilter::with_capacity(more);
        } else {
            self.add_part(more);
        }
    }

    /// Asks the processor to bring `k`'s block of each part into its cache (what
    /// [`KeyFilter::may_hold`] reads).
    fn prefetch(&self, k: i64) {
        for part in &self.parts {
            prefetch_block(part, k);
        }
    }

    /// The same for the block [`KeyFilter::insert`] writes.
    fn prefetch_insert(&self, k: i64) {
        if let Some(part) = self.parts.last() {
            prefetch_block(part, k);
        }
    }

    /// Whether `k` may have been inserted (never `false` for one that was).
    fn may_hold(&self, k: i64) -> bool {
        self.parts.iter().any(|part| {
            let (block, bits) = KeyFilter::place(k, part.len());
            part[block]
                .iter()
                .zip(bits)
                .all(|(word, bit)| word & bit != 0)
        })
    }

    /// The filter of the keys in the index, or `None` for more than [`FILTER_MAX_KEYS`].
    fn of_index(conn: &Connection) -> rusqlite::Result<Option<KeyFilter>> {
        let n = indexed(conn)? as usize;
        if n > FILTER_MAX_KEYS {
            return Ok(None);
        }
        let mut f = KeyFilter::with_capacity(n.max(MERGE_ROWS));
        let mut q = conn.prepare("SELECT keys FROM key_blocks")?;
        let mut rows = q.query([])?;
        while let Some(row) = rows.next()? {
            if let ValueRef::Blob(block) = row.get_ref(0)? {
                for (k, _) in pairs(block) {
                    f.insert(k);
                }
            }
        }
        Ok(Some(f))
    }
}

/// Asks the processor to bring `k`'s block of `part` of a [`KeyFilter`] into its cache: a
/// hint, which changes nothing the program sees.
fn prefetch_block(part: &[[u64; 8]], k: i64) {
    let (block, _) = KeyFilter::place(k, part.len());
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing the program sees and never faults, whatever the
    // address (this one is in bounds). `sse`, which it needs, is part of every x86_64
    // target.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(part[block].as_ptr().cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = &part[block];
}

/// Records stored whose keys are not yet in the index.
#[derive(Default)]
struct Fresh {
    /// Their places, by their key's first 8 bytes.
    places: FxHashMap<i64, i64>,
    /// The version 3 chunks holding them (found unmerged when the cache was opened).
    chunks: Vec<i64>,
    /// The regions of the data file holding them.
    regions: Vec<i64>,
}

/// Lookups share one read transaction, this many at most: on its own, every lookup took
/// and released SQLite's shared locks (two `fcntl` calls and a scan of the WAL index),
/// which cost more than the lookup. A lookup may miss what another process stored since
/// the transaction began, which only means that request is sent.
const READS_PER_TRANSACTION: u32 = 512;

/// The filter asks SQLite whether another connection wrote once per this many lookups (at
/// 512, the asking was still 0.3% of a run of misses in a profile). Until it asks, it may
/// miss what another process stored, which only means that request is sent.
const LOOKUPS_PER_CHECK: u32 = 4096;

/// New keys are merged into the index once this many wait (and when the cache is closed).
pub const MERGE_ROWS: usize = 1 << 16;

/// A block of the index holds at most this many keys (16 bytes each), so that it fits in
/// one of the database's 16 KiB pages...
const BLOCK_KEYS: usize = 960;

/// ...and a block that outgrows it is written as blocks this full, leaving room for the
/// keys of the next merges.
const BLOCK_FILL: usize = BLOCK_KEYS * 3 / 4;

/// The bytes before a record's model and response: key, usage flag, prompt and completion
/// tokens, model length, response length.
const RECORD_HEADER: usize = 32 + 1 + 8 + 8 + 4 + 4;

/// The bytes after a record's response in the data file: the CRC-32 of the rest of the
/// record. (Version 3's records, in `chunks`, have none.)
const RECORD_TRAILER: usize = 4;

/// [`Batch::with_capacity`] sizes its buffer for at most this many bytes at first.
const BATCH_RESERVE_MAX: usize = 8 << 20;

/// A record bigger than this is not read (its header is damaged).
const RECORD_MAX: usize = 1 << 30;

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("path", &self.path).finish()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cache_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    created_at INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS key_blocks (lo INTEGER PRIMARY KEY, keys BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS unmerged (id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS regions (
    at INTEGER PRIMARY KEY,
    len INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS unmerged_regions (at INTEGER PRIMARY KEY);
";

/// The data file of the cache at `path`.
pub fn data_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push("-data");
    PathBuf::from(p)
}

/// The first 8 bytes of a key, as the index holds them.
fn short(key: &CacheKey) -> i64 {
    i64::from_le_bytes(key[..8].try_into().expect("8 bytes"))
}

/// The pairs of a block of the index: a key's first 8 bytes and its record's place, in the
/// order of the keys.
fn pairs(block: &[u8]) -> impl Iterator<Item = (i64, i64)> + '_ {
    block.chunks_exact(16).map(|p| {
        let (k, at) = p.split_at(8);
        (
            i64::from_le_bytes(k.try_into().expect("8 bytes")),
            i64::from_le_bytes(at.try_into().expect("8 bytes")),
        )
    })
}

/// The place of `k` in a block of the index, if it holds it.
fn block_find(block: &[u8], k: i64) -> Option<i64> {
    let n = block.len() / 16;
    let pair = |i: usize| pairs(&block[16 * i..16 * i + 16]).next().expect("a pair");
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi) / 2;
        let (key, at) = pair(mid);
        match key.cmp(&k) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return Some(at),
        }
    }
    None
}

/// Whether the database has the table `name`.
fn has_table(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE name = ?1",
        [name],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n == 1)
}

/// The keys in the index.
fn indexed(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT coalesce(sum(length(keys)), 0) / 16 FROM key_blocks",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as u64)
}

/// The place the index gives `k`, if any.
fn lookup(conn: &Connection, k: i64) -> rusqlite::Result<Option<i64>> {
    let mut q =
        conn.prepare_cached("SELECT keys FROM key_blocks WHERE lo <= ?1 ORDER BY lo DESC LIMIT 1")?;
    let mut rows = q.query([k])?;
    Ok(match rows.next()? {
        Some(row) => match row.get_ref(0)? {
            ValueRef::Blob(block) => block_find(block, k),
            _ => None,
        },
        None => None,
    })
}

/// The places of `places` in the order of their keys. The keys are the first 8 bytes of
/// BLAKE3 hashes, spread evenly: they are dealt into about one bucket for every two by
/// their top bits, in order, and each bucket is then sorted on its own. (`sort_unstable` of
/// them all took 210 instructions a key at 5,000 keys.) Keys bunched together are sorted
/// as well, only no faster.
fn sort_places(places: &FxHashMap<i64, i64>) -> Vec<(i64, i64)> {
    let n = places.len();
    if n < 64 {
        let mut sorted: Vec<(i64, i64)> = places.iter().map(|(&k, &at)| (k, at)).collect();
        sorted.sort_unstable();
        return sorted;
    }
    let bits = (n / 2).ilog2().min(20);
    // The key as unsigned, in the same order.
    let bucket = |k: i64| (((k as u64) ^ (1 << 63)) >> (64 - bits)) as usize;
    let mut starts = vec![0u32; (1 << bits) + 1];
    for &k in places.keys() {
        starts[bucket(k) + 1] += 1;
    }
    for b in 1..starts.len() {
        starts[b] += starts[b - 1];
    }
    let mut sorted = vec![(0i64, 0i64); n];
    let mut next = starts.clone();
    for (&k, &at) in places {
        let b = bucket(k);
        sorted[next[b] as usize] = (k, at);
        next[b] += 1;
    }
    for w in starts.windows(2) {
        let part = &mut sorted[w[0] as usize..w[1] as usize];
        if part.len() > 1 {
            part.sort_unstable();
        }
    }
    sorted
}

/// A record's place in a version 3 chunk: the chunk and its offset in it (never negative).
fn place(chunk: i64, offset: usize) -> i64 {
    (chunk << 32) | offset as i64
}

/// A record's place in the data file: its offset, as a negative number.
fn file_place(offset: u64) -> i64 {
    -(offset as i64) - 1
}

/// Appends one record to `buf`, with its CRC.
fn encode(buf: &mut Vec<u8>, s: &Store<'_>) {
    let start = buf.len();
    buf.extend_from_slice(&s.key);
    buf.push(s.usage.is_some() as u8);
    let u = s.usage.unwrap_or_default();
    buf.extend_from_slice(&u.prompt_tokens.to_le_bytes());
    buf.extend_from_slice(&u.completion_tokens.to_le_bytes());
    buf.extend_from_slice(&(s.model.len() as u32).to_le_bytes());
    buf.extend_from_slice(&(s.response.get().len() as u32).to_le_bytes());
    buf.extend_from_slice(s.model.as_bytes());
    buf.extend_from_slice(s.response.get().as_bytes());
    let crc = crc32fast::hash(&buf[start..]);
    buf.extend_from_slice(&crc.to_le_bytes());
}

/// A record's header.
struct Header {
    key: CacheKey,
    usage: Option<Usage>,
    model_len: usize,
    response_len: usize,
}

impl Header {
    fn decode(h: &[u8; RECORD_HEADER]) -> Header {
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        let (prompt, completion) = (u64_at(33), u64_at(41));
        Header {
            key: h[..32].try_into().expect("32 bytes"),
            usage: (h[32] == 1).then_some(Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                total_tokens: prompt + completion,
                ..Usage::default()
            }),
            model_len: u32_at(49) as usize,
            response_len: u32_at(53) as usize,
        }
    }

    fn len(&self) -> usize {
        RECORD_HEADER + self.model_len + self.response_len
    }
}

/// The records of a version 3 chunk (`checked` false) or of a region of the data file
/// (`checked`: each with its CRC): each key's short form and the record's offset. Stops at
/// a record that does not fit or does not check.
fn records(data: &[u8], checked: bool) -> Vec<(i64, usize)> {
    let trailer = if checked { RECORD_TRAILER } else { 0 };
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(h) = data.get(at..at + RECORD_HEADER) {
        let h = Header::decode(h.try_into().expect("header"));
        let end = at.saturating_add(h.len()).saturating_add(trailer);
        if end > data.len() || (checked && !crc_holds(&data[at..end])) {
            break;
        }
        out.push((short(&h.key), at));
        at = end;
    }
    out
}

/// Whether a record of the data file (header to trailer) matches its CRC.
fn crc_holds(record: &[u8]) -> bool {
    let (body, crc) = record.split_at(record.len() - RECORD_TRAILER);
    crc32fast::hash(body).to_le_bytes() == crc
}

impl Cache {
    /// Opens the cache at `path` (and its data file), creating it unless `read_only`. A
    /// cache of an earlier version is converted when opened to write; opened read-only, one
    /// of version 3 is read as it is and one of version 1 or 2 refused.
    pub fn open(path: &Path, read_only: bool) -> Result<Cache, CacheError> {
        let sql = |source| CacheError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let incompatible = |reason: String| CacheError::Incompatible {
            path: path.to_path_buf(),
            reason,
        };
        let flags = if read_only {
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
        };
        let mut conn = Connection::open_with_flags(path, flags).map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sql)?;
        // SQLite's default page cache, 2 MiB: more cost more memory than it saved (a miss
        // does not read the index: see `Cache::filter`).
        conn.pragma_update(None, "cache_size", -2000).map_err(sql)?;
        let version = |conn: &Connection| -> Result<Option<String>, CacheError> {
            conn.query_row(
                "SELECT value FROM cache_meta WHERE key = 'version'",
                [],
                |r| r.get(0),
            )
            .optional()
            // Not a cache, unless the disk failed (then the file may be sound).
            .map_err(|e| match crate::journal::sqlite_io(&e) {
                true => sql(e),
                false => incompatible(e.to_string()),
            })
        };
        let data_error = |source| CacheError::Data {
            path: path.to_path_buf(),
            source,
        };
        let mut data = None;
        if !read_only {
            // Opening to write is done by one process at a time, under a lock of the data
            // file (not SQLite's: two runs opening a new cache together had one of them
            // fail at once with "database is locked" while the other made it WAL).
            let data_file = data_path(path);
            let created = !data_file.exists();
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&data_file)
                .map_err(data_error)?;
            file.lock().map_err(data_error)?;
            let set_up = Cache::set_up(&mut conn, &file, path);
            // Unlocked when closed, too.
            let _ = file.unlock();
            if let Err(e) = set_up {
                if created {
                    // Not a cache: leave nothing beside it.
                    let _ = std::fs::remove_file(&data_file);
                }
                return Err(e);
            }
            data = Some(file);
        }
        let found = version(&conn)?;
        if found.as_deref() != Some(&CACHE_VERSION.to_string()) {
            let hint = match found.as_deref() {
                Some("1" | "2" | "3") => "; open it once without --cache-read-only to convert it",
                _ => "",
            };
            return Err(incompatible(format!("its version is {found:?}{hint}")));
        }
        if read_only {
            data = match File::open(data_path(path)) {
                Ok(f) => Some(f),
                // Nothing of it answers (a version 3 cache has none).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(data_error(e)),
            };
        }
        let mut cache = Cache {
            conn,
            path: path.to_path_buf(),
            read_only,
            data,
            reads: std::cell::Cell::new(0),
            unasked: std::cell::Cell::new(0),
            fresh: Fresh::default(),
            filter: None,
            filter_stale: std::cell::Cell::new(false),
            data_version: std::cell::Cell::new(-1),
            probes: std::cell::Cell::new(0),
        };
        // The filter and the count of others' commits it goes with, read together.
        let tx = cache.conn.unchecked_transaction().map_err(sql)?;
        cache.data_version.set(
            tx.query_row("PRAGMA data_version", [], |r| r.get(0))
                .map_err(sql)?,
        );
        cache.filter = KeyFilter::of_index(&tx).map_err(sql)?;
        tx.commit().map_err(sql)?;
        cache.recover()?;
        Ok(cache)
    }

    /// Makes the database open on `conn` a cache of this version, under the lock of its
    /// data file `file`: WAL, the schema, an earlier version converted, and a data file left
    /// by a database since deleted emptied.
    fn set_up(conn: &mut Connection, file: &File, path: &Path) -> Result<(), CacheError> {
        let sql = |source| CacheError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let incompatible = |e: rusqlite::Error| CacheError::Incompatible {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        // Pages of 16 KiB: SQLite writes each with a call of its own, and merging keys
        // dirties fewer of them. Only a new file takes it.
        conn.pragma_update(None, "page_size", 16384).map_err(sql)?;
        // A new cache is made without an `fsync` (SQLite's way makes six: the switch to WAL
        // goes through a rollback journal). They would make nothing durable: the schema is
        // WAL frames, which synchronous=NORMAL syncs only at a checkpoint.
        let new = conn
            .query_row("PRAGMA page_count", [], |r| r.get::<_, i64>(0))
            .map_err(incompatible)?
            == 0;
        if new {
            conn.pragma_update(None, "synchronous", "OFF")
                .map_err(sql)?;
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(incompatible)?;
        if !new {
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(sql)?;
        }
        // The write lock from the start (waiting for it as long as the busy timeout): a
        // transaction that read first could not take it if a run already using the cache
        // wrote in between.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql)?;
        let older = has_table(&tx, "cache_meta").map_err(incompatible)?;
        let was: Option<String> = if older {
            tx.query_row(
                "SELECT value FROM cache_meta WHERE key = 'version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(incompatible)?
        } else {
            None
        };
        tx.execute_batch(SCHEMA).map_err(incompatible)?;
        if !older {
            // It holds nothing this database lists. Truncated only if not empty already:
            // ext4 writes back a file truncated to nothing when it is closed, which put
            // writing out a run's new cache on the run's own time.
            let data_error = |source| CacheError::Data {
                path: path.to_path_buf(),
                source,
            };
            if file.metadata().map_err(data_error)?.len() > 0 {
                file.set_len(0).map_err(data_error)?;
            }
        }
        match was.as_deref() {
            Some("1" | "2" | "3") => {
                tx.execute(
                    "UPDATE cache_meta SET value = ?1 WHERE key = 'version'",
                    params![CACHE_VERSION.to_string()],
                )
                .map_err(sql)?;
            }
            _ => {
                tx.execute(
                    "INSERT OR IGNORE INTO cache_meta (key, value) VALUES ('version', ?1)",
                    params![CACHE_VERSION.to_string()],
                )
                .map_err(sql)?;
            }
        }
        match was.as_deref() {
            Some("1" | "2") => convert(&tx, file, path)?,
            Some("3") => convert_keys(&tx).map_err(sql)?,
            _ => {}
        }
        tx.commit().map_err(sql)?;
        if new {
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(sql)?;
        }
        Ok(())
    }

    /// Holds the places of records stored (or found unmerged) until they are merged, and
    /// puts their keys in the filter.
    fn took(&mut self, at: i64, records: &[(i64, usize)]) {
        self.fresh.took(at, records);
        if let Some(f) = &mut self.filter {
            // Each key sets bits in a block of its own, most often one not in the
            // processor's cache: its block is asked for a few keys ahead, so that the
            // fetches overlap rather than each insert waiting on its own.
            const AHEAD: usize = 8;
            for &(k, _) in records.iter().take(AHEAD) {
                f.prefetch_insert(k);
            }
            for (n, &(k, _)) in records.iter().enumerate() {
                if let Some(&(next, _)) = records.get(n + AHEAD) {
                    f.prefetch_insert(next);
                }
                f.insert(k);
            }
        }
    }

    /// Takes up the records of regions (and version 3 chunks) whose keys were never merged
    /// (a run that stopped before it closed its cache): merged now, or held in memory when
    /// read-only.
    fn recover(&mut self) -> Result<(), CacheError> {
        let path = self.path.clone();
        let sql = |source| CacheError::Sqlite {
            path: path.clone(),
            source,
        };
        let two_ints = |conn: &Connection, q: &str| -> rusqlite::Result<Vec<(i64, i64)>> {
            let mut q = conn.prepare(q)?;
            let rows = q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        };
        let ids = two_ints(&self.conn, "SELECT id, 0 FROM unmerged ORDER BY id").map_err(sql)?;
        for (id, _) in ids {
            let data: Option<Vec<u8>> = self
                .conn
                .query_row("SELECT data FROM chunks WHERE id = ?1", [id], |r| r.get(0))
                .optional()
                .map_err(sql)?;
            for (k, offset) in records(data.as_deref().unwrap_or_default(), false) {
                self.fresh.places.insert(k, place(id, offset));
                if let Some(f) = &mut self.filter {
                    f.insert(k);
                }
            }
            self.fresh.chunks.push(id);
        }
        let regions = two_ints(
            &self.conn,
            "SELECT at, len FROM regions JOIN unmerged_regions USING (at) ORDER BY at",
        )
        .map_err(sql)?;
        for (at, len) in regions {
            // A region that cannot be read has nothing to merge (its records miss).
            if let (Some(f), Ok(len)) = (&self.data, usize::try_from(len)) {
                let mut bytes = vec![0; len];
                if f.read_exact_at(&mut bytes, at as u64).is_ok() {
                    self.took(at, &records(&bytes, true));
                }
            }
            self.fresh.regions.push(at);
        }
        if !self.read_only {
            self.merge().map_err(sql)?;
        }
        Ok(())
    }

    /// Sizes the filter of keys for `more` responses to come (a run's requests, at most
    /// 2^25), so that it does not grow in parts as they are stored, and the map of keys
    /// not yet merged for as many (at most [`MERGE_ROWS`]), so that it is not rebuilt as
    /// it grows (in a profile, rebuilding it and zeroing the fresh memory it took were a
    /// quarter of storing the keys).
    pub fn reserve(&mut self, more: usize) {
        if let Some(f) = &mut self.filter {
            f.reserve(more.min(FILTER_MAX_KEYS));
        }
        if !self.read_only {
            let room = more.min(MERGE_ROWS).saturating_sub(self.fresh.places.len());
            self.fresh.places.reserve(room);
        }
    }

    /// Whether the cache only answers and stores nothing.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Starts bringing into the processor's cache what [`Cache::get`] of `key` reads first
    /// (the filter's blocks), so that a `get` made a little later does not wait on memory.
    pub fn prefetch(&self, key: &CacheKey) {
        if let Some(f) = &self.filter {
            f.prefetch(short(key));
        }
    }

    /// The stored response for `key`, if any.
    pub fn get(&self, key: &CacheKey) -> Result<Option<Hit>, CacheError> {
        let sql = |source| CacheError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let k = short(key);
        // The filter first: it holds the keys waiting to be merged too, and it is much
        // smaller than their map, so a miss reads one line of memory and asks SQLite
        // nothing (a read transaction for them had cost more than the filter). Whether
        // another connection wrote is asked every so many of these misses instead.
        if let Some(f) = &self.filter {
            let unasked = self.unasked.get() + 1;
            self.unasked.set(unasked);
            if unasked >= LOOKUPS_PER_CHECK {
                self.unasked.set(0);
                self.end_reads().map_err(sql)?;
                self.check_others().map_err(sql)?;
            }
            if !self.filter_stale.get() && !f.may_hold(k) {
                return Ok(None);
            }
        }
        match self.reads.get() {
            0 => self.begin_reads().map_err(sql)?,
            READS_PER_TRANSACTION.. => {
                self.end_reads().map_err(sql)?;
                self.begin_reads().map_err(sql)?;
            }
            _ => {}
        }
        self.reads.set(self.reads.get() + 1);
        let at = match self.fresh.places.get(&k) {
            Some(&at) => Some(at),
            None => {
                self.probes.set(self.probes.get() + 1);
                lookup(&self.conn, k).map_err(sql)?
            }
        };
        match at {
            None => Ok(None),
            Some(at) if at < 0 => Ok(self.read_file(key, (-(at + 1)) as u64)),
            Some(at) => self.read(key, at).map_err(sql),
        }
    }

    /// The record at `offset` of the data file, if it holds `key` and checks (another key
    /// with the same first 8 bytes is a miss, as is a record that does not read or check).
    fn read_file(&self, key: &CacheKey, offset: u64) -> Option<Hit> {
        let f = self.data.as_ref()?;
        let mut h = [0u8; RECORD_HEADER];
        f.read_exact_at(&mut h, offset).ok()?;
        let header = Header::decode(&h);
        if header.key != *key || header.len() > RECORD_MAX {
            return None;
        }
        let mut record = vec![0u8; header.len() + RECORD_TRAILER];
        record[..RECORD_HEADER].copy_from_slice(&h);
        f.read_exact_at(&mut record[RECORD_HEADER..], offset + RECORD_HEADER as u64)
            .ok()?;
        if !crc_holds(&record) {
            return None;
        }
        record.truncate(header.len());
        record.drain(..RECORD_HEADER + header.model_len);
        Some(Hit {
            response: Stored::Text(record).json()?,
            usage: header.usage,
        })
    }

    /// The record at `at` of a version 3 chunk, if it holds `key` (another key with the
    /// same first 8 bytes is a miss, as is a record that does not read).
    fn read(&self, key: &CacheKey, at: i64) -> rusqlite::Result<Option<Hit>> {
        let (chunk, offset) = (at >> 32, (at & 0xffff_ffff) as usize);
        let blob = match self
            .conn
            .blob_open(rusqlite::MAIN_DB, "chunks", "data", chunk, true)
        {
            Ok(blob) => blob,
            Err(rusqlite::Error::SqliteFailure(_, _)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut h = [0u8; RECORD_HEADER];
        if blob.read_at_exact(&mut h, offset).is_err() {
            return Ok(None);
        }
        let h = Header::decode(&h);
        if h.key != *key || offset + h.len() > blob.len() {
            return Ok(None);
        }
        let mut text = vec![0u8; h.response_len];
        blob.read_at_exact(&mut text, offset + RECORD_HEADER + h.model_len)?;
        let Some(response) = Stored::Text(text).json() else {
            return Ok(None);
        };
        Ok(Some(Hit {
            response,
            usage: h.usage,
        }))
    }

    /// Stores responses in one transaction (nothing when read-only).
    pub fn put(&mut self, items: &[Store<'_>]) -> Result<(), CacheError> {
        let mut batch = Batch::default();
        for s in items {
            batch.push(s);
        }
        self.put_batch(&mut batch)
    }

    /// Stores a batch in one transaction (nothing when read-only), and empties it.
    pub fn put_batch(&mut self, batch: &mut Batch) -> Result<(), CacheError> {
        if self.read_only || batch.is_empty() {
            batch.clear();
            return Ok(());
        }
        let path = self.path.clone();
        let sql = |source| CacheError::Sqlite {
            path: path.clone(),
            source,
        };
        self.end_reads().map_err(sql)?;
        // The write lock first: the data file's end is read, and written at, under it.
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(sql)?;
        let data = self
            .data
            .as_ref()
            .expect("a cache opened to write has its data file");
        let appended = append_region(&self.conn, data, &path, batch, now()).and_then(|at| {
            self.conn.execute_batch("COMMIT").map_err(sql)?;
            Ok(at)
        });
        match appended {
            Ok(at) => {
                self.took(at, &batch.records);
                self.fresh.regions.push(at);
                batch.clear();
            }
            Err(e) => {
                // Nothing of it was committed, so nothing of it is held (what was written
                // lies past the file's end).
                let _ = self.conn.execute_batch("ROLLBACK");
                batch.clear();
                return Err(e);
            }
        }
        if self.fresh.places.len() >= MERGE_ROWS {
            self.merge().map_err(sql)?;
        }
        Ok(())
    }

    /// Merges the waiting keys into the index, in one transaction.
    fn merge(&mut self) -> rusqlite::Result<()> {
        self.end_reads()?;
        if self.fresh.is_empty() {
            return Ok(());
        }
        // Immediate: merging reads the blocks before writing them (see `Cache::open`).
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        self.fresh.merge_in(&tx)?;
        tx.commit()?;
        Ok(())
    }

    /// Begins a read transaction for lookups; stops using the filter if another
    /// connection wrote since it was built.
    fn begin_reads(&self) -> rusqlite::Result<()> {
        self.conn.prepare_cached("BEGIN")?.execute([])?;
        self.check_others()
    }

    /// Stops using the filter if another connection wrote since it was built.
    fn check_others(&self) -> rusqlite::Result<()> {
        let version: i64 = self
            .conn
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |r| r.get(0))?;
        if version != self.data_version.get() {
            self.filter_stale.set(true);
        }
        Ok(())
    }

    /// Ends the read transaction of the lookups, if one is open.
    fn end_reads(&self) -> rusqlite::Result<()> {
        if self.reads.get() > 0 {
            self.reads.set(0);
            self.conn.prepare_cached("COMMIT")?.execute([])?;
        }
        Ok(())
    }

    /// Writes the keys still held in memory to the file (also done when the cache is
    /// dropped, where a failure can only be logged).
    pub fn close(mut self) -> Result<(), CacheError> {
        let result = if self.read_only { Ok(()) } else { self.merge() };
        self.fresh = Fresh::default();
        result.map_err(|source| CacheError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    /// Responses stored.
    pub fn len(&self) -> Result<u64, CacheError> {
        let sql = |source| CacheError::Sqlite {
            path: self.path.clone(),
            source,
        };
        let merged = indexed(&self.conn).map_err(sql)?;
        let mut fresh = 0;
        for &k in self.fresh.places.keys() {
            if lookup(&self.conn, k).map_err(sql)?.is_none() {
                fresh += 1;
            }
        }
        Ok(merged + fresh)
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> Result<bool, CacheError> {
        Ok(self.len()? == 0)
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        if !self.read_only && !self.fresh.is_empty() {
            if let Err(e) = self.merge() {
                tracing::warn!(
                    "cache {}: writing its new keys failed ({e}); the next run that opens it reads them from its data file",
                    self.path.display()
                );
            }
        }
    }
}

impl Fresh {
    /// Whether no record waits to be merged.
    fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.regions.is_empty()
    }

    /// Holds the places of `records` (offsets in the region at `at` of the data file).
    fn took(&mut self, at: i64, records: &[(i64, usize)]) {
        self.places.extend(
            records
                .iter()
                .map(|&(k, offset)| (k, file_place(at as u64 + offset as u64))),
        );
    }

    /// Writes the held keys to the index in `tx` and forgets them: each block that takes
    /// some is read, merged with them in order (a key already there takes its new place)
    /// and written again, as two or more blocks once it holds more than [`BLOCK_KEYS`].
    fn merge_in(&mut self, tx: &Connection) -> rusqlite::Result<()> {
        let sorted = sort_places(&self.places);
        {
            let mut los: Vec<i64> = {
                let mut q = tx.prepare_cached("SELECT lo FROM key_blocks ORDER BY lo")?;
                let los = q.query_map([], |r| r.get(0))?;
                los.collect::<rusqlite::Result<_>>()?
            };
            if los.is_empty() {
                // The first block covers every key below the second's first.
                los.push(i64::MIN);
            }
            let mut read = tx.prepare_cached("SELECT keys FROM key_blocks WHERE lo = ?1")?;
            let mut write =
                tx.prepare_cached("INSERT OR REPLACE INTO key_blocks (lo, keys) VALUES (?1, ?2)")?;
            let (mut merged, mut block) = (Vec::new(), Vec::new());
            let mut rest = &sorted[..];
            for (i, &lo) in los.iter().enumerate() {
                let n = match los.get(i + 1) {
                    Some(&next) => rest.partition_point(|&(k, _)| k < next),
                    None => rest.len(),
                };
                let (new, after) = rest.split_at(n);
                rest = after;
                if new.is_empty() {
                    continue;
                }
                let old: Vec<u8> = read
                    .query_row([lo], |r| r.get(0))
                    .optional()?
                    .unwrap_or_default();
                merged.clear();
                merged.reserve(old.len() / 16 + new.len());
                let mut old = pairs(&old).peekable();
                let mut new = new.iter().copied().peekable();
                loop {
                    let next = match (old.peek(), new.peek()) {
                        (Some(o), Some(n)) if o.0 < n.0 => old.next(),
                        (Some(o), Some(n)) if o.0 == n.0 => {
                            old.next();
                            new.next()
                        }
                        (_, Some(_)) => new.next(),
                        (Some(_), None) => old.next(),
                        (None, None) => break,
                    };
                    merged.extend(next);
                }
                let per = if merged.len() <= BLOCK_KEYS {
                    merged.len()
                } else {
                    merged.len().div_ceil(merged.len().div_ceil(BLOCK_FILL))
                };
                for (j, part) in merged.chunks(per).enumerate() {
                    block.clear();
                    for (k, at) in part {
                        block.extend_from_slice(&k.to_le_bytes());
                        block.extend_from_slice(&at.to_le_bytes());
                    }
                    let part_lo = if j == 0 { lo } else { part[0].0 };
                    write.execute(params![part_lo, block])?;
                }
            }
            let mut done = tx.prepare_cached("DELETE FROM unmerged WHERE id = ?1")?;
            for id in &self.chunks {
                done.execute([id])?;
            }
            let mut done = tx.prepare_cached("DELETE FROM unmerged_regions WHERE at = ?1")?;
            for at in &self.regions {
                done.execute([at])?;
            }
        }
        self.places.clear();
        self.chunks.clear();
        self.regions.clear();
        Ok(())
    }
}

/// Converts the rows of a version 1 or 2 cache (`responses`) to records, in `tx` (which
/// holds the write lock).
fn convert(tx: &Connection, data: &File, path: &Path) -> Result<(), CacheError> {
    let sql = |source| CacheError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let now = now();
    let mut fresh = Fresh::default();
    let mut batch = Batch::default();
    let append = |fresh: &mut Fresh, batch: &mut Batch| -> Result<(), CacheError> {
        if !batch.is_empty() {
            let at = append_region(tx, data, path, batch, now)?;
            fresh.took(at, &batch.records);
            fresh.regions.push(at);
            batch.clear();
        }
        Ok(())
    };
    let mut q = tx
        .prepare(
            "SELECT key, model, response, prompt_tokens, completion_tokens FROM responses ORDER BY rowid",
        )
        .map_err(sql)?;
    let mut it = q.query([]).map_err(sql)?;
    while let Some(r) = it.next().map_err(sql)? {
        // A row that does not read as a response is dropped.
        let take = |batch: &mut Batch| -> rusqlite::Result<()> {
            let Ok(key) = <CacheKey>::try_from(r.get_ref(0)?.as_blob()?) else {
                return Ok(());
            };
            let body = match r.get_ref(2)? {
                ValueRef::Text(t) => Stored::Text(t.to_vec()),
                ValueRef::Blob(b) => Stored::Lz4(b.to_vec()),
                _ => return Ok(()),
            };
            let Some(response) = body.json() else {
                return Ok(());
            };
            let model: String = r.get(1)?;
            batch.push(&Store {
                key,
                model: &model,
                response: &response,
                usage: usage(r.get(3)?, r.get(4)?),
            });
            Ok(())
        };
        take(&mut batch).map_err(sql)?;
        if batch.len() == 1024 {
            append(&mut fresh, &mut batch)?;
        }
        if fresh.places.len() >= MERGE_ROWS {
            fresh.merge_in(tx).map_err(sql)?;
        }
    }
    drop(it);
    drop(q);
    append(&mut fresh, &mut batch)?;
    fresh.merge_in(tx).map_err(sql)?;
    tx.execute_batch("DROP TABLE responses").map_err(sql)
}

/// Converts the index of a version 3 cache (`keys`, a row per key) to blocks, in `tx`.
fn convert_keys(tx: &Connection) -> rusqlite::Result<()> {
    let mut fresh = Fresh::default();
    {
        let mut q = tx.prepare("SELECT k, at FROM keys")?;
        let rows = q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        for row in rows {
            let (k, at) = row?;
            fresh.places.insert(k, at);
        }
    }
    fresh.merge_in(tx)?;
    tx.execute_batch("DROP TABLE keys")
}

/// Appends `batch` to the data file at its end, as a region listed (and listed as not yet
/// merged) in the transaction open on `conn`, which holds the write lock; returns where it
/// begins.
fn append_region(
    conn: &Connection,
    data: &File,
    path: &Path,
    batch: &Batch,
    now: i64,
) -> Result<i64, CacheError> {
    let sql = |source| CacheError::Sqlite {
        path: path.to_path_buf(),
        source,
    };
    let at: i64 = conn
        .prepare_cached("SELECT at + len FROM regions ORDER BY at DESC LIMIT 1")
        .and_then(|mut q| q.query_row([], |r| r.get(0)).optional())
        .map_err(sql)?
        .unwrap_or(0);
    data.write_all_at(&batch.buf, at as u64)
        .map_err(|source| CacheError::Data {
            path: path.to_path_buf(),
            source,
        })?;
    conn.prepare_cached("INSERT INTO regions (at, len, created_at) VALUES (?1, ?2, ?3)")
        .and_then(|mut q| q.execute(params![at, batch.buf.len() as i64, now]))
        .and_then(|_| {
            conn.prepare_cached("INSERT INTO unmerged_regions (at) VALUES (?1)")?
                .execute([at])
        })
        .map_err(sql)?;
    Ok(at)
}

/// Seconds since the epoch.
fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Usage as version 1 and 2 rows held it.
fn usage(prompt: Option<i64>, completion: Option<i64>) -> Option<Usage> {
    match (prompt, completion) {
        (None, None) => None,
        (p, c) => {
            let (p, c) = (p.unwrap_or(0) as u64, c.unwrap_or(0) as u64);
            Some(Usage {
                prompt_tokens: p,
                completion_tokens: c,
                total_tokens: p + c,
                ..Usage::default()
            })
        }
    }
}

impl Stored {
    /// The response, if it reads as JSON.
    fn json(self) -> Option<RawJson> {
        let body = match self {
            Stored::Text(text) => text,
            Stored::Lz4(block) => lz4_flex::block::decompress_size_prepended(&block).ok()?,
        };
        RawJson::parse(&String::from_utf8(body).ok()?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::LineParser;

    fn req(line: &str) -> Request {
        LineParser::new(Some("gpt-4.1-mini".into()))
            .parse(1, line)
            .unwrap()
    }

    fn k(line: &str) -> CacheKey {
        key("openai", &req(line))
    }

    /// The canonical form read from the text is byte for byte the one built from the tree,
    /// on generated bodies with every kind of number, escapes, nesting and non-semantic
    /// fields; and it is read from the text for nearly all of them.
    #[test]
    fn canonical_text_is_the_trees_canonical_form() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};
        fn value(rng: &mut SmallRng, depth: u32, out: &mut String) {
            let numbers = [
                "0",
                "-0",
                "7",
                "-7",
                "1.0",
                "1.5",
                "-2.50",
                "1e2",
                "1E-2",
                "123456789012345678",
                "18446744073709551615",
                "18446744073709551616",
                "-9223372036854775808",
                "9007199254740993",
                "1e300",
                "0.1",
                "8999999999999999",
                "9000000000000001",
            ];
            let strings = [
                "\"a\"",
                "\"\"",
                "\"é日本\"",
                "\"tab\\there\"",
                "\"q\\\"uote\"",
                "\"\\u00e9\"",
                "\"\\u0001\"",
                "\"\\/\"",
                "\"x y\"",
            ];
            match rng.random_range(0..if depth == 0 { 3 } else { 5 }) {
                0 => out.push_str(numbers[rng.random_range(0..numbers.len())]),
                1 => out.push_str(strings[rng.random_range(0..strings.len())]),
                2 => out.push_str(["true", "false", "null"][rng.random_range(0..3)]),
                3 => {
                    out.push('[');
                    for i in 0..rng.random_range(0..4) {
                        if i > 0 {
                            out.push_str(if rng.random_bool(0.5) { "," } else { " , " });
                        }
                        value(rng, depth - 1, out);
                    }
                    out.push(']');
                }
                _ => object(rng, depth - 1, out),
            }
        }
        fn object(rng: &mut SmallRng, depth: u32, out: &mut String) {
            let names = [
                "messages",
                "model",
                "temperature",
                "user",
                "metadata",
                "stream",
                "b",
                "a",
                "é",
                "role",
                "content",
                "r\\u006fle",
                // Names alike in their first 8 bytes, or more.
                "response_format",
                "response_schema",
                "response",
                "max_completion_tokens",
                "max_completion",
                "stream_options",
            ];
            // Whitespace, most often none, wherever JSON allows it in an object.
            let ws =
                |rng: &mut SmallRng| ["", "", "", " ", "\n\t ", "\r\n"][rng.random_range(0..6)];
            out.push('{');
            out.push_str(ws(rng));
            for i in 0..rng.random_range(0..6) {
                if i > 0 {
                    out.push(',');
                    out.push_str(ws(rng));
                }
                let name = names[rng.random_range(0..names.len())];
                out.push_str(&format!("\"{name}\"{}:{}", ws(rng), ws(rng)));
                value(rng, depth, out);
                out.push_str(ws(rng));
            }
            out.push('}');
        }
        /// Whether the text's road was taken (and then gave the tree's bytes).
        fn agrees(body: &str) -> bool {
            let Value::Object(mut tree) = serde_json::from_str::<Value>(body).unwrap() else {
                unreachable!()
            };
            for field in NON_SEMANTIC_FIELDS {
                tree.remove(*field);
            }
            let mut want = Vec::new();
            canonical(&Value::Object(tree), &mut want);
            let mut got = Vec::new();
            let taken = canonical_text(body.as_bytes(), &mut got).is_some();
            if taken {
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    String::from_utf8_lossy(&want),
                    "{body}"
                );
            }
            taken
        }
        let mut rng = SmallRng::seed_from_u64(11);
        let (mut fast, mut slow) = (0, 0);
        for _ in 0..20_000 {
            let mut body = String::new();
            object(&mut rng, 3, &mut body);
            if agrees(&body) {
                fast += 1;
            } else {
                slow += 1;
            }
        }
        // Repeated and escaped names take the tree's road.
        assert!(
            fast > 10_000 && slow > 1_000,
            "{fast} read from the text, {slow} not"
        );
        // Objects with many members, in any order.
        for _ in 0..500 {
            use rand::seq::SliceRandom;
            let mut names: Vec<usize> = (0..rng.random_range(2..60)).collect();
            names.shuffle(&mut rng);
            let mut body = String::from("{");
            for (i, n) in names.iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(&format!("\"k{n}\":"));
                value(&mut rng, 0, &mut body);
            }
            body.push('}');
            assert!(agrees(&body), "{body}");
        }
        // Names alike in their first 8 bytes are told apart (and read from the text).
        for body in [
            r#"{"response_schema":1,"response_format":2,"response":3,"responses":[]}"#,
            r#"{"max_completion_tokens":4,"max_completion":{"b":1,"max_completion_tokenz":0}}"#,
        ] {
            assert!(agrees(body), "{body}");
        }
    }

    /// A body nested deeper than a tree is built (the input's parser refuses those) is not
    /// read from the text either, however deep: the reading stops, never the stack. One
    /// nested as deep as the tree goes is read.
    #[test]
    fn a_body_nested_too_deep_is_not_read() {
        let deep = |n: usize| {
            format!(
                r#"{{"model":"m","messages":[],"x":{}1{}}}"#,
                "[".repeat(n),
                "]".repeat(n)
            )
        };
        let mut out = Vec::new();
        assert!(canonical_text(deep(1_000_000).as_bytes(), &mut out).is_none());
        // The object and `x`'s arrays are all within the depth read.
        assert!(canonical_text(deep(CANON_DEPTH as usize - 1).as_bytes(), &mut out).is_some());
        assert!(canonical_text(deep(CANON_DEPTH as usize).as_bytes(), &mut out).is_none());
        assert!(serde_json::from_str::<Value>(&deep(CANON_DEPTH as usize - 1)).is_ok());
        assert!(serde_json::from_str::<Value>(&deep(CANON_DEPTH as usize)).is_err());
    }

    /// Places come out in the order of their keys, whether the keys are spread evenly (as
    /// hashes are), bunched together, or at the ends of the range.
    #[test]
    fn places_are_sorted_by_key() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};
        let mut rng = SmallRng::seed_from_u64(5);
        for n in [0, 1, 2, 63, 64, 65, 1000, 5000, 100_000] {
            for spread in [64, 24] {
                let mut places = FxHashMap::default();
                places.insert(i64::MIN, 1);
                places.insert(i64::MAX, 2);
                places.insert(-1, 3);
                places.insert(0, 4);
                while places.len() < n + 4 {
                    let k = rng.random::<i64>() >> (64 - spread);
                    places.insert(k, rng.random());
                }
                let mut want: Vec<(i64, i64)> = places.iter().map(|(&k, &v)| (k, v)).collect();
                want.sort_unstable();
                assert!(sort_places(&places) == want, "{n} keys of {spread} bits");
            }
        }
    }

    #[test]
    fn the_fields_left_out_are_the_listed_ones() {
        for f in NON_SEMANTIC_FIELDS {
            assert!(non_semantic(f.as_bytes()), "{f}");
        }
        for f in [
            "model",
            "messages",
            "users",
            "stor",
            "stream_option",
            "",
            "metadata2",
        ] {
            assert!(!non_semantic(f.as_bytes()), "{f}");
        }
    }

    #[test]
    fn endpoints_are_named_as_their_debug_form() {
        use crate::request::Endpoint::*;
        for e in [ChatCompletions, Embeddings, Messages, GenerateContent] {
            assert_eq!(endpoint_name(e), format!("{e:?}"));
        }
    }

    /// Keys do not change between versions, so a cache keeps answering after an upgrade:
    /// these are the keys sluice computed (from the JSON tree, piece by piece) before keys
    /// were read from the text in one buffer.
    /// Two requests and the keys earlier versions computed for them (to `openai|http://x`).
    const KNOWN_KEYS: [(&str, &str); 2] = [
        (
            r#"{"custom_id":"a","model":"gpt-4.1-mini","messages":[{"role":"user","content":"Question 1: hi \u00e9"}],"max_tokens":64,"temperature":0.5,"user":"u"}"#,
            "5ddbf8426e268b59fc8068a9c41695d9b9107ca223262aecfba6738195ead4fc",
        ),
        (
            r#"{"model":"gpt-4.1-mini","messages":[{"role":"user","content":"x"}],"n":1.0,"z":{"b":[1e2,-0,"\/"],"a":null}}"#,
            "c396924923a17741bd3d978a2ac2f8216e6bdbb20c2279a33d7b93565620cfcc",
        ),
    ];

    /// A chat line with random members, values and spacing (a plain body with a
    /// `custom_id`, or an OpenAI Batch line), for [`the_parsers_key_forms_are_the_bodies`].
    fn chat_line(rng: &mut rand::rngs::SmallRng, n: usize) -> String {
        use rand::Rng;
        let ws = |rng: &mut rand::rngs::SmallRng| ["", "", "", " ", "\n "][rng.random_range(0..5)];
        let pick = |rng: &mut rand::rngs::SmallRng, from: &[&'static str]| {
            from[rng.random_range(0..from.len())]
        };
        let contents = [
            "\"Question: summarise the plot.\"",
            "\"\"",
            "\"two\\nlines and a \\\"quote\\\" and a \\\\ and a\\ttab\"",
            "\"\\u00e9t\\u00e9\"",
            "\"a \\/ slash\"",
            "\"é日本\"",
            "[{\"type\":\"text\",\"text\":\"hi\"}]",
            "[ {\"text\": \"hi\", \"type\": \"text\"} ]",
            "[{\"type\":\"image_url\",\"image_url\":{\"url\":\"x\",\"detail\":\"low\"}}]",
            "null",
            "7",
        ];
        let message = |rng: &mut rand::rngs::SmallRng| {
            let mut members = vec![format!(
                "\"role\":{}",
                pick(rng, &["\"user\"", "\"system\"", "\"assistant\""])
            )];
            members.push(format!("\"content\":{}{}", ws(rng), pick(rng, &contents)));
            if rng.random_bool(0.2) {
                members.push(format!("\"name\":{}", pick(rng, &["\"bob\"", "\"x y\""])));
            }
            if rng.random_bool(0.1) {
                members.push("\"weight\":0.5".into());
            }
            if rng.random_bool(0.02) {
                // Given twice: the key reads the body.
                members.push("\"name\":\"again\"".into());
                members.push("\"name\":\"again\"".into());
            }
            // Mostly role first, as people write it; the form is in order of the names.
            if rng.random_bool(0.3) {
                members.reverse();
            }
            let sep = format!(",{}", ws(rng));
            format!("{{{}{}}}", ws(rng), members.join(&sep))
        };
        let mut body: Vec<String> = Vec::new();
        let count = rng.random_range(1..4);
        let messages: Vec<String> = (0..count).map(|_| message(rng)).collect();
        body.push(format!("\"messages\":{}[{}]", ws(rng), messages.join(",")));
        if rng.random_bool(0.8) {
            body.push(format!(
                "\"model\":{}",
                pick(rng, &["\"gpt-4.1-mini\"", "\"gpt-4o\""])
            ));
        }
        let others = [
            "\"max_tokens\":64",
            "\"max_completion_tokens\":128",
            "\"temperature\":0",
            "\"temperature\":0.7",
            "\"temperature\":1.0",
            "\"top_p\":1e-1",
            "\"seed\":-5",
            "\"seed\":-0",
            "\"n\":12345678901234567",
            "\"stop\":[\"\\n\", \"END\"]",
            "\"stop\":[]",
            "\"logit_bias\":{}",
            "\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"a\",\"strict\":true}}",
            "\"response_format\": { \"type\" : \"text\" }",
            "\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":{\"type\":\"object\",\"properties\":{\"x\":{\"type\":\"number\",\"minimum\":1.5}}}}}]",
            "\"user\":\"u1\"",
            "\"stream\":false",
            "\"store\":true",
            "\"service_tier\":\"flex\"",
            "\"a_very_long_member_name_indeed\":1",
            "\"a_very_long_member_name\":2",
        ];
        for _ in 0..rng.random_range(0..5) {
            let member = pick(rng, &others);
            let name = &member[..member.find(':').unwrap()];
            if !body.iter().any(|m| m.starts_with(name)) {
                body.push(member.to_string());
            }
        }
        // In any order.
        for i in (1..body.len()).rev() {
            body.swap(i, rng.random_range(0..=i));
        }
        let sep = format!(",{}", ws(rng));
        let body = format!("{{{}{}{}}}", ws(rng), body.join(&sep), ws(rng));
        if rng.random_bool(0.3) {
            format!(
                "{{\"custom_id\":\"r{n}\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{body}}}"
            )
        } else {
            let rest = body.strip_prefix('{').unwrap();
            let sep = if rest.trim_start() == "}" { "" } else { "," };
            format!("{{\"custom_id\":\"r{n}\"{sep}{rest}")
        }
    }

    /// With [`LineParser::key_forms`] on, the parser writes each request's key form as it
    /// reads the line: the key is the one the body gives without it, the body sent is the
    /// same JSON, and the form is written for most lines (so the key does not read the
    /// body again).
    #[test]
    fn the_parsers_key_forms_are_the_bodies() {
        use rand::SeedableRng;
        let mut with = LineParser::new(Some("gpt-4.1-mini".into()));
        with.count_tokens = false;
        with.key_forms = true;
        let mut without = with.clone();
        without.key_forms = false;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let (mut in_body, mut apart, mut none) = (0, 0, 0);
        for n in 0..20_000 {
            let line = chat_line(&mut rng, n);
            let (Ok(a), Ok(b)) = (with.parse(1, &line), without.parse(1, &line)) else {
                panic!("{line}");
            };
            assert!(b.key_form.is_none());
            // The key is the body's (and `key` holds the form to the body in this build).
            assert_eq!(key("openai", &a), key("openai", &b), "{line}");
            let json = |r: &Request| serde_json::from_slice::<Value>(&r.body).unwrap();
            assert_eq!(json(&a), json(&b), "{line}");
            match &a.key_form {
                Some(KeyForm::Body(_)) => in_body += 1,
                Some(KeyForm::Apart(_)) => {
                    // Written as the line has it.
                    assert_eq!(a.body, b.body, "{line}");
                    apart += 1;
                }
                None => {
                    assert_eq!(a.body, b.body, "{line}");
                    none += 1;
                }
            }
        }
        // Most lines are written in the form; those with a number written otherwise keep
        // their own bytes; a name given twice is left to the key.
        assert!(in_body > 8_000, "{in_body} {apart} {none}");
        assert!(apart > 2_000, "{in_body} {apart} {none}");
        assert!(none > 0 && none < 1_500, "{in_body} {apart} {none}");
    }

    /// The body a run with a cache sends for a plain chat line: its members in order of
    /// their names, the non-semantic ones last, the values as the line has them.
    #[test]
    fn a_body_in_its_key_form_keeps_its_values() {
        let mut p = LineParser::new(Some("gpt-4.1-mini".into()));
        p.count_tokens = false;
        p.key_forms = true;
        let line = r#"{"custom_id":"a","stream":false,"model":"gpt-4o","messages":[{"role":"user", "content":"hi\nthere"}],"max_tokens":64,"user":"u"}"#;
        let r = p.parse(1, line).unwrap();
        let body = r#"{"max_tokens":64,"messages":[{"content":"hi\nthere","role":"user"}],"model":"gpt-4o","stream":false,"user":"u"}"#;
        assert_eq!(std::str::from_utf8(&r.body).unwrap(), body);
        let form = r#"{"max_tokens":64,"messages":[{"content":"hi\nthere","role":"user"}],"model":"gpt-4o"}"#;
        assert_eq!(r.key_form, Some(KeyForm::Body(form.len() as u32 - 1)));
        // A number the form writes otherwise: the body is the line's, the form apart.
        let line =
            r#"{"custom_id":"a","temperature":0.7,"messages":[{"role":"user","content":"hi"}]}"#;
        let r = p.parse(1, line).unwrap();
        assert_eq!(
            std::str::from_utf8(&r.body).unwrap(),
            r#"{"model":"gpt-4.1-mini","temperature":0.7,"messages":[{"role":"user","content":"hi"}]}"#
        );
        let form = r#"{"messages":[{"content":"hi","role":"user"}],"model":"gpt-4.1-mini","temperature":7e-1}"#;
        assert_eq!(r.key_form, Some(KeyForm::Apart(form.as_bytes().to_vec())));
    }

    #[test]
    fn keys_are_what_earlier_versions_computed() {
        let cases = KNOWN_KEYS;
        for (line, want) in cases {
            let mut p = LineParser::new(Some("gpt-4.1-mini".into()));
            p.count_tokens = false;
            let r = p.parse(1, line).unwrap();
            let got: String = key("openai|http://x", &r)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(got, want, "{line}");
        }
    }

    /// Keys taken a batch at a time (hashed side by side) are each request's own key, for
    /// batches of every size up to past the widest vectors, bodies up to past the one
    /// chunk hashed side by side, and bodies keyed through the tree; and the two requests
    /// whose keys earlier versions computed still get those keys inside a batch.
    #[test]
    fn a_batch_of_keys_is_each_requests_own_key() {
        let bodies: Vec<Request> = (0..40)
            .map(|i| {
                let content = "x".repeat(i * i);
                let line = if i % 7 == 3 {
                    // A member name with an escape: keyed through the tree.
                    format!(r#"{{"model":"gpt-4.1","messages":[{{"role":"user","c\u006fntent":"{content}"}}]}}"#)
                } else {
                    // Now and then another model: the part of the key before the body
                    // changes within the batch.
                    let model = if i % 5 == 1 { "gpt-4.1-mini" } else { "gpt-4.1" };
                    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"{content}"}}],"n":{i}}}"#)
                };
                req(&line)
            })
            .collect();
        assert!(bodies.iter().any(|r| r.body.len() > 1100));
        for n in 1..=bodies.len() {
            let batch = &bodies[bodies.len() - n..];
            let together = keys("openai|http://a", batch);
            assert_eq!(together.len(), n);
            for (r, k) in batch.iter().zip(&together) {
                let alone = *blake3::hash(&{
                    let mut input = Vec::new();
                    key_input("openai|http://a", r, &mut Canon::default(), &mut input);
                    input
                })
                .as_bytes();
                assert_eq!(
                    *k,
                    alone,
                    "a body of {} bytes in a batch of {n}",
                    r.body.len()
                );
            }
        }
        let mut p = LineParser::new(Some("gpt-4.1-mini".into()));
        p.count_tokens = false;
        let known: Vec<Request> = [KNOWN_KEYS[0].0, KNOWN_KEYS[1].0]
            .iter()
            .cycle()
            .take(17)
            .map(|line| p.parse(1, line).unwrap())
            .collect();
        for (n, k) in keys("openai|http://x", &known).iter().enumerate() {
            let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(hex, KNOWN_KEYS[n % 2].1);
        }
    }

    #[test]
    fn field_order_whitespace_and_number_spelling_do_not_change_the_key() {
        let a =
            k(r#"{"messages":[{"role":"user","content":"hi"}],"temperature":1,"max_tokens":20}"#);
        let b = k(
            r#"{ "max_tokens" : 20, "temperature": 1.0, "messages": [ {"content":"hi","role":"user"} ] }"#,
        );
        assert_eq!(a, b);
        let c =
            k(r#"{"messages":[{"role":"user","content":"hi"}],"temperature":1e0,"max_tokens":20}"#);
        assert_eq!(a, c);
    }

    #[test]
    fn non_semantic_fields_and_custom_ids_do_not_change_the_key() {
        let a = k(r#"{"custom_id":"a","messages":[{"role":"user","content":"hi"}]}"#);
        let b = k(
            r#"{"custom_id":"b","metadata":{"x":1},"user":"u1","store":true,"stream":false,"messages":[{"role":"user","content":"hi"}]}"#,
        );
        assert_eq!(a, b);
    }

    #[test]
    fn what_the_model_sees_changes_the_key() {
        let base = k(r#"{"messages":[{"role":"user","content":"hi"}],"temperature":0.5}"#);
        for other in [
            r#"{"messages":[{"role":"user","content":"hi!"}],"temperature":0.5}"#,
            r#"{"messages":[{"role":"user","content":"hi"}],"temperature":0.7}"#,
            r#"{"messages":[{"role":"system","content":"hi"}],"temperature":0.5}"#,
            r#"{"model":"gpt-4.1","messages":[{"role":"user","content":"hi"}],"temperature":0.5}"#,
            r#"{"messages":[{"role":"user","content":"hi"}],"temperature":0.5,"seed":1}"#,
        ] {
            assert_ne!(base, k(other), "{other}");
        }
        let r = req(r#"{"messages":[{"role":"user","content":"hi"}],"temperature":0.5}"#);
        assert_ne!(key("openai", &r), key("http://127.0.0.1:8000/v1", &r));
        // The same body to another endpoint is another request.
        let e = req(
            r#"{"custom_id":"e","method":"POST","url":"/v1/embeddings","body":{"model":"gpt-4.1-mini","input":"hi"}}"#,
        );
        let mut c = e.clone();
        c.endpoint = crate::request::Endpoint::ChatCompletions;
        assert_ne!(key("openai", &e), key("openai", &c));
    }

    #[test]
    fn stores_and_answers_across_opens_and_read_only_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.sqlite");
        let key = k(r#"{"messages":[{"role":"user","content":"hi"}]}"#);
        let body = RawJson::parse(r#"{"id":"x","choices":[]}"#).unwrap();
        {
            let mut c = Cache::open(&path, false).unwrap();
            assert!(c.get(&key).unwrap().is_none());
            c.put(&[Store {
                key,
                model: "gpt-4.1-mini",
                response: &body,
                usage: Some(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 4,
                    total_tokens: 7,
                    ..Usage::default()
                }),
            }])
            .unwrap();
        }
        let mut c = Cache::open(&path, true).unwrap();
        let hit = c.get(&key).unwrap().unwrap();
        assert_eq!(hit.response.get(), body.get());
        assert_eq!(hit.usage.unwrap().total(), 7);
        let other = [7u8; 32];
        c.put(&[Store {
            key: other,
            model: "m",
            response: &body,
            usage: None,
        }])
        .unwrap();
        assert_eq!(c.len().unwrap(), 1);

        std::fs::write(dir.path().join("junk"), b"not a database").unwrap();
        assert!(Cache::open(&dir.path().join("junk"), false).is_err());
    }

    /// A new cache is made with synchronous=OFF (no `fsync`s), and then used, and opened
    /// again, with synchronous=NORMAL: WAL frames synced at each checkpoint.
    #[test]
    fn a_cache_is_made_without_syncing_and_used_with_synchronous_normal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.sqlite");
        let synchronous = |c: &Cache| -> i64 {
            c.conn
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .unwrap()
        };
        let c = Cache::open(&path, false).unwrap();
        assert_eq!(synchronous(&c), 1, "NORMAL once made");
        assert_eq!(c.len().unwrap(), 0);
        drop(c);
        let c = Cache::open(&path, false).unwrap();
        assert_eq!(synchronous(&c), 1);
    }

    fn body(i: usize, len: usize) -> RawJson {
        RawJson::parse(&format!(r#"{{"id":"r{i}","text":"{}"}}"#, "a".repeat(len))).unwrap()
    }

    fn key_of(i: usize) -> CacheKey {
        *blake3::hash(&i.to_le_bytes()).as_bytes()
    }

    /// Stores `n` responses, of many sizes (some of 64 KiB and more), in calls of `per`.
    fn fill(c: &mut Cache, n: usize, per: usize) -> Vec<RawJson> {
        let bodies: Vec<RawJson> = (0..n)
            .map(|i| body(i, (i * 977) % 3000 + if i % 97 == 0 { 64 << 10 } else { 0 }))
            .collect();
        for start in (0..n).step_by(per) {
            let items: Vec<Store<'_>> = (start..n.min(start + per))
                .map(|i| Store {
                    key: key_of(i),
                    model: "m",
                    response: &bodies[i],
                    usage: (i % 2 == 0).then_some(Usage {
                        prompt_tokens: i as u64,
                        completion_tokens: 1,
                        total_tokens: i as u64 + 1,
                        ..Usage::default()
                    }),
                })
                .collect();
            c.put(&items).unwrap();
        }
        bodies
    }

    /// A batch made for `n` responses takes `n` of the size of the first without moving its
    /// buffer (each growth copied what it held), stores them as any batch does, and a first
    /// response too big for the bound does not make it reserve more.
    #[test]
    fn a_batch_sized_for_its_responses_does_not_grow() {
        let bodies: Vec<RawJson> = (0..200).map(|i| body(i, 600 + i % 7)).collect();
        let mut batch = Batch::with_capacity(200);
        let mut at = None;
        for s in stores(&bodies, 0) {
            batch.push(&s);
            let now = batch.buf.as_ptr();
            assert_eq!(*at.get_or_insert(now), now, "the buffer moved");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.sqlite");
        let mut c = Cache::open(&path, false).unwrap();
        c.put_batch(&mut batch).unwrap();
        assert!(batch.is_empty());
        for (i, b) in bodies.iter().enumerate() {
            assert_eq!(c.get(&key_of(i)).unwrap().unwrap().response.get(), b.get());
        }
        let big = body(0, BATCH_RESERVE_MAX);
        let mut batch = Batch::with_capacity(1024);
        batch.push(&stores(std::slice::from_ref(&big), 0)[0]);
        assert!(batch.buf.capacity() <= 2 * BATCH_RESERVE_MAX + big.get().len());
    }

    /// `bodies` to store under the keys `key_of(first + i)`, without usage.
    fn stores(bodies: &[RawJson], first: usize) -> Vec<Store<'_>> {
        bodies
            .iter()
            .enumerate()
            .map(|(i, b)| Store {
                key: key_of(first + i),
                model: "m",
                response: b,
                usage: None,
            })
            .collect()
    }

    fn all_answer(c: &Cache, bodies: &[RawJson]) {
        for (i, b) in bodies.iter().enumerate() {
            let hit = c
                .get(&key_of(i))
                .unwrap()
                .unwrap_or_else(|| panic!("{i} missed"));
            assert_eq!(hit.response.get(), b.get(), "{i}");
            assert_eq!(
                hit.usage.map(|u| u.prompt_tokens),
                (i % 2 == 0).then_some(i as u64)
            );
        }
    }

    fn count(c: &Cache, table: &str) -> i64 {
        c.conn
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    }

    /// Responses answer from the moment they are stored (their keys held in memory), after
    /// the cache is closed (keys merged), and after a crash that left keys unmerged (taken
    /// up when opened: in memory when read-only, merged when opened to write).
    #[test]
    fn answers_before_and_after_merging_and_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.sqlite");
        let mut c = Cache::open(&path, false).unwrap();
        let bodies = fill(&mut c, 600, 64);
        assert_eq!(count(&c, "regions"), 10, "a region per call");
        assert_eq!(count(&c, "chunks"), 0, "nothing in SQLite's pages");
        assert_eq!(indexed(&c.conn).unwrap(), 0);
        all_answer(&c, &bodies);
        assert!(c.get(&key_of(600)).unwrap().is_none());
        // Same first 8 bytes, another key: a miss, not somebody else's answer.
        let mut twin = key_of(5);
        twin[31] ^= 1;
        assert!(c.get(&twin).unwrap().is_none());
        assert_eq!(c.len().unwrap(), 600);
        c.close().unwrap();

        let mut c = Cache::open(&path, false).unwrap();
        assert_eq!(
            (indexed(&c.conn).unwrap(), count(&c, "unmerged_regions")),
            (600, 0)
        );
        all_answer(&c, &bodies);
        // A crash: stored, never closed.
        let more = fill(&mut c, 700, 100);
        std::mem::forget(c);
        let c = Cache::open(&path, true).unwrap();
        assert_eq!(count(&c, "unmerged_regions"), 7);
        all_answer(&c, &more);
        drop(c);
        let c = Cache::open(&path, false).unwrap();
        assert_eq!(
            (indexed(&c.conn).unwrap(), count(&c, "unmerged_regions")),
            (700, 0)
        );
        all_answer(&c, &more);
        assert_eq!(c.len().unwrap(), 700);
    }

    /// A cache asks SQLite nothing for a miss while its filter holds, until another
    /// connection writes: then, once the filter has asked whether one did, SQLite answers.
    #[test]
    fn what_another_process_stores_is_seen_by_a_cache_that_started_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.sqlite");
        let a = Cache::open(&path, false).unwrap();
        assert!(a.get(&key_of(1)).unwrap().is_none());
        // Not asked, and no read transaction begun for it.
        assert_eq!((a.probes.get(), a.reads.get()), (0, 0));
        let mut b = Cache::open(&path, false).unwrap();
        let bodies = fill(&mut b, 3, 3);
        b.close().unwrap();
        for _ in 0..LOOKUPS_PER_CHECK {
            a.get(&key_of(9)).unwrap();
        }
        let hit = a
            .get(&key_of(1))
            .unwrap()
            .expect("seen once another read began");
        assert_eq!(hit.response.get(), bodies[1].get());
        assert!(a.filter_stale.get());
    }

    /// Misses ask SQLite nothing, in a cache opened with keys and after merging more; every
    /// key stored still answers.
    #[test]
    fn misses_ask_sqlite_nothing_before_or_after_merging() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.sqlite");
        let mut c = Cache::open(&path, false).unwrap();
        let first = fill(&mut c, 3000, 500);
        c.close().unwrap();
        let mut c = Cache::open(&path, false).unwrap();
        all_answer(&c, &first);
        // Misses, and how many of them asked SQLite.
        let misses = |c: &Cache, from: usize| {
            let before = c.probes.get();
            for i in from..from + 5000 {
                assert!(c.get(&key_of(i)).unwrap().is_none());
            }
            c.probes.get() - before
        };
        let asked = misses(&c, 1_000_000);
        assert!(asked < 50, "{asked} of 5,000 misses asked");
        // More keys than the filter was sized for: it grows, and forgets none.
        let bodies: Vec<RawJson> = (0..MERGE_ROWS + 10).map(|i| body(i, 0)).collect();
        let items = stores(&bodies, 10_000);
        c.put(&items).unwrap();
        assert!(c.fresh.places.is_empty(), "merged");
        let asked = misses(&c, 2_000_000);
        assert!(asked < 50, "{asked} of 5,000 misses asked");
        all_answer(&c, &first);
        for i in (0..bodies.len()).step_by(97) {
            assert_eq!(
                c.get(&key_of(10_000 + i)).unwrap().unwrap().response.get(),
                bodies[i].get()
            );
        }
    }

    /// A filter sized for the keys to come holds them in one part (a miss reads one line),
    /// and one that held keys already takes a second part for them, forgetting none.
    #[test]
    fn a_filter_reserved_for_its_keys_holds_them_in_one_part() {
        let k = |i: usize| short(&key_of(i));
        let mut f = KeyFilter::with_capacity(MERGE_ROWS);
        f.reserve(1_000_000);
        for i in 0..1_000_000 {
            f.insert(k(i));
        }
        assert_eq!(f.parts.len(), 1);
        let mut f = KeyFilter::with_capacity(MERGE_ROWS);
        f.insert(k(0));
        f.reserve(300_000);
        for i in 1..300_000 {
            f.insert(k(i));
        }
        assert_eq!(f.parts.len(), 2);
        assert!((0..300_000).all(|i| f.may_hold(k(i))));
    }

    #[test]
    fn the_key_filter_forgets_nothing_as_it_grows() {
        let mut f = KeyFilter::with_capacity(1000);
        let k = |i: usize| short(&key_of(i));
        for i in 0..200_000 {
            f.insert(k(i));
        }
        assert!(f.parts.len() > 3, "it grew");
        assert!((0..200_000).all(|i| f.may_hold(k(i))));
        let false_positives = (1_000_000..1_100_000).filter(|&i| f.may_hold(k(i))).count();
        assert!(false_positives < 1000, "{false_positives} of 100,000");
    }

    /// Keys wait in memory up to [`MERGE_ROWS`], then are written.
    #[test]
    fn keys_are_merged_once_enough_wait() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cache::open(&dir.path().join("cache.sqlite"), false).unwrap();
        let bodies: Vec<RawJson> = (0..MERGE_ROWS + 1).map(|i| body(i, 0)).collect();
        let items = stores(&bodies, 0);
        c.put(&items[..MERGE_ROWS - 1]).unwrap();
        assert_eq!(indexed(&c.conn).unwrap(), 0);
        c.put(&items[MERGE_ROWS - 1..]).unwrap();
        assert_eq!(indexed(&c.conn).unwrap(), MERGE_ROWS as u64 + 1);
        assert_eq!(count(&c, "unmerged_regions"), 0);
        assert!(c.fresh.places.is_empty());
        assert_eq!(
            c.get(&key_of(77)).unwrap().unwrap().response.get(),
            bodies[77].get()
        );
    }

    /// A cache as version `version` made it: its meta table, then `tables`.
    fn old_cache(path: &Path, version: u32, tables: &str) -> Connection {
        let conn = Connection::open(path).unwrap();
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE cache_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             INSERT INTO cache_meta VALUES ('version', '{version}');
             {tables}"
        ))
        .unwrap();
        conn
    }

    /// A cache of version 3 (records in SQLite's `chunks`, a row per key in `keys`, one
    /// chunk's keys not yet merged) is refused read-only, saying how to convert it; opened
    /// to write, its index becomes blocks, its chunks still answer and new responses go to
    /// the data file.
    #[test]
    fn a_version_3_cache_is_converted_and_its_chunks_still_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.sqlite");
        let bodies: Vec<RawJson> = (0..3).map(|i| body(i, 10 * i)).collect();
        {
            let conn = old_cache(
                &path,
                3,
                "CREATE TABLE chunks (id INTEGER PRIMARY KEY, created_at INTEGER NOT NULL,
                     data BLOB NOT NULL);
                 CREATE TABLE keys (k INTEGER PRIMARY KEY, at INTEGER NOT NULL);
                 CREATE TABLE unmerged (id INTEGER PRIMARY KEY);",
            );
            // A record as version 3 wrote it: no CRC after it.
            for (i, s) in stores(&bodies[..2], 0).iter().enumerate() {
                let mut record = Vec::new();
                encode(&mut record, s);
                record.truncate(record.len() - RECORD_TRAILER);
                let id = i as i64 + 1;
                conn.execute("INSERT INTO chunks VALUES (?1, 0, ?2)", params![id, record])
                    .unwrap();
                if i == 0 {
                    conn.execute(
                        "INSERT INTO keys VALUES (?1, ?2)",
                        [short(&key_of(0)), place(id, 0)],
                    )
                    .unwrap();
                } else {
                    conn.execute("INSERT INTO unmerged VALUES (?1)", [id])
                        .unwrap();
                }
            }
        }
        let answers = |c: &Cache, n: usize| {
            for (i, b) in bodies[..n].iter().enumerate() {
                let hit = c
                    .get(&key_of(i))
                    .unwrap()
                    .unwrap_or_else(|| panic!("{i} missed"));
                assert_eq!(hit.response.get(), b.get(), "{i}");
            }
        };
        let e = Cache::open(&path, true).unwrap_err().to_string();
        assert!(
            e.contains("\"3\"") && e.contains("without --cache-read-only"),
            "{e}"
        );
        assert!(!data_path(&path).exists(), "read-only creates nothing");

        let mut c = Cache::open(&path, false).unwrap();
        answers(&c, 2);
        assert_eq!(indexed(&c.conn).unwrap(), 2);
        c.put(&stores(&bodies[2..], 2)).unwrap();
        answers(&c, 3);
        assert_eq!((count(&c, "chunks"), count(&c, "regions")), (2, 1));
        c.close().unwrap();
        let c = Cache::open(&path, true).unwrap();
        answers(&c, 3);
        assert_eq!(c.len().unwrap(), 3);
        assert!(
            !has_table(&c.conn, "keys").unwrap(),
            "the old index is gone"
        );
    }

    /// The index's blocks split as they fill, hold their keys in order within their range,
    /// and answer every key; a key stored again answers with its newest response.
    #[test]
    fn index_blocks_split_stay_in_order_and_take_a_key_stored_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.sqlite");
        let bodies: Vec<RawJson> = (0..6000).map(|i| body(i, i % 50)).collect();
        for part in 0..3 {
            let mut c = Cache::open(&path, false).unwrap();
            c.put(&stores(
                &bodies[part * 2000..(part + 1) * 2000],
                part * 2000,
            ))
            .unwrap();
            c.close().unwrap();
        }
        let c = Cache::open(&path, false).unwrap();
        let blocks: Vec<(i64, Vec<u8>)> = {
            let mut q = c
                .conn
                .prepare("SELECT lo, keys FROM key_blocks ORDER BY lo")
                .unwrap();
            let rows = q.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
            rows.collect::<rusqlite::Result<_>>().unwrap()
        };
        assert!(blocks.len() > 6000 / BLOCK_KEYS, "{} blocks", blocks.len());
        assert_eq!(blocks[0].0, i64::MIN);
        let mut last = i64::MIN;
        for (n, (lo, block)) in blocks.iter().enumerate() {
            let ks: Vec<i64> = pairs(block).map(|(k, _)| k).collect();
            assert!(!ks.is_empty() && ks.len() <= BLOCK_KEYS, "{}", ks.len());
            assert!(ks[0] >= *lo, "within its range");
            assert!(n == 0 || ks[0] > last, "after the block before");
            assert!(ks.windows(2).all(|w| w[0] < w[1]), "in order");
            if let Some((next, _)) = blocks.get(n + 1) {
                assert!(ks[ks.len() - 1] < *next, "within its range");
            }
            last = ks[ks.len() - 1];
        }
        assert_eq!(indexed(&c.conn).unwrap(), 6000);
        for (i, b) in bodies.iter().enumerate() {
            let hit = c
                .get(&key_of(i))
                .unwrap()
                .unwrap_or_else(|| panic!("{i} missed"));
            assert_eq!(hit.response.get(), b.get(), "{i}");
        }
        drop(c);
        let newer = body(7, 99);
        let mut c = Cache::open(&path, false).unwrap();
        c.put(&stores(std::slice::from_ref(&newer), 7)).unwrap();
        c.close().unwrap();
        let c = Cache::open(&path, true).unwrap();
        assert_eq!(
            c.get(&key_of(7)).unwrap().unwrap().response.get(),
            newer.get()
        );
        assert_eq!(c.len().unwrap(), 6000);
    }

    /// A record whose bytes changed after it was written (a torn write, a damaged file)
    /// fails its CRC and is a miss, as is one the file no longer holds whole: never a wrong
    /// answer, never an error. The others still answer.
    #[test]
    fn a_record_that_does_not_check_is_a_miss_never_a_wrong_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.sqlite");
        let bodies: Vec<RawJson> = (0..3).map(|i| body(i, 40)).collect();
        let mut c = Cache::open(&path, false).unwrap();
        c.put(&stores(&bodies, 0)).unwrap();
        c.close().unwrap();
        let data = data_path(&path);
        let mut bytes = std::fs::read(&data).unwrap();
        // One letter of the second response: still JSON, no longer what was stored.
        let at = bytes.windows(4).position(|w| w == b"\"r1\"").unwrap() + 13;
        assert_eq!(bytes[at], b'a');
        bytes[at] = b'b';
        // The last record cut short.
        bytes.truncate(bytes.len() - 10);
        std::fs::write(&data, &bytes).unwrap();
        let c = Cache::open(&path, true).unwrap();
        assert_eq!(
            c.get(&key_of(0)).unwrap().unwrap().response.get(),
            bodies[0].get()
        );
        assert!(c.get(&key_of(1)).unwrap().is_none(), "changed");
        assert!(c.get(&key_of(2)).unwrap().is_none(), "cut");
        drop(c);
        // Without its data file, a cache answers nothing and fails nothing.
        std::fs::remove_file(&data).unwrap();
        let c = Cache::open(&path, true).unwrap();
        assert!(c.get(&key_of(0)).unwrap().is_none());
    }

    /// Two writers (two processes' connections) take turns at the data file's end: their
    /// regions follow one another without overlapping, and what each stored answers. Bytes
    /// written past the end by a write that was never committed are written over, and a new
    /// cache empties a data file left beside it.
    #[test]
    fn writers_take_turns_at_the_end_and_uncommitted_bytes_are_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.sqlite");
        std::fs::write(data_path(&path), vec![7u8; 5000]).unwrap();
        let mut a = Cache::open(&path, false).unwrap();
        assert_eq!(std::fs::metadata(data_path(&path)).unwrap().len(), 0);
        let mut b = Cache::open(&path, false).unwrap();
        let bodies: Vec<RawJson> = (0..60).map(|i| body(i, i * 7)).collect();
        for (n, part) in bodies.chunks(10).enumerate() {
            let writer = if n % 2 == 0 { &mut a } else { &mut b };
            writer.put(&stores(part, n * 10)).unwrap();
            if n == 2 {
                // A write that died before its commit: bytes past the end.
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(data_path(&path))
                    .unwrap();
                f.write_all(&[9u8; 3000]).unwrap();
            }
        }
        let regions: Vec<(i64, i64)> = {
            let mut q = a
                .conn
                .prepare("SELECT at, len FROM regions ORDER BY at")
                .unwrap();
            let rows = q.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
            rows.collect::<rusqlite::Result<_>>().unwrap()
        };
        assert_eq!(regions.len(), 6);
        assert_eq!(regions[0].0, 0);
        for w in regions.windows(2) {
            assert_eq!(w[0].0 + w[0].1, w[1].0, "{regions:?}");
        }
        let end = regions[5].0 + regions[5].1;
        assert_eq!(
            std::fs::metadata(data_path(&path)).unwrap().len(),
            end as u64
        );
        let stored = |c: &Cache, from: usize| {
            for i in (from..60).step_by(20).flat_map(|s| s..s + 10) {
                let hit = c
                    .get(&key_of(i))
                    .unwrap()
                    .unwrap_or_else(|| panic!("{i} missed"));
                assert_eq!(hit.response.get(), bodies[i].get(), "{i}");
            }
        };
        stored(&a, 0);
        stored(&b, 10);
        a.close().unwrap();
        b.close().unwrap();
        let c = Cache::open(&path, true).unwrap();
        stored(&c, 0);
        stored(&c, 10);
    }

    /// A cache of version 2 (one row per response, as text or as an LZ4 block) is converted
    /// when opened to write, and keeps answering; opened read-only it is refused, saying how
    /// to convert it. A block that does not decompress is dropped.
    #[test]
    fn a_version_2_cache_is_converted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.sqlite");
        let body = r#"{"id":"old","choices":[{"message":{"content":"answer"}}]}"#;
        let (lz4, text, broken) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        {
            let conn = old_cache(
                &path,
                2,
                "CREATE TABLE responses (key BLOB PRIMARY KEY, model TEXT NOT NULL,
                     response BLOB NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER,
                     created_at INTEGER NOT NULL);",
            );
            let insert = "INSERT INTO responses VALUES (?1, 'm', ?2, ?3, 5, 0)";
            let block = lz4_flex::block::compress_prepend_size(body.as_bytes());
            conn.execute(insert, params![&lz4[..], block, 4]).unwrap();
            conn.execute(insert, params![&text[..], body, None::<i64>])
                .unwrap();
            conn.execute(insert, params![&broken[..], vec![9u8, 9, 9], 1])
                .unwrap();
        }
        let e = Cache::open(&path, true).unwrap_err().to_string();
        assert!(
            e.contains("\"2\"") && e.contains("without --cache-read-only"),
            "{e}"
        );
        let c = Cache::open(&path, false).unwrap();
        let hit = c.get(&lz4).unwrap().unwrap();
        assert_eq!(hit.response.get(), body);
        assert_eq!(hit.usage.unwrap().total(), 9);
        let hit = c.get(&text).unwrap().unwrap();
        assert_eq!((hit.response.get(), hit.usage.unwrap().total()), (body, 5));
        assert!(c.get(&broken).unwrap().is_none());
        assert_eq!(c.len().unwrap(), 2);
        assert!(!has_table(&c.conn, "responses").unwrap());
        drop(c);
        let c = Cache::open(&path, true).unwrap();
        assert_eq!(c.get(&lz4).unwrap().unwrap().response.get(), body);
    }
}
