//! Jobs, the other half of the core: admission, durable acknowledgement,
//! dispatch, completion, retries, timeouts, cancellation, keys and
//! semaphores. Still sans-IO: the store and the clients are reached through
//! [`Action::Store`] and [`Action::Reply`].
//!
//! Invariants:
//! - **A job is acknowledged only once durable.** `submit` queues an insert
//!   and remembers its store sequence number; the `Submitted` reply and the
//!   job's eligibility for dispatch wait for [`Supervisor::on_durable`]
//!   covering that number. Likewise a finished job's waiters hear of it only
//!   once its final row is durable.
//! - **Store sequence numbers are predicted, not returned**: every
//!   `Action::Store` is op number `store_seq + 1`, and the reactor submits
//!   them in action order.
//! - **A worker runs its in-flight jobs in the order sent**, so the front of
//!   `Proc::inflight` is the one running; the others were prefetched and, if
//!   the worker dies, go back to the queue without costing an attempt.
//! - A job holds its key and its pool's semaphores from dispatch until it
//!   leaves the worker (finished or requeued).

mod cluster;
mod dispatch;
mod manage;
mod requests;
mod submit;

use super::*;
use crate::store::{JobUpdate, NewJob, Query, QueryResult, Recovered};
use ipc_proto::control::{Attempt, JobDoc, JobOptions, Outcome};
use ipc_proto::worker::{Job as WireJob, Payload};
use ipc_proto::Bytes;
use rustc_hash::FxHashMap as HashMap;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

/// Room left in a frame for a `Job`'s fields besides its input.
const MAX_FRAME_HEADROOM: usize = 1024;

/// Terminal jobs kept in the store at most (oldest pruned first).
pub const MAX_FINISHED_JOBS: u64 = 1_000_000;

/// A dispatched job's `running` state is persisted only once it has run
/// this long. Tiny jobs thus cost one insert and one final update, not
/// three writes. The price: if the daemon dies within this window of a
/// dispatch, the job is requeued (nothing is lost) but that attempt is not
/// recorded as `lost`.
pub const RUNNING_PERSIST_DELAY: Duration = Duration::from_millis(20);

/// Adaptive prefetch (a pool without `prefetch`): at most this many jobs in
/// flight per worker.
///
/// The pool keeps an exponentially weighted mean of its jobs' run times
/// (weight [`RUN_TIME_WEIGHT`] for the newest, each counted up to
/// [`RUN_TIME_CAP`]). A job's run time is counted from when it became its
/// worker's front job (its dispatch, or the result of the job before it) to
/// its result. From that mean, a worker is sent jobs ahead of the one it
/// runs for about [`ADAPTIVE_AHEAD`] of expected work: depth
/// `1 + ADAPTIVE_AHEAD / mean`, rounded down to a power of two, at most this.
/// A pool starts at 1, goes up as soon as the depth doubles and down once it
/// halves twice (hysteresis: what waits ahead stays under about twice
/// [`ADAPTIVE_AHEAD`]), and goes to 1 at once when the mean reaches
/// [`ADAPTIVE_LONG_JOB`]. Each change is logged at debug level.
pub const ADAPTIVE_PREFETCH_MAX: u32 = 64;

/// Adaptive prefetch: a mean run time this long or longer means one job at
/// a time per worker (nothing waits behind a job that may run long).
pub const ADAPTIVE_LONG_JOB: Duration = Duration::from_millis(1);

/// Adaptive prefetch: the expected work sent ahead of a worker's running
/// job (see [`ADAPTIVE_PREFETCH_MAX`]).
pub const ADAPTIVE_AHEAD: Duration = Duration::from_millis(1);

/// Adaptive prefetch: once a worker's running job has run this long, it is
/// sent nothing more ahead, and when a worker of the pool has no job in hand
/// (and none to take from the queue), the jobs waiting behind that running
/// one are taken back (`Cancel`, answered `Failed` by the worker for a job
/// it has not started) and go to the idle worker, with no attempt counted.
pub const TAKE_BACK_AFTER: Duration = Duration::from_millis(2);

/// Weight of the newest run time in a pool's mean (see
/// [`ADAPTIVE_PREFETCH_MAX`]).
const RUN_TIME_WEIGHT: f64 = 1.0 / 8.0;

/// A run time counts up to this much in a pool's mean: anything longer is
/// long anyway, and a pool whose jobs got short again recovers within tens
/// of jobs.
const RUN_TIME_CAP: Duration = Duration::from_secs(1);

/// The adaptive depth after `current` for a mean run time of `mean_ns`
/// (see [`ADAPTIVE_PREFETCH_MAX`]).
pub(super) fn adaptive_depth(current: u32, mean_ns: f64) -> u32 {
    let long = ADAPTIVE_LONG_JOB.as_nanos() as f64;
    if mean_ns >= long {
        return 1;
    }
    let ahead = ADAPTIVE_AHEAD.as_nanos() as f64 / mean_ns.max(1.0);
    let raw = (1.0 + ahead).min(f64::from(ADAPTIVE_PREFETCH_MAX)) as u32;
    // Largest power of two <= raw (raw >= 1).
    let target = 1u32 << (31 - raw.max(1).leading_zeros());
    let current = current.max(1);
    if target > current || target.saturating_mul(4) <= current {
        target
    } else {
        current
    }
}

/// A queue entry: higher priority first, then lower `order` (FIFO; jobs
/// put back after a lost attempt get a negative order: the head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct QEntry {
    priority: i32,
    order: Reverse<i64>,
    id: u64,
}

/// Per-pool queue and counters.
#[derive(Debug, Default)]
pub(super) struct PoolJobs {
    queue: BinaryHeap<QEntry>,
    /// Jobs in the `Queued` phase.
    pub(super) queued: u64,
    /// Handed to a worker.
    pub(super) running: u64,
    /// Terminal counts (store history plus this run).
    pub(super) succeeded: u64,
    pub(super) failed: u64,
    /// Needs a dispatch pass.
    pub(super) dirty: bool,
    /// Weighted mean run time of its recent jobs, in nanoseconds (adaptive
    /// prefetch); `None` before the first result.
    pub(super) mean_run_ns: Option<f64>,
    /// Adaptive prefetch depth now (0 until set: read as 1).
    pub(super) adaptive: u32,
    /// When a worker is idle while jobs wait behind another's running job
    /// that has not yet run [`TAKE_BACK_AFTER`]: when that is reached.
    pub(super) take_back_at: Option<Instant>,
    /// A claim of its jobs is asked of the store (cluster).
    pub(super) claiming: bool,
    /// Clients told (`PoolFailed`) of the pool's current failure: each
    /// hears of one failure once. Cleared when the pool runs again.
    pub(super) told_failed: rustc_hash::FxHashSet<ClientId>,
    /// For metrics: finished jobs by state, run times.
    pub(super) stats: super::metrics::PoolStats,
}

