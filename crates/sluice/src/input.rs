//! Reading a JSONL input file: a cheap first pass that finds every bad line and every
//! duplicate `custom_id` before anything is sent, then a streamed second pass that feeds
//! the engine. The first pass keeps 8 bytes per line (a hash of the `custom_id`: 8 MB for a
//! million lines) and frees them before the run; the second pass holds one line at a time
//! plus a bounded channel, so the run's memory is flat in the input's length.
//!
//! Blank lines are ignored. Line numbers are 1-based and count blank lines.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::hash::BuildHasher;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use crate::journal::{Fingerprinter, InputFingerprint, LineSet};
use crate::request::{BadLine, LineParser, Request};

/// Requests a resumed run leaves out because the journal has their outcome.
#[derive(Debug, Default)]
pub enum Done {
    /// None: a fresh run.
    #[default]
    Nothing,
    /// By input line number (the input is the one the journal was made from).
    Lines(LineSet),
    /// By `custom_id` (the input changed since, and the resume was forced).
    Ids(HashSet<String>),
}

impl Done {
    fn line(&self, line_no: u64) -> bool {
        matches!(self, Done::Lines(set) if set.contains(line_no))
    }

    fn id(&self, id: &str) -> bool {
        matches!(self, Done::Ids(ids) if ids.contains(id))
    }
}

/// What the first pass found.
#[derive(Debug)]
pub struct ScanReport {
    /// Lines that are requests (blank lines not counted).
    pub requests: u64,
    /// Every bad line, in line order (lines already done not included).
    pub bad: Vec<BadLine>,
    /// Requests left out because they are already done.
    pub done: u64,
    /// The input's fingerprint.
    pub fingerprint: InputFingerprint,
}

impl ScanReport {
    /// Requests that will be sent: the good lines not already done.
    pub fn good(&self) -> u64 {
        self.requests - self.done - self.bad.len() as u64
    }
}

/// Checks every line of `path` and finds duplicate `custom_id`s (every occurrence after the
/// first is a bad line that names the first), and fingerprints the file. Lines `done`
/// are counted, not checked (they were when they ran).
pub fn scan(path: &Path, parser: &LineParser, done: &Done) -> io::Result<ScanReport> {
    let mut report = ScanReport {
        requests: 0,
        bad: Vec::new(),
        done: 0,
        fingerprint: Fingerprinter::default().finish(0),
    };
    // Fixed keys: the hash only has to be stable within this call.
    let hasher =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
    // Each custom_id's hash, in line order: 8 bytes a line, freed before the run.
    let mut hashes: Vec<u64> = Vec::new();
    let mut fingerprint = Fingerprinter::default();
    read_lines(path, Some(&mut fingerprint), |line_no, text| {
        report.requests += 1;
        if done.line(line_no) {
            report.done += 1;
            return true;
        }
        match parser.check(line_no, text) {
            Ok(id) if done.id(&id) => report.done += 1,
            Ok(id) => hashes.push(hasher.hash_one(&id)),
            Err(bad) => {
                let id = bad
                    .custom_id
                    .clone()
                    .unwrap_or_else(|| LineParser::derived_custom_id(line_no));
                if done.id(&id) {
                    report.done += 1;
                } else {
                    report.bad.push(bad);
                }
            }
        }
        true
    })?;
    report.fingerprint = fingerprint.finish(report.requests);
    hashes.sort_unstable();
    let mut repeated: HashSet<u64> = HashSet::new();
    for w in hashes.windows(2) {
        if w[0] == w[1] {
            repeated.insert(w[0]);
        }
    }
    drop(hashes);
    if !repeated.is_empty() {
        // Some custom_id is given twice (or two hashes are alike): the file is read again,
        // and the lines whose hash repeats are confirmed with the real strings. Only bad
        // input pays for this second reading; keeping each hash's line number instead
        // doubled the memory of every scan.
        let mut first_line: HashMap<String, u64> = HashMap::new();
        for_each_line(path, |line_no, text| {
            if done.line(line_no) {
                return;
            }
            let Ok(id) = parser.check(line_no, text) else {
                return;
            };
            if done.id(&id) || !repeated.contains(&hasher.hash_one(&id)) {
                return;
            }
            match first_line.get(&id) {
                Some(first) => report.bad.push(BadLine {
                    line: line_no,
                    custom_id: Some(id),
                    field: Some("custom_id".into()),
                    reason: format!("duplicate: line {first} has the same custom_id"),
                }),
                None => {
                    first_line.insert(id, line_no);
                }
            }
        })?;
        report.bad.sort_by_key(|b| b.line);
    }
    Ok(report)
}

