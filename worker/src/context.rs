//! The per-job [`JobContext`] handed to handlers, and the cancellation state
//! it reads, shared between the reader thread and the handler's thread.
//!
//! The race closed here: a `Cancel { id }` can arrive on the reader thread
//! while the handler's thread is between taking job `id` from its queue and
//! starting it. The reader first forwards the `Cancel` through the channel,
//! *then* checks under the lock whether `id` is the running job; the handler's
//! thread first marks `id` running under the same lock, *then* drains the
//! channel. Whichever of the two lock sections comes second sees the other's
//! effect, so a cancel is never lost, and a cancel meant for a job that just
//! finished never leaks into the next one (the flag is set only for a
//! matching id and cleared when the job ends).
//!
//! The same lock decides who answers a job cancelled before it started: the
//! reader records every job it forwards as *queued*; a `Cancel` finding its
//! job still queued takes it out and the reader answers `Failed` at once
//! (even while the handler is busy with a long job: the daemon may be taking
//! the job back for an idle worker), and the handler's thread, when it gets
//! to that job, finds it gone and skips it. Exactly one of the two owns
//! each job.

use std::collections::HashSet;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use ipc_proto::worker::{Job, JobId};
use nix::sys::eventfd::{EfdFlags, EventFd};

/// Cancellation state of the job currently running on the handler's thread.
pub(crate) struct CancelState {
    running: Mutex<Running>,
    /// Mirrors `running.cancelled` so that [`JobContext::is_cancelled`] is a
    /// plain load, cheap enough for a handler to call in a tight loop.
    flag: AtomicBool,
    /// Readable (counter > 0) exactly while the running job is cancelled.
    /// Created on first use only, so a worker whose handler never asks for
    /// it holds no descriptor beyond the daemon's fds 0-5.
    event: OnceLock<EventFd>,
}

#[derive(Default)]
struct Running {
    id: Option<JobId>,
    cancelled: bool,
    /// Forwarded by the reader, not yet started or answered.
    queued: HashSet<JobId>,
}

impl CancelState {
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(CancelState {
            running: Mutex::new(Running::default()),
            flag: AtomicBool::new(false),
            event: OnceLock::new(),
        })
    }

    /// The eventfd, created on first call (under the lock, so a cancel
    /// racing with the creation is reflected in its counter).
    fn event(&self) -> std::io::Result<&EventFd> {
        if let Some(ev) = self.event.get() {
            return Ok(ev);
        }
        let r = self.lock();
        if self.event.get().is_none() {
            let ev = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
            if r.cancelled {
                let _ = ev.write(1);
            }
            let _ = self.event.set(ev);
        }
        drop(r);
        Ok(self.event.get().expect("set above"))
    }

    fn lock(&self) -> MutexGuard<'_, Running> {
        // No code under this lock can panic halfway through an update, so a
        // poisoned lock still holds consistent data.
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reader thread: these jobs are being forwarded to the handler's thread.
    pub(crate) fn queue(&self, ids: impl IntoIterator<Item = JobId>) {
        self.lock().queued.extend(ids);
    }

    /// Handler's thread: job `id` is about to run. False if it was cancelled
    /// (and answered by the reader) while queued: skip it.
    pub(crate) fn start(&self, id: JobId) -> bool {
        let mut r = self.lock();
        if !r.queued.remove(&id) {
            return false;
        }
        r.id = Some(id);
        r.cancelled = false;
        true
    }

    /// Handler's thread: the running job has ended.
    pub(crate) fn finish(&self) {
        let mut r = self.lock();
        r.id = None;
        if r.cancelled {
            r.cancelled = false;
            self.flag.store(false, Ordering::Release);
            // Reset the eventfd counter; EAGAIN (already zero) is fine.
            if let Some(ev) = self.event.get() {
                let _ = ev.read();
            }
        }
    }

    /// Reader thread: cancel job `id` if it is the running one. True if it
    /// was still queued: it is taken out, and the caller answers it.
    pub(crate) fn cancel(&self, id: JobId) -> bool {
        let mut r = self.lock();
        if r.id == Some(id) {
            self.cancel_locked(&mut r);
            false
        } else {
            r.queued.remove(&id)
        }
    }

    /// Reader thread: cancel whatever job is running (the daemon is gone or
    /// broke the protocol; nothing it runs can be delivered any more).
    pub(crate) fn cancel_running(&self) {
        let mut r = self.lock();
        if r.id.is_some() {
            self.cancel_locked(&mut r);
        }
    }

    fn cancel_locked(&self, r: &mut Running) {
        if !r.cancelled {
            r.cancelled = true;
            self.flag.store(true, Ordering::Release);
            // Can only fail on counter overflow, impossible with one write.
            if let Some(ev) = self.event.get() {
                let _ = ev.write(1);
            }
        }
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
}

