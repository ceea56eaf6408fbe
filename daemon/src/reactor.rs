//! The event loop: one epoll instance (mio) that owns every descriptor and
//! executes what the [`Supervisor`] core decides.
//!
//! Sources: signals (signal-hook's self-pipe: SIGCHLD, SIGTERM, SIGINT,
//! SIGHUP), the control listener and its clients, and per worker the result
//! pipe, the job pipe (writable interest only while output is pending) and
//! stdout/stderr. The poll timeout is the core's next deadline, so an idle
//! daemon sleeps in `epoll_wait` with no timer at all. The only other
//! timers are one-shots armed while something is pending: the systemd
//! watchdog ping, a rate-limited `STATUS=` update, and the "suppressed"
//! record of a worker whose output was rate-limited (see `log.rs`).
//!
//! # Worker output
//! A worker writing as fast as it can must not starve the loop: each
//! stdout/stderr event reads at most [`OUTPUT_READ_BUDGET`] bytes. mio is
//! edge-triggered, so a pipe not read to `EAGAIN` raises no new event;
//! such pipes go into `output_backlog`, which is read again every turn,
//! with a zero poll timeout while it is non-empty (other events are still
//! served in between, and an idle daemon has an empty backlog).
//!
//! # Reaping
//! Signals are coalesced: one SIGCHLD may stand for many deaths, so each
//! SIGCHLD runs [`Reactor::reap`], which collects children until none is
//! left. A death can also be noticed first as EOF on the result pipe; that
//! only flags the worker, the exit itself is always taken from `waitid`.
//!
//! Every exited worker's process group is SIGKILLed *before* the worker is
//! reaped (`waitid(WNOWAIT)` peeks without reaping): while the leader is a
//! zombie its pid — the group id — cannot be reused, so the kill can never
//! hit an unrelated group. This is what leaves no grandchild behind.
//!
//! The daemon is also a child subreaper, so orphaned grandchildren are
//! re-parented to it and reaped here rather than left as zombies under an
//! init that may not reap (containers).

use crate::config::{self, Config};
use crate::control::{self, Client, Incoming};
use crate::notify::Notifier;
use crate::spawn;
use crate::store::{Completion, Store};
use crate::supervisor::{Action, CtlError, ExitInfo, JobOutput, Level, ProcId, Supervisor};
use ipc_proto::control::{ErrorKind, JobDoc, Request, Response};
use ipc_proto::worker::{FromWorker, ToWorker};
use ipc_proto::{decode, encode_frame, FrameDecoder};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

mod clients;
mod copies;
mod logs;
mod workers;

use workers::log_suppressed;

const TOKEN_SIGNALS: Token = Token(0);
const TOKEN_LISTENER: Token = Token(1);
/// The one waker (mio allows one per poll), shared by the store thread and
/// the copier thread: on it, both are asked for what they finished.
const TOKEN_WAKE: Token = Token(2);
/// `--lifeline` (kind Special, id 1).
const TOKEN_LIFELINE: Token = Token(8);

/// A client whose unread output exceeds this is not read from (nor its
/// requests answered) until it catches up: backpressure instead of unbounded
/// buffering. (4 MiB cost `map` about 15% of its throughput: a client that
/// writes its outputs to a pipe reads in bursts.)
const CLIENT_OUTPUT_HIGH_WATER: usize = 32 << 20;
/// An `events` subscriber this far behind is disconnected.
const EVENTS_BACKLOG_LIMIT: usize = 8 << 20;

/// What a token refers to: the low 3 bits say the kind, the rest the id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Special = 0,
    Client = 1,
    Results = 2,
    Jobs = 3,
    Stdout = 4,
    Stderr = 5,
}

fn token(kind: Kind, id: u64) -> Token {
    Token(((id as usize) << 3) | kind as usize)
}

