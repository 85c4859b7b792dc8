//! The durable record of a run (SQLite, WAL): every outcome written to the output is
//! committed here first (invariant 7), so a crashed or interrupted run resumes with nothing
//! lost and nothing paid twice.
//!
//! # Layout
//!
//! * `meta`: the schema version, the input's [`InputFingerprint`], the run's settings
//!   that change what a request means (model, target), and when the journal was made.
//! * the outcomes, one per output line, `seq` being the line's number in the output, each
//!   with its input line, `custom_id`, status, error kind, attempts, usage and the output
//!   line itself, stored a group commit at a time (one SQLite row per commit). Rows of requests the run stopped before finishing (`not_attempted`,
//!   `stopped`, and the one refused for exhausted quota) are *not final*: their lines are
//!   in the output so every request has one, but a resume sends them again.
//!
//! # Resume
//!
//! The output is, by construction, the journal's rows in `seq` order: rows are committed
//! in batches and only then appended to the output. After a crash the output holds a
//! prefix of the rows (plus, maybe, a torn last line). [`Journal::prepare_resume`] drops
//! the rows that are not final (and, with `retry_failed`, transient failures), renumbers
//! the rest, and [`repair_output`] cuts the output back to the rows it shares with the
//! journal and appends the missing ones. Requests with a final row are skipped; every other
//! request is sent again.
//!
//! Writes are batched in one transaction per group of outcomes; with WAL and
//! `synchronous=NORMAL` a commit is a `write()` to the log, which survives a killed
//! process (a power loss may roll back the last commits, whose requests are then re-sent).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::outcome::{ErrorKind, Outcome, Status};

/// The journal format this build reads and writes.
pub const SCHEMA_VERSION: u32 = 2;

/// Why a journal could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// SQLite failed.
    #[error("journal {path}: {source}")]
    Sqlite {
        /// The journal.
        path: PathBuf,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// The file is not a sluice journal, or it is damaged.
    #[error("journal {path} is not a usable sluice journal: {reason}. Nothing was changed; move it away to start afresh, or point --journal elsewhere")]
    Corrupt {
        /// The journal.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Written by a sluice with another journal format.
    #[error("journal {path} has format version {found} (written by sluice {written_by}); this sluice reads version {SCHEMA_VERSION}. Finish the run with that version of sluice, or start afresh with --fresh")]
    Version {
        /// The journal.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// The sluice that wrote it.
        written_by: String,
    },
    /// Reading or writing the output file failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

fn sqlite(path: &Path) -> impl FnOnce(rusqlite::Error) -> JournalError + '_ {
    move |source| JournalError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

/// What identifies an input: its content hash, length and number of requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFingerprint {
    /// BLAKE3 of the file's bytes, hex.
    pub blake3: String,
    /// Its length in bytes.
    pub bytes: u64,
    /// Its requests (non-blank lines).
    pub requests: u64,
}

/// What the journal records about its run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JournalMeta {
    /// The input's fingerprint.
    pub input: InputFingerprint,
    /// Where the input was read from, for messages.
    pub input_path: String,
    /// Where the output goes (`-` for stdout).
    pub output_path: String,
    /// Settings that change what a request means (default model, target), as JSON. A
    /// resume with other values is refused unless forced.
    pub settings: serde_json::Value,
    /// The sluice version that made the journal.
    pub created_by: String,
    /// When it was made (RFC 3339, UTC).
    pub created_at: String,
}

/// One outcome to journal, with the output line it becomes.
#[derive(Clone, Debug)]
pub struct Entry {
    /// 1-based input line (0 when not from a file).
    pub line: u64,
    /// The request's `custom_id`.
    pub custom_id: String,
    /// Its status.
    pub status: Status,
    /// The error kind of a failure.
    pub error_kind: Option<ErrorKind>,
    /// The error message of a failure.
    pub error_message: Option<String>,
    /// HTTP attempts made.
    pub attempts: u32,
    /// Input tokens of the successful attempt.
    pub prompt_tokens: Option<u64>,
    /// Output tokens of the successful attempt.
    pub completion_tokens: Option<u64>,
    /// The cost, when known.
    pub cost_usd: Option<f64>,
    /// The output line, newline included.
    pub output: Vec<u8>,
}

impl Entry {
    /// The journal entry of an outcome.
    pub fn of(outcome: &Outcome) -> Entry {
        Entry {
            line: outcome.line,
            custom_id: outcome.custom_id.clone(),
            status: outcome.status,
            error_kind: outcome.error.as_ref().map(|e| e.kind),
            error_message: outcome.error.as_ref().map(|e| e.message.clone()),
            attempts: outcome.attempts,
            prompt_tokens: outcome.usage.map(|u| u.prompt_tokens),
            completion_tokens: outcome.usage.map(|u| u.completion_tokens),
            cost_usd: outcome.cost_usd,
            output: outcome.to_json_line(),
        }
    }

    /// Whether the request is done for good: anything but an outcome of a stopped run
    /// (not attempted, stopped while waiting, or refused for exhausted quota).
    pub fn is_final(&self) -> bool {
        is_final(self.error_kind)
    }
}

fn is_final(kind: Option<ErrorKind>) -> bool {
    !matches!(
        kind,
        Some(ErrorKind::NotAttempted | ErrorKind::Stopped | ErrorKind::QuotaExhausted)
    )
}

