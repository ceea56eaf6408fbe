//! Spawn (clone+exec) of one worker process with exactly the descriptors it
//! should have, without waiting in the event loop for more than the child's
//! few setup calls.
//!
//! The child gets stdin = `/dev/null`, stdout/stderr = pipes the daemon
//! reads, fd 3 = job socket (the worker's end), fd 4 = result pipe (write end), fd 5 =
//! its shared-memory arena (memfd), and nothing else: every descriptor the
//! daemon holds is `O_CLOEXEC`, and the child additionally marks everything
//! from fd 6 up close-on-exec (`close_range(CLOSE_RANGE_CLOEXEC)`), which
//! also covers descriptors a careless library or the daemon's own parent
//! leaked.
//!
//! The spawn is hand-rolled rather than `std::process::Command`, because
//! `Command::spawn` waits for the exec to succeed or fail, a blocking read
//! of about 0.6 ms per spawn (more on a slow filesystem) on the event-loop
//! thread. Here the child reports a failed setup step or exec on a
//! close-on-exec status pipe and exits with 127; the daemon reads that pipe
//! when the worker exits before `Ready` (the exit always follows), so the
//! reason reaches the log and `status` without any wait in the loop.
//!
//! The child is made like glibc's `posix_spawn` makes it: `clone(CLONE_VM |
//! CLONE_VFORK)` on a stack of its own. It borrows the daemon's address
//! space until its `execve`, so nothing is copied: a `fork` would copy the
//! daemon's page tables and then make the daemon (and its store thread) take
//! a copy-on-write fault on every page it writes until the child has
//! exec'd. The loop is suspended only for the child's few setup calls, up
//! to the point where `execve` lets go of the daemon's memory.
//!
//! **Except across a credential change.** A pool with `user`/`group` runs
//! its workers as another, untrusted user, and from its `setuid` on, the
//! child belongs to that user, who may `SIGSTOP` it before it reaches
//! `execve`: with `CLONE_VFORK` the loop thread would then wait in the clone
//! until the user sends `SIGCONT`, freezing the whole daemon. Such pools are
//! spawned with a plain fork-like clone instead (no `CLONE_VM`, no
//! `CLONE_VFORK`: the child works on a copy of the daemon's memory, and the
//! loop returns at once). The loop waits only until the child has made
//! itself a session leader, while it is still root and nobody but root can
//! stop it: the child closes a sync pipe then, and the loop reads its end
//! of file. That keeps the guarantee of the vfork path that the worker's
//! process group exists when the spawn returns (a signal to `-pid` cannot
//! miss it). Pools without a credential change keep the vfork path: restart
//! latency is a benchmarked figure, and the page-table copy of a fork costs
//! there. The child does the same raw system calls on either path; a
//! failure is reported on the status pipe either way.
//!
//! Races and hazards closed here:
//! - **fd numbering**: the sources of fds 0..=5 and the status pipe may
//!   themselves have numbers 0..=5 in the child; they are first duplicated
//!   above 10, then `dup2`ed into place.
//! - **a child sharing a threaded process's memory** (the store thread
//!   exists): the child runs only async-signal-safe system calls on data
//!   built before the clone, never allocates or locks, and ends in `execve`
//!   or `_exit`. It changes credentials with raw system calls, since glibc's
//!   `setuid` would signal "the other threads", which are the daemon's.
//! - **signal handlers in the child**: all signals are blocked across the
//!   clone; the child resets every disposition to default (the daemon ignores
//!   SIGPIPE and handles SIGCHLD/TERM/INT/HUP) and unblocks them just before
//!   `execve`.
//! - **parent death before `PR_SET_PDEATHSIG`**: the death signal only fires
//!   for deaths after the `prctl`, so the child re-checks `getppid()` against
//!   the daemon's pid right after it and bails out if the daemon is gone.
//!   `PR_SET_PDEATHSIG` fires when the *thread* that cloned it exits, so spawns
//!   happen only on the long-lived event-loop thread.
//! - **the credential change clears the death signal**: the kernel resets
//!   `PR_SET_PDEATHSIG` when the effective or filesystem uid/gid changes, so
//!   it is set (and `getppid()` re-checked) *after* `setuid`, as the last
//!   step before `execve`.
//! - **process-group escape**: the worker leads its own session and process
//!   group (`setsid`), so signals to `-pid` reach every grandchild that
//!   stayed in it. A descendant cannot join another worker's group (that
//!   needs the same session), so a session id names its worker; one that
//!   left with `setsid` is dealt with by [`crate::orphans`].

