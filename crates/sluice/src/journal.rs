//! The durable record of a run: every outcome written to the output is in the journal
//! first (invariant 7), so a crashed or interrupted run resumes with nothing lost and
//! nothing paid twice.
//!
//! # Layout
//!
//! A journal is two files:
//!
//! * the SQLite database (WAL) at its path: `meta` (the schema version, the input's
//!   [`InputFingerprint`], the settings that change what a request means, when it was
//!   made) and `segments`, the records of the outcomes, one per output line (`seq` being
//!   the line's number in the output): input line, `custom_id`, status, error kind,
//!   attempts, usage, cost and the length of the output line, stored a checkpoint at a
//!   time (one SQLite row per checkpoint);
//! * the **outcome log** beside it (`PATH-log`): a file of chunks, each the records of one
//!   group of outcomes and their output lines, with a CRC, of rows one after another. An
//!   outcome is journaled when its chunk is written to the log (one `writev()`, which
//!   survives a killed process); only then are the chunk's lines written to the output.
//!   About once a second, or once the log holds a few MiB, the output is flushed, the
//!   records of the logged outcomes are committed to SQLite in one transaction, and the
//!   log is emptied: the output now holds those lines. A run reuses the log's file (the
//!   next chunks are written over it from its start, and the first of earlier rows after
//!   them ends it), and cuts it when it ends.
//!
//! So an output line lives in the log until the output has it, and the journal does not
//! keep a second copy of the output (it did until schema 2: a third of the output's size
//! again, and the compression and SQLite writes cost about as much client CPU as the rest
//! of the journal together). Rows of requests the run stopped before finishing
//! (`not_attempted`, `stopped`, and the one refused for exhausted quota) are *not final*:
//! their lines are in the output so every request has one, but a resume sends them again.
//!
//! A run holds its journal ([`hold`]: an exclusive `flock` on the database file, taken
//! before anything is read or written): the same job started twice is refused, not run
//! twice from one journal. `sluice status` reads without it.
//!
//! # Resume
//!
//! [`Journal::open`] replays the log: its records replace the database's rows from the
//! log's first row on (a crash between a checkpoint's commit and the emptying of the log
//! leaves rows that are in both). The output holds, by construction, every row before the
//! log's first plus a prefix of the log's rows (maybe with a torn last line).
//! [`Journal::check_output`] verifies the first part; [`Journal::resume`] drops the rows
//! that are not final (and, with `retry_failed`, transient failures), renumbers the rest,
//! and rewrites the output from the first changed row on. A compaction writes the new
//! rows and their lines as a new log first (to a temporary file, renamed over the log),
//! so a crash in the middle of it is replayed like any other. Requests with a final row are
//! skipped; every other request is sent again.
//!
//! Neither file is `fsync`ed per group: a `write()` survives a killed process, and a
//! power loss may lose the last outcomes (their requests are sent again) or, rarely,
//! output lines the database already recorded ([`Journal::check_output`] says which;
//! `--force` sends those again).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::outcome::{ErrorKind, Outcome, Status};

/// The journal format this build reads and writes.
pub const SCHEMA_VERSION: u32 = 3;

/// Why a journal could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// SQLite failed.
    #[error("journal {path}: {sqlite}{}", disk_full_hint(sqlite))]
    Sqlite {
        /// The journal.
        path: PathBuf,
        /// What SQLite said (in the message, and not a `source()` as well: printed as a
        /// chain, it would be said twice, after the advice).
        sqlite: rusqlite::Error,
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
    /// The output lacks lines that only it held (deleted, cut short, or lost to a power
    /// failure): their requests were answered, but their outcomes are gone.
    #[error("the output {output} has {have} of the {expected} lines the journal {path} recorded as written to it: lines {} to {expected} are missing, and only the output held them. Restore the file, or pass --force to send those requests again (they were paid for once already)", have + 1)]
    OutputMissing {
        /// The journal.
        path: PathBuf,
        /// The output file.
        output: PathBuf,
        /// Lines of the output that match the journal.
        have: u64,
        /// Lines it should have.
        expected: u64,
    },
    /// The output is not this run's.
    #[error("the output {output} does not match the journal {path}: its line {line} is not the journal's ({reason}). Nothing was changed; point -o at the run's output, or start afresh with --fresh")]
    OutputMismatch {
        /// The journal.
        path: PathBuf,
        /// The output file.
        output: PathBuf,
        /// The first line found not to match.
        line: u64,
        /// How it differs.
        reason: String,
    },
    /// Another process (a run of the same job started twice) has the journal.
    #[error("journal {path} is in use by another sluice run; nothing was changed or sent. Wait for that run to end (or stop it with Ctrl-C), then run this again")]
    InUse {
        /// The journal.
        path: PathBuf,
    },
    /// Reading or writing the output file failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// `e`, saying what was being done to which file.
fn in_context(e: io::Error, what: &str, path: &Path) -> JournalError {
    JournalError::Io(io::Error::new(
        e.kind(),
        format!("{what} {}: {e}", path.display()),
    ))
}

/// A journal held by this process (see [`hold`]).
#[derive(Debug)]
pub struct Held(
    // Closed last: closing any descriptor of the file drops every `fcntl` lock this process
    // has on it, SQLite's included, so a journal closes its connection first.
    #[allow(dead_code)] File,
);

/// Takes the journal at `path` (its database, which must exist) for this process until
/// the returned [`Held`] is dropped or the process ends, however it ends: two runs of one
/// job at once would send the same requests twice and write over each other's log. An
/// exclusive `flock` on the database file, which SQLite's own locks (`fcntl`) do not see:
/// `sluice status` still reads a journal that a run holds. Not taken off Unix.
pub fn hold(path: &Path) -> Result<Held, JournalError> {
    let file = File::open(path).map_err(|e| in_context(e, "cannot open the journal", path))?;
    #[cfg(unix)]
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(JournalError::InUse {
                path: path.to_path_buf(),
            })
        }
        // A file system without `flock` (some network or FUSE mounts): the run goes on
        // unguarded rather than not at all.
        Err(std::fs::TryLockError::Error(e)) => tracing::warn!(
            "cannot lock the journal {} ({e}): a second run of this job at once would not be refused",
            path.display()
        ),
    }
    Ok(Held(file))
}

impl JournalError {
    /// Whether the disk or the file system failed (full, unreadable, not writable), rather
    /// than the journal being unusable or not this run's.
    pub fn is_io(&self) -> bool {
        match self {
            JournalError::Io(_) => true,
            JournalError::Sqlite { sqlite, .. } => sqlite_io(sqlite),
            _ => false,
        }
    }
}

/// Whether SQLite failed for the disk or the file system (full, unreadable, not
/// writable), not for what the file holds.
pub(crate) fn sqlite_io(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        e.sqlite_error_code(),
        Some(DiskFull | SystemIoFailure | CannotOpen | PermissionDenied | ReadOnly)
    )
}

/// What to do when SQLite found the disk full, or could not read or write it.
fn disk_full_hint(e: &rusqlite::Error) -> &'static str {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull) => {
            ". Free some space, then run the same command again: what the journal holds is kept"
        }
        Some(rusqlite::ErrorCode::SystemIoFailure) => {
            " (a full disk, or the file size limit, `ulimit -f`?). Run the same command again once the journal can be written: what it holds is kept"
        }
        _ => "",
    }
}

