//! Payload files: inputs and outputs of at least
//! [`FILE_PAYLOAD_MIN`](super::FILE_PAYLOAD_MIN) bytes, stored as
//! `<payload_dir>/<id>.in` and `<id>.out` instead of in the database.
//!
//! This module only does the store's file I/O (writes, checks, removals);
//! which payload goes to a file, and when, is decided by the committer (see
//! the [store](super) docs). Every function runs on the store thread (or in
//! [`Store::open`](super::Store::open) before it starts), never on the event
//! loop. The daemon reads the files itself, off the loop.

use super::spares::Spares;
use super::StoreError;
use nix::fcntl::Flock;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

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
            _lock: None,
            spares: Spares::new(dir),
        }
    }

    /// Creates the directory if needed (see [`Payloads::create_dir`]) and
    /// locks it for this store.
    pub fn open(&mut self) -> Result<(), StoreError> {
        self.create_dir().map_err(|source| StoreError::Access {
            path: self.dir.clone(),
            source,
        })?;
        let dir = self.dir.clone();
        let lock = super::db::lock_file(&self.dir.join(".lock"), || StoreError::PayloadDirInUse {
            path: dir,
        })?;
        self._lock = Some(lock);
        self.spares.clear().map_err(|source| StoreError::Access {
            path: self.spares.dir().to_path_buf(),
            source,
        })
    }

    /// Creates the directory (mode 0700, with any missing parents) if it
    /// does not exist, and makes its directory entry durable.
    fn create_dir(&self) -> io::Result<()> {
        let dir = &self.dir;
        if !dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            // Best effort, as for the state directory: some file systems
            // refuse to fsync a directory.
            if let Some(parent) = dir.parent() {
                if let Ok(d) = File::open(parent) {
                    let _ = d.sync_all();
                }
            }
        }
        // A directory we cannot write to would fail every large submit:
        // say so now. (Root passes any permission check.)
        nix::unistd::access(
            dir.as_path(),
            nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
        )
        .map_err(io::Error::from)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn spares(&self) -> &Spares {
        &self.spares
    }

    /// `<dir>/<id>.in` or `<dir>/<id>.out`: [`input_file`](super::input_file)
    /// or [`output_file`](super::output_file).
    pub fn path(&self, id: u64, kind: Kind) -> PathBuf {
        match kind {
            Kind::Input => super::input_file(&self.dir, id),
            Kind::Output => super::output_file(&self.dir, id),
        }
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
        self.spares.create(&self.path(id, kind), len, false)
    }

    /// Like [`Payloads::write`], the data being the first `len` bytes of
    /// `src` (from offset 0), copied in the kernel (`copy_file_range`, or
    /// `pread`/`write` where the file systems do not support it).
    pub fn write_from(&self, id: u64, kind: Kind, src: &File, len: u64) -> io::Result<File> {
        use std::os::fd::AsRawFd;
        let mut file = self.create(id, kind, len)?;
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
        Ok(file)
    }

    /// Makes the directory's entries (files created or removed) durable.
    pub fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }

    /// Disposes of a file no row references. An input file is recycled
    /// (kept as a spare, see [`Spares::recycle`]); an output file is
    /// removed, never recycled: a client may still be reading it through
    /// a descriptor it was handed, and must not see it overwritten. A file
    /// that is already gone is no error.
    pub fn remove(&self, id: u64, kind: Kind) -> io::Result<()> {
        let path = self.path(id, kind);
        match kind {
            Kind::Input => self.spares.recycle(&path),
            Kind::Output => match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
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
    /// opening it.
    pub fn check(&self, id: u64, kind: Kind, expected: u64) -> Result<(), ReadError> {
        let path = self.path(id, kind);
        match std::fs::metadata(&path) {
            Ok(m) if m.len() == expected => Ok(()),
            Ok(m) => Err(ReadError::WrongLength {
                path,
                found: m.len(),
                expected,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ReadError::Missing(path)),
            Err(e) => Err(ReadError::Io(path, e)),
        }
    }

    /// The payload files in the directory, as `(id, kind)`. Other names are
    /// not ours and are left out (and alone).
    pub fn list(&self) -> io::Result<Vec<(u64, Kind)>> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            if let Some(parsed) = parse_name(name) {
                files.push(parsed);
            }
        }
        files.sort_unstable_by_key(|&(id, kind)| (id, kind == Kind::Output));
        Ok(files)
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
