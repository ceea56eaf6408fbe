//! Minimal leveled logging to stderr, one line per record.
//!
//! Level from `JOBVISOR_LOG` (or `RUST_LOG`): `error`, `warn`, `info`
//! (default), `debug`. When stderr is journald's (`JOURNAL_STREAM` set),
//! lines carry `<N>` syslog priority prefixes so the journal keeps levels.

use crate::supervisor::Level;
use std::io::Write;
use std::sync::OnceLock;

struct Settings {
    max: Level,
    journal: bool,
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
            journal: std::env::var_os("JOURNAL_STREAM").is_some(),
        }
    })
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

/// `log(Level::Info, format!(…))`.
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log::log($crate::supervisor::Level::Info, &format!($($t)*)) } }
/// `log(Level::Warn, format!(…))`.
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::log::log($crate::supervisor::Level::Warn, &format!($($t)*)) } }
/// `log(Level::Error, format!(…))`.
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log::log($crate::supervisor::Level::Error, &format!($($t)*)) } }
