//! [`Output`]: where a handler served by [`crate::run_with_output`] writes
//! its result, so that a large output is written straight into shared memory.
//!
//! An output starts as a `Vec`. It moves into a slot of the arena's output
//! region as soon as it is known to exceed the inline limit: when an append
//! makes it longer, or at once when [`Output::size_hint`] (or the first
//! [`Output::reserve`]) announces a final size over the limit, in which case
//! the slot has exactly that size and the handler's bytes are written once,
//! in place. A slot that an append outgrows is replaced by one twice as
//! large (one more copy), or by a `Vec` when no larger slot can fit beside
//! it (copied into a slot again at the end); an output that ends at or
//! under the limit goes back inline.
//!
//! When the output region is temporarily full of outputs the daemon has not
//! copied yet, the handler's thread flushes the results it has buffered (so
//! the daemon sees them) and waits, on a condition variable, for the
//! `Release`s (see [`crate::serve_with_output`] for the bound on that wait).
//! An output larger than the whole output region stays a `Vec` and is sent
//! inline if it fits in a frame; otherwise the job fails.
//!
//! A job that came with an output buffer (worker protocol 2, see
//! [`crate::fds`]) uses it instead of the arena: past the inline limit the
//! output moves into the buffer (grown as needed, never copied again), and
//! is answered as `Payload::Fd`. If the buffer cannot grow, the output goes
//! on as above.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc_proto::arena::Slot;
use ipc_proto::worker::Payload;
use ipc_proto::MAX_FRAME_LEN;

use crate::context::CancelState;
use crate::fds::OutputBuffer;
use crate::shm::{NoRoom, Shm};

/// The largest output sent inline: the frame limit minus room for the rest
/// of the `Done` message (variant, id, payload tag, length: at most 21 bytes).
pub(crate) const MAX_INLINE_OUTPUT: usize = MAX_FRAME_LEN - 64;

/// Makes the buffered results reach the daemon, before waiting for it to
/// release output slots. Returns false when the result stream is broken
/// (no `Release` will come).
pub(crate) trait FlushResults: Send + Sync {
    fn flush_results(&self) -> bool;
}

/// What an output needs from the serving loop.
pub(crate) struct Sink {
    pub(crate) shm: Option<Arc<Shm>>,
    pub(crate) inline_limit: usize,
    pub(crate) release_wait: Duration,
    pub(crate) flush: Arc<dyn FlushResults>,
    pub(crate) cancel: Arc<CancelState>,
}

/// The output of one job, for handlers served by [`crate::run_with_output`].
///
/// Append with [`write_all`](Output::write_all) (or through
/// [`std::io::Write`]), or take a writable region with
/// [`reserve`](Output::reserve) and fill it in place. Either way, an output
/// over the inline limit is built directly in the shared-memory arena when it
/// fits there, and the daemon copies it out from there: no copy through the
/// pipe. See the [crate docs](crate) for an example.
///
/// Bytes handed out by `reserve` have unspecified contents (zeros, or
/// leftovers of an earlier output): overwrite all of them.
///
/// [`Output::new`] makes a standalone buffer (always a `Vec`), for testing a
/// handler without a daemon.
pub struct Output {
    data: Data,
    /// Final size announced by [`Output::size_hint`], or 0.
    hint: usize,
    /// A wait for room failed during this job: no more tries, go inline.
    gave_up: bool,
    sink: Option<Arc<Sink>>,
    /// The job's output buffer, if it came with one.
    buffer: Option<OutputBuffer>,
}

enum Data {
    Heap(Vec<u8>),
    /// The first `len` bytes of `slot` (`len <= slot.len()`), not handed out.
    Shared {
        slot: Slot,
        len: usize,
    },
    /// The first `len` bytes of `buffer` (`len <= buffer.capacity()`).
    Buffer {
        len: usize,
    },
}

