//! The supervision core: pools, worker slots, restarts, backoff, crash-loop
//! detection, stop ladders, reload and shutdown — as a plain state machine.
//!
//! It contains no I/O and reads no clock (sans-IO, in the manner of
//! quinn-proto): the reactor feeds it events (`on_*` methods) with the
//! current `Instant`, drains the [`Action`]s it queues (spawn, signal, send
//! a frame, log, exit) and sleeps until [`Supervisor::next_deadline`]. Unit
//! tests drive it with a fake clock, so backoff and crash-loop rules are
//! tested in microseconds.
//!
//! Architecture invariant: only the event loop calls into this module, so it
//! needs no locks; every state change happens here and nowhere else.
//!
//! Every spawned process gets a fresh [`ProcId`], never reused. Events about
//! a `ProcId` the core no longer knows (a late pipe EOF after the exit was
//! handled, say) are ignored, which closes the race between the several
//! ways a death is noticed.

use crate::config::{Config, PoolConfig};
pub use crate::spawn::SpawnError;
use crate::store::Op;
use ipc_proto::control::{
    Event, JobState, PoolState, PoolStatus, Response, StatusReport, WorkerState, WorkerStatus,
};
use ipc_proto::worker::ToWorker;
use jobs::{JobTable, PoolJobs};
pub use jobs::{
    SubmitExtra, SubmitInput, Viewer, ADAPTIVE_AHEAD, ADAPTIVE_LONG_JOB, ADAPTIVE_PREFETCH_MAX,
    TAKE_BACK_AFTER,
};
use nix::sys::signal::Signal;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Shortest wait before a spawn that failed for a transient reason
/// (descriptors, processes or memory exhausted) is tried again, whatever
/// `backoff_initial` says: a shortage does not clear in microseconds.
pub const TRANSIENT_RETRY_MIN: Duration = Duration::from_millis(100);

/// Identity of one spawned worker process (not a pid: never reused).
pub type ProcId = u64;

/// Log severity of an [`Action::Log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Something is broken.
    Error,
    /// Something is wrong but handled.
    Warn,
    /// Normal life events.
    Info,
    /// Detail.
    Debug,
}

/// What the core asks the reactor to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Fork+exec a worker for `pool`/`slot`; answer with
    /// [`Supervisor::on_spawned`] or [`Supervisor::on_spawn_failed`].
    Spawn {
        /// The new process's identity.
        proc: ProcId,
        /// Pool name.
        pool: String,
        /// Slot id (`JOBVISOR_WORKER_ID`).
        slot: u32,
        /// The pool's configuration to spawn with.
        config: Arc<PoolConfig>,
    },
    /// Send `signal` to the process group of `proc`.
    Signal {
        /// Target.
        proc: ProcId,
        /// Signal.
        signal: Signal,
    },
    /// Send a frame to the worker.
    Send {
        /// Target.
        proc: ProcId,
        /// Message.
        msg: ToWorker,
    },
    /// Send a frame with descriptors attached (worker protocol 2: a
    /// `Payload::Fd` input, then an output buffer; see
    /// [`ToWorker::descriptors`]).
    SendFds {
        /// Target.
        proc: ProcId,
        /// Message.
        msg: ToWorker,
        /// The descriptors, in order.
        fds: Vec<PassedFd>,
    },
    /// Write a log line.
    Log {
        /// Severity.
        level: Level,
        /// Text.
        msg: String,
    },
    /// Shutdown is complete: every worker is gone.
    Exit,
    /// Hand an operation to the durable store. Store operations are numbered
    /// 1, 2, 3… in the order of these actions; the reactor must submit them
    /// in that order (the store reports durability by that number).
    Store(Op),
    /// Send a response to a control client.
    Reply {
        /// The client (the reactor's connection id).
        client: ClientId,
        /// The response.
        resp: Response,
    },
    /// Send a job document to a control client with its large output (at
    /// least `FD_PAYLOAD_MIN` bytes) beside it rather than in it: the
    /// reactor passes the client a descriptor (the store's payload file,
    /// else a memfd) instead of copying the output into a frame.
    ReplyJob {
        /// The client (the reactor's connection id).
        client: ClientId,
        /// The document, `output` left `None`.
        doc: ipc_proto::control::JobDoc,
        /// The output.
        output: JobOutput,
    },
    /// An event for `events` subscribers; the job's owner, for a job event
    /// (only it and admins hear of it).
    Event(Event, Option<u32>),
    /// Copy `data` into `proc`'s shared-memory arena at `offset` (an input
    /// slot the core allocated), before the `Send` that refers to it.
    WriteArena {
        /// The worker.
        proc: ProcId,
        /// Where in the arena.
        offset: u64,
        /// The bytes (shared with the job, not copied).
        data: Arc<[u8]>,
    },
    /// Like [`Action::WriteArena`], the bytes being the store's payload
    /// file of job `job`'s input (`len` bytes; see
    /// [`crate::store::input_file`]). If it cannot be read, report it with
    /// [`Supervisor::on_input_unreadable`] (the `Send` that follows must
    /// then not reach the worker).
    WriteArenaFromFile {
        /// The worker.
        proc: ProcId,
        /// Where in the arena.
        offset: u64,
        /// The job whose input it is.
        job: u64,
        /// The input's length.
        len: u64,
        /// Read from this file (the client's) instead, when set: the insert
        /// is not durable yet, the payload file may not exist.
        source: Option<crate::store::InputSource>,
    },
    /// Measure the resident set size of `proc` and report it with
    /// [`Supervisor::on_rss`] (for `max_memory`).
    MeasureRss {
        /// The worker.
        proc: ProcId,
    },
}

/// A control connection, as named by the reactor.
pub type ClientId = u64;

/// How a worker process ended, as far as the core cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// Human description: "exit status 1", "killed by SIGKILL".
    pub description: String,
    /// The child never started its program for lack of descriptors,
    /// processes or memory (reported on its exec-status pipe): retried like
    /// a transient spawn failure, not counted as a crash.
    pub transient: bool,
    /// The last lines it wrote on stdout/stderr (bounded, see
    /// [`crate::log::OutputTail`]): part of the crash text when it died
    /// before `Ready` (a traceback, "No module named …").
    pub output_tail: Option<String>,
}

/// Why a worker is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    /// Scale down: the slot goes away.
    Remove,
    /// Replaced by a worker with a new spec (reload), one at a time.
    Replace,
    /// `restart POOL`.
    Restart,
    /// Daemon shutdown or pool removal.
    Shutdown,
    /// Did not send `Ready` in time: counts as a crash.
    StartTimeout,
    /// Broke the protocol: counts as a crash.
    ProtocolError,
    /// Reached `max_jobs_per_worker` or `max_memory`: replaced, not a crash.
    Recycle,
    /// Its running job exceeded its timeout: replaced, not a crash.
    JobTimeout,
    /// Did not give up a cancelled job within `stop_timeout`.
    Cancel,
}

