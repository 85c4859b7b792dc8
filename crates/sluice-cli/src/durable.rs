//! The journal side of `sluice run`: finding, checking and opening a run's journal, the
//! resume that follows, and the sink that commits every outcome before writing it.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use sluice::journal::{
    Chunk, InputFingerprint, Journal, JournalError, JournalMeta, OutputRepair, ResumePlan,
};
use sluice::summary::SummaryBuilder;
use sluice::Outcome;

use crate::cached::{CacheLayer, Pending};

/// Where the journal of a run lives: `--journal`, else beside the output file.
pub fn journal_path(explicit: Option<&Path>, output: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    let out = output?;
    let mut name = out.file_name()?.to_os_string();
    name.push(".journal");
    Some(out.with_file_name(name))
}

/// Removes a journal, its SQLite side files and its outcome log (for `--fresh`).
pub fn remove_journal(path: &Path) -> Result<(), sluice::journal::JournalError> {
    // Not from under a run that has it.
    let _held = match sluice::journal::hold(path) {
        Ok(held) => Some(held),
        Err(sluice::journal::JournalError::Io(e)) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    for suffix in ["", "-wal", "-shm", "-log", "-log.tmp"] {
        let mut p = path.as_os_str().to_os_string();
        p.push(suffix);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Differences between the settings a journal was made with and this run's: the setting
/// and the change in words.
pub fn settings_changes(journal: &JournalMeta, now: &serde_json::Value) -> Vec<(String, String)> {
    let mut changes = Vec::new();
    if let (Some(then), Some(now)) = (journal.settings.as_object(), now.as_object()) {
        for (key, value) in now {
            let before = then.get(key).unwrap_or(&serde_json::Value::Null);
            if before != value {
                changes.push((key.clone(), format!("{key} was {before}, now {value}")));
            }
        }
    }
    changes
}

/// Describes how an input differs from the one a journal was made from.
pub fn input_change(then: &InputFingerprint, now: &InputFingerprint) -> String {
    format!(
        "it had {} requests in {} bytes (BLAKE3 {}…), it now has {} requests in {} bytes (BLAKE3 {}…)",
        then.requests,
        then.bytes,
        &then.blake3[..12.min(then.blake3.len())],
        now.requests,
        now.bytes,
        &now.blake3[..12.min(now.blake3.len())],
    )
}

/// Brings the journal and the output in line for a resume, and says what it did.
pub fn resume(
    journal: &mut Journal,
    output: Option<&Path>,
    retry_failed: bool,
) -> Result<(ResumePlan, Option<OutputRepair>), JournalError> {
    journal.resume(output, retry_failed)
}

/// The output file of a run, opened (made if need be, emptied by [`empty_output`] for a
/// fresh run, written at its end) and held: an exclusive `flock` for as long as the run
/// writes it. It is taken before the journal is made or a resume repairs the output, so
/// another run writing the same file, with its own journal or none, is refused before it
/// changes anything.
pub fn hold_output(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    #[cfg(unix)]
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "another sluice run is writing it; nothing was changed or sent",
            ))
        }
        // Where the file system cannot lock, unguarded.
        Err(std::fs::TryLockError::Error(e)) => {
            tracing::warn!("cannot lock the output {} ({e})", path.display())
        }
    }
    Ok(file)
}

/// Empties the output of a fresh run, held by [`hold_output`]. A pipe or a device
/// (`/dev/stdout`) is left as it is: there is nothing to empty.
pub fn empty_output(file: &File) -> io::Result<()> {
    if file.metadata()?.is_file() {
        file.set_len(0)?;
    }
    Ok(())
}

/// Outcomes this many at most go into one chunk of the journal's log.
pub const MAX_BATCH: usize = 1024;

/// Outcomes are journaled (one chunk of the log, one `writev()`) as soon as this many
/// wait...
pub const GROUP_COMMIT: usize = 128;

/// ...or when the first of them has waited this long, rounded up to the engine's send grid
/// (100 ms), so that in a paced run the write shares the wake-up that sends the next
/// requests instead of waking the process once more per response (measured on the paced
/// benchmark: a timer of its own cost +1.2 s of client CPU, +47%). A crash can lose what
/// arrived in that time, besides the attempts in flight.
pub const COMMIT_DELAY: std::time::Duration = std::time::Duration::from_millis(2);