/// Printed once per process: a wait for room timed out.
static TIMEOUT_REPORTED: AtomicBool = AtomicBool::new(false);

impl Output {
    /// A standalone output: an in-memory buffer, never in shared memory.
    pub fn new() -> Output {
        Output {
            data: Data::Heap(Vec::new()),
            hint: 0,
            gave_up: false,
            sink: None,
            buffer: None,
        }
    }

    pub(crate) fn attached(sink: Arc<Sink>) -> Output {
        Output {
            data: Data::Heap(Vec::new()),
            hint: 0,
            gave_up: false,
            sink: Some(sink),
            buffer: None,
        }
    }

    /// Gives the output the job's output buffer (see [`crate::fds`]).
    pub(crate) fn use_buffer(&mut self, buffer: OutputBuffer) {
        self.buffer = Some(buffer);
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        match &self.data {
            Data::Heap(v) => v.len(),
            Data::Shared { len, .. } | Data::Buffer { len } => *len,
        }
    }

    /// True when nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True while the output is held in shared memory (the arena, or the
    /// client's output buffer) rather than in process memory.
    pub fn is_shared(&self) -> bool {
        !matches!(self.data, Data::Heap(_))
    }

    /// The bytes written so far.
    pub fn as_slice(&self) -> &[u8] {
        match &self.data {
            Data::Heap(v) => v,
            Data::Shared { slot, len } => {
                let shm = self.shm().expect("a shared output has an arena");
                // SAFETY: the slot lies inside the output region of the
                // mapping (the allocator only hands out ranges of that
                // region) and `len <= slot.len()`. This `Output` is its only
                // user: the allocator gave it out once, it is not handed out
                // to the daemon yet, and the daemon never writes the output
                // region. Mapped file memory is always initialised. The
                // slice borrows `self`, which keeps the arena (`Arc<Shm>`)
                // and the slot.
                unsafe { std::slice::from_raw_parts(shm.arena.ptr_at(slot.offset()), *len) }
            }
            Data::Buffer { len } => &self.buffer.as_ref().expect("has a buffer").bytes()[..*len],
        }
    }

