//! The handlers shipped in `jobvisor-worker`: [`echo`], [`sha256`] and
//! [`Exec`] (a command per job). [`echo_into`] and [`sha256_into`] are the
//! same as the first two for [`crate::run_with_output`], which the binary
//! uses: no copy of a large input, and echo's output written straight into
//! shared memory.
//!
//! [`Exec`] handles the OS corners of running a child per job:
//! - no pipe deadlock: the input is written to the child's stdin from the
//!   same `poll(2)` loop that reads its stdout and stderr, all non-blocking,
//!   so a child that writes a lot before reading everything cannot wedge us;
//! - cancellation: the loop also polls [`JobContext::cancel_fd`] and kills
//!   the child when it fires;
//! - no orphans when the worker dies: the child gets
//!   `PR_SET_PDEATHSIG(SIGKILL)`, and checks `getppid()` afterwards in case
//!   the worker died before that took effect. The deathsig fires when the
//!   *thread* that forked exits: that is the thread running the handler,
//!   which lives as long as the worker. The child stays in the worker's
//!   process group, so the daemon's group kill reaches it too.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use sha2::{Digest, Sha256};

use crate::context::JobContext;
use crate::output::{Output, MAX_INLINE_OUTPUT};

/// Output = input.
pub fn echo(input: &[u8]) -> Result<Vec<u8>, String> {
    Ok(input.to_vec())
}

/// Output = input, for [`crate::run_with_output`]: the input is copied once,
/// straight into the output (for a large input, from the arena's input
/// region into an output slot: one `memcpy` in the worker).
pub fn echo_into(_: &JobContext, input: &[u8], out: &mut Output) -> Result<(), String> {
    // A large input moves the empty output into a slot of exactly its size.
    out.write_all(input);
    Ok(())
}

/// Output = lowercase hex SHA-256 digest of the input (64 bytes, no newline).
pub fn sha256(input: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = vec![0; 64];
    hex_digest(input, (&mut out[..]).try_into().expect("64 bytes"));
    Ok(out)
}

/// [`sha256`] for [`crate::run_with_output`]: hashes the input in place (a
/// large input is read straight from shared memory) and writes the 64 hex
/// digits into the output.
pub fn sha256_into(_: &JobContext, input: &[u8], out: &mut Output) -> Result<(), String> {
    let dst = out.reserve(64);
    hex_digest(input, dst.try_into().expect("64 bytes"));
    Ok(())
}

fn hex_digest(input: &[u8], out: &mut [u8; 64]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(input);
    for (pair, b) in out.chunks_exact_mut(2).zip(digest) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0xf)];
    }
}

/// How much of a failed command's stderr goes into the error message.
const STDERR_TAIL: usize = 2048;
const CHUNK: usize = 64 << 10;

/// Runs a command per job: the input on its stdin, its stdout as the output.
/// A non-zero exit or a death by signal fails the job with the tail of its
/// stderr.
#[derive(Debug, Clone)]
pub struct Exec {
    program: OsString,
    args: Vec<OsString>,
}

impl Exec {
    /// A handler running `program` with `args` (looked up in `PATH` like
    /// `execvp`; never through a shell).
    pub fn new(
        program: impl Into<OsString>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
    ) -> Self {
        Exec {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
        }
    }