fn sqlite(path: &Path) -> impl FnOnce(rusqlite::Error) -> JournalError + '_ {
    move |sqlite| JournalError::Sqlite {
        path: path.to_path_buf(),
        sqlite,
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
    /// A resume went on with another input (`--force`): the rows' input lines may be those
    /// of an earlier input, so resumes skip requests by `custom_id`, not by line, from then
    /// on. (`input` is the latest input's fingerprint.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub by_custom_id: bool,
    /// Outcomes of requests that are not in `input`: those a forced resume's input left
    /// out (they were paid for and stay in the output). Not counted as done.
    #[serde(default, skip_serializing_if = "crate::outcome::is_zero")]
    pub orphans: u64,
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

/// Outcomes laid out as a chunk of the log holds them: their records in one buffer and
/// their output lines in another, each written once, as the outcomes come. Journaling them
/// ([`Journal::append`]) and writing the lines out ([`Chunk::lines`]) copy nothing more.
#[derive(Default)]
pub struct Chunk {
    records: Vec<u8>,
    lines: Vec<u8>,
    count: u32,
}

impl Chunk {
    /// Adds an outcome and its output line.
    pub fn push(&mut self, outcome: &Outcome) {
        let at = self.lines.len();
        outcome.write_json_line(&mut self.lines);
        let error = outcome.error.as_ref();
        RecordRef {
            line: outcome.line,
            attempts: outcome.attempts,
            final_: is_final(error.map(|e| e.kind)),
            succeeded: outcome.status == Status::Succeeded,
            kind: error.map(|e| e.kind),
            prompt_tokens: outcome.usage.map(|u| u.prompt_tokens),
            completion_tokens: outcome.usage.map(|u| u.completion_tokens),
            cost_usd: outcome.cost_usd,
            line_len: (self.lines.len() - at) as u32,
            custom_id: &outcome.custom_id,
            message: error.map(|e| e.message.as_str()),
        }
        .encode(&mut self.records);
        self.count += 1;
    }

    /// Adds an entry (its record and output line).
    pub fn push_entry(&mut self, e: &Entry) {
        RecordRef::of(e).encode(&mut self.records);
        self.lines.extend_from_slice(&e.output);
        self.count += 1;
    }

    /// The entries of `entries`, in order.
    pub fn of(entries: &[Entry]) -> Chunk {
        let mut c = Chunk::default();
        for e in entries {
            c.push_entry(e);
        }
        c
    }

    /// Outcomes held.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// How many of them are outcomes of requests that were sent (read back from their
    /// records: wanted only when journaling them failed).
    pub fn sent(&self) -> usize {
        Record::decode_all(&self.records)
            .map_or(0, |rs| rs.iter().filter(|r| r.attempts > 0).count())
    }

    /// Their output lines, in order.
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// Forgets them (keeping the buffers).
    pub fn clear(&mut self) {
        self.records.clear();
        self.lines.clear();
        self.count = 0;
    }
}

/// Whether an outcome of this error kind (none: a success) ends its request for good: not
/// one of those a stopping run leaves unsent, which a resume sends again.
pub fn is_final(kind: Option<ErrorKind>) -> bool {
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

/// What [`Journal::resume`] found and did.
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
    /// Requests of the input with a final outcome.
    pub done: u64,
    /// Final outcomes in all: `done` and the [`JournalMeta::orphans`].
    pub outcomes: u64,
    /// Of which, outcomes of requests no longer in the input ([`JournalMeta::orphans`]).
    pub orphans: u64,
    /// Of the outcomes, those that succeeded.
    pub succeeded: u64,
    /// Of the outcomes, those that failed.
    pub failed: u64,
    /// Requests not yet done: unsent, in flight at a crash, or stopped.
    pub pending: u64,
    /// Failures (final and not) by kind, with an example message each.
    pub errors: Vec<ErrorCount>,
    /// HTTP attempts recorded.
    pub attempts: u64,
    /// Input tokens of the requests sent (not of those answered from the cache or by an
    /// identical request).
    pub prompt_tokens: u64,
    /// Output tokens of the requests sent.
    pub completion_tokens: u64,
    /// Cost of the outcomes whose cost is known.
    pub cost_usd: f64,
    /// The most that attempts with no outcome here may have cost: those on the wire, or
    /// answered and not yet journaled, when a session with a budget was killed (a
    /// resume's budget counts it as spent), and those of a session running now. A bound
    /// (their worst case), not a bill.
    pub unrecorded_usd: f64,
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
    /// Rows whose records are committed to SQLite (`..= synced`); the rest are in the log
    /// and in `unsynced`.
    synced: u64,
    /// The outcome log (`None` when opened read-only).
    log: Option<File>,
    /// The first row whose output line the log holds (`rows + 1` when it is empty).
    log_first: u64,
    /// Records of rows `synced + 1 ..= rows`, encoded, for the next checkpoint.
    unsynced: Vec<u8>,
    /// Their output lines' bytes.
    unsynced_bytes: u64,
    /// Read-only: the log's records (of rows from `log_first`), which override SQLite's.
    overlay: Vec<Record>,
    /// What the last pass over the records found to drop on resume, for its
    /// `retry_failed` flag: saves [`Journal::resume`] a second pass.
    survey: Option<(bool, Survey)>,
    /// Where the log's valid part ends (the file may go on with chunks of earlier rows,
    /// see [`Journal::checkpoint_reusing_log`]), and to where it may grow before
    /// [`Journal::reserve`] looks at the disk's space again.
    log_end: u64,
    checked_to: u64,
    /// Whether space is still set aside ahead of the log (not where the file system
    /// cannot), and whether it could not be: the disk is nearly full.
    reserving: bool,
    space_low: bool,
    /// Tests: the free space [`Journal::reserve`] sees, instead of the disk's.
    #[cfg(all(test, target_os = "linux"))]
    free_space: Option<u64>,
    /// This process's hold on the journal (`None` read-only). Last, so dropped after
    /// `conn` (see [`Held`]).
    _held: Option<Held>,
}

/// Disk space set aside past the end of the outcome log once the disk has less than four
/// times this free, refreshed once less than half is left (Linux; `fallocate` with
/// `FALLOC_FL_KEEP_SIZE`, which the log's readers do not see). When it cannot be, the disk
/// is nearly full: [`Journal::space_low`] says so while at least half of this is still
/// there for the outcomes of the requests in flight, which were paid for and must not be
/// lost.
pub const LOG_RESERVE: u64 = 8 << 20;

/// The rows a resume drops, found in a pass over the records.
#[derive(Clone, Copy, Debug, Default)]
struct Survey {
    /// The first output line to drop and the first line of its segment.
    first: Option<(u64, u64)>,
    unfinished: u64,
    failed: u64,
}

impl Drop for Journal {
    /// Cuts the log to its valid part: what lies past it (the chunks of earlier rows of a
    /// reused log, the space set aside past the file's end) is given back, so a run that
    /// stopped on a nearly full disk leaves that room to the resume and to the rest of
    /// the system, and a finished run's log is empty.
    fn drop(&mut self) {
        if let Some(log) = &self.log {
            let _ = log.set_len(self.log_end);
        }
    }
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("rows", &self.rows)
            .field("synced", &self.synced)
            .field("log_first", &self.log_first)
            .finish()
    }
}

/// Records are stored a checkpoint at a time: one `segments` row holds the compact records
/// of the outcomes of output lines `first_seq ..= first_seq + count - 1`, whose lines are
/// `bytes` long together. Per outcome that is a few dozen bytes appended to a buffer rather
/// than an SQLite row (measured: a row per outcome cost 18% more client CPU than no
/// journal).
const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE segments (
    first_seq INTEGER PRIMARY KEY,
    count INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    entries BLOB NOT NULL
);
";

/// The outcome log of the journal at `path`.
pub fn log_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_os_string();
    p.push("-log");
    PathBuf::from(p)
}

/// A log chunk starts with this, then its first row (u64), its number of records (u32),
/// the bytes of the records (u32) and of the lines (u64), and a CRC-32 (u32) of those four
/// fields, the records and the lines; then the records, then the lines.
const LOG_MAGIC: &[u8; 4] = b"SLG3";
const LOG_HEADER: usize = 32;

fn log_header(first_seq: u64, count: u32, records_len: u32, lines_len: u64) -> [u8; LOG_HEADER] {
    let mut h = [0u8; LOG_HEADER];
    h[..4].copy_from_slice(LOG_MAGIC);
    h[4..12].copy_from_slice(&first_seq.to_le_bytes());
    h[12..16].copy_from_slice(&count.to_le_bytes());
    h[16..20].copy_from_slice(&records_len.to_le_bytes());
    h[20..28].copy_from_slice(&lines_len.to_le_bytes());
    h
}

/// Fills `buf`; `false` when the file ends first.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// A chunk's CRC, fed its header's fields: the caller adds the records and the lines.
fn chunk_crc(header: &[u8; LOG_HEADER]) -> crc32fast::Hasher {
    let mut h = crc32fast::Hasher::new();
    h.update(&header[4..28]);
    h
}

/// One chunk of the log, as read back: its records, and where its lines are in the file.
struct LogChunk {
    first_seq: u64,
    records: Vec<Record>,
    lines_at: u64,
}

/// What part of the log file [`read_log`] reads, and how.
#[derive(Clone, Copy)]
enum LogView {
    /// The whole file, which no one writes (a journal being opened).
    Whole,
    /// Its first bytes, as many as this journal knows to be its valid part.
    Upto(u64),
    /// The whole file, which a live run may be writing over from its start as it is read:
    /// chunks of later rows than the next are ones written after the reader went past the
    /// start, and end what it reads.
    Live,
}