use crate::config::PoolConfig;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::socket::{shutdown, socketpair, AddressFamily, Shutdown, SockFlag, SockType};
use nix::unistd::pipe2;
use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Environment variables of the daemon's own that a worker must not inherit
/// (they describe the daemon's relationship with systemd, not the worker's).
const SCRUBBED_ENV: &[&str] = &[
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOBVISOR_SOCKET",
];

/// A freshly spawned worker and the daemon's ends of its channels.
#[derive(Debug)]
pub struct Spawned {
    /// The worker's pid (also its process group id).
    pub pid: u32,
    /// The daemon's end of the job socket (worker's fd 3).
    pub jobs: OwnedFd,
    /// Read end of the result pipe (worker's fd 4).
    pub results: OwnedFd,
    /// Read end of the worker's stdout.
    pub stdout: OwnedFd,
    /// Read end of the worker's stderr.
    pub stderr: OwnedFd,
    /// The shared-memory arena (worker's fd 5).
    pub arena: OwnedFd,
    /// Read end of the exec-status pipe: 8 bytes on it mean a setup step or
    /// the exec failed (see [`exec_failure`]); nothing means it worked.
    /// Non-blocking; read when the worker exits before `Ready`, instead of
    /// waiting for the exec as `std::process::Command` does.
    pub exec_status: OwnedFd,
    /// The resolved program, for messages.
    pub program: PathBuf,
    /// Size of the arena in bytes.
    pub shm_size: u64,
}

/// Why a spawn failed, and whether trying again later may work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnError {
    /// What failed, for the log and `status`.
    pub message: String,
    /// A shortage of a resource that comes back by itself (descriptors,
    /// processes, memory: `EMFILE`, `ENFILE`, `EAGAIN`, `ENOMEM`), not a
    /// fault of the pool: the supervisor retries after a backoff without
    /// counting a crash. Everything else (command missing, unknown user…)
    /// is not transient.
    pub transient: bool,
}

impl SpawnError {
    /// The system call `what` failed with `errno`.
    fn os(what: impl std::fmt::Display, errno: nix::errno::Errno) -> SpawnError {
        SpawnError {
            message: format!("{what}: {errno}"),
            transient: is_transient(errno),
        }
    }

    /// Like [`SpawnError::os`], from a `std::io::Error`.
    fn io(what: impl std::fmt::Display, e: std::io::Error) -> SpawnError {
        SpawnError {
            transient: e
                .raw_os_error()
                .is_some_and(|n| is_transient(nix::errno::Errno::from_raw(n))),
            message: format!("{what}: {e}"),
        }
    }
}

/// A resource shortage that goes away by itself (see
/// [`SpawnError::transient`]).
pub fn is_transient(errno: nix::errno::Errno) -> bool {
    use nix::errno::Errno;
    matches!(
        errno,
        Errno::EMFILE | Errno::ENFILE | Errno::EAGAIN | Errno::ENOMEM
    )
}

impl From<String> for SpawnError {
    fn from(message: String) -> SpawnError {
        SpawnError {
            message,
            transient: false,
        }
    }
}

impl From<&str> for SpawnError {
    fn from(message: &str) -> SpawnError {
        SpawnError::from(message.to_string())
    }
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Finds `program` as the README says: a path with a `/` is taken as is
/// (relative to `base`), a bare name is searched in `PATH`, then next to the
/// running `jobvisord`.
pub fn resolve_program(program: &str, base: &Path) -> Result<PathBuf, String> {
    if program.contains('/') {
        let p = base.join(program);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("command not found: {}", p.display()))
        };
    }
    let mut searched = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let cand = dir.join(program);
            if is_executable(&cand) {
                return Ok(cand);
            }
            searched.push(dir);
        }
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        let cand = dir.join(program);
        if is_executable(&cand) {
            return Ok(cand);
        }
        searched.push(dir);
    }
    Err(format!(
        "command not found: {program:?} (searched PATH and {}); install it or give an absolute path in `command`",
        searched
            .last()
            .map(|d| d.display().to_string())
            .unwrap_or_default()
    ))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Clone+execs a worker of `pool` for slot `slot`. Returns as soon as the
