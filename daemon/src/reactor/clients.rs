//! Control clients: accepting connections (with their caps), reading
//! requests one at a time within each client's limits, authorization, and
//! answering.

use super::*;
use crate::control::{Next, Peer};

/// Connections beyond `max_connections` that admins may still open.
const ADMIN_RESERVED_CONNECTIONS: usize = 4;
/// Descriptors kept for the daemon's own files (store, copier, epoll,
/// signals, logs, a spawn's pipes).
const FD_RESERVE_BASE: usize = 64;
/// Descriptors kept per worker (pipes, arena, status pipe, and the dozen a
/// spawn holds for a moment).
const FD_RESERVE_PER_WORKER: usize = 16;
/// Requests of one client the core may be working on at once (store
/// queries, `wait` groups) before its further requests wait.
const MAX_OUTSTANDING: usize = 16;
/// Most jobs one `jobs` listing returns (a client asking for more gets
/// this many: each is a document in memory until it is sent).
const MAX_LIST_LIMIT: u32 = 100_000;

/// A `SubmitFd`'s input, examined off the loop ([`Reactor::submit_fd`]).
pub(super) struct FdInput {
    client: u64,
    pool: String,
    options: ipc_proto::control::JobOptions,
    wait: bool,
    extra: crate::supervisor::SubmitExtra,
    input: Result<crate::supervisor::SubmitInput, String>,
}

/// Checks a client's input descriptor: a small input is read into memory
/// (under a mebibyte); a large one is never read: the store copies the file
/// into the job's payload file in the kernel, and a worker's arena is
/// filled from it (see `SubmitInput::Source`).
fn prepare_fd_input(
    fd: OwnedFd,
    len: u64,
    extra: &mut crate::supervisor::SubmitExtra,
    read_all: bool,
) -> Result<crate::supervisor::SubmitInput, String> {
    extra.input_shareable = crate::fdpass::shareable_for_reading(&fd);
    // A store without payload files (PostgreSQL) keeps inputs in its rows:
    // the daemon holds the bytes, not the client's file.
    if read_all || len < crate::store::FILE_PAYLOAD_MIN as u64 {
        return crate::fdpass::read_payload(fd, len, "input").map(Into::into);
    }
    let (file, _) = crate::fdpass::payload_file(fd, len, "input")?;
    Ok(crate::store::InputSource {
        file: Arc::new(file),
        len,
    }
    .into())
}

/// The supplementary groups of the peer of `stream` (`SO_PEERGROUPS`), or
/// none if the kernel cannot tell.
fn peer_groups(stream: &mio::net::UnixStream) -> Vec<u32> {
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut len = std::mem::size_of_val(groups.as_slice()) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `groups`, which
    // has that many, and updates `len` to what it wrote.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Vec::new();
    }
    groups.truncate(len as usize / std::mem::size_of::<libc::gid_t>());
    groups
}

/// Fills in the RSS of the workers that have a process.
pub(super) fn fill_rss(workers: &mut [ipc_proto::control::WorkerStatus]) {
    for w in workers {
        if let Some(pid) = w.pid {
            w.rss_bytes = rss_bytes(pid);
        }
    }
}

impl Reactor {
    /// The Prometheus text of the daemon's figures now.
    pub(super) fn metrics_text(&self, now: Instant) -> String {
        let mut core = self.core.metrics(now);
        for p in &mut core.pools {
            fill_rss(&mut p.status.workers);
        }
        crate::metrics::render(crate::metrics::Scrape {
            core,
            commit: self
                .store
                .as_ref()
                .map(|s| s.commit_latency())
                .unwrap_or_default(),
            daemon_rss: rss_bytes(std::process::id()),
            start_time: self.started_at,
        })
    }

    pub(super) fn reply(&mut self, client: u64, resp: &Response) {
        if let Some(c) = self.clients.get_mut(&client) {
            c.send(resp);
            self.dirty_clients.insert(client);
        }
    }