/// What a handler knows about the job it is running.
///
/// One context is reused for every job; a handler gets it by reference for
/// the duration of one call.
pub struct JobContext {
    id: JobId,
    attempt: u32,
    deadline_ms: Option<u64>,
    cancel: Arc<CancelState>,
}

impl JobContext {
    pub(crate) fn new(cancel: Arc<CancelState>) -> Self {
        JobContext {
            id: 0,
            attempt: 0,
            deadline_ms: None,
            cancel,
        }
    }

    pub(crate) fn set_job(&mut self, job: &Job) {
        self.id = job.id;
        self.attempt = job.attempt;
        self.deadline_ms = job.deadline_ms;
    }

    /// The job's id, unique for the life of the daemon's store.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The attempt number, from 1 (a job is retried when a worker dies
    /// while running it).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The job's wall-clock deadline, if it has a timeout. The daemon
    /// enforces it (by killing the worker); a handler may use it to give up
    /// early and fail cleanly instead.
    pub fn deadline(&self) -> Option<SystemTime> {
        let ms = self.deadline_ms?;
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_millis(ms))
    }

    /// True once the daemon has cancelled this job (or has gone away). A
    /// long-running handler should poll it and return early; whatever it
    /// returns is still reported. Cheap: one atomic load.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// A descriptor that becomes readable when this job is cancelled, for
    /// handlers that wait in `poll(2)` on their own descriptors (a child's
    /// pipes, a socket) and want to wake up on cancellation too. Only poll
    /// it; never read it or close it. The eventfd is created on the first
    /// call, hence the `Result` (it fails only when out of descriptors).
    pub fn cancel_fd(&self) -> std::io::Result<BorrowedFd<'_>> {
        Ok(self.cancel.event()?.as_fd())
    }
}

impl std::fmt::Debug for JobContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobContext")
            .field("id", &self.id)
            .field("attempt", &self.attempt)
            .field("deadline_ms", &self.deadline_ms)
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

    fn readable(fd: BorrowedFd<'_>) -> bool {
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).unwrap() == 1
    }

    #[test]
    fn cancel_applies_only_to_the_running_job_and_resets() {
        let state = Arc::new(CancelState::new().unwrap());
        let ctx = JobContext::new(Arc::clone(&state));
        assert!(!state.cancel(7)); // nothing running or queued: ignored
        state.queue([7, 9]);
        assert!(state.start(7));
        assert!(!ctx.is_cancelled());
        assert!(!readable(ctx.cancel_fd().unwrap()));
        state.cancel(8); // not the running job
        assert!(!ctx.is_cancelled());
        state.cancel(7);
        assert!(ctx.is_cancelled());
        assert!(readable(ctx.cancel_fd().unwrap()));
        state.finish();
        assert!(!ctx.is_cancelled());
        assert!(!readable(ctx.cancel_fd().unwrap()));
        state.queue([8]);
        assert!(state.start(8));
        assert!(!ctx.is_cancelled());
        state.cancel_running();
        assert!(ctx.is_cancelled());
        state.finish();
        // Cancelled while queued: the reader answers it, the handler's
        // thread skips it, and it cannot be cancelled twice.
        assert!(state.cancel(9));
        assert!(!state.cancel(9));
        assert!(!state.start(9));
        assert!(!ctx.is_cancelled());
    }

    #[test]
    fn deadline_is_epoch_based_and_never_panics() {
        let mut ctx = JobContext::new(Arc::new(CancelState::new().unwrap()));
        let job = |deadline_ms| Job {
            id: 1,
            attempt: 2,
            deadline_ms,
            input: ipc_proto::worker::Payload::Inline(Vec::new().into()),
        };
        ctx.set_job(&job(Some(1_500)));
        assert_eq!(
            ctx.deadline(),
            Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_500))
        );
        assert_eq!((ctx.id(), ctx.attempt()), (1, 2));
        ctx.set_job(&job(Some(u64::MAX)));
        let _ = ctx.deadline();
        ctx.set_job(&job(None));
        assert_eq!(ctx.deadline(), None);
    }
}
