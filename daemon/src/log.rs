//! Leveled logging to stderr, one line per record, and the limits that keep
//! worker output from drowning it.
//!
//! Level from `JOBVISOR_LOG` (or `RUST_LOG`): `error`, `warn`, `info`
//! (default), `debug`. When stderr *is* journald's stream, lines carry
//! `<N>` syslog priority prefixes so the journal keeps levels, and no
//! program name or timestamp (the journal adds both). "Is" means what
//! `sd_journal_stream_fd(3)` says: `$JOURNAL_STREAM` is `DEVICE:INODE` of
//! the stream and matches `fstat(2)`; the variable alone is not enough,
//! because it is inherited by processes whose stderr was redirected (a
//! `jobvisord 2>file` started from a unit's shell), and those would get
//! `<6>` garbage in a plain file.
//!
//! Worker output is captured line by line and logged as `[pool/N] line`
//! (or passed on as it is: [`worker_line`]).
//! A worker printing in a tight loop could otherwise fill the disk through
//! the journal and, since stderr writes block, slow the event loop down to
//! the journal's pace. [`OutputLimiter`] is a per-worker token bucket
//! ([`OUTPUT_LINES_PER_SEC`], burst [`OUTPUT_BURST`]): lines beyond it are
//! dropped and counted, and one `[pool/N] suppressed K lines` record says
//! so when the worker is back under the limit (or exits). [`split_lines`]
//! cuts the byte stream into records without ever holding more than
//! `max` bytes of a line.

use crate::supervisor::Level;
use std::io::Write;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

struct Settings {
    max: Level,
    journal: bool,
    /// `JOBVISOR_WORKER_OUTPUT=plain`: worker lines go out as they are.
    plain_workers: bool,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

fn settings() -> &'static Settings {
    SETTINGS.get_or_init(|| {
        let spec = std::env::var("JOBVISOR_LOG")
            .or_else(|_| std::env::var("RUST_LOG"))
            .unwrap_or_default()
            .to_ascii_lowercase();
        let max = if spec.contains("debug") || spec.contains("trace") {
            Level::Debug
        } else if spec.contains("info") {
            Level::Info
        } else if spec.contains("warn") {
            Level::Warn
        } else if spec.contains("error") {
            Level::Error
        } else {
            Level::Info
        };
        Settings {
            max,
            journal: stderr_is_journal(),
            plain_workers: std::env::var("JOBVISOR_WORKER_OUTPUT").is_ok_and(|v| v == "plain"),
        }
    })
}

/// True when `$JOURNAL_STREAM` names the very stream fd 2 is connected to.
fn stderr_is_journal() -> bool {
    let Some(spec) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    journal_stream_matches(&spec.to_string_lossy(), st.st_dev, st.st_ino)
}

/// Parses `DEVICE:INODE` (decimal, as systemd writes it) and compares.
fn journal_stream_matches(spec: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = spec.split_once(':') else {
        return false;
    };
    d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
}

/// True when records of `level` are written.
pub fn enabled(level: Level) -> bool {
    level <= settings().max
}

/// Writes one record (newlines in `msg` are escaped: one record, one line).
pub fn log(level: Level, msg: &str) {
    let s = settings();
    if level > s.max {
        return;
    }
    let msg = msg.replace('\n', "\\n");
    let line = if s.journal {
        let prio = match level {
            Level::Error => 3,
            Level::Warn => 4,
            Level::Info => 6,
            Level::Debug => 7,
        };
        format!("<{prio}>{msg}\n")
    } else {
        let tag = match level {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        };
        format!("jobvisord: {tag}: {msg}\n")
    };
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// One line of a worker's output: a record `[pool/slot] line` at level
/// info; or, with `JOBVISOR_WORKER_OUTPUT=plain` (how an embedded
/// `jobvisor.Executor` runs its daemon, so that a worker's `print` reads
/// as it would under multiprocessing), the line as it is, on the daemon's
/// stdout or stderr like the worker's, whatever the log level.
pub fn worker_line(pool: &str, slot: u32, stderr: bool, line: &str) {
    if settings().plain_workers {
        let mut out = Vec::with_capacity(line.len() + 1);
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
        let _ = if stderr {
            std::io::stderr().lock().write_all(&out)
        } else {
            std::io::stdout().lock().write_all(&out)
        };
        return;
    }
    log(Level::Info, &format!("[{pool}/{slot}] {line}"));
}

/// `log(Level::Info, format!(…))`.
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log::log($crate::supervisor::Level::Info, &format!($($t)*)) } }
/// `log(Level::Warn, format!(…))`.
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::log::log($crate::supervisor::Level::Warn, &format!($($t)*)) } }
/// `log(Level::Error, format!(…))`.
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log::log($crate::supervisor::Level::Error, &format!($($t)*)) } }