impl StopReason {
    fn is_crash(self) -> bool {
        matches!(self, StopReason::StartTimeout | StopReason::ProtocolError)
    }

    /// Graceful stops let the jobs in hand finish first (drain).
    fn drains(self) -> bool {
        matches!(
            self,
            StopReason::Remove
                | StopReason::Replace
                | StopReason::Restart
                | StopReason::Shutdown
                | StopReason::Recycle
        )
    }

    /// Stops after which the slot gets a new process at once.
    fn respawns(self) -> bool {
        matches!(
            self,
            StopReason::Replace
                | StopReason::Restart
                | StopReason::Recycle
                | StopReason::JobTimeout
                | StopReason::Cancel
        )
    }
}

#[derive(Debug, Clone)]
enum Phase {
    Starting {
        deadline: Instant,
    },
    Ready,
    /// No new jobs; stops once the jobs in hand are done (or at `until`).
    Draining {
        reason: StopReason,
        until: Option<Instant>,
    },
    Stopping {
        reason: StopReason,
        /// When to escalate to SIGKILL; `None` once SIGKILL was sent.
        kill_at: Option<Instant>,
    },
}

#[derive(Debug)]
struct Proc {
    id: ProcId,
    pid: Option<u32>,
    spawned_at: Instant,
    /// The pool spec generation this process was started with.
    spec_gen: u64,
    phase: Phase,
    /// Jobs handed to it, in the order sent; the front one is running.
    inflight: VecDeque<u64>,
    /// Deadline of the front job (its timeout), if any.
    head_deadline: Option<Instant>,
    /// Since when the front job counts as running: its dispatch, or the
    /// result of the job before it (prefetch). `None` with no job in hand.
    head_since: Option<Instant>,
    /// Jobs this process has finished (for `max_jobs_per_worker`).
    jobs_handled: u64,
    /// Last RSS measurement request (for `max_memory`).
    last_rss_check: Option<Instant>,
    /// Runs a suspect job alone: takes no other job until it is done.
    solo: bool,
    /// It sent `Ready` (a death before it carries its last output).
    ready: bool,
    /// It speaks worker protocol 2: it takes inputs and output buffers as
    /// descriptors.
    takes_fds: bool,
    /// Input half of its shared-memory arena (boxed: it is large).
    arena: Box<ipc_proto::arena::Allocator>,
    /// Input slots of its in-flight jobs.
    slots: Vec<(u64, ipc_proto::arena::Slot)>,
}

#[derive(Debug)]
enum SlotState {
    /// No process and none scheduled (pool failed or stopping).
    Idle,
    /// Waiting out a restart delay.
    Backoff { until: Instant },
    /// A process exists.
    Running(Proc),
}

#[derive(Debug)]
struct Slot {
    id: u32,
    /// Crash restarts of this slot (what `status` shows as RESTARTS: a
    /// `restart`, a recycling or a reload replacement is not a crash).
    restarts: u32,
    /// Delay before the next restart after a quick death.
    backoff: Duration,
    state: SlotState,
}

#[derive(Debug)]
struct Pool {
    name: String,
    config: Arc<PoolConfig>,
    /// Bumped when the worker spec changes on reload.
    spec_gen: u64,
    state: PoolState,
    desired: u32,
    slots: Vec<Slot>,
    /// Crash times within `restart_window`.
    crashes: VecDeque<Instant>,
    /// A worker has sent `Ready` since the pool (re)started.
    ever_ready: bool,
    /// Workers that exited before `Ready`, in a row, while none ever was
    /// (for `start_retries`).
    start_failures: u32,
    last_error: Option<String>,
    /// While `failed`: the crash that failed it (`worker N: …`), as
    /// `PoolFailed` tells waiting clients.
    failure: Option<String>,
    /// Slot currently being replaced by a rolling reload.
    rolling: Option<u32>,
    /// Removed by reload: delete once every process is gone.
    removing: bool,
    /// `pause`: no job is dispatched until `resume` (workers stay up).
    paused: bool,
    /// Queue and counters of its jobs.
    jobs: PoolJobs,
}

/// The supervision state machine. See the module docs.
pub struct Supervisor {
    pools: BTreeMap<String, Pool>,
    semaphores: BTreeMap<String, u32>,
    next_proc: ProcId,
    actions: VecDeque<Action>,
    shutting_down: bool,
    exit_sent: bool,
    rng: fastrand::Rng,
    /// Active jobs, durability tracking, waiters, keys, semaphores.
    jt: JobTable,
    /// Wall-clock milliseconds at `instant_base` (the core reads no clock).
    wall_base_ms: u64,
    instant_base: Instant,
    /// When set, emit [`Action::Event`]s.
    events_wanted: bool,
    /// When the shutdown drain ends (`drain_timeout`).
    drain_deadline: Option<Instant>,
    drain_timeout: Duration,
    /// The store keeps large payloads in payload files (SQLite); without
    /// them (PostgreSQL) inputs stay in memory until their job ends.
    payload_files: bool,
    /// Nodes share the queues (a PostgreSQL store): see `jobs::cluster`.
    cluster: bool,
}

impl Supervisor {
    /// A supervisor for `config`; call [`Supervisor::start`] to spawn.
    /// `now` and `wall_ms` are the same moment on the monotonic and the
    /// wall clock (job timestamps are wall-clock milliseconds).
    pub fn new(config: &Config, seed: u64, now: Instant, wall_ms: u64) -> Self {
        let mut s = Supervisor {
            pools: BTreeMap::new(),
            semaphores: config.semaphores.clone(),
            next_proc: 1,
            actions: VecDeque::new(),
            shutting_down: false,
            exit_sent: false,
            rng: fastrand::Rng::with_seed(seed),
            jt: JobTable::new(),
            wall_base_ms: wall_ms,
            instant_base: now,
            events_wanted: false,
            drain_deadline: None,
            drain_timeout: config.daemon.drain_timeout,
            payload_files: config.store.url.is_none(),
            cluster: config.store.url.is_some(),
        };
        for (name, pc) in &config.pools {
            s.pools.insert(name.clone(), Pool::new(name, pc.clone()));
        }
        s
    }

    /// Spawns the initial workers of every pool.
    pub fn start(&mut self, now: Instant) {
        let names: Vec<String> = self.pools.keys().cloned().collect();
        for name in names {
            self.fill(&name, now);
        }
    }

