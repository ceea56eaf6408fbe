//! Directories the daemon trusts: `state_dir`, `payload_dir` and the control
//! socket's directory when the daemon creates it.
//!
//! The daemon may run as root while other users share the machine, so a
//! directory it writes into must be one nobody else can plant a file or a
//! link in. Like PostgreSQL with its data directory and OpenSSH with
//! `~/.ssh`, it checks rather than trusts: the directory must be owned by the
//! daemon's effective uid and not writable by group or others, else the
//! daemon refuses to start with one line that names the path, its owner and
//! mode, and the fix. A directory it creates is created 0700 (whatever the
//! umask).
//!
//! The check is made on an open descriptor (`O_DIRECTORY | O_NOFOLLOW`), not
//! on the path, and [`PrivateDir`] keeps that descriptor: every file inside
//! is then opened, renamed and unlinked relative to it (`openat` and friends
//! with `O_NOFOLLOW`), so swapping the path for another directory or a link
//! later changes nothing.

use nix::fcntl::{open, OFlag};
use nix::sys::stat::{fchmod, fstat, Mode};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

/// How strict [`PrivateDir::open`] is about permission bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// Not writable by group or others (`mode & 0o022 == 0`): `state_dir`,
    /// `payload_dir`, a configured socket directory.
    NoForeignWrite,
    /// No access at all for group or others (`mode & 0o077 == 0`), as tmux
    /// and ssh-agent demand of their directory under `/tmp`: the default
    /// socket directory of a non-root user.
    OwnerOnly,
}

/// An open, checked directory.
#[derive(Debug)]
pub struct PrivateDir {
    path: PathBuf,
    fd: OwnedFd,
}

/// Why a directory is not trusted (or could not be made).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DirError(pub String);

impl PrivateDir {
    /// Opens `path` (creating it 0700 first when `create` is set and it is
    /// missing; missing parents are created with the default mode) and
    /// checks owner and mode. `what` names it in errors (`state_dir`, …).
    pub fn open(
        path: &Path,
        what: &str,
        create: bool,
        strictness: Strictness,
    ) -> Result<PrivateDir, DirError> {
        let mut created = false;
        if create {
            match std::fs::symlink_metadata(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent).map_err(|e| {
                            DirError(format!(
                                "cannot create {}: {e}; create it or choose another {what}",
                                parent.display()
                            ))
                        })?;
                    }
                    match nix::unistd::mkdir(path, Mode::from_bits_truncate(0o700)) {
                        Ok(()) => created = true,
                        Err(nix::errno::Errno::EEXIST) => {}
                        Err(e) => {
                            return Err(DirError(format!(
                                "cannot create {what} {}: {e}; create it (owned by uid {}, mode 0700) or choose another {what}",
                                path.display(),
                                nix::unistd::geteuid()
                            )))
                        }
                    }
                }
                _ => {}
            }
        }
        let fd = open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            let why = match e {
                nix::errno::Errno::ELOOP => "it is a symbolic link".to_string(),
                nix::errno::Errno::ENOTDIR if path.is_symlink() => {
                    "it is a symbolic link".to_string()
                }
                nix::errno::Errno::ENOTDIR => "it is not a directory".to_string(),
                e => e.desc().to_lowercase(),
            };
            DirError(format!(
                "cannot use {what} {}: {why}; point {what} at a directory owned by uid {} with mode 0700",
                path.display(),
                nix::unistd::geteuid()
            ))
        })?;
        if created {
            // mkdir's mode was masked by the umask; say it exactly.
            fchmod(&fd, Mode::from_bits_truncate(0o700))
                .map_err(|e| DirError(format!("cannot chmod {}: {e}", path.display())))?;
        }
        check(&fd, path, what, strictness)?;
        Ok(PrivateDir {
            path: path.to_path_buf(),
            fd,
        })
    }

    /// The path it was opened by (for messages; never for opening files).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory descriptor, for `openat` and friends.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A second descriptor of the same directory.
    pub fn try_clone(&self) -> std::io::Result<PrivateDir> {
        Ok(PrivateDir {
            path: self.path.clone(),
            fd: self.fd.try_clone()?,
        })
    }
}

impl AsRawFd for PrivateDir {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// Checks that the directory open as `fd` is owned by the effective uid and
/// has no forbidden permission bits.
fn check(fd: &OwnedFd, path: &Path, what: &str, strictness: Strictness) -> Result<(), DirError> {
    let st = fstat(fd).map_err(|e| DirError(format!("cannot stat {}: {e}", path.display())))?;
    let euid = nix::unistd::geteuid().as_raw();
    let mode = st.st_mode & 0o7777;
    let forbidden = match strictness {
        Strictness::NoForeignWrite => 0o022,
        Strictness::OwnerOnly => 0o077,
    };
    if st.st_uid == euid && mode & forbidden == 0 {
        return Ok(());
    }
    let owner = describe_uid(st.st_uid);
    let fix_mode = match strictness {
        Strictness::NoForeignWrite => "chmod go-w",
        Strictness::OwnerOnly => "chmod 0700",
    };
    let problem = if st.st_uid != euid {
        format!("owned by {owner}, not by uid {euid} that jobvisord runs as")
    } else {
        match strictness {
            Strictness::NoForeignWrite => format!("mode {mode:04o} lets group or others write"),
            Strictness::OwnerOnly => format!("mode {mode:04o} lets group or others in"),
        }
    };
    Err(DirError(format!(
        "refusing to use {what} {}: {problem} (owner {owner}, mode {mode:04o}); another user could plant files there. Fix: `chown {euid} {p} && {fix_mode} {p}`, or remove it and let jobvisord create it",
        path.display(),
        p = path.display(),
    )))
}

/// `uid 1001 (alice)`.
pub fn describe_uid(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("uid {uid} ({})", u.name),
        _ => format!("uid {uid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("jobvisor-pd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn creates_0700_whatever_the_umask() {
        let p = scratch("create");
        let old = nix::sys::stat::umask(Mode::from_bits_truncate(0o000));
        let r = PrivateDir::open(&p.join("d"), "state_dir", true, Strictness::OwnerOnly);
        nix::sys::stat::umask(old);
        let d = r.expect("created");
        let mode = std::fs::metadata(d.path()).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        std::fs::remove_dir_all(&p).unwrap();
    }

    #[test]
    fn refuses_foreign_writable_and_links() {
        let p = scratch("refuse");
        std::fs::create_dir_all(&p).unwrap();
        let d = p.join("open");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = PrivateDir::open(&d, "payload_dir", true, Strictness::NoForeignWrite)
            .expect_err("0777 refused");
        assert!(e.0.contains("mode 0777") && e.0.contains("chmod"), "{e}");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o750)).unwrap();
        PrivateDir::open(&d, "payload_dir", true, Strictness::NoForeignWrite)
            .expect("0750 is not foreign-writable");
        let e = PrivateDir::open(&d, "socket dir", true, Strictness::OwnerOnly)
            .expect_err("0750 refused for owner-only");
        assert!(e.0.contains("mode 0750"), "{e}");
        let link = p.join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        let e = PrivateDir::open(&link, "state_dir", true, Strictness::NoForeignWrite)
            .expect_err("link refused");
        assert!(e.0.contains("symbolic link"), "{e}");
        std::fs::remove_dir_all(&p).unwrap();
    }
}
