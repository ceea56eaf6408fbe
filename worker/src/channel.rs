//! Claiming the descriptors the daemon passed: `JOBVISOR_FDS=3,4,5` names the
//! job pipe (read), the result pipe (write) and the shared-memory arena.
//!
//! Two things this module guards against:
//! - running outside a daemon: fds 3 and 4 may then be closed, or be
//!   something unrelated inherited from a shell; both are refused with a
//!   clear error rather than read or written.
//! - leaking the channel into the worker's own children: the daemon's fds
//!   arrive without `FD_CLOEXEC`; a child of the worker (the `exec` handler's
//!   command) holding the result pipe would keep the daemon from seeing the
//!   worker's death as end of stream. All three get `FD_CLOEXEC` here.

use std::fs::File;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::context::JobContext;
use crate::output::Output;
use crate::serve::{
    serve_stream, serve_with_output, vec_handler, ServeConfig, ServeError, Stop,
    DEFAULT_INLINE_LIMIT,
};
use crate::shm::Arena;
use ipc_proto::WORKER_PROTOCOL_FDS;

/// The environment variable naming the worker's descriptors.
pub const FDS_ENV: &str = "JOBVISOR_FDS";

/// The environment variable with the pool's `inline_limit` in bytes: outputs
/// longer than this go through the arena. Default [`DEFAULT_INLINE_LIMIT`]
/// when unset or not a decimal number. (`JOBVISOR_SHM_SIZE` is only
/// informational: the arena's size is that of fd 5.)
pub const INLINE_LIMIT_ENV: &str = "JOBVISOR_INLINE_LIMIT";

/// Set once the descriptors are claimed: they can be owned only once.
static CLAIMED: AtomicBool = AtomicBool::new(false);

/// Why the worker could not connect to its daemon.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// `JOBVISOR_FDS` is not set: not started by the daemon.
    #[error("must be started by jobvisord as a pool's command (JOBVISOR_FDS is not set)")]
    NotUnderDaemon,
    /// `JOBVISOR_FDS` is malformed.
    #[error("must be started by jobvisord (JOBVISOR_FDS={0:?} is not three descriptor numbers like 3,4,5)")]
    BadFds(String),
    /// A named descriptor is not open, or not open the right way.
    #[error("must be started by jobvisord (fd {fd} {problem})")]
    BadFd {
        /// The descriptor.
        fd: RawFd,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// The descriptors were already claimed by an earlier call.
    #[error("the worker channel was already claimed in this process")]
    AlreadyClaimed,
}

impl SetupError {
    /// The process exit status for this error (always 2: usage).
    pub fn exit_code(&self) -> u8 {
        2
    }
}

/// The worker's two pipes to the daemon and its shared-memory arena,
/// claimed from the environment.
///
/// Use it to do expensive initialisation *after* checking that the process
/// really runs under the daemon but *before* announcing readiness:
/// [`Channel::from_env`], load the model, then [`Channel::serve`] or
/// [`Channel::serve_with_output`] (which send `Ready`). [`crate::run`] does
/// the first and last steps in one call.
#[derive(Debug)]
pub struct Channel {
    jobs: File,
    results: File,
    arena: Option<Arena>,
    inline_limit: usize,
}

impl Channel {
    /// Claims the descriptors named by `JOBVISOR_FDS` (once per process),
    /// and maps the arena (third descriptor; it stays open). An arena that
    /// is not a memfd, is empty or cannot be mapped is not an error: the
    /// worker then works inline only (see [`Channel::has_arena`]).
    pub fn from_env() -> Result<Channel, SetupError> {
        let value = std::env::var(FDS_ENV).map_err(|_| SetupError::NotUnderDaemon)?;
        let fds = parse_fds(&value).ok_or_else(|| SetupError::BadFds(value.clone()))?;
        let [jobs, results, arena] = fds;
        check_fd(jobs, Access::Read)?;
        check_fd(results, Access::Write)?;
        check_fd(arena, Access::Any)?;
        if CLAIMED.swap(true, Ordering::SeqCst) {
            return Err(SetupError::AlreadyClaimed);
        }
        // SAFETY: both descriptors are open (checked above), distinct (checked
        // by `parse_fds`), were inherited from the daemon so no other object in
        // this process owns them, and `CLAIMED` makes sure they are wrapped
        // only once.
        let (jobs, results) =
            unsafe { (OwnedFd::from_raw_fd(jobs), OwnedFd::from_raw_fd(results)) };
        // SAFETY: `arena` is open (checked above) and stays open: nothing in
        // this process owns or closes it. It is the daemon's memfd, whose
        // use follows the protocol's shared-memory rules, as `Arena::map`
        // requires.
        let arena = unsafe { Arena::map(BorrowedFd::borrow_raw(arena)) }.ok();
        Ok(Channel {
            jobs: File::from(jobs),
            results: File::from(results),
            arena,
            inline_limit: inline_limit(std::env::var(INLINE_LIMIT_ENV).ok().as_deref()),
        })
    }

    /// True when the arena is mapped: large inputs and outputs can travel
    /// through shared memory.
    pub fn has_arena(&self) -> bool {
        self.arena.is_some()
    }

    /// Outputs longer than this are returned through the arena.
    pub fn inline_limit(&self) -> usize {
        self.inline_limit
    }