    pub(super) fn drop_client(&mut self, id: u64) {
        if let Some(mut c) = self.clients.remove(&id) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            if let Some(n) = self.conns_per_uid.get_mut(&c.peer.uid) {
                *n -= 1;
                if *n == 0 {
                    self.conns_per_uid.remove(&c.peer.uid);
                }
            }
        }
        self.dirty_clients.remove(&id);
        self.logs.unfollow(id);
        self.core.on_client_gone(id);
        if self.subscribers.remove(&id) && self.subscribers.is_empty() {
            self.core.set_events_wanted(false);
        }
    }

    pub(super) fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends (the caps below keep clients well
                    // under the descriptor limit, so this is someone
                    // else's doing): log and carry on; the listener stays
                    // registered and we retry on the next event.
                    crate::warn!("accept on the control socket: {e}");
                    return;
                }
            }
        }
    }

    /// A new connection: identified, checked against the caps, watched,
    /// given its greeting deadline.
    fn admit(&mut self, mut stream: mio::net::UnixStream) {
        let peer = match Peer::of(&stream) {
            Ok(p) => p,
            Err(e) => {
                crate::log::log(
                    Level::Debug,
                    &format!("control client without credentials ({e}); closing"),
                );
                return;
            }
        };
        let admin = self.is_admin(&peer, &stream);
        if let Some(why) = self.over_connection_cap(&peer, admin) {
            crate::log::log(
                Level::Debug,
                // Plain uids here: a user name would be an NSS lookup
                // (files, LDAP…) on the loop, per refused connection.
                &format!(
                    "control connection of uid {} (pid {}) refused: {why}",
                    peer.uid, peer.pid
                ),
            );
            // Best effort, never blocking: the refusal is one small frame
            // into an empty socket buffer.
            let mut frame = Vec::new();
            let resp = Response::Error {
                kind: ErrorKind::Rejected,
                message: why,
            };
            if encode_frame(&resp, &mut frame).is_ok() {
                let _ = io::Write::write(&mut stream, &frame);
            }
            return;
        }
        let id = self.next_client;
        self.next_client += 1;
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut stream, token(Kind::Client, id), Interest::READABLE)
        {
            crate::warn!("cannot watch a control client: {e}");
            return;
        }
        *self.conns_per_uid.entry(peer.uid).or_insert(0) += 1;
        self.core.set_viewer(
            id,
            crate::supervisor::Viewer {
                uid: peer.uid,
                admin,
            },
        );
        self.clients.insert(id, Client::new(stream, peer, admin));
        self.greeting_deadlines
            .push_back((Instant::now() + control::GREETING_TIMEOUT, id));
    }

    /// Root, the daemon's own uid, and members of `admin_group`.
    fn is_admin(&self, peer: &Peer, stream: &mio::net::UnixStream) -> bool {
        if peer.uid == 0 || peer.uid == nix::unistd::geteuid().as_raw() {
            return true;
        }
        let Some((_, gid)) = &self.config.daemon.admin_group else {
            return false;
        };
        peer.gid == *gid || peer_groups(stream).contains(gid)
    }

    /// Why a connection from `peer` is refused, if it is: over
    /// `max_connections` (admins have a few more, so an operator can always
    /// get in), over `max_connections_per_user` (admins are not limited per
    /// user), or over what the descriptor limit leaves after the workers'
    /// share (so that clients can never make a respawn fail).
    fn over_connection_cap(&self, peer: &Peer, admin: bool) -> Option<String> {
        let d = &self.config.daemon;
        let open = self.clients.len();
        let fd_room = self.fd_room_for_clients();
        let total = (d.max_connections as usize).min(fd_room);
        let reserve = if admin { ADMIN_RESERVED_CONNECTIONS } else { 0 };
        if open >= total + reserve {
            return Some(if fd_room < d.max_connections as usize {
                format!(
                    "jobvisord has {open} control connections open, all that its descriptor limit leaves after the workers' share; close idle connections or raise LimitNOFILE= of jobvisord"
                )
            } else {
                format!(
                    "jobvisord has {open} control connections open, its limit (daemon.max_connections = {}); close idle connections or raise max_connections",
                    d.max_connections
                )
            });
        }
        let mine = self.conns_per_uid.get(&peer.uid).copied().unwrap_or(0);
        if !admin && mine >= d.max_connections_per_user {
            return Some(format!(
                "uid {} has {mine} control connections open, the limit per user (daemon.max_connections_per_user = {}); close some and retry",
                peer.uid, d.max_connections_per_user
            ));
        }
        None
    }

    /// Descriptors the daemon may give to control clients: its limit less
    /// a reserve for its own files and for every worker (each holds about
    /// six, and a spawn briefly a dozen more).
    fn fd_room_for_clients(&self) -> usize {
        let workers = self
            .config
            .pools
            .values()
            .map(|p| p.workers as usize)
            .sum::<usize>()
            .max(self.procs.len());
        let reserve = FD_RESERVE_BASE + FD_RESERVE_PER_WORKER * workers;
        self.fd_limit.saturating_sub(reserve)
    }

    /// Drops connections that did not say `Hello` in time.
    pub(super) fn expire_greetings(&mut self, now: Instant) {
        while self.greeting_deadline().is_some_and(|at| at <= now) {
            let (_, id) = self.greeting_deadlines.pop_front().expect("just seen");
            crate::log::log(
                Level::Debug,
                &format!(
                    "control client {id}: no Hello within {:?}; closing",
                    control::GREETING_TIMEOUT
                ),
            );
            self.drop_client(id);
        }
    }

    /// The earliest greeting deadline of a connection still waiting for its
    /// `Hello`, for the poll timeout. Entries of connections that greeted
    /// or left go first, so they cost no wakeup.
    pub(super) fn greeting_deadline(&mut self) -> Option<Instant> {
        while let Some(&(at, id)) = self.greeting_deadlines.front() {
            if self.clients.get(&id).is_some_and(|c| !c.greeted) {
                return Some(at);
            }
            self.greeting_deadlines.pop_front();
        }
        None
    }

    /// A client's socket is ready, or it has replies queued, or it was
    /// paused: write what is queued, then serve its requests while it is
    /// within its limits.
    pub(super) fn on_client(&mut self, id: u64, readable: bool, _writable: bool) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        match c.flush() {
            Ok(true) if c.closing => return self.drop_client(id),
            Ok(_) => {}
            Err(_) => return self.drop_client(id),
        }
        // A paused client gets no readable edge for what it sent meanwhile
        // (the poll is edge-triggered): serve it once it is below its
        // limits again.
        if readable || c.paused {
            if let Err(why) = self.serve(id) {
                if let Some(w) = why {
                    crate::log::log(
                        Level::Debug,
                        &format!("control client {id}: protocol error ({w}); closing"),
                    );
                }
                // The end of the client's stream ends its session
                // (jobvisorctl never half-closes): what it still waited for
                // is forgotten. Its last replies go out if they can.
                if let Some(c) = self.clients.get_mut(&id) {
                    let _ = c.flush();
                }
                return self.drop_client(id);
            }
        }
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        if c.closing && c.pending_output() == 0 {
            return self.drop_client(id);
        }
        let want_write = c.pending_output() > 0;
        if want_write != c.want_write || c.paused != c.paused_registered {
            c.want_write = want_write;
            c.paused_registered = c.paused;
            let interest = match (c.paused, want_write) {
                (true, _) => Interest::WRITABLE,
                (false, true) => Interest::READABLE | Interest::WRITABLE,
                (false, false) => Interest::READABLE,
            };
            let _ =
                self.poll
                    .registry()
                    .reregister(&mut c.stream, token(Kind::Client, id), interest);
        }
    }

    /// Takes requests one at a time while the client is within its limits:
    /// unsent output under [`CLIENT_OUTPUT_HIGH_WATER`], fewer than
    /// [`MAX_OUTSTANDING`] requests the core is still working on, and no
    /// descriptor input being read. Otherwise the client is paused: nothing more is read or answered for
    /// it until its replies go out. `Err` ends the connection (with the
    /// protocol error, if that was why).
    fn serve(&mut self, id: u64) -> Result<(), Option<String>> {
        loop {
            let backlog = self.core.client_backlog(id);
            let Some(c) = self.clients.get_mut(&id) else {
                return Ok(());
            };
            if c.closing {
                return Ok(());
            }
            c.paused = c.pending_output() > CLIENT_OUTPUT_HIGH_WATER
                || backlog >= MAX_OUTSTANDING
                || c.preparing_input;
            if c.paused {
                return Ok(());
            }
            match c.next_request() {
                Next::Request(Incoming { req, fd, buffer }) => {
                    self.handle_request(id, req, fd, buffer)
                }
                Next::WouldBlock => return Ok(()),
                Next::Closed => return Err(None),
                Next::Broken(e) => return Err(Some(e)),
            }
        }
    }

    /// A submit whose input came as a descriptor: refused before anything
    /// is read if it cannot fit. The descriptor is examined (and a small
    /// input read) on a thread of its own, never on the loop: it is the
    /// client's file, which may sit on a slow or hostile filesystem (FUSE,
    /// NFS) where even an `fstat` can hang. Until that thread answers, the
    /// client's later requests wait, so replies keep their order.
    #[allow(clippy::too_many_arguments)]
    fn submit_fd(
        &mut self,
        id: u64,
        pool: String,
        len: u64,
        options: ipc_proto::control::JobOptions,
        wait: bool,
        fd: OwnedFd,
        mut extra: crate::supervisor::SubmitExtra,
    ) {
        if let Err(e) = self.core.check_input_len(&pool, len) {
            return self.core.refuse_submit(id, e);
        }
        let tx = self.fd_inputs.0.clone();
        let waker = Arc::clone(&self.waker);
        let read_all = self.files.is_none();
        let spawned = std::thread::Builder::new()
            .name("jobvisor-input".into())
            .spawn(move || {
                let input = prepare_fd_input(fd, len, &mut extra, read_all);
                let _ = tx.send(FdInput {
                    client: id,
                    pool,
                    options,
                    wait,
                    extra,
                    input,
                });
                let _ = waker.wake();
            });
        match spawned {
            Ok(_) => {
                if let Some(c) = self.clients.get_mut(&id) {
                    c.preparing_input = true;
                }
            }
            Err(e) => self.core.refuse_submit(
                id,
                CtlError::Rejected(format!(
                    "submit: cannot start a thread to read the input ({e}); retry later"
                )),
            ),
        }
    }

    /// Descriptor inputs examined off the loop: submitted now (or refused),
    /// and their clients served again.
    pub(super) fn on_fd_inputs(&mut self) {
        while let Ok(r) = self.fd_inputs.1.try_recv() {
            let Some(c) = self.clients.get_mut(&r.client) else {
                continue; // gone before its submit was acknowledged
            };
            c.preparing_input = false;
            let now = Instant::now();
            match r.input {
                Ok(input) => self
                    .core
                    .submit_with(r.client, &r.pool, input, r.options, r.wait, r.extra, now),
                Err(e) => self
                    .core
                    .refuse_submit(r.client, CtlError::Invalid(format!("submit: {e}"))),
            }
            self.run_actions();
            self.on_client(r.client, false, false);
        }
    }

    /// One request (and, for a `SubmitFd`, its descriptor): `Hello` first,
    /// then anything.
    fn handle_request(
        &mut self,
        id: u64,
        req: Request,
        fd: Option<OwnedFd>,
        buffer: Option<OwnedFd>,
    ) {
        let greeted = self.clients.get(&id).is_some_and(|c| c.greeted);
        let resp = if !greeted {
            Some(match req {
                Request::Hello { protocol_version }
                    if protocol_version == ipc_proto::PROTOCOL_VERSION =>
                {
                    if let Some(c) = self.clients.get_mut(&id) {
                        c.greet();
                    }
                    Response::Hello {
                        protocol_version: ipc_proto::PROTOCOL_VERSION,
                        pid: std::process::id(),
                        version: env!("CARGO_PKG_VERSION").to_string(),
                    }
                }
                Request::Hello { protocol_version } => {
                    self.close_after(id);
                    Response::Error {
                        kind: ErrorKind::Invalid,
                        message: format!(
                            "protocol version mismatch: client {protocol_version}, daemon {}; use the jobvisorctl that matches this jobvisord",
                            ipc_proto::PROTOCOL_VERSION
                        ),
                    }
                }
                _ => {
                    self.close_after(id);
                    Response::Error {
                        kind: ErrorKind::Invalid,
                        message: "the first request must be Hello".into(),
                    }
                }
            })
        } else {
            let now = Instant::now();
            // Job requests are answered by the core (in order with the
            // durability of what they depend on); the rest right here.
            match req {
                Request::Submit {
                    pool,
                    input,
                    options,
                    wait,
                } => {
                    self.core.submit(id, &pool, input.0, options, wait, now);
                    None
                }
                Request::SubmitFd {
                    pool,
                    len,
                    options,
                    wait,
                } => {
                    // `control::Client` pairs every SubmitFd with its
                    // descriptor or drops the connection.
                    let fd = fd.expect("a SubmitFd comes with its descriptor");
                    let extra = Default::default();
                    self.submit_fd(id, pool, len, options, wait, fd, extra);
                    None
                }
                Request::SubmitWith {
                    pool,
                    input,
                    options,
                    wait,
                    payloads,
                    output_buffer: _,
                } => {
                    // The buffer is only checked here (`fcntl`s, which
                    // never wait on a filesystem).
                    let output_buffer = match buffer.map(|b| {
                        crate::fdpass::check_output_buffer(&b)
                            .map(|()| Arc::new(std::fs::File::from(b)))
                    }) {
                        Some(Err(e)) => {
                            self.core
                                .refuse_submit(id, CtlError::Invalid(format!("submit: {e}")));
                            self.run_actions();
                            return;
                        }
                        Some(Ok(b)) => Some(b),
                        None => None,
                    };
                    let extra = crate::supervisor::SubmitExtra {
                        payloads,
                        output_buffer,
                        input_shareable: false,
                    };
                    match input {
                        ipc_proto::control::SubmitPayload::Inline(bytes) => self
                            .core
                            .submit_with(id, &pool, bytes.0, options, wait, extra, now),
                        ipc_proto::control::SubmitPayload::Fd { len } => {
                            // `control::Client` pairs it with its descriptor.
                            let fd = fd.expect("a SubmitWith Fd comes with its descriptor");
                            self.submit_fd(id, pool, len, options, wait, fd, extra)
                        }
                    }
                    None
                }
                Request::Wait { ids } => {
                    self.core.wait_jobs(id, ids);
                    None
                }
                Request::Result { id: job } => {
                    self.core.result(id, job);
                    None
                }
                Request::Cancel { id: job } => {
                    self.core.cancel(id, job, now);
                    None
                }
                Request::Jobs {
                    pool,
                    state,
                    limit,
                    before,
                    since_ms,
                } => {
                    self.core.list_jobs(
                        id,
                        pool,
                        state,
                        limit.unwrap_or(1000).clamp(1, MAX_LIST_LIMIT),
                        before,
                        since_ms,
                    );
                    None
                }
                Request::Retry { id: job } => {
                    self.core.retry(id, job);
                    None
                }
                Request::Prune {
                    finished_before_ms,
                    state,
                    pool,
                    limit,
                } => {
                    self.core.prune(id, finished_before_ms, state, pool, limit);
                    None
                }
                Request::Nodes => {
                    self.core.nodes(id);
                    None
                }
                Request::StoreWarnings => {
                    self.core.store_warnings(id);
                    None
                }
                Request::Events => {
                    self.subscribers.insert(id);
                    self.core.set_events_wanted(true);
                    None
                }
                other => match self.refuse_non_admin(id, &other) {
                    Some(refusal) => Some(refusal),
                    None => self.handle_admin(id, other, now),
                },
            }
        };
        if let Some(resp) = resp {
            self.reply(id, &resp);
        }
        // Spawns for scale/restart/reload happen now, in this loop turn.
        self.run_actions();
    }

    /// Requests answered here rather than by the core (none of them waits
    /// on the store); `None` when the answer is sent already.
    fn handle_admin(&mut self, client: u64, req: Request, now: Instant) -> Option<Response> {
        {
            Some(match req {
                Request::Status { pool } if self.core.is_cluster() => {
                    // Its shared queue's counts come from the store.
                    self.core.status_of_cluster(client, pool, now);
                    return None;
                }
                Request::Status { pool } => match self.core.status(pool.as_deref(), now) {
                    Ok(mut report) => {
                        for p in &mut report.pools {
                            fill_rss(&mut p.workers);
                        }
                        Response::Status(report)
                    }
                    Err(e) => e.into_response(),
                },
                Request::Metrics => Response::Metrics {
                    text: self.metrics_text(now),
                },
                Request::Scale { pool, workers } => {
                    ok_or_error(self.core.scale(&pool, workers, now))
                }
                Request::Restart { pool } => ok_or_error(self.core.restart(&pool, now)),
                Request::Pause { pool } => ok_or_error(self.core.pause(&pool, true)),
                Request::Resume { pool } => ok_or_error(self.core.pause(&pool, false)),
                Request::Reload => match self.reload() {
                    Ok(message) => Response::Ok { message },
                    Err((kind, message)) => Response::Error { kind, message },
                },
                Request::Logs {
                    pool,
                    worker,
                    lines,
                    since_ms,
                    follow,
                } => {
                    self.logs_request(client, pool, worker, lines, since_ms, follow);
                    return None;
                }
                Request::Shutdown { now: immediate } => {
                    self.begin_shutdown(immediate);
                    Response::Ok {
                        message: if immediate {
                            "stopping at once".into()
                        } else {
                            "shutting down".into()
                        },
                    }
                }
                Request::Hello { .. } => Response::Error {
                    kind: ErrorKind::Invalid,
                    message: "Hello sent twice".into(),
                },
                _ => Response::Error {
                    kind: ErrorKind::Invalid,
                    message: "unexpected request".into(),
                },
            })
        }
    }

    /// The refusal of an admin command (scale, restart, pause, resume,
    /// reload, shutdown, logs) to a client that is not an admin; `status`
    /// is open to everyone.
    fn refuse_non_admin(&self, id: u64, req: &Request) -> Option<Response> {
        let what = match req {
            Request::Scale { .. } => "scale",
            Request::Restart { .. } => "restart",
            Request::Pause { .. } => "pause",
            Request::Resume { .. } => "resume",
            Request::Reload => "reload",
            Request::Shutdown { .. } => "shutdown",
            Request::Logs { .. } => "logs",
            _ => return None,
        };
        let c = self.clients.get(&id)?;
        if c.admin {
            return None;
        }
        let group = match &self.config.daemon.admin_group {
            Some((name, _)) => format!("a member of group {name} (daemon.admin_group)"),
            None => "a member of daemon.admin_group (not set)".to_string(),
        };
        Some(Response::Error {
            kind: ErrorKind::Invalid,
            message: format!(
                "{what} needs admin rights: run it as root, as uid {} (the daemon's user) or as {group}; you are uid {}",
                nix::unistd::geteuid(),
                c.peer.uid,
            ),
        })
    }

    fn close_after(&mut self, id: u64) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.closing = true;
        }
    }
}