/// Error kinds `--retry-failed` sends again: the ones another try could fix.
pub fn is_transient(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::RateLimited
            | ErrorKind::ServerError
            | ErrorKind::Overloaded
            | ErrorKind::RequestTimeout
            | ErrorKind::Conflict
            | ErrorKind::Timeout
            | ErrorKind::Connection
            | ErrorKind::InvalidResponse
            | ErrorKind::DeadlineExceeded
            | ErrorKind::QuotaExhausted
    )
}

fn kind_from_str(s: &str) -> Option<ErrorKind> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
}

/// The input lines already done, as a bitset by line number.
#[derive(Clone, Debug, Default)]
pub struct LineSet {
    words: Vec<u64>,
    len: u64,
}

impl LineSet {
    /// Adds `line`.
    pub fn insert(&mut self, line: u64) {
        let (w, b) = ((line / 64) as usize, line % 64);
        if w >= self.words.len() {
            self.words.resize(w + 1, 0);
        }
        if self.words[w] & (1 << b) == 0 {
            self.words[w] |= 1 << b;
            self.len += 1;
        }
    }

    /// Whether `line` is in the set.
    pub fn contains(&self, line: u64) -> bool {
        let (w, b) = ((line / 64) as usize, line % 64);
        self.words.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    /// How many lines.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What [`Journal::prepare_resume`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResumePlan {
    /// Rows kept: requests that will not be sent again.
    pub kept: u64,
    /// Rows of a stopped run dropped so their requests are sent again.
    pub requeued_unfinished: u64,
    /// Transient failures dropped for `--retry-failed`.
    pub requeued_failed: u64,
    /// The first output line whose row changed (renumbered or dropped): the output must be
    /// cut back to the lines before it. `None` when no row changed.
    pub first_changed_seq: Option<u64>,
}

/// Counts for `sluice status` and the end of a resumed run.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct JournalStatus {
    /// Requests in the input.
    pub requests: u64,
    /// Requests with a final outcome.
    pub done: u64,
    /// Of which succeeded.
    pub succeeded: u64,
    /// Of which failed.
    pub failed: u64,
    /// Requests not yet done: unsent, in flight at a crash, or stopped.
    pub pending: u64,
    /// Failures (final and not) by kind, with an example message each.
    pub errors: Vec<ErrorCount>,
    /// HTTP attempts recorded.
    pub attempts: u64,
    /// Input tokens of successful requests.
    pub prompt_tokens: u64,
    /// Output tokens of successful requests.
    pub completion_tokens: u64,
    /// Cost of the outcomes whose cost is known.
    pub cost_usd: f64,
}

/// Failures of one kind in the journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ErrorCount {
    /// The kind.
    pub kind: String,
    /// How many.
    pub count: u64,
    /// The latest message of that kind.
    pub example: String,
}

/// A run's journal.
pub struct Journal {
    conn: Connection,
    path: PathBuf,
    meta: JournalMeta,
    /// Rows so far: the next row gets `rows + 1`.
    rows: u64,
    /// What the last pass over the records found to drop on resume, for its
    /// `retry_failed` flag: saves [`Journal::prepare_resume`] a second pass.
    survey: Option<(bool, Survey)>,
}

/// The rows a resume drops, found in a pass over the records.
#[derive(Clone, Copy, Debug, Default)]
struct Survey {
    /// The first output line to drop and the first line of its segment.
    first: Option<(u64, u64)>,
    unfinished: u64,
    failed: u64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("rows", &self.rows)
            .finish()
    }
}

/// Outcomes are stored a commit at a time: one `segments` row holds the compact records of
/// the outcomes of one group commit (output lines `first_seq ..= first_seq + count - 1`),
/// and the matching `segment_lines` row their output lines, one after another, as one LZ4
/// block of `bytes` bytes. Per outcome that is a few dozen bytes appended to a buffer
/// rather than an SQLite row (measured: a row per outcome cost 18% more client CPU than no
/// journal), and everything a resume reads (which lines are done) is in the small records,
/// never in the large lines. The lines are compressed because SQLite writes every byte
/// twice (to the WAL, then to the database at a checkpoint): JSON responses shrink several
/// times, and LZ4 costs less than the writes it saves.
const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE segments (
    first_seq INTEGER PRIMARY KEY,
    count INTEGER NOT NULL,
    entries BLOB NOT NULL
);
CREATE TABLE segment_lines (
    first_seq INTEGER PRIMARY KEY,
    bytes INTEGER NOT NULL,
    lines BLOB NOT NULL
);
";

/// One outcome's record as stored (everything but its output line).
#[derive(Clone, Debug, PartialEq)]
struct Record {
    line: u64,
    attempts: u32,
    final_: bool,
    succeeded: bool,
    kind: Option<ErrorKind>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    cost_usd: Option<f64>,
    /// Bytes of the output line, newline included.
    line_len: u32,
    custom_id: String,
    message: Option<String>,
}

const NONE_U64: u64 = u64::MAX;

