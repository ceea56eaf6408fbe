//! The durable job store: one SQLite database (`state_dir/jobs.db`, WAL mode,
//! `synchronous=FULL`) plus one file per large payload (`<payload_dir>/<id>.in`
//! and `<id>.out`), written by a dedicated thread, so that the event loop
//! never waits on an fsync.
//!
//! # Group commit
//!
//! The event loop [`Store::submit`]s [`Op`]s over a channel and gets a
//! sequence number back at once. The store thread blocks for the first op,
//! then drains whatever else is already queued (up to
//! [`MAX_BATCH_OPS`] ops or [`MAX_BATCH_BLOB_BYTES`] of payload), applies the
//! whole batch in one `BEGIN IMMEDIATE` transaction and commits it: one fsync
//! for the batch, however large. It then reports
//! [`Completion::Durable`] with the batch's last sequence number and wakes
//! the event loop through its [`mio::Waker`]; the loop collects completions with
//! [`Store::try_completion`]. Under load, batches grow by themselves: the
//! longer a commit takes, the more ops queue up for the next one, so the
//! fsync rate stays bounded while throughput follows the offered load.
//!
//! Within a batch, ops are coalesced: of several [`Op::Update`]s of one job
//! only the last is executed (each is a full replacement of the mutable
//! columns), and an [`Op::Insert`] followed by updates of the same job is
//! inserted with its final values directly.
//!
//! # Payload files
//!
//! Inputs and outputs of at least [`FILE_PAYLOAD_MIN`] bytes do not go into
//! SQLite, which would copy them into the WAL and again into the database at
//! each checkpoint: each is written to its own file, once. The row records
//! the payload's length instead of its bytes. For each batch the store
//! thread first writes every new payload file (create, write, `fdatasync`),
//! then fsyncs the payload directory once, and only then runs the
//! transaction whose rows reference them. Payload bytes are shared with the
//! event loop ([`NewJob::input`] and [`JobUpdate::output`] are `Arc<[u8]>`),
//! never copied on the way to the store.
//!
//! A payload file is never replaced while a committed row references it
//! (an update that brings a new large output for a job whose row already has
//! an output file stores it in the database instead, and the old file goes
//! after the commit), so a crash at any point leaves every referenced file
//! intact. Files no row references are removed: those of a failed batch at
//! once, those a batch or a pruning step stops referencing after it commits
//! (for a batch, after its [`Completion::Durable`] is sent: acknowledgements
//! never wait on the renames and unlinks), and any others (a crash between
//! a file's write and its row's commit) at [`Store::open`].
//! Only names of the form `<id>.in` / `<id>.out` are touched, and the
//! `.spare` directory.
//!
//! A job's input file goes once the job has succeeded: its final update
//! ([`JobUpdate::drop_input_file`]) clears the row's reference, and the
//! file is disposed of after the commit (a job that ended otherwise keeps
//! it for a `retry` until it is pruned). A job whose insert and
//! successful final update share a batch gets no input file at all (nor a
//! row copy of a large input). Removed input files are recycled
//! rather than unlinked: see [`Spares`] (new payload files are renamed
//! spares, which on tmpfs saves allocating and zeroing every page). Output
//! files are only ever unlinked, never recycled: a client may be reading
//! one through a descriptor it was handed.
//!
//! The store never reads them back: recovery and [`Query::Job`] only check
//! that a file is there with its recorded length, and the daemon reads
//! the file itself where it needs the bytes (an input straight into a
//! worker's arena on the copier thread; an output handed to the client as
//! a descriptor; see [`input_file`] and [`output_file`]), so megabytes of
//! reading neither stall commits nor fill memory. A file that is missing or
//! has the wrong length (deleted by hand, or a `payload_dir` on tmpfs after
//! a reboot) does not stop the store: a queued job without its input is
//! recovered as `dead` with an error naming the file, and a job whose output
//! file is gone is answered without output, its error naming the file.
//!
//! Architecture invariant: **an op is reported durable only after the
//! transaction holding it has committed, and after every payload file it
//! references is on disk.** This is what lets the daemon answer `submit`
//! only on [`Completion::Durable`]: an acknowledged job survives `kill -9` of
//! the daemon and power loss. When a commit or a payload file write fails
//! (disk full, I/O error, read-only file system), the batch's inserts are
//! reported lost in [`Completion::Failed`] and never stored later behind the
//! client's back, the files it wrote are removed; its updates are kept and
//! retried, with backoff, until a batch succeeds.
//!
//! Other invariants:
//! - Only the store thread touches the database after [`Store::open`], and
//!   only one process opens a store (`jobs.lock`, an `flock`, refuses a
//!   second daemon), so there is no lock contention and no `SQLITE_BUSY`.
//!   Likewise `<payload_dir>/.lock` refuses a second store on the same
//!   payload directory (ids would collide, and each would sweep away the
//!   other's files).
//! - [`Query`]s are answered after the batch that carries them has committed,
//!   in submission order, so a query sees every op submitted before it (and
//!   maybe later ops of the same batch, which is harmless: they are newer).
//! - Pruning (retention and the `max_finished` cap) runs in the store thread
//!   between batches, in chunks of at most [`PRUNE_CHUNK`] rows, and yields
//!   to queued ops after each chunk, so it never stalls acknowledgements.
//!   It only ever deletes terminal jobs (and their payload files).
//! - A batch carrying payloads stays within [`MAX_BATCH_BLOB_BYTES`]: an op
//!   that would take it further waits for the next batch, so a large payload
//!   never delays the acknowledgement of the small ops before it. A single
//!   payload larger than the limit gets a batch of its own.
//! - Job ids are never reused: the store keeps the high-water mark of every
//!   id it has stored (a `meta` row), even after those jobs are pruned.
//! - If the store thread dies (a panic), [`Store::try_completion`] reports
//!   every op still pending as failed instead of leaving clients hanging.
//!
//! The on-disk format is versioned (`PRAGMA user_version`, with an
//! `application_id` marking the file as ours); an older schema is migrated
//! in place, in one transaction; a store written by a newer schema, or a
//! file that is not a jobvisor store, is refused with a clear error, never
//! replaced or migrated away.