/// child has called `execve` (or given up): whether that worked is read
/// later from [`Spawned::exec_status`], only if the worker dies before
/// `Ready`.
pub fn spawn_worker(
    pool: &str,
    slot: u32,
    cfg: &PoolConfig,
    cgroup_procs: Option<&OwnedFd>,
) -> Result<Spawned, SpawnError> {
    let program = resolve_program(&cfg.command[0], &cfg.cwd)?;
    let ids = user_ids(cfg)?;
    // Everything the child needs is built here, before the clone: after it,
    // the child of a multi-threaded process may not allocate.
    let cstr = |s: &std::ffi::OsStr, what: &str| {
        CString::new(s.as_bytes()).map_err(|_| format!("{what} contains a NUL byte"))
    };
    let path = cstr(program.as_os_str(), "the command path")?;
    let argv: Vec<CString> = cfg
        .command
        .iter()
        .map(|a| cstr(a.as_ref(), "an argument"))
        .collect::<Result<_, _>>()?;
    let mut env: BTreeMap<OsString, OsString> = std::env::vars_os()
        .filter(|(k, _)| !SCRUBBED_ENV.iter().any(|s| k == *s))
        .collect();
    for (k, v) in &cfg.env {
        env.insert(k.into(), v.into());
    }
    env.insert("JOBVISOR_FDS".into(), "3,4,5".into());
    env.insert("JOBVISOR_POOL".into(), pool.into());
    env.insert("JOBVISOR_WORKER_ID".into(), slot.to_string().into());
    // Outputs above this go back through the arena (fd 5).
    env.insert(
        "JOBVISOR_INLINE_LIMIT".into(),
        cfg.inline_limit.to_string().into(),
    );
    env.insert("JOBVISOR_SHM_SIZE".into(), cfg.shm_size.to_string().into());
    // The signal that comes with `Shutdown`, for a worker that wants to
    // catch it and stop cleanly (e.g. `SIGTERM`).
    env.insert(
        "JOBVISOR_STOP_SIGNAL".into(),
        cfg.stop_signal.as_str().into(),
    );
    let envp: Vec<CString> = env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(v);
            cstr(&kv, "an environment variable")
        })
        .collect::<Result<_, _>>()?;
    let cwd = cstr(cfg.cwd.as_os_str(), "cwd")?;
    let argv_ptrs: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp_ptrs: Vec<*const libc::c_char> = envp
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();

    let pipe = || pipe2(OFlag::O_CLOEXEC).map_err(|e| SpawnError::os("pipe", e));
    // The job channel is a stream socket rather than a pipe, so that it can
    // carry descriptors (worker protocol 2); to a worker that only reads it,
    // it behaves as the pipe did. One way only: the daemon never reads it.
    let (job_w, job_r) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| SpawnError::os("socketpair", e))?;
    shutdown(job_w.as_raw_fd(), Shutdown::Read).map_err(|e| SpawnError::os("shutdown", e))?;
    shutdown(job_r.as_raw_fd(), Shutdown::Write).map_err(|e| SpawnError::os("shutdown", e))?;
    let (res_r, res_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    // Fork path only (a credential change): the child closes its end once
    // it leads its own session, while it is still root.
    let sync = match ids {
        Some(_) => Some(pipe()?),
        None => None,
    };
    let null = std::fs::File::open("/dev/null").map_err(|e| SpawnError::io("/dev/null", e))?;
    let arena = memfd_create(
        c"jobvisor-arena",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(|e| SpawnError::os("memfd_create", e))?;
    nix::unistd::ftruncate(&arena, cfg.shm_size as i64).map_err(|e| {
        SpawnError::os(
            format_args!("sizing the shared-memory arena to {} bytes", cfg.shm_size),
            e,
        )
    })?;
    // The worker must not change the arena's size: a shrunk memfd would
    // make the daemon's next access to its mapping a SIGBUS, which kills
    // the whole daemon.
    {
        use nix::fcntl::{fcntl, FcntlArg, SealFlag};
        fcntl(
            &arena,
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
            ),
        )
        .map_err(|e| format!("sealing the shared-memory arena: {e}"))?;
    }

    let plan = ChildPlan {
        parent: nix::unistd::getpid().as_raw(),
        fds: [
            null.as_raw_fd(),
            out_w.as_raw_fd(),
            err_w.as_raw_fd(),
            job_r.as_raw_fd(),
            res_w.as_raw_fd(),
            arena.as_raw_fd(),
        ],
        status: status_w.as_raw_fd(),
        sync: sync.as_ref().map_or(-1, |(_, w)| w.as_raw_fd()),
        cgroup: cgroup_procs.map_or(-1, |fd| fd.as_raw_fd()),
        cwd: cwd.as_ptr(),
        path: path.as_ptr(),
        argv: argv_ptrs.as_ptr(),
        envp: envp_ptrs.as_ptr(),
        ids,
        non_default_signals: non_default_signals(),
    };

    // Block every signal across the clone, so that no handler of the
    // daemon's (signal-hook's, writing to the daemon's self-pipe) runs in the
    // child before it has reset them.
    let all = nix::sys::signal::SigSet::all();
    let mut old = nix::sys::signal::SigSet::empty();
    nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&all),
        Some(&mut old),
    )
    .map_err(|e| format!("blocking signals: {e}"))?;
    // The child's own stack: with CLONE_VM it shares the daemon's memory
    // (without, the child works on a copy of it).
    let mut stack = vec![0u8; CHILD_STACK];
    // SAFETY: in bounds (one past the end); the stack grows down from there.
    let top = unsafe { stack.as_mut_ptr().add(stack.len()) };
    let top = (top as usize & !15) as *mut libc::c_void;
    let flags = if sync.is_some() {
        libc::SIGCHLD
    } else {
        libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD
    };
    // SAFETY: `child_entry` runs `child_exec` on the new stack. On the vfork
    // path it runs in the daemon's address space (CLONE_VM) while this
    // thread is suspended (CLONE_VFORK) until it has called execve or _exit;
    // on the fork path (no CLONE_VM) it runs on a private copy of the
    // daemon's memory, `plan` and the data it points to included. Either
    // way it makes only raw system calls on `plan` and on data prepared
    // above, which stays alive and untouched until clone returns; it never
    // allocates, takes a lock, returns into Rust code, or writes memory
    // except its own stack and errno. No handler runs in it: every signal
    // is blocked until it has reset them all to their defaults. This is what
    // posix_spawn does, without copying the daemon's page tables (fork)
    // where no credential change makes the vfork wait unsafe.
    let pid = unsafe {
        libc::clone(
            child_entry,
            top,
            flags,
            (&plan as *const ChildPlan).cast_mut().cast(),
        )
    };
    let fork_err = std::io::Error::last_os_error();
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&old),
        None,
    );
    if pid < 0 {
        return Err(SpawnError::io("clone", fork_err));
    }
    if let Some((sync_r, sync_w)) = sync {
        // Until the child leads its session (end of file: it closed its
        // copy, or exited). It is still root then: nobody else can stop it.
        drop(sync_w);
        let mut b = [0u8; 1];
        while let Err(nix::errno::Errno::EINTR) = nix::unistd::read(&sync_r, &mut b) {}
    }
    drop(stack);
    // The child's ends, closed in the parent.
    drop((null, out_w, err_w, job_r, res_w, status_w));
    for fd in [&job_w, &res_r, &out_r, &err_r, &status_r] {
        set_nonblocking(fd).map_err(|e| SpawnError::os("fcntl O_NONBLOCK", e))?;
    }
    Ok(Spawned {
        pid: pid as u32,
        jobs: job_w,
        results: res_r,
        stdout: out_r,
        stderr: err_r,
        arena,
        exec_status: status_r,
        program,
        shm_size: cfg.shm_size,
    })
}

fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// What the child does between clone and exec, prepared by the parent.
struct ChildPlan {
    parent: i32,
    /// Sources of the child's fds 0..=5.
    fds: [i32; 6],
    /// Write end of the exec-status pipe (close-on-exec).
    status: i32,
    /// Write end of the sync pipe (fork path), closed by the child once it
    /// leads its own session; -1 on the vfork path.
    sync: i32,
    /// The worker's cgroup's `cgroup.procs`, which the child joins first
    /// (see `crate::cgroup`); -1 without one.
    cgroup: i32,
    cwd: *const libc::c_char,
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    ids: Option<(u32, u32)>,
    /// Bit n set: signal n does not have its default disposition in the
    /// daemon (see [`non_default_signals`]).
    non_default_signals: u64,
}

/// The signals (below `SIGRTMIN`) whose disposition in the daemon is not
/// the default: a handler (signal-hook's, std's stack-overflow handler) or
/// "ignore". The child resets exactly these, a few system calls instead of
/// one per signal. Read once, at the first spawn: the daemon installs its
/// handlers at start-up, before any worker is spawned, and never changes
/// them afterwards.
fn non_default_signals() -> u64 {
    static MASK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *MASK.get_or_init(|| {
        let mut mask = 0u64;
        for sig in 1..libc::SIGRTMIN().min(64) {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            // SAFETY: a zeroed sigaction is a valid out-parameter; a null
            // new action only queries.
            let handler = unsafe {
                let mut cur: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut cur) != 0 {
                    // Unknown to the kernel or reserved by glibc: reset it
                    // in the child anyway, as before.
                    mask |= 1u64 << sig;
                    continue;
                }
                cur.sa_sigaction
            };
            if handler != libc::SIG_DFL {
                mask |= 1u64 << sig;
            }
        }
        mask
    })
}

