//! Messages between `jobvisorctl` (or any client) and the daemon over the
//! control socket. The client sends [`Request::Hello`] first; then each
//! request gets exactly one [`Response`] (streams send several, ending with
//! [`Response::End`]).

use crate::Bytes;
use serde::{Deserialize, Serialize};

/// Payloads of at least this many bytes cross the control socket as file
/// descriptors ([`Request::SubmitFd`], [`Response::JobFd`]) instead of
/// inline bytes.
pub const FD_PAYLOAD_MIN: u64 = 1 << 20;

/// Largest control request the daemon accepts (after `Hello`; before it,
/// 1 KiB). Inputs of [`FD_PAYLOAD_MIN`] bytes or more travel as
/// descriptors, so this leaves a mebibyte for the rest of a request (pool
/// name, key, a `Wait`'s list of ids).
pub const MAX_REQUEST_LEN: usize = 2 << 20;

/// Most job ids one [`Request::Wait`] may name (after removing duplicates).
pub const MAX_WAIT_IDS: usize = 100_000;

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
    /// Set a pool's number of workers, until a reload changes that pool's
    /// configuration.
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
    /// Queue a job. Answered with [`Response::Submitted`] once the job is
    /// durable; with `wait`, later also with [`Response::Job`] when it has
    /// finished (several submits may be pipelined on one connection).
    Submit {
        /// Target pool.
        pool: String,
        /// Input bytes.
        input: Bytes,
        /// Per-job options.
        options: JobOptions,
        /// Also send the finished job document.
        wait: bool,
    },
    /// Wait for jobs: one [`Response::Job`] per id as each finishes (or an
    /// [`Response::Error`] for an unknown id), then [`Response::End`].
    Wait {
        /// The jobs.
        ids: Vec<u64>,
    },
    /// The current document of one job, output included.
    Result {
        /// The job.
        id: u64,
    },
    /// Cancel a queued or running job.
    Cancel {
        /// The job.
        id: u64,
    },
    /// List jobs (newest first): [`Response::Job`]s without output, then
    /// [`Response::End`].
    Jobs {
        /// Only this pool.
        pool: Option<String>,
        /// Only this state.
        state: Option<JobState>,
        /// At most this many.
        limit: Option<u32>,
        /// Only jobs with a smaller id (the next page after a listing
        /// that ended at id `before`).
        before: Option<u64>,
        /// Only jobs created at or after this time (ms since the epoch).
        since_ms: Option<u64>,
    },
    /// Stream live events: [`Response::Event`]s until the client hangs up.
    Events,
    /// Like [`Request::Submit`], for large inputs: the input is the first
    /// `len` bytes of the file descriptor sent with this frame (one
    /// `SCM_RIGHTS` descriptor attached to the frame's first byte): a
    /// regular file or a memfd, read by the daemon at its own offset 0
    /// (`pread`). The input then never passes through the socket, and is
    /// not bound by the frame limit, only by the pool's `shm_size`.
    SubmitFd {
        /// Target pool.
        pool: String,
        /// Bytes of input in the descriptor.
        len: u64,
        /// Per-job options.
        options: JobOptions,
        /// Also send the finished job document.
        wait: bool,
    },
    /// Stop handing jobs to a pool's workers (they stay up, supervised;
    /// running jobs finish; queued ones wait). Admin only.
    Pause {
        /// The pool.
        pool: String,
    },
    /// Undo [`Request::Pause`]. Admin only.
    Resume {
        /// The pool.
        pool: String,
    },
    /// The recent output of a pool's workers, as [`Response::LogLine`]s,
    /// oldest first, then [`Response::End`]; with `follow`, new lines as
    /// they come instead of the `End` (until the client goes or the daemon
    /// stops). Admin only (worker output may carry any user's job data).
    Logs {
        /// The pool.
        pool: String,
        /// Only this worker slot.
        worker: Option<u32>,
        /// At most this many of the kept lines (the last ones).
        lines: u32,
        /// Only lines logged at or after this time (ms since the epoch).
        since_ms: Option<u64>,
        /// Keep streaming new lines.
        follow: bool,
    },
    /// Queue a failed, dead, cancelled or timed-out job again, its
    /// attempts kept (it gets at least one more). Answered with
    /// [`Response::Ok`].
    Retry {
        /// The job.
        id: u64,
    },
    /// Delete finished jobs (the client's own; an admin's: everyone's)
    /// that finished before `finished_before_ms`, at most `limit` in one
    /// request. Answered with [`Response::Pruned`].
    Prune {
        /// Only jobs that finished before this time (ms since the epoch).
        finished_before_ms: u64,
        /// Only jobs in this (finished) state.
        state: Option<JobState>,
        /// Only jobs of this pool.
        pool: Option<String>,
        /// At most this many (the daemon caps it at [`MAX_PRUNE`]).
        limit: u32,
    },
    /// The Prometheus text exposition of the daemon's metrics, answered
    /// with [`Response::Metrics`]. Open to every user (aggregates only).
    Metrics,
    /// A submit with choices the older requests cannot carry: the input
    /// inline or as a descriptor ([`SubmitPayload`]), a per-job
    /// `payloads` mode, and an output buffer. Descriptors attached to the
    /// frame's first byte, in this order: the input's (with
    /// [`SubmitPayload::Fd`]), then the output buffer's (with
    /// `output_buffer`). Answered like [`Request::Submit`].
    SubmitWith {
        /// Target pool.
        pool: String,
        /// The input.
        input: SubmitPayload,
        /// Per-job options.
        options: JobOptions,
        /// Also send the finished job document.
        wait: bool,
        /// Overrides the pool's `payloads` for this job.
        payloads: Option<PayloadMode>,
        /// An output buffer comes with the request: a memfd open
        /// read-write and sealed against shrinking (`F_SEAL_SHRINK`). When
        /// the job's outputs are kept in memory (`payloads = "memory"`), a
        /// large output is written into it (by the worker itself, with
        /// worker protocol 2) and the finished document comes as
        /// [`Response::JobFd`] with that buffer's descriptor; otherwise it
        /// is not used. Needs `wait`.
        output_buffer: bool,
    },
    /// The nodes sharing this daemon's PostgreSQL store, answered with
    /// [`Response::Nodes`] (an error with the SQLite store). Open to every
    /// user.
    Nodes,
    /// What the daemon's store would have its operator know, answered with
    /// [`Response::Warnings`] (with PostgreSQL: a transaction holding back
    /// the server's cleanup; with SQLite: nothing). Open to every user.
    StoreWarnings,
}