    /// The bytes written so far, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let shm = self.sink.as_ref().and_then(|s| s.shm.as_deref());
        match &mut self.data {
            Data::Heap(v) => v,
            Data::Shared { slot, len } => {
                let shm = shm.expect("a shared output has an arena");
                // SAFETY: as in `as_slice`; moreover `&mut self` makes this
                // the only live reference into the slot, and neither the
                // daemon nor any other slot's user writes these bytes.
                unsafe { std::slice::from_raw_parts_mut(shm.arena.ptr_at(slot.offset()), *len) }
            }
            Data::Buffer { len } => {
                &mut self.buffer.as_mut().expect("has a buffer").bytes_mut()[..*len]
            }
        }
    }

    /// Appends `bytes` (one copy: into the arena slot when the output is,
    /// or becomes, larger than the inline limit).
    pub fn write_all(&mut self, bytes: &[u8]) {
        let start = self.len();
        self.make_room(bytes.len());
        match &mut self.data {
            Data::Heap(v) => v.extend_from_slice(bytes),
            Data::Shared { len, .. } | Data::Buffer { len } => {
                *len = start + bytes.len();
                self.as_mut_slice()[start..].copy_from_slice(bytes);
            }
        }
    }

    /// Appends `len` bytes and returns them, for the handler to fill in
    /// place; their contents are unspecified. When the output is empty and
    /// `len` is over the inline limit (the "I know the size" case), this is a
    /// slot of exactly `len` bytes in the arena, so the handler writes its
    /// output once, where the daemon reads it.
    pub fn reserve(&mut self, len: usize) -> &mut [u8] {
        let start = self.len();
        let end = start.checked_add(len).expect("output length overflows");
        self.make_room(len);
        match &mut self.data {
            Data::Heap(v) => v.resize(end, 0),
            Data::Shared { len, .. } | Data::Buffer { len } => *len = end,
        }
        &mut self.as_mut_slice()[start..]
    }

    /// Announces the expected final length of the output. Over the inline
    /// limit (and within the output region), the output moves into an arena
    /// slot of that size now, so appends up to it are written in place;
    /// otherwise it reserves `Vec` capacity. Writing more or less than
    /// announced is fine.
    pub fn size_hint(&mut self, total: usize) {
        self.hint = total;
        let len = self.len();
        if total > len {
            self.make_room(total - len);
            if let Data::Heap(v) = &mut self.data {
                v.reserve(total - len);
            }
        }
    }

    /// Shortens the output to `len` bytes (no effect if it is shorter).
    pub fn truncate(&mut self, len: usize) {
        match &mut self.data {
            Data::Heap(v) => v.truncate(len),
            Data::Shared { len: l, .. } | Data::Buffer { len: l } => *l = (*l).min(len),
        }
    }

    /// Empties the output.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    fn shm(&self) -> Option<&Shm> {
        self.sink.as_ref()?.shm.as_deref()
    }

    /// Makes room for `extra` more bytes: moves the output into the arena if
    /// it gets over the inline limit, to a larger slot if it outgrows its
    /// slot, or back to a `Vec` if it cannot be in the arena any more.
    /// Afterwards a `Shared` output has room for `len + extra` bytes.
    fn make_room(&mut self, extra: usize) {
        if self.buffer.is_some() && self.buffer_room(extra) {
            return;
        }
        let Some(sink) = &self.sink else { return };
        let Some(shm) = &sink.shm else { return };
        let len = self.len();
        let needed = len.checked_add(extra).expect("output length overflows");
        let capacity = shm.capacity();
        let own = match &self.data {
            Data::Heap(_) => {
                if needed <= sink.inline_limit || needed as u64 > capacity || self.gave_up {
                    return;
                }
                None
            }
            Data::Shared { slot, .. } => {
                if needed as u64 <= slot.len() {
                    return;
                }
                Some((slot.len(), slot.capacity()))
            }
            // `buffer_room` demotes a buffer it cannot grow.
            Data::Buffer { .. } => return,
        };
        let shm = Arc::clone(shm);
        let needed64 = needed as u64;
        match own {
            None => {
                // Over the limit: into the arena, exactly as large as
                // announced (or as needed).
                let preferred = (needed.max(self.hint) as u64).min(capacity);
                if let Some(slot) = self.acquire(preferred, needed64) {
                    let old = std::mem::replace(&mut self.data, Data::Shared { slot, len });
                    if let Data::Heap(v) = old {
                        self.as_mut_slice().copy_from_slice(&v);
                    }
                }
            }
            Some((old_len, old_cap)) => {
                if needed64 > capacity || needed64 + old_cap > capacity || self.gave_up {
                    // Never fits, or not beside the slot it grows from: go
                    // on in a `Vec` (copied into a slot at the end if it
                    // fits then).
                    return self.demote(needed);
                }
                let preferred = needed64
                    .max(self.hint as u64)
                    .max(old_len.saturating_mul(2))
                    .min(capacity - old_cap);
                let Some(new) = self.acquire(preferred, needed64) else {
                    return self.demote(needed);
                };
                let new_offset = new.offset();
                let old = std::mem::replace(&mut self.data, Data::Shared { slot: new, len });
                if let Data::Shared { slot: old, .. } = old {
                    // SAFETY: both slots are this output's alone (see
                    // `as_slice`) and distinct live slots of one allocator,
                    // so they do not overlap; `len <= old.len()` and
                    // `len < needed <= new.len()`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            shm.arena.ptr_at(old.offset()),
                            shm.arena.ptr_at(new_offset),
                            len,
                        );
                    }
                    shm.free(old);
                }
            }
        }
    }

    /// [`Self::make_room`] with an output buffer: true when the output is
    /// (or has just moved) in the buffer with room for `extra` more bytes,
    /// or stays a `Vec` under the inline limit. False when the buffer cannot
    /// grow: it is dropped, the output is a `Vec` again, and the arena's
    /// rules apply.
    fn buffer_room(&mut self, extra: usize) -> bool {
        let limit = self.sink.as_ref().map_or(usize::MAX, |s| s.inline_limit);
        let len = self.len();
        let needed = len.checked_add(extra).expect("output length overflows");
        let buffer = self.buffer.as_mut().expect("checked by the caller");
        let want = match self.data {
            Data::Buffer { .. } if needed <= buffer.capacity() => return true,
            Data::Buffer { .. } => needed.max(len.saturating_mul(2)).max(self.hint),
            Data::Heap(_) if needed <= limit => return true,
            Data::Heap(_) => needed.max(self.hint),
            Data::Shared { .. } => return false,
        };
        if buffer.ensure(want).is_ok() {
            if let Data::Heap(v) = std::mem::replace(&mut self.data, Data::Buffer { len }) {
                buffer.bytes_mut()[..len].copy_from_slice(&v);
            }
            return true;
        }
        if let Data::Buffer { .. } = self.data {
            let v = self.as_slice().to_vec();
            self.data = Data::Heap(v);
        }
        self.buffer = None;
        false
    }

    /// Moves a shared output back into a `Vec` of capacity `capacity`.
    fn demote(&mut self, capacity: usize) {
        if let Data::Shared { .. } = self.data {
            let mut v = Vec::with_capacity(capacity);
            v.extend_from_slice(self.as_slice());
            let Data::Shared { slot, .. } = std::mem::replace(&mut self.data, Data::Heap(v)) else {
                unreachable!()
            };
            if let Some(shm) = self.shm() {
                shm.free(slot);
            }
        }
    }

    /// A slot of `preferred` (else `needed`) bytes, waiting for `Release`s
    /// while the output region is full. `None` (and no more tries for this
    /// job) when waiting cannot help or takes too long.
    fn acquire(&mut self, preferred: u64, needed: u64) -> Option<Slot> {
        let sink = self.sink.as_ref()?;
        let shm = sink.shm.as_deref()?;
        if let Some(slot) = shm.try_alloc(preferred, needed) {
            return Some(slot);
        }
        // The daemon releases what it has seen: let it see everything.
        if !sink.flush.flush_results() {
            self.gave_up = true;
            return None;
        }
        let deadline = Instant::now() + sink.release_wait;
        let cancel = &sink.cancel;
        match shm.wait_alloc(preferred, needed, deadline, || cancel.is_cancelled()) {
            Ok(slot) => Some(slot),
            Err(why) => {
                if why == NoRoom::TimedOut && !TIMEOUT_REPORTED.swap(true, Ordering::Relaxed) {
                    eprintln!(
                        "jobvisor worker: the shared-memory output region stayed full for {:?} \
                         (no Release from the daemon); sending the output inline",
                        sink.release_wait
                    );
                }
                self.gave_up = true;
                None
            }
        }
    }

    /// Replaces the output with `v` (the [`crate::run_with`] adapter).
    pub(crate) fn set_vec(&mut self, v: Vec<u8>) {
        self.discard();
        self.data = Data::Heap(v);
    }

    /// Drops the output (the job failed, or the `Output` goes away),
    /// freeing its slot.
    pub(crate) fn discard(&mut self) {
        let data = std::mem::replace(&mut self.data, Data::Heap(Vec::new()));
        if let Data::Shared { slot, .. } = data {
            if let Some(shm) = self.shm() {
                shm.free(slot);
            }
        }
    }

    /// With an output buffer: the payload for an output over the inline
    /// limit, in the buffer (a `Vec` is copied there once). `None` when the
    /// arena's rules apply (no buffer, a small output, a buffer that cannot
    /// grow).
    fn finish_in_buffer(&mut self, limit: usize) -> Option<Payload> {
        let len = self.len();
        if self.buffer.is_none() || len <= limit {
            return None;
        }
        if let Data::Heap(v) = &self.data {
            let buffer = self.buffer.as_mut().expect("checked");
            buffer.ensure(len).ok()?;
            buffer.bytes_mut()[..len].copy_from_slice(v);
            self.data = Data::Buffer { len };
        }
        match self.data {
            Data::Buffer { len } => {
                self.data = Data::Heap(Vec::new());
                Some(Payload::Fd { len: len as u64 })
            }
            _ => None,
        }
    }

    /// The payload for `Done` (or the error for `Failed`); leaves the output
    /// empty. A shared-memory payload is handed out here: its slot is the
    /// daemon's until `Release`. (The serving loop makes a fresh `Output`
    /// per job, so nothing else needs resetting.)
    pub(crate) fn finish(&mut self) -> Result<Payload, String> {
        let limit = self.sink.as_ref().map_or(usize::MAX, |s| s.inline_limit);
        if let Some(payload) = self.finish_in_buffer(limit) {
            return Ok(payload);
        }
        let shm = self.sink.as_ref().and_then(|s| s.shm.clone());
        if self.is_shared() && self.len() <= limit {
            // Shrunk back under the limit: inline after all, and the slot
            // is freed.
            let v = self.as_slice().to_vec();
            self.discard();
            return inline(v, shm.as_deref());
        }
        match std::mem::replace(&mut self.data, Data::Heap(Vec::new())) {
            Data::Shared { slot, len } => {
                let shm = shm.expect("a shared output has an arena");
                Ok(shm.hand_out(slot, len as u64))
            }
            Data::Buffer { .. } => unreachable!("answered by finish_in_buffer"),
            Data::Heap(v) => {
                let len = v.len();
                let Some(shm) = shm else {
                    return inline(v, None);
                };
                if len <= limit || len as u64 > shm.capacity() || self.gave_up {
                    // The common case (small), or one that can only go
                    // inline.
                    return inline(v, Some(&shm));
                }
                // A `Vec` over the limit (from `run`/`run_with`, or one that
                // could not grow in place): one copy into a slot.
                let Some(slot) = self.acquire(len as u64, len as u64) else {
                    return inline(v, Some(&shm));
                };
                // SAFETY: a fresh slot of `len` bytes, this output's alone
                // (see `as_slice`); the `Vec` is process memory, so the
                // ranges cannot overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(v.as_ptr(), shm.arena.ptr_at(slot.offset()), len);
                }
                Ok(shm.hand_out(slot, len as u64))
            }
        }
    }
}

/// `v` as an inline payload if it fits in a frame, else the job's error.
fn inline(v: Vec<u8>, shm: Option<&Shm>) -> Result<Payload, String> {
    if v.len() <= MAX_INLINE_OUTPUT {
        return Ok(Payload::Inline(v.into()));
    }
    let n = v.len();
    Err(match shm {
        Some(shm) if n as u64 > shm.capacity() => format!(
            "output of {n} bytes exceeds shm_size/2 ({} bytes) and the frame limit",
            shm.output_len()
        ),
        Some(_) => format!(
            "output of {n} bytes exceeds the frame limit, and no room could be made for it \
             in the shared-memory output region"
        ),
        None => format!(
            "output of {n} bytes exceeds the frame limit ({MAX_INLINE_OUTPUT} bytes) and no \
             shared-memory arena is available"
        ),
    })
}

impl Default for Output {
    fn default() -> Self {
        Output::new()
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        self.discard();
    }
}

impl std::io::Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Output::write_all(self, buf);
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        Output::write_all(self, buf);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Output")
            .field("len", &self.len())
            .field("shared", &self.is_shared())
            .finish()
    }
}
