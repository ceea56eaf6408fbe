//! systemd `sd_notify`: datagrams to `$NOTIFY_SOCKET` (a path, or an
//! abstract socket when it starts with `@`). Without `NOTIFY_SOCKET` every
//! call is a no-op and no status timer is ever armed.
//!
//! What the reactor sends, and why each matters to the service manager:
//! - `READY=1` + `MAINPID=` once every pool has its initial workers `Ready`
//!   (or has failed): units ordered `After=jobvisord.service` start only
//!   when jobs can actually run, not when the process merely exists.
//! - `STATUS=` — a one-line summary for `systemctl status`, rate-limited by
//!   [`StatusUpdates`]: at most one per [`STATUS_INTERVAL`], only when the
//!   text changed, and a timer only while an update is pending, so an idle
//!   daemon is not woken for it.
//! - `RELOADING=1` + `MONOTONIC_USEC=` before a reload, `READY=1` after it
//!   (also after a rejected one: the old configuration is still serving,
//!   and a manager waiting for `READY=1` must not hang).
//! - `STOPPING=1` once, when shutdown begins.
//! - `WATCHDOG=1` from the event loop itself (see the reactor), so a loop
//!   that is stuck stops the pings and systemd restarts the service.
//!
//! The socket variables stay in our environment (removing them would race
//! with the store thread reading the environment); the spawner scrubs them
//! from every worker's.

use ipc_proto::control::{PoolState, StatusReport, WorkerState};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{Duration, Instant};