/// The journal checkpoints (output flushed, records committed to SQLite, log emptied) at
/// every [`Sink::flush`] (each second), or sooner once this many records wait, which
/// bounds the records held in memory...
pub const CHECKPOINT_ROWS: u64 = 65_536;

/// ...or once its log holds this many bytes. The log is written over from its start after
/// each (see `Journal::checkpoint_reusing_log`), so this bounds the pages it takes: a log
/// that kept growing until the next second cost the kernel a page's allocation and
/// freeing for every 4 KiB of output lines.
pub const CHECKPOINT_BYTES: u64 = 4 << 20;

/// Responses are stored in the cache this many at a time (or at the next flush, every
/// second): one write to its data file and one small transaction (see
/// `sluice::cache::Cache`). A crash loses at most this batch of the cache, which costs
/// nothing but a second request for those (the journal, not the cache, is what resumes a
/// run).
pub const CACHE_BATCH: usize = 1024;

/// Where outcomes go: the journal (first, committed), then the output and the summary. An
/// error is kept (and stops the run); later outcomes are still counted.
pub struct Sink {
    writer: BufWriter<Box<dyn Write + Send>>,
    journal: Option<Journal>,
    cache: Option<CacheLayer>,
    /// Responses for the cache, stored at the next commit.
    to_cache: Pending,
    /// Outcomes to journal, with their output lines.
    batch: Chunk,
    /// The summary of this session's outcomes.
    pub summary: SummaryBuilder,
    /// The first error writing the journal or the output, or the journal's disk nearly
    /// full: the run stops. Outcomes still arriving (of requests already sent, and paid
    /// for) are journaled while the journal's log takes them, and written out while the
    /// output does; the log is not emptied from then on, so a resume writes out what the
    /// output lacks.
    pub error: Option<anyhow::Error>,
    /// Whether the journal's log failed.
    journal_failed: bool,
    /// Whether the output failed.
    output_failed: bool,
    /// Outcomes of requests that were sent that are in neither the journal nor the output
    /// (the journal failed, or the output did with no journal).
    pub lost: usize,
    /// Responses the cache failed to store.
    pub uncached: usize,
}

/// How many of the output lines in `held` (what an output's buffer held when it failed)
/// are of requests that were sent. The first may be cut (its start written before the
/// failure) and unreadable: it is counted, since whether it was sent cannot be told.
fn sent_lines(held: &[u8]) -> usize {
    #[derive(serde::Deserialize)]
    struct Attempts {
        attempts: u32,
    }
    held.split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .filter(|line| serde_json::from_slice::<Attempts>(line).map_or(true, |a| a.attempts > 0))
        .count()
}

impl Sink {
    /// A sink writing to `writer`, journaling to `journal` and caching in `cache` when
    /// given.
    pub fn new(
        writer: Box<dyn Write + Send>,
        journal: Option<Journal>,
        cache: Option<CacheLayer>,
    ) -> Self {
        let caching = cache.is_some();
        Sink {
            writer: BufWriter::with_capacity(1 << 16, writer),
            journal,
            cache,
            to_cache: Pending::with_capacity(if caching { CACHE_BATCH } else { 0 }),
            batch: Chunk::default(),
            summary: SummaryBuilder::new(),
            error: None,
            journal_failed: false,
            output_failed: false,
            lost: 0,
            uncached: 0,
        }
    }

    /// Takes the outcomes of requests that were sent, and empties `outcomes`: with those
    /// of the identical requests that waited for them, they are written by the next
    /// [`commit`](Self::commit).
    pub fn add_sent(&mut self, outcomes: &mut Vec<Outcome>) {
        for outcome in outcomes.iter() {
            self.add_one(outcome);
        }
        if let Some(layer) = &self.cache {
            let mut followers = Vec::new();
            layer.answered(outcomes, &mut self.to_cache, &mut followers);
            for follower in &followers {
                self.add_one(follower);
            }
        }
        outcomes.clear();
    }

