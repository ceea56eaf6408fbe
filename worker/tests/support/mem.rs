//! The daemon's side of a worker's shared-memory arena in tests: shared by
//! the worker crate's unit tests (`src/tests_shm.rs`) and its protocol
//! tests (`tests/protocol.rs`), each of which includes this file.

use ipc_proto::arena::{check_ref, ArenaLayout};
use ipc_proto::worker::{Payload, ToWorker};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;

/// The daemon's mapping of a worker's arena (fd 5).
pub struct Mem {
    base: NonNull<u8>,
    size: usize,
    pub layout: ArenaLayout,
}

impl Mem {
    pub fn map(fd: &OwnedFd, size: usize) -> Mem {
        // SAFETY: a fresh shared mapping of our own memfd; the test follows
        // the daemon's side of the protocol (inputs written before their job
        // is sent and left alone until it is answered; outputs read between
        // Done and Release).
        let base = unsafe {
            mmap(
                None,
                NonZeroUsize::new(size).unwrap(),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }
        .unwrap()
        .cast();
        Mem {
            base,
            size,
            layout: ArenaLayout::split(size as u64),
        }
    }

    /// Writes `bytes` at `offset` of the input region (which they must lie
    /// in) and returns the payload referring to them, as the daemon sends a
    /// job's input.
    pub fn put(&self, offset: u64, bytes: &[u8]) -> Payload {
        self.write(offset, bytes);
        Payload::Shm {
            offset,
            len: bytes.len() as u64,
        }
    }

    /// The bytes of an output payload: inline, or read from the output
    /// region for `Shm` (which must lie in it).
    pub fn bytes(&self, payload: &Payload) -> Vec<u8> {
        match payload {
            Payload::Inline(b) => b.to_vec(),
            Payload::Shm { offset, len } => self.read(*offset, *len),
            Payload::Fd { .. } => panic!("a descriptor output without an output buffer"),
        }
    }

    fn write(&self, offset: u64, bytes: &[u8]) {
        check_ref(&self.layout.input, offset, bytes.len() as u64).unwrap();
        // SAFETY: inside the input region of the mapping (checked).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.base.as_ptr().add(offset as usize),
                bytes.len(),
            )
        }
    }

    fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        check_ref(&self.layout.output, offset, len).expect("output outside the output region");
        // SAFETY: inside the output region of the mapping (checked); the
        // worker does not touch it before it is released.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr().add(offset as usize), len as usize) }
            .to_vec()
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`; nothing borrows it any more.
        let _ = unsafe { munmap(self.base.cast(), self.size) };
    }
}

// SAFETY: a plain address of a mapping that lives as long as `Mem`; the
// tests use it from one thread at a time.
unsafe impl Send for Mem {}

/// The `Release` that hands a shared-memory output back to the worker, or
/// `None` for an inline one.
pub fn release_of(payload: &Payload) -> Option<ToWorker> {
    match *payload {
        Payload::Shm { offset, len } => Some(ToWorker::Release { offset, len }),
        Payload::Inline(_) | Payload::Fd { .. } => None,
    }
}

/// Deterministic bytes, different per `seed`. The `i >> 12` term makes each
/// 4 KiB block differ from the others, so that bytes misplaced by a multiple
/// of 256 (the period of the rest) still show.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}
