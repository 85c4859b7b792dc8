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

use std::path::{Path, PathBuf};

use crate::json::RawJson;
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
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
pub const CACHE_VERSION: u32 = 2;

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
    /// Not a sluice cache, or another version of one.
    #[error("cache {path} is not a sluice response cache of version {CACHE_VERSION}: {reason}")]
    Incompatible {
        /// The cache file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A response as a row holds it.
enum Stored {
    /// JSON text.
    Text(Vec<u8>),
    /// An LZ4 block after its length (caches written before 2026-12-01).
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
    use std::io::Write as _;
    // Everything hashed is laid out in one buffer and hashed at once (BLAKE3 of the
    // pieces in turn is the same hash, and each call has its cost).
    let mut out = Vec::with_capacity(64 + target.len() + request.body.len());
    out.extend_from_slice(b"sluice-cache-v1\0");
    out.extend_from_slice(target.as_bytes());
    out.push(0);
    write!(out, "{:?}", request.endpoint).expect("writing to a Vec");
    out.push(0);
    out.extend_from_slice(request.model.as_bytes());
    out.push(0);
    let head = out.len();
    if canonical_text(&request.body, true, &mut out).is_none() {
        out.truncate(head);
        match serde_json::from_slice::<Value>(&request.body) {
            Ok(Value::Object(mut body)) => {
                for field in NON_SEMANTIC_FIELDS {
                    body.remove(*field);
                }
                canonical(&Value::Object(body), &mut out);
            }
            // Bodies are JSON objects by construction; anything else is keyed by its bytes.
            _ => out.extend_from_slice(&request.body),
        }
    }
    *blake3::hash(&out).as_bytes()
}

/// [`canonical`] of the JSON text `text` without building a tree (less the non-semantic
/// fields when `top`): the same bytes, held to them by a test. `None` (and `out` in any
/// state) for text that is not a JSON object at the top, or has a member name written
/// with escapes or given twice; [`key`] then builds the tree.
fn canonical_text(text: &[u8], top: bool, out: &mut Vec<u8>) -> Option<()> {
    let text = std::str::from_utf8(text).ok()?;
    let mut members = crate::json::members(text).ok()??;
    if top {
        members.retain(|(k, _)| !NON_SEMANTIC_FIELDS.contains(k));
    }
    members.sort_unstable_by(|a, b| a.0.cmp(b.0));
    if members.windows(2).any(|w| w[0].0 == w[1].0) || members.iter().any(|(k, _)| k.contains('\\'))
    {
        return None;
    }
    out.push(b'{');
    for (i, (k, v)) in members.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b"\":");
        canonical_value(v, out)?;
    }
    out.push(b'}');
    Some(())
}

