//! A cgroup per worker, where the service manager delegated the daemon's
//! cgroup to it (systemd's `Delegate=yes`, which marks the cgroup with the
//! `trusted.delegate` extended attribute): every process a worker starts,
//! however it detaches itself (`setsid`, double fork, its own process
//! group), stays in the worker's cgroup, and writing `1` to `cgroup.kill`
//! when the worker exits kills them all at once, by the kernel's count
//! rather than by the daemon's attribution (compare `orphans.rs`, which
//! stays as the fallback everywhere else).
//!
//! Layout: the daemon's own cgroup `C` (from `/proc/self/cgroup`, on the
//! cgroup2 mount) gets one child `C/worker-<pool>-<slot>-<n>` per spawned
//! worker. The daemon enables no controller in `C`, so the kernel's rule of
//! no processes in inner cgroups (which applies to controllers) does not
//! require moving the daemon into a leaf. The child joins its cgroup as its
//! very first step (it writes `0` to the `cgroup.procs` opened for it before
//! the clone). A cgroup is removed once it is empty; one still draining is
//! retried at the next exit and at shutdown.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// The delegated cgroup the daemon runs in, and the worker cgroups it made.
#[derive(Debug)]
pub struct WorkerCgroups {
    dir: PathBuf,
    next: u64,
    /// Worker cgroups killed but not yet removed (still draining).
    draining: Vec<PathBuf>,
}

impl WorkerCgroups {
    /// The daemon's cgroup if it is a cgroup2 directory delegated to it
    /// (`trusted.delegate` or `user.delegate` set to `1`) and writable;
    /// `None` otherwise (then `orphans.rs` alone keeps descendants from
    /// surviving).
    pub fn detect() -> Option<WorkerCgroups> {
        let dir = own_cgroup_dir()?;
        let delegated = ["trusted.delegate", "user.delegate"]
            .iter()
            .any(|a| xattr(&dir, a).is_some_and(|v| v.starts_with(b"1")));
        if !delegated
            || nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).is_err()
            || !dir.join("cgroup.kill").exists()
        {
            return None;
        }
        Some(WorkerCgroups {
            dir,
            next: 1,
            draining: Vec::new(),
        })
    }

    /// The daemon's cgroup directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A new cgroup for a worker of `pool`'s slot `slot`, and its
    /// `cgroup.procs` open for writing (for the child to join it).
    pub fn create(&mut self, pool: &str, slot: u32) -> std::io::Result<(PathBuf, OwnedFd)> {
        let path = self.dir.join(format!("worker-{pool}-{slot}-{}", self.next));
        self.next += 1;
        std::fs::create_dir(&path)?;
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(path.join("cgroup.procs"))
            .inspect_err(|_| {
                let _ = std::fs::remove_dir(&path);
            })?;
        Ok((path, procs.into()))
    }

    /// The worker of cgroup `path` exited: kill whatever is left in it,
    /// and remove it (now, or once it has drained).
    pub fn finish(&mut self, path: PathBuf) {
        if let Err(e) = std::fs::write(path.join("cgroup.kill"), b"1") {
            if e.kind() != std::io::ErrorKind::NotFound {
                crate::warn!("cannot kill cgroup {}: {e}", path.display());
            }
        }
        self.draining.push(path);
        self.sweep();
    }

    /// Removes the killed cgroups that have emptied.
    pub fn sweep(&mut self) {
        self.draining.retain(|p| match std::fs::remove_dir(p) {
            Ok(()) => false,
            Err(e) => e.kind() != std::io::ErrorKind::NotFound,
        });
    }

    /// Killed cgroups not yet removed.
    pub fn draining(&self) -> usize {
        self.draining.len()
    }
}

/// `<cgroup2 mount>/<path>` of this process's cgroup (the `0::` line of
/// `/proc/self/cgroup`).
fn own_cgroup_dir() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mounts.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        post.starts_with("cgroup2 ")
            .then(|| pre.split(' ').nth(4).map(PathBuf::from))
            .flatten()
    })?;
    Some(mount.join(rel.trim_start_matches('/')))
}

/// The value of extended attribute `name` of `path`, if set.
fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let n = std::ffi::CString::new(name).ok()?;
    let mut buf = [0u8; 16];
    // SAFETY: getxattr writes at most `buf.len()` bytes into `buf`; both
    // strings are NUL-terminated.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (len >= 0).then(|| buf[..len as usize].to_vec())
}