impl Record {
    fn of(e: &Entry) -> Record {
        Record {
            line: e.line,
            attempts: e.attempts,
            final_: e.is_final(),
            succeeded: e.status == Status::Succeeded,
            kind: e.error_kind,
            prompt_tokens: e.prompt_tokens,
            completion_tokens: e.completion_tokens,
            cost_usd: e.cost_usd,
            line_len: e.output.len() as u32,
            custom_id: e.custom_id.clone(),
            message: e.error_message.clone(),
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.line.to_le_bytes());
        out.extend_from_slice(&self.attempts.to_le_bytes());
        out.push(u8::from(self.final_) | (u8::from(self.succeeded) << 1));
        out.extend_from_slice(&self.prompt_tokens.unwrap_or(NONE_U64).to_le_bytes());
        out.extend_from_slice(&self.completion_tokens.unwrap_or(NONE_U64).to_le_bytes());
        out.extend_from_slice(&self.cost_usd.unwrap_or(f64::NAN).to_le_bytes());
        out.extend_from_slice(&self.line_len.to_le_bytes());
        let kind = self.kind.map_or("", ErrorKind::as_str);
        put_str(out, kind);
        put_str(out, &self.custom_id);
        put_str(out, self.message.as_deref().unwrap_or(""));
    }

    /// Decodes the records of a segment.
    fn decode_all(mut b: &[u8]) -> Option<Vec<Record>> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let line = u64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
            let attempts = u32::from_le_bytes(take(&mut b, 4)?.try_into().ok()?);
            let flags = take(&mut b, 1)?[0];
            let prompt = u64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
            let completion = u64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
            let cost = f64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
            let line_len = u32::from_le_bytes(take(&mut b, 4)?.try_into().ok()?);
            let kind = get_str(&mut b)?;
            let custom_id = get_str(&mut b)?;
            let message = get_str(&mut b)?;
            out.push(Record {
                line,
                attempts,
                final_: flags & 1 != 0,
                succeeded: flags & 2 != 0,
                kind: if kind.is_empty() {
                    None
                } else {
                    Some(kind_from_str(&kind)?)
                },
                prompt_tokens: (prompt != NONE_U64).then_some(prompt),
                completion_tokens: (completion != NONE_U64).then_some(completion),
                cost_usd: (!cost.is_nan()).then_some(cost),
                line_len,
                custom_id,
                message: (!message.is_empty()).then_some(message),
            });
        }
        Some(out)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Some(head)
}

fn get_str(b: &mut &[u8]) -> Option<String> {
    let n = u32::from_le_bytes(take(b, 4)?.try_into().ok()?) as usize;
    String::from_utf8(take(b, n)?.to_vec()).ok()
}

/// A stored segment, decoded.
struct Segment {
    first_seq: u64,
    records: Vec<Record>,
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(())
}