    /// The next queued action, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The earliest instant at which [`Supervisor::on_timer`] has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut best: Option<Instant> = None;
        let mut consider = |t: Instant| {
            best = Some(best.map_or(t, |b| b.min(t)));
        };
        for pool in self.pools.values() {
            for slot in &pool.slots {
                match &slot.state {
                    SlotState::Backoff { until } => consider(*until),
                    SlotState::Running(p) => {
                        match p.phase {
                            Phase::Starting { deadline } => consider(deadline),
                            Phase::Stopping {
                                kill_at: Some(t), ..
                            } => consider(t),
                            Phase::Draining { until: Some(t), .. } => consider(t),
                            _ => {}
                        }
                        if let Some(t) = p.head_deadline {
                            consider(t);
                        }
                    }
                    SlotState::Idle => {}
                }
            }
            if let Some(t) = pool.jobs.take_back_at {
                consider(t);
            }
        }
        if let Some(t) = self.job_deadline() {
            consider(t);
        }
        best
    }

    /// Handles every deadline that has passed.
    pub fn on_timer(&mut self, now: Instant) {
        self.job_timers(now);
        // A worker is idle while another's job has now run long enough for
        // the jobs waiting behind it to be taken back: a dispatch pass
        // (`pump`) does it.
        for pool in self.pools.values_mut() {
            if pool.jobs.take_back_at.is_some_and(|t| t <= now) {
                pool.jobs.take_back_at = None;
                pool.jobs.dirty = true;
            }
        }
        // Job timeouts and drain limits first: they may stop workers.
        let mut timed_out = Vec::new();
        let mut drain_over = Vec::new();
        for (name, pool) in &self.pools {
            for (idx, slot) in pool.slots.iter().enumerate() {
                if let SlotState::Running(p) = &slot.state {
                    if p.head_deadline.is_some_and(|t| t <= now) {
                        timed_out.push((name.clone(), idx));
                    } else if let Phase::Draining { until: Some(t), .. } = p.phase {
                        if t <= now {
                            drain_over.push((name.clone(), idx));
                        }
                    }
                }
            }
        }
        for (name, idx) in timed_out {
            self.job_timed_out(&name, idx, now);
        }
        for (name, idx) in drain_over {
            self.log_drain_over(&name, idx);
            self.drained(&name, idx, now);
        }
        let names: Vec<String> = self.pools.keys().cloned().collect();
        for name in names {
            let Some(pool) = self.pools.get_mut(&name) else {
                continue;
            };
            let mut to_spawn = Vec::new();
            for (idx, slot) in pool.slots.iter_mut().enumerate() {
                match &mut slot.state {
                    SlotState::Backoff { until } if *until <= now => {
                        to_spawn.push(idx);
                    }
                    SlotState::Running(p) => match &mut p.phase {
                        Phase::Starting { deadline } if *deadline <= now => {
                            self.actions.push_back(Action::Log {
                                level: Level::Warn,
                                msg: format!(
                                    "pool {} worker {}: no Ready within start_timeout ({}); killing it",
                                    pool.name,
                                    slot.id,
                                    humantime::format_duration(pool.config.start_timeout)
                                ),
                            });
                            kill_now(&mut self.actions, p, StopReason::StartTimeout);
                        }
                        Phase::Stopping {
                            kill_at: Some(t), ..
                        } if *t <= now => {
                            self.actions.push_back(Action::Log {
                                level: Level::Warn,
                                msg: format!(
                                    "pool {} worker {}: still running {} after {}; sending SIGKILL to its process group",
                                    pool.name,
                                    slot.id,
                                    humantime::format_duration(pool.config.stop_timeout),
                                    pool.config.stop_signal
                                ),
                            });
                            self.actions.push_back(Action::Signal {
                                proc: p.id,
                                signal: Signal::SIGKILL,
                            });
                            if let Phase::Stopping { kill_at, .. } = &mut p.phase {
                                *kill_at = None;
                            }
                        }
                        _ => {}
                    },
                    _ => {}
                }
            }
            for idx in to_spawn {
                self.spawn_slot(&name, idx, now);
            }
        }
    }

    /// The reactor started `proc` as `pid`.
    pub fn on_spawned(&mut self, proc: ProcId, pid: u32, now: Instant) {
        if let Some((name, idx)) = self.find_proc(proc) {
            let pool = self.pools.get_mut(&name).expect("found above");
            let slot_id = pool.slots[idx].id;
            if let SlotState::Running(p) = &mut pool.slots[idx].state {
                p.pid = Some(pid);
            }
            self.event(
                now,
                "worker_started",
                Some(&name),
                Some((slot_id, Some(pid))),
                None,
                None,
            );
        }
    }

    /// Fork or exec of `proc` failed (no process exists). A transient
    /// failure (a shortage of descriptors, processes or memory) is not the
    /// pool's fault: the slot is retried after a backoff of at least
    /// [`TRANSIENT_RETRY_MIN`], and no crash is counted toward
    /// `max_restarts`. Any other failure is a crash.
    pub fn on_spawn_failed(&mut self, proc: ProcId, error: SpawnError, now: Instant) {
        let Some((pool, idx)) = self.find_proc(proc) else {
            return;
        };
        if error.transient {
            self.retry_spawn_later(&pool, idx, now, &error.message);
            return;
        }
        let error = error.message;
        if let Some(p) = self.pools.get_mut(&pool) {
            p.last_error = Some(error.clone());
        }
        self.actions.push_back(Action::Log {
            level: Level::Error,
            msg: format!("pool {pool}: cannot start worker: {error}"),
        });
        self.handle_death(&pool, idx, now, true, error);
    }

    /// The spawn for slot `idx` failed for a transient reason: back off
    /// and try again, without counting a crash.
    fn retry_spawn_later(&mut self, name: &str, idx: usize, now: Instant, what: &str) {
        if !self.release_slot(name, idx) {
            return;
        }
        let pool = self.pools.get_mut(name).expect("exists");
        let cfg = pool.config.clone();
        let ceiling = cfg.backoff_max.max(TRANSIENT_RETRY_MIN);
        let slot = &mut pool.slots[idx];
        let base = slot.backoff.clamp(TRANSIENT_RETRY_MIN, ceiling);
        let delay = base.mul_f64(0.8 + 0.4 * self.rng.f64()).min(ceiling);
        slot.backoff = (base * 2).min(ceiling);
        slot.state = SlotState::Backoff { until: now + delay };
        let slot_id = slot.id;
        pool.last_error = Some(format!(
            "worker {slot_id}: cannot start for now: {what}; retrying"
        ));
        self.actions.push_back(Action::Log {
            level: Level::Warn,
            msg: format!(
                "pool {name}: cannot start worker {slot_id} for now: {what}; retrying in {} (not counted as a crash)",
                fmt_ms(delay)
            ),
        });
    }

    /// The worker sent `Ready`.
    pub fn on_ready(&mut self, proc: ProcId, protocol_version: u32, now: Instant) {
        let Some((name, idx)) = self.find_proc(proc) else {
            return;
        };
        if !(ipc_proto::PROTOCOL_VERSION..=ipc_proto::WORKER_PROTOCOL_FDS)
            .contains(&protocol_version)
        {
            self.on_protocol_error(
                proc,
                format!(
                    "worker speaks protocol version {protocol_version}, daemon speaks {} and {}",
                    ipc_proto::PROTOCOL_VERSION,
                    ipc_proto::WORKER_PROTOCOL_FDS
                ),
                now,
            );
            return;
        }
        let pool = self.pools.get_mut(&name).expect("found above");
        let slot = &mut pool.slots[idx];
        let SlotState::Running(p) = &mut slot.state else {
            return;
        };
        if let Phase::Starting { .. } = p.phase {
            p.takes_fds = protocol_version >= ipc_proto::WORKER_PROTOCOL_FDS;
            p.phase = Phase::Ready;
            p.ready = true;
            pool.ever_ready = true;
            pool.start_failures = 0;
            pool.jobs.dirty = true;
            let (slot_id, pid) = (slot.id, p.pid);
            self.actions.push_back(Action::Log {
                level: Level::Info,
                msg: format!(
                    "pool {name} worker {slot_id} ready (pid {})",
                    pid.unwrap_or(0)
                ),
            });
            if pool.rolling == Some(slot_id) {
                pool.rolling = None;
                self.advance_rollout(&name, now);
            }
            self.event(
                now,
                "worker_ready",
                Some(&name),
                Some((slot_id, pid)),
                None,
                None,
            );
        }
    }

    /// The worker broke the protocol (garbage, oversized frame, wrong
    /// handshake): kill it; it counts as a crash.
    pub fn on_protocol_error(&mut self, proc: ProcId, error: String, _now: Instant) {
        let Some((name, idx)) = self.find_proc(proc) else {
            return;
        };
        let pool = self.pools.get_mut(&name).expect("found above");
        let slot = &mut pool.slots[idx];
        let SlotState::Running(p) = &mut slot.state else {
            return;
        };
        if let Phase::Stopping {
            reason: StopReason::ProtocolError,
            ..
        } = p.phase
        {
            return;
        }
        self.actions.push_back(Action::Log {
            level: Level::Warn,
            msg: format!(
                "pool {name} worker {} (pid {}): protocol error: {error}; killing it",
                slot.id,
                p.pid.unwrap_or(0)
            ),
        });
        pool.last_error = Some(format!("protocol error: {error}"));
        kill_now(&mut self.actions, p, StopReason::ProtocolError);
    }

    /// The worker closed its result channel while the core still counts on
    /// it. A live process without a channel is useless: stop it.
    pub fn on_channel_closed(&mut self, proc: ProcId, now: Instant) {
        let Some((name, idx)) = self.find_proc(proc) else {
            return;
        };
        let pool = self.pools.get_mut(&name).expect("found above");
        if let SlotState::Running(p) = &pool.slots[idx].state {
            if matches!(p.phase, Phase::Stopping { .. }) {
                return;
            }
        }
        // Usually the exit follows within microseconds; if it does not, the
        // stop ladder ends it. A crash either way.
        self.stop_slot(&name, idx, StopReason::ProtocolError, now);
    }

    /// The process `proc` has exited and was reaped.
    pub fn on_exit(&mut self, proc: ProcId, exit: ExitInfo, now: Instant) {
        let Some((name, idx)) = self.find_proc(proc) else {
            return;
        };
        let pool = self.pools.get_mut(&name).expect("found above");
        let slot = &pool.slots[idx];
        let SlotState::Running(p) = &slot.state else {
            return;
        };
        let reason = match p.phase {
            Phase::Stopping { reason, .. } => Some(reason),
            _ => None,
        };
        let level = if reason.is_some_and(|r| !r.is_crash()) {
            Level::Info
        } else {
            Level::Warn
        };
        // A worker that dies before `Ready` (a bad command, a failing
        // import) has usually said why on stderr: that is its crash text.
        let said = match (&exit.output_tail, reason) {
            (Some(tail), None | Some(StopReason::StartTimeout | StopReason::ProtocolError))
                if !p.ready =>
            {
                format!(" before Ready: {tail}")
            }
            _ => String::new(),
        };
        self.actions.push_back(Action::Log {
            level,
            msg: format!(
                "pool {name} worker {} (pid {}) exited: {} after {}{said}",
                slot.id,
                p.pid.unwrap_or(0),
                exit.description,
                fmt_ms(now.saturating_duration_since(p.spawned_at))
            ),
        });
        let (slot_id, pid) = (slot.id, p.pid);
        self.event(
            now,
            "worker_exited",
            Some(&name),
            Some((slot_id, pid)),
            None,
            Some(format!("{}{said}", exit.description)),
        );
        if self.has_inflight(&name, idx) {
            self.jobs_lost(&name, idx, &format!("exited: {}", exit.description), now);
        }
        let pool = self.pools.get_mut(&name).expect("found above");
        match reason {
            Some(StopReason::Remove) => {
                pool.slots.remove(idx);
                self.check_exit();
            }
            Some(r) if r.respawns() => {
                pool.slots[idx].state = SlotState::Idle;
                if pool.state == PoolState::Running && !pool.removing && !self.shutting_down {
                    self.spawn_slot(&name, idx, now);
                } else {
                    self.check_exit();
                }
            }
            Some(StopReason::Shutdown) => {
                pool.slots[idx].state = SlotState::Idle;
                self.check_exit();
            }
            // Its pipes closed before it exited: `on_channel_closed` took
            // that for a broken worker, but it never ran its program.
            None | Some(StopReason::ProtocolError) if exit.transient => {
                self.retry_spawn_later(&name, idx, now, &exit.description);
            }
            Some(_) | None => {
                let what = if reason == Some(StopReason::StartTimeout) {
                    format!("no Ready within start_timeout ({}){said}", exit.description)
                } else {
                    format!("{}{said}", exit.description)
                };
                self.handle_death(&name, idx, now, true, what);
            }
        }
    }

    /// `scale POOL N`.
    pub fn scale(&mut self, name: &str, workers: u32, now: Instant) -> Result<String, CtlError> {
        if workers > 4096 {
            return Err(CtlError::Invalid(format!(
                "cannot scale to {workers} workers; the maximum is 4096"
            )));
        }
        let pool = self.pool_mut(name)?;
        if pool.removing || pool.state == PoolState::Stopping {
            return Err(CtlError::Rejected(format!("pool {name} is stopping")));
        }
        let before = pool.desired;
        pool.desired = workers;
        self.fill(name, now);
        self.shrink(name, now);
        Ok(format!("pool {name}: {before} -> {workers} workers"))
    }

    /// `pause POOL` (`paused`) or `resume POOL`: whether the pool's queued
    /// jobs are handed to its workers. Its workers stay up either way.
    pub fn pause(&mut self, name: &str, paused: bool) -> Result<String, CtlError> {
        let pool = self.pool_mut(name)?;
        if pool.removing || pool.state == PoolState::Stopping {
            return Err(CtlError::Rejected(format!("pool {name} is stopping")));
        }
        let was = std::mem::replace(&mut pool.paused, paused);
        pool.jobs.dirty = true;
        if paused {
            // A paused pool claims nothing more from the cluster.
            self.withdraw_demand(name);
        }
        Ok(match (was, paused) {
            (false, true) => format!("pool {name}: paused (running jobs finish; queued ones wait for `jobvisorctl resume {name}`)"),
            (true, true) => format!("pool {name}: already paused"),
            (true, false) => format!("pool {name}: resumed"),
            (false, false) => format!("pool {name}: not paused"),
        })
    }

    /// `restart POOL`: replaces every worker and clears `failed`.
    pub fn restart(&mut self, name: &str, now: Instant) -> Result<String, CtlError> {
        if self.shutting_down {
            return Err(CtlError::Rejected("the daemon is shutting down".into()));
        }
        let pool = self.pool_mut(name)?;
        if pool.removing {
            return Err(CtlError::Rejected(format!("pool {name} is being removed")));
        }
        let was_failed = pool.clear_failure();
        pool.rolling = None;
        let mut n = 0;
        for idx in 0..pool.slots.len() {
            let pool = self.pools.get_mut(name).expect("exists");
            match pool.slots[idx].state {
                SlotState::Running(_) => {
                    n += 1;
                    self.stop_slot(name, idx, StopReason::Restart, now);
                }
                SlotState::Idle | SlotState::Backoff { .. } => {
                    n += 1;
                    self.spawn_slot(name, idx, now);
                }
            }
        }
        self.fill(name, now);
        Ok(if was_failed {
            format!(
                "pool {name}: cleared failed state, restarting {n} worker{}",
                if n == 1 { "" } else { "s" }
            )
        } else {
            format!(
                "pool {name}: restarting {n} worker{}",
                if n == 1 { "" } else { "s" }
            )
        })
    }

    /// Applies a new, already validated configuration (reload).
    pub fn reload(&mut self, config: &Config, now: Instant) -> Result<String, CtlError> {
        if self.shutting_down {
            return Err(CtlError::Rejected("the daemon is shutting down".into()));
        }
        self.semaphores = config.semaphores.clone();
        let mut added = Vec::new();
        let mut removed = Vec::new();
        let mut replaced = Vec::new();
        let mut updated = Vec::new();
        let mut revived = Vec::new();
        let mut unchanged = 0;
        let old: Vec<String> = self.pools.keys().cloned().collect();
        for name in &old {
            if !config.pools.contains_key(name) && !self.pools[name].removing {
                removed.push(name.clone());
                let pool = self.pools.get_mut(name).expect("exists");
                pool.removing = true;
                pool.state = PoolState::Stopping;
                for idx in 0..pool.slots.len() {
                    self.stop_slot(name, idx, StopReason::Shutdown, now);
                }
            }
        }
        for (name, pc) in &config.pools {
            match self.pools.get_mut(name) {
                None => {
                    added.push(name.clone());
                    self.pools.insert(name.clone(), Pool::new(name, pc.clone()));
                    self.adopt_orphans(name);
                    self.fill(name, now);
                }
                Some(pool) if pool.removing => {
                    // Re-added while its old incarnation is still draining:
                    // let the old one finish, then it is recreated on the
                    // next reload. Say so rather than guess.
                    return Err(CtlError::Rejected(format!(
                        "pool {name} is still stopping from an earlier reload; retry in a moment"
                    )));
                }
                Some(pool) => {
                    if *pool.config == *pc {
                        unchanged += 1;
                        continue;
                    }
                    let same_spec = pool.config.same_worker_spec(pc);
                    pool.config = Arc::new(pc.clone());
                    pool.desired = pc.workers;
                    if same_spec {
                        updated.push(name.clone());
                    } else {
                        pool.spec_gen += 1;
                        pool.rolling = None;
                        replaced.push(name.clone());
                        // A new spec is a fix worth trying: a failed pool
                        // starts afresh (an unchanged spec would only fail
                        // again, so then it stays failed).
                        if pool.state == PoolState::Failed {
                            pool.clear_failure();
                            revived.push(name.clone());
                        }
                    }
                    self.fill(name, now);
                    self.shrink(name, now);
                    if !same_spec {
                        self.advance_rollout(name, now);
                    }
                }
            }
        }
        self.check_exit();
        self.push_retention();
        self.event(now, "reloaded", None, None, None, None);
        let list = |v: &Vec<String>| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        let revived = if revived.is_empty() {
            String::new()
        } else {
            format!(" (cleared the failed state of {})", revived.join(", "))
        };
        Ok(format!(
            "reloaded: added {}; removed {}; replacing {}{revived}; updated {}; {} unchanged",
            list(&added),
            list(&removed),
            list(&replaced),
            list(&updated),
            unchanged
        ))
    }

    /// Daemon shutdown: stop every worker (at once with `immediate`).
    pub fn shutdown(&mut self, immediate: bool, now: Instant) {
        self.shutting_down = true;
        if self.drain_deadline.is_none() {
            self.drain_deadline = Some(now + self.drain_timeout);
        }
        let names: Vec<String> = self.pools.keys().cloned().collect();
        for name in names {
            let pool = self.pools.get_mut(&name).expect("exists");
            pool.state = PoolState::Stopping;
            for idx in 0..pool.slots.len() {
                self.stop_slot(&name, idx, StopReason::Shutdown, now);
                if immediate {
                    self.drained(&name, idx, now);
                    let pool = self.pools.get_mut(&name).expect("exists");
                    if let SlotState::Running(p) = &mut pool.slots[idx].state {
                        if let Phase::Stopping { kill_at, .. } = &mut p.phase {
                            if kill_at.is_some() {
                                *kill_at = None;
                                self.actions.push_back(Action::Signal {
                                    proc: p.id,
                                    signal: Signal::SIGKILL,
                                });
                            }
                        }
                    }
                }
            }
        }
        self.check_exit();
    }

    /// True once shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// True when every pool has all its workers ready, or has failed
    /// (the moment to tell systemd `READY=1`).
    pub fn startup_settled(&self) -> bool {
        self.pools.values().all(|p| {
            p.state != PoolState::Running
                || p.slots.iter().all(|s| {
                    matches!(
                        &s.state,
                        SlotState::Running(Proc {
                            phase: Phase::Ready,
                            ..
                        })
                    )
                })
        })
    }

    /// The pid of `proc`, if it is known and alive.
    pub fn pid_of(&self, proc: ProcId) -> Option<u32> {
        let (name, idx) = self.find_proc(proc)?;
        match &self.pools[&name].slots[idx].state {
            SlotState::Running(p) => p.pid,
            _ => None,
        }
    }

    /// Pools and workers, for `status`. RSS is filled in by the caller.
    pub fn status(&self, only: Option<&str>, now: Instant) -> Result<StatusReport, CtlError> {
        if let Some(name) = only {
            if !self.pools.contains_key(name) {
                return Err(self.unknown_pool(name));
            }
        }
        let pools = self
            .pools
            .values()
            .filter(|p| only.is_none_or(|n| n == p.name))
            .map(|p| PoolStatus {
                name: p.name.clone(),
                state: if p.paused && p.state == PoolState::Running {
                    PoolState::Paused
                } else {
                    p.state
                },
                desired_workers: p.desired,
                queued: p.jobs.queued,
                running: p.jobs.running,
                succeeded: p.jobs.succeeded,
                failed: p.jobs.failed,
                last_error: p.last_error.clone(),
                workers: p
                    .slots
                    .iter()
                    .map(|s| {
                        let (pid, state, uptime) = match &s.state {
                            SlotState::Idle | SlotState::Backoff { .. } => {
                                (None, WorkerState::Backoff, Duration::ZERO)
                            }
                            SlotState::Running(pr) => (
                                pr.pid,
                                match pr.phase {
                                    Phase::Starting { .. } => WorkerState::Starting,
                                    Phase::Ready if pr.inflight.is_empty() => WorkerState::Ready,
                                    Phase::Ready => WorkerState::Busy,
                                    Phase::Draining { .. } | Phase::Stopping { .. } => {
                                        WorkerState::Stopping
                                    }
                                },
                                now.saturating_duration_since(pr.spawned_at),
                            ),
                        };
                        WorkerStatus {
                            id: s.id,
                            pid,
                            state,
                            uptime_ms: uptime.as_millis() as u64,
                            restarts: s.restarts,
                            // The current process's, as `max_jobs_per_worker`
                            // counts them: a new process starts at 0.
                            jobs_done: match &s.state {
                                SlotState::Running(pr) => pr.jobs_handled,
                                _ => 0,
                            },
                            rss_bytes: 0,
                        }
                    })
                    .collect(),
            })
            .collect();
        Ok(StatusReport { pools })
    }

    /// The number of worker slots of a pool (for `logs`).
    pub fn pool_slots(&self, name: &str) -> Result<u32, CtlError> {
        match self.pools.get(name) {
            Some(p) => Ok(p.slots.len() as u32),
            None => Err(self.unknown_pool(name)),
        }
    }

    // ---- internals ----

    fn unknown_pool(&self, name: &str) -> CtlError {
        let known: Vec<&str> = self.pools.keys().map(String::as_str).collect();
        CtlError::NotFound(format!(
            "no pool named {name:?}; configured pools: {}",
            if known.is_empty() {
                "(none)".to_string()
            } else {
                known.join(", ")
            }
        ))
    }

    fn pool_mut(&mut self, name: &str) -> Result<&mut Pool, CtlError> {
        if !self.pools.contains_key(name) {
            return Err(self.unknown_pool(name));
        }
        Ok(self.pools.get_mut(name).expect("checked"))
    }

    fn find_proc(&self, proc: ProcId) -> Option<(String, usize)> {
        for pool in self.pools.values() {
            for (idx, slot) in pool.slots.iter().enumerate() {
                if let SlotState::Running(p) = &slot.state {
                    if p.id == proc {
                        return Some((pool.name.clone(), idx));
                    }
                }
            }
        }
        None
    }

    /// Adds slots up to `desired` and spawns them.
    fn fill(&mut self, name: &str, now: Instant) {
        let Some(pool) = self.pools.get_mut(name) else {
            return;
        };
        if pool.removing || self.shutting_down {
            return;
        }
        while (pool.slots.len() as u32) < pool.desired {
            let id = (0..)
                .find(|id| !pool.slots.iter().any(|s| s.id == *id))
                .expect("a free id exists");
            pool.slots.push(Slot {
                id,
                restarts: 0,
                backoff: pool.config.backoff_initial,
                state: SlotState::Idle,
            });
        }
        pool.slots.sort_by_key(|s| s.id);
        if pool.state != PoolState::Running {
            return;
        }
        for idx in 0..pool.slots.len() {
            let pool = self.pools.get_mut(name).expect("exists");
            if matches!(pool.slots[idx].state, SlotState::Idle) {
                self.spawn_slot(name, idx, now);
            }
        }
    }

    /// Stops the highest-numbered slots beyond `desired`.
    fn shrink(&mut self, name: &str, now: Instant) {
        let Some(pool) = self.pools.get_mut(name) else {
            return;
        };
        let desired = pool.desired as usize;
        // Slots already on their way out do not count.
        let mut live: Vec<usize> = (0..pool.slots.len())
            .filter(|&i| {
                !matches!(
                    &pool.slots[i].state,
                    SlotState::Running(Proc {
                        phase: Phase::Stopping {
                            reason: StopReason::Remove,
                            ..
                        },
                        ..
                    })
                )
            })
            .collect();
        let mut removed_idle = Vec::new();
        let mut to_stop = Vec::new();
        while live.len() > desired {
            let idx = live.pop().expect("non-empty");
            match pool.slots[idx].state {
                SlotState::Running(_) => to_stop.push(idx),
                _ => removed_idle.push(idx),
            }
        }
        for idx in to_stop {
            self.stop_slot(name, idx, StopReason::Remove, now);
        }
        let pool = self.pools.get_mut(name).expect("exists");
        // Highest index first, so earlier indices stay valid.
        removed_idle.sort_unstable();
        for idx in removed_idle.into_iter().rev() {
            pool.slots.remove(idx);
        }
    }

    fn spawn_slot(&mut self, name: &str, idx: usize, now: Instant) {
        let proc = self.next_proc;
        self.next_proc += 1;
        let pool = self.pools.get_mut(name).expect("exists");
        let slot = &mut pool.slots[idx];
        slot.state = SlotState::Running(Proc {
            id: proc,
            pid: None,
            spawned_at: now,
            spec_gen: pool.spec_gen,
            phase: Phase::Starting {
                deadline: now + pool.config.start_timeout,
            },
            inflight: VecDeque::new(),
            head_deadline: None,
            head_since: None,
            jobs_handled: 0,
            last_rss_check: None,
            solo: false,
            ready: false,
            takes_fds: false,
            arena: Box::new(ipc_proto::arena::Allocator::new(
                ipc_proto::arena::ArenaLayout::split(pool.config.shm_size).input,
                ipc_proto::arena::SLOT_ALIGN,
            )),
            slots: Vec::new(),
        });
        self.actions.push_back(Action::Spawn {
            proc,
            pool: name.to_string(),
            slot: slot.id,
            config: pool.config.clone(),
        });
    }

    /// Begins the stop ladder: `Shutdown` frame and `stop_signal` now,
    /// SIGKILL of the process group after `stop_timeout`.
    fn stop_slot(&mut self, name: &str, idx: usize, reason: StopReason, now: Instant) {
        let pool = self.pools.get_mut(name).expect("exists");
        let stop_signal = pool.config.stop_signal;
        let stop_timeout = pool.config.stop_timeout;
        let slot = &mut pool.slots[idx];
        match &mut slot.state {
            SlotState::Idle => {}
            SlotState::Backoff { .. } => slot.state = SlotState::Idle,
            SlotState::Running(p) => match &mut p.phase {
                Phase::Stopping { reason: r, .. } | Phase::Draining { reason: r, .. } => {
                    // Already going; a stronger intent wins (e.g. shutdown
                    // over replace) so the exit is handled accordingly.
                    if !r.is_crash() {
                        *r = reason;
                    }
                    if !reason.drains() {
                        if let Phase::Draining { .. } = p.phase {
                            self.drained(name, idx, now);
                        }
                    }
                }
                phase if reason.drains() && !p.inflight.is_empty() => {
                    // Let the jobs in hand finish; no new ones.
                    *phase = Phase::Draining {
                        reason,
                        until: self.drain_deadline,
                    };
                }
                _ => {
                    let kill_at = now + stop_timeout;
                    begin_stop_ladder(&mut self.actions, p, reason, stop_signal, kill_at);
                }
            },
        }
    }

    /// A draining worker has no job left (or its drain time is over):
    /// begin the stop ladder.
    pub(super) fn drained(&mut self, name: &str, idx: usize, now: Instant) {
        let pool = self.pools.get_mut(name).expect("exists");
        let (stop_signal, stop_timeout) = (pool.config.stop_signal, pool.config.stop_timeout);
        if let SlotState::Running(p) = &mut pool.slots[idx].state {
            if let Phase::Draining { reason, .. } = p.phase {
                let kill_at = now + stop_timeout;
                begin_stop_ladder(&mut self.actions, p, reason, stop_signal, kill_at);
            }
        }
    }

    fn log_drain_over(&mut self, name: &str, idx: usize) {
        let slot = &self.pools[name].slots[idx];
        if let SlotState::Running(p) = &slot.state {
            self.actions.push_back(Action::Log {
                level: Level::Warn,
                msg: format!(
                    "pool {name} worker {}: drain_timeout over with {} jobs in hand; stopping it (they will be retried)",
                    slot.id,
                    p.inflight.len()
                ),
            });
        }
    }

    /// The slot's process is gone (or never started): the slot goes idle.
    /// Returns whether it is to be started again; not when the daemon or
    /// the pool is stopping or failed (the exit is checked), nor when the
    /// pool was scaled down meanwhile (the slot goes).
    fn release_slot(&mut self, name: &str, idx: usize) -> bool {
        let shutting_down = self.shutting_down;
        let pool = self.pools.get_mut(name).expect("exists");
        pool.slots[idx].state = SlotState::Idle;
        if pool.rolling == Some(pool.slots[idx].id) {
            pool.rolling = None;
        }
        if shutting_down || pool.removing || pool.state != PoolState::Running {
            self.check_exit();
            return false;
        }
        if (pool.slots.len() as u32) > pool.desired {
            // Scaled down meanwhile: the slot is not replaced.
            pool.slots.remove(idx);
            return false;
        }
        true
    }

    /// Crash accounting and restart decision for a slot whose process died
    /// (or could not be spawned).
    fn handle_death(&mut self, name: &str, idx: usize, now: Instant, crash: bool, what: String) {
        let (uptime, was_ready) = match &self.pools[name].slots[idx].state {
            SlotState::Running(p) => (now.saturating_duration_since(p.spawned_at), p.ready),
            _ => (Duration::ZERO, false),
        };
        if !self.release_slot(name, idx) {
            return;
        }
        let pool = self.pools.get_mut(name).expect("exists");
        let cfg = pool.config.clone();
        if crash && !was_ready && !pool.ever_ready {
            pool.start_failures += 1;
        }
        let never_start = cfg
            .start_retries
            .filter(|r| crash && pool.start_failures > *r)
            .map(|_| pool.start_failures);
        if crash {
            pool.slots[idx].restarts += 1;
            // Shown by `status` while the pool crash-loops, not only once
            // it has failed.
            pool.last_error = Some(format!("worker {}: {what}", pool.slots[idx].id));
            while pool
                .crashes
                .front()
                .is_some_and(|t| now.saturating_duration_since(*t) > cfg.restart_window)
            {
                pool.crashes.pop_front();
            }
            pool.crashes.push_back(now);
            if pool.crashes.len() as u32 > cfg.max_restarts || never_start.is_some() {
                pool.state = PoolState::Failed;
                let crash = format!("worker {}: {what}", pool.slots[idx].id);
                let why = match never_start {
                    Some(n) => format!(
                        "its workers exited before they were ready {n} times in a row (start_retries = {})",
                        n - 1
                    ),
                    None => format!(
                        "{} crashes within restart_window ({})",
                        pool.crashes.len(),
                        humantime::format_duration(cfg.restart_window)
                    ),
                };
                // The crash text last: it may be a worker's traceback.
                let msg = format!(
                    "pool {name} failed: {why}; fix the cause, then run `jobvisorctl restart {name}` (or fix its command and `jobvisorctl reload`); last: {crash}"
                );
                pool.last_error = Some(msg.clone());
                pool.failure = Some(crash);
                for s in &mut pool.slots {
                    if matches!(s.state, SlotState::Backoff { .. }) {
                        s.state = SlotState::Idle;
                    }
                }
                self.actions.push_back(Action::Log {
                    level: Level::Error,
                    msg: msg.clone(),
                });
                self.event(now, "pool_failed", Some(name), None, None, Some(msg));
                self.tell_pool_failed(name, None, false);
                return;
            }
        }
        let slot = &mut pool.slots[idx];
        if uptime >= cfg.healthy_after {
            // It had been healthy: replace at once, backoff starts afresh.
            slot.backoff = cfg.backoff_initial;
            self.spawn_slot(name, idx, now);
        } else {
            let base = slot.backoff;
            // Jitter of ±20% spreads the restarts of slots that died
            // together (a bad deploy) so they do not stampede.
            let factor = 0.8 + 0.4 * self.rng.f64();
            let delay = base.mul_f64(factor).min(cfg.backoff_max);
            slot.backoff = (base * 2).clamp(cfg.backoff_initial, cfg.backoff_max);
            if delay.is_zero() {
                self.spawn_slot(name, idx, now);
            } else {
                slot.state = SlotState::Backoff { until: now + delay };
            }
        }
        self.advance_rollout(name, now);
    }

    /// Rolling replacement after a spec change: one slot at a time is
    /// stopped and respawned with the new spec; the next waits for its Ready.
    fn advance_rollout(&mut self, name: &str, now: Instant) {
        let Some(pool) = self.pools.get_mut(name) else {
            return;
        };
        if pool.rolling.is_some() || pool.state != PoolState::Running || pool.removing {
            return;
        }
        let gen = pool.spec_gen;
        let next = pool.slots.iter().position(|s| {
            matches!(&s.state, SlotState::Running(p)
                if p.spec_gen != gen && !matches!(p.phase, Phase::Stopping { .. }))
        });
        if let Some(idx) = next {
            pool.rolling = Some(pool.slots[idx].id);
            self.stop_slot(name, idx, StopReason::Replace, now);
        }
    }

    fn check_exit(&mut self) {
        let names: Vec<String> = self.pools.keys().cloned().collect();
        for name in names {
            let pool = &self.pools[&name];
            if pool.removing
                && pool
                    .slots
                    .iter()
                    .all(|s| !matches!(s.state, SlotState::Running(_)))
            {
                let mut pool = self.pools.remove(&name).expect("exists");
                let queued = pool.jobs.queued;
                self.orphan_queue(&mut pool);
                self.actions.push_back(Action::Log {
                    level: Level::Info,
                    msg: if queued > 0 {
                        format!("pool {name} removed; its {queued} queued jobs stay in the store and run if the pool is added back")
                    } else {
                        format!("pool {name} removed")
                    },
                });
            }
        }
        if self.shutting_down && !self.exit_sent {
            let idle = self.pools.values().all(|p| {
                p.slots
                    .iter()
                    .all(|s| !matches!(s.state, SlotState::Running(_)))
            });
            if idle {
                self.exit_sent = true;
                self.actions.push_back(Action::Exit);
            }
        }
    }
}