fn untoken(t: Token) -> (Kind, u64) {
    let kind = match t.0 & 7 {
        1 => Kind::Client,
        2 => Kind::Results,
        3 => Kind::Jobs,
        4 => Kind::Stdout,
        5 => Kind::Stderr,
        _ => Kind::Special,
    };
    (kind, (t.0 >> 3) as u64)
}

/// Longest worker output line logged as is; longer ones are cut.
const MAX_LOG_LINE: usize = 4096;
/// Bytes read from one worker output pipe per event (or backlog turn).
const OUTPUT_READ_BUDGET: usize = 256 << 10;

/// What the copier thread hands back (see [`crate::copier`]).
enum Copied {
    /// An input was written into a worker's arena (`ok`: in bounds), or
    /// could not be read from its payload file (`unreadable`: the job and
    /// why).
    ToArena {
        proc: ProcId,
        ok: bool,
        unreadable: Option<(u64, String)>,
    },
    /// An output was read out of a worker's arena into memory, or written
    /// from it straight to its payload file (`JobOutput::File`); `raised`:
    /// it is the detail of a `Raised` with this error.
    FromArena {
        proc: ProcId,
        id: u64,
        offset: u64,
        len: u64,
        output: JobOutput,
        raised: Option<String>,
    },
}

/// The store's payload files, as the loop reaches them.
#[derive(Clone)]
struct PayloadFiles {
    dir: Arc<crate::private_dir::PrivateDir>,
    spares: crate::store::Spares,
}

/// The daemon's ends of one worker's channels.
struct WorkerIo {
    pid: u32,
    pool: String,
    slot: u32,
    jobs: Option<OwnedFd>,
    jobs_out: Vec<u8>,
    jobs_written: usize,
    jobs_writable_armed: bool,
    results: Option<OwnedFd>,
    decoder: FrameDecoder,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    stdout_line: Vec<u8>,
    stderr_line: Vec<u8>,
    /// Rate limit of its output lines (stdout and stderr together).
    limiter: crate::log::OutputLimiter,
    /// Its last output lines, for the crash text of a death before `Ready`.
    tail: crate::log::OutputTail,
    /// The shared-memory arena; kept open for the worker's lifetime.
    _arena: OwnedFd,
    /// The daemon's mapping of it (`None` if mapping failed: inline only);
    /// shared with the copier thread while it copies a slot.
    mapping: Option<Arc<crate::shm::Mapping>>,
    /// Offsets in `jobs_out` of `Job` frames whose input the copier is
    /// still writing into the arena: nothing from the first one on is
    /// written to the pipe yet (frames keep their order).
    hold_out: std::collections::VecDeque<usize>,
    /// Descriptors to attach to `jobs_out` (worker protocol 2), in order:
    /// each at the offset of the frame that carries them.
    fds_out: std::collections::VecDeque<(usize, Vec<Arc<std::fs::File>>)>,
    /// Outputs the copier is reading out of the arena; while any is, the
    /// worker's later messages wait in `held_in`.
    copies_in: usize,
    /// Messages from the worker received behind a pending output copy.
    held_in: std::collections::VecDeque<FromWorker>,
    /// End of its result stream (EOF, or a protocol error) seen behind a
    /// pending output copy.
    held_end: Option<Option<String>>,
    /// The worker died while `copies_in > 0`: its death, handled after them.
    exit: Option<ExitInfo>,
    /// Its split into input and output halves.
    layout: ipc_proto::arena::ArenaLayout,
    /// The exec-status pipe, until the exec is known to have worked.
    exec_status: Option<OwnedFd>,
    /// Why the worker could not be started, if it could not.
    exec_error: Option<(String, bool)>,
    program: PathBuf,
}