/// The text of each of the `wanted` lines of `path` (1-based, blank ones counted), in the
/// file's order; lines past its end are left out. Reads up to the last one wanted.
pub fn lines_at(path: &Path, wanted: &HashSet<u64>) -> io::Result<Vec<(u64, String)>> {
    let last = wanted.iter().copied().max().unwrap_or(0);
    let mut found = Vec::with_capacity(wanted.len());
    read_lines(path, None, |line_no, text| {
        if wanted.contains(&line_no) {
            found.push((line_no, text.to_string()));
        }
        line_no < last
    })?;
    Ok(found)
}

/// Calls `f(line_number, text)` for every non-blank line.
fn for_each_line(path: &Path, mut f: impl FnMut(u64, &str)) -> io::Result<()> {
    read_lines(path, None, |line_no, text| {
        f(line_no, text);
        true
    })
}

/// Requests go to the engine in batches of this many, so the reader thread and the
/// scheduler wake each other once per batch rather than once per request.
const BATCH: usize = 64;

/// Streams the requests of `path` into a channel holding up to `buffer` batches, from a
/// blocking thread. Lines listed in `bad` (from [`scan`]) are not sent as requests but to
/// `bad_tx`; lines `done` are left out. Returns the receiver of request batches; the thread
/// ends at the end of the file, or early when the receiver is dropped.
pub fn stream(
    path: PathBuf,
    parser: LineParser,
    bad: Vec<BadLine>,
    done: Done,
    buffer: usize,
    bad_tx: mpsc::UnboundedSender<BadLine>,
) -> mpsc::Receiver<io::Result<Vec<Request>>> {
    let (tx, rx) = mpsc::channel(buffer);
    std::thread::Builder::new()
        .name("sluice-input".into())
        .spawn(move || {
            let mut bad: HashMap<u64, BadLine> = bad.into_iter().map(|b| (b.line, b)).collect();
            let mut batch = Vec::with_capacity(BATCH);
            let result = read_lines(&path, None, |line_no, text| {
                if done.line(line_no) {
                    return true;
                }
                if let Some(b) = bad.remove(&line_no) {
                    let _ = bad_tx.send(b);
                    return true;
                }
                match parser.parse(line_no, text) {
                    Ok(request) if done.id(&request.custom_id) => true,
                    Ok(request) => {
                        batch.push(request);
                        batch.len() < BATCH
                            || tx
                                .blocking_send(Ok(std::mem::replace(
                                    &mut batch,
                                    Vec::with_capacity(BATCH),
                                )))
                                .is_ok()
                    }
                    Err(b) => {
                        // The file changed under us since the scan; report, do not send.
                        let _ = bad_tx.send(b);
                        true
                    }
                }
            });
            if !batch.is_empty() {
                let _ = tx.blocking_send(Ok(batch));
            }
            if let Err(e) = result {
                let _ = tx.blocking_send(Err(e));
            }
        })
        .expect("spawning the input thread");
    rx
}

