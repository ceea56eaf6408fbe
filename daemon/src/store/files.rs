//! Payload files: inputs and outputs of at least
//! [`FILE_PAYLOAD_MIN`](super::FILE_PAYLOAD_MIN) bytes, stored as
//! `<payload_dir>/<id>.in` and `<id>.out` instead of in the database.
//!
//! This module only does the store's file I/O (writes, checks, removals);
//! which payload goes to a file, and when, is decided by the committer (see
//! the [store](super) docs). Every function runs on the store thread (or in
//! [`Store::open`](super::Store::open) before it starts), never on the event
//! loop. The daemon reads the files itself, off the loop.
//!
//! The directory is a [`PrivateDir`]: owned by the daemon's user and not
//! writable by anyone else (checked at open, else the store refuses to
//! open), and every file in it is opened, renamed and removed through its
//! descriptor with `O_NOFOLLOW`, so no link planted there is ever followed.

use super::spares::Spares;
use super::StoreError;
use crate::private_dir::{PrivateDir, Strictness};
use nix::fcntl::Flock;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which payload of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Kind {
    /// `<id>.in`
    Input,
    /// `<id>.out`
    Output,
}

/// Why a payload file is not usable (see [`Payloads::check`]).
#[derive(Debug)]
pub(super) enum ReadError {
    /// The file does not exist (deleted by hand, or the directory is on a
    /// file system that lost it, e.g. tmpfs after a reboot).
    Missing(PathBuf),
    /// The file does not have the length its row recorded.
    WrongLength {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    /// Something that is not a regular file has the payload file's name
    /// (a link, a FIFO): it is never followed or read.
    NotAFile(PathBuf),
    /// Any other I/O error.
    Io(PathBuf, io::Error),
}

impl std::fmt::Display for ReadError {
    /// "… payload file PATH is missing" and the like, to be preceded by
    /// "input" or "output".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Missing(path) => write!(f, "payload file {} is missing", path.display()),
            ReadError::WrongLength {
                path,
                found,
                expected,
            } => write!(
                f,
                "payload file {} has {found} bytes instead of {expected}",
                path.display()
            ),
            ReadError::NotAFile(path) => write!(
                f,
                "payload file {} is not a regular file (it is not used)",
                path.display()
            ),
            ReadError::Io(path, e) => write!(
                f,
                "payload file {} cannot be read: {}",
                path.display(),
                super::db::os_reason(e)
            ),
        }
    }
}

/// The payload directory.
#[derive(Debug)]
pub(super) struct Payloads {
    dir: PathBuf,
    /// The open, checked directory (from [`Payloads::open`] on).
    fd: Option<Arc<PrivateDir>>,
    /// `<dir>/.lock`, held while the store is open: two stores sharing the
    /// directory would overwrite (and sweep away) each other's files.
    _lock: Option<Flock<File>>,
    /// Where new payload files come from and old ones go.
    spares: Spares,
}

impl Payloads {
    /// The directory `dir` (nothing is done to it until [`Payloads::open`]).
    pub fn new(dir: &Path) -> Payloads {
        Payloads {
            dir: dir.to_path_buf(),
            fd: None,
            _lock: None,
            spares: Spares::new(dir),
        }
    }

    /// Opens the directory (creating it 0700 if needed; refusing one that
    /// another user owns or may write to), locks it for this store and
    /// clears its spares.
    pub fn open(&mut self) -> Result<(), StoreError> {
        let existed = self.dir.is_dir();
        let fd = PrivateDir::open(
            &self.dir,
            "daemon.payload_dir",
            true,
            Strictness::NoForeignWrite,
        )
        .map_err(|e| StoreError::Untrusted(e.0))?;
        if !existed {
            // Best effort, as for the state directory: make the new
            // directory's entry durable.
            if let Some(parent) = self.dir.parent() {
                if let Ok(d) = File::open(parent) {
                    let _ = d.sync_all();
                }
            }
        }
        // A directory we cannot write to would fail every large submit:
        // say so now. (Root passes any permission check.)
        nix::unistd::access(
            self.dir.as_path(),
            nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
        )
        .map_err(|errno| StoreError::Access {
            path: self.dir.clone(),
            source: io::Error::from(errno),
        })?;
        let dir = self.dir.clone();
        let lock = super::db::lock_file(&fd, ".lock", &self.dir.join(".lock"), || {
            StoreError::PayloadDirInUse { path: dir }
        })?;
        self._lock = Some(lock);
        let fd = Arc::new(fd);
        self.spares
            .clear(Arc::clone(&fd))
            .map_err(|source| StoreError::Access {
                path: self.spares.dir().to_path_buf(),
                source,
            })?;
        self.fd = Some(fd);
        Ok(())
    }