#[derive(Debug)]
enum JobPhase {
    /// Waiting for a worker (possibly before its insert is durable).
    Queued,
    Running {
        proc: ProcId,
    },
    /// Final state decided; waiting for its row to be durable.
    Finishing(Box<Final>),
}

#[derive(Debug)]
struct Final {
    state: JobState,
    output: Option<JobOutput>,
    error: Option<String>,
    finished_ms: u64,
}

#[derive(Debug)]
struct Job {
    id: u64,
    /// Uid of the client that submitted it: only it (and admins) may see,
    /// wait on or cancel it.
    owner: u32,
    pool: String,
    priority: i32,
    key: Option<String>,
    max_attempts: u32,
    timeout: Option<Duration>,
    /// Shared with the store's insert and the arena write, not copied.
    input: Arc<[u8]>,
    /// `Some(len)`: the input is the store's payload file of `len` bytes
    /// (see [`crate::store::input_file`]) and `input` is empty. A large
    /// input leaves memory once its insert is durable, so queued jobs cost
    /// no RAM for their payloads; it is read straight into a worker's
    /// arena when the job runs (`Action::WriteArenaFromFile`).
    input_file: Option<u64>,
    /// With `input_file`, until the insert is durable: the client's file
    /// the input is read from (the payload file may not exist yet). In a
    /// `payloads = "memory"` pool, until the job ends.
    input_source: Option<Arc<std::fs::File>>,
    /// The large input is kept only in memory (`payloads = "memory"`):
    /// `input`, or the client's file in `input_source` with `held`.
    memory: bool,
    /// Counts `input_source` among the descriptors memory-mode jobs hold
    /// (see [`MAX_HELD_SOURCES`]).
    held: Option<HeldSource>,
    /// `input_source` is a memfd sealed so that a worker may map it
    /// (see `fdpass::shareable_for_reading`): a worker that takes
    /// descriptors gets it as is, with no copy into its arena.
    input_shareable: bool,
    /// The client's output buffer (a memfd), for a job whose outputs stay
    /// in memory: a large output is written there (by a worker that takes
    /// descriptors, else by the daemon from the arena) and the buffer is
    /// what the waiting clients receive. Counted in `held_buffer`.
    output_buffer: Option<Arc<std::fs::File>>,
    held_buffer: Option<HeldSource>,
    /// Its pool had `payloads = "memory"` when the job was submitted (or
    /// recovered): a large output goes only to its waiters. Fixed for the
    /// job's life, whatever a reload changes.
    outputs_in_memory: bool,
    attempts: Vec<Attempt>,
    created_ms: u64,
    phase: JobPhase,
    /// A client asked to cancel it.
    cancel_requested: bool,
    /// Holds its key and semaphores (between dispatch and leaving the worker).
    holds: bool,
    /// Its insert failed: it was never acknowledged; drop it when done.
    unstored: bool,
    /// Was in a worker, among several jobs in flight, when it died: it may be
    /// the one that killed it. It runs alone from now on, so that a further
    /// death is attributed exactly.
    suspect: bool,
    /// Its input is stored in a payload file although small (see
    /// [`QUEUED_INPUT_BUDGET`]), and leaves memory once its insert is durable.
    spilled: bool,
    /// Sent ahead to a worker, then asked back (a `Cancel` that is not the
    /// client's) for an idle worker: a `Failed` answer puts it back in the
    /// queue with no attempt counted (see [`TAKE_BACK_AFTER`]).
    taken_back: bool,
}

impl Job {
    /// Bytes of input, in memory or in its payload file.
    fn input_len(&self) -> u64 {
        self.input_file.unwrap_or(self.input.len() as u64)
    }

    /// Whether the input goes to a worker through its arena: when larger
    /// than `inline_limit`, and always when it is in a file (the worker
    /// takes a shared-memory input of any size).
    fn through_arena(&self, inline_limit: u64) -> bool {
        self.input_file.is_some() || self.input.len() as u64 > inline_limit
    }

    /// Whether a worker that takes descriptors (`takes_fds`) gets the
    /// input as the client's memfd itself (`Payload::Fd`), not through its
    /// arena.
    fn input_by_fd(&self, takes_fds: bool) -> bool {
        takes_fds && self.memory && self.input_shareable && self.input_source.is_some()
    }

    /// Whether it needs `len` bytes of a worker's arena for its input.
    fn needs_arena(&self, inline_limit: u64, takes_fds: bool) -> bool {
        self.through_arena(inline_limit) && !self.input_by_fd(takes_fds)
    }
}

/// What a submit may add to the basic request (`SubmitWith`).
#[derive(Debug, Default)]
pub struct SubmitExtra {
    /// Overrides the pool's `payloads` for this job.
    pub payloads: Option<crate::config::PayloadMode>,
    /// The client's output buffer, checked
    /// (`fdpass::check_output_buffer`).
    pub output_buffer: Option<Arc<std::fs::File>>,
    /// The input descriptor may be handed to a worker to map
    /// (`fdpass::shareable_for_reading`).
    pub input_shareable: bool,
}

/// In-memory inputs of jobs the daemon holds (queued, or in a worker's
/// hands) may add up to this much. Past it, a new input of at least
/// [`SPILL_MIN`] bytes is stored in a payload file, like a large one, and
/// leaves memory once stored: a flood of just-under-a-mebibyte inputs, or a
/// restart with a deep queue of them, cannot fill the daemon's memory.
pub const QUEUED_INPUT_BUDGET: u64 = 64 << 20;

/// Cluster: a node claims jobs for about this much work per worker with
/// room (from the pool's mean run time), so that a worker finds its next
/// job here rather than after a round trip to the database, while long
/// jobs are not hoarded by one node; between 1 and
/// [`CLAIM_MAX_PER_WORKER`] each, [`CLAIM_AHEAD`] before any run time is
/// known.
pub const CLAIM_WINDOW: Duration = Duration::from_millis(50);
/// See [`CLAIM_WINDOW`].
pub const CLAIM_MAX_PER_WORKER: usize = 512;
/// See [`CLAIM_WINDOW`].
pub const CLAIM_AHEAD: usize = 4;

/// With a store that keeps no payload files (PostgreSQL), the inputs of
/// the jobs the daemon holds stay in its memory, up to this much; a submit
/// past it is refused until some end.
pub const STORE_INPUT_BUDGET: u64 = 1 << 30;

/// At most this many client files are held for `payloads = "memory"` jobs
/// at once (one descriptor each, until the job ends); more are refused
/// until some end.
pub const MAX_HELD_SOURCES: usize = 1024;

/// At most this many bytes of large inputs sent as bytes (not as a
/// descriptor) are held for `payloads = "memory"` jobs at once.
pub const MEMORY_BYTES_BUDGET: u64 = 1 << 30;

