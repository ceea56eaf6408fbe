//! Bookkeeping for the shared-memory arena (fd 5): which bytes belong to whom.
//!
//! Each worker process gets one memfd of `shm_size` bytes, mapped by the daemon
//! and by the worker. A payload above `inline_limit` travels as
//! [`Payload::Shm`], a reference into that arena, instead of inline bytes. This
//! module is the pure part of that scheme: it hands out byte ranges and checks
//! the references a peer sends. It never maps, reads or writes the memory.
//!
//! - [`ArenaLayout::split`] divides an arena into two regions, so that each
//!   side only ever allocates in memory it alone writes: the daemon owns the
//!   lower half (job inputs), the worker the upper half (job outputs). Both
//!   sides compute the layout from the memfd's size alone; it is never sent.
//! - [`Allocator`] manages one region: the daemon keeps one per worker for
//!   input slots, the worker library one for its output slots. When a slot is
//!   released (the peer is done with the bytes) is the protocol's business,
//!   not this module's.
//! - [`check_ref`] validates an `(offset, len)` received from the peer.
//!
//! **Architecture invariant:** a reference from the peer is never trusted. It
//! is checked with [`check_ref`] against the region the peer may name (the
//! daemon checks a worker's outputs against [`ArenaLayout::output`], the worker
//! checks inputs against [`ArenaLayout::input`]) before any byte is touched; a
//! bad reference is a protocol error upstream, never a panic or a wild read.
//!
//! **Architecture invariant:** the allocator's bookkeeping cannot be corrupted
//! through its API. A [`Slot`] can only be made by [`Allocator::alloc`]; freeing
//! one twice, freeing it into another allocator, or freeing one issued before a
//! [`Allocator::reset`] is an [`ArenaError`], and the free list is untouched.

use crate::worker::Payload;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// Granularity of the split between the two regions of an arena. Both regions
/// start on a page boundary, so no page is written by both processes and
/// either side may `madvise` or `mprotect` its own region as a whole.
pub const PAGE_SIZE: u64 = 4096;

/// Recommended slot alignment: one cache line. Two slots never share a line
/// (no false sharing between a slot being written and one being read), and
/// any scalar type can be read in place. Page alignment would waste up to
/// 4 KiB per slot for no benefit, since the regions are already page-aligned.
pub const SLOT_ALIGN: u64 = 64;

/// How an arena of a given size is divided between the daemon and a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArenaLayout {
    /// Size of the whole arena in bytes (the memfd's size).
    pub size: u64,
    /// The daemon's region, for job inputs: starts at 0.
    pub input: Range<u64>,
    /// The worker's region, for job outputs: starts where `input` ends.
    pub output: Range<u64>,
}

impl ArenaLayout {
    /// Splits an arena of `size` bytes into whole pages: the daemon gets the
    /// lower half, the worker the upper half, and when the number of pages is
    /// odd the extra page goes to the daemon.
    ///
    /// Bytes after the last whole page are in neither region. Below two pages
    /// (8 KiB) the worker's region is empty (a 4 KiB arena is all inputs),
    /// and below one page both are: every payload then travels inline. An
    /// empty region is a valid range, `start == end`, inside the arena.
    pub fn split(size: u64) -> ArenaLayout {
        let pages = size / PAGE_SIZE;
        // Neither product can overflow: both are at most `size` rounded down.
        let mid = pages.div_ceil(2) * PAGE_SIZE;
        let end = pages * PAGE_SIZE;
        ArenaLayout {
            size,
            input: 0..mid,
            output: mid..end,
        }
    }
}

/// Checks a peer's reference of `len` bytes at `offset` against `range`, the
/// region the peer is allowed to name: it must lie entirely inside it. An
/// empty reference is valid anywhere from `range.start` to `range.end`
/// inclusive. Every sum is checked, so hostile values (`u64::MAX`) are an
/// error, never a wrap-around.
pub fn check_ref(range: &Range<u64>, offset: u64, len: u64) -> Result<(), ArenaError> {
    let end = offset
        .checked_add(len)
        .ok_or(ArenaError::Overflow { offset, len })?;
    if offset < range.start || end > range.end {
        return Err(ArenaError::OutOfBounds {
            offset,
            len,
            start: range.start,
            end: range.end,
        });
    }
    Ok(())
}

