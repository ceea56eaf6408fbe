//! The worker's side of the shared-memory arena (fd 5): the mapping, and the
//! bookkeeping of the output slots it has handed to the daemon.
//!
//! The rules (see [`ipc_proto::worker`] and [`ipc_proto::arena`]): the memfd
//! is split by [`ArenaLayout::split`] into the daemon's *input* region and the
//! worker's *output* region.
//! - An input over the pool's `inline_limit` arrives as `Payload::Shm` in the
//!   input region. The reader thread checks the reference against that region
//!   before anything is read; the handler then gets a `&[u8]` straight over
//!   the mapping, valid until the job is answered (the daemon does not touch
//!   those bytes until then).
//! - An output over `inline_limit` goes into a slot of the output region,
//!   allocated with an [`Allocator`] that only this process uses. Once the
//!   slot is named in a `Done`, it is *handed out*: the worker must not write
//!   or reuse it until the daemon sends `Release` for exactly that
//!   `(offset, len)`. A `Release` for anything else is a protocol error.
//!
//! So at every moment each byte of the arena is written by at most one
//! process, and never while the other one reads it: that is what makes the
//! plain (non-atomic) reads and writes below free of data races.
//!
//! Threads: the reader thread frees slots on `Release` and wakes the handler's
//! thread, which may be waiting in [`Shm::wait_alloc`] for room (the output
//! region full of outputs the daemon has not copied yet).

use std::collections::HashMap;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use ipc_proto::arena::{check_ref, Allocator, ArenaError, ArenaLayout, Slot, SLOT_ALIGN};
use ipc_proto::worker::Payload;
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::sys::stat::{fstat, SFlag};

/// The shared-memory arena, mapped once, read and write, `MAP_SHARED`.
///
/// Obtained from [`crate::Channel::from_env`] for the daemon's fd 5, or with
/// [`Arena::map`] to drive [`crate::serve_with_output`] over other streams.
pub struct Arena {
    base: NonNull<u8>,
    size: usize,
    layout: ArenaLayout,
}

// SAFETY: an `Arena` is an address range of a shared mapping that stays
// mapped until the `Arena` is dropped; it has no thread affinity. The only
// accesses to the bytes go through this crate, which follows the protocol
// described in the module docs (one writer per byte range at a time).
unsafe impl Send for Arena {}
// SAFETY: as above; `&Arena` only gives out the base address and layout, and
// the crate-internal readers and writers split the arena into disjoint ranges.
unsafe impl Sync for Arena {}

impl Arena {
    /// Maps the whole of `fd` (a memfd; its size comes from `fstat`), shared,
    /// for reading and writing. The mapping does not keep `fd` open and is
    /// unmapped when the `Arena` is dropped.
    ///
    /// Fails when `fd` is not a regular file (a memfd is one), is empty, or
    /// cannot be mapped (not open for reading and writing, too large).
    ///
    /// # Safety
    ///
    /// The process on the other side of `fd` must follow the shared-memory
    /// rules of the worker protocol: never write the input range of a job
    /// until the job is answered, never write the output region, and never
    /// shrink the file. The worker reads and writes the mapping as ordinary
    /// memory; a peer breaking those rules causes data races (or `SIGBUS`).
    pub unsafe fn map(fd: BorrowedFd<'_>) -> io::Result<Arena> {
        let st = fstat(fd)?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a memfd (not a regular file)",
            ));
        }
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let len = usize::try_from(size)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty or too large"))?;
        // SAFETY: a fresh mapping at an address of the kernel's choosing, so
        // no existing memory is affected. Its later use is what the caller's
        // contract covers: the peer never writes a range while we may read
        // it, and we never write a range the peer may read.
        let ptr = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }?;
        Ok(Arena {
            base: ptr.cast(),
            size: len.get(),
            layout: ArenaLayout::split(size),
        })
    }

    /// Size of the whole arena in bytes.
    pub fn size(&self) -> u64 {
        self.size as u64
    }

    /// How the arena divides into the daemon's input and the worker's output
    /// region.
    pub fn layout(&self) -> &ArenaLayout {
        &self.layout
    }

    /// Checks a daemon's input reference: inside the input region, no
    /// overflow.
    pub(crate) fn check_input(&self, offset: u64, len: u64) -> Result<(), ArenaError> {
        check_ref(&self.layout.input, offset, len)
    }

    /// The input bytes of a job, checked again here.
    ///
    /// Only for the job being run: the daemon leaves these bytes alone until
    /// the worker answers the job, and the caller stops using the slice
    /// before it does.
    pub(crate) fn input(&self, offset: u64, len: u64) -> Result<&[u8], ArenaError> {
        self.check_input(offset, len)?;
        if len == 0 {
            return Ok(&[]);
        }
        // SAFETY: `offset + len` lies inside the input region (checked
        // above), which lies inside the mapping of `self.size` bytes, so both
        // conversions are lossless and the range is mapped and initialised
        // (file pages). No data race: the daemon wrote these bytes before
        // sending the job and does not write them again until the job is
        // answered; the worker never writes the input region. The slice
        // borrows `self`, so the mapping outlives it.
        Ok(unsafe {
            std::slice::from_raw_parts(self.base.as_ptr().add(offset as usize), len as usize)
        })
    }

    /// Address of the byte at `offset` (which must lie inside the arena).
    pub(crate) fn ptr_at(&self, offset: u64) -> *mut u8 {
        assert!(
            offset <= self.size as u64,
            "offset {offset} outside the arena"
        );
        // SAFETY: `offset <= size` (asserted): the result is inside the
        // mapping or one past its end.
        unsafe { self.base.as_ptr().add(offset as usize) }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: `base`/`size` are exactly the mapping made in `map`, and
        // nothing borrowed from it outlives `self` (slices borrow the arena;
        // `Shm` owns it for as long as any slot is in use).
        let _ = unsafe { munmap(self.base.cast(), self.size) };
    }
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("size", &self.size)
            .field("layout", &self.layout)
            .finish()
    }
}

