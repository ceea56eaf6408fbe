//! Fork+exec of one worker process with exactly the descriptors it should
//! have.
//!
//! The child gets stdin = `/dev/null`, stdout/stderr = pipes the daemon
//! reads, fd 3 = job pipe (read end), fd 4 = result pipe (write end), fd 5 =
//! its shared-memory arena (memfd), and nothing else: every descriptor the
//! daemon holds is `O_CLOEXEC`, and the child additionally marks everything
//! from fd 6 up close-on-exec (`close_range(CLOSE_RANGE_CLOEXEC)`), which
//! also covers descriptors a careless library or the daemon's own parent
//! leaked. (Closing them outright would also close std's exec-error pipe and
//! hide exec failures.)
//!
//! Races closed here:
//! - **fd numbering**: the sources of fds 3/4/5 may themselves have numbers
//!   3..=5 in the child; they are first duplicated above 10, then `dup2`ed
//!   into place.
//! - **parent death before `PR_SET_PDEATHSIG`**: the death signal only fires
//!   for deaths after the `prctl`, so the child re-checks `getppid()` against
//!   the daemon's pid right after it and bails out if the daemon is gone.
//!   `PR_SET_PDEATHSIG` fires when the *thread* that forked exits, so spawns
//!   happen only on the long-lived event-loop thread.
//! - **process-group escape**: the worker leads its own process group
//!   (`setpgid(0, 0)`, done by std before exec), so signals to `-pid` reach
//!   every grandchild it started.

use crate::config::PoolConfig;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::unistd::pipe2;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
    /// Write end of the job pipe (worker's fd 3).
    pub jobs: OwnedFd,
    /// Read end of the result pipe (worker's fd 4).
    pub results: OwnedFd,
    /// Read end of the worker's stdout.
    pub stdout: OwnedFd,
    /// Read end of the worker's stderr.
    pub stderr: OwnedFd,
    /// The shared-memory arena (worker's fd 5).
    pub arena: OwnedFd,
}

/// Finds `program` like DESIGN.md says: a path with a `/` is taken as is
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

/// Fork+execs a worker of `pool` for slot `slot`.
pub fn spawn_worker(pool: &str, slot: u32, cfg: &PoolConfig) -> Result<Spawned, String> {
    let program = resolve_program(&cfg.command[0], &cfg.cwd)?;
    let (job_r, job_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let (res_r, res_w) = pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
    let arena = memfd_create(c"jobvisor-arena", MFdFlags::MFD_CLOEXEC)
        .map_err(|e| format!("memfd_create: {e}"))?;
    nix::unistd::ftruncate(&arena, cfg.shm_size as i64).map_err(|e| {
        format!(
            "sizing the shared-memory arena to {} bytes: {e}",
            cfg.shm_size
        )
    })?;

    let mut cmd = Command::new(&program);
    cmd.arg0(&cfg.command[0]).args(&cfg.command[1..]);
    for k in SCRUBBED_ENV {
        cmd.env_remove(k);
    }
    cmd.envs(&cfg.env)
        .env("JOBVISOR_FDS", "3,4,5")
        .env("JOBVISOR_POOL", pool)
        .env("JOBVISOR_WORKER_ID", slot.to_string())
        .current_dir(&cfg.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);

    let parent = nix::unistd::getpid().as_raw();
    let fds = [job_r.as_raw_fd(), res_w.as_raw_fd(), arena.as_raw_fd()];
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe system calls (prctl, getppid, fcntl, dup2,
    // close_range, via libc); it allocates nothing and touches no lock. The
    // raw fds it uses are kept open in the parent (owned by locals that
    // outlive `spawn`), so they are valid in the child.
    unsafe {
        cmd.pre_exec(move || child_setup(parent, fds));
    }
    if let Some((uid, gid)) = user_ids(cfg)? {
        cmd.uid(uid).gid(gid);
    }
    let child = cmd.spawn().map_err(|e| {
        format!(
            "cannot execute {}: {e}",
            OsString::from(program.as_os_str()).to_string_lossy()
        )
    })?;
    let pid = child.id();
    let stdout: OwnedFd = child
        .stdout
        .ok_or_else(|| "no stdout pipe".to_string())?
        .into();
    let stderr: OwnedFd = child
        .stderr
        .ok_or_else(|| "no stderr pipe".to_string())?
        .into();
    drop(job_r);
    drop(res_w);
    for fd in [&job_w, &res_r, &stdout, &stderr] {
        set_nonblocking(fd).map_err(|e| format!("fcntl O_NONBLOCK: {e}"))?;
    }
    Ok(Spawned {
        pid,
        jobs: job_w,
        results: res_r,
        stdout,
        stderr,
        arena,
    })
}

fn set_nonblocking(fd: &OwnedFd) -> nix::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Runs in the child between fork and exec: async-signal-safe calls only.
fn child_setup(parent: i32, fds: [i32; 3]) -> std::io::Result<()> {
    // SAFETY: plain system calls on integers; no memory is shared or freed.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The daemon may have died between fork and prctl: then nobody
        // would ever kill us.
        if libc::getppid() != parent {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
        let mut high = [0i32; 3];
        for (i, fd) in fds.iter().enumerate() {
            let d = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
            if d < 0 {
                return Err(std::io::Error::last_os_error());
            }
            high[i] = d;
        }
        for (i, fd) in high.iter().enumerate() {
            // dup2 clears FD_CLOEXEC on the target.
            if libc::dup2(*fd, 3 + i as i32) < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        if libc::syscall(
            libc::SYS_close_range,
            6u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            // Kernels before 5.11: fall back to marking one by one.
            for fd in 6..1024 {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
    }
    Ok(())
}

/// Resolves `user`/`group` to ids; only allowed when the daemon is root.
fn user_ids(cfg: &PoolConfig) -> Result<Option<(u32, u32)>, String> {
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
            .map_err(|e| format!("looking up user {u:?}: {e}"))?
            .ok_or_else(|| format!("no such user {u:?}"))?;
        uid = user.uid.as_raw();
        gid = user.gid.as_raw();
    }
    if let Some(g) = &cfg.group {
        let group = nix::unistd::Group::from_name(g)
            .map_err(|e| format!("looking up group {g:?}: {e}"))?
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