/// A failed arena operation. Each one is a bug in the caller (a bad free) or
/// a protocol violation by the peer (a bad reference); none changes any state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArenaError {
    /// `offset + len` does not fit in a `u64`.
    #[error("shared-memory reference (offset {offset}, len {len}) overflows a 64-bit offset")]
    Overflow {
        /// Offset of the reference.
        offset: u64,
        /// Length of the reference.
        len: u64,
    },
    /// The reference does not lie inside the region it must name.
    #[error(
        "shared-memory reference (offset {offset}, len {len}) is outside the region {start}..{end}"
    )]
    OutOfBounds {
        /// Offset of the reference.
        offset: u64,
        /// Length of the reference.
        len: u64,
        /// Start of the region (inclusive).
        start: u64,
        /// End of the region (exclusive).
        end: u64,
    },
    /// The slot was issued by another allocator.
    #[error("arena slot at offset {offset} belongs to another allocator")]
    ForeignSlot {
        /// Offset of the slot.
        offset: u64,
    },
    /// The slot was already freed, or the allocator was reset since.
    #[error("arena slot at offset {offset} is not allocated (freed twice, or freed by a reset)")]
    NotAllocated {
        /// Offset of the slot.
        offset: u64,
    },
}

/// A byte range handed out by an [`Allocator`], to be given back with
/// [`Allocator::free`]. Its fields are read-only, so a slot always describes
/// exactly what was allocated. A clone names the same slot: only the first
/// of them to be freed is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    offset: u64,
    len: u64,
    /// `len` rounded up to the allocator's alignment: the bytes reserved.
    cap: u64,
    /// Identity of the issuing allocator, to refuse foreign slots.
    owner: u64,
    /// Unique per allocation within the owner, to refuse stale slots.
    ticket: u64,
}

impl Slot {
    /// Offset of the first byte in the arena (aligned, unless empty).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Number of bytes requested.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a zero-length slot, which reserves nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes reserved: `len` rounded up to the alignment. The slack after
    /// `len` belongs to the slot too, but is never part of a reference.
    pub fn capacity(&self) -> u64 {
        self.cap
    }

    /// The slot's bytes, `offset..offset + len`, as a range into the arena.
    pub fn range(&self) -> Range<u64> {
        // Cannot overflow: the slot lies inside the allocator's region.
        self.offset..self.offset + self.len
    }

    /// The reference to send to the peer.
    pub fn payload(&self) -> Payload {
        Payload::Shm {
            offset: self.offset,
            len: self.len,
        }
    }
}

/// Source of allocator identities, so a slot freed into the wrong allocator
/// is recognised instead of punching a hole in someone else's free list.
static NEXT_ALLOCATOR_ID: AtomicU64 = AtomicU64::new(1);

/// Where a live slot lies, by ticket.
#[derive(Debug, Clone, Copy)]
struct Live {
    offset: u64,
    cap: u64,
}

/// Allocator of byte ranges inside one region of an arena: best fit over a
/// free list that is kept fully coalesced, so allocating in order and freeing
/// roughly in order leaves one large block rather than a trail of splinters.
///
/// `alloc` and `free` are `O(log n)` in the number of free blocks and live
/// slots. All free blocks are multiples of the alignment, so `alloc(len)` succeeds
/// exactly when `len == 0` or `len <= largest_free()`.
#[derive(Debug)]
pub struct Allocator {
    id: u64,
    region: Range<u64>,
    align: u64,
    /// Free blocks, offset → length. No two are adjacent (always coalesced).
    by_offset: BTreeMap<u64, u64>,
    /// The same blocks as `(length, offset)`, for best fit.
    by_size: BTreeSet<(u64, u64)>,
    free_bytes: u64,
    /// Live slots, ticket → position. Zero-length slots are here too.
    live: BTreeMap<u64, Live>,
    next_ticket: u64,
}

