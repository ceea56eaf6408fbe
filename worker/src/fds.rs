//! Worker protocol 2: descriptors on the job socket (fd 3).
//!
//! When fd 3 is a Unix stream socket, this library reads it with `recvmsg`
//! and announces protocol 2 in `Ready`. The daemon may then attach
//! descriptors to a job's frame (`SCM_RIGHTS`, on the frame's first byte):
//! the input as the client's memfd (`Payload::Fd`), and an output buffer
//! (`ToWorker::JobOut`). Every read's descriptors go into a FIFO; once a
//! frame is decoded, its descriptors are at the head (a `recvmsg` returns a
//! message's descriptors with its first bytes and never reads past that
//! message), and [`JobFds::take`] claims them.
//!
//! - The input memfd is mapped read-only ([`map_input`]), after checking its
//!   seals: no shrinking (the mapping can never fault) and no writing.
//! - The output buffer is mapped read-write ([`OutputBuffer`]) when the
//!   output grows past the inline limit, and grown with `ftruncate` when the
//!   output needs more room than it has. The daemon checks that the client
//!   sealed it against shrinking. The answer is `Payload::Fd { len }`: the
//!   output is the buffer's first `len` bytes, nothing is copied after.
//! - Mappings are kept for the next jobs ([`MapCache`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSliceMut, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use ipc_proto::worker::{Payload, ToWorker};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};

/// Most descriptors one read may bring (the daemon attaches at most two to
/// a frame, and a read stops after the first frame that carries some).
const MAX_FDS_PER_READ: usize = 8;

/// Most received descriptors waiting for their frame: past this the daemon
/// broke the protocol.
const MAX_PENDING_FDS: usize = 64;

/// The job stream: bytes, and with protocol 2 descriptors.
pub(crate) trait JobStream: Send + 'static {
    /// Like `Read::read`; descriptors that came with the bytes go to the
    /// back of `fds`.
    fn read_fds(&mut self, buf: &mut [u8], fds: &mut VecDeque<OwnedFd>) -> io::Result<usize>;
}

/// Any byte stream, without descriptors (protocol 1).
pub(crate) struct Plain<R>(pub(crate) R);

impl<R: Read + Send + 'static> JobStream for Plain<R> {
    fn read_fds(&mut self, buf: &mut [u8], _fds: &mut VecDeque<OwnedFd>) -> io::Result<usize> {
        self.0.read(buf)
    }
}

/// A Unix stream socket read with `recvmsg` (protocol 2).
pub(crate) struct FdSocket(pub(crate) File);