mod committer;
mod db;
mod files;
pub mod latency;
mod pg;
mod spares;

pub use pg::redact as redact_url;

/// Checks a PostgreSQL URL as the store will read it (libpq's TLS
/// parameters included, see `pg::tls`); the error says what is wrong.
pub fn check_postgres_url(url: &str) -> Result<(), String> {
    let (url, _) = pg::tls::split(url)?;
    url.parse::<postgres::Config>()
        .map(drop)
        .map_err(|e| e.to_string())
}

pub use spares::Spares;

/// The name of job `id`'s output in the payload directory when it is a
/// payload file (at least [`FILE_PAYLOAD_MIN`] bytes): `<id>.out`. Such a
/// file is never rewritten while its row references it, so a descriptor
/// opened on it may be handed to a client as the job's output. Open it
/// through the directory's descriptor ([`Spares::payload_dir`]), never by
/// path.
pub fn output_name(id: u64) -> String {
    files::name(id, files::Kind::Output)
}

/// The name of job `id`'s input in the payload directory when it is a
/// payload file: `<id>.in`, written before the job's insert commits and
/// never rewritten, so the daemon may read it back (into a worker's arena)
/// instead of keeping the input in memory.
pub fn input_name(id: u64) -> String {
    files::name(id, files::Kind::Input)
}

/// `<payload_dir>/<id>.out`, for messages (see [`output_name`]).
pub fn output_file(payload_dir: &Path, id: u64) -> PathBuf {
    payload_dir.join(output_name(id))
}

/// `<payload_dir>/<id>.in`, for messages (see [`input_name`]).
pub fn input_file(payload_dir: &Path, id: u64) -> PathBuf {
    payload_dir.join(input_name(id))
}
#[cfg(test)]
mod tests;

use committer::{Committer, Msg, Tuning};
use ipc_proto::control::{Attempt, JobDoc, JobState};
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// A batch stops growing at this many ops…
pub const MAX_BATCH_OPS: usize = 20_000;
/// …or once its inputs and outputs (in the database or in files) add up to
/// this many bytes. An op that would take a batch with payloads beyond it
/// waits for the next batch; a single larger payload gets a batch alone.
pub const MAX_BATCH_BLOB_BYTES: usize = 16 << 20;
/// Inputs and outputs of at least this many bytes are stored in payload
/// files rather than in the database. The same threshold as the control
/// socket's for passing payloads as descriptors: a large output is handed
/// to a client as its payload file's descriptor.
pub const FILE_PAYLOAD_MIN: usize = ipc_proto::control::FD_PAYLOAD_MIN as usize;
/// Pruning deletes at most this many rows per statement (and transaction).
pub const PRUNE_CHUNK: u32 = 10_000;
/// Retention of finished jobs before the first [`Op::Retention`].
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// A job to store, as submitted (state `queued`, no attempts yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    /// Id, allocated by the daemon from [`Recovered::next_id`] upwards.
    pub id: u64,
    /// Pool name.
    pub pool: String,
    /// Higher runs first.
    pub priority: i32,
    /// Mutex key.
    pub key: Option<String>,
    /// Attempts before the job is `dead`.
    pub max_attempts: u32,
    /// Hard timeout per attempt.
    pub timeout_ms: Option<u64>,
    /// Input bytes (shared with the job core, not copied); empty when
    /// `input_source` is set.
    pub input: Arc<[u8]>,
    /// `Some`: the input is the first `len` bytes of a file the client
    /// passed (read at offset 0, never at the descriptor's own offset). The
    /// store copies it into the job's payload file in the kernel
    /// (`copy_file_range`), so the bytes never pass through the daemon's
    /// memory. Only for inputs of at least [`FILE_PAYLOAD_MIN`] bytes (the
    /// batch of a smaller one fails, its inserts lost).
    pub input_source: Option<InputSource>,
    /// Submission time, ms since the Unix epoch.
    pub created_ms: u64,
    /// Uid of the client that submitted it (jobs stored before version 3
    /// of the schema are root's).
    pub owner: u32,
    /// Keep the input in a payload file although it is smaller than
    /// [`FILE_PAYLOAD_MIN`]: the daemon holds too much queued input in
    /// memory already, so this one leaves memory once stored.
    pub spill: bool,
    /// The pool has `payloads = "memory"` and the input is large: it is not
    /// stored at all (no payload file, no row copy); the row records its
    /// length in `input_memory_len`. The daemon keeps it (or the client's
    /// file) in memory until the job ends.
    pub memory: bool,
}