/// Reads the log's chunks in order, checking each one's CRC, and returns them with the
/// length of the valid part: the first chunk that is short or does not check out (a write
/// cut by a crash) ends the log, as does one of rows before those already read (a chunk
/// written before the log was last reused, see [`Journal::checkpoint_reusing_log`]).
/// Otherwise chunks must follow one another row by row.
fn read_log(path: &Path, f: &File, view: LogView) -> Result<(Vec<LogChunk>, u64), JournalError> {
    let len = match view {
        LogView::Upto(n) => f.metadata()?.len().min(n),
        LogView::Whole | LogView::Live => f.metadata()?.len(),
    };
    let mut r = io::BufReader::with_capacity(1 << 16, f);
    r.seek(SeekFrom::Start(0))?;
    let mut chunks: Vec<LogChunk> = Vec::new();
    let mut at = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        if len - at < LOG_HEADER as u64 {
            break;
        }
        let mut h = [0u8; LOG_HEADER];
        // A live run's log may be emptied under a reader: a short read ends it.
        if !read_full(&mut r, &mut h)? {
            break;
        }
        if &h[..4] != LOG_MAGIC {
            break;
        }
        let first_seq = u64::from_le_bytes(h[4..12].try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(h[12..16].try_into().expect("4 bytes"));
        let records_len = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes"));
        let lines_len = u64::from_le_bytes(h[20..28].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(h[28..32].try_into().expect("4 bytes"));
        let body = u64::from(records_len).saturating_add(lines_len);
        if len - at - (LOG_HEADER as u64) < body {
            break;
        }
        let mut hasher = chunk_crc(&h);
        let mut records = vec![0u8; records_len as usize];
        if !read_full(&mut r, &mut records)? {
            break;
        }
        hasher.update(&records);
        let mut left = lines_len;
        let mut whole = true;
        while left > 0 && whole {
            let n = left.min(buf.len() as u64) as usize;
            whole = read_full(&mut r, &mut buf[..n])?;
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        if !whole || hasher.finalize() != crc {
            break;
        }
        let Some(records) = Record::decode_all(&records).filter(|v| v.len() == count as usize)
        else {
            break;
        };
        if records.iter().map(|r| u64::from(r.line_len)).sum::<u64>() != lines_len {
            break;
        }
        if let Some(last) = chunks.last() {
            let next = last.first_seq + last.records.len() as u64;
            if first_seq < next || (first_seq > next && matches!(view, LogView::Live)) {
                break;
            }
            if first_seq != next {
                return Err(JournalError::Corrupt {
                    path: path.to_path_buf(),
                    reason: format!("its outcome log skips from line {next} to line {first_seq}"),
                });
            }
        }
        chunks.push(LogChunk {
            first_seq,
            records,
            lines_at: at + LOG_HEADER as u64 + u64::from(records_len),
        });
        at += LOG_HEADER as u64 + body;
    }
    Ok((chunks, at))
}

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

/// A record to encode, borrowing its strings: journaling an outcome copies nothing but
/// its bytes into the log's chunk.
struct RecordRef<'a> {
    line: u64,
    attempts: u32,
    final_: bool,
    succeeded: bool,
    kind: Option<ErrorKind>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    cost_usd: Option<f64>,
    line_len: u32,
    custom_id: &'a str,
    message: Option<&'a str>,
}

impl<'a> RecordRef<'a> {
    fn of(e: &'a Entry) -> Self {
        RecordRef {
            line: e.line,
            attempts: e.attempts,
            final_: e.is_final(),
            succeeded: e.status == Status::Succeeded,
            kind: e.error_kind,
            prompt_tokens: e.prompt_tokens,
            completion_tokens: e.completion_tokens,
            cost_usd: e.cost_usd,
            line_len: e.output.len() as u32,
            custom_id: &e.custom_id,
            message: e.error_message.as_deref(),
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
        put_str(out, self.kind.map_or("", ErrorKind::as_str));
        put_str(out, self.custom_id);
        put_str(out, self.message.unwrap_or(""));
    }
}

impl Record {
    fn encode(&self, out: &mut Vec<u8>) {
        RecordRef {
            line: self.line,
            attempts: self.attempts,
            final_: self.final_,
            succeeded: self.succeeded,
            kind: self.kind,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cost_usd: self.cost_usd,
            line_len: self.line_len,
            custom_id: &self.custom_id,
            message: self.message.as_deref(),
        }
        .encode(out);
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

/// The page size of a new journal's database: the largest SQLite has. A checkpoint's
/// segment is one row of tens of KiB to a few MiB (overflow pages), written to the WAL and
/// later copied into the database a page at a time, one system call per page: with 64 KiB
/// pages a 20,000-request run makes 110 of those calls instead of 1,166 with the default
/// 4 KiB (`strace -c`). The same bytes in fewer calls; the client's CPU did not move
/// measurably (BENCHMARKS.md, twelfth session). (Set at creation; a journal keeps the page
/// size it was made with.)
const JOURNAL_PAGE_SIZE: i64 = 65536;

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
        // Made here, empty (an empty database to SQLite), so that it is held before
        // anything is written, and two runs cannot both make it.
        File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    JournalError::InUse {
                        path: path.to_path_buf(),
                    }
                } else {
                    in_context(e, "cannot create the journal", path)
                }
            })?;
        let held = hold(path)?;
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sqlite(path))?;
        let made = (|| {
            conn.pragma_update(None, "page_size", JOURNAL_PAGE_SIZE)?;
            // Made without an `fsync` (SQLite's way makes six: the switch to WAL goes
            // through a rollback journal). They would make nothing durable: the schema
            // and the run's record are WAL frames, which synchronous=NORMAL syncs only at
            // a checkpoint, so a power cut before then leaves a journal without them
            // either way (refused as corrupt, never taken for a fresh start).
            conn.pragma_update(None, "synchronous", "OFF")?;
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(SCHEMA)?;
            let mut put = tx.prepare("INSERT INTO meta (key, value) VALUES (?1, ?2)")?;
            put.execute(params!["schema_version", SCHEMA_VERSION.to_string()])?;
            put.execute(params![
                "run",
                serde_json::to_string(&meta).expect("meta serialises")
            ])?;
            drop(put);
            tx.commit()?;
            configure(&conn)
        })();
        made.map_err(err)?;
        let log = open_log(path, true)?;
        Ok(Journal::assemble(
            conn,
            path,
            meta,
            0,
            Some(log),
            Some(held),
        ))
    }

    fn assemble(
        conn: Connection,
        path: &Path,
        meta: JournalMeta,
        rows: u64,
        log: Option<File>,
        held: Option<Held>,
    ) -> Journal {
        // Until the log is read, all of it: a journal dropped before then (its log found
        // corrupt) cuts nothing.
        let log_end = log
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        Journal {
            conn,
            path: path.to_path_buf(),
            meta,
            rows,
            synced: rows,
            log,
            log_first: rows + 1,
            unsynced: Vec::new(),
            unsynced_bytes: 0,
            overlay: Vec::new(),
            survey: None,
            log_end,
            checked_to: 0,
            reserving: true,
            #[cfg(all(test, target_os = "linux"))]
            free_space: None,
            space_low: false,
            _held: held,
        }
    }

    /// Whether the disk holding the outcome log is nearly full: [`LOG_RESERVE`] more could
    /// not be set aside for it. Once so, it stays so.
    pub fn space_low(&self) -> bool {
        self.space_low
    }

    /// Before `more` bytes are appended to the log: when the disk is getting full, sets
    /// space aside for them and [`LOG_RESERVE`] past them, once less than half of that is
    /// left; when it cannot, marks the journal [`space_low`](Self::space_low).
    fn reserve(&mut self, more: u64) {
        let end = self.log_end + more;
        if !self.reserving || self.space_low || end <= self.checked_to {
            return;
        }
        #[cfg(target_os = "linux")]
        {
            use rustix::fs::{fallocate, fstatvfs, FallocateFlags};
            use rustix::io::Errno;
            use rustix::process::{getrlimit, Resource};
            // Space set aside is not held to the file size limit (`ulimit -f`), which the
            // writes into it are: past the limit, they fail as on a full disk.
            let limit = getrlimit(Resource::Fsize).current.unwrap_or(u64::MAX);
            if end + LOG_RESERVE > limit {
                self.space_low = true;
                return;
            }
            let log = self.log.as_ref().expect("a writable journal has its log");
            let free = fstatvfs(log).map_or(0, |s| s.f_bavail.saturating_mul(s.f_frsize));
            #[cfg(test)]
            let free = self.free_space.unwrap_or(free);
            if free > 4 * LOG_RESERVE {
                // Room enough: nothing set aside (on tmpfs that takes milliseconds), and
                // the space looked at again after another MiB of log or once it is emptied.
                self.checked_to = end + (1 << 20);
                return;
            }
            match fallocate(
                log,
                FallocateFlags::KEEP_SIZE,
                self.log_end,
                more + LOG_RESERVE,
            ) {
                Ok(()) => self.checked_to = end + LOG_RESERVE / 2,
                Err(Errno::NOSPC | Errno::FBIG | Errno::DQUOT) => self.space_low = true,
                // The file system cannot set space aside: the log goes unguarded.
                Err(_) => self.reserving = false,
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            self.reserving = false;
        }
    }

    /// The log was cut to `len` bytes (which frees the space set aside past them).
    fn log_cut(&mut self, len: u64) {
        self.log_end = len;
        self.checked_to = len;
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
        // What SQLite says of the file: damage, unless the disk failed (then the file
        // may be sound, and must not be called unusable).
        let unread = |e: rusqlite::Error| match sqlite_io(&e) {
            true => sqlite(path)(e),
            false => corrupt(e.to_string()),
        };
        // Held before SQLite opens it: replaying the log writes.
        let held = if read_only { None } else { Some(hold(path)?) };
        let flags = if read_only {
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
        } else {
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX
        };
        let conn = Connection::open_with_flags(path, flags).map_err(sqlite(path))?;
        if !read_only {
            configure(&conn).map_err(unread)?;
        }
        let version: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(unread)?;
        let version = version.ok_or_else(|| corrupt("it has no format version".into()))?;
        let found: u32 = version
            .parse()
            .map_err(|_| corrupt(format!("format version {version:?} is not a number")))?;
        let run: Option<String> = conn
            .query_row("SELECT value FROM meta WHERE key = 'run'", [], |r| r.get(0))
            .optional()
            .map_err(unread)?;
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
        // The table this version writes must be there. (No full integrity check: it reads
        // the whole file, seconds for a million outcomes; damage met later is reported as
        // an error anyway.)
        let n: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'segments'",
                [],
                |r| r.get(0),
            )
            .map_err(unread)?;
        if n != 1 {
            return Err(corrupt("it has no `segments` table".into()));
        }
        let rows = max_seq(&conn).map_err(unread)?;
        if read_only {
            let mut j = Journal::assemble(conn, path, meta, rows, None, None);
            // A live run's log may be written as it is read: a chunk cut short is one
            // not yet written, and one of later rows than the next, of a checkpoint since.
            match File::open(log_path(path)) {
                Ok(f) => {
                    let (chunks, _) = read_log(path, &f, LogView::Live)?;
                    if let Some(first) = chunks.first() {
                        if first.first_seq <= rows + 1 {
                            j.log_first = first.first_seq;
                            j.overlay = chunks.into_iter().flat_map(|c| c.records).collect();
                            j.rows = j.log_first - 1 + j.overlay.len() as u64;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            return Ok(j);
        }
        let log = open_log(path, false)?;
        let mut j = Journal::assemble(conn, path, meta, rows, Some(log), held);
        j.replay_log()?;
        Ok(j)
    }

    /// Brings the log's records into SQLite (they replace its rows from the log's first
    /// on) and cuts a chunk torn by a crash off the log. The log keeps its lines: the
    /// output may lack them.
    fn replay_log(&mut self) -> Result<(), JournalError> {
        let log = self.log.as_ref().expect("a writable journal has its log");
        let (chunks, valid) = read_log(&self.path, log, LogView::Whole)?;
        if log.metadata()?.len() > valid {
            log.set_len(valid)?;
        }
        self.log_cut(valid);
        let Some(first) = chunks.first().map(|c| c.first_seq) else {
            self.log_first = self.rows + 1;
            return Ok(());
        };
        if first > self.synced + 1 || first == 0 {
            return Err(JournalError::Corrupt {
                path: self.path.clone(),
                reason: format!(
                    "its outcome log starts at line {first}, but its records end at line {}",
                    self.synced
                ),
            });
        }
        let records: Vec<Record> = chunks.into_iter().flat_map(|c| c.records).collect();
        self.replace_from(first, &records)?;
        self.log_first = first;
        Ok(())
    }

    /// Replaces rows `from..` with `records` in one transaction.
    fn replace_from(&mut self, from: u64, records: &[Record]) -> Result<(), JournalError> {
        let path = self.path.clone();
        let segments = self.segments_from(from)?;
        let tx = self.conn.unchecked_transaction().map_err(sqlite(&path))?;
        let put = |first: u64, recs: &[Record]| -> rusqlite::Result<()> {
            if recs.is_empty() {
                return Ok(());
            }
            let mut enc = Vec::with_capacity(recs.len() * 64);
            for r in recs {
                r.encode(&mut enc);
            }
            let bytes = recs.iter().map(|r| u64::from(r.line_len)).sum();
            insert_segment(&tx, first, recs.len() as u64, bytes, &enc)
        };
        for seg in segments {
            tx.execute(
                "DELETE FROM segments WHERE first_seq = ?1",
                params![seg.first_seq as i64],
            )
            .map_err(sqlite(&path))?;
            if seg.first_seq < from {
                let keep = (from - seg.first_seq) as usize;
                put(seg.first_seq, &seg.records[..keep]).map_err(sqlite(&path))?;
            }
        }
        put(from, records).map_err(sqlite(&path))?;
        tx.commit().map_err(sqlite(&path))?;
        self.rows = from - 1 + records.len() as u64;
        self.synced = self.rows;
        self.unsynced.clear();
        self.unsynced_bytes = 0;
        self.survey = None;
        Ok(())
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

    /// Records what this session changed in the run's [`JournalMeta`]: where the input
    /// and output are (they may move between sessions), and after a forced resume the
    /// input and settings it went on with.
    pub fn update_meta(
        &mut self,
        change: impl FnOnce(&mut JournalMeta),
    ) -> Result<(), JournalError> {
        change(&mut self.meta);
        let json = serde_json::to_string(&self.meta).expect("meta serialises");
        self.conn
            .execute(
                "UPDATE meta SET value = ?1 WHERE key = 'run'",
                params![json],
            )
            .map_err(sqlite(&self.path))?;
        Ok(())
    }

    /// Makes what the last session may have spent beyond the outcomes it journaled (by
    /// the bound it recorded, [`ExposureRecorder`]) part of what the run may have spent
    /// without an outcome to show ([`JournalStatus::unrecorded_usd`]): called when a
    /// session begins. A session that ended with nothing on the wire left nothing there.
    pub fn settle_exposure(&mut self) -> Result<(), JournalError> {
        let live = meta_usd(&self.conn, EXPOSURE_LIVE, &self.path)?;
        if live == 0.0 {
            return Ok(());
        }
        let lost = meta_usd(&self.conn, EXPOSURE_LOST, &self.path)?
            + self.unjournaled(live, self.status()?.cost_usd)?;
        let tx = self
            .conn
            .unchecked_transaction()
            .map_err(sqlite(&self.path))?;
        set_meta_usd(&tx, EXPOSURE_LOST, lost).map_err(sqlite(&self.path))?;
        set_meta_usd(&tx, EXPOSURE_LIVE, 0.0).map_err(sqlite(&self.path))?;
        tx.commit().map_err(sqlite(&self.path))
    }

    /// Of the bound `live` on what the session recorded with it may have spent, what is
    /// not in the journal's outcomes (`cost_usd` now, of all sessions).
    fn unjournaled(&self, live: f64, cost_usd: f64) -> Result<f64, JournalError> {
        let base = meta_usd(&self.conn, EXPOSURE_BASE, &self.path)?;
        Ok((live - (cost_usd - base)).max(0.0))
    }

    /// A recorder of this session's bound on what it may spend ([`ExposureRecorder`]), on
    /// a connection of its own (it is called from the engine, not from where outcomes are
    /// journaled). `spent_usd`: the cost of the journal's outcomes as the session begins.
    pub fn exposure_recorder(&self, spent_usd: f64) -> Result<ExposureRecorder, JournalError> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|c| configure(&c).map(|()| c))
        // Its commits never copy the WAL into the database (that is the journal's own
        // connection's to do): a record is one small page written, on the engine's time.
        .and_then(|c| c.pragma_update(None, "wal_autocheckpoint", 0).map(|()| c))
        .and_then(|c| set_meta_usd(&c, EXPOSURE_BASE, spent_usd).map(|()| c))
        .map_err(sqlite(&self.path))?;
        Ok(ExposureRecorder {
            conn: std::sync::Mutex::new(conn),
            path: self.path.clone(),
        })
    }

    /// Journals the outcomes of `chunk`, numbered after the rows already there, as one
    /// chunk of the log (one `writev()`): the caller writes their output lines, in this
    /// order, only after this returns. Their records reach SQLite at the next
    /// [`checkpoint`](Self::checkpoint).
    pub fn append(&mut self, chunk: &Chunk) -> Result<(), JournalError> {
        if chunk.is_empty() {
            return Ok(());
        }
        let first = self.rows + 1;
        let lines_len = chunk.lines.len() as u64;
        let mut header = log_header(first, chunk.count, chunk.records.len() as u32, lines_len);
        let crc = {
            let mut h = chunk_crc(&header);
            h.update(&chunk.records);
            h.update(&chunk.lines);
            h.finalize()
        };
        header[28..32].copy_from_slice(&crc.to_le_bytes());
        let bytes = (header.len() + chunk.records.len()) as u64 + lines_len;
        self.reserve(bytes);
        let log = self.log.as_mut().expect("a writable journal has its log");
        // What part of the chunk reached the log after an error is cut on the next open;
        // these rows are not journaled. At `log_end`, not the file's end: a reused log
        // is written over from its start.
        log.seek(SeekFrom::Start(self.log_end))?;
        write_all_vectored(
            log,
            &mut [
                io::IoSlice::new(&header),
                io::IoSlice::new(&chunk.records),
                io::IoSlice::new(&chunk.lines),
            ],
        )?;
        self.log_end += bytes;
        self.unsynced.extend_from_slice(&chunk.records);
        self.unsynced_bytes += lines_len;
        self.rows += chunk.len() as u64;
        self.survey = None;
        Ok(())
    }

    /// Commits the records of the logged outcomes to SQLite in one transaction, then
    /// empties the log. Call it only once the output holds every line appended so far
    /// (written to the file, not in a buffer of ours): the log is the only other copy.
    pub fn checkpoint(&mut self) -> Result<(), JournalError> {
        self.commit_unsynced()?;
        if let Some(log) = &self.log {
            log.set_len(0)?;
            self.log_cut(0);
        }
        self.log_first = self.rows + 1;
        Ok(())
    }

    /// [`checkpoint`](Self::checkpoint), but the log keeps its bytes and is written over
    /// from its start: its pages stay in the kernel's cache, so the next chunks cost a
    /// copy rather than a page's allocation, its blocks' reservation and, when the log is
    /// cut, its freeing (measured: the log's `writev()` cost four times its copy). The
    /// chunks left past the new ones are of earlier rows, where a reader stops (see
    /// [`read_log`]); the log is cut when the journal is dropped. Sound because nothing
    /// in the file is of a row after [`rows`](Self::rows): a resume, which renumbers rows,
    /// ends with [`checkpoint`](Self::checkpoint).
    pub fn checkpoint_reusing_log(&mut self) -> Result<(), JournalError> {
        self.commit_unsynced()?;
        self.log_cut(0);
        self.log_first = self.rows + 1;
        Ok(())
    }

    /// Commits the records of rows after `synced` to SQLite in one transaction.
    fn commit_unsynced(&mut self) -> Result<(), JournalError> {
        if self.rows > self.synced {
            let path = self.path.clone();
            let count = self.rows - self.synced;
            // BEGIN and COMMIT as cached statements: rusqlite's transactions prepare them
            // again each time.
            let conn = &self.conn;
            conn.prepare_cached("BEGIN")
                .and_then(|mut s| s.execute([]))
                .map_err(sqlite(&path))?;
            let written = insert_segment(
                conn,
                self.synced + 1,
                count,
                self.unsynced_bytes,
                &self.unsynced,
            )
            .and_then(|()| conn.prepare_cached("COMMIT")?.execute([]).map(drop));
            if let Err(e) = written {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(sqlite(&path)(e));
            }
            self.synced = self.rows;
            self.unsynced.clear();
            self.unsynced_bytes = 0;
        }
        Ok(())
    }

    /// Calls `f(input line, output line)` for each outcome still in the outcome log that
    /// succeeded and was sent (not answered by the cache or by an identical request,
    /// which make no attempt): those journaled since its last checkpoint, which a killed
    /// session may not have kept anywhere else but the output (the response cache stores
    /// a batch at a time, and before each checkpoint). Call it before
    /// [`resume`](Self::resume), which empties the log. A line is the output's, newline
    /// included.
    pub fn log_outcomes(&self, mut f: impl FnMut(u64, &[u8])) -> Result<(), JournalError> {
        let Some(log) = self.log.as_ref() else {
            return Ok(());
        };
        let (chunks, _) = read_log(&self.path, log, LogView::Upto(self.log_end))?;
        let mut r = io::BufReader::with_capacity(1 << 16, log);
        let mut line = Vec::new();
        for chunk in chunks {
            r.seek(SeekFrom::Start(chunk.lines_at))?;
            for record in &chunk.records {
                line.resize(record.line_len as usize, 0);
                r.read_exact(&mut line)?;
                if record.final_ && record.succeeded && record.attempts > 0 {
                    f(record.line, &line);
                }
            }
        }
        Ok(())
    }

    /// Rows whose records are not yet committed to SQLite.
    pub fn unsynced(&self) -> u64 {
        self.rows - self.synced
    }

    /// Bytes in the log since its last checkpoint.
    pub fn log_len(&self) -> u64 {
        self.log_end
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

    /// Checks that the output at `output` holds the lines of every row before the log's
    /// first: lines only the output holds now. An output with fewer is
    /// [`JournalError::OutputMissing`]; one whose lines are not this journal's,
    /// [`JournalError::OutputMismatch`].
    pub fn check_output(&self, output: &Path) -> Result<(), JournalError> {
        let need = self.log_first - 1;
        if need == 0 {
            return Ok(());
        }
        let f = match File::open(output) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(self.missing(output, 0, need));
            }
            Err(e) => return Err(e.into()),
        };
        let len = f.metadata()?.len();
        let expected = self.bytes_through(need)?;
        let (lines, end) = if len >= expected && byte_at(&f, expected - 1)? == b'\n' {
            (need, expected)
        } else {
            complete_lines(&f, need)?
        };
        if lines == 0 {
            return Err(self.missing(output, 0, need));
        }
        let mismatch = |reason: String| JournalError::OutputMismatch {
            path: self.path.clone(),
            output: output.to_path_buf(),
            line: lines,
            reason,
        };
        let last = last_line(&f, end)?;
        let id = serde_json::from_slice::<serde_json::Value>(&last)
            .ok()
            .and_then(|v| v["custom_id"].as_str().map(str::to_string));
        let want = self.custom_id_at(lines)?;
        if id != want {
            return Err(mismatch(format!(
                "custom_id {} where the journal has {}",
                id.map_or("missing".into(), |i| format!("{i:?}")),
                want.map_or("none".into(), |i| format!("{i:?}"))
            )));
        }
        if end != self.bytes_through(lines)? {
            return Err(mismatch("the lines before it have other lengths".into()));
        }
        if lines < need {
            return Err(self.missing(output, lines, need));
        }
        Ok(())
    }

    fn missing(&self, output: &Path, have: u64, expected: u64) -> JournalError {
        JournalError::OutputMissing {
            path: self.path.clone(),
            output: output.to_path_buf(),
            have,
            expected,
        }
    }

    /// Forgets every row after `keep` (for `--force` after [`JournalError::OutputMissing`]):
    /// their requests are sent again.
    pub fn truncate_rows(&mut self, keep: u64) -> Result<(), JournalError> {
        self.replace_from(keep + 1, &[])?;
        if let Some(log) = &self.log {
            log.set_len(0)?;
            self.log_cut(0);
        }
        self.log_first = self.rows + 1;
        Ok(())
    }

    /// Makes the journal and the output ready for a resume: drops the rows whose requests
    /// must be sent again (not final; with `retry_failed` also transient failures),
    /// renumbers the rest, and brings the output (`None` for stdout) in line with the
    /// rows. Call [`check_output`](Self::check_output) first.
    pub fn resume(
        &mut self,
        output: Option<&Path>,
        retry_failed: bool,
    ) -> Result<(ResumePlan, Option<OutputRepair>), JournalError> {
        let survey = match self.survey {
            Some((flag, survey)) if flag == retry_failed => survey,
            _ => {
                let mut survey = Survey::default();
                self.walk(retry_failed, &mut survey, |_, _| {})?;
                survey
            }
        };
        let mut plan = ResumePlan {
            requeued_unfinished: survey.unfinished,
            requeued_failed: survey.failed,
            first_changed_seq: survey.first.map(|(seq, _)| seq),
            ..ResumePlan::default()
        };
        let repair = match output {
            Some(path) => {
                self.check_output(path)?;
                if let Some(first) = plan.first_changed_seq {
                    self.compact(Some(path), first, retry_failed)?;
                }
                let repair = self.rewrite_output_tail(path)?;
                self.checkpoint()?;
                Some(repair)
            }
            None => {
                if let Some(first) = plan.first_changed_seq {
                    self.compact(None, first, retry_failed)?;
                }
                self.checkpoint()?;
                None
            }
        };
        plan.kept = self.rows;
        Ok((plan, repair))
    }

    /// Drops the rows from `first` on that a resume sends again, renumbering the rest.
    /// With an output file, the kept rows and their lines (from the output before the log's
    /// first row, from the log after) become the new log, written beside it and renamed
    /// over it, then replayed: a crash at any point leaves either log whole.
    fn compact(
        &mut self,
        output: Option<&Path>,
        first: u64,
        retry_failed: bool,
    ) -> Result<(), JournalError> {
        let mut rows: Vec<(Record, bool)> = Vec::new();
        for seg in self.segments_from(first)? {
            for (i, r) in seg.records.into_iter().enumerate() {
                if seg.first_seq + i as u64 >= first {
                    let keep = !dropped_on_resume(&r, retry_failed);
                    rows.push((r, keep));
                }
            }
        }
        let kept: Vec<Record> = rows
            .iter()
            .filter(|(_, k)| *k)
            .map(|(r, _)| r.clone())
            .collect();
        let Some(output) = output else {
            return self.replace_from(first, &kept);
        };
        let log_file = log_path(&self.path);
        let tmp = {
            let mut p = log_file.as_os_str().to_os_string();
            p.push(".tmp");
            PathBuf::from(p)
        };
        let mut records = Vec::with_capacity(kept.len() * 64);
        for r in &kept {
            r.encode(&mut records);
        }
        let lines_len: u64 = kept.iter().map(|r| u64::from(r.line_len)).sum();
        let mut header = log_header(first, kept.len() as u32, records.len() as u32, lines_len);
        let mut crc = chunk_crc(&header);
        crc.update(&records);
        let mut w = BufWriter::with_capacity(1 << 16, File::create(&tmp)?);
        w.write_all(&header)?;
        w.write_all(&records)?;
        // The lines, in row order: rows before the log's first from the output, the rest
        // from the log.
        let mut from_output = {
            let mut f = File::open(output)?;
            f.seek(SeekFrom::Start(self.bytes_through(first - 1)?))?;
            io::BufReader::with_capacity(1 << 16, f)
        };
        let log = self.log.as_ref().expect("a writable journal has its log");
        let (chunks, _) = read_log(&self.path, log, LogView::Upto(self.log_end))?;
        let mut from_log = io::BufReader::with_capacity(1 << 16, log.try_clone()?);
        if let Some(c) = chunks.first() {
            from_log.seek(SeekFrom::Start(c.lines_at))?;
        }
        let mut next_chunk = 0usize;
        let mut line = Vec::new();
        for (i, (r, keep)) in rows.iter().enumerate() {
            let seq = first + i as u64;
            line.resize(r.line_len as usize, 0);
            if seq < self.log_first {
                from_output.read_exact(&mut line)?;
            } else {
                // Chunks are contiguous in the file: seek only at the start of each.
                while next_chunk < chunks.len() && chunks[next_chunk].first_seq <= seq {
                    if chunks[next_chunk].first_seq == seq {
                        from_log.seek(SeekFrom::Start(chunks[next_chunk].lines_at))?;
                    }
                    next_chunk += 1;
                }
                from_log.read_exact(&mut line)?;
            }
            if *keep {
                crc.update(&line);
                w.write_all(&line)?;
            }
        }
        header[28..32].copy_from_slice(&crc.finalize().to_le_bytes());
        let mut f = w.into_inner().map_err(|e| e.into_error())?;
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&header)?;
        f.sync_data()?;
        drop(f);
        std::fs::rename(&tmp, &log_file)?;
        self.log = Some(open_log(&self.path, false)?);
        // All of the new log, until it is read (dropped before then, the journal cuts
        // nothing of it).
        self.log_cut(LOG_HEADER as u64 + records.len() as u64 + lines_len);
        self.replay_log()
    }

    /// Brings the output in line with the rows: it keeps every line before the log's first
    /// row (see [`check_output`](Self::check_output)) and those after that are already the
    /// log's, byte for byte; cuts what follows (a torn line, lines of dropped rows) and
    /// appends the log's other lines.
    fn rewrite_output_tail(&mut self, output: &Path) -> Result<OutputRepair, JournalError> {
        let mut report = OutputRepair::default();
        let keep_bytes = self.bytes_through(self.log_first - 1)?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(output)?;
        let len = f.metadata()?.len();
        let log = self.log.as_ref().expect("a writable journal has its log");
        let (chunks, _) = read_log(&self.path, log, LogView::Upto(self.log_end))?;
        let mut from_log = io::BufReader::with_capacity(1 << 16, log.try_clone()?);
        let mut tail = io::BufReader::with_capacity(1 << 16, f.try_clone()?);
        tail.seek(SeekFrom::Start(keep_bytes))?;
        let mut at = keep_bytes;
        let mut kept = self.log_first - 1;
        let (mut line, mut there) = (Vec::new(), Vec::new());
        // Lines already in the output.
        let mut pending: Option<(usize, usize)> = None; // (chunk, record) of the first line to write
        'matching: for (ci, c) in chunks.iter().enumerate() {
            from_log.seek(SeekFrom::Start(c.lines_at))?;
            for (ri, r) in c.records.iter().enumerate() {
                line.resize(r.line_len as usize, 0);
                from_log.read_exact(&mut line)?;
                there.resize(line.len(), 0);
                if at + line.len() as u64 > len
                    || tail.read_exact(&mut there).is_err()
                    || there != line
                {
                    pending = Some((ci, ri));
                    break 'matching;
                }
                at += line.len() as u64;
                kept += 1;
            }
        }
        report.kept = kept;
        if len > at {
            let (cut, torn) = tail_lines(&f, at)?;
            report.cut = cut;
            report.torn_bytes = torn;
            f.set_len(at)?;
        }
        let mut w = BufWriter::with_capacity(1 << 16, f);
        w.seek(SeekFrom::Start(at))?;
        if let Some((ci, ri)) = pending {
            for (i, c) in chunks.iter().enumerate().skip(ci) {
                from_log.seek(SeekFrom::Start(c.lines_at))?;
                for (j, r) in c.records.iter().enumerate() {
                    line.resize(r.line_len as usize, 0);
                    from_log.read_exact(&mut line)?;
                    if i == ci && j < ri {
                        continue;
                    }
                    w.write_all(&line)?;
                    report.restored += 1;
                }
            }
        }
        w.flush()?;
        w.get_ref().sync_data()?;
        Ok(report)
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
        self.each_record(|seq, r| {
            if dropped_on_resume(r, retry_failed) {
                if r.final_ {
                    survey.failed += 1;
                } else {
                    survey.unfinished += 1;
                }
                if survey.first.is_none() {
                    survey.first = Some((seq, seq));
                }
            } else {
                done(r.line, &r.custom_id);
            }
        })
    }

    /// Calls `f` with every row's number and record, in order: SQLite's, then (read-only)
    /// those of the log, which override SQLite's from the log's first row.
    fn each_record(&self, mut f: impl FnMut(u64, &Record)) -> Result<(), JournalError> {
        let end = if self.overlay.is_empty() {
            u64::MAX
        } else {
            self.log_first
        };
        self.each_segment_from(0, |s| {
            for (i, r) in s.records.iter().enumerate() {
                let seq = s.first_seq + i as u64;
                if seq < end {
                    f(seq, r);
                }
            }
            Ok(())
        })?;
        for (i, r) in self.overlay.iter().enumerate() {
            f(self.log_first + i as u64, r);
        }
        Ok(())
    }

    /// Bytes of output lines `1..=seq`.
    pub fn bytes_through(&self, seq: u64) -> Result<u64, JournalError> {
        let err = || sqlite(&self.path);
        // Whole segments by the length of their lines, then the records of the one that
        // holds `seq`.
        let whole: i64 = self
            .conn
            .query_row(
                "SELECT COALESCE(SUM(bytes), 0) FROM segments WHERE first_seq + count - 1 <= ?1",
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

    /// Where the run stands.
    pub fn status(&self) -> Result<JournalStatus, JournalError> {
        let mut s = JournalStatus {
            requests: self.meta.input.requests,
            ..JournalStatus::default()
        };
        let mut errors: Vec<ErrorCount> = Vec::new();
        self.each_record(|_, r| {
            s.attempts += u64::from(r.attempts);
            if r.final_ {
                s.outcomes += 1;
                if r.succeeded {
                    s.succeeded += 1;
                } else {
                    s.failed += 1;
                }
            }
            // Tokens paid for, as the run's summary counts them: not those of a response
            // taken from the cache or from an identical request (its usage is the
            // original's, and nothing was sent for it: no attempts).
            if r.attempts > 0 {
                s.prompt_tokens += r.prompt_tokens.unwrap_or(0);
                s.completion_tokens += r.completion_tokens.unwrap_or(0);
            }
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
        })?;
        errors.sort_by(|a, b| b.count.cmp(&a.count).then(a.kind.cmp(&b.kind)));
        s.errors = errors;
        s.orphans = self.meta.orphans.min(s.outcomes);
        s.done = s.outcomes - s.orphans;
        s.pending = s.requests.saturating_sub(s.done);
        let live = meta_usd(&self.conn, EXPOSURE_LIVE, &self.path)?;
        s.unrecorded_usd = meta_usd(&self.conn, EXPOSURE_LOST, &self.path)?
            + self.unjournaled(live, s.cost_usd)?;
        Ok(s)
    }
}

/// The key of `meta` holding the bound on what the present (or last) session may have
/// spent, its attempts in flight at their worst included, in dollars: not 0 while a
/// session runs with a budget, or after one was killed.
const EXPOSURE_LIVE: &str = "exposure_live";
/// The key of `meta` holding the cost of the journal's outcomes when that session began:
/// of its bound, what the journal's outcomes now cost beyond this is accounted for.
const EXPOSURE_BASE: &str = "exposure_base";
/// The key of `meta` holding the sum of the bounds of sessions that ended with attempts
/// on the wire (killed, or abandoned by a second Ctrl-C).
const EXPOSURE_LOST: &str = "exposure_lost";

/// A number of dollars kept in `meta`; 0 when it is not there.
fn meta_usd(conn: &Connection, key: &str, path: &Path) -> Result<f64, JournalError> {
    let v: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
        .map_err(sqlite(path))?;
    match v {
        None => Ok(0.0),
        Some(v) => match v.parse::<f64>() {
            Ok(usd) if usd.is_finite() && usd >= 0.0 => Ok(usd),
            _ => Err(JournalError::Corrupt {
                path: path.to_path_buf(),
                reason: format!("its {key} is {v:?}, not a number of dollars"),
            }),
        },
    }
}

fn set_meta_usd(conn: &Connection, key: &str, usd: f64) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
        params![key, usd.to_string()],
    )
    .map(|_| ())
}