/// One node of a cluster (see [`Request::Nodes`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Its id (a daemon that restarts, or rejoins after being declared
    /// dead, is a new node).
    pub id: u64,
    /// Host name.
    pub host: String,
    /// The daemon's pid on that host.
    pub pid: u32,
    /// When it started, ms since the epoch.
    pub started_ms: u64,
    /// Milliseconds since its last heartbeat.
    pub heartbeat_age_ms: u64,
    /// Not declared dead (or gone after a clean stop).
    pub alive: bool,
    /// Its worker processes, as of its last heartbeat.
    pub workers: u32,
    /// Jobs it runs.
    pub running: u64,
    /// Jobs it holds: running, and claimed not started yet.
    pub held: u64,
    /// It holds the leader's lease: it declares silent nodes dead.
    pub leader: bool,
}

/// The input of a [`Request::SubmitWith`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubmitPayload {
    /// The bytes (as [`Request::Submit`]'s `input`).
    Inline(Bytes),
    /// The first `len` bytes of the first descriptor attached (as
    /// [`Request::SubmitFd`]).
    Fd {
        /// Bytes of input in the descriptor.
        len: u64,
    },
}

/// Where a job's large payloads live (the pool key `payloads`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadMode {
    /// In the store's payload files, durable before acknowledgement.
    Durable,
    /// Only in memory: a job whose large input is lost with the daemon
    /// ends `dead`.
    Memory,
}

/// Most jobs one [`Request::Prune`] deletes; more take more requests (so
/// that a big prune never holds the store for long).
pub const MAX_PRUNE: u32 = 10_000;

/// Per-job options of a submit; `None` takes the pool's setting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobOptions {
    /// Hard timeout in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Attempts before the job is `dead`.
    pub max_attempts: Option<u32>,
    /// Higher runs first; FIFO within a priority.
    pub priority: i32,
    /// At most one running job per key, daemon-wide.
    pub key: Option<String>,
}

/// State of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobState {
    /// Waiting for a worker.
    Queued,
    /// Handed to a worker.
    Running,
    /// Finished with an output.
    Succeeded,
    /// The worker reported a failure.
    Failed,
    /// Cancelled by a client.
    Cancelled,
    /// Exceeded its timeout on its last attempt.
    TimedOut,
    /// Every attempt was lost (worker died mid-job).
    Dead,
}

impl JobState {
    /// Every state, in lifecycle order.
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::TimedOut,
        JobState::Dead,
    ];

    /// Name used in human and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed_out",
            JobState::Dead => "dead",
        }
    }

    /// Parses [`JobState::as_str`]'s names.
    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// True for states a job never leaves.
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The worker returned an output.
    Succeeded,
    /// The worker returned an error.
    Failed,
    /// The worker died (or was lost with the daemon) mid-job.
    Lost,
    /// The attempt exceeded the timeout.
    TimedOut,
    /// Cancelled while running.
    Cancelled,
}

impl Outcome {
    /// Name used in human and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Lost => "lost",
            Outcome::TimedOut => "timed_out",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// One attempt of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// Attempt number, from 1.
    pub n: u32,
    /// Worker slot id.
    pub worker: u32,
    /// Worker pid.
    pub pid: u32,
    /// Start, ms since the Unix epoch.
    pub started_ms: u64,
    /// End, ms since the Unix epoch (`None` while running).
    pub ended_ms: Option<u64>,
    /// How it ended (`None` while running).
    pub outcome: Option<Outcome>,
    /// Error text of a failed, lost or timed-out attempt.
    pub error: Option<String>,
}