/// The arena plus the state of the output region, shared by the handler's
/// thread (allocates slots, hands them out) and the reader thread (frees
/// them on `Release`).
pub(crate) struct Shm {
    pub(crate) arena: Arena,
    /// Capacity of the output region, for checks without the lock.
    capacity: u64,
    state: Mutex<SlotState>,
    /// Notified when a slot is released, when the job stream ends, and when
    /// a `Cancel` arrives: everything a wait for room must react to.
    changed: Condvar,
}

struct SlotState {
    alloc: Allocator,
    /// Slots named in a `Done` and not yet released: offset → (len reported,
    /// slot). Only non-empty slots are handed out, so offsets are distinct.
    handed_out: HashMap<u64, (u64, Slot)>,
    /// The job stream has ended: no `Release` will come any more.
    ended: bool,
}

/// Why [`Shm::wait_alloc`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NoRoom {
    /// Nothing is handed out, so no `Release` can make room.
    Nothing,
    /// The job stream ended.
    Ended,
    /// The running job was cancelled.
    Cancelled,
    /// No `Release` made enough room before the deadline.
    TimedOut,
}

impl Shm {
    pub(crate) fn new(arena: Arena) -> Shm {
        let alloc = Allocator::new(arena.layout.output.clone(), SLOT_ALIGN);
        Shm {
            capacity: alloc.capacity(),
            arena,
            state: Mutex::new(SlotState {
                alloc,
                handed_out: HashMap::new(),
                ended: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // Nothing under this lock panics halfway through an update.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes the output region can hold: an output larger than this never
    /// goes through shared memory.
    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Length of the output region (the "shm_size/2" of error messages).
    pub(crate) fn output_len(&self) -> u64 {
        let r = &self.arena.layout.output;
        r.end - r.start
    }

    /// A slot of `preferred` bytes, else of `needed`, if one is free now.
    pub(crate) fn try_alloc(&self, preferred: u64, needed: u64) -> Option<Slot> {
        self.lock().try_alloc(preferred, needed)
    }

    /// Like [`Shm::try_alloc`], but waits for `Release`s while the output
    /// region is full of handed-out slots, until `deadline`. The caller has
    /// flushed its results first, so the daemon has every handed-out slot
    /// to copy and release. Gives up early when no `Release` can help or
    /// `cancelled()` turns true.
    pub(crate) fn wait_alloc(
        &self,
        preferred: u64,
        needed: u64,
        deadline: Instant,
        cancelled: impl Fn() -> bool,
    ) -> Result<Slot, NoRoom> {
        let mut state = self.lock();
        loop {
            if let Some(slot) = state.try_alloc(preferred, needed) {
                return Ok(slot);
            }
            if state.ended {
                return Err(NoRoom::Ended);
            }
            if cancelled() {
                return Err(NoRoom::Cancelled);
            }
            if state.handed_out.is_empty() {
                return Err(NoRoom::Nothing);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(NoRoom::TimedOut);
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Gives back a slot that was never handed out.
    pub(crate) fn free(&self, slot: Slot) {
        // Cannot fail: the slot came from this allocator, once.
        let _ = self.lock().alloc.free(slot);
    }

    /// Hands `slot` to the daemon with its first `len` bytes as the output:
    /// from now on it is the daemon's until `Release`. Registered before
    /// the `Done` naming it is buffered, so a `Release` can never come first.
    pub(crate) fn hand_out(&self, slot: Slot, len: u64) -> Payload {
        debug_assert!(len > 0 && len <= slot.len());
        let offset = slot.offset();
        self.lock().handed_out.insert(offset, (len, slot));
        Payload::Shm { offset, len }
    }

    /// Reader thread: the daemon has copied `len` bytes at `offset`.
    pub(crate) fn release(&self, offset: u64, len: u64) -> Result<(), String> {
        let mut state = self.lock();
        match state.handed_out.get(&offset) {
            Some(&(reported, _)) if reported == len => {}
            Some(&(reported, _)) => {
                return Err(format!(
                    "Release of {len} bytes at {offset}, but the output there is {reported} bytes"
                ))
            }
            None => {
                return Err(format!(
                "Release of {len} bytes at {offset}, which is not an output this worker handed out"
            ))
            }
        }
        let (_, slot) = state.handed_out.remove(&offset).expect("checked above");
        // Cannot fail: handed-out slots are live slots of this allocator.
        let _ = state.alloc.free(slot);
        drop(state);
        self.changed.notify_all();
        Ok(())
    }

    /// Reader thread: a `Cancel` arrived; a wait for room re-checks.
    pub(crate) fn poke(&self) {
        // Taking the lock orders this after a waiter's check of the cancel
        // flag, so the wake-up cannot fall between its check and its wait.
        drop(self.lock());
        self.changed.notify_all();
    }

    /// Reader thread: the job stream ended; no more `Release`s.
    pub(crate) fn end(&self) {
        self.lock().ended = true;
        self.changed.notify_all();
    }
}

impl SlotState {
    fn try_alloc(&mut self, preferred: u64, needed: u64) -> Option<Slot> {
        if preferred > needed {
            if let Some(slot) = self.alloc.alloc(preferred) {
                return Some(slot);
            }
        }
        self.alloc.alloc(needed)
    }
}
