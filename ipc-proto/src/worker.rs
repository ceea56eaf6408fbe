//! Messages between the daemon and a worker (pipes on fd 3 and fd 4).
//!
//! The worker speaks first with [`FromWorker::Ready`]; the daemon then sends
//! [`ToWorker::Job`]s (several may be in flight: `prefetch`), the worker
//! answers each with [`FromWorker::Done`], [`FromWorker::Failed`] or
//! [`FromWorker::Raised`], in the order received. See `docs/PROTOCOL.md`
//! for the byte-level description.
//!
//! Shared memory: fd 5 is an arena split by [`crate::arena::ArenaLayout`]
//! into the daemon's input half and the worker's output half. An input over
//! the pool's `inline_limit` arrives as `Payload::Shm` in the input half and
//! stays valid until the worker answers that job. An output over
//! `inline_limit` (the worker reads it from `JOBVISOR_INLINE_LIMIT`) may be
//! returned as `Payload::Shm` in the output half; the worker must leave that
//! range alone until the daemon sends [`ToWorker::Release`] for it.

use crate::Bytes;
use serde::{Deserialize, Serialize};

/// Identifier of a job, unique for the life of the store.
pub type JobId = u64;

/// A payload: inline bytes, or a reference into the worker's shared-memory
/// arena (fd 5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// The bytes themselves.
    Inline(Bytes),
    /// `len` bytes at `offset` in the arena.
    Shm {
        /// Byte offset into the arena.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Worker protocol 2 only. In a `Job`'s input: the first `len` bytes
    /// of the memfd attached to the frame (sealed against shrinking and
    /// writing). In a `Done`/`Raised`: the first `len` bytes of the job's
    /// output buffer ([`ToWorker::JobOut`]).
    Fd {
        /// Length in bytes.
        len: u64,
    },
}

impl Payload {
    /// Length in bytes of the payload's content.
    pub fn len(&self) -> u64 {
        match self {
            Payload::Inline(b) => b.len() as u64,
            Payload::Shm { len, .. } | Payload::Fd { len } => *len,
        }
    }

    /// True when the payload holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One job handed to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The job's id.
    pub id: JobId,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Wall-clock deadline, milliseconds since the Unix epoch, if any. The
    /// daemon enforces it; the worker may use it to give up early.
    pub deadline_ms: Option<u64>,
    /// The input.
    pub input: Payload,
}

/// Daemon → worker (fd 3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// Run this job.
    Job(Job),
    /// Stop working on this job if possible; answer `Failed` for it.
    Cancel {
        /// The job to cancel.
        id: JobId,
    },
    /// Finish the jobs in hand, then exit 0.
    Shutdown,
    /// The daemon has copied out a `Payload::Shm` output: that range of the
    /// worker's output region may be reused.
    Release {
        /// Offset the worker reported in `Done`.
        offset: u64,
        /// Length the worker reported in `Done`.
        len: u64,
    },
    /// Worker protocol 2 only: run this job like [`ToWorker::Job`]; the
    /// last descriptor attached to the frame is its **output buffer**, a
    /// memfd open read-write, sealed against shrinking only. The worker
    /// may put the output there (growing the memfd as needed) and answer
    /// `Payload::Fd { len }`, or answer as for `Job`.
    JobOut(Job),
}

impl ToWorker {
    /// Descriptors the daemon attaches to this message's frame (worker
    /// protocol 2): the input's with a `Payload::Fd` input, then the
    /// output buffer's with `JobOut`.
    pub fn descriptors(&self) -> usize {
        match self {
            ToWorker::Job(job) => usize::from(matches!(job.input, Payload::Fd { .. })),
            ToWorker::JobOut(job) => 1 + usize::from(matches!(job.input, Payload::Fd { .. })),
            _ => 0,
        }
    }
}

/// Worker → daemon (fd 4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromWorker {
    /// First message: the worker is initialised and can take jobs.
    Ready {
        /// [`crate::PROTOCOL_VERSION`] (1), or [`crate::WORKER_PROTOCOL_FDS`]
        /// (2) from a worker that takes descriptors on fd 3 (a socket).
        protocol_version: u32,
        /// The worker's own pid (for a wrapper that execs, the final one).
        pid: u32,
    },
    /// The job succeeded with this output.
    Done {
        /// The job.
        id: JobId,
        /// Its output.
        output: Payload,
    },
    /// The job failed.
    Failed {
        /// The job.
        id: JobId,
        /// Why, for humans.
        #[serde(deserialize_with = "crate::borrowed_string::deserialize")]
        error: String,
    },
    /// The job failed (not retried, exactly like [`FromWorker::Failed`]),
    /// with machine-readable detail besides the human text: `output` is
    /// kept as the failed job's output (a Python worker puts the pickled
    /// exception there). Optional for workers; appended last so that the
    /// earlier variants keep their indices.
    Raised {
        /// The job.
        id: JobId,
        /// Why, for humans (a traceback: may span lines).
        #[serde(deserialize_with = "crate::borrowed_string::deserialize")]
        error: String,
        /// The detail, inline or in the worker's output half like `Done`'s.
        output: Payload,
    },
}
