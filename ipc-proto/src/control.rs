//! Messages between `jobvisorctl` (or any client) and the daemon over the
//! control socket. The client sends [`Request::Hello`] first; then each
//! request gets exactly one [`Response`] (streams send several, ending with
//! [`Response::End`]).

use serde::{Deserialize, Serialize};

/// Client → daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// First message on a connection.
    Hello {
        /// Must equal [`crate::PROTOCOL_VERSION`].
        protocol_version: u32,
    },
    /// Pools and workers; one pool or all.
    Status {
        /// Only this pool.
        pool: Option<String>,
    },
    /// Set a pool's number of workers (until the next reload).
    Scale {
        /// The pool.
        pool: String,
        /// New worker count, at least 1.
        workers: u32,
    },
    /// Replace every worker of a pool; clears the `failed` state.
    Restart {
        /// The pool.
        pool: String,
    },
    /// Re-read the configuration file.
    Reload,
    /// Stop the daemon: drain (or at once with `now`).
    Shutdown {
        /// Skip draining.
        now: bool,
    },
}

/// Why a request was refused; maps onto `jobvisorctl`'s exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Bad request or invalid input (exit 2).
    Invalid,
    /// Unknown pool or job (exit 4).
    NotFound,
    /// Not now: queue full, pool failed, shutting down (exit 5).
    Rejected,
    /// The daemon failed to carry it out (exit 1).
    Failed,
}

impl ErrorKind {
    /// `jobvisorctl`'s exit code for this kind (DESIGN.md section 7).
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Invalid => 2,
            ErrorKind::NotFound => 4,
            ErrorKind::Rejected => 5,
            ErrorKind::Failed => 1,
        }
    }
}

/// Daemon → client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::Hello`].
    Hello {
        /// The daemon's protocol version.
        protocol_version: u32,
        /// The daemon's pid.
        pid: u32,
        /// The daemon's crate version.
        version: String,
    },
    /// Answer to [`Request::Status`].
    Status(StatusReport),
    /// The request was carried out; a human summary.
    Ok {
        /// What was done.
        message: String,
    },
    /// The request was refused or failed.
    Error {
        /// Class of failure.
        kind: ErrorKind,
        /// One line that says what went wrong and what to do.
        message: String,
    },
    /// End of a stream.
    End,
}

/// State of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PoolState {
    /// Spawning and supervising workers.
    Running,
    /// Crash-looped past `max_restarts`: no more spawns until `restart`.
    Failed,
    /// Being removed (reload) or the daemon is shutting down.
    Stopping,
}

impl PoolState {
    /// Name used in human and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolState::Running => "running",
            PoolState::Failed => "failed",
            PoolState::Stopping => "stopping",
        }
    }
}

/// State of a worker slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerState {
    /// Spawned, `Ready` not yet received.
    Starting,
    /// Idle, can take jobs.
    Ready,
    /// Running a job.
    Busy,
    /// Being stopped.
    Stopping,
    /// Waiting out a restart backoff (no process).
    Backoff,
}

impl WorkerState {
    /// Name used in human and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Busy => "busy",
            WorkerState::Stopping => "stopping",
            WorkerState::Backoff => "backoff",
        }
    }
}

/// Answer to [`Request::Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// One entry per pool, in name order.
    pub pools: Vec<PoolStatus>,
}

/// One pool in a [`StatusReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// Pool name.
    pub name: String,
    /// Pool state.
    pub state: PoolState,
    /// Configured (or scaled) number of workers.
    pub desired_workers: u32,
    /// Jobs waiting.
    pub queued: u64,
    /// Jobs running.
    pub running: u64,
    /// Jobs succeeded.
    pub succeeded: u64,
    /// Jobs failed (any terminal state but success).
    pub failed: u64,
    /// Why the pool is failed or its last spawn failed, if so.
    pub last_error: Option<String>,
    /// Worker slots.
    pub workers: Vec<WorkerStatus>,
}

/// One worker slot in a [`PoolStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// Slot id within the pool (`JOBVISOR_WORKER_ID`).
    pub id: u32,
    /// Current process, if any.
    pub pid: Option<u32>,
    /// State.
    pub state: WorkerState,
    /// Milliseconds since the current process was spawned.
    pub uptime_ms: u64,
    /// Times this slot's process was replaced after dying.
    pub restarts: u32,
    /// Jobs completed by this slot.
    pub jobs_done: u64,
    /// Resident set size of the current process, bytes.
    pub rss_bytes: u64,
}