impl JobStream for FdSocket {
    fn read_fds(&mut self, buf: &mut [u8], fds: &mut VecDeque<OwnedFd>) -> io::Result<usize> {
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS_PER_READ]);
        let mut iov = [IoSliceMut::new(buf)];
        let msg = recvmsg::<UnixAddr>(
            self.0.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let n = msg.bytes;
        // Own every received descriptor first, so none leaks on an error.
        let mut got = Vec::new();
        for c in msg
            .cmsgs()
            .map_err(|_| bad("too many descriptors in one read"))?
        {
            if let ControlMessageOwned::ScmRights(raw) = c {
                for fd in raw {
                    // SAFETY: the kernel just installed `fd` for us
                    // (SCM_RIGHTS); nothing else owns it.
                    got.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if fds.len() + got.len() > MAX_PENDING_FDS {
            return Err(bad("more descriptors than frames that claim them"));
        }
        fds.extend(got);
        Ok(n)
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Whether `fd` is a Unix stream socket (fd 3 of a daemon that passes
/// descriptors; a pipe with an older one).
pub(crate) fn is_socket(fd: &impl AsFd) -> bool {
    nix::sys::stat::fstat(fd.as_fd()).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK)
}

/// The descriptors that came with one job.
#[derive(Debug, Default)]
pub(crate) struct JobFds {
    /// The input's memfd, with a `Payload::Fd` input.
    pub(crate) input: Option<OwnedFd>,
    /// The output buffer of a `JobOut`.
    pub(crate) output: Option<OwnedFd>,
}

impl JobFds {
    /// Claims from the head of `fifo` the descriptors `msg` carries (see
    /// [`ToWorker::descriptors`]); an error if they are missing.
    pub(crate) fn take(msg: &ToWorker, fifo: &mut VecDeque<OwnedFd>) -> Result<JobFds, String> {
        let job = match msg {
            ToWorker::Job(job) | ToWorker::JobOut(job) => job,
            _ => return Ok(JobFds::default()),
        };
        if fifo.len() < msg.descriptors() {
            return Err(format!(
                "job {} came without its {} descriptor(s) (is fd 3 a socket?)",
                job.id,
                msg.descriptors()
            ));
        }
        let input = match job.input {
            Payload::Fd { .. } => fifo.pop_front(),
            _ => None,
        };
        let output = match msg {
            ToWorker::JobOut(_) => fifo.pop_front(),
            _ => None,
        };
        Ok(JobFds { input, output })
    }
}

/// Most mappings [`MapCache`] keeps.
const CACHE_ENTRIES: usize = 4;
/// Most bytes [`MapCache`] keeps mapped.
const CACHE_BYTES: usize = 1 << 30;

/// The mappings of the last few memfds jobs came with. A client reuses its
/// buffers (the Python client keeps one input and one output buffer per
/// pool), so its next job's descriptors are the same open files: their
/// mappings are reused rather than made, populated and torn down again,
/// which for 64 MiB costs more than copying it (~2.5 ms each way here).
/// A descriptor matches a cached mapping only if it is the very same open
/// file (`kcmp(KCMP_FILE)`: what `SCM_RIGHTS` passes on), never by inode
/// number alone (a number a later memfd could get again). At most
/// [`CACHE_ENTRIES`] mappings and [`CACHE_BYTES`] stay; a worker thus keeps
/// up to that much of its clients' buffers mapped (and in its RSS, as
/// shared memory) between jobs.
#[derive(Debug, Default)]
pub(crate) struct MapCache {
    /// Most recently used first.
    entries: VecDeque<Cached>,
}

#[derive(Debug)]
struct Cached {
    file: File,
    writable: bool,
    region: Arc<Region>,
}

/// Whether `a` and `b` are the same open file description.
fn same_file(a: &File, b: &File) -> bool {
    const KCMP_FILE: libc::c_long = 0;
    let pid = libc::c_long::from(std::process::id() as libc::pid_t);
    // SAFETY: kcmp compares two of this process's descriptors' kernel
    // objects; it takes no pointers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            libc::c_long::from(a.as_raw_fd()),
            libc::c_long::from(b.as_raw_fd()),
        )
    };
    rc == 0
}

impl MapCache {
    /// A mapping of all of `file` (at least `len` bytes): the cached one,
    /// or a new one.
    fn get(&mut self, file: &File, len: usize, writable: bool) -> io::Result<Arc<Region>> {
        let size = usize::try_from(file.metadata()?.len()).map_err(|_| bad("too large to map"))?;
        if size < len {
            return Err(bad("the memfd is smaller than the payload"));
        }
        let found = self
            .entries
            .iter()
            .position(|e| e.writable == writable && same_file(&e.file, file));
        if let Some(at) = found {
            let entry = self.entries.remove(at).expect("found");
            if entry.region.len >= len {
                let region = Arc::clone(&entry.region);
                self.entries.push_front(entry);
                return Ok(region);
            }
        }
        let region = Arc::new(Region::map(file, size, writable)?);
        if size <= CACHE_BYTES {
            if let Ok(file) = file.try_clone() {
                self.entries.push_front(Cached {
                    file,
                    writable,
                    region: Arc::clone(&region),
                });
            }
            let mut total = 0;
            let keep = self
                .entries
                .iter()
                .take_while(|e| {
                    total += e.region.len;
                    total <= CACHE_BYTES
                })
                .count()
                .min(CACHE_ENTRIES);
            self.entries.truncate(keep);
        }
        Ok(region)
    }
}

/// The shared cache of one serving loop.
pub(crate) type SharedCache = Arc<Mutex<MapCache>>;

fn lock(cache: &SharedCache) -> std::sync::MutexGuard<'_, MapCache> {
    cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A job's input memfd, mapped read-only. The memfd must be sealed against
/// shrinking (the mapping never faults) and against writes (`F_SEAL_WRITE`,
/// or `F_SEAL_FUTURE_WRITE`: its owner may keep writing through a mapping
/// it made before, but waits for the job's result), and hold at least `len`
/// bytes.
pub(crate) fn map_input(cache: &SharedCache, fd: OwnedFd, len: u64) -> Result<Input, String> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    const F_SEAL_FUTURE_WRITE: i32 = 0x0010;
    let seals = fcntl(&fd, FcntlArg::F_GET_SEALS)
        .map_err(|e| format!("not a memfd ({e})"))
        .map(SealFlag::from_bits_retain)?;
    if !seals.contains(SealFlag::F_SEAL_SHRINK)
        || !(seals.contains(SealFlag::F_SEAL_WRITE) || seals.bits() & F_SEAL_FUTURE_WRITE != 0)
    {
        return Err("not sealed against shrinking and writing".into());
    }
    let len = usize::try_from(len).map_err(|_| "too large to map".to_string())?;
    if len == 0 {
        return Ok(Input { region: None, len });
    }
    let file = File::from(fd);
    let region = lock(cache)
        .get(&file, len, false)
        .map_err(|e| format!("cannot map {len} bytes: {e}"))?;
    Ok(Input {
        region: Some(region),
        len,
    })
}

/// A mapped input (see [`map_input`]).
#[derive(Debug)]
pub(crate) struct Input {
    region: Option<Arc<Region>>,
    len: usize,
}

impl Input {
    /// The input's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        match &self.region {
            // SAFETY: the region is mapped while `self` holds it, read-only
            // and at least `len` bytes long (checked by `MapCache::get`);
            // nobody writes it during the job (the memfd is sealed against
            // writes but for its owner's older mapping, and its owner waits
            // for the result).
            Some(r) => unsafe { std::slice::from_raw_parts(r.ptr, self.len) },
            None => &[],
        }
    }
}

