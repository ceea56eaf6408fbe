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
//! - The input memfd is mapped read-only ([`Mapped`]), after checking its
//!   seals: no shrinking (the mapping can never fault) and no writing.
//! - The output buffer is mapped read-write ([`Mapped`] again) when the
//!   output grows past the inline limit, and grown with `ftruncate` when the
//!   output needs more room than it has. The daemon checks that the client
//!   sealed it against shrinking. The answer is `Payload::Fd { len }`: the
//!   output is the buffer's first `len` bytes, nothing is copied after.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IoSliceMut, Read};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

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
    /// A `Payload::Fd` input, mapped (or why it cannot be: the job fails).
    pub(crate) input: Option<Result<Mapped, String>>,
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
            Payload::Fd { len } => {
                let fd = fifo.pop_front().expect("counted");
                Some(Mapped::input(fd, len).map_err(|e| {
                    format!("job {}: its input descriptor cannot be used: {e}", job.id)
                }))
            }
            _ => None,
        };
        let output = match msg {
            ToWorker::JobOut(_) => Some(fifo.pop_front().expect("counted")),
            _ => None,
        };
        Ok(JobFds { input, output })
    }
}

/// A memfd mapped `MAP_SHARED`: a job's input (read-only) or its output
/// buffer (read-write). Unmapped and closed on drop.
#[derive(Debug)]
pub(crate) struct Mapped {
    file: File,
    ptr: *mut u8,
    /// Bytes mapped (0: nothing is).
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain memory owned by this value; it moves between
// threads (reader → calling thread) but is used by one at a time.
unsafe impl Send for Mapped {}

impl Mapped {
    /// The first `len` bytes of an input memfd, read-only. The memfd must
    /// be sealed against shrinking (so the mapping never faults) and
    /// against writes (`F_SEAL_WRITE`, or `F_SEAL_FUTURE_WRITE`: its owner
    /// may keep writing through an older mapping, but is not to during the
    /// job), and hold at least `len` bytes.
    pub(crate) fn input(fd: OwnedFd, len: u64) -> Result<Mapped, String> {
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
        let file = File::from(fd);
        let size = file.metadata().map_err(|e| e.to_string())?.len();
        if size < len {
            return Err(format!("{size} bytes, fewer than the {len} announced"));
        }
        let len = usize::try_from(len).map_err(|_| "too large to map".to_string())?;
        let mut m = Mapped {
            file,
            ptr: std::ptr::null_mut(),
            len: 0,
            writable: false,
        };
        m.map(len)
            .map_err(|e| format!("cannot map {len} bytes: {e}"))?;
        Ok(m)
    }

    /// An output buffer, mapped later with [`Self::ensure`].
    pub(crate) fn output(fd: OwnedFd) -> Mapped {
        Mapped {
            file: File::from(fd),
            ptr: std::ptr::null_mut(),
            len: 0,
            writable: true,
        }
    }

    /// Maps the first `len` bytes (replacing any earlier mapping),
    /// populated at once: no page fault per page afterwards.
    fn map(&mut self, len: usize) -> io::Result<()> {
        self.unmap();
        if len == 0 {
            return Ok(());
        }
        let prot = if self.writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping chosen by the kernel (no address hint), of
        // a memfd that holds at least `len` bytes and cannot shrink (the
        // input's seal; the daemon checked the output buffer's), so every
        // byte of it is backed.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                self.file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.ptr = ptr.cast();
        self.len = len;
        Ok(())
    }

    fn unmap(&mut self) {
        if self.len > 0 {
            // SAFETY: `ptr`/`len` is a mapping this value made and nothing
            // borrows it (borrows of `self` have ended).
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
            self.len = 0;
            self.ptr = std::ptr::null_mut();
        }
    }

    /// An output buffer with at least `len` bytes mapped: grown
    /// (`ftruncate`) if it is smaller, never shrunk.
    pub(crate) fn ensure(&mut self, len: usize) -> io::Result<()> {
        if len <= self.len {
            return Ok(());
        }
        let size = self.file.metadata()?.len();
        if (size as usize) < len {
            self.file.set_len(len as u64)?;
        }
        self.map(len)
    }

    /// Bytes mapped.
    pub(crate) fn capacity(&self) -> usize {
        self.len
    }

    /// The mapped bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr..ptr + len` is mapped (see `map`) for as long as
        // `self` is borrowed; the sender does not write it during the job
        // (input: sealed or its owner waits; output: the client waits for
        // the result).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The mapped bytes, writable (an output buffer).
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        assert!(self.writable, "an input mapping is read-only");
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: as in `bytes`, and mapped writable; `&mut self` makes
        // this the only reference into the mapping.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        self.unmap();
    }
}