/// Records, in the journal, the bound on what a session may have spent, its attempts in
/// flight at their worst included (the engine's [`ExposureGate`](crate::ExposureGate)),
/// so that a resume after a crash counts as spent what of it has no outcome journaled.
/// Each record is a commit of its own: written to the operating system, so it outlives
/// the process, before the attempts it covers go out.
pub struct ExposureRecorder {
    conn: std::sync::Mutex<Connection>,
    path: PathBuf,
}

impl ExposureRecorder {
    /// Records `usd` as the bound; 0 when the session ends with every outcome journaled.
    pub fn record(&self, usd: f64) -> Result<(), JournalError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        set_meta_usd(&conn, EXPOSURE_LIVE, usd).map_err(sqlite(&self.path))
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
    bytes: u64,
    records: &[u8],
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO segments (first_seq, count, bytes, entries) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        first_seq as i64,
        count as i64,
        bytes as i64,
        records
    ])?;
    Ok(())
}

/// Opens the outcome log of the journal at `journal` for appending, emptied when `fresh`.
fn open_log(journal: &Path, fresh: bool) -> Result<File, JournalError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(log_path(journal))?;
    if fresh {
        f.set_len(0)?;
    }
    Ok(f)
}

/// `Write::write_all` for several buffers (`write_all_vectored` is not stable).
fn write_all_vectored(f: &mut File, mut bufs: &mut [io::IoSlice<'_>]) -> io::Result<()> {
    io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match f.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn max_seq(conn: &Connection) -> rusqlite::Result<u64> {
    conn.query_row(
        "SELECT COALESCE(MAX(first_seq + count - 1), 0) FROM segments",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as u64)
}

/// What [`Journal::resume`] did to the output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutputRepair {
    /// Complete lines kept from the existing output.
    pub kept: u64,
    /// Bytes of a torn last line that were cut.
    pub torn_bytes: u64,
    /// Complete lines cut (of dropped or renumbered rows, or not the journal's).
    pub cut: u64,
    /// Lines written from the journal's log.
    pub restored: u64,
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
            by_custom_id: false,
            orphans: 0,
        }
    }

    #[test]
    fn meta_written_before_by_custom_id_reads_as_by_line_and_is_written_the_same() {
        let old = serde_json::to_value(meta()).unwrap();
        assert!(old.get("by_custom_id").is_none(), "{old}");
        let read: JournalMeta = serde_json::from_value(old).unwrap();
        assert!(!read.by_custom_id);
        let forced = JournalMeta {
            by_custom_id: true,
            ..meta()
        };
        let again: JournalMeta =
            serde_json::from_str(&serde_json::to_string(&forced).unwrap()).unwrap();
        assert!(again.by_custom_id);
    }

    /// A journal is made with synchronous=OFF (no `fsync`s) and used with
    /// synchronous=NORMAL, as its recorder's connection and a reopened journal are.
    #[test]
    fn a_journal_is_made_without_syncing_and_used_with_synchronous_normal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let synchronous = |c: &Connection| -> i64 {
            c.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap()
        };
        let j = Journal::create(&path, meta()).unwrap();
        assert_eq!(synchronous(&j.conn), 1, "NORMAL once made");
        let recorder = j.exposure_recorder(0.0).unwrap();
        assert_eq!(synchronous(&recorder.conn.lock().unwrap()), 1);
        drop((recorder, j));
        let j = Journal::open(&path).unwrap();
        assert_eq!(synchronous(&j.conn), 1);
        assert_eq!(j.meta(), &meta());
    }

    #[test]
    fn a_journal_is_held_by_one_writer_at_a_time_and_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let first = Journal::create(&path, meta()).unwrap();
        assert!(matches!(
            Journal::open(&path),
            Err(JournalError::InUse { .. })
        ));
        assert!(matches!(
            Journal::create(&path, meta()),
            Err(JournalError::InUse { .. })
        ));
        assert!(matches!(hold(&path), Err(JournalError::InUse { .. })));
        Journal::open_read_only(&path).expect("read while held");
        drop(first);
        let again = Journal::open(&path).expect("free once the first is closed");
        assert_eq!(again.meta(), &meta());
    }

    /// The bound a session records on what it may have spent shows, less what its
    /// journaled outcomes cost, in the status while it runs; it stays when the session is
    /// killed, and what of it has no outcome journaled is added up over the sessions that
    /// left one, by each session that begins. One that ended with every outcome journaled
    /// (recorded 0) leaves nothing.
    #[test]
    fn what_killed_sessions_may_have_spent_unjournaled_is_kept_and_added_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let unrecorded = || {
            Journal::open_read_only(&path)
                .unwrap()
                .status()
                .unwrap()
                .unrecorded_usd
        };
        let costing = |line: u64, usd: f64| Entry {
            cost_usd: Some(usd),
            ..entry(line, None)
        };
        let mut j = Journal::create(&path, meta()).unwrap();
        assert_eq!(j.status().unwrap().unrecorded_usd, 0.0);
        let recorder = j.exposure_recorder(0.0).unwrap();
        recorder.record(0.25).unwrap();
        recorder.record(0.5).unwrap();
        assert_eq!(unrecorded(), 0.5, "a running session's bound");
        j.append(&Chunk::of(&[costing(1, 0.125)])).unwrap();
        assert_eq!(unrecorded(), 0.375, "less what its outcomes cost");
        // Killed: nothing records 0.
        drop((recorder, j));
        let mut j = Journal::open(&path).unwrap();
        j.settle_exposure().unwrap();
        assert_eq!(j.status().unwrap().unrecorded_usd, 0.375);
        j.settle_exposure().unwrap();
        assert_eq!(unrecorded(), 0.375, "settled once");
        let recorder = j.exposure_recorder(0.125).unwrap();
        recorder.record(0.25).unwrap();
        j.append(&Chunk::of(&[costing(2, 0.0625)])).unwrap();
        drop((recorder, j));
        let mut j = Journal::open(&path).unwrap();
        j.settle_exposure().unwrap();
        assert_eq!(unrecorded(), 0.5625, "two killed sessions");
        assert_eq!(j.status().unwrap().cost_usd, 0.1875);
        // A session that ends with every outcome journaled.
        let recorder = j.exposure_recorder(0.1875).unwrap();
        recorder.record(1.0).unwrap();
        recorder.record(0.0).unwrap();
        drop((recorder, j));
        let mut j = Journal::open(&path).unwrap();
        j.settle_exposure().unwrap();
        assert_eq!(j.status().unwrap().unrecorded_usd, 0.5625);
        // Not a number: an error, never read as nothing spent.
        j.conn
            .execute(
                "UPDATE meta SET value = 'x' WHERE key = ?1",
                [EXPOSURE_LOST],
            )
            .unwrap();
        assert!(matches!(j.status(), Err(JournalError::Corrupt { .. })));
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

    fn lines(entries: &[Entry]) -> Vec<u8> {
        entries.iter().flat_map(|e| e.output.clone()).collect()
    }

    /// A chunk says how many of its outcomes are of requests that were sent (a request
    /// never sent, a bad line or a cache hit, has no attempt).
    #[test]
    fn a_chunk_counts_the_outcomes_of_requests_that_were_sent() {
        let mut entries: Vec<Entry> = (1..=5).map(|l| entry(l, None)).collect();
        entries[1].attempts = 0;
        entries[3].attempts = 0;
        let mut chunk = Chunk::of(&entries);
        assert_eq!((chunk.len(), chunk.sent()), (5, 3));
        chunk.clear();
        assert_eq!(chunk.sent(), 0);
    }

    /// On a disk getting full (as the journal is told here), space is set aside ahead of
    /// the log, given back when the log is emptied and when the journal is closed, and
    /// what is read of the log is unchanged by it.
    #[cfg(target_os = "linux")]
    #[test]
    fn space_is_set_aside_ahead_of_the_log_on_a_disk_getting_full_and_given_back() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let allocated = || std::fs::metadata(log_path(&path)).unwrap().blocks() * 512;
        let size = || std::fs::metadata(log_path(&path)).unwrap().len();
        let entries: Vec<Entry> = (1..=6).map(|l| entry(l, None)).collect();

        // Room enough: nothing set aside.
        let mut j = Journal::create(&path, meta()).unwrap();
        j.append(&Chunk::of(&entries[..2])).unwrap();
        assert!(allocated() < LOG_RESERVE / 2, "{}", allocated());
        drop(j);

        let mut j = Journal::open(&path).unwrap();
        j.free_space = Some(LOG_RESERVE);
        j.append(&Chunk::of(&entries[2..4])).unwrap();
        assert!(allocated() >= LOG_RESERVE, "{}", allocated());
        assert!(size() < 4096, "the log's length is its chunks': {}", size());
        assert!(!j.space_low());
        // Its readers see the chunks only.
        assert_eq!(
            Journal::open_read_only(&path)
                .unwrap()
                .status()
                .unwrap()
                .succeeded,
            4
        );
        j.checkpoint().unwrap();
        assert_eq!(allocated(), 0, "emptied, and what was set aside given back");
        j.append(&Chunk::of(&entries[4..])).unwrap();
        assert!(allocated() >= LOG_RESERVE);
        let logged = size();
        drop(j);
        assert!(
            allocated() < LOG_RESERVE / 2,
            "given back on close: {}",
            allocated()
        );
        assert_eq!(size(), logged);
        let j = Journal::open(&path).unwrap();
        assert_eq!((j.rows(), j.unsynced()), (6, 0));
        assert_eq!(j.status().unwrap().succeeded, 6);
    }

    #[test]
    fn outcomes_are_logged_then_checkpointed_and_a_crash_before_the_checkpoint_loses_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::create(&path, meta()).unwrap();
        let entries: Vec<Entry> = (1..=6).map(|l| entry(l, None)).collect();
        j.append(&Chunk::of(&entries[..2])).unwrap();
        j.append(&Chunk::of(&entries[2..5])).unwrap();
        // In the log, not yet in SQLite.
        assert_eq!((j.rows(), j.unsynced()), (5, 5));
        let in_sqlite: i64 = j
            .conn
            .query_row("SELECT COUNT(*) FROM segments", [], |r| r.get(0))
            .unwrap();
        assert_eq!(in_sqlite, 0);
        let log_len = std::fs::metadata(log_path(&path)).unwrap().len();
        assert!(log_len > lines(&entries[..5]).len() as u64, "{log_len}");
        // A reader sees the logged outcomes.
        let s = Journal::open_read_only(&path).unwrap().status().unwrap();
        assert_eq!(s.succeeded, 5);
        // A crash, with half a chunk written: reopening replays the two whole chunks and
        // cuts the torn one.
        drop(j);
        let mut torn = std::fs::OpenOptions::new()
            .append(true)
            .open(log_path(&path))
            .unwrap();
        torn.write_all(&[b'S', b'L', b'G', b'3', 6, 0, 0]).unwrap();
        drop(torn);
        let mut j = Journal::open(&path).unwrap();
        assert_eq!((j.rows(), j.unsynced()), (5, 0));
        assert_eq!(std::fs::metadata(log_path(&path)).unwrap().len(), log_len);
        assert_eq!(j.custom_id_at(5).unwrap().as_deref(), Some("r5"));
        assert_eq!(
            j.bytes_through(5).unwrap(),
            lines(&entries[..5]).len() as u64
        );
        j.append(&Chunk::of(&entries[5..])).unwrap();
        j.checkpoint().unwrap();
        assert_eq!(std::fs::metadata(log_path(&path)).unwrap().len(), 0);
        assert_eq!((j.rows(), j.unsynced()), (6, 0));
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.rows(), 6);
        assert_eq!(j.bytes_through(6).unwrap(), lines(&entries).len() as u64);
        assert_eq!(j.status().unwrap().succeeded, 6);
    }

    #[test]
    fn the_log_gives_back_the_outcomes_sent_since_the_last_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::create(&path, meta()).unwrap();
        j.append(&Chunk::of(&[entry(1, None)])).unwrap();
        j.checkpoint().unwrap();
        let mut from_cache = entry(4, None);
        from_cache.attempts = 0;
        let since = [
            entry(2, None),
            entry(3, Some(ErrorKind::BadRequest)),
            from_cache,
            entry(5, None),
        ];
        j.append(&Chunk::of(&since[..2])).unwrap();
        j.append(&Chunk::of(&since[2..])).unwrap();
        drop(j); // a crash: the last two chunks are in the log only
        let j = Journal::open(&path).unwrap();
        let mut got = Vec::new();
        j.log_outcomes(|line, text| got.push((line, text.to_vec())))
            .unwrap();
        assert_eq!(
            got,
            vec![(2, since[0].output.clone()), (5, since[3].output.clone())],
            "succeeded and sent, not the failure nor the answer from the cache"
        );
    }

    #[test]
    fn a_new_journal_has_large_pages_and_an_old_one_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let page_size = |j: &Journal| -> i64 {
            j.conn
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .unwrap()
        };
        let mut j = Journal::create(&path, meta()).unwrap();
        assert_eq!(page_size(&j), JOURNAL_PAGE_SIZE);
        let entries: Vec<Entry> = (1..=3).map(|l| entry(l, None)).collect();
        j.append(&Chunk::of(&entries)).unwrap();
        j.checkpoint().unwrap();
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert_eq!(page_size(&j), JOURNAL_PAGE_SIZE);
        assert_eq!(j.rows(), 3);
        drop(j);
        // A journal made with SQLite's default pages (as earlier versions made them) is
        // opened and written as it is.
        let old = dir.path().join("old");
        let j = Journal::create(&old, meta()).unwrap();
        j.conn
            .pragma_update(None, "journal_mode", "DELETE")
            .unwrap();
        j.conn.pragma_update(None, "page_size", 4096).unwrap();
        j.conn.execute_batch("VACUUM").unwrap();
        j.conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        assert_eq!(page_size(&j), 4096);
        drop(j);
        let mut j = Journal::open(&old).unwrap();
        assert_eq!(page_size(&j), 4096);
        j.append(&Chunk::of(&entries)).unwrap();
        j.checkpoint().unwrap();
        drop(j);
        assert_eq!(Journal::open(&old).unwrap().rows(), 3);
    }

    #[test]
    fn a_damaged_chunk_ends_the_log_and_a_log_that_skips_rows_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::create(&path, meta()).unwrap();
        let entries: Vec<Entry> = (1..=4).map(|l| entry(l, None)).collect();
        j.append(&Chunk::of(&entries[..2])).unwrap();
        let first_chunk = std::fs::metadata(log_path(&path)).unwrap().len();
        j.append(&Chunk::of(&entries[2..])).unwrap();
        drop(j);
        // A flipped byte in the second chunk's lines: its CRC fails, so it is not replayed.
        let mut bytes = std::fs::read(log_path(&path)).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 1;
        std::fs::write(log_path(&path), &bytes).unwrap();
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.rows(), 2);
        assert_eq!(
            std::fs::metadata(log_path(&path)).unwrap().len(),
            first_chunk
        );
        drop(j);
        // A chunk numbered past the next row.
        let mut chunk = bytes[..first_chunk as usize].to_vec();
        chunk[4..12].copy_from_slice(&9u64.to_le_bytes());
        let mut log = bytes[..first_chunk as usize].to_vec();
        let mut crc = chunk_crc(chunk[..LOG_HEADER].try_into().unwrap());
        crc.update(&chunk[LOG_HEADER..]);
        chunk[28..32].copy_from_slice(&crc.finalize().to_le_bytes());
        log.extend_from_slice(&chunk);
        std::fs::write(log_path(&path), &log).unwrap();
        let err = Journal::open(&path).unwrap_err();
        assert!(
            matches!(&err, JournalError::Corrupt { reason, .. } if reason.contains("skips from line 3 to line 9")),
            "{err}"
        );
        assert_eq!(
            std::fs::read(log_path(&path)).unwrap(),
            log,
            "a log refused is left as it was"
        );
        // Read as a live run's log (`sluice status`), it is one written over from its
        // start as it was read: the rows before the skip.
        assert_eq!(Journal::open_read_only(&path).unwrap().rows(), 2);
    }

    #[test]
    fn an_output_missing_lines_only_it_held_or_not_this_runs_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let out = dir.path().join("out");
        let mut j = Journal::create(&path, meta()).unwrap();
        let entries: Vec<Entry> = (1..=4).map(|l| entry(l, None)).collect();
        j.append(&Chunk::of(&entries)).unwrap();
        std::fs::write(&out, lines(&entries)).unwrap();
        j.checkpoint().unwrap();
        j.check_output(&out).unwrap();
        // Cut to two lines and a half: lines 3 and 4 are gone with the log emptied.
        let all = lines(&entries);
        std::fs::write(&out, &all[..lines(&entries[..2]).len() + 5]).unwrap();
        let err = j.check_output(&out).unwrap_err();
        assert!(
            matches!(
                err,
                JournalError::OutputMissing {
                    have: 2,
                    expected: 4,
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("lines 3 to 4 are missing"),
            "{err}"
        );
        std::fs::remove_file(&out).unwrap();
        assert!(matches!(
            j.check_output(&out).unwrap_err(),
            JournalError::OutputMissing { have: 0, .. }
        ));
        std::fs::write(&out, b"{\"custom_id\":\"someone-else\"}\n").unwrap();
        let err = j.check_output(&out).unwrap_err();
        assert!(
            matches!(&err, JournalError::OutputMismatch { line: 1, .. }),
            "{err}"
        );
        // --force: the rows after what the output holds are forgotten.
        std::fs::write(&out, &all[..lines(&entries[..2]).len()]).unwrap();
        j.truncate_rows(2).unwrap();
        j.check_output(&out).unwrap();
        assert_eq!(j.rows(), 2);
        drop(j);
        assert_eq!(Journal::open(&path).unwrap().rows(), 2);
    }

    /// The chunk built from outcomes is byte for byte the one built from their entries:
    /// the same records (every field, the final flag and the line's length) and lines.
    #[test]
    fn a_chunk_of_outcomes_holds_what_their_entries_would() {
        use crate::outcome::{ErrorInfo, Usage};
        let outcome = |line: u64, kind: Option<ErrorKind>| Outcome {
            custom_id: format!("req-{line}-\u{e9}\""),
            status: if kind.is_some() {
                Status::Failed
            } else {
                Status::Succeeded
            },
            model: "gpt-4.1-mini".into(),
            response: None,
            error: kind.map(|kind| ErrorInfo {
                kind,
                status: Some(503),
                message: format!("went wrong on line {line}"),
            }),
            attempts: line as u32,
            usage: kind.is_none().then_some(Usage {
                prompt_tokens: 10 + line,
                completion_tokens: 20 + line,
                total_tokens: 30 + 2 * line,
                cached_tokens: 0,
                cache_write_tokens: 0,
            }),
            cost_usd: kind.is_none().then_some(0.25 * line as f64),
            latency_ms: 7,
            metadata: None,
            cached: line == 2,
            line,
            cache_key: None,
        };
        let outcomes = [
            outcome(1, None),
            outcome(2, None),
            outcome(3, Some(ErrorKind::ServerError)),
            outcome(4, Some(ErrorKind::Stopped)),
            outcome(5, Some(ErrorKind::QuotaExhausted)),
        ];
        let mut fast = Chunk::default();
        for o in &outcomes {
            fast.push(o);
        }
        let entries: Vec<Entry> = outcomes.iter().map(Entry::of).collect();
        let slow = Chunk::of(&entries);
        assert_eq!(fast.len(), 5);
        assert_eq!(fast.lines(), slow.lines());
        assert_eq!(fast.records, slow.records);
        let records = Record::decode_all(&fast.records).unwrap();
        let finals: Vec<bool> = records.iter().map(|r| r.final_).collect();
        assert_eq!(finals, [true, true, true, false, false]);
        assert_eq!(records[2].message.as_deref(), Some("went wrong on line 3"));
        assert_eq!(
            records[1].line_len as usize,
            outcomes[1].to_json_line().len()
        );
        fast.clear();
        assert!(fast.is_empty() && fast.lines().is_empty());
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
        let entries = [
            entry(1, None),
            entry(2, Some(ErrorKind::Stopped)),
            entry(3, None),
            entry(4, Some(ErrorKind::ServerError)),
            entry(5, Some(ErrorKind::NotAttempted)),
            entry(6, Some(ErrorKind::BadRequest)),
        ];
        j.append(&Chunk::of(&entries[..3])).unwrap();
        let out = dir.path().join("out");
        std::fs::write(&out, lines(&entries[..3])).unwrap();
        j.checkpoint().unwrap();
        // The last three only in the log and (but for a torn half line) the output.
        j.append(&Chunk::of(&entries[3..])).unwrap();
        let mut text = lines(&entries[..5]);
        text.extend_from_slice(b"{\"cus");
        std::fs::write(&out, &text).unwrap();
        drop(j);

        let mut j = Journal::open(&path).unwrap();
        assert_eq!(j.rows(), 6);
        j.check_output(&out).unwrap();
        let (plan, repair) = j.resume(Some(&out), true).unwrap();
        let repair = repair.unwrap();
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
        assert_eq!(repair.kept, 1);
        assert_eq!(repair.cut, 4);
        assert_eq!(repair.torn_bytes, 5);
        assert_eq!(repair.restored, 2);
        assert_eq!(std::fs::metadata(log_path(&path)).unwrap().len(), 0);
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{\"custom_id\":\"r1\"}\n{\"custom_id\":\"r3\"}\n{\"custom_id\":\"r6\"}\n"
        );
        // New rows follow on from the renumbered ones.
        j.append(&Chunk::of(&[entry(2, None)])).unwrap();
        j.checkpoint().unwrap();
        assert_eq!(j.custom_id_at(4).unwrap().as_deref(), Some("r2"));
        let s = j.status().unwrap();
        assert_eq!((s.done, s.succeeded, s.failed, s.pending), (4, 3, 1, 2));
    }

    /// A journal whose log holds rows 1 to 6 in two chunks, with their records committed by a
    /// checkpoint that kept the log (as a run's checkpoints do), and the output of rows 1
    /// to 6: the state a crash right after that checkpoint leaves.
    fn reused_log(dir: &Path) -> (Journal, PathBuf, Vec<Entry>) {
        let path = dir.join("j");
        let out = dir.join("out");
        let entries: Vec<Entry> = (1..=7).map(|l| entry(l, None)).collect();
        let mut j = Journal::create(&path, meta()).unwrap();
        j.append(&Chunk::of(&entries[..3])).unwrap();
        j.append(&Chunk::of(&entries[3..6])).unwrap();
        std::fs::write(&out, lines(&entries[..6])).unwrap();
        let used = std::fs::metadata(log_path(&path)).unwrap().len();
        j.checkpoint_reusing_log().unwrap();
        assert_eq!(j.log_len(), 0);
        assert_eq!(
            std::fs::metadata(log_path(&path)).unwrap().len(),
            used,
            "kept, not cut"
        );
        (j, out, entries)
    }

    /// The journal dropped, then its log put back as it was: what a killed process leaves.
    fn crash(j: Journal) -> Journal {
        let path = j.path().to_path_buf();
        let log = std::fs::read(log_path(&path)).unwrap();
        let valid = j.log_len();
        drop(j);
        let after = std::fs::metadata(log_path(&path)).unwrap().len();
        assert_eq!(
            after, valid,
            "dropped, a journal cuts its log to its valid part"
        );
        std::fs::write(log_path(&path), log).unwrap();
        Journal::open(&path).unwrap()
    }

    #[test]
    fn a_crash_right_after_a_checkpoint_that_kept_the_log_resumes_with_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let (j, out, entries) = reused_log(dir.path());
        let mut j = crash(j);
        assert_eq!(j.rows(), 6);
        j.check_output(&out).unwrap();
        let (plan, r) = j.resume(Some(&out), false).unwrap();
        assert_eq!((plan.kept, r.unwrap().restored), (6, 0));
        assert_eq!(std::fs::read(&out).unwrap(), lines(&entries[..6]));
        assert_eq!(std::fs::metadata(log_path(j.path())).unwrap().len(), 0);
    }

    /// After a checkpoint that kept it, the log is written over from its start, and a
    /// reader stops at the first chunk of earlier rows past the new ones.
    #[test]
    fn a_reused_log_is_written_over_from_its_start_and_ends_at_the_first_earlier_row() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, out, entries) = reused_log(dir.path());
        let log = log_path(j.path());
        let used = std::fs::metadata(&log).unwrap().len();
        j.append(&Chunk::of(&entries[6..])).unwrap();
        assert!(j.log_len() < used / 2, "{} of {used}", j.log_len());
        assert_eq!(
            std::fs::metadata(&log).unwrap().len(),
            used,
            "written over from the start, not appended"
        );
        // What `sluice status` reads of a live run.
        let live = Journal::open_read_only(j.path()).unwrap();
        assert_eq!(live.rows(), 7);
        assert_eq!(live.status().unwrap().done, 7);
        drop(live);
        // Killed before row 7 reached the output: the next open reads row 7 from the log,
        // not the earlier rows past it, and cuts those.
        let valid = j.log_len();
        let mut j = crash(j);
        assert_eq!(j.rows(), 7);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), valid);
        let mut got = Vec::new();
        j.log_outcomes(|line, _| got.push(line)).unwrap();
        assert_eq!(got, vec![7]);
        let (_, r) = j.resume(Some(&out), false).unwrap();
        assert_eq!(r.unwrap().restored, 1);
        assert_eq!(std::fs::read(&out).unwrap(), lines(&entries));
    }

    /// A resume that drops every row from before the log's first leaves no chunk of a
    /// later row than its last in the log, where the next chunks would follow it.
    #[test]
    fn a_resume_that_drops_the_rows_before_the_log_empties_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::create(&path, meta()).unwrap();
        let stopped = [
            entry(1, Some(ErrorKind::Stopped)),
            entry(2, Some(ErrorKind::Stopped)),
        ];
        j.append(&Chunk::of(&stopped)).unwrap();
        j.checkpoint().unwrap();
        j.append(&Chunk::of(&[entry(3, Some(ErrorKind::NotAttempted))]))
            .unwrap();
        let mut j = crash(j);
        let (plan, _) = j.resume(None, false).unwrap();
        assert_eq!(plan.kept, 0);
        assert_eq!(std::fs::metadata(log_path(&path)).unwrap().len(), 0);
        j.append(&Chunk::of(&[entry(1, None)])).unwrap();
        let j = crash(j);
        assert_eq!(j.rows(), 1);
        assert_eq!(j.custom_id_at(1).unwrap().as_deref(), Some("r1"));
    }

    #[test]
    fn a_torn_tail_is_cut_and_lines_only_in_the_log_restored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::create(&path, meta()).unwrap();
        let entries: Vec<Entry> = (1..=4).map(|l| entry(l, None)).collect();
        j.append(&Chunk::of(&entries)).unwrap();
        let out = dir.path().join("out");
        let mut text = lines(&entries[..2]);
        text.extend_from_slice(b"{\"custom_id\":\"r");
        std::fs::write(&out, &text).unwrap();
        drop(j);
        let mut j = Journal::open(&path).unwrap();
        let (plan, r) = j.resume(Some(&out), false).unwrap();
        let r = r.unwrap();
        assert_eq!(plan.first_changed_seq, None);
        assert_eq!((r.kept, r.torn_bytes, r.cut, r.restored), (2, 15, 0, 2));
        assert_eq!(std::fs::read(&out).unwrap(), lines(&entries));
        // Idempotent.
        let (_, r) = j.resume(Some(&out), false).unwrap();
        assert_eq!(
            r.unwrap(),
            OutputRepair {
                kept: 4,
                ..OutputRepair::default()
            }
        );
        assert_eq!(std::fs::read(&out).unwrap(), lines(&entries));
    }

    #[test]
    fn a_compaction_cut_short_by_a_crash_is_finished_by_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let out = dir.path().join("out");
        let mut j = Journal::create(&path, meta()).unwrap();
        let entries = [
            entry(1, None),
            entry(2, Some(ErrorKind::NotAttempted)),
            entry(3, None),
        ];
        j.append(&Chunk::of(&entries)).unwrap();
        std::fs::write(&out, lines(&entries)).unwrap();
        j.checkpoint().unwrap();
        // The state a crash leaves right after the new log was renamed into place: the
        // log holds the renumbered rows from 2, SQLite still the old ones.
        j.compact(Some(&out), 2, false).unwrap();
        let new_log = std::fs::read(log_path(&path)).unwrap();
        drop(j);
        let mut j = Journal::create(&dir.path().join("k"), meta()).unwrap();
        j.append(&Chunk::of(&entries)).unwrap();
        j.checkpoint().unwrap();
        drop(j);
        std::fs::write(log_path(&dir.path().join("k")), &new_log).unwrap();
        let mut j = Journal::open(&dir.path().join("k")).unwrap();
        assert_eq!(j.rows(), 2);
        assert_eq!(j.custom_id_at(2).unwrap().as_deref(), Some("r3"));
        let (_, r) = j.resume(Some(&out), false).unwrap();
        assert_eq!(r.unwrap().restored, 1);
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{\"custom_id\":\"r1\"}\n{\"custom_id\":\"r3\"}\n"
        );
    }
}
