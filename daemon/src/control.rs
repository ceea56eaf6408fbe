//! The control socket: binding it safely or taking it over from systemd,
//! and the per-client connection state (frame decoder, output buffer) the
//! reactor drives.
//!
//! Binding never steals a live daemon's socket: an existing path is probed
//! with `connect`; only `ECONNREFUSED` (nobody listening: a stale socket
//! left by a dead daemon) lets us unlink and rebind. A path that exists but
//! is not a socket is refused, not deleted. The socket is created under a
//! restrictive umask and then set to `socket_mode`, so there is no window
//! where others could connect.
//!
//! # Socket activation
//! With `jobvisord.socket`, systemd owns the listening socket and passes it
//! as fd 3 (`LISTEN_FDS`, `LISTEN_PID`, optionally `LISTEN_FDNAMES`; see
//! `sd_listen_fds(3)`). The socket then outlives every daemon process, so a
//! restart never refuses a `jobvisorctl` call: connections made meanwhile
//! wait in the kernel's accept backlog and are served by the next daemon.
//! What [`listen`] guards against:
//! - **variables meant for someone else**: `LISTEN_PID` must be our pid (a
//!   parent that was itself socket-activated may leak them to us); either
//!   way the variables are removed from our environment, and the spawner
//!   scrubs them from workers' too, so no worker mistakes fd 3 (its job
//!   pipe) for a socket.
//! - **inheriting the fd into workers**: it is made `CLOEXEC` (as is every
//!   inherited fd, see `spawn::cloexec_inherited_fds`, which only sets that
//!   flag and never closes anything).
//! - **blocking accepts**: the passed socket may be blocking; it is made
//!   non-blocking before it joins the event loop.
//! - **the wrong fd**: it must be a listening `AF_UNIX` stream socket, else
//!   startup fails with a clear error instead of serving garbage.
//! - **unlinking systemd's path**: [`ControlListener::activated`] tells the
//!   reactor not to remove the socket file at exit; `socket_mode` and the
//!   configured path do not apply (the socket unit's `SocketMode=` and
//!   `ListenStream=` do).

use crate::fdpass;
use ipc_proto::control::{Request, Response, FD_PAYLOAD_MIN};
use ipc_proto::{decode, encode_frame, FrameDecoder};
use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Largest request a greeted client may send. Inputs of
/// [`FD_PAYLOAD_MIN`] bytes or more travel as descriptors, so a request
/// needs little more than that; a peer cannot make the daemon hold more
/// than this per connection for a request.
pub const MAX_REQUEST: usize = ipc_proto::control::MAX_REQUEST_LEN;

/// Largest request before `Hello` (which is a few bytes).
pub const MAX_GREETING: usize = 1024;

/// The written part of a client's output buffer is dropped once it is this
/// large (and half the buffer): see `Client::compact`.
const COMPACT_MIN: usize = 8 << 20;

/// Time a new connection has to send its `Hello`.
pub const GREETING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// First descriptor passed by the service manager (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;
/// More passed descriptors than this is taken as a corrupt `LISTEN_FDS`.
const LISTEN_FDS_MAX: RawFd = 1024;
/// `FileDescriptorName=` that picks our socket when several are passed.
pub const LISTEN_FD_NAME: &str = "control";
/// `FileDescriptorName=` of a TCP socket for the metrics listener.
pub const METRICS_FD_NAME: &str = "metrics";

/// The control listener and where it came from.
pub struct ControlListener {
    /// The listening socket, non-blocking and close-on-exec.
    pub listener: mio::net::UnixListener,
    /// Its path (for a passed socket: from `getsockname`, if it has one).
    pub path: PathBuf,
    /// Passed in by the service manager: the path is systemd's, not ours
    /// to unlink.
    pub activated: bool,
    /// A listening TCP socket named [`METRICS_FD_NAME`] passed by the
    /// service manager, for the metrics listener.
    pub metrics: Option<std::net::TcpListener>,
}

/// What the service manager passed: the control socket and the metrics
/// socket, each with the descriptor number it came as.
#[derive(Default)]
struct Passed {
    control: Option<(OwnedFd, RawFd)>,
    metrics: Option<(OwnedFd, RawFd)>,
}