    /// Sends `Ready` and serves jobs with `handler` until `Shutdown` or the
    /// daemon's end of the job pipe closes (see [`crate::serve_with_output`]).
    /// An output over the inline limit is copied once, into the arena.
    pub fn serve<F>(self, handler: F) -> Result<Stop, ServeError>
    where
        F: FnMut(&JobContext, &[u8]) -> Result<Vec<u8>, String>,
    {
        self.serve_with_output(vec_handler(handler))
    }

    /// Like [`Channel::serve`], with a handler that writes its output into an
    /// [`Output`] (see [`crate::run_with_output`]).
    pub fn serve_with_output<F>(self, handler: F) -> Result<Stop, ServeError>
    where
        F: FnMut(&JobContext, &[u8], &mut Output) -> Result<(), String>,
    {
        let config = ServeConfig::default()
            .arena(self.arena)
            .inline_limit(self.inline_limit);
        // A socket on fd 3 can carry descriptors: protocol 2 (see
        // `crate::fds`). A pipe (an older daemon): protocol 1.
        if crate::fds::is_socket(&self.jobs) {
            let jobs = crate::fds::FdSocket(self.jobs);
            return serve_stream(jobs, self.results, config, WORKER_PROTOCOL_FDS, handler);
        }
        serve_with_output(self.jobs, self.results, config, handler)
    }
}

/// The inline limit from `JOBVISOR_INLINE_LIMIT`'s value.
fn inline_limit(value: Option<&str>) -> usize {
    value
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_INLINE_LIMIT, |n| {
            usize::try_from(n).unwrap_or(usize::MAX)
        })
}

fn parse_fds(value: &str) -> Option<[RawFd; 3]> {
    let mut fds = [0; 3];
    let mut parts = value.split(',');
    for fd in &mut fds {
        *fd = parts.next()?.trim().parse().ok()?;
        // Never take over stdin/stdout/stderr.
        if *fd < 3 {
            return None;
        }
    }
    if parts.next().is_some() || fds[0] == fds[1] || fds[0] == fds[2] || fds[1] == fds[2] {
        return None;
    }
    Some(fds)
}

#[derive(Clone, Copy)]
enum Access {
    Read,
    Write,
    Any,
}

/// Checks that `fd` is open with the needed access mode and sets
/// `FD_CLOEXEC` on it.
fn check_fd(fd: RawFd, access: Access) -> Result<(), SetupError> {
    let bad = |problem| SetupError::BadFd { fd, problem };
    // SAFETY: F_GETFL only reads the status flags of the descriptor number;
    // on a closed descriptor it fails with EBADF and touches nothing.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(bad("is not open"));
    }
    let mode = flags & libc::O_ACCMODE;
    let ok = match access {
        Access::Read => mode == libc::O_RDONLY || mode == libc::O_RDWR,
        Access::Write => mode == libc::O_WRONLY || mode == libc::O_RDWR,
        Access::Any => true,
    };
    if !ok {
        return Err(bad(match access {
            Access::Read => "is not open for reading",
            _ => "is not open for writing",
        }));
    }
    // SAFETY: as above; F_GETFD/F_SETFD read and set only the close-on-exec
    // flag of an open descriptor.
    let set = unsafe {
        let fd_flags = libc::fcntl(fd, libc::F_GETFD);
        fd_flags >= 0 && libc::fcntl(fd, libc::F_SETFD, fd_flags | libc::FD_CLOEXEC) == 0
    };
    if !set {
        return Err(bad("cannot be marked close-on-exec"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fds_parse_strictly() {
        assert_eq!(parse_fds("3,4,5"), Some([3, 4, 5]));
        assert_eq!(parse_fds(" 7, 8 ,9"), Some([7, 8, 9]));
        assert_eq!(parse_fds("3,4"), None);
        assert_eq!(parse_fds("3,4,5,6"), None);
        assert_eq!(parse_fds("3,3,5"), None);
        assert_eq!(parse_fds("0,4,5"), None);
        assert_eq!(parse_fds("a,b,c"), None);
        assert_eq!(parse_fds(""), None);
    }

    #[test]
    fn inline_limit_defaults_when_unset_or_unparsable() {
        assert_eq!(inline_limit(None), 65536);
        assert_eq!(inline_limit(Some("")), 65536);
        assert_eq!(inline_limit(Some("64KiB")), 65536);
        assert_eq!(inline_limit(Some("-1")), 65536);
        assert_eq!(inline_limit(Some("1024")), 1024);
        assert_eq!(inline_limit(Some(" 0\n")), 0);
    }

    #[test]
    fn arena_needs_a_mappable_nonempty_file() {
        use nix::sys::memfd::{memfd_create, MFdFlags};
        use std::os::fd::AsFd;
        let fd = memfd_create("t", MFdFlags::MFD_CLOEXEC).unwrap();
        // SAFETY: nobody else uses this memfd.
        let empty = unsafe { Arena::map(fd.as_fd()) };
        assert!(empty.is_err());
        nix::unistd::ftruncate(&fd, 3 * 4096).unwrap();
        // SAFETY: as above.
        let arena = unsafe { Arena::map(fd.as_fd()) }.unwrap();
        assert_eq!(arena.size(), 3 * 4096);
        assert_eq!(arena.layout().output, 8192..12288);
        let (r, _w) = nix::unistd::pipe().unwrap();
        // SAFETY: a pipe nobody maps.
        assert!(unsafe { Arena::map(r.as_fd()) }.is_err());
    }

    #[test]
    fn closed_fd_is_refused() {
        // A descriptor number far above anything a test process opens.
        let err = check_fd(100_000, Access::Read).unwrap_err();
        assert!(err.to_string().contains("is not open"), "{err}");
    }
}