/// Sustained rate of worker output lines logged, per worker.
pub const OUTPUT_LINES_PER_SEC: f64 = 200.0;
/// Lines a quiet worker may log at once before the rate applies.
pub const OUTPUT_BURST: f64 = 1000.0;
/// Tokens a suppressed worker must have earned back before it is logged
/// again (one second's worth). Without this hysteresis a steady flood would
/// alternate one logged line and one "suppressed" record forever.
const RESUME_TOKENS: f64 = OUTPUT_LINES_PER_SEC;

/// What to do with one line of worker output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Log it; if `suppressed_before` > 0, first say how many lines were
    /// dropped since the last logged one.
    Log {
        /// Lines dropped just before this one.
        suppressed_before: u64,
    },
    /// Drop it (counted).
    Drop,
}

/// Per-worker token bucket for output lines (sans-IO: the caller passes
/// `now`, once per read rather than once per line).
#[derive(Debug)]
pub struct OutputLimiter {
    tokens: f64,
    last: Instant,
    suppressed: u64,
    /// While suppressing: when enough tokens will have accrued to resume.
    /// Drops do not spend tokens, so this is fixed when suppression starts.
    resume_at: Option<Instant>,
}

impl OutputLimiter {
    /// A full bucket.
    pub fn new(now: Instant) -> OutputLimiter {
        OutputLimiter {
            tokens: OUTPUT_BURST,
            last: now,
            suppressed: 0,
            resume_at: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * OUTPUT_LINES_PER_SEC).min(OUTPUT_BURST);
        self.last = now;
    }

    /// Decides about one line arriving at `now`.
    pub fn admit(&mut self, now: Instant) -> Admit {
        if let Some(at) = self.resume_at {
            if now < at {
                self.suppressed += 1;
                return Admit::Drop;
            }
            self.resume_at = None;
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Admit::Log {
                suppressed_before: std::mem::take(&mut self.suppressed),
            }
        } else {
            self.suppressed += 1;
            let wait = (RESUME_TOKENS - self.tokens) / OUTPUT_LINES_PER_SEC;
            self.resume_at = Some(now + Duration::from_secs_f64(wait));
            Admit::Drop
        }
    }

    /// When a suppressed worker that has gone quiet should get its
    /// "suppressed" record (`None` when nothing is pending).
    pub fn resume_at(&self) -> Option<Instant> {
        self.resume_at.filter(|_| self.suppressed > 0)
    }

    /// At or after [`resume_at`](Self::resume_at): ends the suppressed
    /// stretch and returns how many lines it dropped.
    pub fn expire(&mut self, now: Instant) -> Option<u64> {
        match self.resume_at {
            Some(at) if now >= at => {
                self.resume_at = None;
                Some(std::mem::take(&mut self.suppressed)).filter(|&n| n > 0)
            }
            _ => None,
        }
    }

    /// The worker is gone: lines dropped and not yet reported.
    pub fn finish(&mut self) -> Option<u64> {
        self.resume_at = None;
        Some(std::mem::take(&mut self.suppressed)).filter(|&n| n > 0)
    }
}