/// A job's output buffer: a memfd, mapped read-write on demand and grown
/// (`ftruncate`) when the output needs more room than it has. The daemon
/// checked that it is sealed against shrinking.
#[derive(Debug)]
pub(crate) struct OutputBuffer {
    file: File,
    cache: SharedCache,
    region: Option<Arc<Region>>,
}

impl OutputBuffer {
    pub(crate) fn new(fd: OwnedFd, cache: SharedCache) -> OutputBuffer {
        OutputBuffer {
            file: File::from(fd),
            cache,
            region: None,
        }
    }

    /// At least `len` bytes mapped, the memfd grown if it is smaller.
    pub(crate) fn ensure(&mut self, len: usize) -> io::Result<()> {
        if self.capacity() >= len {
            return Ok(());
        }
        if (self.file.metadata()?.len() as usize) < len {
            self.file.set_len(len as u64)?;
        }
        self.region = Some(lock(&self.cache).get(&self.file, len, true)?);
        Ok(())
    }

    /// Bytes mapped.
    pub(crate) fn capacity(&self) -> usize {
        self.region.as_ref().map_or(0, |r| r.len)
    }

    /// The mapped bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        match &self.region {
            // SAFETY: mapped while held; the client waits for the result and
            // nothing else writes the buffer during the job but this value.
            Some(r) => unsafe { std::slice::from_raw_parts(r.ptr, r.len) },
            None => &[],
        }
    }

    /// The mapped bytes, writable.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        match &self.region {
            // SAFETY: as in `bytes`, and mapped read-write; `&mut self`
            // makes this the only reference into it from this job, and a
            // job's output buffer is used by one job at a time.
            Some(r) => unsafe { std::slice::from_raw_parts_mut(r.ptr, r.len) },
            None => &mut [],
        }
    }
}

/// One `MAP_SHARED` mapping of a whole memfd, populated at once (no page
/// fault per page afterwards); unmapped when the last holder drops it.
#[derive(Debug)]
pub(crate) struct Region {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain shared memory owned by this value; what is read or written
// through it is governed by the jobs' rules above.
unsafe impl Send for Region {}
// SAFETY: as above: `Region` itself has no interior state.
unsafe impl Sync for Region {}

impl Region {
    fn map(file: &File, len: usize, writable: bool) -> io::Result<Region> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping placed by the kernel (no address hint) of
        // `len` bytes of a memfd that holds at least that many and cannot
        // shrink (the input's seals, checked; the output buffer's, checked
        // by the daemon): every byte of it stays backed.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Region {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: a mapping this value made; its last holder is gone, so
        // nothing borrows it.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