    /// Runs the command for one job.
    pub fn run(&self, ctx: &JobContext, input: &[u8]) -> Result<Vec<u8>, String> {
        if ctx.is_cancelled() {
            return Err(crate::CANCELLED.to_owned());
        }
        let mut child = self
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.program.to_string_lossy()))?;
        let result = communicate(&mut child, ctx, input);
        // Whatever happened, the child is gone and reaped before we return.
        if result.is_err() {
            let _ = child.kill();
        }
        let status = child
            .wait()
            .map_err(|e| format!("cannot wait for {}: {e}", self.program.to_string_lossy()))?;
        let Captured { stdout, stderr } = match result {
            Ok(captured) => captured,
            Err(Abort::Cancelled) => return Err(crate::CANCELLED.to_owned()),
            Err(Abort::TooLarge) => {
                return Err(format!(
                    "output exceeds the {MAX_INLINE_OUTPUT}-byte inline limit"
                ))
            }
            Err(Abort::Io(e)) => return Err(format!("cannot talk to the command: {e}")),
        };
        if status.success() {
            Ok(stdout)
        } else {
            Err(describe_failure(status, &stderr))
        }
    }

    fn spawn(&self) -> io::Result<Child> {
        let parent = std::process::id();
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let die_with_parent = move || -> io::Result<()> {
            // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and
            // takes plain integers; it is safe between fork and exec.
            if unsafe {
                libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                )
            } != 0
            {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: getppid is async-signal-safe and cannot fail.
            let ppid = unsafe { libc::getppid() };
            // The worker died before the deathsig was armed: do not run.
            if u32::try_from(ppid).ok() != Some(parent) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        };
        // SAFETY: the hook runs between fork and exec in the child; it only
        // makes async-signal-safe calls and allocates nothing (the errors it
        // builds are `Os` variants, without allocation).
        unsafe { cmd.pre_exec(die_with_parent) };
        cmd.spawn()
    }
}