impl Allocator {
    /// An allocator of `range`, every slot starting on a multiple of `align`
    /// (see [`SLOT_ALIGN`]). The managed region is `range` shrunk inwards to
    /// multiples of `align` (see [`Allocator::region`]); an empty or
    /// inverted range gives an allocator of capacity 0.
    ///
    /// # Panics
    ///
    /// If `align` is not a power of two: it is a constant of the caller.
    pub fn new(range: Range<u64>, align: u64) -> Allocator {
        assert!(
            align.is_power_of_two(),
            "arena slot alignment must be a power of two, got {align}"
        );
        let end = range.end / align * align;
        let region = match range.start.checked_next_multiple_of(align) {
            Some(start) if start < end => start..end,
            _ => range.start..range.start,
        };
        let mut allocator = Allocator {
            id: NEXT_ALLOCATOR_ID.fetch_add(1, Ordering::Relaxed),
            region,
            align,
            by_offset: BTreeMap::new(),
            by_size: BTreeSet::new(),
            free_bytes: 0,
            live: BTreeMap::new(),
            next_ticket: 0,
        };
        allocator.reset();
        allocator
    }

    /// Reserves `len` bytes, or returns `None` when no free block is large
    /// enough: the caller backs off (keeps the job queued, or sends it
    /// inline) until slots are freed. When `len > capacity()` no amount of
    /// freeing will help.
    ///
    /// A zero-length request always succeeds: an empty slot at the region's
    /// start that reserves nothing, but must still be freed.
    pub fn alloc(&mut self, len: u64) -> Option<Slot> {
        if len == 0 {
            return Some(self.issue(self.region.start, 0, 0));
        }
        let cap = len.checked_next_multiple_of(self.align)?;
        // Best fit; among equal sizes, the lowest offset.
        let &(block_len, offset) = self.by_size.range((cap, 0)..).next()?;
        self.remove_free(offset, block_len);
        if block_len > cap {
            self.insert_free(offset + cap, block_len - cap);
        }
        self.free_bytes -= cap;
        Some(self.issue(offset, len, cap))
    }

    /// Gives a slot back, merging it with free neighbours. A slot from
    /// another allocator, one already freed, or one issued before the last
    /// [`reset`](Allocator::reset) is refused and changes nothing.
    pub fn free(&mut self, slot: Slot) -> Result<(), ArenaError> {
        if slot.owner != self.id {
            return Err(ArenaError::ForeignSlot {
                offset: slot.offset,
            });
        }
        let Some(Live { offset, cap }) = self.live.remove(&slot.ticket) else {
            return Err(ArenaError::NotAllocated {
                offset: slot.offset,
            });
        };
        if cap == 0 {
            return Ok(());
        }
        let (mut start, mut len) = (offset, cap);
        if let Some((&prev, &prev_len)) = self.by_offset.range(..offset).next_back() {
            if prev + prev_len == offset {
                self.remove_free(prev, prev_len);
                start = prev;
                len += prev_len;
            }
        }
        let next = offset + cap;
        if let Some(&next_len) = self.by_offset.get(&next) {
            self.remove_free(next, next_len);
            len += next_len;
        }
        self.insert_free(start, len);
        self.free_bytes += cap;
        Ok(())
    }

    /// Frees everything at once (the worker died: its whole arena is
    /// released). Slots issued before are refused by [`free`](Allocator::free)
    /// afterwards.
    pub fn reset(&mut self) {
        self.by_offset.clear();
        self.by_size.clear();
        self.live.clear();
        self.free_bytes = 0;
        let capacity = self.capacity();
        if capacity > 0 {
            self.insert_free(self.region.start, capacity);
            self.free_bytes = capacity;
        }
    }