/// Steps of the child's setup, reported with the errno when one fails.
#[derive(Clone, Copy)]
#[repr(u32)]
enum Step {
    DeathSignal = 1,
    ParentGone,
    ProcessGroup,
    Fds,
    Chdir,
    Groups,
    Gid,
    Uid,
    Cgroup,
    Exec,
}

/// Parses what a failed child wrote on the exec-status pipe.
pub fn exec_failure(program: &Path, bytes: &[u8]) -> String {
    if bytes.len() < 8 {
        return format!("cannot start {}: setup failed", program.display());
    }
    let step = u32::from_ne_bytes(bytes[..4].try_into().expect("4 bytes"));
    let errno = i32::from_ne_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let err = std::io::Error::from_raw_os_error(errno);
    let what = match step {
        x if x == Step::DeathSignal as u32 => "prctl(PR_SET_PDEATHSIG)",
        x if x == Step::ParentGone as u32 => "the daemon exited during the spawn",
        x if x == Step::ProcessGroup as u32 => "setsid",
        x if x == Step::Fds as u32 => "setting up fds 0-5",
        x if x == Step::Chdir as u32 => "changing to the pool's cwd",
        x if x == Step::Groups as u32 => "setgroups",
        x if x == Step::Gid as u32 => "setgid",
        x if x == Step::Uid as u32 => "setuid",
        x if x == Step::Cgroup as u32 => "joining the worker's cgroup",
        _ => "exec",
    };
    if step >= Step::Exec as u32 {
        format!("cannot execute {}: {err}", program.display())
    } else {
        format!("cannot start {}: {what}: {err}", program.display())
    }
}

/// Whether the failure the child reported on its exec-status pipe (see
/// [`exec_failure`]) is a shortage that may pass (descriptors, processes,
/// memory): the core retries such a spawn instead of counting a crash.
pub fn exec_failure_is_transient(bytes: &[u8]) -> bool {
    let Some(errno) = bytes.get(4..8) else {
        return false;
    };
    let errno = i32::from_ne_bytes(errno.try_into().expect("4 bytes"));
    matches!(
        errno,
        libc::EMFILE | libc::ENFILE | libc::EAGAIN | libc::ENOMEM
    )
}

/// The child's side: async-signal-safe system calls only, then exec.
///
/// Stack of the cloned child until its execve: `child_exec` needs little
/// (glibc's posix_spawn sizes its own at about 32 KiB plus the arguments).
const CHILD_STACK: usize = 64 * 1024;

extern "C" fn child_entry(plan: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `plan` is the `ChildPlan` passed to clone in `spawn_worker`,
    // alive until this child has exec'd or exited (CLONE_VFORK), or a copy
    // of it in the child's own memory (fork path).
    unsafe { child_exec(&*(plan as *const ChildPlan)) }
}