impl NewJob {
    /// Whether the input is stored as a payload file (large, or spilled).
    pub fn input_in_file(&self) -> bool {
        !self.memory && (self.spill || self.input_len() >= FILE_PAYLOAD_MIN as u64)
    }

    /// Bytes of input, in memory or in its source file.
    pub fn input_len(&self) -> u64 {
        match &self.input_source {
            Some(src) => src.len,
            None => self.input.len() as u64,
        }
    }
}

/// A job's input as a file (see [`NewJob::input_source`]).
#[derive(Debug, Clone)]
pub struct InputSource {
    /// The file (shared with the job core, which reads it into a worker's
    /// arena until the insert is durable).
    pub file: Arc<std::fs::File>,
    /// Bytes of input, from offset 0.
    pub len: u64,
}

impl PartialEq for InputSource {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.file, &other.file) && self.len == other.len
    }
}

impl Eq for InputSource {}

/// New values of a job's mutable columns: a full replacement, so applying
/// an update twice, or only the last of several, gives the same row.
///
/// `finished_ms` is stored for terminal states only: a terminal update
/// without one gets the commit time, a non-terminal one is stored without.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobUpdate {
    /// The job.
    pub id: u64,
    /// New state.
    pub state: JobState,
    /// Every attempt so far.
    pub attempts: Vec<Attempt>,
    /// Output (usually only once succeeded; shared, not copied).
    pub output: Option<Arc<[u8]>>,
    /// `Some(len)` (with `output` `None`): the output is already in its
    /// payload file [`output_file`], `len` bytes, written and synced (the
    /// directory too) by the daemon, which created it exclusively (so no
    /// committed row referenced it). The store only records it; a failed
    /// batch leaves it for the retry.
    pub output_file_len: Option<u64>,
    /// `Some(len)` (with `output` `None`): a large output of a `payloads =
    /// "memory"` pool, handed only to the clients waiting on the job; the
    /// row records its length, to say so later.
    pub output_memory_len: Option<u64>,
    /// Error of the last attempt.
    pub error: Option<String>,
    /// End time, ms since the Unix epoch, once terminal.
    pub finished_ms: Option<u64>,
    /// Succeeded, and the job's input is a payload file: the row forgets
    /// it and the file is recycled once the update commits (a job that
    /// succeeded is never dispatched again; one that ended otherwise keeps
    /// its input for a `retry`, until it is pruned).
    pub drop_input_file: bool,
}

impl JobUpdate {
    /// A non-terminal update (running, or queued again): no output, error
    /// or end time.
    pub fn progress(id: u64, state: JobState, attempts: Vec<Attempt>) -> JobUpdate {
        JobUpdate {
            id,
            state,
            attempts,
            output: None,
            output_file_len: None,
            output_memory_len: None,
            error: None,
            finished_ms: None,
            drop_input_file: false,
        }
    }
}

/// How often a node polls its held demands when `[store] notify = false`
/// (no LISTEN/NOTIFY): the longest a queued job waits for an idle worker.
pub const POLL_WITHOUT_NOTIFY: Duration = Duration::from_millis(100);

/// Seconds as a short text: "45s", "12m 5s", "3h 2m".
pub fn human_secs(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {}s", s / 60, s % 60),
        _ => format!("{}h {}m", s / 3600, s % 3600 / 60),
    }
}