    /// Takes the outcome of a request that was never sent (a cache hit, a bad line), which
    /// no other request waits for; it is written by the next [`commit`](Self::commit).
    pub fn add_unsent(&mut self, outcome: &Outcome) {
        self.add_one(outcome);
    }

    fn add_one(&mut self, outcome: &Outcome) {
        self.summary.add(outcome);
        if self.journal.is_none() {
            if self.output_failed {
                self.lost += usize::from(outcome.attempts > 0);
            } else if let Err(e) = self.writer.write_all(&outcome.to_json_line()) {
                // Neither written nor held in the buffer (a write that fails buffers
                // nothing): lost, as are the lines the buffer held.
                self.lost += usize::from(outcome.attempts > 0);
                self.output_error(e, "writing outcomes failed");
            }
            return;
        }
        if self.journal_failed {
            self.lost += usize::from(outcome.attempts > 0);
            return;
        }
        self.batch.push(outcome);
        if self.batch.len() >= MAX_BATCH {
            self.commit();
        }
    }

    /// The output failed: nothing more is written to it. Keeps the first error.
    ///
    /// With no journal, the lines its buffer still holds have nowhere else to go: they are
    /// dropped (not tried again when the output is dropped, so that its end stays where the
    /// failure left it) and those of requests that were sent are counted as lost.
    fn output_error(&mut self, e: io::Error, what: &'static str) {
        if self.error.is_none() {
            self.error = Some(anyhow::Error::new(e).context(what));
        }
        if !self.output_failed && self.journal.is_none() {
            let writer = std::mem::replace(
                &mut self.writer,
                BufWriter::with_capacity(0, Box::new(io::sink())),
            );
            let (_, held) = writer.into_parts();
            self.lost += sent_lines(&held.unwrap_or_else(|p| p.into_inner()));
        }
        self.output_failed = true;
    }

    /// Outcomes taken and not yet committed.
    pub fn pending(&self) -> usize {
        self.batch.len()
    }

    /// Commits the outcomes taken so far to the journal, then writes them out; stores new
    /// responses in the cache once [`CACHE_BATCH`] of them wait.
    pub fn commit(&mut self) {
        self.commit_journal();
        if self.to_cache.len() >= CACHE_BATCH {
            self.store_cache();
        }
    }

    fn store_cache(&mut self) {
        if let Some(layer) = &self.cache {
            let n = self.to_cache.len();
            if let Err(e) = layer.store(&mut self.to_cache) {
                // Said once; later batches are still tried (space may come back).
                if self.uncached == 0 {
                    eprintln!(
                        "warning: storing responses in the cache failed: {e}; the run goes on, and a later run sends the requests whose responses were not stored"
                    );
                }
                self.uncached += n;
            }
        }
    }

    fn commit_journal(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let journal = self.journal.as_mut().expect("batches only with a journal");
        if let Err(e) = journal.append(&self.batch) {
            if self.error.is_none() {
                self.error = Some(anyhow::Error::new(e).context("journaling outcomes failed"));
            }
            self.journal_failed = true;
            self.lost += self.batch.sent();
            self.batch.clear();
            return;
        }
        if journal.space_low() && self.error.is_none() {
            self.error = Some(anyhow::anyhow!(
                "the journal {} cannot grow by {} MiB more (its disk is nearly full, or the file size limit, `ulimit -f`, is near): sending stopped, and the outcomes of the requests already sent are journaled. Free some space, then run the same command again to send the rest",
                journal.path().display(),
                sluice::journal::LOG_RESERVE >> 20
            ));
        }
        let full = journal.unsynced() >= CHECKPOINT_ROWS || journal.log_len() >= CHECKPOINT_BYTES;
        if self.output_failed {
            // In the log only: a resume writes them out.
            self.batch.clear();
            return;
        }
        // The lines are together in the chunk already: written with one call, not copied
        // into the buffer (which, with a journal, holds nothing).
        let w = &mut self.writer;
        let written = w
            .flush()
            .and_then(|()| w.get_mut().write_all(self.batch.lines()));
        self.batch.clear();
        if let Err(e) = written {
            self.output_error(
                e,
                "writing outcomes failed (they are in the journal: run again to restore them)",
            );
            return;
        }
        if full {
            self.checkpoint();
        }
    }