impl Pool {
    /// Back to `running` with a clean crash history and fresh backoffs
    /// (`restart`, or a reload that changed its worker spec); returns
    /// whether it was `failed`.
    fn clear_failure(&mut self) -> bool {
        let was_failed = self.state == PoolState::Failed;
        self.state = PoolState::Running;
        self.crashes.clear();
        self.ever_ready = false;
        self.start_failures = 0;
        self.last_error = None;
        self.failure = None;
        self.jobs.told_failed.clear();
        for slot in &mut self.slots {
            slot.backoff = self.config.backoff_initial;
        }
        was_failed
    }

    fn new(name: &str, config: PoolConfig) -> Pool {
        Pool {
            name: name.to_string(),
            desired: config.workers,
            config: Arc::new(config),
            spec_gen: 0,
            state: PoolState::Running,
            slots: Vec::new(),
            crashes: VecDeque::new(),
            ever_ready: false,
            start_failures: 0,
            last_error: None,
            failure: None,
            rolling: None,
            removing: false,
            paused: false,
            jobs: PoolJobs::default(),
        }
    }
}

/// A control request the core refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CtlError {
    /// Bad argument (exit 2).
    #[error("{0}")]
    Invalid(String),
    /// Unknown pool or job (exit 4).
    #[error("{0}")]
    NotFound(String),
    /// Not now (exit 5).
    #[error("{0}")]
    Rejected(String),
}