/// The control listener: the one passed by the service manager if any
/// (see the module docs), else a fresh socket bound at `path` with
/// permissions `mode`.
///
/// Must run before the daemon starts any thread: it removes the
/// `LISTEN_*` variables from the process environment.
pub fn listen(path: &Path, mode: u32) -> anyhow::Result<ControlListener> {
    let passed = passed_sockets()?;
    let metrics = match passed.metrics {
        Some((fd, raw)) => Some(tcp_listener(fd, raw)?),
        None => None,
    };
    if let Some((fd, raw)) = passed.control {
        let mut l = control_listener(fd, raw)?;
        l.metrics = metrics;
        return Ok(l);
    }
    Ok(ControlListener {
        listener: bind(path, mode)?,
        path: path.to_path_buf(),
        activated: false,
        metrics,
    })
}

/// A passed metrics socket, checked to be a listening TCP socket.
fn tcp_listener(fd: OwnedFd, raw: RawFd) -> anyhow::Result<std::net::TcpListener> {
    use anyhow::Context;
    use nix::sys::socket::{
        getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
    };
    use std::os::fd::AsRawFd;
    let what = || format!("fd {raw} ({METRICS_FD_NAME:?}) passed by the service manager");
    let addr = getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .map_err(|e| anyhow::anyhow!("not a socket ({e})"))
        .with_context(what)?;
    if !matches!(
        addr.family(),
        Some(AddressFamily::Inet | AddressFamily::Inet6)
    ) {
        anyhow::bail!(
            "{}: not a TCP socket; use ListenStream=PORT or ADDRESS:PORT",
            what()
        );
    }
    if getsockopt(&fd, sockopt::SockType)? != SockType::Stream
        || !getsockopt(&fd, sockopt::AcceptConn)?
    {
        anyhow::bail!(
            "{}: not a listening stream socket (Accept=no is required)",
            what()
        );
    }
    Ok(std::net::TcpListener::from(fd))
}

/// Takes the sockets passed with `LISTEN_FDS`, if they are meant for us.
fn passed_sockets() -> anyhow::Result<Passed> {
    use anyhow::Context;
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // Single-threaded here (see `listen`), so this cannot race with a
        // concurrent `getenv`.
        std::env::remove_var(k);
    }
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(Passed::default());
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        crate::log::log(
            crate::supervisor::Level::Debug,
            &format!("ignoring LISTEN_FDS: LISTEN_PID={pid} is not our pid"),
        );
        return Ok(Passed::default());
    }
    let n: RawFd = count
        .trim()
        .parse()
        .ok()
        .filter(|n| (0..=LISTEN_FDS_MAX).contains(n))
        .with_context(|| format!("invalid LISTEN_FDS={count:?} from the service manager"))?;
    if n == 0 {
        return Ok(Passed::default());
    }
    let names: Vec<&str> = names
        .as_deref()
        .map_or(Vec::new(), |s| s.split(':').collect());
    let mut fds = Vec::new();
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + n {
        // SAFETY: fcntl(F_GETFD) on an integer only queries flags; it
        // tells whether the descriptor is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            anyhow::bail!("LISTEN_FDS={n} but fd {fd} is not open");
        }
        // SAFETY: by the sd_listen_fds protocol, fds 3..3+LISTEN_FDS are
        // handed to this process (LISTEN_PID checked above) and nothing in
        // it has claimed them: they were open before main, and the
        // variables are gone, so they are taken exactly once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        nix::fcntl::fcntl(
            &owned,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .with_context(|| format!("fcntl(FD_CLOEXEC) on passed fd {fd}"))?;
        fds.push(Some(owned));
    }
    let named = |name: &str| {
        names
            .iter()
            .position(|&n| n == name)
            .filter(|&i| i < fds.len())
    };
    let metrics = named(METRICS_FD_NAME);
    let control = match named(LISTEN_FD_NAME) {
        Some(i) => Some(i),
        // One unnamed socket is the control socket.
        None if fds.len() == 1 && metrics.is_none() => Some(0),
        // Only the metrics socket: the control socket is bound as usual.
        None if fds.len() == 1 => None,
        None => anyhow::bail!(
            "the service manager passed {} sockets and none is named {LISTEN_FD_NAME:?} (LISTEN_FDNAMES={:?}); set FileDescriptorName={LISTEN_FD_NAME} on the control socket",
            fds.len(),
            names.join(":")
        ),
    };
    let mut take =
        |i: Option<usize>| i.and_then(|i| Some((fds[i].take()?, LISTEN_FDS_START + i as RawFd)));
    let passed = Passed {
        control: take(control),
        metrics: take(metrics),
    };
    // The others are not ours to use; closing them is all we can do.
    drop(fds);
    Ok(passed)
}