/// Everything known about a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobDoc {
    /// Id.
    pub id: u64,
    /// Pool.
    pub pool: String,
    /// State.
    pub state: JobState,
    /// Priority.
    pub priority: i32,
    /// Mutex key.
    pub key: Option<String>,
    /// Submission time, ms since the Unix epoch.
    pub created_ms: u64,
    /// End time, ms since the Unix epoch, once terminal.
    pub finished_ms: Option<u64>,
    /// Attempts so far.
    pub attempts: Vec<Attempt>,
    /// Output, when requested: a succeeded job's, or the detail a worker
    /// gave with a failure (`FromWorker::Raised`).
    pub output: Option<Bytes>,
    /// Error of the last attempt, when not succeeded.
    pub error: Option<String>,
}

impl JobDoc {
    /// Adds `problem` to the document's error (after any error it has).
    pub fn note_error(&mut self, problem: String) {
        self.error = Some(match self.error.take() {
            Some(error) => format!("{error}; {problem}"),
            None => problem,
        });
    }

    /// A copy of everything but the output (which may be large).
    pub fn without_output(&self) -> JobDoc {
        JobDoc {
            id: self.id,
            pool: self.pool.clone(),
            state: self.state,
            priority: self.priority,
            key: self.key.clone(),
            created_ms: self.created_ms,
            finished_ms: self.finished_ms,
            attempts: self.attempts.clone(),
            output: None,
            error: self.error.clone(),
        }
    }
}

/// One live event (see DESIGN.md section 7 for the names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When, ms since the Unix epoch.
    pub ts_ms: u64,
    /// `worker_started`, `worker_ready`, `worker_exited`, `pool_failed`,
    /// `job_queued`, `job_started`, `job_finished`, `reloaded`.
    pub event: String,
    /// Pool concerned.
    pub pool: Option<String>,
    /// Worker slot concerned.
    pub worker: Option<u32>,
    /// Worker pid concerned.
    pub pid: Option<u32>,
    /// Job concerned.
    pub job: Option<u64>,
    /// Job state after the event (`job_*`).
    pub state: Option<JobState>,
    /// Human detail (exit status, error).
    pub detail: Option<String>,
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
    /// A job was accepted and is durable.
    Submitted {
        /// Its id.
        id: u64,
    },
    /// A job document.
    Job(JobDoc),
    /// A live event.
    Event(Event),
    /// A job document whose output (`output_len` bytes, at offset 0) is in
    /// the file descriptor sent with this frame (one `SCM_RIGHTS`
    /// descriptor attached to its first byte, a sealed memfd or a read-only
    /// file) instead of inline; `doc.output` is `None`. Sent in place of
    /// [`Response::Job`] for outputs of at least [`FD_PAYLOAD_MIN`] bytes.
    JobFd {
        /// The document, without its output.
        doc: JobDoc,
        /// Bytes of output in the descriptor.
        output_len: u64,
    },
    /// Not an answer to one request: `pool` has failed (crash loop) while
    /// this connection waits for some of its queued jobs (a `Submit` or
    /// `SubmitFd` with `wait`, or a `Wait`). Sent once per connection when
    /// the pool fails, and to each new request that waits on a queued job
    /// of an already failed pool (after its `Submitted`; once per pool in a
    /// `Wait`). The waits stay open (if the pool is fixed, by `reload` or
    /// `restart`, the jobs still run and their documents still come).
    PoolFailed {
        /// The pool.
        pool: String,
        /// Why it failed (the last crash; may span lines).
        error: String,
    },
    /// One line of a worker's output (answer to [`Request::Logs`]).
    LogLine(LogLine),
    /// Answer to [`Request::Prune`].
    Pruned {
        /// Jobs deleted.
        count: u64,
    },
    /// Answer to [`Request::Metrics`].
    Metrics {
        /// Prometheus text format 0.0.4.
        text: String,
    },
    /// Answer to [`Request::Nodes`]: alive nodes, and those gone within
    /// the last hour, by id.
    Nodes(Vec<NodeStatus>),
    /// Answer to [`Request::StoreWarnings`]: one line each, none when all
    /// is well.
    Warnings(Vec<String>),
}

/// A line a worker wrote, or the daemon's note about that worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When the daemon read it, ms since the epoch.
    pub time_ms: u64,
    /// The pool.
    pub pool: String,
    /// The worker slot.
    pub worker: u32,
    /// Where it came from.
    pub stream: LogStream,
    /// The text (invalid UTF-8 replaced; at most 4 KiB, longer lines are
    /// cut into several).
    pub line: String,
}

/// Source of a [`LogLine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogStream {
    /// The worker's stdout.
    Stdout,
    /// The worker's stderr.
    Stderr,
    /// The daemon, about the worker (started, exited).
    Daemon,
}

impl LogStream {
    /// Name used in human and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::Daemon => "jobvisord",
        }
    }
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
    /// Running, but handed no jobs (`pause`) until `resume`.
    Paused,
}

impl PoolState {
    /// Name used in human and JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolState::Running => "running",
            PoolState::Failed => "failed",
            PoolState::Stopping => "stopping",
            PoolState::Paused => "paused",
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