/// A large job output to send beside its document ([`Action::ReplyJob`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutput {
    /// In memory (a job that just finished); its payload file, if already
    /// written, is preferred.
    Mem(std::sync::Arc<[u8]>),
    /// Only in the store's payload file, of this length
    /// ([`crate::store::output_file`]).
    File(u64),
    /// A sealed memfd the daemon filled from the worker's arena
    /// (`payloads = "memory"`): handed to the waiting clients, never stored.
    Memfd(OutputMemfd),
}

/// A memfd holding a job's output (see [`JobOutput::Memfd`]): one the
/// daemon filled and sealed, or the client's own output buffer.
#[derive(Debug, Clone)]
pub struct OutputMemfd {
    pub file: std::sync::Arc<std::fs::File>,
    pub len: u64,
}

/// A client's descriptor handed on to a worker ([`Action::SendFds`]).
#[derive(Debug, Clone)]
pub struct PassedFd(pub std::sync::Arc<std::fs::File>);

impl PartialEq for PassedFd {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl PartialEq for OutputMemfd {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.file, &other.file) && self.len == other.len
    }
}

impl Eq for OutputMemfd {}

/// The last rung at once: SIGKILL to the process group, for a worker that
/// broke the rules (no Ready in time, protocol error).
fn kill_now(actions: &mut VecDeque<Action>, p: &mut Proc, reason: StopReason) {
    actions.push_back(Action::Signal {
        proc: p.id,
        signal: Signal::SIGKILL,
    });
    p.phase = Phase::Stopping {
        reason,
        kill_at: None,
    };
}