/// One request to the store thread.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Store a new job.
    Insert(NewJob),
    /// Replace a stored job's mutable columns.
    Update(JobUpdate),
    /// Read; answered with [`Completion::Query`] carrying `token`.
    Query {
        /// Echoed in the answer.
        token: u64,
        /// What to read.
        query: Query,
    },
    /// Retention settings for pruning; the latest one wins.
    Retention {
        /// Retention of finished jobs per pool.
        per_pool: BTreeMap<String, Duration>,
        /// Retention of finished jobs of every other pool.
        default: Duration,
        /// At most this many finished jobs are kept overall (oldest go first).
        max_finished: u64,
    },
    /// PostgreSQL (nodes sharing queues): claim up to `max` queued jobs of
    /// `pool` for this node, in priority order, answered with
    /// [`Completion::Claimed`] once there are any: the demand is held until
    /// then, and a newer `Claim` of the pool replaces it (`max` 0:
    /// withdraws it).
    Claim {
        /// The pool.
        pool: String,
        /// At most this many.
        max: u32,
        /// The pool's semaphores and their limits (held cluster-wide).
        sems: Vec<(String, u32)>,
    },
    /// PostgreSQL: report [`Completion::RemoteDone`] once job `id`, which
    /// another node (or this one) runs, has finished.
    Watch {
        /// The job.
        id: u64,
    },
    /// PostgreSQL: reserve another block of job ids
    /// ([`Completion::Ids`]).
    ReserveIds,
}

/// A read of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// One job, with its output.
    Job {
        /// The job.
        id: u64,
        /// Only if it belongs to this uid (`None`: whoever's it is).
        owner: Option<u32>,
        /// Load its output (else the document comes without, and no
        /// payload file is looked at: what `wait` needs).
        output: bool,
    },
    /// Jobs, newest first, without output.
    List {
        /// Only this pool.
        pool: Option<String>,
        /// Only this state.
        state: Option<JobState>,
        /// At most this many (`u32::MAX` for all).
        limit: u32,
        /// Only jobs of this uid (`None`: everyone's).
        owner: Option<u32>,
        /// Only ids below this one.
        before: Option<u64>,
        /// Only jobs created at or after this time (ms since the epoch).
        since_ms: Option<u64>,
    },
    /// Not a pure read: queues a failed, dead, cancelled or timed-out job
    /// again (one transaction; see [`Retried`]).
    Retry {
        /// The job.
        id: u64,
        /// Only if it belongs to this uid.
        owner: Option<u32>,
    },
    /// The nodes of a cluster (PostgreSQL).
    Nodes,
    /// What the operator should know of the store ([`QueryResult::Warnings`]).
    Warnings,
    /// PostgreSQL: the jobs queued in the shared queue that no node holds,
    /// per pool ([`QueryResult::QueueCounts`]).
    QueueCounts,
    /// Not a pure read (PostgreSQL): cancels job `id` if it is queued and
    /// no node holds it, else asks the node that holds it to cancel it;
    /// answered with [`QueryResult::Cancel`].
    CancelQueued {
        /// The job.
        id: u64,
        /// Only if it belongs to this uid.
        owner: Option<u32>,
    },
    /// Not a pure read: deletes finished jobs, at most `limit`, and their
    /// payload files.
    Prune {
        /// Only jobs that finished before this time (ms since the epoch).
        finished_before_ms: u64,
        /// Only jobs in this state (a finished one).
        state: Option<JobState>,
        /// Only jobs of this pool.
        pool: Option<String>,
        /// Only jobs of this uid.
        owner: Option<u32>,
        /// At most this many.
        limit: u32,
    },
}

/// Answer to [`Query::Retry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Retried {
    /// No such job (or not the client's).
    NotFound,
    /// The job is in a state that does not run again (queued, running,
    /// succeeded).
    NotRetryable(JobState),
    /// Its input is no longer stored (a payload file dropped when the job
    /// ended, before inputs were kept for retries): nothing changed.
    InputGone,
    /// Queued again, committed: the job to put in the queue.
    Queued(RecoveredJob),
}

/// Answer to a [`Query`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryResult {
    /// [`Query::Job`]: the job with its output, or `None` if unknown.
    Job(Option<JobDoc>),
    /// [`Query::Job`] of a job whose output is a payload file: the job
    /// (`output` left `None`) and the output's length. The file
    /// ([`output_file`]) was checked to be there with that length but not
    /// read: the daemon hands it to the client as it is, and the store
    /// thread does not stall its commits reading megabytes.
    JobWithOutputFile(JobDoc, u64),
    /// [`Query::List`]: newest first, `output` always `None`.
    List(Vec<JobDoc>),
    /// [`Query::Retry`].
    Retry(Retried),
    /// [`Query::Prune`]: jobs deleted.
    Pruned(u64),
    /// [`Query::Nodes`].
    Nodes(Vec<ipc_proto::control::NodeStatus>),
    /// [`Query::Warnings`].
    Warnings(Vec<String>),
    /// [`Query::QueueCounts`]: (pool, jobs).
    QueueCounts(Vec<(String, u64)>),
    /// [`Query::CancelQueued`]: whether it was cancelled now, and the job's
    /// document (`None`: unknown, or not the client's).
    Cancel {
        /// Cancelled by this query.
        cancelled: bool,
        /// The job as it is now.
        doc: Option<JobDoc>,
        /// Not cancelled here: the node that holds it was asked to.
        requested_on: Option<u64>,
    },
}

