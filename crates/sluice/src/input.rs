//! Reading a JSONL input file: a cheap first pass that finds every bad line and every
//! duplicate `custom_id` before anything is sent, then a streamed second pass that feeds
//! the engine. Memory stays flat in the input's length: the first pass keeps 16 bytes per
//! line (a hash of the `custom_id` and the line number) and frees them before the run; the
//! second pass holds one line at a time plus a bounded channel.
//!
//! Blank lines are ignored. Line numbers are 1-based and count blank lines.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::hash::BuildHasher;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use crate::request::{BadLine, LineParser, Request};

/// What the first pass found.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// Lines that are requests (blank lines not counted).
    pub requests: u64,
    /// Every bad line, in line order.
    pub bad: Vec<BadLine>,
}

impl ScanReport {
    /// Requests that will be sent: the good lines.
    pub fn good(&self) -> u64 {
        self.requests - self.bad.len() as u64
    }
}

/// Checks every line of `path` and finds duplicate `custom_id`s (every occurrence after the
/// first is a bad line that names the first).
pub fn scan(path: &Path, parser: &LineParser) -> io::Result<ScanReport> {
    let mut report = ScanReport::default();
    // Fixed keys: the hash only has to be stable within this call.
    let hasher =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
    let mut ids: Vec<(u64, u64)> = Vec::new();
    for_each_line(path, |line_no, text| {
        report.requests += 1;
        match parser.check(line_no, text) {
            Ok(id) => ids.push((hasher.hash_one(&id), line_no)),
            Err(bad) => report.bad.push(bad),
        }
    })?;
    ids.sort_unstable();
    // Lines whose custom_id hash repeats: confirm with the real strings (hashes can collide).
    let mut suspects: HashSet<u64> = HashSet::new();
    for w in ids.windows(2) {
        if w[0].0 == w[1].0 {
            suspects.insert(w[0].1);
            suspects.insert(w[1].1);
        }
    }
    drop(ids);
    if !suspects.is_empty() {
        let mut first_line: HashMap<String, u64> = HashMap::new();
        for_each_line(path, |line_no, text| {
            if !suspects.contains(&line_no) {
                return;
            }
            let id = parser
                .check(line_no, text)
                .expect("checked in the first pass");
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

/// Calls `f(line_number, text)` for every non-blank line.
fn for_each_line(path: &Path, mut f: impl FnMut(u64, &str)) -> io::Result<()> {
    for_each_line_until(path, |line_no, text| {
        f(line_no, text);
        true
    })
}

/// Requests go to the engine in batches of this many, so the reader thread and the
/// scheduler wake each other once per batch rather than once per request.
const BATCH: usize = 64;

/// Streams the requests of `path` into a channel holding up to `buffer` batches, from a
/// blocking thread. Lines listed in `bad` (from [`scan`]) are not sent as requests but to
/// `bad_tx`. Returns the receiver of request batches; the thread ends at the end of the
/// file, or early when the receiver is dropped.
pub fn stream(
    path: PathBuf,
    parser: LineParser,
    bad: Vec<BadLine>,
    buffer: usize,
    bad_tx: mpsc::UnboundedSender<BadLine>,
) -> mpsc::Receiver<io::Result<Vec<Request>>> {
    let (tx, rx) = mpsc::channel(buffer);
    std::thread::Builder::new()
        .name("sluice-input".into())
        .spawn(move || {
            let mut bad: HashMap<u64, BadLine> = bad.into_iter().map(|b| (b.line, b)).collect();
            let mut batch = Vec::with_capacity(BATCH);
            let result = for_each_line_until(&path, |line_no, text| {
                if let Some(b) = bad.remove(&line_no) {
                    let _ = bad_tx.send(b);
                    return true;
                }
                match parser.parse(line_no, text) {
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

/// Like [`for_each_line`], stopping early when `f` returns false.
fn for_each_line_until(path: &Path, mut f: impl FnMut(u64, &str) -> bool) -> io::Result<()> {
    let mut reader = BufReader::with_capacity(1 << 16, File::open(path)?);
    let mut buf = String::new();
    let mut line_no = 0u64;
    loop {
        buf.clear();
        if reader.read_line(&mut buf)? == 0 {
            return Ok(());
        }
        line_no += 1;
        let text = buf.trim_end_matches(['\n', '\r']);
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
        let r = scan(f.path(), &parser).unwrap();
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
        let r = scan(f.path(), &parser).unwrap();
        let (bad_tx, mut bad_rx) = mpsc::unbounded_channel();
        let mut rx = stream(f.path().to_path_buf(), parser, r.bad, 4, bad_tx);
        let mut ids = vec![];
        while let Some(batch) = rx.recv().await {
            ids.extend(batch.unwrap().into_iter().map(|r| r.custom_id));
        }
        assert_eq!(ids, vec!["line-1", "line-3"]);
        assert_eq!(bad_rx.recv().await.unwrap().line, 2);
    }
}