/// One of the client files memory-mode jobs hold: counted while it lives.
#[derive(Debug)]
struct HeldSource(std::rc::Rc<std::cell::Cell<usize>>);

impl HeldSource {
    fn new(count: &std::rc::Rc<std::cell::Cell<usize>>) -> HeldSource {
        count.set(count.get() + 1);
        HeldSource(std::rc::Rc::clone(count))
    }
}

impl Drop for HeldSource {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// Inputs smaller than this always stay in memory (and in the job's row):
/// a payload file would cost more than it saves.
pub const SPILL_MIN: u64 = 512;

/// Whether an input of `len` bytes may reach a worker through its arena:
/// when over `inline_limit`, and when it is large enough to be kept in a
/// payload file (see [`Job::through_arena`]), whatever `inline_limit` says.
fn may_use_arena(len: u64, inline_limit: u64) -> bool {
    len > inline_limit || len >= crate::store::FILE_PAYLOAD_MIN as u64
}

/// A submitted job's input.
pub enum SubmitInput {
    /// In memory.
    Bytes(Arc<[u8]>),
    /// In a file the client passed, of at least `FILE_PAYLOAD_MIN` bytes:
    /// never read into memory. The store copies it into the job's payload
    /// file, and until that is durable a worker's arena is filled from it
    /// directly.
    Source(crate::store::InputSource),
}

impl From<Arc<[u8]>> for SubmitInput {
    fn from(b: Arc<[u8]>) -> Self {
        SubmitInput::Bytes(b)
    }
}

impl From<Vec<u8>> for SubmitInput {
    fn from(b: Vec<u8>) -> Self {
        SubmitInput::Bytes(b.into())
    }
}

impl From<&[u8]> for SubmitInput {
    fn from(b: &[u8]) -> Self {
        SubmitInput::Bytes(b.into())
    }
}

impl From<crate::store::InputSource> for SubmitInput {
    fn from(s: crate::store::InputSource) -> Self {
        SubmitInput::Source(s)
    }
}

/// Bytes of an arena of `shm_size` that inputs may use (its input half).
fn arena_input_capacity(shm_size: u64) -> u64 {
    let layout = ipc_proto::arena::ArenaLayout::split(shm_size);
    layout.input.end - layout.input.start
}

/// What the queue offers a worker.
enum Next {
    Job(u64),
    /// Nothing runnable now.
    None,
    /// The next job must run alone; this worker already has jobs.
    NeedsEmptyWorker,
    /// The next job (taken off the queue) can never run in this pool: its
    /// input does not fit a worker's arena (recovered after `shm_size` was
    /// lowered). It is to be failed, not waited for.
    Unrunnable(u64, String),
}

#[derive(Debug)]
enum Pending {
    Insert {
        id: u64,
        client: ClientId,
        wait: bool,
    },
    Final {
        id: u64,
    },
    /// A reply that must not overtake earlier replies to the same client
    /// (a refused submit after pipelined accepted ones).
    Reply {
        client: ClientId,
        resp: Box<Response>,
    },
}

#[derive(Debug)]
enum QueryPurpose {
    Wait {
        client: ClientId,
        group: u64,
        id: u64,
    },
    Result {
        client: ClientId,
        id: u64,
    },
    Cancel {
        client: ClientId,
        id: u64,
    },
    Jobs {
        client: ClientId,
        /// The pool asked for, if any: when it is not configured and has
        /// no jobs, the answer says so (a typo is not an empty list).
        pool: Option<String>,
    },
    Retry {
        client: ClientId,
        id: u64,
    },
    Prune {
        client: ClientId,
    },
    /// `status --cluster`.
    Nodes {
        client: ClientId,
    },
    /// `status`: the store's warnings.
    Warnings {
        client: ClientId,
    },
    /// `status` of cluster nodes: the shared queue's counts, for the
    /// reports in `JobTable::status_waiting`.
    Status,
    /// The end of a job that ran elsewhere (cluster), for its waiters.
    Remote {
        id: u64,
        waiters: Vec<Waiter>,
    },
}

/// Who a control client is, for authorization: its uid (from
/// `SO_PEERCRED`) and whether it may see and control every user's jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Viewer {
    /// The client's uid.
    pub uid: u32,
    /// Root, the daemon's uid or a member of `admin_group`.
    pub admin: bool,
}

impl Viewer {
    /// What a client the core was not told about counts as: nobody in
    /// particular, no admin (fail closed: it sees only the jobs it
    /// submitted itself, which belong to this uid).
    pub const UNKNOWN: Viewer = Viewer {
        uid: u32::MAX,
        admin: false,
    };

    /// May this viewer see a job of `owner`'s?
    pub fn sees(&self, owner: u32) -> bool {
        self.admin || self.uid == owner
    }

    /// The owner filter of a store query for this viewer.
    pub fn filter(&self) -> Option<u32> {
        (!self.admin).then_some(self.uid)
    }
}