    /// The managed bytes: the range given to [`new`](Allocator::new), shrunk
    /// to multiples of the alignment.
    pub fn region(&self) -> Range<u64> {
        self.region.clone()
    }

    /// Size of the managed region in bytes.
    pub fn capacity(&self) -> u64 {
        self.region.end - self.region.start
    }

    /// Bytes not reserved by any slot (possibly in several blocks).
    pub fn free_bytes(&self) -> u64 {
        self.free_bytes
    }

    /// Size of the largest free block: the largest `len` that
    /// [`alloc`](Allocator::alloc) can satisfy now.
    pub fn largest_free(&self) -> u64 {
        self.by_size.last().map_or(0, |&(len, _)| len)
    }

    /// Number of live slots, zero-length ones included.
    pub fn in_use(&self) -> usize {
        self.live.len()
    }

    fn issue(&mut self, offset: u64, len: u64, cap: u64) -> Slot {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.live.insert(ticket, Live { offset, cap });
        Slot {
            offset,
            len,
            cap,
            owner: self.id,
            ticket,
        }
    }

    fn insert_free(&mut self, offset: u64, len: u64) {
        self.by_offset.insert(offset, len);
        self.by_size.insert((len, offset));
    }

    fn remove_free(&mut self, offset: u64, len: u64) {
        self.by_offset.remove(&offset);
        self.by_size.remove(&(len, offset));
    }