impl Journal {
    /// Creates a new journal at `path`, which must not exist.
    pub fn create(path: &Path, meta: JournalMeta) -> Result<Journal, JournalError> {
        let err = sqlite(path);
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sqlite(path))?;
        let made = (|| {
            configure(&conn)?;
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(SCHEMA)?;
            let mut put = tx.prepare("INSERT INTO meta (key, value) VALUES (?1, ?2)")?;
            put.execute(params!["schema_version", SCHEMA_VERSION.to_string()])?;
            put.execute(params![
                "run",
                serde_json::to_string(&meta).expect("meta serialises")
            ])?;
            drop(put);
            tx.commit()
        })();
        made.map_err(err)?;
        Ok(Journal {
            conn,
            path: path.to_path_buf(),
            meta,
            rows: 0,
            survey: None,
        })
    }

    /// Opens an existing journal for writing, checking its format.
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        Self::open_with(path, false)
    }

    /// Opens an existing journal without changing it (for `sluice status`).
    pub fn open_read_only(path: &Path) -> Result<Journal, JournalError> {
        Self::open_with(path, true)
    }

    fn open_with(path: &Path, read_only: bool) -> Result<Journal, JournalError> {
        if !path.is_file() {
            return Err(JournalError::Io(io::Error::new(
                io::ErrorKind::NotFound,
                format!("journal {} does not exist", path.display()),
            )));
        }
        let corrupt = |reason: String| JournalError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let flags = if read_only {
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX
        };
        let conn = Connection::open_with_flags(path, flags).map_err(sqlite(path))?;
        if !read_only {
            configure(&conn).map_err(|e| corrupt(e.to_string()))?;
        }
        let version: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| corrupt(e.to_string()))?;
        let version = version.ok_or_else(|| corrupt("it has no format version".into()))?;
        let found: u32 = version
            .parse()
            .map_err(|_| corrupt(format!("format version {version:?} is not a number")))?;
        let run: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'run'", [], |r| r.get(0))
            .optional()
            .map_err(|e| corrupt(e.to_string()))?;
        let run = run.ok_or_else(|| corrupt("it has no run record".into()))?;
        if found != SCHEMA_VERSION {
            let written_by = serde_json::from_str::<serde_json::Value>(&run)
                .ok()
                .and_then(|v| v["created_by"].as_str().map(str::to_string))
                .unwrap_or_else(|| "unknown".into());
            return Err(JournalError::Version {
                path: path.to_path_buf(),
                found,
                written_by,
            });
        }
        let meta: JournalMeta = serde_json::from_str(&run)
            .map_err(|e| corrupt(format!("its run record cannot be read: {e}")))?;
        // The tables this version writes must be there. (No full integrity check: it reads
        // the whole file, seconds for a million outcomes; damage met later is reported as
        // an error anyway.)
        for table in ["segments", "segment_lines"] {
            let n: i64 = conn
                .query_row(
                    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                    params![table],
                    |r| r.get(0),
                )
                .map_err(|e| corrupt(e.to_string()))?;
            if n != 1 {
                return Err(corrupt(format!("it has no `{table}` table")));
            }
        }
        let rows = max_seq(&conn).map_err(|e| corrupt(e.to_string()))?;
        Ok(Journal {
            conn,
            path: path.to_path_buf(),
            meta,
            rows,
            survey: None,
        })
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the journal records about its run.
    pub fn meta(&self) -> &JournalMeta {
        &self.meta
    }

    /// Output lines (rows) recorded.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Records the input path and output path of this session (they may move between
    /// sessions; the fingerprint is what must not change).
    pub fn update_paths(
        &mut self,
        input_path: &str,
        output_path: &str,
    ) -> Result<(), JournalError> {
        self.meta.input_path = input_path.to_string();
        self.meta.output_path = output_path.to_string();
        let json = serde_json::to_string(&self.meta).expect("meta serialises");
        self.conn
            .execute(
                "UPDATE meta SET value = ?1 WHERE key = 'run'",
                params![json],
            )
            .map_err(sqlite(&self.path))?;
        Ok(())
    }

    /// Commits `entries` in one transaction, numbered after the rows already there: the
    /// caller writes their output lines, in this order, only after this returns.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), JournalError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut records = Vec::with_capacity(entries.len() * 64);
        let mut lines = Vec::with_capacity(entries.iter().map(|e| e.output.len()).sum());
        for e in entries {
            Record::of(e).encode(&mut records);
            lines.extend_from_slice(&e.output);
        }
        let path = self.path.clone();
        // BEGIN and COMMIT as cached statements: rusqlite's transactions prepare them again
        // each time, a tenth of a commit's cost in a paced run (one small commit per tick).
        let conn = &self.conn;
        conn.prepare_cached("BEGIN")
            .and_then(|mut s| s.execute([]))
            .map_err(sqlite(&path))?;
        let written = insert_segment(conn, self.rows + 1, entries.len() as u64, &records, &lines)
            .and_then(|()| conn.prepare_cached("COMMIT")?.execute([]).map(drop));
        if let Err(e) = written {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(sqlite(&path)(e));
        }
        self.rows += entries.len() as u64;
        self.survey = None;
        Ok(())
    }

    /// Every segment from the one holding output line `seq` on, in order.
    fn segments_from(&self, seq: u64) -> Result<Vec<Segment>, JournalError> {
        let mut out = Vec::new();
        self.each_segment_from(seq, |s| {
            out.push(s);
            Ok(())
        })?;
        Ok(out)
    }

    fn each_segment_from(
        &self,
        seq: u64,
        mut f: impl FnMut(Segment) -> Result<(), JournalError>,
    ) -> Result<(), JournalError> {
        let err = || sqlite(&self.path);
        let mut q = self
            .conn
            .prepare(
                "SELECT first_seq, entries FROM segments WHERE first_seq + count > ?1 ORDER BY first_seq",
            )
            .map_err(err())?;
        let mut rows = q.query(params![seq as i64]).map_err(err())?;
        while let Some(r) = rows.next().map_err(err())? {
            let first_seq = r.get::<_, i64>(0).map_err(err())? as u64;
            let blob = r
                .get_ref(1)
                .map_err(err())?
                .as_blob()
                .map_err(|e| err()(e.into()))?;
            let records = Record::decode_all(blob).ok_or_else(|| JournalError::Corrupt {
                path: self.path.clone(),
                reason: format!("the records of the outcomes from line {first_seq} cannot be read"),
            })?;
            f(Segment { first_seq, records })?;
        }
        Ok(())
    }

    /// Drops the rows whose requests must be sent again (not final; with `retry_failed`
    /// also transient failures) and renumbers the rest from the first dropped one, in one
    /// transaction. Then [`repair_output`] brings the output in line.
    pub fn prepare_resume(&mut self, retry_failed: bool) -> Result<ResumePlan, JournalError> {
        let survey = match self.survey {
            Some((flag, survey)) if flag == retry_failed => survey,
            _ => {
                let mut survey = Survey::default();
                self.walk(retry_failed, &mut survey, |_, _| {})?;
                survey
            }
        };
        let drop_it = |r: &Record| dropped_on_resume(r, retry_failed);
        let mut plan = ResumePlan {
            requeued_unfinished: survey.unfinished,
            requeued_failed: survey.failed,
            ..ResumePlan::default()
        };
        let first = survey.first;
        if let Some((first_dropped, segment_start)) = first {
            let path = self.path.clone();
            let segments = self.segments_from(segment_start)?;
            let tx = self.conn.unchecked_transaction().map_err(sqlite(&path))?;
            let mut next = segment_start;
            for s in segments {
                let (bytes, packed): (i64, Vec<u8>) = tx
                    .query_row(
                        "SELECT bytes, lines FROM segment_lines WHERE first_seq = ?1",
                        params![s.first_seq as i64],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .map_err(sqlite(&path))?;
                let lines = unpack_lines(&path, s.first_seq, bytes, &packed)?;
                tx.execute(
                    "DELETE FROM segments WHERE first_seq = ?1",
                    params![s.first_seq as i64],
                )
                .map_err(sqlite(&path))?;
                tx.execute(
                    "DELETE FROM segment_lines WHERE first_seq = ?1",
                    params![s.first_seq as i64],
                )
                .map_err(sqlite(&path))?;
                let mut records = Vec::new();
                let mut kept_lines = Vec::new();
                let mut count = 0u64;
                let mut at = 0usize;
                for r in &s.records {
                    let end = at + r.line_len as usize;
                    if !drop_it(r) {
                        r.encode(&mut records);
                        kept_lines.extend_from_slice(&lines[at..end]);
                        count += 1;
                    }
                    at = end;
                }
                if count > 0 {
                    insert_segment(&tx, next, count, &records, &kept_lines)
                        .map_err(sqlite(&path))?;
                    next += count;
                }
            }
            tx.commit().map_err(sqlite(&path))?;
            plan.first_changed_seq = Some(first_dropped);
        }
        self.rows = max_seq(&self.conn).map_err(sqlite(&self.path))?;
        self.survey = None;
        plan.kept = self.rows;
        Ok(plan)
    }

    /// Input lines with a final outcome; with `retry_failed`, less transient failures.
    pub fn done_lines(&mut self, retry_failed: bool) -> Result<LineSet, JournalError> {
        let mut set = LineSet::default();
        let mut survey = Survey::default();
        self.walk(retry_failed, &mut survey, |line, _| set.insert(line))?;
        self.survey = Some((retry_failed, survey));
        Ok(set)
    }

    /// `custom_id`s with a final outcome (for a resume whose input changed); with
    /// `retry_failed`, less transient failures.
    pub fn done_ids(&mut self, retry_failed: bool) -> Result<HashSet<String>, JournalError> {
        let mut ids = HashSet::new();
        let mut survey = Survey::default();
        self.walk(retry_failed, &mut survey, |_, id| {
            ids.insert(id.to_string());
        })?;
        self.survey = Some((retry_failed, survey));
        Ok(ids)
    }

    /// One pass over every record: `done` gets each request that stays done, `survey`
    /// what a resume drops.
    fn walk(
        &self,
        retry_failed: bool,
        survey: &mut Survey,
        mut done: impl FnMut(u64, &str),
    ) -> Result<(), JournalError> {
        self.each_segment_from(0, |s| {
            for (i, r) in s.records.iter().enumerate() {
                if dropped_on_resume(r, retry_failed) {
                    if r.final_ {
                        survey.failed += 1;
                    } else {
                        survey.unfinished += 1;
                    }
                    if survey.first.is_none() {
                        survey.first = Some((s.first_seq + i as u64, s.first_seq));
                    }
                } else {
                    done(r.line, &r.custom_id);
                }
            }
            Ok(())
        })
    }

    /// Bytes of output lines `1..=seq`.
    pub fn bytes_through(&self, seq: u64) -> Result<u64, JournalError> {
        let err = || sqlite(&self.path);
        // Whole segments by the length of their lines, then the records of the one that
        // holds `seq`.
        let whole: i64 = self
            .conn
            .query_row(
                "SELECT COALESCE(SUM(l.bytes), 0) FROM segments s JOIN segment_lines l USING (first_seq)
                 WHERE s.first_seq + s.count - 1 <= ?1",
                params![seq as i64],
                |r| r.get(0),
            )
            .map_err(err())?;
        let mut bytes = whole as u64;
        if let Some(s) = self.segments_from(seq)?.into_iter().next() {
            // Only a segment that `seq` ends inside; one ending at `seq` was summed whole.
            if s.first_seq <= seq && s.first_seq + s.records.len() as u64 - 1 > seq {
                let n = (seq - s.first_seq + 1) as usize;
                bytes += s
                    .records
                    .iter()
                    .take(n)
                    .map(|r| u64::from(r.line_len))
                    .sum::<u64>();
            }
        }
        Ok(bytes)
    }

    /// The `custom_id` of output line `seq`.
    pub fn custom_id_at(&self, seq: u64) -> Result<Option<String>, JournalError> {
        let mut found = None;
        if let Some(s) = self.segments_from(seq)?.into_iter().next() {
            if seq >= s.first_seq {
                found = s
                    .records
                    .get((seq - s.first_seq) as usize)
                    .map(|r| r.custom_id.clone());
            }
        }
        Ok(found)
    }

    /// Calls `f` with the output line of every row from `seq` on, in order.
    pub fn for_each_output_from(
        &self,
        seq: u64,
        mut f: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<(), JournalError> {
        let err = || sqlite(&self.path);
        let seq = seq.max(1);
        let mut q = self
            .conn
            .prepare(
                "SELECT s.first_seq, s.entries, l.bytes, l.lines FROM segments s JOIN segment_lines l USING (first_seq)
                 WHERE s.first_seq + s.count > ?1 ORDER BY s.first_seq",
            )
            .map_err(err())?;
        let mut rows = q.query(params![seq as i64]).map_err(err())?;
        while let Some(r) = rows.next().map_err(err())? {
            let first_seq = r.get::<_, i64>(0).map_err(err())? as u64;
            let records = r
                .get_ref(1)
                .map_err(err())?
                .as_blob()
                .map_err(|e| err()(e.into()))
                .map(Record::decode_all)?
                .ok_or_else(|| JournalError::Corrupt {
                    path: self.path.clone(),
                    reason: format!(
                        "the records of the outcomes from line {first_seq} cannot be read"
                    ),
                })?;
            let bytes = r.get::<_, i64>(2).map_err(err())?;
            let packed = r
                .get_ref(3)
                .map_err(err())?
                .as_blob()
                .map_err(|e| err()(e.into()))?;
            let lines = unpack_lines(&self.path, first_seq, bytes, packed)?;
            let mut at = 0usize;
            for (i, rec) in records.iter().enumerate() {
                let end = (at + rec.line_len as usize).min(lines.len());
                if first_seq + i as u64 >= seq {
                    f(&lines[at..end])?;
                }
                at = end;
            }
        }
        Ok(())
    }

    /// Where the run stands.
    pub fn status(&self) -> Result<JournalStatus, JournalError> {
        let mut s = JournalStatus {
            requests: self.meta.input.requests,
            ..JournalStatus::default()
        };
        let mut errors: Vec<ErrorCount> = Vec::new();
        self.each_segment_from(0, |seg| {
            for r in &seg.records {
                s.attempts += u64::from(r.attempts);
                if r.final_ {
                    s.done += 1;
                    if r.succeeded {
                        s.succeeded += 1;
                    } else {
                        s.failed += 1;
                    }
                }
                s.prompt_tokens += r.prompt_tokens.unwrap_or(0);
                s.completion_tokens += r.completion_tokens.unwrap_or(0);
                s.cost_usd += r.cost_usd.unwrap_or(0.0);
                if let Some(kind) = r.kind {
                    let example = r.message.clone().unwrap_or_default();
                    match errors.iter_mut().find(|e| e.kind == kind.as_str()) {
                        Some(e) => {
                            e.count += 1;
                            e.example = example;
                        }
                        None => errors.push(ErrorCount {
                            kind: kind.as_str().to_string(),
                            count: 1,
                            example,
                        }),
                    }
                }
            }
            Ok(())
        })?;
        errors.sort_by(|a, b| b.count.cmp(&a.count).then(a.kind.cmp(&b.kind)));
        s.errors = errors;
        s.pending = s.requests.saturating_sub(s.done);
        Ok(s)
    }
}

/// Whether a resume sends the request of this record again: it never ended (stopped, not
/// attempted, refused for quota), or it failed for a transient reason and `retry_failed`.
fn dropped_on_resume(r: &Record, retry_failed: bool) -> bool {
    !r.final_ || (retry_failed && !r.succeeded && r.kind.is_some_and(is_transient))
}

fn insert_segment(
    tx: &Connection,
    first_seq: u64,
    count: u64,
    records: &[u8],
    lines: &[u8],
) -> rusqlite::Result<()> {
    tx.prepare_cached("INSERT INTO segments (first_seq, count, entries) VALUES (?1, ?2, ?3)")?
        .execute(params![first_seq as i64, count as i64, records])?;
    let packed = lz4_flex::block::compress(lines);
    tx.prepare_cached("INSERT INTO segment_lines (first_seq, bytes, lines) VALUES (?1, ?2, ?3)")?
        .execute(params![first_seq as i64, lines.len() as i64, packed])?;
    Ok(())
}

/// The output lines of the segment from `first_seq`, stored as an LZ4 block of `bytes`.
fn unpack_lines(
    path: &Path,
    first_seq: u64,
    bytes: i64,
    packed: &[u8],
) -> Result<Vec<u8>, JournalError> {
    usize::try_from(bytes)
        .ok()
        .and_then(|n| {
            lz4_flex::block::decompress(packed, n)
                .ok()
                .filter(|l| l.len() == n)
        })
        .ok_or_else(|| JournalError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("the output lines from line {first_seq} cannot be read"),
        })
}

