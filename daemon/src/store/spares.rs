//! Spare payload files: the pages of large payloads are recycled.
//!
//! Writing 64 MiB into a new file on tmpfs costs more than the copy itself:
//! every page is allocated and zeroed first (on the reference machine,
//! ~55–65 ms for 64 MiB, against ~16–24 ms to overwrite pages a file
//! already has). So payload files are recycled the way PostgreSQL recycles
//! its WAL segments:
//!
//! - an input file that is no longer needed (its job ended, was pruned or
//!   recovered dead, or its batch failed) is renamed into
//!   `<payload_dir>/.spare/` instead of being removed, while the spares stay
//!   within [`SPARE_MAX_BYTES`] and [`SPARE_MAX_FILES`]. Output files (of
//!   pruned jobs, replaced) are only ever removed, never recycled: a client
//!   may still be reading one through a descriptor it was handed;
//! - a new payload file is made by renaming a spare to its name, cutting it
//!   to the payload's length and overwriting it;
//! - a background thread at the lowest CPU priority makes [`SPARE_TARGET`]
//!   spares of the last large size (`fallocate`) each time a large output
//!   has been written ([`Spares::replenish`]): that is when a large job's
//!   copies are over, so the page allocation happens between large jobs,
//!   not beside their copies (which share the memory bandwidth);
//! - spares unused for [`IDLE_TRIM`] are removed, and the thread then
//!   sleeps without a timer.
//!
//! Crash safety is that of a new file: a spare is renamed to a payload
//! file's name only when that file is about to be written, and no row
//! references the file before its write is synced (the callers' rule).
//! Spares left by a crash are removed at the next start
//! ([`Spares::clear`]). Spares never hold anything a job needs.
//!
//! Both the store thread (inputs) and the copier thread (outputs) take
//! spares; a `rename` is atomic, so two takers never get the same file (the
//! loser finds it gone and looks again). Nothing here runs on the event loop.
//!
//! Every open, rename and unlink goes through the descriptors of the payload
//! directory and of `.spare/` ([`PrivateDir`], `O_NOFOLLOW`): a link found
//! there is removed, never followed, and never becomes a spare.

use crate::private_dir::{PrivateDir, Strictness};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// At most this many bytes of spares in all.
pub const SPARE_MAX_BYTES: u64 = 256 << 20;
/// At most this many spare files.
pub const SPARE_MAX_FILES: usize = 4;
/// Spares of the last large size the filler keeps ready: one for an input,
/// one for an output.
pub const SPARE_TARGET: usize = 2;
/// Smaller files are not worth keeping (they are not payload files anyway).
pub const SPARE_MIN_BYTES: u64 = 1 << 20;
/// Spares not taken for this long are removed.
pub const IDLE_TRIM: Duration = Duration::from_secs(60);
/// The filler leaves at least this many times a spare's size free on the
/// file system: spares must not be what makes a payload write fail.
const FREE_SPACE_FACTOR: u64 = 8;

/// What the filler thread is told.
enum Nudge {
    /// An output of this many bytes was just written: make spares of this
    /// size.
    Want(u64),
    /// A file was recycled (restarts the idle countdown).
    Recycled,
}

/// The spare payload files of one payload directory. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Spares {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `<payload_dir>/.spare` (for messages and tests).
    dir: PathBuf,
    /// The payload directory and `.spare/`, once [`Spares::clear`] opened
    /// them.
    dirs: OnceLock<Dirs>,
    /// Names of new spares.
    seq: AtomicU64,
    /// The filler thread, started at the first nudge (if `background`).
    filler: OnceLock<Option<Sender<Nudge>>>,
    background: bool,
    /// [`IDLE_TRIM`], shorter in tests.
    idle_trim: Duration,
}

#[derive(Debug)]
struct Dirs {
    payload: Arc<PrivateDir>,
    spare: PrivateDir,
}

/// A spare: its path and length.
type Spare = (PathBuf, u64);

fn not_open() -> io::Error {
    io::Error::other("the payload directory is not open")
}

impl Spares {
    /// The spares of `payload_dir` (nothing is done until they are used).
    pub fn new(payload_dir: &Path) -> Spares {
        Spares::with(payload_dir, true, IDLE_TRIM)
    }

    pub(super) fn with(payload_dir: &Path, background: bool, idle_trim: Duration) -> Spares {
        Spares {
            inner: Arc::new(Inner {
                dir: payload_dir.join(".spare"),
                dirs: OnceLock::new(),
                seq: AtomicU64::new(1),
                filler: OnceLock::new(),
                background,
                idle_trim,
            }),
        }
    }