/// Shortest interval between two `STATUS=` updates.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// A connection to the service manager's notification socket.
pub struct Notifier {
    sock: Option<(UnixDatagram, SocketAddr)>,
    status: StatusUpdates,
    stopping_sent: bool,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`.
    pub fn from_env() -> Notifier {
        let sock = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            let addr = if let Some(name) = path.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes())
            } else {
                SocketAddr::from_pathname(&path)
            };
            // Non-blocking: a manager that stopped reading must not stall
            // the event loop (a full datagram queue blocks a sender).
            let sock = UnixDatagram::unbound().and_then(|s| s.set_nonblocking(true).map(|()| s));
            match (sock, addr) {
                (Ok(s), Ok(a)) => Some((s, a)),
                (Err(e), _) | (_, Err(e)) => {
                    crate::warn!("NOTIFY_SOCKET={path} unusable: {e}");
                    None
                }
            }
        });
        Notifier {
            sock,
            status: StatusUpdates::default(),
            stopping_sent: false,
        }
    }

    /// True when a notification socket is configured.
    pub fn active(&self) -> bool {
        self.sock.is_some()
    }

    /// Sends `state` (e.g. `"READY=1\nSTATUS=…"`); failures are logged and
    /// otherwise ignored: the manager being gone or stuck is not ours to
    /// fix, and a notification it missed is superseded by the next one.
    pub fn notify(&self, state: &str) {
        if let Some((s, a)) = &self.sock {
            if let Err(e) = s.send_to_addr(state.as_bytes(), a) {
                crate::warn!("sd_notify failed: {e}");
            }
        }
    }

    /// `READY=1` with our pid and the current status line.
    pub fn ready(&mut self, status: String, now: Instant) {
        if !self.active() {
            return;
        }
        self.notify(&format!(
            "READY=1\nMAINPID={}\nSTATUS={status}",
            std::process::id()
        ));
        self.status.sent(status, now);
    }

    /// `STOPPING=1`, the first time only.
    pub fn stopping(&mut self) {
        if !self.stopping_sent {
            self.stopping_sent = true;
            self.notify("STOPPING=1");
        }
    }

    /// Something the status line shows may have changed.
    pub fn status_changed(&mut self) {
        if self.active() {
            self.status.mark();
        }
    }

    /// When the loop must wake to send a pending status update.
    pub fn status_deadline(&self) -> Option<Instant> {
        self.status.deadline()
    }

    /// Sends `STATUS=` if one is pending and allowed at `now` and its text
    /// (built by `text` only then) differs from the last one sent.
    pub fn poll_status(&mut self, now: Instant, text: impl FnOnce() -> String) {
        if let Some(t) = self.status.poll(now, text) {
            self.notify(&format!("STATUS={t}"));
        }
    }
}

/// Rate limiting of `STATUS=` (sans-IO: `now` comes from the caller).
#[derive(Debug, Default)]
pub struct StatusUpdates {
    last: String,
    /// No update before this (one [`STATUS_INTERVAL`] after the last check).
    next_at: Option<Instant>,
    pending: bool,
}

impl StatusUpdates {
    /// Marks an update as pending.
    pub fn mark(&mut self) {
        self.pending = true;
    }

    /// `Some` only while an update is pending: the time it may be sent.
    pub fn deadline(&self) -> Option<Instant> {
        if !self.pending {
            return None;
        }
        self.next_at
    }

    /// The text to send now, if any. Building the text counts as a check:
    /// the next one waits [`STATUS_INTERVAL`] even if nothing was sent, so
    /// a busy daemon builds it at most once per interval.
    pub fn poll(&mut self, now: Instant, text: impl FnOnce() -> String) -> Option<String> {
        if !self.pending || self.next_at.is_some_and(|t| now < t) {
            return None;
        }
        self.pending = false;
        self.next_at = Some(now + STATUS_INTERVAL);
        let t = text();
        (t != self.last).then(|| {
            self.last.clone_from(&t);
            t
        })
    }

    /// `text` went out with another message (`READY=1`).
    pub fn sent(&mut self, text: String, now: Instant) {
        self.last = text;
        self.pending = false;
        self.next_at = Some(now + STATUS_INTERVAL);
    }
}

/// The status line for the core's current state (see [`status_line`]).
pub fn summary(core: &crate::supervisor::Supervisor, now: Instant) -> String {
    match core.status(None, now) {
        Ok(report) => status_line(&report, core.is_shutting_down()),
        Err(_) => String::from("status unavailable"),
    }
}

/// The one-line summary shown by `systemctl status`, e.g.
/// `4/4 workers ready, 12 queued, 3 running` (+ `; failed pools: x`).
pub fn status_line(report: &StatusReport, shutting_down: bool) -> String {
    let (mut ready, mut total, mut queued, mut running) = (0usize, 0usize, 0u64, 0u64);
    let mut failed = Vec::new();
    for p in &report.pools {
        total += p.workers.len();
        ready += p
            .workers
            .iter()
            .filter(|w| matches!(w.state, WorkerState::Ready | WorkerState::Busy))
            .count();
        queued += p.queued;
        running += p.running;
        if p.state == PoolState::Failed {
            failed.push(p.name.as_str());
        }
    }
    let mut s = format!("{ready}/{total} workers ready, {queued} queued, {running} running");
    if !failed.is_empty() {
        s.push_str("; failed pools: ");
        s.push_str(&failed.join(", "));
    }
    if shutting_down {
        s.insert_str(0, "shutting down: ");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_rate_limited_and_deduplicated() {
        let t0 = Instant::now();
        let mut s = StatusUpdates::default();
        assert_eq!(s.deadline(), None, "idle: no timer");
        s.mark();
        assert_eq!(s.poll(t0, || "a".into()).as_deref(), Some("a"));
        assert_eq!(s.deadline(), None);
        // A change within the interval waits for its deadline.
        s.mark();
        assert_eq!(s.deadline(), Some(t0 + STATUS_INTERVAL));
        assert_eq!(s.poll(t0 + Duration::from_millis(10), || "b".into()), None);
        let t1 = t0 + STATUS_INTERVAL;
        assert_eq!(s.poll(t1, || "b".into()).as_deref(), Some("b"));
        // Same text: nothing sent, nothing pending.
        s.mark();
        assert_eq!(s.poll(t1 + STATUS_INTERVAL, || "b".into()), None);
        assert_eq!(s.deadline(), None);
    }

    #[test]
    fn text_built_only_when_due() {
        let t0 = Instant::now();
        let mut s = StatusUpdates::default();
        s.sent("x".into(), t0);
        s.mark();
        let mut built = false;
        s.poll(t0, || {
            built = true;
            "y".into()
        });
        assert!(!built);
    }
}