    /// The open directory (after [`Payloads::open`]).
    pub fn handle(&self) -> io::Result<&Arc<PrivateDir>> {
        self.fd
            .as_ref()
            .ok_or_else(|| io::Error::other("the payload directory is not open"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn spares(&self) -> &Spares {
        &self.spares
    }

    /// `<dir>/<id>.in` or `<dir>/<id>.out`: [`input_file`](super::input_file)
    /// or [`output_file`](super::output_file). For messages: files are
    /// opened by [`name`] through the directory's descriptor.
    pub fn path(&self, id: u64, kind: Kind) -> PathBuf {
        self.dir.join(name(id, kind))
    }

    /// Creates (or replaces) the file and writes `data`, without syncing:
    /// the caller syncs the returned file, then the directory.
    pub fn write(&self, id: u64, kind: Kind, data: &[u8]) -> io::Result<File> {
        let mut file = self.create(id, kind, data.len() as u64)?;
        file.write_all(data)?;
        Ok(file)
    }

    /// Creates (or replaces) a payload file of `len` bytes, owner-only,
    /// from a spare where there is one (see [`Spares::create`]).
    fn create(&self, id: u64, kind: Kind, len: u64) -> io::Result<File> {
        self.spares.create(&name(id, kind), len, false)
    }

    /// Like [`Payloads::write`], the data being the first `len` bytes of
    /// `src` (from offset 0), copied in the kernel (`copy_file_range`, or
    /// `pread`/`write` where the file systems do not support it).
    pub fn write_from(&self, id: u64, kind: Kind, src: &File, len: u64) -> io::Result<File> {
        self.write_from_file(id, kind, src, len).map_err(|(_, e)| e)
    }

    /// [`Payloads::write_from`], saying which step failed: making the
    /// payload file (`true`: the store's side) or the copy (`false`: the
    /// source's side, or the store's disk filling up).
    pub fn write_from_file(
        &self,
        id: u64,
        kind: Kind,
        src: &File,
        len: u64,
    ) -> Result<File, (bool, io::Error)> {
        let file = self.create(id, kind, len).map_err(|e| (true, e))?;
        copy_from(file, src, len).map_err(|e| (false, e))
    }
}

/// Copies the first `len` bytes of `src` (from offset 0) into `file`, in
/// the kernel (`copy_file_range`, or `pread`/`write` where the file systems
/// do not support it).
fn copy_from(mut file: File, src: &File, len: u64) -> io::Result<File> {
    {
        use std::os::fd::AsRawFd;
        let mut off_in: libc::loff_t = 0;
        let mut left = len;
        while left > 0 {
            // SAFETY: plain system call on two descriptors we hold; the
            // kernel updates `off_in` (the source's own offset is not used).
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    file.as_raw_fd(),
                    std::ptr::null_mut(),
                    left.min(1 << 30) as usize,
                    0,
                )
            };
            if n > 0 {
                left -= n as u64;
                continue;
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the input ended after {off_in} of {len} bytes"),
                ));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                // Not supported between these files: copy through memory.
                Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                    let mut buf = vec![0u8; 1 << 20];
                    while left > 0 {
                        let want = buf.len().min(left as usize);
                        let got = std::os::unix::fs::FileExt::read_at(
                            src,
                            &mut buf[..want],
                            off_in as u64,
                        )?;
                        if got == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                format!("the input ended after {off_in} of {len} bytes"),
                            ));
                        }
                        file.write_all(&buf[..got])?;
                        off_in += got as libc::loff_t;
                        left -= got as u64;
                    }
                }
                _ => return Err(e),
            }
        }
    }
    Ok(file)
}