    /// `<payload_dir>/.spare`
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The payload directory, open (once the store is).
    pub fn payload_dir(&self) -> io::Result<Arc<PrivateDir>> {
        Ok(Arc::clone(&self.dirs()?.payload))
    }

    fn dirs(&self) -> io::Result<&Dirs> {
        self.inner.dirs.get().ok_or_else(not_open)
    }

    /// Opens the payload directory's `.spare/` (creating it 0700, checked
    /// like its parent) and removes whatever a previous run left in it.
    /// Runs at store open, before any payload file is written.
    pub fn clear(&self, payload: Arc<PrivateDir>) -> io::Result<()> {
        let spare = payload
            .subdir(".spare", Strictness::NoForeignWrite)
            .map_err(|e| io::Error::other(e.0))?;
        for (name, _) in spare.entries()? {
            spare.unlink(&name)?;
        }
        let _ = self.inner.dirs.set(Dirs { payload, spare });
        Ok(())
    }

    /// Creates the payload file `name` (in the payload directory) for `len`
    /// bytes, open for writing at offset 0 and already `len` bytes long: a
    /// spare renamed to `name` when there is one (the smallest that holds
    /// `len` bytes, else the largest; none over twice as large), a new file
    /// otherwise. With `exclusive`, an existing `name` is an error
    /// (`AlreadyExists`); without it, it is replaced.
    ///
    /// The caller writes all `len` bytes (whatever a spare held before is
    /// still there until then) and syncs.
    pub fn create(&self, name: &str, len: u64, exclusive: bool) -> io::Result<File> {
        let file = match self.take(name, len, exclusive)? {
            Some(file) => file,
            None => {
                let payload = &self.dirs()?.payload;
                if !exclusive {
                    // Whatever was there goes (a link is removed, never
                    // written through).
                    payload.unlink(name)?;
                }
                payload.create_new(name)?
            }
        };
        file.set_len(len)?;
        Ok(file)
    }

    /// Asks the filler thread for [`SPARE_TARGET`] spares of `len` bytes.
    /// Called once a large output file is written: the job's copies are
    /// over by then (a fill beside them would slow them down).
    pub fn replenish(&self, len: u64) {
        if len >= SPARE_MIN_BYTES {
            self.nudge(Nudge::Want(len));
        }
    }

    /// Renames the best spare for `len` bytes to `name` and opens it.
    fn take(&self, name: &str, len: u64, exclusive: bool) -> io::Result<Option<File>> {
        let dirs = self.dirs()?;
        // A spare another thread renamed first is gone by the time we try:
        // look again (a bounded number of times; then make a new file).
        for _ in 0..SPARE_MAX_FILES + 1 {
            // Not one much larger than needed: its extra pages would be
            // freed at once, and a small file is cheap to make anyway.
            let mut spares = spare_names(&dirs.spare);
            spares.retain(|&(_, n)| n <= len.saturating_mul(2));
            spares.sort_by_key(|&(_, n)| n);
            let best = spares.iter().find(|&&(_, n)| n >= len).or(spares.last());
            let Some((spare, _)) = best else {
                return Ok(None);
            };
            match dirs.spare.rename(spare, &dirs.payload, name, exclusive) {
                Ok(()) => return dirs.payload.open_write(name).map(Some),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(e),
                // Anything else (renameat2 unsupported…): a new file.
                Err(_) => return Ok(None),
            }
        }
        Ok(None)
    }

    /// Disposes of the payload file `name`, which nothing references any
    /// more: kept as a spare if it is a regular file large enough and there
    /// is room, removed otherwise (a link is removed, never followed). A
    /// file that is already gone is no error.
    pub fn recycle(&self, name: &str) -> io::Result<()> {
        let dirs = self.dirs()?;
        let Some(st) = dirs.payload.stat(name)? else {
            return Ok(());
        };
        let regular = st.st_mode & libc::S_IFMT == libc::S_IFREG;
        let len = st.st_size as u64;
        if regular && len >= SPARE_MIN_BYTES {
            let spares = spare_names(&dirs.spare);
            let total: u64 = spares.iter().map(|&(_, n)| n).sum();
            if spares.len() < SPARE_MAX_FILES
                && total + len <= SPARE_MAX_BYTES
                && dirs
                    .payload
                    .rename(name, &dirs.spare, &self.fresh_name(), true)
                    .is_ok()
            {
                self.nudge(Nudge::Recycled);
                return Ok(());
            }
        }
        dirs.payload.unlink(name)
    }

