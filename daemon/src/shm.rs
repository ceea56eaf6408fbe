//! The daemon's view of a worker's shared-memory arena (the memfd on the
//! worker's fd 5): one `MAP_SHARED` mapping per worker, unmapped on drop.
//!
//! Who writes what is fixed by the protocol (`ipc_proto::worker` docs): the
//! daemon writes only input slots it allocated and that the worker has not
//! been told about yet; it reads only output ranges the worker reported in
//! `Done` and has not been released. Every offset and length is checked
//! against the mapping before any pointer arithmetic, so a lying worker can
//! at worst make its own job fail, never make the daemon touch memory
//! outside the arena.

use std::os::fd::{AsRawFd, OwnedFd};

/// A mapped arena.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, valid until drop, whichever
// thread uses it. Who may touch which range at a time is the slot
// discipline above (one owner per allocated slot), which the event loop
// keeps when it hands a slot's copy to the copier thread: it neither
// touches that slot nor tells the worker about it until the copy is done.
unsafe impl Send for Mapping {}
// SAFETY: as for Send: `write_at` and `read_at` take `&self` and are only
// ever called on disjoint ranges concurrently (distinct slots).
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps all `len` bytes of `fd` read-write, shared.
    pub fn new(fd: &OwnedFd, len: u64) -> std::io::Result<Mapping> {
        let len = usize::try_from(len).map_err(|_| std::io::Error::other("arena too large"))?;
        if len == 0 {
            return Ok(Mapping {
                ptr: std::ptr::null_mut(),
                len: 0,
            });
        }
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL) of a file
        // we own; nothing else in this process uses that address range.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    fn range(&self, offset: u64, len: usize) -> Option<usize> {
        let off = usize::try_from(offset).ok()?;
        let end = off.checked_add(len)?;
        (end <= self.len).then_some(off)
    }

    /// Copies `data` to `offset`; false if it would not fit.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> bool {
        let Some(off) = self.range(offset, data.len()) else {
            return false;
        };
        if data.is_empty() {
            return true;
        }
        // SAFETY: `off + data.len() <= self.len` was checked, so the
        // destination lies inside our live mapping; the source is a
        // separate heap slice. The worker does not touch an input slot
        // before it receives the Job frame sent after this copy.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len());
        }
        true
    }

    /// Reads `len` bytes of `file` (from its start) to `offset`, with
    /// `pread` straight into the mapping (no intermediate buffer). `Ok(false)`
    /// if the range does not fit; an error if the file is shorter.
    pub fn fill_from(&self, file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<bool> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(file);
        self.transfer(
            offset,
            len,
            std::io::ErrorKind::UnexpectedEof,
            |at, done, n| {
                // SAFETY: `transfer` checked the whole range against the
                // mapping, so `at..at + n` lies in it; the slot is ours until
                // the Job frame naming it is sent, which waits for this copy.
                unsafe { libc::pread(fd, at.cast(), n, done as libc::off_t) }
            },
        )
    }

    /// Writes `len` bytes at `offset` to `file` (at its current position),
    /// with `write` straight from the mapping. `Ok(false)` if the range does
    /// not fit.
    pub fn write_to(&self, file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<bool> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(file);
        self.transfer(offset, len, std::io::ErrorKind::WriteZero, |at, _, n| {
            // SAFETY: `transfer` checked the whole range against the
            // mapping, so `at..at + n` lies in it: an output range the
            // worker handed over and does not write until we release it;
            // `write` only reads it.
            unsafe { libc::write(fd, at.cast(), n) }
        })
    }

    /// Like [`Self::write_to`], with `pwrite` at `at` in the file (its
    /// own offset, which the client shares, is left alone).
    pub fn pwrite_to(
        &self,
        file: &std::fs::File,
        offset: u64,
        len: u64,
        at: u64,
    ) -> std::io::Result<bool> {
        let fd = std::os::fd::AsRawFd::as_raw_fd(file);
        self.transfer(
            offset,
            len,
            std::io::ErrorKind::WriteZero,
            |ptr, done, n| {
                let Ok(pos) = libc::off_t::try_from(at + done as u64) else {
                    // SAFETY: sets errno only.
                    unsafe { *libc::__errno_location() = libc::EFBIG };
                    return -1;
                };
                // SAFETY: as in `write_to`: `ptr..ptr + n` lies in the mapping,
                // in a range the worker does not write until it is released;
                // `pwrite` only reads it.
                unsafe { libc::pwrite(fd, ptr.cast(), n, pos) }
            },
        )
    }

    /// Moves `len` bytes at `offset` with `step(pointer, done, remaining)`
    /// (a `read`/`write`-like call) until all are done. `Ok(false)` if the
    /// range does not fit; `short` if a step moves nothing.
    fn transfer(
        &self,
        offset: u64,
        len: u64,
        short: std::io::ErrorKind,
        mut step: impl FnMut(*mut u8, usize, usize) -> libc::ssize_t,
    ) -> std::io::Result<bool> {
        let Ok(len) = usize::try_from(len) else {
            return Ok(false);
        };
        let Some(off) = self.range(offset, len) else {
            return Ok(false);
        };
        let mut done = 0usize;
        while done < len {
            // SAFETY: `off + done < off + len <= self.len`: in the mapping.
            let at = unsafe { self.ptr.add(off + done) };
            match step(at, done, len - done) {
                0 => {
                    return Err(std::io::Error::new(
                        short,
                        format!("stopped after {done} of {len} bytes"),
                    ))
                }
                n if n > 0 => done += n as usize,
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(true)
    }

    /// Copies `len` bytes at `offset` out, into a buffer that can then be
    /// shared without another copy; `None` if out of bounds.
    pub fn read_at(&self, offset: u64, len: u64) -> Option<std::sync::Arc<[u8]>> {
        let len = usize::try_from(len).ok()?;
        let off = self.range(offset, len)?;
        let mut out = std::sync::Arc::<[u8]>::new_uninit_slice(len);
        let dst = std::sync::Arc::get_mut(&mut out).expect("just made, unshared");
        if len > 0 {
            // SAFETY: the range was checked against the mapping, and `dst`
            // has exactly `len` bytes. The worker promised not to write
            // this output range until we release it; if it breaks that
            // promise we copy torn bytes (its job's output is then
            // garbage), but read only plain bytes of our own mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(self.ptr.add(off), dst.as_mut_ptr().cast(), len);
            }
        }
        // SAFETY: all `len` bytes were written just above.
        Some(unsafe { out.assume_init() })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: unmapping exactly the range mmap returned; no
            // references into it outlive `self`.
            unsafe {
                libc::munmap(self.ptr.cast(), self.len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::memfd::{memfd_create, MFdFlags};

    fn arena(len: u64) -> (OwnedFd, Mapping) {
        let fd = memfd_create(c"test-arena", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, len as i64).unwrap();
        let m = Mapping::new(&fd, len).unwrap();
        (fd, m)
    }

    #[test]
    fn writes_and_reads_inside_the_arena() {
        let (fd, m) = arena(8192);
        assert!(m.write_at(100, b"hello"));
        assert_eq!(&*m.read_at(100, 5).unwrap(), &b"hello"[..]);
        // The bytes are really in the memfd (what the worker sees).
        let mut buf = [0u8; 5];
        nix::sys::uio::pread(&fd, &mut buf, 100).unwrap();
        assert_eq!(&buf, b"hello");
        // Up to the last byte, and empty ranges at the end.
        assert!(m.write_at(8191, b"z"));
        assert_eq!(&*m.read_at(8191, 1).unwrap(), &b"z"[..]);
        assert_eq!(&*m.read_at(8192, 0).unwrap(), &b""[..]);
        assert!(m.write_at(8192, b""));
    }

    #[test]
    fn refuses_everything_outside_it() {
        let (_fd, m) = arena(4096);
        assert!(!m.write_at(4095, b"ab"));
        assert!(!m.write_at(4097, b""));
        assert!(!m.write_at(u64::MAX, b"x"));
        assert!(m.read_at(4000, 97).is_none());
        assert!(m.read_at(u64::MAX - 1, 2).is_none());
        assert!(m.read_at(0, u64::MAX).is_none());
        assert!(m.read_at(1, u64::MAX).is_none());
    }

    #[test]
    fn an_empty_arena_maps_nothing() {
        let (_fd, m) = arena(0);
        assert!(!m.write_at(0, b"x"));
        assert_eq!(&*m.read_at(0, 0).unwrap(), &b""[..]);
    }

    #[test]
    fn files_move_in_and_out_of_the_mapping_exactly() {
        let (_fd, m) = arena(1 << 20);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let dir = std::env::temp_dir().join(format!("jv-shm-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("src");
        std::fs::write(&src, &data).unwrap();
        let file = std::fs::File::open(&src).unwrap();
        assert!(m.fill_from(&file, 4096, data.len() as u64).unwrap());
        assert!(*m.read_at(4096, data.len() as u64).unwrap() == data[..]);
        // Out of the mapping: refused before any I/O.
        assert!(!m.fill_from(&file, (1 << 20) - 10, 11).unwrap());

        let dst = dir.join("dst");
        let out = std::fs::File::create(&dst).unwrap();
        assert!(m.write_to(&out, 4096, data.len() as u64).unwrap());
        assert!(!m.write_to(&out, 1 << 20, 1).unwrap());
        drop(out);
        assert!(std::fs::read(&dst).unwrap() == data);
        // A file shorter than asked for is an error.
        let err = m.fill_from(&file, 0, data.len() as u64 + 1).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