/// Why one insert failed alone (see [`Completion::InsertsFailed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertFailure {
    /// The client's input file could not be read (one line, what to do).
    Input(String),
    /// Its payload file could not be written (one line).
    Store(String),
}

/// What the store thread reports back, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// Every op with a sequence number `<= upto` is committed (except the
    /// inserts an earlier [`Completion::Failed`] reported lost: those stay
    /// lost). `upto` never decreases.
    Durable {
        /// Highest sequence number covered.
        upto: u64,
    },
    /// The batch ending at `upto` could not be committed. Its inserts were
    /// not stored (ids in `lost_inserts`: tell those clients); its updates
    /// are kept and retried with the next batch, or after a backoff (100 ms
    /// doubling to 5 s) if no op arrives, and a later
    /// [`Completion::Durable`] says when they made it.
    Failed {
        /// Highest sequence number of the failed batch.
        upto: u64,
        /// Ids of the jobs whose inserts were lost, in submission order.
        lost_inserts: Vec<u64>,
        /// Why, one line.
        error: String,
    },
    /// These inserts of the batch that the next [`Completion::Durable`] or
    /// [`Completion::Failed`] reports failed alone, each with its reason:
    /// their input could not be put in its payload file (the client's file
    /// unreadable or cut short, or that one file's write failing). They are
    /// not stored; the rest of the batch went on without them.
    InsertsFailed {
        /// `(job id, why)`, with `why` saying whose fault it was
        /// ([`InsertFailure`]).
        failed: Vec<(u64, InsertFailure)>,
    },
    /// Answer to an [`Op::Query`].
    Query {
        /// The op's token.
        token: u64,
        /// The answer, or why there is none.
        result: Result<QueryResult, String>,
    },
    /// Jobs claimed for this node ([`Op::Claim`]), to run: each is queued
    /// here now, its attempts so far closed (a node that died with it
    /// left its attempt open: it is `lost`).
    Claimed {
        /// The pool.
        pool: String,
        /// The jobs, in priority order.
        jobs: Vec<RecoveredJob>,
    },
    /// Watched jobs ([`Op::Watch`]) that have finished.
    RemoteDone {
        /// The jobs.
        ids: Vec<u64>,
    },
    /// Another node asked this one to cancel these jobs, which this node
    /// holds (`jobvisorctl cancel` there; the client was checked there).
    CancelRequested {
        /// The jobs.
        ids: Vec<u64>,
    },
    /// Updates of these jobs were refused (fencing): the job was given to
    /// another node meanwhile (this node was declared dead), so this node's
    /// result is not recorded. Reported before the batch's `Durable`.
    Fenced {
        /// The jobs.
        ids: Vec<u64>,
    },
    /// A new block of job ids ([`Op::ReserveIds`]): `start..end`.
    Ids {
        /// The first id.
        start: u64,
        /// One past the last.
        end: u64,
    },
}

/// The store's contents the daemon needs at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Every non-terminal job (all `queued` after recovery), ascending id.
    pub jobs: Vec<RecoveredJob>,
    /// Larger than every id ever stored, even of jobs since pruned.
    pub next_id: u64,
    /// Ids from `next_id` up to this one (excluded) are this daemon's to
    /// give: `u64::MAX` with SQLite; a block with PostgreSQL, where nodes
    /// share the ids (more come with [`Op::ReserveIds`]).
    pub id_end: u64,
    /// Number of jobs per pool per state, over the whole store (after
    /// recovery). States without jobs are absent.
    pub counts: BTreeMap<String, HashMap<JobState, u64>>,
}

/// A job to queue again at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveredJob {
    /// The job as submitted; `job.input` is empty when `input_file` is set.
    pub job: NewJob,
    /// Its attempts so far (a `running` one's last attempt closed as lost).
    pub attempts: Vec<Attempt>,
    /// `Some(len)`: the input is the payload file [`input_file`] of `len`
    /// bytes (checked to be there with that length), not read into memory:
    /// a store with many large queued jobs must not fill the daemon's RAM
    /// at startup.
    pub input_file: Option<u64>,
}