    /// The spares now, as `(path, length)`.
    pub fn list(&self) -> Vec<Spare> {
        match self.dirs() {
            Ok(d) => spare_names(&d.spare)
                .into_iter()
                .map(|(name, n)| (self.dir().join(name), n))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    fn fresh_name(&self) -> String {
        let n = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        format!("{n}")
    }

    /// Tells the filler thread, starting it the first time.
    fn nudge(&self, nudge: Nudge) {
        if !self.inner.background {
            return;
        }
        let filler = self.inner.filler.get_or_init(|| {
            let (tx, rx) = mpsc::channel();
            let spares = Spares {
                inner: Arc::clone(&self.inner),
            };
            // Without the thread, spares are still recycled; only the
            // background fill and the idle trim are missing.
            std::thread::Builder::new()
                .name("jobvisor-spares".into())
                .spawn(move || spares.run_filler(rx))
                .ok()
                .map(|_| tx)
        });
        if let Some(tx) = filler {
            let _ = tx.send(nudge);
        }
    }

    /// The filler thread: tops the spares up after each `Want`, removes
    /// them all after [`IDLE_TRIM`] without one, and sleeps without a
    /// timer while there are none. It holds only a weak reference, so it
    /// ends when the last [`Spares`] handle goes.
    fn run_filler(self, rx: mpsc::Receiver<Nudge>) {
        // The lowest priority (nice is per thread on Linux): this is work
        // for idle cores, never in the way of a job.
        // SAFETY: plain system calls on this thread's own id.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, 19);
        }
        let idle_trim = self.inner.idle_trim;
        let weak = Arc::downgrade(&self.inner);
        drop(self);
        loop {
            let idle = weak
                .upgrade()
                .is_none_or(|inner| Spares { inner }.list().is_empty());
            let nudge = if idle {
                rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                rx.recv_timeout(idle_trim)
            };
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let spares = Spares { inner };
            match nudge {
                Ok(Nudge::Want(len)) => spares.fill(len),
                Ok(Nudge::Recycled) => {}
                Err(RecvTimeoutError::Timeout) => {
                    if let Ok(d) = spares.dirs() {
                        for (name, _) in spare_names(&d.spare) {
                            let _ = d.spare.unlink(&name);
                        }
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Makes spares of `want` bytes until [`SPARE_TARGET`] of them hold
    /// `want` bytes, within the limits (smaller spares make room first).
    pub(super) fn fill(&self, want: u64) {
        if want > SPARE_MAX_BYTES {
            return;
        }
        let Ok(dirs) = self.dirs() else {
            return;
        };
        // Each turn makes or removes one file: bounded even if the listing
        // were to miss what was just made.
        for _ in 0..2 * SPARE_MAX_FILES {
            let mut spares = spare_names(&dirs.spare);
            spares.sort_by_key(|&(_, n)| n);
            if spares.iter().filter(|&&(_, n)| n >= want).count() >= SPARE_TARGET {
                return;
            }
            let total: u64 = spares.iter().map(|&(_, n)| n).sum();
            if spares.len() >= SPARE_MAX_FILES || total + want > SPARE_MAX_BYTES {
                match spares.first() {
                    Some((name, n)) if *n < want => {
                        let _ = dirs.spare.unlink(name);
                        continue;
                    }
                    _ => return,
                }
            }
            if self.make_spare(want).is_err() {
                return;
            }
        }
    }

    /// One new spare of `len` bytes of allocated pages (blocks), made under
    /// a `fill-` name and renamed when complete.
    fn make_spare(&self, len: u64) -> io::Result<()> {
        let dir = &self.dirs()?.spare;
        if dir.free_bytes()? < len.saturating_mul(FREE_SPACE_FACTOR) {
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        let n = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let tmp = format!("fill-{n}");
        let made = (|| {
            let file = dir.create_new(&tmp)?;
            let len = libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
            // SAFETY: plain system call on a descriptor we hold.
            if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } != 0 {
                return Err(io::Error::last_os_error());
            }
            dir.rename(&tmp, dir, &format!("{n}"), true)
        })();
        if made.is_err() {
            let _ = dir.unlink(&tmp);
        }
        made
    }
}

/// The spares in `dir`, as `(name, length)`: regular files with a numeric
/// name. Files being filled (`fill-…`) are not spares yet; anything else
/// (which the daemon never makes there) is left out.
fn spare_names(dir: &PrivateDir) -> Vec<(String, u64)> {
    let Ok(entries) = dir.entries() else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter(|(name, st)| {
            st.st_mode & libc::S_IFMT == libc::S_IFREG && name.bytes().all(|b| b.is_ascii_digit())
        })
        .map(|(name, st)| (name, st.st_size as u64))
        .collect()
}
