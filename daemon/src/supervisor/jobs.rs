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
mod manage;

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

    /// A client submits a job. On success the `Submitted` reply follows
    /// once the job is durable.
    pub fn submit(
        &mut self,
        client: ClientId,
        pool_name: &str,
        input: impl Into<SubmitInput>,
        options: JobOptions,
        wait: bool,
        now: Instant,
    ) {
        let extra = SubmitExtra::default();
        self.submit_with(client, pool_name, input, options, wait, extra, now)
    }

    /// [`Self::submit`] with the choices of a `SubmitWith`.
    #[allow(clippy::too_many_arguments)]
    pub fn submit_with(
        &mut self,
        client: ClientId,
        pool_name: &str,
        input: impl Into<SubmitInput>,
        options: JobOptions,
        wait: bool,
        extra: SubmitExtra,
        now: Instant,
    ) {
        let input = input.into();
        if let Err(e) = self.try_submit(client, pool_name, input, options, wait, extra, now) {
            self.refuse_submit(client, e);
        }
    }

    /// Refuses a submit, answering in order with the client's earlier
    /// submits (whose answers may wait for durability).
    pub fn refuse_submit(&mut self, client: ClientId, e: CtlError) {
        {
            let resp = e.into_response();
            if self.jt.pending.is_empty() {
                self.reply(client, resp);
            } else {
                let seq = self.jt.store_seq;
                self.jt.pending.push_back((
                    seq,
                    Pending::Reply {
                        client,
                        resp: Box::new(resp),
                    },
                ));
            }
        }
    }

    /// Whether an input of `len` bytes can be given to a worker of
    /// `pool_name` (checked before a large input is even read).
    pub fn check_input_len(&self, pool_name: &str, len: u64) -> Result<(), CtlError> {
        let Some(pool) = self.pools.get(pool_name) else {
            return Err(self.unknown_pool(pool_name));
        };
        // An input up to `inline_limit` travels inline in a `Job` frame: it
        // must fit in one, with room for the frame's other fields. A larger
        // one goes through the worker's arena.
        let max_input = (ipc_proto::MAX_FRAME_LEN - MAX_FRAME_HEADROOM) as u64;
        if len <= pool.config.inline_limit && len > max_input {
            return Err(CtlError::Invalid(format!(
                "input of {len} bytes is over the limit of {max_input} bytes for inline payloads; lower pool {pool_name}'s inline_limit so that it goes through shared memory"
            )));
        }
        let room = arena_input_capacity(pool.config.shm_size);
        if may_use_arena(len, pool.config.inline_limit) && len > room {
            return Err(CtlError::Invalid(format!(
                "input of {len} bytes does not fit pool {pool_name}'s shared-memory input area ({room} bytes, half of shm_size); raise shm_size"
            )));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn try_submit(
        &mut self,
        client: ClientId,
        pool_name: &str,
        input: SubmitInput,
        options: JobOptions,
        wait: bool,
        extra: SubmitExtra,
        now: Instant,
    ) -> Result<(), CtlError> {
        let (input, source) = match input {
            SubmitInput::Bytes(b) => (b, None),
            SubmitInput::Source(s) => (Arc::default(), Some(s)),
        };
        if self.shutting_down {
            return Err(CtlError::Rejected(
                "the daemon is shutting down; submit again once it is back".into(),
            ));
        }
        if !self.pools.contains_key(pool_name) {
            return Err(self.unknown_pool(pool_name));
        }
        let pool = self.pools.get_mut(pool_name).expect("checked");
        if pool.removing {
            return Err(CtlError::Rejected(format!(
                "pool {pool_name} is being removed"
            )));
        }
        // A client that waits is told at once (`PoolFailed`, after its
        // `Submitted`) and its job runs once the pool is fixed; one that
        // does not wait would not hear of it: refused.
        if pool.state == PoolState::Failed && !wait {
            return Err(CtlError::Rejected(format!(
                "pool {pool_name} has failed ({}); fix its command and run `jobvisorctl reload` (or fix the cause and run `jobvisorctl restart {pool_name}`), then retry",
                pool.failure.as_deref().unwrap_or("crash loop")
            )));
        }
        let cap = pool.config.queue_capacity;
        if pool.jobs.queued >= cap {
            return Err(CtlError::Rejected(format!(
                "pool {pool_name} queue is full ({cap} jobs waiting, queue_capacity = {cap}); retry later or raise queue_capacity"
            )));
        }
        let len = source.as_ref().map_or(input.len() as u64, |s| s.len);
        self.check_input_len(pool_name, len)?;
        let pool = self.pools.get_mut(pool_name).expect("checked");
        if options.max_attempts == Some(0) {
            return Err(CtlError::Invalid(
                "--max-attempts must be at least 1".into(),
            ));
        }
        if options.timeout_ms == Some(0) {
            return Err(CtlError::Invalid("--timeout must be above 0".into()));
        }
        let max_attempts = options.max_attempts.unwrap_or(pool.config.max_attempts);
        let timeout = options
            .timeout_ms
            .map(Duration::from_millis)
            .or(pool.config.timeout);
        let in_memory = match extra.payloads {
            Some(mode) => mode == crate::config::PayloadMode::Memory,
            None => self.pool_keeps_payloads_in_memory(pool_name),
        };
        if self.cluster && in_memory {
            return Err(CtlError::Invalid(format!(
                "payloads = \"memory\" (pool {pool_name}'s, or this submit's) cannot be used with a PostgreSQL store: the job may run on another node, which could not get its input; use durable payloads"
            )));
        }
        let Some(id) = self.next_job_id() else {
            return Err(CtlError::Rejected(
                "no job ids are reserved for this daemon yet (its store is not answering); retry in a moment".into(),
            ));
        };
        let created_ms = self.wall(now);
        let owner = self.viewer(client).uid;
        let len = input.len() as u64; // 0 for a file input
        if extra.output_buffer.is_some() && !wait {
            return Err(CtlError::Invalid(
                "an output buffer needs a submit that waits for the result".into(),
            ));
        }
        // Only where outputs stay in memory; elsewhere they go to the store.
        let output_buffer = extra.output_buffer.filter(|_| in_memory);
        let memory =
            in_memory && (source.is_some() || len >= crate::store::FILE_PAYLOAD_MIN as u64);
        let files = usize::from(memory && source.is_some()) + usize::from(output_buffer.is_some());
        if files > 0 && self.jt.held_sources.get() + files > MAX_HELD_SOURCES {
            return Err(CtlError::Rejected(format!(
                "pool {pool_name} has payloads = \"memory\" and the daemon already holds the input files of {MAX_HELD_SOURCES} of its jobs; retry once some have ended"
            )));
        }
        if memory && self.jt.memory_bytes + len > MEMORY_BYTES_BUDGET {
            return Err(CtlError::Rejected(format!(
                "pool {pool_name} has payloads = \"memory\" and the daemon already holds {} of large inputs sent as bytes; retry once some jobs have ended, or pass large inputs as a descriptor (a file or memfd)",
                crate::config::show_size(self.jt.memory_bytes)
            )));
        }
        // Over the budget, an input that can go through the pool's arena is
        // kept in a payload file once stored (see QUEUED_INPUT_BUDGET).
        if !self.payload_files
            && !self.cluster
            && !memory
            && self.jt.mem_inputs + len > STORE_INPUT_BUDGET
        {
            return Err(CtlError::Rejected(format!(
                "the daemon already holds {} of inputs of queued and running jobs (a PostgreSQL store keeps them in memory until their jobs end, at most {}); retry once some have ended",
                crate::config::show_size(self.jt.mem_inputs),
                crate::config::show_size(STORE_INPUT_BUDGET)
            )));
        }
        let spill = !memory
            && self.payload_files
            && len >= SPILL_MIN
            && self.jt.mem_inputs + len > QUEUED_INPUT_BUDGET
            && len <= arena_input_capacity(self.pools[pool_name].config.shm_size);
        if !self.cluster {
            self.jt.mem_inputs += len;
        }
        if memory {
            self.jt.memory_bytes += len;
        }
        let op = Op::Insert(NewJob {
            id,
            pool: pool_name.to_string(),
            priority: options.priority,
            key: options.key.clone(),
            max_attempts,
            timeout_ms: timeout.map(|t| t.as_millis() as u64),
            input: input.clone(),
            input_source: source.clone(),
            created_ms,
            owner,
            spill,
            memory,
        });
        let seq = self.store(op);
        self.jt
            .pending
            .push_back((seq, Pending::Insert { id, client, wait }));
        if !self.cluster {
            // (With a cluster, it is stored only: whichever node has room
            // claims it.)
            let job = Job {
                id,
                owner,
                spilled: spill,
                pool: pool_name.to_string(),
                priority: options.priority,
                key: options.key,
                max_attempts,
                timeout,
                input,
                input_file: source.as_ref().map(|s| s.len),
                held: (memory && source.is_some()).then(|| HeldSource::new(&self.jt.held_sources)),
                outputs_in_memory: in_memory,
                input_shareable: extra.input_shareable && memory && source.is_some(),
                held_buffer: output_buffer
                    .is_some()
                    .then(|| HeldSource::new(&self.jt.held_sources)),
                output_buffer,
                input_source: source.map(|s| s.file),
                memory,
                attempts: Vec::new(),
                created_ms,
                phase: JobPhase::Queued,
                cancel_requested: false,
                holds: false,
                suspect: false,
                unstored: false,
                taken_back: false,
            };
            self.queue_submitted(pool_name, job);
        }
        self.event(
            now,
            "job_queued",
            Some(pool_name),
            None,
            Some((id, JobState::Queued)),
            None,
        );
        Ok(())
    }

    /// A submitted job, not stored yet, into the table and its pool's queue.
    fn queue_submitted(&mut self, pool_name: &str, job: Job) {
        let (id, priority) = (job.id, job.priority);
        self.jt.jobs.insert(id, job);
        // Dispatched at once, before the insert is durable: the client is
        // acknowledged (and hears of the result) only after it is, but the
        // work need not wait for the fsync, and a job that finishes within
        // one commit window costs a single row write (the store merges the
        // insert with the final update). If the daemon dies before the
        // commit, the client never got an id: nothing accepted is lost, the
        // job may merely have run once unacknowledged (at-least-once).
        self.jt.tail_order += 1;
        let entry = QEntry {
            priority,
            order: Reverse(self.jt.tail_order),
            id,
        };
        self.enqueue_entry(pool_name, entry);
    }

    /// Every store op numbered `<= upto` is durable.
    pub fn on_durable(&mut self, upto: u64) {
        while self.jt.pending.front().is_some_and(|(s, _)| *s <= upto) {
            let (_, p) = self.jt.pending.pop_front().expect("checked");
            match p {
                Pending::Insert { id, client, wait } => self.insert_durable(id, client, wait),
                Pending::Final { id } => self.final_durable(id),
                Pending::Reply { client, resp } => self.reply(client, *resp),
            }
        }
    }

    /// A store batch ending at `upto` failed: its inserts were not stored.
    /// Final rows are retried by the store and acknowledged later.
    pub fn on_store_failed(&mut self, upto: u64, lost: &[u64], error: &str, _now: Instant) {
        let lost: std::collections::HashSet<u64> = lost.iter().copied().collect();
        let mut keep = VecDeque::new();
        while let Some((seq, p)) = self.jt.pending.pop_front() {
            match p {
                Pending::Insert { id, client, .. } if seq <= upto && lost.contains(&id) => {
                    self.forget_unstored(id);
                    self.reply(
                        client,
                        Response::Error {
                            kind: ipc_proto::control::ErrorKind::Rejected,
                            message: format!(
                                "the job could not be stored ({error}); nothing was queued, submit it again once the store is writable"
                            ),
                        },
                    );
                }
                Pending::Reply { client, resp } if seq <= upto => self.reply(client, *resp),
                other => keep.push_back((seq, other)),
            }
        }
        self.jt.pending = keep;
        self.log(Level::Error, format!("job store: {error}"));
    }

    /// Inserts that failed alone (their input could not be stored; the
    /// rest of their batch goes on): each client hears why, in order with
    /// its other replies, and the jobs are dropped.
    pub fn on_inserts_failed(&mut self, failed: Vec<(u64, crate::store::InsertFailure)>) {
        use crate::store::InsertFailure;
        for (id, why) in failed {
            let (kind, message) = match why {
                InsertFailure::Input(m) => (ipc_proto::control::ErrorKind::Invalid, m),
                InsertFailure::Store(m) => (ipc_proto::control::ErrorKind::Rejected, m),
            };
            let pending = self.jt.pending.iter_mut().find_map(|(_, p)| match *p {
                Pending::Insert { id: i, client, .. } if i == id => Some((p, client)),
                _ => None,
            });
            if let Some((p, client)) = pending {
                // Its `Submitted` becomes the error, in the same place.
                *p = Pending::Reply {
                    client,
                    resp: Box::new(Response::Error { kind, message }),
                };
            }
            self.forget_unstored(id);
        }
    }

    /// A job whose insert failed: it was never acknowledged, so it is
    /// dropped (a running one when its worker is done with it).
    fn forget_unstored(&mut self, id: u64) {
        let Some(job) = self.jt.jobs.get_mut(&id) else {
            return;
        };
        match job.phase {
            JobPhase::Queued => {
                let pool = job.pool.clone();
                self.jt.mem_inputs -= job.input.len() as u64;
                if job.memory {
                    self.jt.memory_bytes -= job.input.len() as u64;
                }
                self.jt.jobs.remove(&id);
                if let Some(p) = self.pools.get_mut(&pool) {
                    p.jobs.queued = p.jobs.queued.saturating_sub(1);
                }
            }
            JobPhase::Running { .. } => job.unstored = true,
            JobPhase::Finishing(_) => {}
        }
    }

    /// The answer to a store query.
    pub fn on_query_result(&mut self, token: u64, result: Result<QueryResult, String>) {
        let Some(purpose) = self.jt.queries.remove(&token) else {
            return;
        };
        self.backlog_sub(purpose.client());
        let (purpose, result) = match (result, purpose) {
            (Ok(r), p) => (p, r),
            // The store is out of reach: this node's own figures still.
            (Err(_), QueryPurpose::Status) => {
                self.jt.counts_asked = None;
                for (client, report) in std::mem::take(&mut self.jt.status_waiting) {
                    self.backlog_sub(client);
                    self.reply(client, Response::Status(report));
                }
                return;
            }
            (Err(e), purpose) => {
                let client = purpose.client();
                self.reply(
                    client,
                    Response::Error {
                        kind: ipc_proto::control::ErrorKind::Failed,
                        message: format!("reading the job store failed: {e}"),
                    },
                );
                return;
            }
        };
        // A job whose output is a payload file: the document comes without
        // it (a `wait` or `cancel` needs none; `result` sends the file).
        let (result, output_file) = match result {
            QueryResult::JobWithOutputFile(doc, len) => (QueryResult::Job(Some(doc)), Some(len)),
            r => (r, None),
        };
        match (purpose, result) {
            (QueryPurpose::Wait { client, group, id }, QueryResult::Job(doc)) => {
                if self.cluster && doc.as_ref().is_some_and(|d| !d.state.is_terminal()) {
                    // Queued or running on some node: wait for its end.
                    let waiter = Waiter {
                        client,
                        with_output: false,
                        group: Some(group),
                    };
                    return self.wait_remote(id, waiter);
                }
                match doc {
                    Some(mut d) => {
                        d.output = None;
                        self.reply(client, Response::Job(d));
                    }
                    None => self.reply(client, not_found_job(id)),
                }
                self.group_done(group);
            }
            (QueryPurpose::Result { client, id }, QueryResult::Job(doc)) => {
                match (doc, output_file) {
                    // The output stays in its file; the client gets that.
                    (Some(doc), Some(len)) => self.actions.push_back(Action::ReplyJob {
                        client,
                        doc,
                        output: JobOutput::File(len),
                    }),
                    (Some(d), None) => self.reply(client, Response::Job(d)),
                    (None, _) => self.reply(client, not_found_job(id)),
                }
            }
            (
                QueryPurpose::Cancel { client, id },
                QueryResult::Cancel {
                    cancelled: true, ..
                },
            ) => self.reply(
                client,
                Response::Ok {
                    message: format!("job {id} cancelled"),
                },
            ),
            (
                QueryPurpose::Cancel { client, id },
                QueryResult::Cancel {
                    requested_on: Some(node),
                    ..
                },
            ) => self.reply(
                client,
                Response::Ok {
                    message: format!(
                        "job {id} is held by node {node}, which was asked to cancel it; `jobvisorctl wait {id}` waits for its end"
                    ),
                },
            ),
            (QueryPurpose::Cancel { client, id }, QueryResult::Cancel { doc, .. })
            | (QueryPurpose::Cancel { client, id }, QueryResult::Job(doc)) => match doc {
                Some(d) => self.reply(
                    client,
                    Response::Error {
                        kind: ipc_proto::control::ErrorKind::Failed,
                        message: format!(
                            "job {id} already {}; nothing to cancel",
                            d.state.as_str()
                        ),
                    },
                ),
                None => self.reply(client, not_found_job(id)),
            },
            (QueryPurpose::Jobs { client, pool }, QueryResult::List(docs)) => {
                if docs.is_empty() {
                    if let Some(name) = pool.filter(|p| !self.pools.contains_key(p)) {
                        // A pool removed by a reload still lists its jobs.
                        let (kind, message) = self.unknown_pool(&name).parts();
                        self.reply(client, Response::Error { kind, message });
                    }
                }
                for d in docs {
                    self.reply(client, Response::Job(d));
                }
                self.reply(client, Response::End);
            }
            (QueryPurpose::Retry { client, id }, QueryResult::Retry(r)) => {
                self.retried(client, id, r)
            }
            (QueryPurpose::Prune { client }, QueryResult::Pruned(count)) => {
                self.reply(client, Response::Pruned { count })
            }
            (QueryPurpose::Remote { id, waiters }, QueryResult::Job(doc)) => {
                self.remote_doc(id, waiters, doc)
            }
            (QueryPurpose::Nodes { client }, QueryResult::Nodes(nodes)) => {
                self.reply(client, Response::Nodes(nodes))
            }
            (QueryPurpose::Warnings { client }, QueryResult::Warnings(lines)) => {
                self.reply(client, Response::Warnings(lines))
            }
            (QueryPurpose::Status, QueryResult::QueueCounts(counts)) => {
                if let Some(asked) = self.jt.counts_asked.take() {
                    self.jt.queue_counts = Some((asked, counts));
                }
                for (client, report) in std::mem::take(&mut self.jt.status_waiting) {
                    self.backlog_sub(client);
                    self.reply_status(client, report);
                }
            }
            (p, _) => self.log(
                Level::Error,
                format!("store answered a query of the wrong kind for {p:?}"),
            ),
        }
    }

    /// `wait ID…`: a `Job` per id as each finishes, then `End`.
    pub fn wait_jobs(&mut self, client: ClientId, mut ids: Vec<u64>) {
        // Each job once, however often it is named: the answer per id is
        // the same, and a long list of one id must not multiply work.
        ids.sort_unstable();
        ids.dedup();
        if ids.len() > ipc_proto::control::MAX_WAIT_IDS {
            self.reply(
                client,
                Response::Error {
                    kind: ipc_proto::control::ErrorKind::Invalid,
                    message: format!(
                        "wait names {} jobs; at most {} at once: wait for them in batches",
                        ids.len(),
                        ipc_proto::control::MAX_WAIT_IDS
                    ),
                },
            );
            return;
        }
        if ids.is_empty() {
            self.reply(client, Response::End);
            return;
        }
        self.jt.next_group += 1;
        let group = self.jt.next_group;
        self.jt.wait_groups.insert(group, (client, ids.len()));
        *self.jt.backlog.entry(client).or_insert(0) += 1;
        let viewer = self.viewer(client);
        let mut pools = BTreeSet::new();
        for id in ids {
            // Another user's job is answered like an unknown one (by the
            // store, with the owner filter): nothing says it exists.
            if let Some(job) = self.jt.jobs.get(&id).filter(|j| viewer.sees(j.owner)) {
                let pool = job.pool.clone();
                self.jt.waiters.entry(id).or_default().push(Waiter {
                    client,
                    with_output: false,
                    group: Some(group),
                });
                if matches!(self.jt.jobs[&id].phase, JobPhase::Queued) {
                    pools.insert(pool);
                }
            } else {
                let query = Query::Job {
                    id,
                    owner: viewer.filter(),
                    output: false,
                };
                self.query(query, QueryPurpose::Wait { client, group, id });
            }
        }
        // Queued in a failed pool: this request hears so (once per pool).
        for pool in pools {
            self.tell_pool_failed(&pool, Some(vec![client]), true);
        }
    }

    /// `result ID`: the job's current document, output included.
    pub fn result(&mut self, client: ClientId, id: u64) {
        let viewer = self.viewer(client);
        if let Some(job) = self.jt.jobs.get(&id).filter(|j| viewer.sees(j.owner)) {
            let output = match &job.phase {
                JobPhase::Finishing(f) => f.output.clone(),
                _ => None,
            };
            let doc = self.doc(job);
            return self.reply_doc(client, doc, output);
        }
        let query = Query::Job {
            id,
            owner: viewer.filter(),
            output: true,
        };
        self.query(query, QueryPurpose::Result { client, id });
    }

    /// `jobs`: newest first, from the store (which has seen every earlier op).
    pub fn list_jobs(
        &mut self,
        client: ClientId,
        pool: Option<String>,
        state: Option<JobState>,
        limit: u32,
        before: Option<u64>,
        since_ms: Option<u64>,
    ) {
        let owner = self.viewer(client).filter();
        self.query(
            Query::List {
                pool: pool.clone(),
                state,
                limit,
                owner,
                before,
                since_ms,
            },
            QueryPurpose::Jobs { client, pool },
        );
    }

    /// `cancel ID`.
    pub fn cancel(&mut self, client: ClientId, id: u64, now: Instant) {
        let viewer = self.viewer(client);
        if !self.jt.jobs.get(&id).is_some_and(|j| viewer.sees(j.owner)) {
            let owner = viewer.filter();
            // With a cluster the job may be queued in the shared table.
            let query = match self.cluster {
                true => Query::CancelQueued { id, owner },
                false => Query::Job {
                    id,
                    owner,
                    output: false,
                },
            };
            self.query(query, QueryPurpose::Cancel { client, id });
            return;
        }
        let resp = match self.cancel_here(id, now) {
            Ok(message) => Response::Ok { message },
            Err(message) => Response::Error {
                kind: ipc_proto::control::ErrorKind::Failed,
                message,
            },
        };
        self.reply(client, resp);
    }

    /// Cancels job `id`, which is in memory here: a queued one ends at
    /// once, a running one's worker is asked to stop it.
    pub(super) fn cancel_here(&mut self, id: u64, now: Instant) -> Result<String, String> {
        let Some(job) = self.jt.jobs.get_mut(&id) else {
            return Err(format!("job {id} is not here"));
        };
        match &job.phase {
            JobPhase::Queued => {
                let pool = job.pool.clone();
                if let Some(p) = self.pools.get_mut(&pool) {
                    p.jobs.queued = p.jobs.queued.saturating_sub(1);
                }
                self.finish(
                    id,
                    JobState::Cancelled,
                    None,
                    Some("cancelled before it started".into()),
                    now,
                );
                Ok(format!("job {id} cancelled"))
            }
            JobPhase::Running { proc } => {
                let proc = *proc;
                if job.cancel_requested {
                    Ok(format!("job {id} is already being cancelled"))
                } else {
                    job.cancel_requested = true;
                    let stop_timeout = self
                        .pools
                        .get(&job.pool)
                        .map_or(Duration::from_secs(10), |p| p.config.stop_timeout);
                    self.jt.cancel_deadlines.insert((now + stop_timeout, id));
                    // A job being taken back already has its `Cancel` on
                    // the way; its answer now ends it as cancelled.
                    if !job.taken_back {
                        self.actions.push_back(Action::Send {
                            proc,
                            msg: ToWorker::Cancel { id },
                        });
                    }
                    Ok(format!(
                        "cancelling job {id}: its worker was asked to stop it (stopped by force after {})",
                        humantime::format_duration(stop_timeout)
                    ))
                }
            }
            JobPhase::Finishing(f) => Err(format!(
                "job {id} already {}; nothing to cancel",
                f.state.as_str()
            )),
        }
    }

    /// Who `client` is: its jobs are its uid's, and it sees only those
    /// unless it is an admin. A client the core was not told about is
    /// [`Viewer::UNKNOWN`].
    pub fn set_viewer(&mut self, client: ClientId, viewer: Viewer) {
        self.jt.viewers.insert(client, viewer);
    }

    fn viewer(&self, client: ClientId) -> Viewer {
        self.jt
            .viewers
            .get(&client)
            .copied()
            .unwrap_or(Viewer::UNKNOWN)
    }

    /// A client disconnected: forget its waiters.
    pub fn on_client_gone(&mut self, client: ClientId) {
        self.jt.viewers.remove(&client);
        for p in self.pools.values_mut() {
            p.jobs.told_failed.remove(&client);
        }
        self.jt.waiters.retain(|_, ws| {
            ws.retain(|w| w.client != client);
            !ws.is_empty()
        });
        self.jt.wait_groups.retain(|_, (c, _)| *c != client);
        // Its queries still come back (and are answered to nobody).
        self.jt.backlog.remove(&client);
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

    /// Hands queued jobs of `name` to its ready workers, then, with adaptive
    /// prefetch, takes back jobs waiting behind a long-running one for a
    /// worker left idle.
    fn dispatch(&mut self, name: &str, now: Instant) {
        if self.pools.get(name).is_some_and(|p| p.paused) {
            return;
        }
        self.dispatch_levelled(name, now);
        self.take_back(name, now);
        if self.cluster && self.pools[name].jobs.queue.is_empty() {
            // Room left and nothing queued here: claim from the cluster.
            let prefetch = self.prefetch_now(name);
            let rooms: Vec<usize> = (0..self.pools[name].slots.len())
                .map(|idx| self.room_for_jobs(name, idx, prefetch, now).0)
                .collect();
            let room: usize = rooms.iter().sum();
            // Enough for about CLAIM_WINDOW of work per worker with room
            // (short jobs: many per round trip; long ones: what fits).
            let per_worker = match self.pools[name].jobs.mean_run_ns {
                Some(ns) if ns > 0.0 => {
                    ((CLAIM_WINDOW.as_nanos() as f64 / ns) as usize).clamp(1, CLAIM_MAX_PER_WORKER)
                }
                _ => CLAIM_AHEAD,
            };
            let workers = rooms.iter().filter(|r| **r > 0).count();
            self.demand(name, room.max(workers * per_worker));
        }
    }

    /// Jobs in flight per worker in pool `name` now: its `prefetch`, or the
    /// adaptive depth (see [`ADAPTIVE_PREFETCH_MAX`]).
    pub(super) fn prefetch_now(&self, name: &str) -> usize {
        let pool = &self.pools[name];
        match pool.config.prefetch {
            Some(n) => n as usize,
            None => pool.jobs.adaptive.max(1) as usize,
        }
    }

    /// How many more jobs worker `idx` of `name` may be sent now (0 when it
    /// is not ready, runs a suspect alone, or, with adaptive prefetch, its
    /// running job has run [`TAKE_BACK_AFTER`]), and its current count.
    fn room_for_jobs(
        &self,
        name: &str,
        idx: usize,
        prefetch: usize,
        now: Instant,
    ) -> (usize, usize) {
        let pool = &self.pools[name];
        let SlotState::Running(p) = &pool.slots[idx].state else {
            return (0, 0);
        };
        let n = p.inflight.len();
        if !matches!(p.phase, Phase::Ready) || p.solo {
            return (0, n);
        }
        let long_running = pool.config.prefetch.is_none()
            && p.head_since
                .is_some_and(|t| now.saturating_duration_since(t) >= TAKE_BACK_AFTER);
        let mut limit = if long_running { 1 } else { prefetch };
        // A worker is sent no job beyond its max_jobs_per_worker: it is
        // recycled after that many, not after those it was sent ahead.
        let max_jobs = pool.config.max_jobs_per_worker;
        if max_jobs > 0 {
            limit = limit.min(max_jobs.saturating_sub(p.jobs_handled) as usize);
        }
        (limit.saturating_sub(n), n)
    }

    /// Hands queued jobs of `name` to its ready workers up to the prefetch
    /// depth each, always to the one with the fewest in flight (ties: in
    /// slot order), so an idle worker is served first and equal workers
    /// round-robin.
    fn dispatch_levelled(&mut self, name: &str, now: Instant) {
        let Some(pool) = self.pools.get(name) else {
            return;
        };
        if pool.removing || pool.jobs.queue.is_empty() {
            return;
        }
        let prefetch = self.prefetch_now(name);
        let mut ready: BinaryHeap<Reverse<(usize, usize)>> = (0..pool.slots.len())
            .filter_map(|idx| {
                let (room, n) = self.room_for_jobs(name, idx, prefetch, now);
                (room > 0).then_some(Reverse((n, idx)))
            })
            .collect();
        // Workers the head job cannot go to (it must run alone, or its input
        // does not fit their arena): asked again once another job is taken.
        let mut passed = Vec::new();
        while let Some(Reverse((n, idx))) = ready.pop() {
            let (empty, room, fds) = match &self.pools[name].slots[idx].state {
                SlotState::Running(p) => {
                    (p.inflight.is_empty(), p.arena.largest_free(), p.takes_fds)
                }
                _ => continue,
            };
            match self.next_runnable(name, empty, room, fds) {
                Next::None => return,
                Next::NeedsEmptyWorker => passed.push(Reverse((n, idx))),
                Next::Unrunnable(id, error) => {
                    self.finish(id, JobState::Failed, None, Some(error), now);
                    ready.push(Reverse((n, idx)));
                    ready.extend(passed.drain(..));
                }
                Next::Job(id) => {
                    self.assign(name, idx, id, now);
                    let (room, n) = self.room_for_jobs(name, idx, prefetch, now);
                    if room > 0 {
                        ready.push(Reverse((n, idx)));
                    }
                    ready.extend(passed.drain(..));
                }
            }
        }
    }

    /// Adaptive prefetch: if a ready worker of `name` has no job in hand,
    /// asks back (`Cancel`) the jobs waiting unstarted behind the running
    /// job of a busy worker once that job has run [`TAKE_BACK_AFTER`] (or
    /// arms [`PoolJobs::take_back_at`] for when it will have). At most as
    /// many as the idle workers may hold; the longest-running workers' last
    /// jobs first. Their answers come back to [`Self::job_result`], which
    /// requeues them at the head of the queue, uncharged, for the idle
    /// workers to take.
    fn take_back(&mut self, name: &str, now: Instant) {
        let Some(pool) = self.pools.get_mut(name) else {
            return;
        };
        pool.jobs.take_back_at = None;
        if pool.removing || pool.config.prefetch.is_some() {
            return;
        }
        let ready = |p: &Proc| matches!(p.phase, Phase::Ready);
        let idle = pool
            .slots
            .iter()
            .filter(
                |s| matches!(&s.state, SlotState::Running(p) if ready(p) && p.inflight.is_empty()),
            )
            .count();
        if idle == 0 {
            return;
        }
        let mut budget = idle * pool.jobs.adaptive.max(1) as usize;
        // (since when its front job runs, slot index) of workers with jobs
        // waiting behind their running one.
        let mut busy: Vec<(Instant, usize)> = Vec::new();
        let mut later: Option<Instant> = None;
        for (idx, slot) in pool.slots.iter().enumerate() {
            let SlotState::Running(p) = &slot.state else {
                continue;
            };
            let waiting = p.inflight.iter().skip(1).any(|id| {
                self.jt
                    .jobs
                    .get(id)
                    .is_some_and(|j| !j.taken_back && !j.cancel_requested)
            });
            let Some(since) = p.head_since.filter(|_| ready(p) && waiting) else {
                continue;
            };
            let due = since + TAKE_BACK_AFTER;
            if due <= now {
                busy.push((since, idx));
            } else {
                later = Some(later.map_or(due, |t: Instant| t.min(due)));
            }
        }
        pool.jobs.take_back_at = later;
        busy.sort();
        for (since, idx) in busy {
            if budget == 0 {
                break;
            }
            let SlotState::Running(p) = &self.pools[name].slots[idx].state else {
                continue;
            };
            let (proc, slot_id) = (p.id, self.pools[name].slots[idx].id);
            let mut ids = Vec::new();
            for &id in p.inflight.iter().skip(1).rev() {
                if budget == 0 {
                    break;
                }
                let Some(job) = self.jt.jobs.get_mut(&id) else {
                    continue;
                };
                if job.taken_back || job.cancel_requested {
                    continue;
                }
                job.taken_back = true;
                budget -= 1;
                ids.push(id);
            }
            if ids.is_empty() {
                continue;
            }
            self.log(
                Level::Debug,
                format!(
                    "pool {name}: taking back {} jobs waiting on worker {slot_id} behind a job running for {} ms, for {idle} idle workers",
                    ids.len(),
                    now.saturating_duration_since(since).as_millis()
                ),
            );
            for id in ids {
                self.actions.push_back(Action::Send {
                    proc,
                    msg: ToWorker::Cancel { id },
                });
            }
        }
    }

    /// Adaptive prefetch: counts a job's run time into its pool's mean and
    /// adjusts the pool's depth (see [`ADAPTIVE_PREFETCH_MAX`]).
    fn record_run_time(&mut self, name: &str, run: Duration) {
        let Some(pool) = self.pools.get_mut(name) else {
            return;
        };
        if pool.config.prefetch.is_some() {
            return;
        }
        let x = run.min(RUN_TIME_CAP).as_nanos() as f64;
        let mean = match pool.jobs.mean_run_ns {
            None => x,
            Some(m) => m + (x - m) * RUN_TIME_WEIGHT,
        };
        pool.jobs.mean_run_ns = Some(mean);
        let current = pool.jobs.adaptive.max(1);
        let next = adaptive_depth(current, mean);
        pool.jobs.adaptive = next;
        if next != current {
            self.log(
                Level::Debug,
                format!(
                    "pool {name}: adaptive prefetch {current} -> {next} (mean job run time {:.0} us)",
                    mean / 1000.0
                ),
            );
            if next > current {
                if let Some(p) = self.pools.get_mut(name) {
                    p.jobs.dirty = true;
                }
            }
        }
    }

    /// Pops the next job that may run now: skips stale entries, parks jobs
    /// whose key is busy, and stops when a semaphore of the pool is full.
    /// `room` is the largest free input slot of the worker asking (only
    /// inputs over `inline_limit` need one).
    fn next_runnable(&mut self, name: &str, worker_empty: bool, room: u64, fds: bool) -> Next {
        let inline_limit = self.pools[name].config.inline_limit;
        let capacity = arena_input_capacity(self.pools[name].config.shm_size);
        let sems = self.pools[name].config.semaphores.clone();
        for s in &sems {
            let limit = self.semaphores.get(s).copied().unwrap_or(u32::MAX);
            if self.jt.sem_used.get(s).copied().unwrap_or(0) >= limit {
                return Next::None;
            }
        }
        loop {
            let Some(queue) = self.pools.get_mut(name).map(|p| &mut p.jobs.queue) else {
                return Next::None;
            };
            let Some(&entry) = queue.peek() else {
                return Next::None;
            };
            let live = self
                .jt
                .jobs
                .get(&entry.id)
                .filter(|j| matches!(j.phase, JobPhase::Queued) && j.pool == name);
            match live {
                None => {
                    queue.pop();
                    continue;
                }
                Some(j) if j.through_arena(inline_limit) && j.input_len() > capacity => {
                    let error = format!(
                        "input of {} bytes does not fit pool {name}'s shared-memory input area ({capacity} bytes, half of shm_size); raise shm_size and submit it again",
                        j.input_len()
                    );
                    queue.pop();
                    return Next::Unrunnable(entry.id, error);
                }
                Some(j) if j.suspect && !worker_empty => return Next::NeedsEmptyWorker,
                // Its input goes through shared memory and this worker's
                // arena is full of in-flight inputs: back off (another
                // worker, or this one once a job finishes).
                Some(j) if j.needs_arena(inline_limit, fds) && j.input_len() > room => {
                    return Next::NeedsEmptyWorker
                }
                Some(_) => {
                    queue.pop();
                }
            }
            let job = &self.jt.jobs[&entry.id];
            if let Some(k) = &job.key {
                if self.jt.running_keys.contains_key(k) {
                    self.jt
                        .parked
                        .entry(k.clone())
                        .or_default()
                        .push_back((name.to_string(), entry));
                    continue;
                }
            }
            return Next::Job(entry.id);
        }
    }

    fn assign(&mut self, name: &str, idx: usize, id: u64, now: Instant) {
        let wall = self.wall(now);
        let inline_limit = self.pools[name].config.inline_limit;
        let sems = self.pools[name].config.semaphores.clone();
        for s in &sems {
            *self.jt.sem_used.entry(s.clone()).or_default() += 1;
        }
        let pool = self.pools.get_mut(name).expect("exists");
        pool.jobs.queued = pool.jobs.queued.saturating_sub(1);
        pool.jobs.running += 1;
        let slot = &mut pool.slots[idx];
        let slot_id = slot.id;
        let SlotState::Running(proc) = &mut slot.state else {
            return;
        };
        let job = self.jt.jobs.get_mut(&id).expect("queued job exists");
        if let Some(k) = &job.key {
            self.jt.running_keys.insert(k.clone(), id);
        }
        job.holds = true;
        job.phase = JobPhase::Running { proc: proc.id };
        let n = job.attempts.len() as u32 + 1;
        job.attempts.push(Attempt {
            n,
            worker: slot_id,
            pid: proc.pid.unwrap_or(0),
            started_ms: wall,
            ended_ms: None,
            outcome: None,
            error: None,
        });
        if proc.inflight.is_empty() {
            proc.head_deadline = job.timeout.map(|t| now + t);
            proc.head_since = Some(now);
        }
        job.taken_back = false;
        proc.inflight.push_back(id);
        if job.suspect {
            proc.solo = true;
        }
        let mut fds = Vec::new();
        let input = if job.input_by_fd(proc.takes_fds) {
            let file = job.input_source.clone().expect("checked by input_by_fd");
            fds.push(super::PassedFd(file));
            Payload::Fd {
                len: job.input_len(),
            }
        } else if job.through_arena(inline_limit) {
            let len = job.input_len();
            // Checked by `next_runnable`: the slot exists.
            let slot = proc.arena.alloc(len).expect("room checked before popping");
            let payload = slot.payload();
            self.actions.push_back(match job.input_file {
                Some(len) => Action::WriteArenaFromFile {
                    proc: proc.id,
                    offset: slot.offset(),
                    job: id,
                    len,
                    source: job
                        .input_source
                        .clone()
                        .map(|file| crate::store::InputSource { file, len }),
                },
                None => Action::WriteArena {
                    proc: proc.id,
                    offset: slot.offset(),
                    data: job.input.clone(),
                },
            });
            proc.slots.push((id, slot));
            payload
        } else {
            Payload::Inline(Bytes(job.input.to_vec()))
        };
        let wire = WireJob {
            id,
            attempt: n,
            deadline_ms: job.timeout.map(|t| wall + t.as_millis() as u64),
            input,
        };
        // A worker that takes descriptors writes a large output straight
        // into the client's buffer.
        let buffer = job.output_buffer.clone().filter(|_| proc.takes_fds);
        let msg = match buffer {
            Some(b) => {
                fds.push(super::PassedFd(b));
                ToWorker::JobOut(wire)
            }
            None => ToWorker::Job(wire),
        };
        let pid = proc.pid;
        let proc_id = proc.id;
        self.actions.push_back(if fds.is_empty() {
            Action::Send { proc: proc_id, msg }
        } else {
            Action::SendFds {
                proc: proc_id,
                msg,
                fds,
            }
        });
        // The `running` row is written only if the job is still running a
        // moment later: most jobs finish first, and their final row is then
        // the only write (see RUNNING_PERSIST_DELAY).
        self.jt
            .unpersisted
            .push_back((now + RUNNING_PERSIST_DELAY, id, n));
        self.event(
            now,
            "job_started",
            Some(name),
            Some((slot_id, pid)),
            Some((id, JobState::Running)),
            None,
        );
    }

    /// Removes and returns a worker's in-flight jobs.
    fn take_inflight(&mut self, name: &str, idx: usize) -> Vec<u64> {
        match &mut self.pools.get_mut(name).expect("exists").slots[idx].state {
            SlotState::Running(p) => {
                p.head_deadline = None;
                p.head_since = None;
                p.solo = false;
                p.inflight.drain(..).collect()
            }
            _ => Vec::new(),
        }
    }

    fn end_attempt(&mut self, id: u64, outcome: Outcome, error: Option<String>, now: Instant) {
        let wall = self.wall(now);
        if let Some(a) = self
            .jt
            .jobs
            .get_mut(&id)
            .and_then(|j| j.attempts.last_mut())
        {
            a.ended_ms = Some(wall);
            a.outcome = Some(outcome);
            a.error = error;
        }
    }

    /// The job leaves its worker: release key and semaphores, fix counters.
    fn leave_worker(&mut self, id: u64) {
        let Some(job) = self.jt.jobs.get_mut(&id) else {
            return;
        };
        if !job.holds {
            return;
        }
        job.holds = false;
        let pool_name = job.pool.clone();
        let key = job.key.clone();
        if let Some(p) = self.pools.get_mut(&pool_name) {
            p.jobs.running = p.jobs.running.saturating_sub(1);
            p.jobs.dirty = true;
        }
        if let Some(k) = key {
            if self.jt.running_keys.get(&k) == Some(&id) {
                self.jt.running_keys.remove(&k);
                if let Some(parked) = self.jt.parked.remove(&k) {
                    for (pool, entry) in parked {
                        if let Some(p) = self.pools.get_mut(&pool) {
                            p.jobs.queue.push(entry);
                            p.jobs.dirty = true;
                        } else {
                            self.jt.orphans.entry(pool).or_default().push(entry);
                        }
                    }
                }
            }
        }
        let sems = self
            .pools
            .get(&pool_name)
            .map(|p| p.config.semaphores.clone())
            .unwrap_or_default();
        for s in &sems {
            if let Some(u) = self.jt.sem_used.get_mut(s) {
                *u = u.saturating_sub(1);
            }
            // Every pool sharing the semaphore may now proceed.
            for p in self.pools.values_mut() {
                if p.config.semaphores.contains(s) {
                    p.jobs.dirty = true;
                }
            }
        }
    }

    /// Back to the head of the queue if attempts remain, else `final_state`.
    fn retry_or_finish(&mut self, id: u64, final_state: JobState, error: String, now: Instant) {
        let Some(job) = self.jt.jobs.get(&id) else {
            return;
        };
        if job.cancel_requested {
            self.finish(id, JobState::Cancelled, None, Some("cancelled".into()), now);
            return;
        }
        if (job.attempts.len() as u32) < job.max_attempts {
            self.requeue_head(id);
        } else {
            let error = if final_state == JobState::Dead {
                format!("lost on all {} attempts; last: {error}", job.attempts.len())
            } else {
                error
            };
            self.finish(id, final_state, None, Some(error), now);
        }
    }

    fn requeue_head(&mut self, id: u64) {
        self.jt.head_order -= 1;
        let order = self.jt.head_order;
        let Some(job) = self.jt.jobs.get_mut(&id) else {
            return;
        };
        job.phase = JobPhase::Queued;
        job.taken_back = false;
        let entry = QEntry {
            priority: job.priority,
            order: Reverse(order),
            id,
        };
        let pool = job.pool.clone();
        let update = JobUpdate::progress(id, JobState::Queued, job.attempts.clone());
        self.store(Op::Update(update));
        self.enqueue_entry(&pool, entry);
        // Back in the queue of a pool that failed meanwhile: its waiters
        // cannot expect it soon.
        let waiting: Vec<ClientId> = self
            .jt
            .waiters
            .get(&id)
            .map(|ws| ws.iter().map(|w| w.client).collect())
            .unwrap_or_default();
        if !waiting.is_empty() {
            self.tell_pool_failed(&pool, Some(waiting), false);
        }
    }

    /// A prefetched job that never started goes back without an attempt.
    fn requeue_unstarted(&mut self, id: u64) {
        if let Some(job) = self.jt.jobs.get_mut(&id) {
            job.attempts.pop();
        }
        self.leave_worker(id);
        self.requeue_head(id);
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
        let measure = wants_rss
            && p.last_rss_check
                .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_millis(50));
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
