//! An instance's log. llama-server writes stdout and stderr straight into
//! a file in the state directory (opened `O_APPEND`, no pipe: the server
//! never gets SIGPIPE when the agent dies, and keeps logging while the agent
//! restarts). The agent tails that file into a bounded in-memory ring of the
//! last lines, which TailLogs serves, and rotates it (copy to `.1`, then
//! truncate) when it outgrows its limit.

use proto::domain::LogLine;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Lines kept in memory per instance.
pub const RING_LINES: usize = 1000;
/// Longest line kept (longer lines are cut, marked with `…`).
pub const MAX_LINE_BYTES: usize = 4096;
/// Most bytes read from the file per poll.
const MAX_READ_BYTES: u64 = 1 << 20;

/// The last [`RING_LINES`] lines of an instance's log.
#[derive(Debug, Default)]
pub struct LogRing {
    lines: VecDeque<LogLine>,
}

impl LogRing {
    /// Appends a line, dropping the oldest beyond the limit.
    pub fn push(&mut self, line: LogLine) {
        if self.lines.len() == RING_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// Keeps only the last `n` lines (a stopped instance needs fewer).
    pub fn keep_last(&mut self, n: usize) {
        let drop = self.lines.len().saturating_sub(n);
        self.lines.drain(..drop);
        self.lines.shrink_to_fit();
    }

    /// The last `n` lines, oldest first.
    pub fn last(&self, n: usize) -> Vec<LogLine> {
        let skip = self.lines.len().saturating_sub(n);
        self.lines.iter().skip(skip).cloned().collect()
    }
}

/// Reads what was appended to a log file since the last call.
#[derive(Debug)]
pub struct LogTail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    max_bytes: u64,
}

impl LogTail {
    /// A tail of `path` from its start; rotates past `max_bytes`.
    pub fn new(path: PathBuf, max_bytes: u64) -> LogTail {
        LogTail {
            path,
            offset: 0,
            partial: Vec::new(),
            max_bytes,
        }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Continue from the file's current end.
    pub fn seek_end(&mut self) {
        self.offset = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        self.partial.clear();
    }

    /// Continue from about `bytes` before the end, at a line start: seeds
    /// the ring of an adopted instance with its recent lines.
    pub fn seek_back(&mut self, bytes: u64) {
        let len = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        self.partial.clear();
        let start = len.saturating_sub(bytes);
        self.offset = start;
        if start == 0 {
            return;
        }
        // Start after the first newline at or after byte `start - 1`, so a
        // line that began before `start` is skipped whole.
        self.offset = len;
        let Ok(mut f) = File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(start - 1)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if f.take(bytes + 1).read_to_end(&mut buf).is_ok()
            && let Some(nl) = buf.iter().position(|&b| b == b'\n')
        {
            self.offset = start + nl as u64;
        }
    }

    /// Complete lines appended since the last call (a trailing partial line
    /// waits for its newline). Rotates the file when it is past its limit.
    pub fn read_lines(&mut self) -> Vec<String> {
        let Ok(mut f) = File::open(&self.path) else {
            return Vec::new();
        };
        let len = f.metadata().map_or(0, |m| m.len());
        if len < self.offset {
            // Truncated (rotated) under us: start over.
            self.offset = 0;
            self.partial.clear();
        }
        let mut lines = Vec::new();
        if len > self.offset && f.seek(SeekFrom::Start(self.offset)).is_ok() {
            let mut buf = std::mem::take(&mut self.partial);
            let before = buf.len();
            if (&mut f).take(MAX_READ_BYTES).read_to_end(&mut buf).is_ok() {
                self.offset += (buf.len() - before) as u64;
            }
            let mut rest: &[u8] = &buf;
            while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
                lines.push(clip(&rest[..nl]));
                rest = &rest[nl + 1..];
            }
            if rest.len() > MAX_LINE_BYTES {
                lines.push(clip(rest));
                rest = &[];
            }
            self.partial = rest.to_vec();
        }
        if self.offset >= self.max_bytes {
            self.rotate();
        }
        lines
    }

    /// Copies the file to `<name>.1` and truncates it. The server keeps
    /// appending (`O_APPEND`) from offset 0. Lines written between the copy
    /// and the truncation are lost; they are a few at most.
    fn rotate(&mut self) {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        let copied = std::fs::copy(&self.path, &old);
        let truncated = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .and_then(|f| f.set_len(0));
        if let Err(e) = copied.and(truncated) {
            tracing::warn!(log = %self.path.display(), "log rotation failed: {e}");
            return;
        }
        self.offset = 0;
        self.partial.clear();
    }
}

fn clip(bytes: &[u8]) -> String {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    if bytes.len() <= MAX_LINE_BYTES {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    let mut s = String::from_utf8_lossy(&bytes[..MAX_LINE_BYTES]).into_owned();
    s.push('…');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn append(path: &Path, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .expect("open");
        f.write_all(text.as_bytes()).expect("write");
    }

    #[test]
    fn the_tail_returns_complete_lines_once_and_waits_for_partial_ones() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("x.log");
        let mut t = LogTail::new(path.clone(), 1 << 20);
        assert!(t.read_lines().is_empty());
        append(&path, "one\ntwo\nthr");
        assert_eq!(t.read_lines(), vec!["one", "two"]);
        assert!(t.read_lines().is_empty());
        append(&path, "ee\n");
        assert_eq!(t.read_lines(), vec!["three"]);
    }

    #[test]
    fn a_log_past_its_limit_is_rotated_and_tailing_goes_on() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("x.log");
        let mut t = LogTail::new(path.clone(), 16);
        append(&path, "0123456789\n0123456789\n");
        assert_eq!(t.read_lines().len(), 2);
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 0);
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("x.log.1"))
                .expect("rotated")
                .len(),
            22
        );
        append(&path, "after\n");
        assert_eq!(t.read_lines(), vec!["after"]);
    }

    #[test]
    fn seek_back_starts_at_a_line_boundary() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join("x.log");
        append(&path, "aaaaaaaaaa\nbbbb\ncccc\n");
        let mut t = LogTail::new(path.clone(), 1 << 20);
        t.seek_back(8);
        assert_eq!(t.read_lines(), vec!["cccc"]);
        let mut t = LogTail::new(path, 1 << 20);
        t.seek_back(1000);
        assert_eq!(t.read_lines(), vec!["aaaaaaaaaa", "bbbb", "cccc"]);
    }

    #[test]
    fn the_ring_keeps_the_last_lines() {
        let mut r = LogRing::default();
        for i in 0..RING_LINES + 5 {
            r.push(LogLine {
                at_unix_ms: 0,
                line: i.to_string(),
            });
        }
        let last = r.last(2);
        assert_eq!(last[1].line, (RING_LINES + 4).to_string());
        assert_eq!(r.last(usize::MAX).len(), RING_LINES);
        r.keep_last(3);
        assert_eq!(r.last(usize::MAX).len(), 3);
        assert_eq!(r.last(1)[0].line, (RING_LINES + 4).to_string());
    }
}