/// One value of [`canonical_text`].
fn canonical_value(v: &str, out: &mut Vec<u8>) -> Option<()> {
    match v.as_bytes()[0] {
        b'{' => canonical_text(v.as_bytes(), false, out),
        b'[' => {
            out.push(b'[');
            for (i, item) in crate::json::elements(v).ok()??.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_value(item, out)?;
            }
            out.push(b']');
            Some(())
        }
        // Without escapes a string is written as it is; with them, as serde_json writes it.
        b'"' if !v.contains('\\') => {
            out.extend_from_slice(v.as_bytes());
            Some(())
        }
        b'"' => {
            let s: String = serde_json::from_str(v).ok()?;
            serde_json::to_writer(&mut *out, &s).ok()
        }
        b't' | b'f' | b'n' => {
            out.extend_from_slice(v.as_bytes());
            Some(())
        }
        _ => {
            let n: serde_json::Number = serde_json::from_str(v).ok()?;
            canonical(&Value::Number(n), out);
            Some(())
        }
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

/// The response cache.
pub struct Cache {
    conn: Connection,
    path: PathBuf,
    read_only: bool,
    /// Lookups made in the read transaction now open (0: none is open).
    reads: std::cell::Cell<u32>,
}

/// Lookups share one read transaction, this many at most: on its own, every lookup took
/// and released SQLite's shared locks (two `fcntl` calls and a scan of the WAL index),
/// which cost more than the lookup. A lookup may miss what another process stored since
/// the transaction began, which only means that request is sent.
const READS_PER_TRANSACTION: u32 = 512;

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("path", &self.path).finish()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cache_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS responses (
    key BLOB PRIMARY KEY,
    model TEXT NOT NULL,
    response BLOB NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    created_at INTEGER NOT NULL
);
";

impl Cache {
    /// Opens the cache at `path`, creating it unless `read_only`.
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
        let conn = Connection::open_with_flags(path, flags).map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sql)?;
        if !read_only {
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(|e| incompatible(e.to_string()))?;
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(sql)?;
            conn.execute_batch(SCHEMA)
                .map_err(|e| incompatible(e.to_string()))?;
            conn.execute(
                "INSERT OR IGNORE INTO cache_meta (key, value) VALUES ('version', ?1)",
                params![CACHE_VERSION.to_string()],
            )
            .map_err(sql)?;
        }
        let version: Option<String> = conn
            .query_row(
                "SELECT value FROM cache_meta WHERE key = 'version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| incompatible(e.to_string()))?;
        if version.as_deref() != Some(&CACHE_VERSION.to_string()) {
            return Err(incompatible(format!("its version is {version:?}")));
        }
        Ok(Cache {
            conn,
            path: path.to_path_buf(),
            read_only,
            reads: std::cell::Cell::new(0),
        })
    }

    /// Whether the cache only answers and stores nothing.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The stored response for `key`, if any.
    pub fn get(&self, key: &CacheKey) -> Result<Option<Hit>, CacheError> {
        let sql = |source| CacheError::Sqlite {
            path: self.path.clone(),
            source,
        };
        match self.reads.get() {
            0 => self.conn.execute_batch("BEGIN").map_err(sql)?,
            READS_PER_TRANSACTION.. => {
                self.conn.execute_batch("COMMIT; BEGIN").map_err(sql)?;
                self.reads.set(0);
            }
            _ => {}
        }
        self.reads.set(self.reads.get() + 1);
        let mut q = self
            .conn
            .prepare_cached(
                "SELECT response, prompt_tokens, completion_tokens FROM responses WHERE key = ?1",
            )
            .map_err(sql)?;
        let row = q
            .query_row(params![&key[..]], |r| {
                let body = match r.get_ref(0)? {
                    ValueRef::Text(t) => Stored::Text(t.to_vec()),
                    ValueRef::Blob(b) => Stored::Lz4(b.to_vec()),
                    _ => Stored::Lz4(Vec::new()),
                };
                let prompt: Option<i64> = r.get(1)?;
                let completion: Option<i64> = r.get(2)?;
                Ok((body, prompt, completion))
            })
            .optional()
            .map_err(sql)?;
        let Some((body, prompt, completion)) = row else {
            return Ok(None);
        };
        // Stored as text. Caches written before 2026-12-01 hold LZ4 blocks after their
        // length (BLOBs), still read: compressing cost more than it spared SQLite.
        let body = match body {
            Stored::Text(text) => text,
            Stored::Lz4(block) => match lz4_flex::block::decompress_size_prepended(&block) {
                Ok(body) => body,
                Err(_) => return Ok(None),
            },
        };
        let Ok(text) = String::from_utf8(body) else {
            return Ok(None);
        };
        let Ok(response) = RawJson::parse(&text) else {
            return Ok(None);
        };
        let usage = match (prompt, completion) {
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
        };
        Ok(Some(Hit { response, usage }))
    }

    /// Stores responses in one transaction (nothing when read-only).
    pub fn put(&mut self, items: &[Store<'_>]) -> Result<(), CacheError> {
        if self.read_only || items.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let sql = |source| CacheError::Sqlite {
            path: path.clone(),
            source,
        };
        self.end_reads().map_err(sql)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let tx = self.conn.unchecked_transaction().map_err(sql)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO responses (key, model, response, prompt_tokens, completion_tokens, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(sql)?;
            for s in items {
                insert
                    .execute(params![
                        &s.key[..],
                        s.model,
                        s.response.get(),
                        s.usage.map(|u| u.prompt_tokens as i64),
                        s.usage.map(|u| u.completion_tokens as i64),
                        now,
                    ])
                    .map_err(sql)?;
            }
        }
        tx.commit().map_err(sql)
    }

    /// Ends the read transaction of the lookups, if one is open.
    fn end_reads(&self) -> rusqlite::Result<()> {
        if self.reads.get() > 0 {
            self.reads.set(0);
            self.conn.execute_batch("COMMIT")?;
        }
        Ok(())
    }

    /// Responses stored.
    pub fn len(&self) -> Result<u64, CacheError> {
        self.conn
            .query_row("SELECT COUNT(*) FROM responses", [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(|source| CacheError::Sqlite {
                path: self.path.clone(),
                source,
            })
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> Result<bool, CacheError> {
        Ok(self.len()? == 0)
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
            ];
            out.push('{');
            for i in 0..rng.random_range(0..6) {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&format!("\"{}\":", names[rng.random_range(0..names.len())]));
                value(rng, depth, out);
            }
            out.push('}');
        }
        let mut rng = SmallRng::seed_from_u64(11);
        let (mut fast, mut slow) = (0, 0);
        for _ in 0..20_000 {
            let mut body = String::new();
            object(&mut rng, 3, &mut body);
            let Value::Object(mut tree) = serde_json::from_str::<Value>(&body).unwrap() else {
                unreachable!()
            };
            for field in NON_SEMANTIC_FIELDS {
                tree.remove(*field);
            }
            let mut want = Vec::new();
            canonical(&Value::Object(tree), &mut want);
            let mut got = Vec::new();
            match canonical_text(body.as_bytes(), true, &mut got) {
                Some(()) => {
                    fast += 1;
                    assert_eq!(
                        String::from_utf8_lossy(&got),
                        String::from_utf8_lossy(&want),
                        "{body}"
                    );
                }
                None => slow += 1,
            }
        }
        // Repeated and escaped names take the tree's road.
        assert!(
            fast > 10_000 && slow > 1_000,
            "{fast} read from the text, {slow} not"
        );
    }

    /// Keys do not change between versions, so a cache keeps answering after an upgrade:
    /// these are the keys sluice computed (from the JSON tree, piece by piece) before keys
    /// were read from the text in one buffer.
    #[test]
    fn keys_are_what_earlier_versions_computed() {
        let cases = [
            (
                r#"{"custom_id":"a","model":"gpt-4.1-mini","messages":[{"role":"user","content":"Question 1: hi \u00e9"}],"max_tokens":64,"temperature":0.5,"user":"u"}"#,
                "5ddbf8426e268b59fc8068a9c41695d9b9107ca223262aecfba6738195ead4fc",
            ),
            (
                r#"{"model":"gpt-4.1-mini","messages":[{"role":"user","content":"x"}],"n":1.0,"z":{"b":[1e2,-0,"\/"],"a":null}}"#,
                "c396924923a17741bd3d978a2ac2f8216e6bdbb20c2279a33d7b93565620cfcc",
            ),
        ];
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

    /// Responses are stored as text; rows an older sluice stored as LZ4 blocks are still
    /// answered, and a block that does not decompress is a miss, not an error.
    #[test]
    fn text_rows_and_older_lz4_rows_are_both_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.sqlite");
        let body = r#"{"id":"old","choices":[{"message":{"content":"answer"}}]}"#;
        let (old, new, broken) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        {
            let mut c = Cache::open(&path, false).unwrap();
            c.put(&[Store {
                key: new,
                model: "m",
                response: &RawJson::parse(body).unwrap(),
                usage: None,
            }])
            .unwrap();
            let insert =
                "INSERT INTO responses (key, model, response, created_at) VALUES (?1, 'm', ?2, 0)";
            let block = lz4_flex::block::compress_prepend_size(body.as_bytes());
            c.conn.execute(insert, params![&old[..], block]).unwrap();
            c.conn
                .execute(insert, params![&broken[..], vec![9u8, 9, 9]])
                .unwrap();
            let kind: String = c
                .conn
                .query_row(
                    "SELECT typeof(response) FROM responses WHERE key = ?1",
                    params![&new[..]],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(kind, "text");
        }
        let c = Cache::open(&path, true).unwrap();
        assert_eq!(c.get(&new).unwrap().unwrap().response.get(), body);
        assert_eq!(c.get(&old).unwrap().unwrap().response.get(), body);
        assert!(c.get(&broken).unwrap().is_none());
    }
}