fn max_seq(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT COALESCE(MAX(first_seq + count - 1), 0) FROM segments",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as u64)
}

/// What [`repair_output`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutputRepair {
    /// Complete lines kept from the existing output.
    pub kept: u64,
    /// Bytes of a torn last line that were cut.
    pub torn_bytes: u64,
    /// Lines cut because their rows were dropped or renumbered.
    pub cut: u64,
    /// Lines written from the journal.
    pub restored: u64,
    /// The output did not match the journal and was rebuilt from it.
    pub rebuilt: bool,
}

/// Brings the output file in line with the journal: it keeps the lines it shares with the
/// journal's rows (all lines before `first_changed_seq`, and the output is a prefix of the
/// rows), cuts a torn last line and everything after, and appends the rows it lacks. When
/// the file does not match the journal (a different output, edited by hand), it is rebuilt
/// from the journal, which holds every line.
pub fn repair_output(
    journal: &Journal,
    path: &Path,
    first_changed_seq: Option<u64>,
) -> Result<OutputRepair, JournalError> {
    let mut report = OutputRepair::default();
    let rows = journal.rows();
    let keep_at_most = first_changed_seq.map_or(rows, |s| s - 1).min(rows);
    let file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    let (keep_lines, keep_bytes, file_len) = match &file {
        None => (0, 0, 0),
        Some(f) => {
            let len = f.metadata()?.len();
            // The journal knows each line's length: when the file holds at least that many
            // bytes and a line ends there, it need not be read (checked below by the last
            // kept line's custom_id).
            let expected = journal.bytes_through(keep_at_most)?;
            if len >= expected && (expected == 0 || byte_at(f, expected - 1)? == b'\n') {
                (keep_at_most, expected, len)
            } else {
                let (lines, end) = complete_lines(f, keep_at_most)?;
                (lines, end, len)
            }
        }
    };
    // The last kept line must be the journal's row of that number.
    let matches = match &file {
        None => true,
        Some(f) if keep_lines > 0 => {
            let last = last_line(f, keep_bytes)?;
            let id = serde_json::from_slice::<serde_json::Value>(&last)
                .ok()
                .and_then(|v| v["custom_id"].as_str().map(str::to_string));
            id.is_some() && id == journal.custom_id_at(keep_lines)?
        }
        Some(_) => true,
    };
    let (mut writer, from) = if matches {
        let f = match file {
            Some(f) => f,
            None => File::create(path)?,
        };
        if file_len > keep_bytes {
            // What follows the kept lines: a torn line, or lines of dropped rows.
            let tail = tail_lines(&f, keep_bytes)?;
            report.cut = tail.0;
            report.torn_bytes = tail.1;
            f.set_len(keep_bytes)?;
        }
        report.kept = keep_lines;
        let mut f = f;
        f.seek(SeekFrom::Start(keep_bytes))?;
        (BufWriter::new(f), keep_lines + 1)
    } else {
        report.rebuilt = true;
        (BufWriter::new(File::create(path)?), 1)
    };
    journal.for_each_output_from(from, |line| {
        report.restored += 1;
        writer.write_all(line)
    })?;
    writer.flush()?;
    writer.get_ref().sync_data()?;
    Ok(report)
}

