//! Whether a directory may be trusted: owned by the right user, and not
//! open to others in the ways a [`Strictness`] forbids.
//!
//! The daemon (its state, payload and socket directories) and its clients
//! (the default socket's directory, before connecting to a socket in it)
//! apply the same rules. The check is made on an open descriptor
//! (`O_DIRECTORY | O_NOFOLLOW`), never on the path alone, so a symbolic link
//! planted in place of the directory is refused, not followed.

use nix::fcntl::{open, OFlag};
use nix::sys::stat::{fstat, FileStat, Mode};
use std::path::Path;

/// How strict a directory check is about permission bits.
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

/// Why a directory is not trusted (or could not be made).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DirError(pub String);

/// The permission bits `strictness` forbids, and the `chmod` that clears
/// them.
pub fn forbidden(strictness: Strictness) -> (u32, &'static str) {
    match strictness {
        Strictness::NoForeignWrite => (0o022, "chmod go-w"),
        Strictness::OwnerOnly => (0o077, "chmod 0700"),
    }
}

/// Whether a directory with status `st` is owned by one of `owners` and
/// has none of the bits `strictness` forbids.
pub fn fits(st: &FileStat, owners: &[u32], strictness: Strictness) -> bool {
    owners.contains(&st.st_uid) && st.st_mode & 0o7777 & forbidden(strictness).0 == 0
}

/// Checks, without creating or keeping anything, that the directory at
/// `path` is one a client may trust to hold the daemon's socket: owned by
/// the client's euid (or root) and, with [`Strictness::OwnerOnly`], closed to
/// group and others. `Ok(false)` if it does not exist.
pub fn check_existing(
    path: &Path,
    what: &str,
    strictness: Strictness,
    owners: &[u32],
) -> Result<bool, DirError> {
    let fd = match open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(false),
        Err(nix::errno::Errno::ELOOP) => {
            return Err(DirError(format!(
                "refusing to use {what} {}: it is a symbolic link; another user could have made it",
                path.display()
            )))
        }
        Err(nix::errno::Errno::ENOTDIR) if path.is_symlink() => {
            return Err(DirError(format!(
                "refusing to use {what} {}: it is a symbolic link; another user could have made it",
                path.display()
            )))
        }
        Err(e) => {
            return Err(DirError(format!(
                "cannot open {what} {}: {e}",
                path.display()
            )))
        }
    };
    let st = fstat(&fd).map_err(|e| DirError(format!("cannot stat {}: {e}", path.display())))?;
    if fits(&st, owners, strictness) {
        return Ok(true);
    }
    let mode = st.st_mode & 0o7777;
    let fix = forbidden(strictness).1;
    Err(DirError(format!(
        "refusing to use {what} {}: owner {}, mode {mode:04o}; it must be yours and {} (another user could have put a fake jobvisord there). Remove it and start jobvisord again, or fix it: `{fix} {}`",
        path.display(),
        describe_uid(st.st_uid),
        match strictness {
            Strictness::NoForeignWrite => "not writable by group or others",
            Strictness::OwnerOnly => "closed to group and others (0700)",
        },
        path.display()
    )))
}

/// `uid 1001 (alice)`.
pub fn describe_uid(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("uid {uid} ({})", u.name),
        _ => format!("uid {uid}"),
    }
}