/// The daemon: event loop plus the core it drives.
pub struct Reactor {
    poll: Poll,
    signals: Signals,
    listener: mio::net::UnixListener,
    socket_path: PathBuf,
    /// The listener came from systemd (`LISTEN_FDS`): its path is not ours
    /// to unlink.
    socket_activated: bool,
    /// Worker output pipes left unread at the read budget: (worker, stderr?).
    output_backlog: HashSet<(ProcId, bool)>,
    /// Workers whose output is being suppressed by their rate limit.
    suppressing: HashSet<ProcId>,
    clients: HashMap<u64, Client>,
    next_client: u64,
    /// Open control connections per uid (for `max_connections_per_user`).
    conns_per_uid: HashMap<u32, u32>,
    /// Greeting deadlines of new connections, in accept order (all the
    /// same length, so the front is the earliest).
    greeting_deadlines: std::collections::VecDeque<(Instant, u64)>,
    /// Descriptor inputs examined off the loop (see `clients::FdInput`).
    fd_inputs: (
        std::sync::mpsc::Sender<clients::FdInput>,
        std::sync::mpsc::Receiver<clients::FdInput>,
    ),
    /// Wakes the loop (from the store, copier and input threads).
    waker: Arc<mio::Waker>,
    /// A cgroup per worker, where the daemon's cgroup is delegated to it
    /// (see `crate::cgroup`), and each live worker's cgroup.
    cgroups: Option<crate::cgroup::WorkerCgroups>,
    proc_cgroups: HashMap<ProcId, PathBuf>,
    /// The daemon's descriptor limit (`RLIMIT_NOFILE`, raised to its hard
    /// limit at start).
    fd_limit: usize,
    procs: HashMap<ProcId, WorkerIo>,
    pids: HashMap<u32, ProcId>,
    core: Supervisor,
    config: Config,
    notifier: Notifier,
    ready_sent: bool,
    exiting: bool,
    terms: u32,
    store: Option<Store>,
    /// Big copies, off the loop.
    copier: crate::copier::Copier<Copied>,
    /// The store's payload directory, open (shared with the store; as
    /// opened: a reload does not move it), and its spare files, for
    /// outputs written from arenas; `None` for a store without payload
    /// files (PostgreSQL).
    files: Option<PayloadFiles>,
    /// Clients with output queued this turn.
    dirty_clients: HashSet<u64>,
    /// Workers with frames queued this turn.
    dirty_workers: HashSet<ProcId>,
    /// Clients streaming `events`.
    subscribers: HashSet<u64>,
    /// When the daemon started, seconds since the epoch (for metrics).
    started_at: f64,
    /// Recent worker output, and the clients following it.
    logs: logs::LogBook,
    /// Period of `WATCHDOG=1` pings (half of `WATCHDOG_USEC`), if asked for.
    watchdog: Option<std::time::Duration>,
    next_ping: Option<Instant>,
    /// `--lifeline`: the read end of a pipe held open by the process this
    /// daemon runs for; its end-of-file stops the daemon at once, and then
    /// `state_dir` is removed (see [`Reactor::set_lifeline`]).
    lifeline: Option<OwnedFd>,
}