/// First rungs of the stop ladder: the `Shutdown` frame and `stop_signal`
/// now; SIGKILL of the process group at `kill_at` (see `on_timer`).
fn begin_stop_ladder(
    actions: &mut VecDeque<Action>,
    p: &mut Proc,
    reason: StopReason,
    stop_signal: Signal,
    kill_at: Instant,
) {
    actions.push_back(Action::Send {
        proc: p.id,
        msg: ToWorker::Shutdown,
    });
    actions.push_back(Action::Signal {
        proc: p.id,
        signal: stop_signal,
    });
    p.phase = Phase::Stopping {
        reason,
        kill_at: Some(kill_at),
    };
}

impl CtlError {
    /// Its class and message, as the control protocol carries them.
    pub fn parts(self) -> (ipc_proto::control::ErrorKind, String) {
        use ipc_proto::control::ErrorKind;
        match self {
            CtlError::Invalid(m) => (ErrorKind::Invalid, m),
            CtlError::NotFound(m) => (ErrorKind::NotFound, m),
            CtlError::Rejected(m) => (ErrorKind::Rejected, m),
        }
    }

    /// The `Response::Error` a client gets for it.
    pub fn into_response(self) -> Response {
        let (kind, message) = self.parts();
        Response::Error { kind, message }
    }
}

fn fmt_ms(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

mod jobs;
pub mod metrics;

#[cfg(test)]
mod tests;