/// Like [`for_each_line`], stopping early when `f` returns false, feeding every byte to
/// `fingerprint` when given.
fn read_lines(
    path: &Path,
    mut fingerprint: Option<&mut Fingerprinter>,
    mut f: impl FnMut(u64, &str) -> bool,
) -> io::Result<()> {
    // Lines are read in place from a buffer that grows only for a line longer than it, and
    // the fingerprint is fed whole reads (BLAKE3 hashes big inputs several chunks at once).
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 1 << 16];
    let (mut start, mut end) = (0usize, 0usize);
    let mut line_no = 0u64;
    let mut eof = false;
    loop {
        let line = match memchr::memchr(b'\n', &buf[start..end]) {
            Some(i) => {
                let line = start..start + i;
                start += i + 1;
                line
            }
            None if eof => {
                if start == end {
                    return Ok(());
                }
                let line = start..end;
                start = end;
                line
            }
            None => {
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
                if end == buf.len() {
                    buf.resize(buf.len() * 2, 0);
                }
                let n = match file.read(&mut buf[end..]) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                if let Some(fp) = fingerprint.as_deref_mut() {
                    fp.update(&buf[end..end + n]);
                }
                end += n;
                eof = n == 0;
                continue;
            }
        };
        line_no += 1;
        let text = std::str::from_utf8(&buf[line]).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("line {line_no} is not valid UTF-8: {e}"),
            )
        })?;
        let text = text.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            continue;
        }
        if !f(line_no, text) {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    /// Lines are found across reads, in lines longer than the buffer, with `\r\n` endings
    /// and without a last newline; the fingerprint is BLAKE3 of the whole file; a line that
    /// is not UTF-8 is named.
    #[test]
    fn lines_are_read_whole_and_the_fingerprint_is_the_files() {
        let long = format!("{{\"prompt\":\"{}\"}}", "w".repeat(200_000));
        let mut text = String::new();
        for i in 0..3000 {
            text.push_str(&format!("{{\"custom_id\":\"r{i}\",\"prompt\":\"p\"}}\r\n"));
            if i % 1000 == 7 {
                text.push_str(&long);
                text.push_str("\n\n");
            }
        }
        text.push_str("{\"prompt\":\"last\"}");
        let f = file(&text);
        let mut seen = Vec::new();
        let mut fp = Fingerprinter::default();
        read_lines(f.path(), Some(&mut fp), |n, line| {
            seen.push((n, line.len(), line.ends_with('}')));
            true
        })
        .unwrap();
        assert_eq!(seen.len(), 3000 + 3 + 1);
        assert!(seen.iter().all(|s| s.2), "no line keeps its ending");
        assert_eq!(seen.iter().filter(|s| s.1 == long.len()).count(), 3);
        assert_eq!(
            seen.last().unwrap().0,
            3000 + 3 * 2 + 1,
            "blank lines are counted"
        );
        let mut whole = Fingerprinter::default();
        whole.update(text.as_bytes());
        assert_eq!(fp.finish(1), whole.finish(1));

        let bad = file("{\"prompt\":\"a\"}\n{\"prompt\":\"\u{ff}\"}\n");
        std::fs::write(bad.path(), b"{\"prompt\":\"a\"}\n{\"prompt\":\"\xff\"}\n").unwrap();
        let err = read_lines(bad.path(), None, |_, _| true).unwrap_err();
        assert!(
            err.to_string().contains("line 2 is not valid UTF-8"),
            "{err}"
        );
    }

    #[test]
    fn scan_reports_every_bad_line_and_duplicates() {
        let f = file(concat!(
            "{\"custom_id\":\"a\",\"prompt\":\"x\"}\n",
            "\n",
            "{oops\n",
            "{\"custom_id\":\"b\",\"prompt\":\"x\"}\n",
            "{\"custom_id\":\"a\",\"prompt\":\"y\"}\n",
            "{\"prompt\":5}\n",
            "{\"custom_id\":\"a\",\"prompt\":\"z\"}",
        ));
        let parser = LineParser::new(Some("m".into()));
        let r = scan(f.path(), &parser, &Done::Nothing).unwrap();
        assert_eq!(r.requests, 6);
        let lines: Vec<u64> = r.bad.iter().map(|b| b.line).collect();
        assert_eq!(lines, vec![3, 5, 6, 7]);
        assert!(r.bad[1].reason.contains("line 1 has the same custom_id"));
        assert_eq!(r.good(), 2);
    }

    #[tokio::test]
    async fn stream_sends_good_lines_and_reports_bad_ones() {
        let f = file("{\"prompt\":\"a\"}\n{bad\n{\"prompt\":\"b\"}\n");
        let parser = LineParser::new(Some("m".into()));
        let r = scan(f.path(), &parser, &Done::Nothing).unwrap();
        let (bad_tx, mut bad_rx) = mpsc::unbounded_channel();
        let mut rx = stream(
            f.path().to_path_buf(),
            parser,
            r.bad,
            Done::Nothing,
            4,
            bad_tx,
        );
        let mut ids = vec![];
        while let Some(batch) = rx.recv().await {
            ids.extend(batch.unwrap().into_iter().map(|r| r.custom_id));
        }
        assert_eq!(ids, vec!["line-1", "line-3"]);
        assert_eq!(bad_rx.recv().await.unwrap().line, 2);
    }
}