fn byte_at(f: &File, at: u64) -> io::Result<u8> {
    let mut f = f;
    f.seek(SeekFrom::Start(at))?;
    let mut b = [0u8; 1];
    f.read_exact(&mut b)?;
    Ok(b[0])
}

/// The number of complete (newline-ended) lines at the start of `f`, up to `max`, and
/// the byte offset just past the last of them.
fn complete_lines(f: &File, max: u64) -> io::Result<(u64, u64)> {
    let mut f = f;
    f.seek(SeekFrom::Start(0))?;
    let mut lines = 0u64;
    let mut end = 0u64;
    let mut base = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while lines < max {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        for nl in memchr::memchr_iter(b'\n', &buf[..n]) {
            lines += 1;
            end = base + nl as u64 + 1;
            if lines == max {
                break;
            }
        }
        base += n as u64;
    }
    Ok((lines, end))
}

/// The line that ends at byte `end` (exclusive of its newline).
fn last_line(f: &File, end: u64) -> io::Result<Vec<u8>> {
    let mut f = f;
    let mut back = 4096u64;
    loop {
        let start = end.saturating_sub(back);
        f.seek(SeekFrom::Start(start))?;
        let mut buf = vec![0u8; (end - start) as usize];
        f.read_exact(&mut buf)?;
        let body = &buf[..buf.len().saturating_sub(1)];
        if let Some(p) = memchr::memrchr(b'\n', body) {
            return Ok(body[p + 1..].to_vec());
        }
        if start == 0 {
            return Ok(body.to_vec());
        }
        back *= 4;
    }
}