/// The control listener from a passed socket, checked.
fn control_listener(fd: OwnedFd, raw: RawFd) -> anyhow::Result<ControlListener> {
    use anyhow::Context;
    check_listening_unix_stream(&fd)
        .with_context(|| format!("fd {raw} passed by the service manager"))?;
    let std_listener = std::os::unix::net::UnixListener::from(fd);
    std_listener
        .set_nonblocking(true)
        .with_context(|| format!("making passed fd {raw} non-blocking"))?;
    let path = std_listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from(format!("<fd {raw} from the service manager>")));
    Ok(ControlListener {
        listener: mio::net::UnixListener::from_std(std_listener),
        path,
        activated: true,
        metrics: None,
    })
}

fn check_listening_unix_stream(fd: &OwnedFd) -> anyhow::Result<()> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let addr = getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .map_err(|e| anyhow::anyhow!("not a socket ({e})"))?;
    if addr.as_unix_addr().is_none() {
        anyhow::bail!("not a Unix-domain socket; use ListenStream=/path in the socket unit");
    }
    if getsockopt(fd, sockopt::SockType)? != SockType::Stream {
        anyhow::bail!("not a stream socket; use ListenStream= in the socket unit");
    }
    if !getsockopt(fd, sockopt::AcceptConn)? {
        anyhow::bail!("not a listening socket (Accept=no is required)");
    }
    Ok(())
}

/// Binds the control socket at `path` with permissions `mode`.
pub fn bind(path: &Path, mode: u32) -> anyhow::Result<mio::net::UnixListener> {
    use anyhow::Context;
    socket_dir(path)?;
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                anyhow::bail!(
                    "control socket path {} exists and is not a socket; move it away or set daemon.control_socket",
                    path.display()
                );
            }
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => anyhow::bail!(
                    "control socket {} is in use by a running daemon; stop it first or set another daemon.control_socket",
                    path.display()
                ),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).with_context(|| {
                        format!("cannot remove stale control socket {}", path.display())
                    })?;
                    crate::info!("removed stale control socket {}", path.display());
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot probe existing control socket {}", path.display())
                    })
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot inspect {}", path.display()));
        }
    }
    // Create the socket owner-only, then widen to the configured mode.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let res = mio::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = res.with_context(|| format!("cannot bind control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod control socket {}", path.display()))?;
    Ok(listener)
}

/// Makes sure nobody else controls the directory the socket goes in, since
/// whoever can write there can put a fake daemon in its place (clients pass
/// it their files): the default directory of a non-root daemon
/// (`$XDG_RUNTIME_DIR/jobvisor`, `/tmp/jobvisor-$UID`) must be the user's
/// own and mode 0700, as tmux and ssh-agent demand; root's default
/// (`/run/jobvisor`) and a directory the daemon creates must be its own and
/// not writable by group or others (created 0755, so that the socket's group
/// can reach the socket, which `socket_mode` guards). An existing directory
/// named by `daemon.control_socket` is the operator's choice: refused only
/// if anyone may write to it without the sticky bit, with a warning if
/// anyone may create files in it at all.
fn socket_dir(path: &Path) -> anyhow::Result<()> {
    use crate::private_dir::{PrivateDir, Strictness};
    let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) else {
        return Ok(());
    };
    let default = crate::config::default_runtime_dir();
    let root = nix::unistd::geteuid().is_root();
    let what = "the control socket's directory";
    if dir == default && !root {
        PrivateDir::open_mode(dir, what, Some(0o700), Strictness::OwnerOnly)?;
        return Ok(());
    }
    match std::fs::metadata(dir) {
        Ok(m) if dir != default => {
            let mode = m.permissions().mode() & 0o7777;
            if mode & 0o002 != 0 && mode & 0o1000 == 0 {
                anyhow::bail!(
                    "refusing to put the control socket in {}: mode {mode:04o} lets anyone replace it (with a fake daemon that clients would send their files to); use a directory of its own, not writable by others",
                    dir.display()
                );
            }
            if mode & 0o022 != 0 {
                crate::warn!(
                    "the control socket's directory {} (mode {mode:04o}) lets other users create files: one could take the socket's name while jobvisord is stopped; prefer a directory of its own",
                    dir.display()
                );
            }
            Ok(())
        }
        _ => {
            PrivateDir::open_mode(dir, what, Some(0o755), Strictness::NoForeignWrite)?;
            Ok(())
        }
    }
}

