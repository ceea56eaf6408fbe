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
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

pub use jobvisor_client::trust::{check_existing, describe_uid, DirError, Strictness};
use jobvisor_client::trust::{fits, forbidden};

/// An open, checked directory.
#[derive(Debug)]
pub struct PrivateDir {
    path: PathBuf,
    fd: OwnedFd,
}

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
        PrivateDir::open_mode(path, what, create.then_some(0o700), strictness)
    }

    /// [`PrivateDir::open`], creating a missing directory with `create`'s
    /// mode (exactly, whatever the umask) when it is `Some`: 0755 for the
    /// socket directory of a root daemon, which its group's users must be
    /// able to enter.
    pub fn open_mode(
        path: &Path,
        what: &str,
        create: Option<u32>,
        strictness: Strictness,
    ) -> Result<PrivateDir, DirError> {
        let create_mode = create.unwrap_or(0o700);
        let create = create.is_some();
        let mut created = false;
        if create {
            match std::fs::symlink_metadata(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent).map_err(|e| {
                            DirError(format!(
                                "cannot create {}: {e}; create it or set {what} to another directory",
                                parent.display()
                            ))
                        })?;
                    }
                    match nix::unistd::mkdir(path, Mode::from_bits_truncate(0o700)) {
                        Ok(()) => created = true,
                        Err(nix::errno::Errno::EEXIST) => {}
                        Err(e) => {
                            return Err(DirError(format!(
                                "cannot create {what} {}: {e}; create it (owned by uid {}, mode 0700) or set {what} to another directory",
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
                "cannot use {what} {}: {why}; set {what} to a directory owned by uid {} with mode 0700",
                path.display(),
                nix::unistd::geteuid()
            ))
        })?;
        if created {
            // mkdir's mode was masked by the umask; say it exactly.
            fchmod(&fd, Mode::from_bits_truncate(create_mode))
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
}

/// Flags of every open inside a trusted directory: never through a link,
/// never into a FIFO's wait, never inherited by a worker.
fn at_flags() -> OFlag {
    OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK
}

/// A file opened inside a trusted directory must be a regular file (a
/// FIFO, device or directory planted there is refused, not used).
fn regular(file: std::fs::File, name: &str) -> io::Result<std::fs::File> {
    if file.metadata()?.file_type().is_file() {
        Ok(file)
    } else {
        Err(io::Error::other(format!("{name} is not a regular file")))
    }
}

/// `ELOOP` from `O_NOFOLLOW` says "too many levels of symbolic links";
/// say what it means here.
fn no_link(e: nix::errno::Errno, name: &str) -> io::Error {
    match e {
        nix::errno::Errno::ELOOP => io::Error::other(format!(
            "{name} is a symbolic link, which is never followed"
        )),
        e => io::Error::from(e),
    }
}

impl PrivateDir {
    /// Opens `name` (a plain file name, no `/`) inside the directory for
    /// reading, never through a link; it must be a regular file.
    pub fn open_read(&self, name: &str) -> io::Result<std::fs::File> {
        let fd = nix::fcntl::openat(&self.fd, name, OFlag::O_RDONLY | at_flags(), Mode::empty())
            .map_err(|e| no_link(e, name))?;
        regular(std::fs::File::from(fd), name)
    }

    /// Opens the existing regular file `name` for writing, never through a
    /// link.
    pub fn open_write(&self, name: &str) -> io::Result<std::fs::File> {
        let fd = nix::fcntl::openat(&self.fd, name, OFlag::O_WRONLY | at_flags(), Mode::empty())
            .map_err(|e| no_link(e, name))?;
        regular(std::fs::File::from(fd), name)
    }

    /// Creates the new file `name` (mode 0600) for writing; an existing
    /// name (a link included) is `AlreadyExists`.
    pub fn create_new(&self, name: &str) -> io::Result<std::fs::File> {
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | at_flags();
        let fd = nix::fcntl::openat(&self.fd, name, flags, Mode::from_bits_truncate(0o600))
            .map_err(|e| no_link(e, name))?;
        regular(std::fs::File::from(fd), name)
    }

    /// Opens (creating it 0600 if needed) `name` for reading and writing,
    /// without truncating it: lock files and the database.
    pub fn open_or_create(&self, name: &str) -> io::Result<std::fs::File> {
        let fd = nix::fcntl::openat(
            &self.fd,
            name,
            OFlag::O_RDWR | OFlag::O_CREAT | at_flags(),
            Mode::from_bits_truncate(0o600),
        )
        .map_err(|e| no_link(e, name))?;
        regular(std::fs::File::from(fd), name)
    }

    /// The status of `name` itself (a link is not followed), or `None` if
    /// there is no such entry.
    pub fn stat(&self, name: &str) -> io::Result<Option<nix::sys::stat::FileStat>> {
        match nix::sys::stat::fstatat(&self.fd, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(nix::errno::Errno::ENOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the entry `name` (a file or a link, never what a link
    /// points to); one that is already gone is no error.
    pub fn unlink(&self, name: &str) -> io::Result<()> {
        match nix::unistd::unlinkat(&self.fd, name, nix::unistd::UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Renames `from` in this directory to `to` in `dest` (which may be
    /// this one); with `exclusive`, an existing `to` is `AlreadyExists`
    /// (`RENAME_NOREPLACE`).
    pub fn rename(
        &self,
        from: &str,
        dest: &PrivateDir,
        to: &str,
        exclusive: bool,
    ) -> io::Result<()> {
        let flags = if exclusive {
            nix::fcntl::RenameFlags::RENAME_NOREPLACE
        } else {
            nix::fcntl::RenameFlags::empty()
        };
        nix::fcntl::renameat2(&self.fd, from, &dest.fd, to, flags).map_err(io::Error::from)
    }

    /// Makes the directory's entries durable (`fsync` of the directory).
    /// Some file systems refuse to sync a directory (`EINVAL`): no error.
    pub fn sync(&self) -> io::Result<()> {
        match nix::unistd::fsync(&self.fd) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The names in the directory (not `.` and `..`), with their type and
    /// size as `lstat` sees them (a link is not followed).
    pub fn entries(&self) -> io::Result<Vec<(String, nix::sys::stat::FileStat)>> {
        let mut dir = nix::dir::Dir::openat(
            &self.fd,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let mut out = Vec::new();
        for entry in dir.iter() {
            let entry = entry?;
            let Ok(name) = entry.file_name().to_str() else {
                continue;
            };
            if name == "." || name == ".." {
                continue;
            }
            if let Some(st) = self.stat(name)? {
                out.push((name.to_string(), st));
            }
        }
        Ok(out)
    }

    /// Free bytes on the directory's file system.
    pub fn free_bytes(&self) -> io::Result<u64> {
        let st = nix::sys::statvfs::fstatvfs(&self.fd)?;
        Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
    }

    /// The subdirectory `name`, created 0700 if missing, opened without
    /// following a link and checked like its parent.
    pub fn subdir(&self, name: &str, strictness: Strictness) -> Result<PrivateDir, DirError> {
        let path = self.path.join(name);
        match nix::sys::stat::mkdirat(&self.fd, name, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(DirError(format!("cannot create {}: {e}", path.display()))),
        }
        let fd = nix::fcntl::openat(
            &self.fd,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            DirError(format!(
                "cannot open {}: {}",
                path.display(),
                no_link(e, name)
            ))
        })?;
        check(&fd, &path, name, strictness)?;
        Ok(PrivateDir { path, fd })
    }

    /// Whether `path` (not followed if it is a link) is still this very
    /// directory: for a library that only takes paths (SQLite), checked
    /// once it has its files open.
    pub fn is_at(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (Ok(st), Ok(m)) = (fstat(&self.fd), std::fs::symlink_metadata(path)) else {
            return false;
        };
        m.is_dir() && m.dev() == st.st_dev && m.ino() == st.st_ino
    }
}

/// Checks that the directory open as `fd` is owned by the effective uid and
/// has no forbidden permission bits.
fn check(fd: &OwnedFd, path: &Path, what: &str, strictness: Strictness) -> Result<(), DirError> {
    let st = fstat(fd).map_err(|e| DirError(format!("cannot stat {}: {e}", path.display())))?;
    let euid = nix::unistd::geteuid().as_raw();
    if fits(&st, &[euid], strictness) {
        return Ok(());
    }
    let mode = st.st_mode & 0o7777;
    let owner = describe_uid(st.st_uid);
    let fix_mode = forbidden(strictness).1;
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
        let r = PrivateDir::open(
            &p.join("d"),
            "daemon.state_dir",
            true,
            Strictness::OwnerOnly,
        );
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
        let e = PrivateDir::open(&d, "daemon.payload_dir", true, Strictness::NoForeignWrite)
            .expect_err("0777 refused");
        assert!(e.0.contains("mode 0777") && e.0.contains("chmod"), "{e}");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o750)).unwrap();
        PrivateDir::open(&d, "daemon.payload_dir", true, Strictness::NoForeignWrite)
            .expect("0750 is not foreign-writable");
        let e = PrivateDir::open(&d, "socket dir", true, Strictness::OwnerOnly)
            .expect_err("0750 refused for owner-only");
        assert!(e.0.contains("mode 0750"), "{e}");
        let link = p.join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        let e = PrivateDir::open(&link, "daemon.state_dir", true, Strictness::NoForeignWrite)
            .expect_err("link refused");
        assert!(e.0.contains("symbolic link"), "{e}");
        std::fs::remove_dir_all(&p).unwrap();
    }
}