/// Lines after byte `from` (complete ones) and the bytes of a torn last one.
fn tail_lines(f: &File, from: u64) -> io::Result<(u64, u64)> {
    let mut f = f;
    f.seek(SeekFrom::Start(from))?;
    let mut rest = Vec::new();
    f.read_to_end(&mut rest)?;
    let complete = memchr::memchr_iter(b'\n', &rest).count() as u64;
    let torn = memchr::memrchr(b'\n', &rest).map_or(rest.len(), |p| rest.len() - p - 1) as u64;
    Ok((complete, torn))
}

/// Hashes a file's bytes as they stream past (for [`InputFingerprint`]).
#[derive(Default)]
pub struct Fingerprinter {
    hasher: blake3::Hasher,
    bytes: u64,
}

impl Fingerprinter {
    /// Feeds a chunk of the file.
    pub fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        self.bytes += chunk.len() as u64;
    }

    /// The fingerprint of a file of `requests` requests.
    pub fn finish(&self, requests: u64) -> InputFingerprint {
        InputFingerprint {
            blake3: self.hasher.finalize().to_hex().to_string(),
            bytes: self.bytes,
            requests,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> JournalMeta {
        JournalMeta {
            input: InputFingerprint {
                blake3: "00".into(),
                bytes: 1,
                requests: 6,
            },
            input_path: "in.jsonl".into(),
            output_path: "out.jsonl".into(),
            settings: serde_json::json!({}),
            created_by: "test".into(),
            created_at: "now".into(),
        }
    }

    fn entry(line: u64, kind: Option<ErrorKind>) -> Entry {
        Entry {
            line,
            custom_id: format!("r{line}"),
            status: if kind.is_some() {
                Status::Failed
            } else {
                Status::Succeeded
            },
            error_kind: kind,
            error_message: kind.map(|k| k.to_string()),
            attempts: 1,
            prompt_tokens: None,
            completion_tokens: None,
            cost_usd: None,
            output: format!("{{\"custom_id\":\"r{line}\"}}\n").into_bytes(),
        }
    }

    #[test]
    fn output_lines_are_stored_compressed_and_damage_to_them_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::create(&path, meta()).unwrap();
        let mut entries: Vec<Entry> = (1..=6).map(|l| entry(l, None)).collect();
        for e in &mut entries {
            e.output = format!(
                "{{\"custom_id\":\"r{}\",\"text\":\"{}\"}}\n",
                e.line,
                "ab".repeat(500)
            )
            .into_bytes();
        }
        j.append(&entries).unwrap();
        let raw: usize = entries.iter().map(|e| e.output.len()).sum();
        let stored: i64 = j
            .conn
            .query_row("SELECT length(lines) FROM segment_lines", [], |r| r.get(0))
            .unwrap();
        assert!(
            (stored as usize) < raw / 4,
            "{stored} bytes stored for {raw}"
        );
        assert_eq!(j.bytes_through(6).unwrap(), raw as u64);
        let first_two = (entries[0].output.len() + entries[1].output.len()) as u64;
        assert_eq!(j.bytes_through(2).unwrap(), first_two);
        let mut back = Vec::new();
        j.for_each_output_from(1, |l| {
            back.extend_from_slice(l);
            Ok(())
        })
        .unwrap();
        let all: Vec<u8> = entries.iter().flat_map(|e| e.output.clone()).collect();
        assert_eq!(back, all);

        j.conn
            .execute("UPDATE segment_lines SET lines = x'00ff00ff'", [])
            .unwrap();
        let err = j.for_each_output_from(1, |_| Ok(())).unwrap_err();
        assert!(
            matches!(&err, JournalError::Corrupt { reason, .. } if reason.contains("line 1")),
            "{err}"
        );
    }

    #[test]
    fn line_set() {
        let mut s = LineSet::default();
        for l in [1, 64, 65, 1_000_000, 64] {
            s.insert(l);
        }
        assert_eq!(s.len(), 4);
        assert!(
            s.contains(64) && s.contains(1_000_000) && !s.contains(2) && !s.contains(5_000_000)
        );
    }

    #[test]
    fn resume_drops_unfinished_rows_renumbers_the_rest_and_repairs_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::create(&path, meta()).unwrap();
        let entries = vec![
            entry(1, None),
            entry(2, Some(ErrorKind::Stopped)),
            entry(3, None),
            entry(4, Some(ErrorKind::ServerError)),
            entry(5, Some(ErrorKind::NotAttempted)),
            entry(6, Some(ErrorKind::BadRequest)),
        ];
        j.append(&entries).unwrap();
        let out = dir.path().join("out");
        let all: Vec<u8> = entries.iter().flat_map(|e| e.output.clone()).collect();
        std::fs::write(&out, &all).unwrap();
        drop(j);

        let mut j = Journal::open(&path).unwrap();
        assert_eq!(j.rows(), 6);
        let plan = j.prepare_resume(true).unwrap();
        assert_eq!(plan.requeued_unfinished, 2);
        assert_eq!(plan.requeued_failed, 1);
        assert_eq!(plan.first_changed_seq, Some(2));
        assert_eq!(plan.kept, 3);
        let done: Vec<u64> = (1..=6)
            .filter(|&l| j.done_lines(false).unwrap().contains(l))
            .collect();
        assert_eq!(done, vec![1, 3, 6]);
        assert_eq!(j.custom_id_at(2).unwrap().as_deref(), Some("r3"));
        assert_eq!(j.custom_id_at(3).unwrap().as_deref(), Some("r6"));

        let repair = repair_output(&j, &out, plan.first_changed_seq).unwrap();
        assert_eq!(repair.kept, 1);
        assert_eq!(repair.cut, 5);
        assert_eq!(repair.restored, 2);
        assert!(!repair.rebuilt);
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{\"custom_id\":\"r1\"}\n{\"custom_id\":\"r3\"}\n{\"custom_id\":\"r6\"}\n"
        );
        // New rows follow on from the renumbered ones.
        j.append(&[entry(2, None)]).unwrap();
        assert_eq!(j.custom_id_at(4).unwrap().as_deref(), Some("r2"));
        let s = j.status().unwrap();
        assert_eq!((s.done, s.succeeded, s.failed, s.pending), (4, 3, 1, 2));
    }

    #[test]
    fn a_torn_tail_is_cut_and_missing_lines_restored() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(&dir.path().join("j"), meta()).unwrap();
        let entries: Vec<Entry> = (1..=4).map(|l| entry(l, None)).collect();
        j.append(&entries).unwrap();
        let out = dir.path().join("out");
        let mut text: Vec<u8> = entries[..2].iter().flat_map(|e| e.output.clone()).collect();
        text.extend_from_slice(b"{\"custom_id\":\"r");
        std::fs::write(&out, &text).unwrap();
        let r = repair_output(&j, &out, None).unwrap();
        assert_eq!(
            (r.kept, r.torn_bytes, r.restored, r.rebuilt),
            (2, 15, 2, false)
        );
        let all: Vec<u8> = entries.iter().flat_map(|e| e.output.clone()).collect();
        assert_eq!(std::fs::read(&out).unwrap(), all);
        // Idempotent.
        let r = repair_output(&j, &out, None).unwrap();
        assert_eq!((r.kept, r.restored), (4, 0));
        assert_eq!(std::fs::read(&out).unwrap(), all);
    }
}