/// One connected control client.
pub struct Client {
    /// The socket.
    pub stream: mio::net::UnixStream,
    decoder: FrameDecoder,
    out: Vec<u8>,
    /// Bytes of `out` already written.
    written: usize,
    /// Descriptors received and not yet claimed by a frame (see
    /// [`fdpass`]).
    fds_in: VecDeque<OwnedFd>,
    /// Descriptors to send, each with the offset in `out` of the first byte
    /// of its frame; in offset order.
    fds_out: VecDeque<(usize, OwnedFd)>,
    /// `Hello` received and accepted.
    pub greeted: bool,
    /// Close once `out` is flushed.
    pub closing: bool,
    /// Currently registered for writable events.
    pub want_write: bool,
    /// Not read from until its output drains and its outstanding
    /// requests are answered (backpressure).
    pub paused: bool,
    /// A `SubmitFd`'s descriptor is being examined off the loop: the
    /// client's next requests wait for it.
    pub preparing_input: bool,
    /// `paused` as the poll registration last reflected it.
    pub paused_registered: bool,
    /// Who is connected (`SO_PEERCRED` at accept).
    pub peer: Peer,
    /// May run admin commands and see every user's jobs.
    pub admin: bool,
    /// The stream ended: no more reads, requests still buffered are served.
    eof: bool,
}

/// A control client's credentials, as the kernel reported them at connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its process id (at connect time).
    pub pid: u32,
    /// Its effective uid.
    pub uid: u32,
    /// Its effective gid.
    pub gid: u32,
}

impl Peer {
    /// The credentials of the process at the other end of `stream`.
    pub fn of(stream: &impl std::os::fd::AsFd) -> io::Result<Peer> {
        let c = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)?;
        Ok(Peer {
            pid: c.pid().max(0) as u32,
            uid: c.uid(),
            gid: c.gid(),
        })
    }
}

/// One decoded request, with the descriptor that came with it (a
/// [`Request::SubmitFd`]'s input; `None` for every other request).
pub struct Incoming {
    pub req: Request,
    pub fd: Option<OwnedFd>,
    /// A `SubmitWith`'s output buffer.
    pub buffer: Option<OwnedFd>,
}

/// What [`Client::next_request`] found.
pub enum Next {
    /// One request.
    Request(Incoming),
    /// Nothing more until the socket is readable again.
    WouldBlock,
    /// The client hung up and every request it sent has been served.
    Closed,
    /// The client violated the protocol; drop it.
    Broken(String),
}

impl Client {
    /// Wraps an accepted stream from `peer`.
    pub fn new(stream: mio::net::UnixStream, peer: Peer, admin: bool) -> Client {
        Client {
            stream,
            decoder: FrameDecoder::new(MAX_GREETING),
            out: Vec::new(),
            written: 0,
            fds_in: VecDeque::new(),
            fds_out: VecDeque::new(),
            greeted: false,
            closing: false,
            want_write: false,
            paused: false,
            paused_registered: false,
            preparing_input: false,
            peer,
            admin,
            eof: false,
        }
    }

    /// `Hello` accepted: requests up to [`MAX_REQUEST`] from now on.
    pub fn greet(&mut self) {
        self.greeted = true;
        self.decoder.set_max_len(MAX_REQUEST);
    }