    /// Panics unless every internal invariant holds: the two free indexes
    /// agree, free blocks are aligned, inside the region, non-adjacent and
    /// sum to `free_bytes`, and free blocks plus live slots tile the region
    /// exactly (no overlap, nothing lost).
    #[cfg(test)]
    fn check_invariants(&self) {
        assert_eq!(self.by_offset.len(), self.by_size.len());
        for (&offset, &len) in &self.by_offset {
            assert!(self.by_size.contains(&(len, offset)));
        }
        let mut spans: Vec<(u64, u64, bool)> = self
            .by_offset
            .iter()
            .map(|(&offset, &len)| (offset, len, true))
            .collect();
        spans.extend(
            self.live
                .values()
                .filter(|l| l.cap > 0)
                .map(|l| (l.offset, l.cap, false)),
        );
        spans.sort_unstable();
        let mut at = self.region.start;
        let mut prev_free = false;
        let mut free = 0;
        for (offset, len, is_free) in spans {
            assert_eq!(offset, at, "gap or overlap at {offset}");
            assert!(len > 0 && len % self.align == 0, "unaligned span {len}");
            assert!(
                !(prev_free && is_free),
                "uncoalesced free blocks at {offset}"
            );
            if is_free {
                free += len;
            }
            prev_free = is_free;
            at = offset + len;
        }
        assert_eq!(at, self.region.end, "spans do not cover the region");
        assert_eq!(free, self.free_bytes);
        for l in self.live.values().filter(|l| l.cap == 0) {
            assert_eq!(l.offset, self.region.start);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    fn whole(a: &Allocator) -> bool {
        a.free_bytes() == a.capacity() && a.largest_free() == a.capacity() && a.in_use() == 0
    }

    #[test]
    fn alloc_free_round_trip() {
        let mut a = Allocator::new(0..64 * KIB, SLOT_ALIGN);
        assert!(whole(&a));
        let s = a.alloc(1000).unwrap();
        assert_eq!((s.offset(), s.len(), s.capacity()), (0, 1000, 1024));
        assert_eq!(s.range(), 0..1000);
        assert_eq!(
            s.payload(),
            Payload::Shm {
                offset: 0,
                len: 1000
            }
        );
        assert_eq!(a.in_use(), 1);
        assert_eq!(a.free_bytes(), 63 * KIB);
        let t = a.alloc(64).unwrap();
        assert_eq!((t.offset(), t.capacity()), (1024, 64));
        a.check_invariants();
        a.free(s).unwrap();
        a.free(t).unwrap();
        a.check_invariants();
        assert!(whole(&a));
    }

    #[test]
    fn slots_are_aligned_and_region_is_shrunk_to_alignment() {
        let mut a = Allocator::new(100..10_000, 64);
        assert_eq!(a.region(), 128..9984);
        assert_eq!(a.capacity(), 9856);
        for len in [1, 63, 64, 65, 127, 129, 1000] {
            let s = a.alloc(len).unwrap();
            assert_eq!(s.offset() % 64, 0);
            assert_eq!(s.capacity(), len.div_ceil(64) * 64);
            assert!(a.region().contains(&s.offset()));
            assert!(s.offset() + s.capacity() <= a.region().end);
        }
        a.check_invariants();

        let mut p = Allocator::new(4096..1 << 20, PAGE_SIZE);
        let s = p.alloc(1).unwrap();
        let t = p.alloc(4097).unwrap();
        assert_eq!((s.offset(), s.capacity()), (4096, 4096));
        assert_eq!((t.offset(), t.capacity()), (8192, 8192));
        p.check_invariants();
    }

    #[test]
    fn degenerate_ranges_have_no_capacity() {
        for (range, align) in [
            (0..0, 64),
            (10..50, 64),
            // Inverted.
            (
                Range {
                    start: 100,
                    end: 50,
                },
                64,
            ),
            (u64::MAX - 5..u64::MAX, 64),
        ] {
            let mut a = Allocator::new(range.clone(), align);
            assert_eq!(a.capacity(), 0, "{range:?}");
            assert_eq!(a.largest_free(), 0);
            assert!(a.alloc(1).is_none());
            let z = a.alloc(0).unwrap();
            assert_eq!(z.offset(), range.start);
            a.check_invariants();
            a.free(z).unwrap();
        }
        // The top of the address space: no overflow anywhere.
        let mut a = Allocator::new(u64::MAX - 4095..u64::MAX, 1);
        let s = a.alloc(4095).unwrap();
        assert_eq!(s.range(), u64::MAX - 4095..u64::MAX);
        assert!(a.alloc(1).is_none());
        assert!(a.alloc(u64::MAX).is_none());
        a.free(s).unwrap();
        assert!(whole(&a));
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn alignment_must_be_a_power_of_two() {
        let _ = Allocator::new(0..4096, 48);
    }

    /// Heap's algorithm: calls `f` with every permutation of `v`.
    fn permutations(v: &mut [usize], k: usize, f: &mut impl FnMut(&[usize])) {
        if k <= 1 {
            f(v);
            return;
        }
        for i in 0..k {
            permutations(v, k - 1, f);
            let j = if k & 1 == 0 { i } else { 0 };
            v.swap(j, k - 1);
        }
    }

    #[test]
    fn freeing_in_every_order_coalesces_to_one_block() {
        let lens: [u64; 6] = [64, 1, 200, 4096, 65, 128];
        let mut order: Vec<usize> = (0..lens.len()).collect();
        let mut runs = 0;
        permutations(&mut order, lens.len(), &mut |order| {
            runs += 1;
            // With and without a free tail after the last slot.
            for cap in [
                lens.iter().map(|l| l.div_ceil(64) * 64).sum::<u64>(),
                64 * KIB,
            ] {
                let mut a = Allocator::new(0..cap, 64);
                let mut slots: Vec<Option<Slot>> =
                    lens.iter().map(|&l| Some(a.alloc(l).unwrap())).collect();
                for &i in order {
                    a.free(slots[i].take().unwrap()).unwrap();
                    a.check_invariants();
                }
                assert!(whole(&a), "order {order:?}");
                assert_eq!(a.by_offset.len(), 1);
            }
        });
        assert_eq!(runs, 720);
    }

    #[test]
    fn exhaustion_returns_none_and_frees_make_room() {
        let mut a = Allocator::new(0..16 * KIB, 64);
        let mut slots: Vec<Slot> = (0..16).map(|_| a.alloc(KIB).unwrap()).collect();
        assert_eq!(a.free_bytes(), 0);
        assert_eq!(a.largest_free(), 0);
        assert!(a.alloc(1).is_none());
        assert!(a.alloc(0).is_some(), "an empty slot needs no room");

        // One hole: exactly that much fits, no more.
        let s = slots.remove(5);
        let hole = s.offset();
        a.free(s).unwrap();
        assert_eq!(a.largest_free(), KIB);
        assert!(a.alloc(KIB + 1).is_none());
        let again = a.alloc(KIB).unwrap();
        assert_eq!(again.offset(), hole);
        slots.insert(5, again);

        // Two separate holes are not one: 2 KiB free, 1 KiB contiguous.
        let s7 = slots.remove(7);
        let s3 = slots.remove(3);
        a.free(s7).unwrap();
        a.free(s3).unwrap();
        assert_eq!((a.free_bytes(), a.largest_free()), (2 * KIB, KIB));
        assert!(a.alloc(2 * KIB).is_none());
        a.check_invariants();

        // Best fit: a small request takes the smaller hole, not the tail.
        for s in slots.drain(12..) {
            a.free(s).unwrap();
        }
        let small = a.alloc(100).unwrap();
        assert_eq!(small.offset(), 3 * KIB);
        assert!(
            a.alloc(17 * KIB).is_none(),
            "more than the capacity never fits"
        );
        a.check_invariants();
    }

    #[test]
    fn zero_length_slots() {
        let mut a = Allocator::new(4096..8192, 64);
        let z = a.alloc(0).unwrap();
        assert!(z.is_empty());
        assert_eq!((z.offset(), z.len(), z.capacity()), (4096, 0, 0));
        assert_eq!(check_ref(&(4096..8192), z.offset(), z.len()), Ok(()));
        assert_eq!(a.in_use(), 1);
        assert_eq!(a.free_bytes(), 4096);
        let full = a.alloc(4096).unwrap();
        let z2 = a.alloc(0).unwrap();
        assert_eq!(a.in_use(), 3);
        a.free(z.clone()).unwrap();
        assert_eq!(a.free(z), Err(ArenaError::NotAllocated { offset: 4096 }));
        a.free(z2).unwrap();
        a.free(full).unwrap();
        a.check_invariants();
        assert!(whole(&a));
    }

    #[test]
    fn double_foreign_and_stale_frees_are_refused() {
        let mut a = Allocator::new(0..64 * KIB, 64);
        let mut b = Allocator::new(0..64 * KIB, 64);
        let s = a.alloc(100).unwrap();
        let t = b.alloc(100).unwrap();
        assert_eq!(s.offset(), t.offset());

        // Foreign: same offset and size, other allocator.
        assert_eq!(
            b.free(s.clone()),
            Err(ArenaError::ForeignSlot { offset: 0 })
        );
        assert_eq!(b.in_use(), 1);

        // Double free, even after the offset was handed out again.
        a.free(s.clone()).unwrap();
        let reused = a.alloc(100).unwrap();
        assert_eq!(reused.offset(), s.offset());
        assert_eq!(a.free(s), Err(ArenaError::NotAllocated { offset: 0 }));
        assert_eq!(a.in_use(), 1);
        a.check_invariants();

        // Stale: issued before a reset.
        a.reset();
        assert!(whole(&a));
        let fresh = a.alloc(100).unwrap();
        assert_eq!(a.free(reused), Err(ArenaError::NotAllocated { offset: 0 }));
        assert_eq!(a.in_use(), 1);
        a.free(fresh).unwrap();
        a.check_invariants();
        assert!(whole(&a));

        assert_eq!(
            ArenaError::NotAllocated { offset: 0 }.to_string(),
            "arena slot at offset 0 is not allocated (freed twice, or freed by a reset)"
        );
    }

    #[test]
    fn reset_frees_everything() {
        let mut a = Allocator::new(0..MIB, 64);
        for len in [1, 1000, 5000, 0, 77] {
            a.alloc(len).unwrap();
        }
        assert_eq!(a.in_use(), 5);
        a.reset();
        a.check_invariants();
        assert!(whole(&a));
        assert_eq!(a.alloc(MIB).unwrap().offset(), 0);
    }

    #[test]
    fn check_ref_bounds() {
        let r = 4096..8192;
        let ok = |offset, len| check_ref(&r, offset, len);
        assert_eq!(ok(4096, 4096), Ok(()));
        assert_eq!(ok(4096, 0), Ok(()));
        assert_eq!(ok(8192, 0), Ok(()), "empty reference at the end");
        assert_eq!(ok(8191, 1), Ok(()));
        assert_eq!(ok(5000, 100), Ok(()));

        let out = |offset, len| {
            Err(ArenaError::OutOfBounds {
                offset,
                len,
                start: 4096,
                end: 8192,
            })
        };
        assert_eq!(ok(4095, 1), out(4095, 1));
        assert_eq!(ok(4095, 0), out(4095, 0));
        assert_eq!(ok(8191, 2), out(8191, 2));
        assert_eq!(ok(8192, 1), out(8192, 1));
        assert_eq!(ok(8193, 0), out(8193, 0));
        assert_eq!(ok(0, 4096), out(0, 4096));
        assert_eq!(ok(4096, 4097), out(4096, 4097));
        assert_eq!(ok(4096, u64::MAX - 4096), out(4096, u64::MAX - 4096));
        assert_eq!(ok(u64::MAX, 0), out(u64::MAX, 0));

        assert_eq!(
            ok(u64::MAX, 1),
            Err(ArenaError::Overflow {
                offset: u64::MAX,
                len: 1
            })
        );
        assert_eq!(
            ok(4096, u64::MAX),
            Err(ArenaError::Overflow {
                offset: 4096,
                len: u64::MAX
            })
        );
        assert!(matches!(
            ok(u64::MAX, u64::MAX),
            Err(ArenaError::Overflow { .. })
        ));

        // A region reaching the top of the address space.
        let top = u64::MAX - 10..u64::MAX;
        assert_eq!(check_ref(&top, u64::MAX - 10, 10), Ok(()));
        assert_eq!(check_ref(&top, u64::MAX, 0), Ok(()));
        assert!(check_ref(&top, u64::MAX - 10, 11).is_err());

        // An empty region accepts only an empty reference at its position.
        assert_eq!(check_ref(&(4096..4096), 4096, 0), Ok(()));
        assert!(check_ref(&(4096..4096), 4096, 1).is_err());

        assert_eq!(
            ok(0, 1).unwrap_err().to_string(),
            "shared-memory reference (offset 0, len 1) is outside the region 4096..8192"
        );
    }

    #[test]
    fn split_layouts() {
        let cases = [
            (0, 0..0, 0..0),
            (1, 0..0, 0..0),
            (4095, 0..0, 0..0),
            (4096, 0..4096, 4096..4096),
            (4097, 0..4096, 4096..4096),
            (8191, 0..4096, 4096..4096),
            (8192, 0..4096, 4096..8192),
            (10_000, 0..4096, 4096..8192),
            (12_288, 0..8192, 8192..12_288),
            (100_001, 0..49_152, 49_152..98_304),
            (102_401, 0..53_248, 53_248..102_400),
            (64 * MIB, 0..32 * MIB, 32 * MIB..64 * MIB),
            (64 * MIB + 1, 0..32 * MIB, 32 * MIB..64 * MIB),
            (256 * MIB, 0..128 * MIB, 128 * MIB..256 * MIB),
            (256 * MIB - 1, 0..128 * MIB, 128 * MIB..256 * MIB - 4096),
            (u64::MAX, 0..1 << 63, 1 << 63..u64::MAX - 4095),
        ];
        for (size, input, output) in cases {
            let l = ArenaLayout::split(size);
            assert_eq!(
                l,
                ArenaLayout {
                    size,
                    input,
                    output
                },
                "size {size}"
            );
            assert_eq!(l.input.start, 0);
            assert_eq!(l.input.end, l.output.start);
            assert!(l.output.start <= l.output.end && l.output.end <= size);
            for bound in [l.input.end, l.output.end] {
                assert_eq!(bound % PAGE_SIZE, 0);
            }
            assert!(l.input.end - l.input.start >= l.output.end - l.output.start);
            // Each side's allocator takes its region as is.
            let a = Allocator::new(l.output.clone(), SLOT_ALIGN);
            assert_eq!(a.region(), l.output);
        }
    }

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn random_stress_keeps_invariants() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let region = 4096..4096 + 2 * MIB;
        let mut a = Allocator::new(region.clone(), SLOT_ALIGN);
        let mut other = Allocator::new(region.clone(), SLOT_ALIGN);
        let foreign = other.alloc(64).unwrap();
        // Oldest first, so "free roughly in order" is cheap to pick.
        let mut live: std::collections::VecDeque<Slot> = Default::default();
        let mut stale: Vec<Slot> = Vec::new();
        let (mut allocs, mut misses, mut frees) = (0u32, 0u32, 0u32);

        for step in 0..100_000u32 {
            match rng.below(1000) {
                0 => {
                    stale.extend(live.drain(..));
                    a.reset();
                }
                1..=5 => {
                    if let Some(s) = stale.pop() {
                        let offset = s.offset();
                        assert_eq!(a.free(s), Err(ArenaError::NotAllocated { offset }));
                    }
                    assert!(matches!(
                        a.free(foreign.clone()),
                        Err(ArenaError::ForeignSlot { .. })
                    ));
                }
                6..=509 => {
                    let len = match rng.below(20) {
                        0 => 0,
                        1 => rng.below(2 * MIB + 100),
                        2..=9 => rng.below(256 * KIB),
                        _ => rng.below(16 * KIB),
                    };
                    let largest = a.largest_free();
                    match a.alloc(len) {
                        Some(s) => {
                            allocs += 1;
                            assert!(len == 0 || len <= largest, "step {step}");
                            assert_eq!(s.len(), len);
                            assert!(s.capacity() >= len && s.capacity() < len + SLOT_ALIGN);
                            if len > 0 {
                                assert_eq!(s.offset() % SLOT_ALIGN, 0);
                            }
                            assert_eq!(check_ref(&region, s.offset(), s.len()), Ok(()));
                            live.push_back(s);
                        }
                        None => {
                            misses += 1;
                            assert!(len > largest, "step {step}: {len} fits in {largest}");
                        }
                    }
                }
                _ => {
                    // Mostly the oldest slot, sometimes one near it, rarely any.
                    let n = live.len() as u64;
                    if n > 0 {
                        let i = match rng.below(10) {
                            0..=5 => 0,
                            6..=8 => rng.below(n.min(4)),
                            _ => rng.below(n),
                        };
                        let s = live.remove(i as usize).unwrap();
                        a.free(s).unwrap();
                        frees += 1;
                    }
                }
            }
            a.check_invariants();
            assert_eq!(a.in_use(), live.len());
            let used: u64 = live.iter().map(Slot::capacity).sum();
            assert_eq!(used + a.free_bytes(), a.capacity(), "step {step}");
            let mut spans: Vec<Range<u64>> = live
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| s.offset()..s.offset() + s.capacity())
                .collect();
            spans.sort_unstable_by_key(|r| r.start);
            for w in spans.windows(2) {
                assert!(w[0].end <= w[1].start, "step {step}: {w:?} overlap");
            }
            for r in &spans {
                assert!(region.start <= r.start && r.end <= region.end);
            }
        }
        assert!(
            allocs > 20_000 && misses > 100 && frees > 20_000,
            "{allocs} {misses} {frees}"
        );

        for s in live.drain(..) {
            a.free(s).unwrap();
        }
        a.check_invariants();
        assert!(whole(&a));
    }
}