impl Reactor {
    /// Sets everything up (binds the socket); does not spawn yet.
    pub fn new(config: Config) -> anyhow::Result<Reactor> {
        use anyhow::Context;
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        if rc != 0 {
            crate::warn!(
                "cannot become a child subreaper: {}",
                io::Error::last_os_error()
            );
        }
        let poll = Poll::new().context("epoll_create")?;
        let mut signals = Signals::new([SIGCHLD, SIGTERM, SIGINT, SIGHUP])
            .context("installing signal handlers")?;
        poll.registry()
            .register(&mut signals, TOKEN_SIGNALS, Interest::READABLE)?;
        // Before the store thread starts: this edits the environment.
        let control::ControlListener {
            mut listener,
            path: socket_path,
            activated: socket_activated,
            metrics,
        } = control::listen(&config.daemon.control_socket, config.daemon.socket_mode)?;
        let metrics = match (metrics, config.daemon.metrics_listen) {
            (Some(passed), configured) => {
                if let Some(addr) = configured {
                    crate::info!(
                        "using the metrics socket passed by the service manager; daemon.metrics_listen ({addr}) is not used"
                    );
                }
                Some(passed)
            }
            (None, Some(addr)) => Some(std::net::TcpListener::bind(addr).with_context(|| {
                format!("cannot listen on daemon.metrics_listen = \"{addr}\" (in use, or not an address of this host?)")
            })?),
            (None, None) => None,
        };
        if let Some(l) = metrics {
            crate::http::start(l, socket_path.clone())
                .context("starting the metrics listener's thread")?;
        }
        if socket_activated && socket_path != config.daemon.control_socket {
            crate::info!(
                "using the control socket passed by the service manager ({}); daemon.control_socket ({}) is not used",
                socket_path.display(),
                config.daemon.control_socket.display()
            );
        }
        poll.registry()
            .register(&mut listener, TOKEN_LISTENER, Interest::READABLE)?;
        let waker =
            Arc::new(mio::Waker::new(poll.registry(), TOKEN_WAKE).context("creating the waker")?);
        let copier = crate::copier::Copier::start(Arc::clone(&waker))
            .context("starting the copier thread")?;
        let opened = match &config.store.url {
            Some(_) => Store::open_postgres(&config.store, Arc::clone(&waker)),
            None => Store::open_with_payload_dir(
                &config.daemon.state_dir,
                &config.daemon.payload_dir(),
                Arc::clone(&waker),
            ),
        };
        let (store, recovered) = match opened {
            Ok(s) => s,
            Err(e) => {
                // We bound the socket a moment ago: leave nothing behind.
                if !socket_activated {
                    let _ = std::fs::remove_file(&socket_path);
                }
                return Err(anyhow::anyhow!("{e}"));
            }
        };
        let files = match store.spares() {
            Some(spares) => Some(PayloadFiles {
                dir: spares
                    .payload_dir()
                    .context("opening the payload directory")?,
                spares: spares.clone(),
            }),
            None => None,
        };
        let seed = std::process::id() as u64 ^ now_nanos();
        let now = Instant::now();
        let mut core = Supervisor::new(&config, seed, now, now_nanos() / 1_000_000);
        core.recover(recovered);
        Ok(Reactor {
            poll,
            signals,
            listener,
            socket_path,
            socket_activated,
            output_backlog: HashSet::default(),
            suppressing: HashSet::default(),
            clients: HashMap::default(),
            next_client: 1,
            conns_per_uid: HashMap::default(),
            greeting_deadlines: Default::default(),
            fd_limit: raise_fd_limit(),
            cgroups: crate::cgroup::WorkerCgroups::detect(),
            proc_cgroups: HashMap::default(),
            fd_inputs: std::sync::mpsc::channel(),
            waker,
            procs: HashMap::default(),
            pids: HashMap::default(),
            core,
            files,
            store: Some(store),
            copier,
            dirty_clients: HashSet::default(),
            dirty_workers: HashSet::default(),
            subscribers: HashSet::default(),
            started_at: now_nanos() as f64 / 1e9,
            logs: Default::default(),
            config,
            notifier: Notifier::from_env(),
            ready_sent: false,
            exiting: false,
            terms: 0,
            watchdog: watchdog_period(),
            next_ping: None,
            lifeline: None,
        })
    }

    /// Runs this daemon for one process (an embedded `jobvisor.Executor`):
    /// `fd` is one end of a Unix stream socket pair whose other end only
    /// that process holds. The daemon writes `listening\n` on it once its
    /// control socket accepts connections, and `ready\n` once every worker
    /// has started (when it would send systemd `READY=1`). When the other end closes (the
    /// process exited, or was `kill -9`ed), the daemon stops at once (as a
    /// second SIGTERM would), and on exit it removes its `state_dir` with
    /// everything in it: the jobs belonged to a process that is gone.
    pub fn set_lifeline(&mut self, fd: OwnedFd) -> anyhow::Result<()> {
        self.poll.registry().register(
            &mut SourceFd(&fd.as_raw_fd()),
            TOKEN_LIFELINE,
            Interest::READABLE,
        )?;
        self.lifeline = Some(fd);
        Ok(())
    }