    /// The next request: decoded from what is buffered, or read from the
    /// socket when no whole frame is buffered. The caller takes one request
    /// at a time, so it can stop (and stop reading) while the client is
    /// over its limits; bytes are read only as far as a frame needs.
    pub fn next_request(&mut self) -> Next {
        loop {
            match self.decode_one() {
                Ok(Some(inc)) => return Next::Request(inc),
                Ok(None) => {}
                Err(e) => return Next::Broken(e),
            }
            if self.eof {
                return match self.decoder.finish() {
                    Ok(()) => Next::Closed,
                    Err(e) => Next::Broken(e.to_string()),
                };
            }
            match fdpass::recv(&self.stream, self.decoder.unfilled(), &mut self.fds_in) {
                Ok(0) => self.eof = true,
                Ok(n) => self.decoder.filled(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Next::Broken(e.to_string()),
            }
        }
    }

    fn decode_one(&mut self) -> Result<Option<Incoming>, String> {
        let Some(frame) = self.decoder.next_frame().map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        let req = decode::<Request>(frame).map_err(|e| e.to_string())?;
        let mut pop = |what: &str| {
            self.fds_in
                .pop_front()
                .ok_or_else(|| format!("{what} without its file descriptor"))
        };
        let (fd, buffer) = match &req {
            Request::SubmitFd { .. } => (Some(pop("SubmitFd")?), None),
            Request::SubmitWith {
                input,
                output_buffer,
                ..
            } => {
                let fd = match input {
                    ipc_proto::control::SubmitPayload::Fd { .. } => Some(pop("SubmitWith")?),
                    ipc_proto::control::SubmitPayload::Inline(_) => None,
                };
                let buffer = match output_buffer {
                    true => Some(pop("SubmitWith's output buffer")?),
                    false => None,
                };
                (fd, buffer)
            }
            _ => (None, None),
        };
        Ok(Some(Incoming { req, fd, buffer }))
    }

    /// Memory held for this connection's input (its frame buffer).
    pub fn input_buffer(&self) -> usize {
        self.decoder.capacity()
    }

    /// Queues a response. A job document with a large output goes out as a
    /// [`Response::JobFd`], its output in a sealed memfd (unless the caller
    /// has a file with it: [`Client::send_job_fd`]).
    pub fn send(&mut self, resp: &Response) {
        if let Response::Job(doc) = resp {
            let big = doc
                .output
                .as_ref()
                .filter(|o| o.0.len() as u64 >= FD_PAYLOAD_MIN);
            if let Some(output) = big {
                return self.send_job_output(doc, &output.0);
            }
        }
        self.encode(resp);
    }

    /// Queues `doc` with `output` beside it, in a sealed memfd (a
    /// [`Response::JobFd`]); inline if no memfd can be made.
    pub fn send_job_output(&mut self, doc: &ipc_proto::control::JobDoc, output: &[u8]) {
        match fdpass::sealed_memfd(c"jobvisor-output", output) {
            Ok(fd) => self.send_job_fd(doc, output.len() as u64, fd),
            Err(e) => {
                crate::warn!(
                    "cannot put job {}'s output in a memfd ({e}); sending it inline",
                    doc.id
                );
                self.encode(&Response::Job(ipc_proto::control::JobDoc {
                    output: Some(ipc_proto::Bytes(output.to_vec())),
                    ..doc.without_output()
                }));
            }
        }
    }

    /// Queues `doc` (its output left out) as a [`Response::JobFd`] whose
    /// output is the first `len` bytes of `fd`.
    pub fn send_job_fd(&mut self, doc: &ipc_proto::control::JobDoc, len: u64, fd: OwnedFd) {
        let at = self.out.len();
        let framed = Response::JobFd {
            doc: doc.without_output(),
            output_len: len,
        };
        if self.encode(&framed) {
            self.fds_out.push_back((at, fd));
        }
    }

    fn encode(&mut self, resp: &Response) -> bool {
        match encode_frame(resp, &mut self.out) {
            Ok(()) => true,
            Err(e) => {
                crate::warn!("cannot encode a control response: {e}");
                self.closing = true;
                false
            }
        }
    }

    /// Writes as much of the queued output as the socket takes. Returns
    /// `Ok(true)` when everything is written.
    pub fn flush(&mut self) -> io::Result<bool> {
        while self.written < self.out.len() {
            // A descriptor goes with the first byte of its frame, and the
            // bytes of one write never reach into the next such frame.
            let attach = self
                .fds_out
                .front()
                .is_some_and(|(at, _)| *at == self.written);
            let end = self
                .fds_out
                .iter()
                .map(|(at, _)| *at)
                .find(|at| *at > self.written)
                .unwrap_or(self.out.len());
            let chunk = &self.out[self.written..end];
            let res = match self.fds_out.front() {
                Some((_, fd)) if attach => fdpass::send(&self.stream, chunk, fd),
                _ => self.stream.write(chunk),
            };
            match res {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    if attach {
                        self.fds_out.pop_front();
                    }
                    self.written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.compact();
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.written = 0;
        Ok(true)
    }

    /// Drops the written part of the output buffer once it is at least
    /// half of it (and [`COMPACT_MIN`]): a client that keeps reading while
    /// replies keep coming never empties the buffer, and the bytes it has
    /// read must not stay in memory (memory is what is pending, not what was
    /// ever queued). Moves at most as many bytes as were written.
    fn compact(&mut self) {
        if self.written < COMPACT_MIN || self.written * 2 < self.out.len() {
            return;
        }
        self.out.drain(..self.written);
        for (at, _) in &mut self.fds_out {
            *at -= self.written;
        }
        self.written = 0;
        // Capacity is kept (a reallocation per write would cost more than
        // the memory); it is at most about twice the high-water mark.
    }

    /// Bytes queued but not yet written.
    pub fn pending_output(&self) -> usize {
        self.out.len() - self.written
    }
}