struct Captured {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

enum Abort {
    Cancelled,
    TooLarge,
    Io(io::Error),
}

impl From<io::Error> for Abort {
    fn from(e: io::Error) -> Self {
        Abort::Io(e)
    }
}

impl From<nix::Error> for Abort {
    fn from(e: nix::Error) -> Self {
        Abort::Io(e.into())
    }
}

/// Feeds `input` to the child and collects its stdout and stderr tail until
/// both reach end of stream and the child has exited. Does not reap the
/// child (the caller does, after killing it on error).
fn communicate(child: &mut Child, ctx: &JobContext, input: &[u8]) -> Result<Captured, Abort> {
    let mut stdin = child.stdin.take().filter(|_| !input.is_empty());
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    for fd in [
        stdin.as_ref().map(AsFd::as_fd),
        stdout.as_ref().map(AsFd::as_fd),
        stderr.as_ref().map(AsFd::as_fd),
    ]
    .into_iter()
    .flatten()
    {
        fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    }
    // Without a pidfd (old kernel) the loop ends when both pipes close and
    // the caller's wait() blocks; with one, cancellation works to the end.
    let pidfd = pidfd_open(child.id());
    // Without a cancel descriptor (out of fds) the job still runs; it just
    // cannot be interrupted by a Cancel.
    let cancel_fd = ctx.cancel_fd().ok();
    let mut exited = false;
    let mut written = 0;
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut chunk = vec![0u8; CHUNK];

    loop {
        if stdout.is_none() && stderr.is_none() && (exited || pidfd.is_none()) {
            break;
        }
        let mut fds = Vec::with_capacity(5);
        let slots = [
            add(&mut fds, cancel_fd, PollFlags::POLLIN),
            add(
                &mut fds,
                stdin.as_ref().map(AsFd::as_fd),
                PollFlags::POLLOUT,
            ),
            add(
                &mut fds,
                stdout.as_ref().map(AsFd::as_fd),
                PollFlags::POLLIN,
            ),
            add(
                &mut fds,
                stderr.as_ref().map(AsFd::as_fd),
                PollFlags::POLLIN,
            ),
            add(
                &mut fds,
                pidfd.as_ref().filter(|_| !exited).map(AsFd::as_fd),
                PollFlags::POLLIN,
            ),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let ready: [bool; 5] = slots.map(|s| {
            s.and_then(|i| fds[i].revents())
                .is_some_and(|r| !r.is_empty())
        });
        drop(fds);

        if ready[0] {
            return Err(Abort::Cancelled);
        }
        if ready[1] {
            if let Some(pipe) = stdin.as_mut() {
                match pipe.write(&input[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // EPIPE: the child stopped reading; its exit status says
                    // whether that was a failure.
                    Err(_) => written = input.len(),
                }
                if written == input.len() {
                    stdin = None; // close: the child sees end of input
                }
            }
        }
        if ready[2] && drain(&mut stdout, &mut out, &mut chunk)? {
            stdout = None;
        }
        // A command's stdout beyond this cannot be sent inline: the job fails.
        if out.len() > MAX_INLINE_OUTPUT {
            return Err(Abort::TooLarge);
        }
        if ready[3] && drain(&mut stderr, &mut err, &mut chunk)? {
            stderr = None;
        }
        if err.len() > 2 * STDERR_TAIL {
            err.drain(..err.len() - STDERR_TAIL);
        }
        if ready[4] {
            exited = child.try_wait()?.is_some();
            if exited {
                // Its stdin has no reader left.
                stdin = None;
            }
        }
    }
    Ok(Captured {
        stdout: out,
        stderr: err,
    })
}

/// Adds `fd` (if any) to the poll set; returns its index.
fn add<'a>(
    fds: &mut Vec<PollFd<'a>>,
    fd: Option<BorrowedFd<'a>>,
    events: PollFlags,
) -> Option<usize> {
    let fd = fd?;
    fds.push(PollFd::new(fd, events));
    Some(fds.len() - 1)
}

/// Reads what is available from `pipe` into `buf`; true at end of stream.
fn drain<R: Read>(
    pipe: &mut Option<R>,
    buf: &mut Vec<u8>,
    chunk: &mut [u8],
) -> Result<bool, Abort> {
    let Some(r) = pipe.as_mut() else {
        return Ok(false);
    };
    match r.read(chunk) {
        Ok(0) => Ok(true),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(false)
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// A pidfd for `pid` (readable once the process exits), or `None` on kernels
/// without `pidfd_open` (before 5.3).
fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: `fd` was just returned by pidfd_open, so it is open and owned
    // by nothing else (pidfds are created close-on-exec).
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `exit status 3: <stderr tail>` or `killed by signal 9 (SIGKILL): <…>`.
fn describe_failure(status: ExitStatus, stderr: &[u8]) -> String {
    let what = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => match nix::sys::signal::Signal::try_from(sig) {
            Ok(name) => format!("killed by signal {sig} ({})", name.as_str()),
            Err(_) => format!("killed by signal {sig}"),
        },
        (None, None) => format!("{status}"),
    };
    let tail = one_line_tail(stderr);
    if tail.is_empty() {
        what
    } else {
        format!("{what}: {tail}")
    }
}

/// The last [`STDERR_TAIL`] bytes of `stderr`, trimmed, lines joined by " | ".
fn one_line_tail(stderr: &[u8]) -> String {
    let cut = stderr.len() > STDERR_TAIL;
    let bytes = &stderr[stderr.len().saturating_sub(STDERR_TAIL)..];
    let text = String::from_utf8_lossy(bytes);
    let joined = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ");
    if cut && !joined.is_empty() {
        format!("…{joined}")
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_is_lowercase_hex() {
        const ABC: &[u8] = b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256(b"abc").unwrap(), ABC);
        let ctx = JobContext::new(std::sync::Arc::new(
            crate::context::CancelState::new().unwrap(),
        ));
        let mut out = Output::new();
        sha256_into(&ctx, b"abc", &mut out).unwrap();
        assert_eq!(out.as_slice(), ABC);
        let mut out = Output::new();
        echo_into(&ctx, b"hello", &mut out).unwrap();
        assert_eq!(out.as_slice(), b"hello");
    }

    #[test]
    fn failure_description() {
        let exit3 = ExitStatus::from_raw(3 << 8);
        assert_eq!(describe_failure(exit3, b""), "exit status 3");
        assert_eq!(
            describe_failure(exit3, b"  oops\n\nsecond line\n"),
            "exit status 3: oops | second line"
        );
        let killed = ExitStatus::from_raw(libc::SIGKILL);
        assert_eq!(
            describe_failure(killed, b""),
            "killed by signal 9 (SIGKILL)"
        );
        let long = vec![b'x'; 3 * STDERR_TAIL];
        let msg = describe_failure(exit3, &long);
        assert!(msg.starts_with("exit status 3: …x"));
        assert!(msg.len() < STDERR_TAIL + 40);
    }
}