    /// The lifeline is readable: end-of-file (or a stray byte, which only
    /// its owner could have written; treated the same).
    fn on_lifeline(&mut self) {
        let Some(fd) = self.lifeline.as_ref() else {
            return;
        };
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&fd.as_raw_fd()));
        crate::info!(
            "the process this daemon runs for is gone (--lifeline closed): stopping at once"
        );
        self.begin_shutdown(true);
    }

    /// Runs until shutdown completes.
    pub fn run(mut self) -> anyhow::Result<()> {
        crate::info!(
            "jobvisord {} started (pid {}), control socket {}, {} pools",
            env!("CARGO_PKG_VERSION"),
            std::process::id(),
            self.socket_path.display(),
            self.config.pools.len()
        );
        if let Some(c) = &self.cgroups {
            crate::info!(
                "workers run in cgroups of their own under {} (delegated)",
                c.dir().display()
            );
        }
        if let Some(fd) = &self.lifeline {
            // The control socket is listening (bound in `new`): the process
            // we run for may connect now. A full buffer or a closed peer
            // is not an error here; the closed peer is seen by the loop.
            let _ = nix::sys::socket::send(
                fd.as_raw_fd(),
                b"listening\n",
                nix::sys::socket::MsgFlags::MSG_DONTWAIT | nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            );
        }
        self.core.start(Instant::now());
        self.run_actions();
        let mut events = Events::with_capacity(256);
        self.next_ping = self.watchdog.map(|p| Instant::now() + p);
        // With no pools, startup is settled already: say READY=1 now rather
        // than on the first event, which may never come.
        self.after_turn();
        while !self.exiting {
            let timeout = if self.output_backlog.is_empty() {
                let deadline = [
                    self.core.next_deadline(),
                    self.next_ping,
                    self.notifier.status_deadline(),
                    self.suppression_deadline(),
                    self.greeting_deadline(),
                ]
                .into_iter()
                .flatten()
                .min();
                deadline.map(|d| d.saturating_duration_since(Instant::now()))
            } else {
                Some(std::time::Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            for ev in events.iter() {
                self.dispatch(
                    ev.token(),
                    ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                    ev.is_writable(),
                );
            }
            self.drain_output_backlog();
            let now = Instant::now();
            self.expire_greetings(now);
            // The core's timers run only when one is due: most turns are
            // woken by I/O, and `on_timer` walks every pool and worker.
            let core_due = self.core.next_deadline().is_some_and(|d| d <= now);
            // Turns woken only by our own timers (watchdog, status,
            // backlog) change nothing the status line shows.
            if !events.is_empty() || core_due {
                self.notifier.status_changed();
            }
            if core_due {
                self.core.on_timer(now);
                self.run_actions();
            }
            self.core.pump(now);
            self.run_actions();
            self.flush_dirty();
            self.after_turn();
        }
        // Every worker is gone: so is anything they left behind.
        crate::orphans::kill_all_and_reap();
        if let Some(c) = self.cgroups.as_mut() {
            c.sweep();
        }
        // Event and log streams end cleanly.
        self.deliver_log_lines();
        let subs: Vec<u64> = self
            .subscribers
            .iter()
            .copied()
            .chain(self.logs.followers())
            .collect();
        for id in subs {
            self.reply(id, &Response::End);
        }
        // Commit what is queued, then answer the clients waiting on it.
        if let Some(store) = self.store.take() {
            let pending: Vec<Completion> = std::iter::from_fn(|| store.try_completion()).collect();
            if let Err(e) = store.close() {
                crate::error!("closing the job store: {e}");
            }
            for c in pending {
                self.on_completion(c);
            }
            self.run_actions();
        }
        // Best effort: deliver the last responses (e.g. to `shutdown`).
        self.flush_dirty();
        for c in self.clients.values_mut() {
            let _ = c.flush();
        }
        if !self.socket_activated {
            let _ = std::fs::remove_file(&self.socket_path);
        }
        self.notifier.stopping();
        if self.lifeline.is_some() {
            // `remove_dir_all` does not follow links (it works through
            // directory descriptors).
            if let Err(e) = std::fs::remove_dir_all(&self.config.daemon.state_dir) {
                crate::warn!(
                    "removing {} (--lifeline): {e}",
                    self.config.daemon.state_dir.display()
                );
            }
        }
        crate::info!("jobvisord stopped");
        Ok(())
    }

    fn after_turn(&mut self) {
        // The watchdog is fed from the loop itself, so a stuck loop stops
        // the pings and systemd notices.
        if let (Some(period), Some(at)) = (self.watchdog, self.next_ping) {
            let now = Instant::now();
            if now >= at {
                self.notifier.notify("WATCHDOG=1");
                self.next_ping = Some(now + period);
            }
        }
        let now = Instant::now();
        if !self.ready_sent && self.core.startup_settled() {
            self.ready_sent = true;
            if let Some(fd) = &self.lifeline {
                // Every worker has started (or its pool has failed).
                let _ = nix::sys::socket::send(
                    fd.as_raw_fd(),
                    b"ready\n",
                    nix::sys::socket::MsgFlags::MSG_DONTWAIT
                        | nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                );
            }
            if self.notifier.active() {
                let status = crate::notify::summary(&self.core, now);
                self.notifier.ready(status, now);
            }
        }
        let core = &self.core;
        self.notifier
            .poll_status(now, || crate::notify::summary(core, now));
        // Workers that went quiet while suppressed get their record now.
        if !self.suppressing.is_empty() {
            let procs: Vec<ProcId> = self.suppressing.iter().copied().collect();
            for proc in procs {
                let Some(w) = self.procs.get_mut(&proc) else {
                    self.suppressing.remove(&proc);
                    continue;
                };
                if let Some(n) = w.limiter.expire(now) {
                    log_suppressed(&w.pool, w.slot, n);
                }
                if w.limiter.resume_at().is_none() {
                    self.suppressing.remove(&proc);
                }
            }
        }
    }

    fn dispatch(&mut self, tok: Token, readable: bool, writable: bool) {
        match tok {
            TOKEN_SIGNALS => self.on_signals(),
            TOKEN_LISTENER => self.accept(),
            TOKEN_LIFELINE => self.on_lifeline(),
            TOKEN_WAKE => {
                self.on_store();
                self.on_copier();
                self.on_fd_inputs();
            }
            _ => {
                let (kind, id) = untoken(tok);
                match kind {
                    Kind::Client => self.on_client(id, readable, writable),
                    Kind::Results => self.on_results(id),
                    Kind::Jobs => self.flush_jobs(id),
                    Kind::Stdout => self.on_output(id, false),
                    Kind::Stderr => self.on_output(id, true),
                    Kind::Special => {}
                }
            }
        }
    }

    // ---- signals and reaping ----

    fn on_signals(&mut self) {
        // Drain the self-pipe first, then act: a signal arriving while we
        // act re-arms the pipe and is seen on the next turn.
        let pending: Vec<i32> = self.signals.pending().collect();
        let mut chld = false;
        for sig in pending {
            match sig {
                SIGCHLD => chld = true,
                SIGTERM | SIGINT => {
                    self.terms += 1;
                    let now = self.terms > 1;
                    crate::info!(
                        "received {}, {}",
                        if sig == SIGTERM { "SIGTERM" } else { "SIGINT" },
                        if now {
                            "stopping at once"
                        } else {
                            "shutting down (send it again to stop at once)"
                        }
                    );
                    self.begin_shutdown(now);
                }
                SIGHUP => {
                    crate::info!("SIGHUP: reloading the configuration");
                    // `reload` logs the outcome (once), as for `jobvisorctl reload`.
                    let _ = self.reload();
                }
                _ => {}
            }
        }
        if chld {
            self.reap();
        }
    }

    fn begin_shutdown(&mut self, immediate: bool) {
        self.notifier.stopping();
        self.core.shutdown(immediate, Instant::now());
    }

    // ---- actions ----

    fn run_actions(&mut self) {
        // For a cluster's node list (an atomic store: no cost to speak of).
        if let Some(s) = &self.store {
            s.set_workers(self.procs.len());
        }
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Spawn {
                    proc,
                    pool,
                    slot,
                    config,
                } => {
                    let cgroup = self.cgroups.as_mut().and_then(|c| {
                        c.create(&pool, slot)
                            .inspect_err(|e| {
                                crate::warn!("pool {pool} worker {slot}: no cgroup of its own: {e}")
                            })
                            .ok()
                    });
                    match spawn::spawn_worker(&pool, slot, &config, cgroup.as_ref().map(|c| &c.1)) {
                        Ok(sp) => {
                            if let Some((path, _)) = cgroup {
                                self.proc_cgroups.insert(proc, path);
                            }
                            self.register_worker(proc, &pool, slot, sp);
                        }
                        Err(e) => {
                            if let Some((path, _)) = cgroup {
                                let _ = std::fs::remove_dir(path);
                            }
                            self.core.on_spawn_failed(proc, e, Instant::now())
                        }
                    }
                }
                Action::Signal { proc, signal } => {
                    if let Some(w) = self.procs.get(&proc) {
                        if let Err(e) = killpg(Pid::from_raw(w.pid as i32), signal) {
                            if e != nix::errno::Errno::ESRCH {
                                crate::warn!("kill -{signal} -{}: {e}", w.pid);
                            }
                        }
                    }
                }
                Action::Send { proc, msg } => self.send(proc, &msg),
                Action::SendFds { proc, msg, fds } => self.send_fds(proc, &msg, fds),
                Action::Log { level, msg } => crate::log::log(level, &msg),
                Action::Exit => self.exiting = true,
                Action::Store(op) => {
                    if let Some(store) = &mut self.store {
                        store.submit(op);
                    }
                }
                Action::Reply { client, mut resp } => {
                    // A status the core answered after a store query.
                    if let Response::Status(report) = &mut resp {
                        for p in &mut report.pools {
                            clients::fill_rss(&mut p.workers);
                        }
                    }
                    self.reply(client, &resp)
                }
                Action::ReplyJob {
                    client,
                    doc,
                    output,
                } => self.reply_job(client, doc, output),
                Action::Event(ev, owner) => {
                    let resp = Response::Event(ev);
                    let subs: Vec<u64> = self.subscribers.iter().copied().collect();
                    for id in subs {
                        let sees = self
                            .clients
                            .get(&id)
                            .is_some_and(|c| owner.is_none_or(|o| c.admin || c.peer.uid == o));
                        if !sees {
                            continue;
                        }
                        let behind = self
                            .clients
                            .get(&id)
                            .is_some_and(|c| c.pending_output() > EVENTS_BACKLOG_LIMIT);
                        if behind {
                            crate::warn!("events client {id} is too far behind; disconnecting it");
                            self.drop_client(id);
                            continue;
                        }
                        self.reply(id, &resp);
                    }
                }
                Action::WriteArena { proc, offset, data } => self.write_arena(proc, offset, data),
                Action::WriteArenaFromFile {
                    proc,
                    offset,
                    job,
                    len,
                    source,
                } => self.write_arena_from_file(proc, offset, job, len, source),
                Action::MeasureRss { proc } => {
                    if let Some(w) = self.procs.get(&proc) {
                        let rss = rss_bytes(w.pid);
                        self.core.on_rss(proc, rss, Instant::now());
                    }
                }
            }
        }
    }

    /// Writes everything queued this turn: one write per worker and per
    /// client, however many frames each got.
    fn flush_dirty(&mut self) {
        self.deliver_log_lines();
        let workers: Vec<ProcId> = self.dirty_workers.drain().collect();
        for proc in workers {
            self.flush_jobs(proc);
        }
        let clients: Vec<u64> = self.dirty_clients.drain().collect();
        for id in clients {
            self.on_client(id, false, true);
        }
    }

    fn on_store(&mut self) {
        while let Some(c) = self.store.as_ref().and_then(|s| s.try_completion()) {
            self.on_completion(c);
        }
    }

    fn on_completion(&mut self, c: Completion) {
        let now = Instant::now();
        match c {
            Completion::Durable { upto } => self.core.on_durable(upto),
            Completion::Failed {
                upto,
                lost_inserts,
                error,
            } => self.core.on_store_failed(upto, &lost_inserts, &error, now),
            Completion::Query { token, result } => self.core.on_query_result(token, result),
            Completion::InsertsFailed { failed } => self.core.on_inserts_failed(failed),
            Completion::Claimed { pool, jobs } => self.core.on_claimed(pool, jobs),
            Completion::RemoteDone { ids } => self.core.on_remote_done(ids),
            Completion::Fenced { ids } => self.core.on_fenced(ids),
            Completion::CancelRequested { ids } => self.core.on_remote_cancel(ids, Instant::now()),
            Completion::Ids { start, end } => self.core.on_ids(start, end),
        }
    }

    // ---- worker input ----

    /// Re-reads the config file and applies it; a bad file changes nothing.
    ///
    /// systemd hears `RELOADING=1` before and `READY=1` after, whatever the
    /// outcome: a rejected config still leaves the daemon ready.
    fn reload(&mut self) -> Result<String, (ErrorKind, String)> {
        self.notifier
            .notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
        let result = self.apply_new_config();
        if let Err((_, msg)) = &result {
            // At warn, so that `journalctl -p warning` shows a refused reload
            // (a successful one is logged at info by `apply_new_config`).
            crate::warn!("reload: {msg}");
        }
        self.notifier.notify("READY=1");
        self.notifier.status_changed();
        result
    }

    fn apply_new_config(&mut self) -> Result<String, (ErrorKind, String)> {
        let path = self.config.path.clone();
        let new = config::load(&path).map_err(|e| {
            (
                ErrorKind::Invalid,
                format!("new configuration rejected, old configuration kept: {e}"),
            )
        })?;
        let mut msg = self
            .core
            .reload(&new, Instant::now())
            .map_err(CtlError::parts)?;
        if new.daemon.control_socket != self.config.daemon.control_socket
            || new.daemon.state_dir != self.config.daemon.state_dir
            || new.daemon.payload_dir() != self.config.daemon.payload_dir()
            || new.store != self.config.store
        {
            msg.push_str("; daemon.control_socket/state_dir/payload_dir and [store] changes take effect after a restart of jobvisord");
        }
        self.logs.retain_pools(|name| new.pools.contains_key(name));
        self.config = new;
        crate::info!("{msg}");
        Ok(msg)
    }
}

/// Raises the soft descriptor limit to the hard one (as systemd advises
/// daemons to do) and returns it; control connections are capped below it
/// so that they can never starve a worker's spawn.
fn raise_fd_limit() -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard as usize
            } else {
                soft as usize
            }
        }
        Err(_) => 1024,
    }
}

/// Half of `$WATCHDOG_USEC` when the watchdog is meant for this process
/// (`$WATCHDOG_PID` absent or ours).
fn watchdog_period() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| std::time::Duration::from_micros(usec / 2))
}

fn ok_or_error(r: Result<String, CtlError>) -> Response {
    match r {
        Ok(message) => Response::Ok { message },
        Err(e) => e.into_response(),
    }
}

/// Resident set size of `pid` from `/proc/PID/statm` (0 if unreadable).
pub fn rss_bytes(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/statm")) else {
        return 0;
    };
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(4096) as u64
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
        .unwrap_or(0)
}