impl QueryPurpose {
    fn client(&self) -> ClientId {
        match *self {
            QueryPurpose::Wait { client, .. }
            | QueryPurpose::Result { client, .. }
            | QueryPurpose::Cancel { client, .. }
            | QueryPurpose::Jobs { client, .. }
            | QueryPurpose::Retry { client, .. }
            | QueryPurpose::Prune { client }
            | QueryPurpose::Nodes { client }
            | QueryPurpose::Warnings { client } => client,
            // No client's: those waiting are counted one by one.
            QueryPurpose::Status => ClientId::MAX,
            QueryPurpose::Remote { ref waiters, .. } => waiters.first().map_or(0, |w| w.client),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Waiter {
    client: ClientId,
    with_output: bool,
    group: Option<u64>,
}

/// Everything about jobs that is not per pool.
#[derive(Debug, Default)]
pub(super) struct JobTable {
    jobs: HashMap<u64, Job>,
    next_id: u64,
    tail_order: i64,
    head_order: i64,
    store_seq: u64,
    pending: VecDeque<(u64, Pending)>,
    queries: HashMap<u64, QueryPurpose>,
    waiters: HashMap<u64, Vec<Waiter>>,
    wait_groups: HashMap<u64, (ClientId, usize)>,
    /// Per client: store queries in flight and open `wait` groups (see
    /// [`Supervisor::client_backlog`]).
    backlog: HashMap<ClientId, usize>,
    /// Who each connected client is ([`Supervisor::set_viewer`]).
    viewers: HashMap<ClientId, Viewer>,
    /// Bytes of in-memory inputs of the jobs in `jobs`: the sum of their
    /// `input.len()`, kept where an input is set, dropped or its job
    /// removed (see [`QUEUED_INPUT_BUDGET`]).
    mem_inputs: u64,
    /// Bytes of `mem_inputs` that are memory-mode inputs (see
    /// [`MEMORY_BYTES_BUDGET`]).
    memory_bytes: u64,
    /// Client files held by memory-mode jobs (see [`MAX_HELD_SOURCES`]).
    held_sources: std::rc::Rc<std::cell::Cell<usize>>,
    next_group: u64,
    running_keys: HashMap<String, u64>,
    /// Entries popped while their key was busy, per key, with their pool.
    parked: HashMap<String, VecDeque<(String, QEntry)>>,
    sem_used: HashMap<String, u32>,
    /// Queued jobs of pools that are not configured (removed by reload, or
    /// recovered from the store): they wait until the pool comes back.
    orphans: HashMap<String, Vec<QEntry>>,
    /// Running jobs a client cancelled, by when the worker must let go.
    cancel_deadlines: BTreeSet<(Instant, u64)>,
    /// Dispatched jobs whose `running` row is not written yet: (when to
    /// write it, job, attempt number), in dispatch order.
    unpersisted: VecDeque<(Instant, u64, u32)>,
    /// Ids up to this one (excluded) are this daemon's to give (see
    /// `Recovered::id_end`); then the spare block, asked for in time.
    id_end: u64,
    spare_ids: Option<(u64, u64)>,
    ids_asked: bool,
    /// The shared queue's counts per pool and when they were read (see
    /// `status_of_cluster`).
    queue_counts: Option<(Instant, Vec<(String, u64)>)>,
    /// When the counts being read were asked for.
    counts_asked: Option<Instant>,
    /// Statuses waiting for the counts being read.
    status_waiting: Vec<(ClientId, ipc_proto::control::StatusReport)>,
    /// Clients waiting for jobs that are not here (a cluster's).
    remote_waits: HashMap<u64, Vec<Waiter>>,
}

impl JobTable {
    /// An empty table; every id is this daemon's until a store says
    /// otherwise (see `Recovered::id_end`).
    pub(super) fn new() -> JobTable {
        JobTable {
            id_end: u64::MAX,
            ..JobTable::default()
        }
    }
}

impl Supervisor {
    /// Loads what the store recovered at start-up (call before `start`).
    pub fn recover(&mut self, rec: Recovered) {
        self.jt.next_id = rec.next_id.max(1);
        self.jt.id_end = rec.id_end;
        for (pool, counts) in &rec.counts {
            if let Some(p) = self.pools.get_mut(pool) {
                for (state, n) in counts {
                    match state {
                        JobState::Succeeded => p.jobs.succeeded += n,
                        s if s.is_terminal() => p.jobs.failed += n,
                        _ => {}
                    }
                }
            }
        }
        let n = rec.jobs.len();
        for r in rec.jobs {
            self.admit_queued(r);
        }
        if n > 0 {
            self.log(
                Level::Info,
                format!("recovered {n} unfinished jobs from the store"),
            );
        }
        for (pool, entries) in &self.jt.orphans {
            self.actions.push_back(Action::Log {
                level: Level::Warn,
                msg: format!(
                    "{} queued jobs belong to pool {pool:?}, which is not configured; they wait until it is added back",
                    entries.len()
                ),
            });
        }
        self.push_retention();
    }

    /// Puts a stored `queued` job (recovered, or retried) in its pool's
    /// queue, at the tail of its priority.
    fn admit_queued(&mut self, r: crate::store::RecoveredJob) {
        {
            let j = r.job;
            self.jt.tail_order += 1;
            let entry = QEntry {
                priority: j.priority,
                order: Reverse(self.jt.tail_order),
                id: j.id,
            };
            self.jt.mem_inputs += j.input.len() as u64;
            let job = Job {
                spilled: false,
                id: j.id,
                owner: j.owner,
                pool: j.pool.clone(),
                priority: j.priority,
                key: j.key,
                max_attempts: j.max_attempts,
                timeout: j.timeout_ms.map(Duration::from_millis),
                input: j.input,
                input_file: r.input_file,
                input_source: None,
                memory: false,
                held: None,
                input_shareable: false,
                output_buffer: None,
                held_buffer: None,
                outputs_in_memory: self.pool_keeps_payloads_in_memory(&j.pool),
                attempts: r.attempts,
                created_ms: j.created_ms,
                phase: JobPhase::Queued,
                cancel_requested: false,
                holds: false,
                suspect: false,
                unstored: false,
                taken_back: false,
            };
            self.enqueue_entry(&j.pool, entry);
            self.jt.jobs.insert(job.id, job);
        }
    }

    /// Turns `events` broadcasting on or off (off: no event is built).
    pub fn set_events_wanted(&mut self, on: bool) {
        self.events_wanted = on;
    }

    /// The worker finished job `id` with `output`.
    pub fn on_job_done(&mut self, proc: ProcId, id: u64, output: Arc<[u8]>, now: Instant) {
        self.job_result(proc, id, Ok(JobOutput::Mem(output)), now);
    }

    /// Whether a large output of job `id` stays out of the store: its pool
    /// had `payloads = "memory"` when the job came in.
    pub fn output_in_memory(&self, id: u64) -> bool {
        self.jt.jobs.get(&id).is_some_and(|j| j.outputs_in_memory)
    }

    /// The output buffer the client of job `id` passed, if any (see
    /// `SubmitExtra::output_buffer`).
    pub fn output_buffer(&self, id: u64) -> Option<Arc<std::fs::File>> {
        self.jt.jobs.get(&id)?.output_buffer.clone()
    }

    /// The output buffer job `id` was sent to worker `proc` with
    /// (`ToWorker::JobOut`), which a `Payload::Fd` output refers to; `None`
    /// if it has none there (such an output is then a protocol error).
    pub fn output_buffer_sent(&self, proc: ProcId, id: u64) -> Option<Arc<std::fs::File>> {
        let job = self.jt.jobs.get(&id)?;
        if !matches!(job.phase, JobPhase::Running { proc: p } if p == proc) {
            return None;
        }
        let (name, idx) = self.find_proc(proc)?;
        match &self.pools[&name].slots[idx].state {
            SlotState::Running(p) if p.takes_fds => job.output_buffer.clone(),
            _ => None,
        }
    }

    /// Client files held by memory-mode jobs, and [`MAX_HELD_SOURCES`].
    pub fn memory_files_held(&self) -> (usize, usize) {
        (self.jt.held_sources.get(), MAX_HELD_SOURCES)
    }

    /// Bytes of memory-mode inputs held as bytes, and
    /// [`MEMORY_BYTES_BUDGET`].
    pub fn memory_bytes_held(&self) -> (u64, u64) {
        (self.jt.memory_bytes, MEMORY_BYTES_BUDGET)
    }

    fn pool_keeps_payloads_in_memory(&self, pool: &str) -> bool {
        self.pools
            .get(pool)
            .is_some_and(|p| p.config.payloads == crate::config::PayloadMode::Memory)
    }

    /// The worker finished job `id`, and the daemon has already written its
    /// output to a sealed memfd, straight from the worker's arena
    /// (`payloads = "memory"`).
    pub fn on_job_done_in_memfd(
        &mut self,
        proc: ProcId,
        id: u64,
        output: super::OutputMemfd,
        now: Instant,
    ) {
        self.job_result(proc, id, Ok(JobOutput::Memfd(output)), now);
    }

    /// The worker finished job `id`, and the daemon has already written its
    /// output (`len` bytes) to the store's payload file, straight from the
    /// worker's arena (see `JobUpdate::output_file_len`).
    pub fn on_job_done_in_file(&mut self, proc: ProcId, id: u64, len: u64, now: Instant) {
        self.job_result(proc, id, Ok(JobOutput::File(len)), now);
    }

    /// The input file of job `id`, about to be given to `proc`, could not
    /// be read (a payload file deleted or damaged behind the daemon's
    /// back): the job fails with `error`; the worker never saw it.
    pub fn on_input_unreadable(&mut self, proc: ProcId, id: u64, error: String, now: Instant) {
        self.job_result(proc, id, Err((error, None)), now);
    }

    /// The worker reported job `id` failed. The error text is the
    /// worker's, untrusted: it is kept cut to [`MAX_ERROR_TEXT`] (a frame
    /// may carry 64 MiB, which would make the job's document, with its
    /// attempts, too large to send or store).
    pub fn on_job_failed(&mut self, proc: ProcId, id: u64, error: String, now: Instant) {
        self.job_result(proc, id, Err((cap_error_text(error), None)), now);
    }

    /// The worker reported job `id` failed (`Raised`): like
    /// [`Supervisor::on_job_failed`], and `output` (the worker's
    /// machine-readable detail, in memory or already in its payload file)
    /// is kept as the failed job's output.
    pub fn on_job_raised(
        &mut self,
        proc: ProcId,
        id: u64,
        error: String,
        output: JobOutput,
        now: Instant,
    ) {
        self.job_result(proc, id, Err((cap_error_text(error), Some(output))), now);
    }

    /// The RSS of `proc` measured after a job (for `max_memory`).
    pub fn on_rss(&mut self, proc: ProcId, bytes: u64, now: Instant) {
        let Some((name, idx)) = self.find_proc(proc) else {
            return;
        };
        let pool = &self.pools[&name];
        let Some(limit) = pool.config.max_memory else {
            return;
        };
        if bytes > limit {
            let slot = pool.slots[idx].id;
            self.log(
                Level::Info,
                format!(
                    "pool {name} worker {slot}: RSS {} MiB above max_memory {} MiB; recycling it",
                    bytes >> 20,
                    limit >> 20
                ),
            );
            self.stop_slot(&name, idx, StopReason::Recycle, now);
        }
    }

    /// Runs the dispatch passes that events of this turn made necessary.
    /// The reactor calls it once per loop turn, so a batch of results is
    /// followed by one batch of dispatches (one write per worker).
    pub fn pump(&mut self, now: Instant) {
        if !self.pools.values().any(|p| p.jobs.dirty) {
            return;
        }
        let dirty: Vec<String> = self
            .pools
            .iter()
            .filter(|(_, p)| p.jobs.dirty)
            .map(|(n, _)| n.clone())
            .collect();
        for name in dirty {
            if let Some(p) = self.pools.get_mut(&name) {
                p.jobs.dirty = false;
            }
            self.dispatch(&name, now);
        }
    }

    /// Earliest job-related deadline (cancel grace periods).
    pub(super) fn job_deadline(&self) -> Option<Instant> {
        let cancel = self.jt.cancel_deadlines.first().map(|(t, _)| *t);
        let persist = self.jt.unpersisted.front().map(|(t, _, _)| *t);
        match (cancel, persist) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Writes the `running` row of jobs still running past the delay.
    fn persist_running(&mut self, now: Instant) {
        while let Some(&(t, id, n)) = self.jt.unpersisted.front() {
            if t > now {
                break;
            }
            self.jt.unpersisted.pop_front();
            let Some(job) = self.jt.jobs.get(&id) else {
                continue;
            };
            if !matches!(job.phase, JobPhase::Running { .. }) || job.attempts.len() as u32 != n {
                continue;
            }
            let update = JobUpdate::progress(id, JobState::Running, job.attempts.clone());
            self.store(Op::Update(update));
        }
    }

    /// Handles expired cancel grace periods.
    pub(super) fn job_timers(&mut self, now: Instant) {
        self.persist_running(now);
        while let Some(&(t, id)) = self.jt.cancel_deadlines.first() {
            if t > now {
                break;
            }
            self.jt.cancel_deadlines.remove(&(t, id));
            let Some(job) = self.jt.jobs.get(&id) else {
                continue;
            };
            let JobPhase::Running { proc } = job.phase else {
                continue;
            };
            let Some((name, idx)) = self.find_proc(proc) else {
                continue;
            };
            self.log(
                Level::Warn,
                format!("job {id}: worker did not give up the cancelled job in time; stopping it"),
            );
            let inflight = self.take_inflight(&name, idx);
            self.end_attempt(id, Outcome::Cancelled, Some("cancelled".into()), now);
            self.leave_worker(id);
            self.finish(id, JobState::Cancelled, None, Some("cancelled".into()), now);
            // The worker's other jobs did nothing wrong: back to the queue,
            // uncharged, before it is stopped.
            for other in inflight.into_iter().filter(|j| *j != id).rev() {
                self.requeue_unstarted(other);
            }
            self.stop_slot(&name, idx, StopReason::Cancel, now);
        }
    }

    /// The front job of a worker exceeded its timeout.
    pub(super) fn job_timed_out(&mut self, name: &str, idx: usize, now: Instant) {
        let inflight = self.take_inflight(name, idx);
        let mut it = inflight.into_iter();
        if let Some(id) = it.next() {
            let t = self
                .jt
                .jobs
                .get(&id)
                .and_then(|j| j.timeout)
                .unwrap_or_default();
            let err = format!("timed out after {}", humantime::format_duration(t));
            self.log(Level::Warn, format!("job {id} {err}; stopping its worker"));
            self.end_attempt(id, Outcome::TimedOut, Some(err.clone()), now);
            self.leave_worker(id);
            self.retry_or_finish(id, JobState::TimedOut, err, now);
        }
        for id in it {
            self.requeue_unstarted(id);
        }
        self.stop_slot(name, idx, StopReason::JobTimeout, now);
    }

    /// A worker process ended (or is being abandoned) with jobs in hand.
    ///
    /// With one job in hand, that job's attempt is lost. With several
    /// (prefetch), the daemon cannot know which one was running: the worker
    /// may have finished some whose results died unsent with it. Charging
    /// the front one could blame an innocent job and spare the culprit, so
    /// none is charged: all go back to the head of the queue as *suspects*,
    /// which run alone until they finish, where a death is unambiguous.
    pub(super) fn jobs_lost(&mut self, name: &str, idx: usize, why: &str, now: Instant) {
        let inflight = self.take_inflight(name, idx);
        if let [id] = inflight[..] {
            let err = format!("worker {why}");
            self.end_attempt(id, Outcome::Lost, Some(err.clone()), now);
            self.leave_worker(id);
            if let Some(j) = self.jt.jobs.get_mut(&id) {
                j.suspect = true;
            }
            self.retry_or_finish(id, JobState::Dead, err, now);
            return;
        }
        // Requeue in reverse so they keep their order at the head.
        for &id in inflight.iter().rev() {
            if let Some(j) = self.jt.jobs.get_mut(&id) {
                j.suspect = true;
            }
            self.requeue_unstarted(id);
        }
    }

    /// True when the process has jobs in hand.
    pub(super) fn has_inflight(&self, name: &str, idx: usize) -> bool {
        matches!(&self.pools[name].slots[idx].state, SlotState::Running(p) if !p.inflight.is_empty())
    }

    /// Sends the retention settings to the store (start and reload).
    pub(super) fn push_retention(&mut self) {
        let per_pool = self
            .pools
            .iter()
            .map(|(n, p)| (n.clone(), p.config.result_retention))
            .collect();
        self.store(Op::Retention {
            per_pool,
            default: Duration::from_secs(24 * 3600),
            max_finished: MAX_FINISHED_JOBS,
        });
    }

    /// Moves queued jobs of a pool that went away into the orphan list, and
    /// back when a pool of that name appears.
    pub(super) fn adopt_orphans(&mut self, name: &str) {
        if let Some(entries) = self.jt.orphans.remove(name) {
            if let Some(p) = self.pools.get_mut(name) {
                p.jobs.queued += entries.len() as u64;
                p.jobs.queue.extend(entries);
                p.jobs.dirty = true;
            }
        }
    }

    pub(super) fn orphan_queue(&mut self, pool: &mut Pool) {
        let entries: Vec<QEntry> = pool.jobs.queue.drain().collect();
        if !entries.is_empty() {
            self.jt
                .orphans
                .entry(pool.name.clone())
                .or_default()
                .extend(entries);
        }
    }

    // ---- internals ----

    pub(super) fn wall(&self, now: Instant) -> u64 {
        self.wall_base_ms + now.saturating_duration_since(self.instant_base).as_millis() as u64
    }

    fn store(&mut self, op: Op) -> u64 {
        self.jt.store_seq += 1;
        self.actions.push_back(Action::Store(op));
        self.jt.store_seq
    }

    /// Asks the store; the answer comes back to `on_query_result` with the
    /// query op's own sequence number as token.
    fn query(&mut self, query: Query, purpose: QueryPurpose) {
        let token = self.jt.store_seq + 1;
        self.store(Op::Query { token, query });
        *self.jt.backlog.entry(purpose.client()).or_insert(0) += 1;
        self.jt.queries.insert(token, purpose);
    }

    fn reply(&mut self, client: ClientId, resp: Response) {
        self.actions.push_back(Action::Reply { client, resp });
    }

    /// Replies with `doc` (whose `output` is `None`) and `output`: inline
    /// when small, else beside the frame ([`Action::ReplyJob`]), so a large
    /// output is never copied into a document.
    fn reply_doc(&mut self, client: ClientId, mut doc: JobDoc, output: Option<JobOutput>) {
        match output {
            Some(JobOutput::Mem(o)) if (o.len() as u64) < ipc_proto::control::FD_PAYLOAD_MIN => {
                doc.output = Some(Bytes(o.to_vec()));
                self.reply(client, Response::Job(doc));
            }
            Some(output) => self.actions.push_back(Action::ReplyJob {
                client,
                doc,
                output,
            }),
            None => self.reply(client, Response::Job(doc)),
        }
    }

    fn log(&mut self, level: Level, msg: String) {
        self.actions.push_back(Action::Log { level, msg });
    }

    pub(super) fn event(
        &mut self,
        now: Instant,
        event: &str,
        pool: Option<&str>,
        worker: Option<(u32, Option<u32>)>,
        job: Option<(u64, JobState)>,
        detail: Option<String>,
    ) {
        if !self.events_wanted {
            return;
        }
        let ev = Event {
            ts_ms: self.wall(now),
            event: event.to_string(),
            pool: pool.map(str::to_string),
            worker: worker.map(|w| w.0),
            pid: worker.and_then(|w| w.1),
            job: job.map(|j| j.0),
            state: job.map(|j| j.1),
            detail,
        };
        // Job events go only to the job's owner (and admins).
        let owner = job.map(|(id, _)| self.jt.jobs.get(&id).map_or(0, |j| j.owner));
        self.actions.push_back(Action::Event(ev, owner));
    }

    fn enqueue_entry(&mut self, pool: &str, entry: QEntry) {
        match self.pools.get_mut(pool) {
            Some(p) if !p.removing => {
                p.jobs.queue.push(entry);
                p.jobs.queued += 1;
                p.jobs.dirty = true;
            }
            _ => self
                .jt
                .orphans
                .entry(pool.to_string())
                .or_default()
                .push(entry),
        }
    }

    /// The job's insert is durable: acknowledge it. Its final row (if it
    /// is already done) has a later sequence number, so a waiter
    /// registered here is always in time.
    fn insert_durable(&mut self, id: u64, client: ClientId, wait: bool) {
        self.reply(client, Response::Submitted { id });
        // Its input is in a payload file now: let go of the memory (a
        // worker's arena is filled from the file instead).
        let files = self.payload_files;
        if let Some(job) = self.jt.jobs.get_mut(&id).filter(|j| !j.memory && files) {
            let len = job.input.len();
            if (len >= crate::store::FILE_PAYLOAD_MIN || job.spilled) && job.input_file.is_none() {
                job.input_file = Some(len as u64);
                self.jt.mem_inputs -= len as u64;
                job.input = Arc::default();
            }
            // The payload file is there now: let the client's file go.
            job.input_source = None;
        }
        if self.cluster && wait && !self.jt.jobs.contains_key(&id) {
            let waiter = Waiter {
                client,
                with_output: true,
                group: None,
            };
            return self.wait_remote(id, waiter);
        }
        if let Some(pool) = self
            .jt
            .jobs
            .get(&id)
            .filter(|_| wait)
            .map(|j| j.pool.clone())
        {
            self.jt.waiters.entry(id).or_default().push(Waiter {
                client,
                with_output: true,
                group: None,
            });
            // A submit that waits on a failed pool hears so after its
            // `Submitted`, each one (the client cannot know otherwise).
            if matches!(self.jt.jobs[&id].phase, JobPhase::Queued) {
                self.tell_pool_failed(&pool, Some(vec![client]), true);
            }
        }
    }

    /// If pool `name` is failed: tells `clients` (by default every client
    /// waiting for one of its queued jobs) with one `PoolFailed` each:
    /// once per failure unless `again` (a new request that waits, which is
    /// answered whatever the connection heard before). Waiters are only
    /// ever registered for jobs their client may see, so nobody hears of
    /// another user's jobs.
    pub(super) fn tell_pool_failed(
        &mut self,
        name: &str,
        clients: Option<Vec<ClientId>>,
        again: bool,
    ) {
        if self
            .pools
            .get(name)
            .is_none_or(|p| p.state != PoolState::Failed)
        {
            return;
        }
        let clients = clients.unwrap_or_else(|| {
            let jobs = &self.jt.jobs;
            let mut cs: Vec<ClientId> = self
                .jt
                .waiters
                .iter()
                .filter(|(id, _)| {
                    jobs.get(id)
                        .is_some_and(|j| j.pool == name && matches!(j.phase, JobPhase::Queued))
                })
                .flat_map(|(_, ws)| ws.iter().map(|w| w.client))
                .collect();
            cs.sort_unstable();
            cs.dedup();
            cs
        });
        let pool = self.pools.get_mut(name).expect("checked");
        let error = pool
            .failure
            .clone()
            .unwrap_or_else(|| "crash loop".to_owned());
        let fresh: Vec<ClientId> = clients
            .into_iter()
            .filter(|c| pool.jobs.told_failed.insert(*c) || again)
            .collect();
        for client in fresh {
            self.reply(
                client,
                Response::PoolFailed {
                    pool: name.to_owned(),
                    error: error.clone(),
                },
            );
        }
    }

    fn final_durable(&mut self, id: u64) {
        let Some(mut job) = self.jt.jobs.remove(&id) else {
            return;
        };
        self.jt.mem_inputs -= job.input.len() as u64;
        if job.memory {
            self.jt.memory_bytes -= job.input.len() as u64;
        }
        let Some(waiters) = self.jt.waiters.remove(&id) else {
            return;
        };
        let output = match &mut job.phase {
            JobPhase::Finishing(f) => f.output.take(),
            _ => None,
        };
        let doc = self.doc(&job);
        // Almost always one waiter: the last one takes the document and
        // the output rather than copies.
        let mut last = Some((doc, output));
        let n = waiters.len();
        for (i, w) in waiters.into_iter().enumerate() {
            let (doc, output) = if i + 1 == n {
                last.take().expect("taken once")
            } else {
                last.clone().expect("not yet taken")
            };
            if w.with_output {
                self.reply_doc(w.client, doc, output);
            } else {
                self.reply(w.client, Response::Job(doc));
            }
            if let Some(g) = w.group {
                self.group_done(g);
            }
        }
    }

    fn group_done(&mut self, group: u64) {
        let done = match self.jt.wait_groups.get_mut(&group) {
            Some((client, left)) => {
                *left = left.saturating_sub(1);
                (*left == 0).then_some(*client)
            }
            None => None,
        };
        if let Some(client) = done {
            self.jt.wait_groups.remove(&group);
            self.backlog_sub(client);
            self.reply(client, Response::End);
        }
    }

    fn backlog_sub(&mut self, client: ClientId) {
        if let Some(n) = self.jt.backlog.get_mut(&client) {
            *n -= 1;
            if *n == 0 {
                self.jt.backlog.remove(&client);
            }
        }
    }

    /// How many of `client`'s requests the core is still working on: store
    /// queries in flight and `wait`s not yet ended. The reactor reads no
    /// further request from a client over its limit, so what one client
    /// can make the daemon load or hold at once is bounded.
    pub fn client_backlog(&self, client: ClientId) -> usize {
        self.jt.backlog.get(&client).copied().unwrap_or(0)
    }

    /// The job's document, without its output (replies add it with
    /// `reply_doc`).
    fn doc(&self, job: &Job) -> JobDoc {
        let (state, error, finished) = match &job.phase {
            JobPhase::Queued => (JobState::Queued, None, None),
            JobPhase::Running { .. } => (JobState::Running, None, None),
            JobPhase::Finishing(f) => (f.state, f.error.clone(), Some(f.finished_ms)),
        };
        JobDoc {
            id: job.id,
            pool: job.pool.clone(),
            state,
            priority: job.priority,
            key: job.key.clone(),
            created_ms: job.created_ms,
            finished_ms: finished,
            attempts: job.attempts.clone(),
            output: None,
            error,
        }
    }

    /// Decides a job's final state; waiters hear once it is durable.
    fn finish(
        &mut self,
        id: u64,
        state: JobState,
        output: Option<JobOutput>,
        error: Option<String>,
        now: Instant,
    ) {
        self.leave_worker(id);
        let finished_ms = self.wall(now);
        let Some(job) = self.jt.jobs.get_mut(&id) else {
            return;
        };
        if job.unstored {
            self.jt.mem_inputs -= job.input.len() as u64;
            if job.memory {
                self.jt.memory_bytes -= job.input.len() as u64;
            }
            self.jt.jobs.remove(&id);
            return;
        }
        let input_file = !job.memory
            && (job.input_file.is_some()
                || job.spilled
                || job.input.len() >= crate::store::FILE_PAYLOAD_MIN);
        self.jt.mem_inputs -= job.input.len() as u64;
        if job.memory {
            self.jt.memory_bytes -= job.input.len() as u64;
            // Its input (bytes or the client's file) goes with it: a
            // memory-mode job is never run again.
            job.input_source = None;
            job.held = None;
        }
        job.output_buffer = None;
        job.held_buffer = None;
        job.input = Arc::default();
        let pool = job.pool.clone();
        let run_ms = job
            .attempts
            .last()
            .and_then(|a| Some(a.ended_ms?.saturating_sub(a.started_ms)));
        let update = JobUpdate {
            // Kept for a `retry` unless it succeeded (pruning removes it).
            drop_input_file: input_file && state == JobState::Succeeded,
            id,
            state,
            attempts: job.attempts.clone(),
            // Shared with the job's waiters (see `final_durable`).
            output: match &output {
                Some(JobOutput::Mem(o)) => Some(Arc::clone(o)),
                _ => None,
            },
            output_file_len: match &output {
                Some(JobOutput::File(len)) => Some(*len),
                _ => None,
            },
            output_memory_len: match &output {
                Some(JobOutput::Memfd(m)) => Some(m.len),
                _ => None,
            },
            error: error.clone(),
            finished_ms: Some(finished_ms),
        };
        job.phase = JobPhase::Finishing(Box::new(Final {
            state,
            output,
            error: error.clone(),
            finished_ms,
        }));
        if let Some(p) = self.pools.get_mut(&pool) {
            if state == JobState::Succeeded {
                p.jobs.succeeded += 1;
            } else {
                p.jobs.failed += 1;
            }
            p.jobs.stats.finished(state, run_ms);
        }
        let seq = self.store(Op::Update(update));
        self.jt.pending.push_back((seq, Pending::Final { id }));
        self.event(
            now,
            "job_finished",
            Some(&pool),
            None,
            Some((id, state)),
            error,
        );
    }

    fn job_result(
        &mut self,
        proc: ProcId,
        id: u64,
        result: Result<JobOutput, (String, Option<JobOutput>)>,
        now: Instant,
    ) {
        let Some((name, idx)) = self.find_proc(proc) else {
            return;
        };
        let (found, phase_ok) = match &self.pools[&name].slots[idx].state {
            SlotState::Running(p) => (
                p.inflight.iter().position(|j| *j == id),
                matches!(p.phase, Phase::Ready | Phase::Draining { .. }),
            ),
            _ => (None, false),
        };
        let Some(pos) = found else {
            if phase_ok {
                self.on_protocol_error(
                    proc,
                    format!("result for job {id}, which it was not given"),
                    now,
                );
            }
            // A stopping worker's late answer for a job already dealt with.
            return;
        };
        let taken_back = result.is_err()
            && self
                .jt
                .jobs
                .get(&id)
                .is_some_and(|j| j.taken_back && !j.cancel_requested);
        if taken_back {
            return self.job_returned(&name, idx, pos, id, now);
        }
        let pool = self.pools.get_mut(&name).expect("exists");
        let max_jobs = pool.config.max_jobs_per_worker;
        let wants_rss = pool.config.max_memory.is_some();
        let slot = &mut pool.slots[idx];
        let SlotState::Running(p) = &mut slot.state else {
            return;
        };
        p.jobs_handled += 1;
        let run_time = leave_worker(p, pos, id, &self.jt.jobs, now);
        // Once: a recycled worker with prefetched jobs still in hand finishes
        // them while draining, and is stopped (below) when the last is done.
        let recycle = max_jobs > 0
            && p.jobs_handled >= max_jobs
            && !matches!(p.phase, Phase::Draining { .. });
        // At most every 50 ms while the worker has jobs in hand, and always
        // when it has none left: the last job before a pause (a hog) is
        // never left unmeasured.
        let measure = wants_rss
            && (p.inflight.is_empty()
                || p.last_rss_check
                    .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_millis(50)));
        if measure {
            p.last_rss_check = Some(now);
        }
        let drained = matches!(p.phase, Phase::Draining { .. }) && p.inflight.is_empty();
        let cancelled = self.jt.jobs.get(&id).is_some_and(|j| j.cancel_requested);
        // A cancelled job's run time says nothing about the pool's jobs.
        if let (Some(run), false) = (run_time, cancelled) {
            self.record_run_time(&name, run);
        }
        match result {
            Ok(output) => {
                self.end_attempt(id, Outcome::Succeeded, None, now);
                self.finish(id, JobState::Succeeded, Some(output), None, now);
            }
            Err((error, output)) => {
                let (outcome, state) = if cancelled {
                    (Outcome::Cancelled, JobState::Cancelled)
                } else {
                    (Outcome::Failed, JobState::Failed)
                };
                self.end_attempt(id, outcome, Some(error.clone()), now);
                self.finish(id, state, output, Some(error), now);
            }
        }
        if measure {
            self.actions.push_back(Action::MeasureRss { proc });
        }
        if recycle {
            self.log(
                Level::Info,
                format!(
                    "pool {name} worker {}: reached max_jobs_per_worker ({max_jobs}); recycling it",
                    self.pools[&name].slots[idx].id
                ),
            );
            self.stop_slot(&name, idx, StopReason::Recycle, now);
        } else if drained {
            self.drained(&name, idx, now);
        }
    }
}

impl Supervisor {
    /// A job taken back (see [`TAKE_BACK_AFTER`]) was answered `Failed`:
    /// whatever the text, it goes back to the head of the queue without an
    /// attempt counted, for an idle worker. (If the worker had started it
    /// meanwhile and stopped it for the `Cancel`, it runs again: delivery is
    /// at least once. A `Done` answer is an ordinary success.)
    fn job_returned(&mut self, name: &str, idx: usize, pos: usize, id: u64, now: Instant) {
        let pool = self.pools.get_mut(name).expect("exists");
        let SlotState::Running(p) = &mut pool.slots[idx].state else {
            return;
        };
        // If it was the front job, it was running after all (stopped for
        // the `Cancel`); its run time says nothing about the pool's jobs.
        leave_worker(p, pos, id, &self.jt.jobs, now);
        let drained = matches!(p.phase, Phase::Draining { .. }) && p.inflight.is_empty();
        self.requeue_unstarted(id);
        if drained {
            self.drained(name, idx, now);
        }
    }
}

/// Job `id`, at `pos` in `p.inflight`, leaves its worker (answered or
/// taken back): its input slot in the arena is freed, and if it was the
/// front job, the next one's deadline and run-time clock start now.
/// Returns how long it ran as the front job (`None` if it was not).
fn leave_worker(
    p: &mut Proc,
    pos: usize,
    id: u64,
    jobs: &HashMap<u64, Job>,
    now: Instant,
) -> Option<Duration> {
    p.inflight.remove(pos);
    if let Some(i) = p.slots.iter().position(|(j, _)| *j == id) {
        let (_, slot) = p.slots.swap_remove(i);
        let _ = p.arena.free(slot);
    }
    if p.inflight.is_empty() {
        p.solo = false;
    }
    if pos != 0 {
        return None;
    }
    p.head_deadline = p
        .inflight
        .front()
        .and_then(|next| jobs.get(next))
        .and_then(|j| j.timeout)
        .map(|t| now + t);
    let ran = p.head_since.map(|t| now.saturating_duration_since(t));
    p.head_since = (!p.inflight.is_empty()).then_some(now);
    ran
}

fn not_found_job(id: u64) -> Response {
    Response::Error {
        kind: ipc_proto::control::ErrorKind::NotFound,
        message: format!(
            "no job {id} (never submitted, or its result was pruned after result_retention)"
        ),
    }
}

/// Longest error text kept for a job (a worker's `Failed` text); see
/// [`cap_error_text`].
pub(crate) const MAX_ERROR_TEXT: usize = 64 << 10;

/// `error` if it is at most [`MAX_ERROR_TEXT`] bytes, else its head and its
/// tail (cut on UTF-8 boundaries) around a note `… [N bytes cut] …`, at
/// most [`MAX_ERROR_TEXT`] bytes in all.
pub(crate) fn cap_error_text(error: String) -> String {
    if error.len() <= MAX_ERROR_TEXT {
        return error;
    }
    // Room for the note: "… [" + up to 20 digits + " bytes cut] …".
    let keep = (MAX_ERROR_TEXT - 48) / 2;
    let mut head = keep;
    while !error.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = error.len() - keep;
    while !error.is_char_boundary(tail) {
        tail += 1;
    }
    let cut = tail - head;
    format!(
        "{} … [{cut} bytes cut] … {}",
        &error[..head],
        &error[tail..]
    )
}