/// Lines of a worker's output kept for its crash text (see
/// [`OutputTail`]).
pub const TAIL_LINES: usize = 20;
/// Bytes of a worker's output kept for its crash text.
pub const TAIL_BYTES: usize = 4096;

/// The last lines a worker wrote (stdout and stderr, in the order read),
/// at most [`TAIL_LINES`] lines and [`TAIL_BYTES`] bytes: what a worker
/// that dies before `Ready` said about it (a Python traceback, "command
/// not found"), for its crash text. Kept whatever the rate limit drops.
#[derive(Debug, Default)]
pub struct OutputTail {
    lines: std::collections::VecDeque<String>,
    bytes: usize,
}

impl OutputTail {
    /// Adds one line (without its newline); the oldest lines go when over
    /// the limits, and a line longer than [`TAIL_BYTES`] keeps its start.
    pub fn push(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let mut text = text.trim_end_matches(['\r', '\n']).to_owned();
        if text.len() > TAIL_BYTES {
            let mut cut = TAIL_BYTES;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        self.bytes += text.len() + 1;
        self.lines.push_back(text);
        while self.lines.len() > TAIL_LINES || self.bytes > TAIL_BYTES + 1 {
            let old = self.lines.pop_front().expect("not empty");
            self.bytes -= old.len() + 1;
        }
    }

    /// The lines joined by newlines, without leading or trailing blank
    /// lines; `None` when there is nothing but blanks.
    pub fn text(&self) -> Option<String> {
        let first = self.lines.iter().position(|l| !l.trim().is_empty())?;
        let last = self.lines.iter().rposition(|l| !l.trim().is_empty())?;
        let lines: Vec<&str> = self.lines.range(first..=last).map(String::as_str).collect();
        Some(lines.join("\n"))
    }
}

/// Cuts `data` into lines, continuing the partial line in `partial` (which
/// keeps what is left after the last newline). A line longer than `max`
/// bytes is emitted in `max`-byte pieces, so `partial` never exceeds `max`.
/// The newline itself is not passed to `emit`.
pub fn split_lines(
    partial: &mut Vec<u8>,
    mut data: &[u8],
    max: usize,
    mut emit: impl FnMut(&[u8]),
) {
    let max = max.max(1);
    while !data.is_empty() {
        if partial.len() >= max {
            emit(partial);
            partial.clear();
            if data[0] == b'\n' {
                data = &data[1..];
                continue;
            }
        }
        let window = &data[..data.len().min(max - partial.len())];
        match window.iter().position(|&b| b == b'\n') {
            Some(i) => {
                if partial.is_empty() {
                    emit(&window[..i]);
                } else {
                    partial.extend_from_slice(&window[..i]);
                    emit(partial);
                    partial.clear();
                }
                data = &data[i + 1..];
            }
            None => {
                partial.extend_from_slice(window);
                data = &data[window.len()..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(chunks: &[&[u8]], max: usize) -> (Vec<String>, Vec<u8>) {
        let mut partial = Vec::new();
        let mut out = Vec::new();
        for c in chunks {
            split_lines(&mut partial, c, max, |l| {
                out.push(String::from_utf8_lossy(l).into_owned())
            });
        }
        (out, partial)
    }

    #[test]
    fn split_lines_across_chunks() {
        let (out, rest) = lines(&[b"a\nbc", b"d\n\ne", b"f"], 100);
        assert_eq!(out, ["a", "bcd", ""]);
        assert_eq!(rest, b"ef");
    }

    #[test]
    fn split_lines_cuts_long_lines() {
        // Exactly `max` then a newline: one record, no empty one after it.
        let (out, rest) = lines(&[b"abcd", b"\nxy"], 4);
        assert_eq!(out, ["abcd"]);
        assert_eq!(rest, b"xy");
        let (out, rest) = lines(&[b"abcdefghij\n"], 4);
        assert_eq!(out, ["abcd", "efgh", "ij"]);
        assert!(rest.is_empty());
    }

    #[test]
    fn tail_keeps_the_last_lines_within_bounds() {
        let mut t = OutputTail::default();
        assert_eq!(t.text(), None);
        t.push(b"");
        t.push(b"  ");
        assert_eq!(t.text(), None);
        for i in 0..100 {
            t.push(format!("line {i}").as_bytes());
        }
        let text = t.text().unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines[0], "line 80");
        assert_eq!(lines[TAIL_LINES - 1], "line 99");
        // A trailing blank line counts toward the bound but is not shown.
        t.push(b"");
        assert!(t.text().unwrap().starts_with("line 81\n"));
        assert!(t.text().unwrap().ends_with("\nline 99"));
        // Long lines: the byte bound wins, a single huge line is cut.
        for _ in 0..3 {
            t.push(&[b'x'; 3000]);
        }
        assert_eq!(t.text().unwrap(), "x".repeat(3000));
        t.push("é".repeat(5000).as_bytes());
        let text = t.text().unwrap();
        assert!(
            text.len() <= TAIL_BYTES && text.starts_with('é'),
            "{}",
            text.len()
        );
        t.push(b"Traceback (most recent call last):\r");
        t.push(b"ModuleNotFoundError: No module named 'jobvisor'");
        assert_eq!(
            t.text().unwrap(),
            "Traceback (most recent call last):\nModuleNotFoundError: No module named 'jobvisor'"
        );
    }

    #[test]
    fn journal_stream_spec() {
        assert!(journal_stream_matches("8:12345", 8, 12345));
        assert!(!journal_stream_matches("8:12345", 8, 1));
        assert!(!journal_stream_matches("garbage", 8, 12345));
    }

    #[test]
    fn limiter_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut l = OutputLimiter::new(t0);
        let logged = (0..5000)
            .filter(|_| matches!(l.admit(t0), Admit::Log { .. }))
            .count();
        assert_eq!(logged, OUTPUT_BURST as usize);
        // Suppressed for one second's worth of tokens, then one record
        // with the count.
        let at = l.resume_at().expect("suppressing");
        assert!(at > t0 + Duration::from_millis(900) && at < t0 + Duration::from_millis(1100));
        assert_eq!(l.admit(at - Duration::from_millis(1)), Admit::Drop);
        assert_eq!(
            l.admit(at),
            Admit::Log {
                suppressed_before: 4001
            }
        );
        assert_eq!(
            l.admit(at),
            Admit::Log {
                suppressed_before: 0
            }
        );
    }

    #[test]
    fn limiter_steady_flood_is_bounded() {
        // 100k lines/s for 10 s: about burst + rate × 10 s logged, and at
        // most one "suppressed" record per second.
        let t0 = Instant::now();
        let mut l = OutputLimiter::new(t0);
        let (mut logged, mut summaries, mut dropped) = (0u64, 0u64, 0u64);
        for i in 0..1_000_000u64 {
            let now = t0 + Duration::from_micros(i * 10);
            match l.admit(now) {
                Admit::Log { suppressed_before } => {
                    logged += 1;
                    if suppressed_before > 0 {
                        summaries += 1;
                        dropped += suppressed_before;
                    }
                }
                Admit::Drop => {}
            }
        }
        dropped += l.finish().unwrap_or(0);
        assert_eq!(logged + dropped, 1_000_000);
        assert!(logged <= 1000 + 200 * 10 + 10, "logged {logged}");
        assert!(summaries <= 11, "summaries {summaries}");
    }

    #[test]
    fn limiter_expires_after_going_quiet() {
        let t0 = Instant::now();
        let mut l = OutputLimiter::new(t0);
        for _ in 0..1500 {
            l.admit(t0);
        }
        let at = l.resume_at().expect("suppressing");
        assert_eq!(l.expire(at - Duration::from_millis(1)), None);
        assert_eq!(l.expire(at), Some(500));
        assert_eq!(l.resume_at(), None);
        assert_eq!(l.finish(), None);
    }
}