    /// Stores what waits for the cache, flushes the output, then checkpoints the journal:
    /// the output now holds every line the journal's log did, and the cache every
    /// response (a resume stores those of the outcomes still in the log, which a killed
    /// session may not have).
    fn checkpoint(&mut self) {
        self.store_cache();
        if self.error.is_some() {
            return;
        }
        if let Err(e) = self.writer.flush() {
            self.output_error(e, "writing outcomes failed");
            return;
        }
        if let Some(j) = self.journal.as_mut() {
            if let Err(e) = j.checkpoint_reusing_log() {
                self.error = Some(anyhow::Error::new(e).context(
                    "committing outcomes to the journal failed (they are in its log and the output: run again to resume)",
                ));
            }
        }
    }

    /// Journals what waits, stores what waits for the cache, flushes the output and
    /// checkpoints the journal.
    pub fn flush(&mut self) {
        self.commit_journal();
        self.checkpoint();
    }

    /// The journal, once the run is over.
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice::outcome::{Status, Usage};

    /// An output that takes `left` bytes, then fails as a full disk does.
    struct FullAfter {
        file: File,
        left: usize,
    }

    impl Write for FullAfter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.left == 0 {
                return Err(io::Error::from_raw_os_error(28));
            }
            let n = buf.len().min(self.left);
            self.left -= n;
            self.file.write(&buf[..n])
        }

        fn flush(&mut self) -> io::Result<()> {
            self.file.flush()
        }
    }

    /// A journal's settings for a run of `requests` writing to `output`.
    fn test_meta(output: &Path, requests: u64) -> JournalMeta {
        JournalMeta {
            input: InputFingerprint {
                blake3: "00".into(),
                bytes: 1,
                requests,
            },
            input_path: "in.jsonl".into(),
            output_path: output.display().to_string(),
            settings: serde_json::json!({}),
            created_by: "test".into(),
            created_at: "now".into(),
            by_custom_id: false,
            orphans: 0,
        }
    }

    fn outcome(line: u64) -> Outcome {
        Outcome {
            custom_id: format!("r{line}"),
            status: Status::Succeeded,
            model: "gpt-4.1-mini".into(),
            response: None,
            error: None,
            attempts: 1,
            usage: Some(Usage {
                prompt_tokens: line,
                completion_tokens: 2 * line,
                total_tokens: 3 * line,
                cached_tokens: 0,
                cache_write_tokens: 0,
            }),
            cost_usd: Some(0.001),
            latency_ms: 5,
            metadata: None,
            cached: false,
            line,
            cache_key: None,
        }
    }

    /// SQLite's commit at a checkpoint fails (here another connection holds the write
    /// lock, so the commit gives up after the journal's 5 s busy timeout): the run stops,
    /// but the outcomes still arriving are journaled in the log and written out all the
    /// same, and the log is kept, so a resume has every one.
    #[test]
    fn after_a_checkpoint_fails_the_outcomes_still_arriving_are_journaled_and_written() {
        let dir = tempfile::tempdir().unwrap();
        let (journal_path, output) = (dir.path().join("out.journal"), dir.path().join("out"));
        let journal = Journal::create(&journal_path, test_meta(&output, 100)).unwrap();
        let mut sink = Sink::new(
            Box::new(File::create(&output).unwrap()),
            Some(journal),
            None,
        );
        let all: Vec<Outcome> = (1..=100).map(outcome).collect();
        sink.add_sent(&mut all[..50].to_vec());
        sink.commit();
        let other = rusqlite::Connection::open(&journal_path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        sink.flush();
        let error = format!("{:#}", sink.error.as_ref().expect("the checkpoint failed"));
        assert!(
            error.contains("committing outcomes to the journal failed"),
            "{error}"
        );
        other.execute_batch("ROLLBACK").unwrap();
        drop(other);
        sink.add_sent(&mut all[50..].to_vec());
        sink.flush();
        assert_eq!(
            sink.journal().unwrap().rows(),
            100,
            "every outcome is journaled"
        );
        let expected: Vec<u8> = all.iter().flat_map(Outcome::to_json_line).collect();
        assert_eq!(std::fs::read(&output).unwrap(), expected, "and written out");
        drop(sink);

        let mut journal = Journal::open(&journal_path).unwrap();
        let (plan, _) = resume(&mut journal, Some(&output), false).unwrap();
        assert_eq!(plan.kept, 100);
        assert_eq!(std::fs::read(&output).unwrap(), expected);
    }

    /// With no journal, the outcomes the output did not take whole have nowhere to go:
    /// those after it failed, the one whose writing failed, and those its buffer held. Each
    /// of a request that was sent is counted as lost (and said), none written.
    #[test]
    fn with_no_journal_the_outcomes_after_the_output_fails_are_counted_as_lost() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("out");
        let writer = FullAfter {
            file: File::create(&output).unwrap(),
            left: 10_000,
        };
        let mut sink = Sink::new(Box::new(writer), None, None);
        // Every tenth never sent (a bad line, a cache hit): nothing paid, not counted.
        let outcome = |line| Outcome {
            attempts: u32::from(line % 10 != 0),
            ..outcome(line)
        };
        let mut failed_at = None;
        for line in 1..=1000 {
            sink.add_unsent(&outcome(line));
            if sink.error.is_some() && failed_at.is_none() {
                failed_at = Some(line);
            }
        }
        failed_at.expect("the output failed");
        let size = std::fs::metadata(&output).unwrap().len();
        sink.flush();
        drop(sink.writer);
        let written = std::fs::read(&output).unwrap();
        assert_eq!(written.len() as u64, size, "nothing more written");
        // The output holds lines 1 to `whole` whole, then part of the next (the first the
        // buffer held when the write failed), which is counted whether or not it was sent.
        let whole = written.iter().filter(|&&b| b == b'\n').count() as u64;
        let expected: Vec<u8> = (1..=whole)
            .flat_map(|l| outcome(l).to_json_line())
            .collect();
        assert!(written.starts_with(&expected), "the lines in order");
        let cut = written.len() > expected.len();
        let lost = (whole + 1..=1000)
            .filter(|&l| l % 10 != 0 || (cut && l == whole + 1))
            .count();
        assert_eq!(sink.lost, lost);
        assert!(
            lost > (1000 - whole as usize) / 2,
            "most of the lines the output did not take are counted"
        );
    }

    /// The output fills up part way through a run: the requests still live when it fails
    /// were sent and paid for, so their outcomes are journaled all the same, and the resume
    /// writes every outcome out, each once, in order.
    #[test]
    fn outcomes_after_the_output_fails_are_journaled_and_restored_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let (journal_path, output) = (dir.path().join("out.journal"), dir.path().join("out"));
        let journal = Journal::create(&journal_path, test_meta(&output, 300)).unwrap();
        let writer = FullAfter {
            file: File::create(&output).unwrap(),
            left: 10_000,
        };
        let mut sink = Sink::new(Box::new(writer), Some(journal), None);
        let all: Vec<Outcome> = (1..=300).map(outcome).collect();
        for group in all.chunks(50) {
            sink.add_sent(&mut group.to_vec());
            sink.commit();
        }
        sink.flush();
        let error = format!("{:#}", sink.error.as_ref().expect("the output failed"));
        assert!(error.contains("writing outcomes failed"), "{error}");
        let written = std::fs::metadata(&output).unwrap().len();
        assert_eq!(written, 10_000, "the output took what it could, no more");
        assert_eq!(
            sink.journal().unwrap().rows(),
            300,
            "every outcome is journaled"
        );
        drop(sink);

        let mut journal = Journal::open(&journal_path).unwrap();
        let (plan, _) = resume(&mut journal, Some(&output), false).unwrap();
        assert_eq!(plan.kept, 300);
        let expected: Vec<u8> = all.iter().flat_map(Outcome::to_json_line).collect();
        assert_eq!(std::fs::read(&output).unwrap(), expected);
    }
}