impl Payloads {
    /// Makes the directory's entries (files created or removed) durable.
    pub fn sync_dir(&self) -> io::Result<()> {
        self.handle()?.sync()
    }

    /// Disposes of a file no row references. An input file is recycled
    /// (kept as a spare, see [`Spares::recycle`]); an output file is
    /// removed, never recycled: a client may still be reading it through
    /// a descriptor it was handed, and must not see it overwritten. A file
    /// that is already gone is no error.
    pub fn remove(&self, id: u64, kind: Kind) -> io::Result<()> {
        let name = name(id, kind);
        match kind {
            Kind::Input => self.spares.recycle(&name),
            Kind::Output => self.handle()?.unlink(&name),
        }
    }

    /// Disposes of files committed rows no longer reference (see
    /// [`Payloads::remove`]: inputs recycled, outputs unlinked), after the
    /// commit. Housekeeping: a file that fails here goes at the next start.
    pub fn remove_deleted(&self, files: &[(u64, Kind)]) {
        for &(id, kind) in files {
            let _ = self.remove(id, kind);
        }
    }

    /// Checks that a payload file of `expected` bytes is there, without
    /// opening it (nor following a link: a link is no payload file).
    pub fn check(&self, id: u64, kind: Kind, expected: u64) -> Result<(), ReadError> {
        let path = self.path(id, kind);
        let stat = self
            .handle()
            .and_then(|d| d.stat(&name(id, kind)))
            .map_err(|e| ReadError::Io(path.clone(), e))?;
        match stat {
            None => Err(ReadError::Missing(path)),
            Some(st) if st.st_mode & libc::S_IFMT != libc::S_IFREG => {
                Err(ReadError::NotAFile(path))
            }
            Some(st) if st.st_size as u64 == expected => Ok(()),
            Some(st) => Err(ReadError::WrongLength {
                path,
                found: st.st_size as u64,
                expected,
            }),
        }
    }

    /// The payload files in the directory, as `(id, kind)` (whatever their
    /// type: a link with a payload file's name is listed, to be swept).
    /// Other names are not ours and are left out (and alone).
    pub fn list(&self) -> io::Result<Vec<(u64, Kind)>> {
        let mut files = Vec::new();
        for (name, _) in self.handle()?.entries()? {
            if let Some(parsed) = parse_name(&name) {
                files.push(parsed);
            }
        }
        files.sort_unstable_by_key(|&(id, kind)| (id, kind == Kind::Output));
        Ok(files)
    }
}

/// The name of a payload file in its directory: `<id>.in` or `<id>.out`.
pub fn name(id: u64, kind: Kind) -> String {
    match kind {
        Kind::Input => format!("{id}.in"),
        Kind::Output => format!("{id}.out"),
    }
}

/// `"<id>.in"` / `"<id>.out"`, with `id` in canonical decimal form (the
/// form [`Payloads::path`] writes).
fn parse_name(name: &str) -> Option<(u64, Kind)> {
    let (id, ext) = name.split_once('.')?;
    let kind = match ext {
        "in" => Kind::Input,
        "out" => Kind::Output,
        _ => return None,
    };
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let id: u64 = id.parse().ok()?;
    (format!("{id}.{ext}") == name).then_some((id, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canonical_names_are_payload_files() {
        assert_eq!(parse_name("12.in"), Some((12, Kind::Input)));
        assert_eq!(parse_name("0.out"), Some((0, Kind::Output)));
        for name in [
            "012.in",
            "12.in.tmp",
            "12.txt",
            ".in",
            "a.in",
            "+1.in",
            "12",
            "12.IN",
            "x",
        ] {
            assert_eq!(parse_name(name), None, "{name}");
        }
    }
}