/// Why the store cannot be opened or closed. Displays as one line naming the
/// file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory or a file cannot be created or opened.
    #[error("cannot open store {}: {}; {}", .path.display(), db::os_reason(.source), db::access_hint(.source))]
    Access {
        /// The directory or file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file exists but is no jobvisor store (corrupt, or another
    /// program's file).
    #[error("{} is not a valid jobvisor store ({detail}); move it away to start with an empty store (its jobs will be lost)", .path.display())]
    NotAStore {
        /// The database file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// `state_dir` or `payload_dir` is not one the daemon can trust (owned
    /// by someone else, writable by others, a link); the message says which
    /// and how to fix it.
    #[error("{0}")]
    Untrusted(String),
    /// Another process (another jobvisord) has the store open.
    #[error("{} is in use by another process (another jobvisord?); stop it or set daemon.state_dir to another directory", .path.display())]
    InUse {
        /// The database file.
        path: PathBuf,
    },
    /// Another process (another jobvisord, with another state directory)
    /// uses the payload directory.
    #[error("payload directory {} is in use by another process (another jobvisord?); each store needs its own: stop it or set daemon.payload_dir to another directory", .path.display())]
    PayloadDirInUse {
        /// The payload directory.
        path: PathBuf,
    },
    /// Written by a newer jobvisord.
    #[error("{} has schema version {found}, newer than this jobvisord supports ({supported}); upgrade jobvisord, or point it at another store (daemon.state_dir, or [store] url)", .path.display())]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// A payload file could not be read or written.
    #[error("store payload file {}: {what}: {}; check the disk (space, permissions, health), then restart jobvisord", .path.display(), db::os_reason(.source))]
    Payload {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// An SQLite operation failed.
    #[error("store {}: {what}: {source}; check the disk (space, permissions, health), then restart jobvisord", .path.display())]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// Another daemon uses the PostgreSQL database.
    #[error("store {url} is in use by another jobvisord (one daemon per database for now); stop it or set [store] url to another database")]
    PostgresInUse {
        /// The URL, password hidden.
        url: String,
    },
    /// A PostgreSQL store cannot be reached or used.
    #[error("store {url}: {what}: {detail}; check [store] url, that the server runs and accepts this user, then restart jobvisord")]
    Postgres {
        /// The URL, password hidden.
        url: String,
        /// What was being done.
        what: &'static str,
        /// The error, one line.
        detail: String,
    },
    /// The store thread could not be started, or died.
    #[error("store {}: the store thread {reason}; restart jobvisord (acknowledged jobs are safe)", .path.display())]
    Thread {
        /// The database file.
        path: PathBuf,
        /// What happened to it.
        reason: String,
    },
}

/// Handle to the store thread, owned by the event loop.
pub struct Store {
    path: PathBuf,
    ops: mpsc::Sender<Msg>,
    completions: mpsc::Receiver<Completion>,
    thread: RefCell<Option<JoinHandle<Result<(), StoreError>>>>,
    next_seq: u64,
    pending: RefCell<Pending>,
    /// The payload directory's spare files, shared with the daemon's
    /// writer of output files; `None` for a PostgreSQL store, which keeps
    /// payloads in its rows.
    spares: Option<Spares>,
    /// Commit latency, recorded by the store thread.
    latency: Arc<latency::CommitLatency>,
    /// The daemon's worker processes, for a cluster's node list.
    workers: Arc<std::sync::atomic::AtomicU32>,
    /// The claim thread's channel (PostgreSQL), see `submit`.
    claims: Option<mpsc::Sender<pg::ClaimMsg>>,
    /// Dropped with the handle: a store thread whose channel has other
    /// senders (the PostgreSQL listener's) sees the handle go this way.
    _alive: Arc<()>,
    /// Keeps the waker's eventfd open as long as the handle lives: if the
    /// store thread held the last reference, its final wake (after a panic)
    /// would be followed by the close, and closing an fd drops its pending
    /// epoll event before the loop sees it.
    _waker: Arc<mio::Waker>,
}

/// What the handle remembers of unsettled ops, so that it can fail them
/// itself if the store thread dies.
#[derive(Default)]
struct Pending {
    /// Every op with a sequence number `<= settled` got its Durable/Failed.
    settled: u64,
    /// `(seq, job id)` of inserts not yet settled.
    inserts: VecDeque<(u64, u64)>,
    /// Tokens of queries not yet answered, in order.
    queries: VecDeque<u64>,
    /// Completions made up by the handle after the thread died.
    synthesized: VecDeque<Completion>,
    /// Why the thread died, once known.
    death: Option<String>,
}

impl Store {
    /// [`Store::open_with_payload_dir`] with the payload files in
    /// `state_dir/payloads`.
    pub fn open(
        state_dir: &Path,
        waker: Arc<mio::Waker>,
    ) -> Result<(Store, Recovered), StoreError> {
        Store::open_with_payload_dir(state_dir, &state_dir.join("payloads"), waker)
    }

    /// Opens (creating the directory and database if needed)
    /// `state_dir/jobs.db`, migrating an older schema, creates `payload_dir`
    /// (mode 0700) if needed and removes the payload files no job
    /// references, runs recovery synchronously (jobs that were running are
    /// requeued or declared dead, see [`Recovered`]) and starts the store
    /// thread.
    pub fn open_with_payload_dir(
        state_dir: &Path,
        payload_dir: &Path,
        waker: Arc<mio::Waker>,
    ) -> Result<(Store, Recovered), StoreError> {
        Store::open_tuned(state_dir, payload_dir, waker, Tuning::default())
    }

    fn open_tuned(
        state_dir: &Path,
        payload_dir: &Path,
        waker: Arc<mio::Waker>,
        tuning: Tuning,
    ) -> Result<(Store, Recovered), StoreError> {
        let mut db = db::Db::open(state_dir, payload_dir)?;
        db.sweep_payloads()?;
        let recovered = db.recover(db::now_ms())?;
        let path = db.path().to_path_buf();
        let spares = db.payloads().spares().clone();
        let store = Store::start(
            path,
            Some(spares),
            waker,
            move |ops, done, waker, latency, _link| {
                Committer::new(db, ops, done, waker, tuning, latency).run()
            },
        )?;
        Ok((store, recovered))
    }

    /// Opens the PostgreSQL store of `config` (see the `pg` module):
    /// connects, creates or migrates the schema, registers this node, opens
    /// the claim connection and starts the store thread (with its claim
    /// thread, and its listener unless `notify = false`).
    pub fn open_postgres(
        config: &crate::config::StoreConfig,
        waker: Arc<mio::Waker>,
    ) -> Result<(Store, Recovered), StoreError> {
        let url = config.url.as_deref().unwrap_or_default();
        let mut pg = pg::Pg::open(url)?;
        pg.notify = config.notify;
        pg.xmin_warning = config.xmin_warning;
        pg.node_timeout = config.node_timeout;
        let recovered = pg.recover(db::now_ms())?;
        let (tx, rx) = mpsc::channel();
        let to_claimer = tx.clone();
        let claims = pg::Claims {
            pg: pg.second()?,
            tx,
            rx,
        };
        let path = PathBuf::from(pg.display());
        let workers = Arc::clone(&pg.workers);
        let mut store = Store::start(path, None, waker, move |ops, done, waker, latency, link| {
            pg::run(pg, claims, ops, done, waker, latency, link)
        })?;
        store.workers = workers;
        store.claims = Some(to_claimer);
        Ok((store, recovered))
    }

    /// Starts the store thread running `body` (a backend's loop) and
    /// returns its handle.
    fn start(
        path: PathBuf,
        spares: Option<Spares>,
        waker: Arc<mio::Waker>,
        body: impl FnOnce(
                mpsc::Receiver<Msg>,
                mpsc::Sender<Completion>,
                Arc<mio::Waker>,
                Arc<latency::CommitLatency>,
                HandleLink,
            ) -> Result<(), StoreError>
            + Send
            + 'static,
    ) -> Result<Store, StoreError> {
        let (ops_tx, ops_rx) = mpsc::channel();
        let alive = Arc::new(());
        let link = HandleLink {
            ops: ops_tx.clone(),
            alive: Arc::downgrade(&alive),
        };
        let (done_tx, done_rx) = mpsc::channel();
        let wake_on_exit = WakeOnDrop(Arc::clone(&waker));
        let latency = Arc::new(latency::CommitLatency::default());
        let (thread_waker, thread_latency) = (Arc::clone(&waker), Arc::clone(&latency));
        let thread = std::thread::Builder::new()
            .name("jobvisor-store".into())
            .spawn(move || {
                // Declared first, dropped last: after a panic has dropped the
                // backend (and its completion sender), the loop is woken to
                // find the channel disconnected.
                let _wake_on_exit = wake_on_exit;
                body(ops_rx, done_tx, thread_waker, thread_latency, link)
            })
            .map_err(|e| StoreError::Thread {
                path: path.clone(),
                reason: format!("could not be started ({e})"),
            })?;
        Ok(Store {
            path,
            ops: ops_tx,
            completions: done_rx,
            thread: RefCell::new(Some(thread)),
            next_seq: 1,
            pending: RefCell::default(),
            spares,
            latency,
            _waker: waker,
            _alive: alive,
            workers: Default::default(),
            claims: None,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The payload directory's spare files: where a payload file written
    /// outside the store thread (an output straight from a worker's
    /// arena) comes from, see [`Spares::create`].
    pub fn spares(&self) -> Option<&Spares> {
        self.spares.as_ref()
    }

    /// The daemon runs `n` worker processes (shown in a cluster's node
    /// list; a plain store of a number).
    pub fn set_workers(&self, n: usize) {
        self.workers
            .store(n as u32, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long the store's commits took so far.
    pub fn commit_latency(&self) -> crate::supervisor::metrics::Histogram {
        self.latency.snapshot()
    }

    /// Queues an op and returns its sequence number (1, 2, 3…). Never blocks.
    pub fn submit(&mut self, op: Op) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let pending = self.pending.get_mut();
        match &op {
            Op::Insert(job) => pending.inserts.push_back((seq, job.id)),
            Op::Query { token, .. } => pending.queries.push_back(*token),
            Op::Update(_)
            | Op::Retention { .. }
            | Op::Claim { .. }
            | Op::Watch { .. }
            | Op::ReserveIds => {}
        }
        // A demand goes straight to the claim thread (PostgreSQL) too, so
        // that it never waits behind a batch being committed; the store
        // thread has it only to report its number durable in order.
        if let (Op::Claim { pool, max, sems }, Some(claims)) = (&op, &self.claims) {
            let _ = claims.send(pg::ClaimMsg::Demand {
                pool: pool.clone(),
                max: *max,
                sems: sems.clone(),
            });
        }
        // A send fails only if the thread is gone; `try_completion` then
        // fails this op along with every other pending one.
        let _ = self.ops.send(Msg::Op { seq, op });
        seq
    }

    /// The next completion, if any. Never blocks (except to collect a dead
    /// store thread's panic message, which takes no time).
    pub fn try_completion(&self) -> Option<Completion> {
        let mut pending = self.pending.borrow_mut();
        if let Some(c) = pending.synthesized.pop_front() {
            return Some(c);
        }
        match self.completions.try_recv() {
            Ok(c) => {
                match &c {
                    Completion::Durable { upto } | Completion::Failed { upto, .. } => {
                        pending.settled = pending.settled.max(*upto);
                        while pending.inserts.front().is_some_and(|&(s, _)| s <= *upto) {
                            pending.inserts.pop_front();
                        }
                    }
                    Completion::Query { .. } => {
                        pending.queries.pop_front();
                    }
                    Completion::InsertsFailed { .. }
                    | Completion::Claimed { .. }
                    | Completion::RemoteDone { .. }
                    | Completion::Fenced { .. }
                    | Completion::CancelRequested { .. }
                    | Completion::Ids { .. } => {}
                }
                Some(c)
            }
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => {
                // The thread only drops its sender when it ends, and it only
                // ends on `close` (which consumes `self`) or by panicking.
                let reason = match &pending.death {
                    Some(r) => r.clone(),
                    None => {
                        let r = self.death_reason();
                        pending.death = Some(r.clone());
                        r
                    }
                };
                let last = self.next_seq - 1;
                if last > pending.settled {
                    let lost_inserts = pending.inserts.drain(..).map(|(_, id)| id).collect();
                    pending.settled = last;
                    let error = format!(
                        "job store {}: the store thread {reason}; these ops were not stored",
                        self.path.display()
                    );
                    pending.synthesized.push_back(Completion::Failed {
                        upto: last,
                        lost_inserts,
                        error,
                    });
                }
                while let Some(token) = pending.queries.pop_front() {
                    let result = Err(format!("job store unavailable: the store thread {reason}"));
                    pending
                        .synthesized
                        .push_back(Completion::Query { token, result });
                }
                pending.synthesized.pop_front()
            }
        }
    }

    fn death_reason(&self) -> String {
        match self.thread.borrow_mut().take().map(JoinHandle::join) {
            Some(Err(payload)) => format!("panicked: {}", panic_message(&*payload)),
            Some(Ok(Err(e))) => format!("failed: {e}"),
            Some(Ok(Ok(()))) | None => "exited".to_string(),
        }
    }

    /// Applies everything queued, commits, and stops the thread (for
    /// shutdown; blocks until done). Fails if the final commit failed (the
    /// updates it held are then lost; acknowledged inserts are not).
    pub fn close(self) -> Result<(), StoreError> {
        let _ = self.ops.send(Msg::Close);
        let thread = self.thread.borrow_mut().take();
        match thread.map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(payload)) => Err(StoreError::Thread {
                path: self.path.clone(),
                reason: format!("panicked: {}", panic_message(&*payload)),
            }),
            None => Err(StoreError::Thread {
                path: self.path.clone(),
                reason: self
                    .pending
                    .borrow()
                    .death
                    .clone()
                    .unwrap_or_else(|| "exited".to_string()),
            }),
        }
    }

    /// Runs a test hook in the store thread.
    #[cfg(test)]
    fn test_hook(&self, hook: committer::TestHook) {
        let _ = self.ops.send(Msg::Test(hook));
    }
}

/// What a store thread may keep of its handle: a sender into its own
/// channel (for a helper thread's messages) and a sign of the handle's
/// life (the channel does not disconnect while that sender lives).
pub(in crate::store) struct HandleLink {
    pub(in crate::store) ops: mpsc::Sender<Msg>,
    pub(in crate::store) alive: std::sync::Weak<()>,
}

/// Wakes the event loop when the store thread ends, however it ends.
struct WakeOnDrop(Arc<mio::Waker>);

impl Drop for WakeOnDrop {
    fn drop(&mut self) {
        let _ = self.0.wake();
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}