/// # Safety
/// Must be called only in the child right after `clone`, with `plan`'s
/// pointers valid (into the parent's memory, which the child shares).
unsafe fn child_exec(plan: &ChildPlan) -> ! {
    // SAFETY: plain system calls on integers and on NUL-terminated strings
    // and pointer arrays prepared by the parent.
    unsafe {
        // The status pipe may have a number in 0..=5, which the dup2s below
        // overwrite: move it above 10 first. Without it nothing can be
        // reported; the exit status 127 then says it alone.
        let status = libc::fcntl(plan.status, libc::F_DUPFD_CLOEXEC, 10);
        if status < 0 {
            libc::_exit(127);
        }
        let fail = |step: Step| -> ! {
            let errno = *libc::__errno_location();
            let mut msg = [0u8; 8];
            msg[..4].copy_from_slice(&(step as u32).to_ne_bytes());
            msg[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(status, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        };
        // Into the worker's own cgroup before anything else: whatever it
        // starts stays there.
        if plan.cgroup >= 0 && libc::write(plan.cgroup, b"0".as_ptr().cast(), 1) != 1 {
            fail(Step::Cgroup);
        }
        if libc::setsid() < 0 {
            fail(Step::ProcessGroup);
        }
        if plan.sync >= 0 {
            // Fork path: the daemon may go on (its end of file).
            libc::close(plan.sync);
        }
        // The sources may have numbers 0..=5 too: above 10 first, then
        // into place.
        let mut high = [0i32; 6];
        for (i, fd) in plan.fds.iter().enumerate() {
            let d = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
            if d < 0 {
                fail(Step::Fds);
            }
            high[i] = d;
        }
        for (i, fd) in high.iter().enumerate() {
            // dup2 clears FD_CLOEXEC on the target.
            if libc::dup2(*fd, i as i32) < 0 {
                fail(Step::Fds);
            }
        }
        if libc::syscall(
            libc::SYS_close_range,
            6u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            // Kernels before 5.11: mark them one by one.
            for fd in 6..1024 {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        if libc::chdir(plan.cwd) != 0 {
            fail(Step::Chdir);
        }
        if let Some((uid, gid)) = plan.ids {
            // Raw system calls: glibc's wrappers would broadcast the change
            // to "all threads of the process", which in a CLONE_VM child are
            // the daemon's threads (and in a forked one do not exist).
            let null: *const libc::gid_t = std::ptr::null();
            if libc::syscall(libc::SYS_setgroups, 0usize, null) != 0 {
                fail(Step::Groups);
            }
            if libc::syscall(libc::SYS_setgid, gid) != 0 {
                fail(Step::Gid);
            }
            if libc::syscall(libc::SYS_setuid, uid) != 0 {
                fail(Step::Uid);
            }
        }
        // After the credential change, which clears the death signal.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            fail(Step::DeathSignal);
        }
        // The daemon may have died before the prctl: then nobody would
        // ever kill us.
        if libc::getppid() != plan.parent {
            *libc::__errno_location() = libc::ESRCH;
            fail(Step::ParentGone);
        }
        // Default dispositions (the daemon ignores SIGPIPE and handles
        // SIGCHLD/TERM/INT/HUP) and an empty mask for the worker.
        for sig in 1..64 {
            if plan.non_default_signals & (1u64 << sig) != 0 {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(plan.path, plan.argv, plan.envp);
        fail(Step::Exec)
    }
}

/// Resolves `user`/`group` to ids; only allowed when the daemon is root.
fn user_ids(cfg: &PoolConfig) -> Result<Option<(u32, u32)>, SpawnError> {
    if cfg.user.is_none() && cfg.group.is_none() {
        return Ok(None);
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "`user`/`group` need the daemon to run as root; remove them or run jobvisord as root"
                .into(),
        );
    }
    let (mut uid, mut gid) = (0u32, 0u32);
    if let Some(u) = &cfg.user {
        let user = nix::unistd::User::from_name(u)
            .map_err(|e| SpawnError::os(format_args!("looking up user {u:?}"), e))?
            .ok_or_else(|| format!("no such user {u:?}"))?;
        uid = user.uid.as_raw();
        gid = user.gid.as_raw();
    }
    if let Some(g) = &cfg.group {
        let group = nix::unistd::Group::from_name(g)
            .map_err(|e| SpawnError::os(format_args!("looking up group {g:?}"), e))?
            .ok_or_else(|| format!("no such group {g:?}"))?;
        gid = group.gid.as_raw();
    }
    Ok(Some((uid, gid)))
}

/// Marks every descriptor from 3 up close-on-exec, so nothing the daemon
/// inherited from whoever started it can leak into a worker.
pub fn cloexec_inherited_fds() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only changes flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc != 0 {
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            let fds: Vec<i32> = dir
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|fd| *fd >= 3)
                .collect();
            for fd in fds {
                // SAFETY: fcntl on an integer fd; a closed one yields EBADF.
                unsafe {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
        }
    }
}

/// Takes ownership of descriptor `fd`, inherited from the parent (for
/// `jobvisord --lifeline FD`): it must be an open socket, not 0-2.
pub fn inherited_fd(fd: i32) -> io::Result<OwnedFd> {
    if fd < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{fd} is a standard stream; pass the pipe as descriptor 3 or above"),
        ));
    }
    // SAFETY: fcntl(F_GETFD) on an integer only reads the descriptor's flags.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not open"),
        ));
    }
    // SAFETY: `fd` is open (checked above) and nothing in this process owns
    // it: it was inherited, and is taken once, before anything else runs.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = nix::sys::stat::fstat(&owned).map_err(io::Error::from)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is not a socket (expected one end of a socketpair)"),
        ));
    }
    Ok(owned)
}
