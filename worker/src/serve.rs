//! The worker's protocol core: Ready, then jobs in, results out, until
//! `Shutdown` or end of stream. It works on any pair of byte streams (fd 3
//! and fd 4 in production, socket pairs in tests).
//!
//! Three threads, because a job must be cancellable while its handler runs,
//! and its results must not wait for it:
//!
//! - the *reader* thread owns the job stream. It reads in big chunks straight
//!   into the [`FrameDecoder`], decodes every whole frame, and sends each
//!   chunk's messages as one batch over a channel. For a `Cancel` it also
//!   flags the running job, or answers `Failed` at once for a job still
//!   queued, even while the handler runs another (see [`crate::context`]).
//!   It checks every shared-memory input reference against the arena's input
//!   region, and applies `Release`s itself, freeing the output slot and
//!   waking the calling thread if it waits for room (see [`crate::shm`]).
//!   End of stream, a read error or a protocol violation (a bad reference, a
//!   `Release` of a range not handed out) is its last message.
//! - the *calling* thread runs the handler and writes results. It keeps a
//!   local queue of received jobs (skipping those the reader answered as
//!   cancelled), drains the channel without blocking before each job,
//!   and encodes results into one buffer, shared with the flusher. When an
//!   output needs room in a full output region, it flushes that buffer (the
//!   daemon releases only what it has received) and waits on a condition
//!   variable for the reader's `Release`s, at most [`RELEASE_WAIT`].
//! - the *flusher* thread writes buffered results that have waited too long
//!   (see below). It never runs the handler. It is started the first time a
//!   job begins while a result is still buffered; a worker that never gets
//!   there (killed early, or whose jobs always drain the queue) runs with
//!   two threads.
//!
//! Batching: results are written with one `write` when the queue of received
//! jobs is empty (before blocking for more), after a slow job (the next may
//! be slow too), once the buffer is large, and in any case once the oldest
//! buffered result has waited [`MAX_RESULT_AGE`] (200 µs), even while the
//! handler is busy with a later job: the calling thread checks between jobs,
//! the flusher thread watches while a job runs. Tiny jobs thus still cost a
//! fraction of a system call each, while no result is held hostage by the
//! job after it. With prefetch, a result held back for a whole long job
//! would (1) take that job's runtime as its latency, (2) be lost if the
//! worker crashed during that job, the daemon then wrongly believing the
//! finished job was the one running, and (3) likewise have a job timeout
//! blamed on the wrong job. Writes happen under the buffer's lock, a whole
//! buffer at a time, so frames from the two writers never interleave; a
//! write error met by the flusher is returned by the calling thread at its
//! next flush. Whatever is buffered is written before [`serve`] returns.
//!
//! The reader thread is detached: after [`serve`] returns it stays blocked in
//! `read` until the job stream ends. A process that returns from `main`
//! right after (as [`crate::run`] does) does not wait for it.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ipc_proto::worker::{FromWorker, Job, JobId, Payload, ToWorker};
use ipc_proto::{decode, encode_frame, FrameDecoder, MAX_FRAME_LEN, PROTOCOL_VERSION};

use crate::context::{CancelState, JobContext};
use crate::fds::{map_input, JobFds, JobStream, OutputBuffer, Plain, SharedCache};
use crate::output::{FlushResults, Output, Sink};
use crate::shm::{Arena, Shm};

/// Flush buffered results once they take this many bytes.
const FLUSH_BYTES: usize = 1 << 20;
/// Flush right after a job whose handler took at least this long: the next
/// job is likely slow too, and a write costs a few microseconds at most.
const SLOW_JOB: Duration = Duration::from_micros(50);
/// No result waits in the buffer longer than this (plus scheduling delay),
/// whatever the handler does meanwhile: the flusher thread sees to it.
const MAX_RESULT_AGE: Duration = Duration::from_micros(200);
/// How long the flusher keeps watching after it last saw a buffered result,
/// before it goes idle (see [`flush_aged`]).
const LINGER: Duration = Duration::from_millis(2);

/// The error text of a job cancelled before it started.
pub const CANCELLED: &str = "cancelled";

/// Why [`serve`] stopped serving normally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The daemon sent `Shutdown`; every job received before it was answered.
    Shutdown,
    /// The job stream ended without `Shutdown` (the daemon is gone): the
    /// running job was cancelled and queued jobs were dropped.
    Eof,
}

/// Why [`serve`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The daemon sent something this worker cannot accept: a frame that
    /// does not decode, an oversized frame, or a shared-memory input.
    #[error("protocol error from the daemon: {0}")]
    Protocol(String),
    /// Writing results failed (the daemon closed the result pipe: EPIPE).
    #[error("cannot write results to the daemon: {0}")]
    Write(#[source] io::Error),
    /// Reading jobs failed with something other than end of stream.
    #[error("cannot read jobs from the daemon: {0}")]
    Read(#[source] io::Error),
    /// The worker could not set itself up (eventfd, thread).
    #[error("cannot set up the worker: {0}")]
    Setup(#[source] io::Error),
}

impl ServeError {
    /// The process exit status that reports this error to the daemon: 2 for
    /// a protocol error, 1 for an I/O failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            ServeError::Protocol(_) => 2,
            ServeError::Write(_) | ServeError::Read(_) | ServeError::Setup(_) => 1,
        }
    }
}

/// How long a handler's thread waits for `Release`s while the output region
/// is full, before it sends the output inline instead (or fails the job, if
/// it does not fit in a frame). The daemon releases a slot right after
/// copying it, so a healthy daemon makes room within milliseconds.
pub const RELEASE_WAIT: Duration = Duration::from_secs(10);

/// The default `inline_limit` (64 KiB), when `JOBVISOR_INLINE_LIMIT` is not set.
pub const DEFAULT_INLINE_LIMIT: usize = ipc_proto::DEFAULT_INLINE_LIMIT as usize;

/// Shared-memory settings for [`serve_with_output`].
#[derive(Debug)]
pub struct ServeConfig {
    arena: Option<Arena>,
    inline_limit: usize,
    release_wait: Duration,
}

impl Default for ServeConfig {
    /// No arena (every payload inline), [`DEFAULT_INLINE_LIMIT`],
    /// [`RELEASE_WAIT`].
    fn default() -> Self {
        ServeConfig {
            arena: None,
            inline_limit: DEFAULT_INLINE_LIMIT,
            release_wait: RELEASE_WAIT,
        }
    }
}

impl ServeConfig {
    /// The shared-memory arena (fd 5): inputs may then arrive as
    /// `Payload::Shm`, and outputs over the inline limit are returned so.
    /// Without one, a shared-memory input is a protocol error and every
    /// output is sent inline.
    pub fn arena(mut self, arena: Option<Arena>) -> Self {
        self.arena = arena;
        self
    }

    /// Outputs longer than this go through the arena (the pool's
    /// `inline_limit`, from `JOBVISOR_INLINE_LIMIT`).
    pub fn inline_limit(mut self, bytes: usize) -> Self {
        self.inline_limit = bytes;
        self
    }

    /// Bound on a wait for `Release`s (default [`RELEASE_WAIT`]).
    pub fn release_wait(mut self, wait: Duration) -> Self {
        self.release_wait = wait;
        self
    }
}

/// Serves jobs read from `jobs` with `handler`, writing frames to `results`;
/// every payload inline (no arena). See [`serve_with_output`].
pub fn serve<R, W, F>(jobs: R, results: W, handler: F) -> Result<Stop, ServeError>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
    F: FnMut(&JobContext, &[u8]) -> Result<Vec<u8>, String>,
{
    serve_with_output(jobs, results, ServeConfig::default(), vec_handler(handler))
}

/// Adapts a handler returning a `Vec` to the [`Output`] interface: an output
/// over the inline limit is copied once, into an arena slot.
pub(crate) fn vec_handler<F>(
    mut handler: F,
) -> impl FnMut(&JobContext, &[u8], &mut Output) -> Result<(), String>
where
    F: FnMut(&JobContext, &[u8]) -> Result<Vec<u8>, String>,
{
    move |ctx, input, out| {
        out.set_vec(handler(ctx, input)?);
        Ok(())
    }
}

/// Serves jobs read from `jobs` with `handler`, writing frames to `results`.
///
/// Sends `Ready` at once, then answers every job with `Done` or `Failed`,
/// until `Shutdown` (after answering every job received before it) or the
/// end of `jobs`. `jobs` moves to a reader thread that outlives this call
/// until the stream ends (see the module docs).
///
/// With an arena in `config`, a shared-memory input is handed to the handler
/// in place, and an output over the inline limit is returned in the arena's
/// output region (see [`Output`]); the reader thread frees its slot when the
/// daemon sends `Release`.
pub fn serve_with_output<R, W, F>(
    jobs: R,
    results: W,
    config: ServeConfig,
    handler: F,
) -> Result<Stop, ServeError>
where
    R: Read + Send + 'static,
    W: Write + Send + 'static,
    F: FnMut(&JobContext, &[u8], &mut Output) -> Result<(), String>,
{
    serve_stream(Plain(jobs), results, config, PROTOCOL_VERSION, handler)
}

/// [`serve_with_output`] on a job stream that may carry descriptors,
/// announcing `protocol_version` (2 for a [`crate::fds::FdSocket`]).
pub(crate) fn serve_stream<J, W, F>(
    jobs: J,
    results: W,
    config: ServeConfig,
    protocol_version: u32,
    mut handler: F,
) -> Result<Stop, ServeError>
where
    J: JobStream,
    W: Write + Send + 'static,
    F: FnMut(&JobContext, &[u8], &mut Output) -> Result<(), String>,
{
    // Ready goes out first, before any thread is started: a restarted
    // worker is back in service as early as possible (the daemon's restart
    // latency is measured up to this frame).
    let mut results = results;
    let mut ready = Vec::new();
    let hello = FromWorker::Ready {
        protocol_version,
        pid: std::process::id(),
    };
    encode_frame(&hello, &mut ready)
        .map_err(|e| ServeError::Setup(io::Error::other(e.to_string())))?;
    results.write_all(&ready).map_err(ServeError::Write)?;
    results.flush().map_err(ServeError::Write)?;
    let cancel = Arc::new(CancelState::new().map_err(ServeError::Setup)?);
    let shm = config.arena.map(|arena| Arc::new(Shm::new(arena)));
    let mut out = Results::start(results)?;

    let (tx, rx) = mpsc::channel();
    let reader_cancel = Arc::clone(&cancel);
    let reader_shm = shm.clone();
    let reader_out = Arc::downgrade(&out.shared);
    thread::Builder::new()
        .name("jobvisor-reader".into())
        .spawn(move || {
            read_jobs(
                jobs,
                &tx,
                &reader_cancel,
                reader_shm.as_deref(),
                &reader_out,
            )
        })
        .map_err(ServeError::Setup)?;

    let sink = Arc::new(Sink {
        shm: shm.clone(),
        inline_limit: config.inline_limit,
        release_wait: config.release_wait,
        flush: out.flusher(),
        cancel: Arc::clone(&cancel),
    });
    let mut inbox = Inbox::new(rx);
    // Mappings of the memfds jobs come with (worker protocol 2).
    let cache = SharedCache::default();
    let mut ctx = JobContext::new(Arc::clone(&cancel));
    loop {
        if let Some(end) = inbox.take_abort() {
            return out.abort(end);
        }
        let Some((job, fds)) = inbox.next_job() else {
            out.flush()?;
            if inbox.shutdown {
                return Ok(Stop::Shutdown);
            }
            inbox.wait();
            continue;
        };

        if !cancel.start(job.id) {
            // Cancelled while queued: the reader has answered it.
            continue;
        }
        // An end of the stream that came meanwhile stops it from starting.
        // (A Cancel that came before it was marked running was answered by
        // the reader, and `start` said so; one after it sets the flag.)
        inbox.drain();
        if inbox.aborting() {
            cancel.finish();
            continue;
        }
        out.watch();
        let started = Instant::now();
        let result = if cancel.is_cancelled() {
            Err(CANCELLED.to_owned())
        } else {
            let mapped = match (&job.input, fds.input) {
                (Payload::Fd { len }, Some(fd)) => Some(
                    map_input(&cache, fd, *len)
                        .map_err(|e| format!("its input descriptor cannot be used: {e}")),
                ),
                _ => None,
            };
            match input_of(&job, shm.as_deref(), mapped.as_ref()) {
                Ok(input) => {
                    ctx.set_job(&job);
                    // A fresh one per job: whatever the handler does with
                    // the last one, it cannot affect the next job.
                    let mut output = Output::attached(Arc::clone(&sink));
                    if let Some(fd) = fds.output {
                        output.use_buffer(OutputBuffer::new(fd, Arc::clone(&cache)));
                    }
                    match handler(&ctx, input, &mut output) {
                        // Before `cancel.finish()`: a wait for room in the
                        // arena gives up when this job is cancelled.
                        Ok(()) => output.finish(),
                        Err(e) => {
                            output.discard();
                            Err(e)
                        }
                    }
                }
                Err(e) => Err(e),
            }
        };
        cancel.finish();
        let now = Instant::now();
        out.push_result_and_flush_if_due(job.id, result, now, now - started >= SLOW_JOB)?;
    }
}

/// The job's input bytes: inline, or in place in the arena. The reader has
/// already checked a shared-memory reference; the bytes stay valid until the
/// job is answered, which happens only after the handler returns.
fn input_of<'a>(
    job: &'a Job,
    shm: Option<&'a Shm>,
    mapped: Option<&'a Result<crate::fds::Input, String>>,
) -> Result<&'a [u8], String> {
    match &job.input {
        Payload::Inline(input) => Ok(input),
        Payload::Fd { len } => match mapped {
            Some(Ok(m)) => Ok(&m.bytes()[..*len as usize]),
            Some(Err(e)) => Err(e.clone()),
            None => Err("a descriptor input without its descriptor".to_owned()),
        },
        Payload::Shm { offset, len } => match shm {
            Some(shm) => shm.arena.input(*offset, *len).map_err(|e| e.to_string()),
            // The reader refuses these before they get here.
            None => Err("shared-memory input without an arena".to_owned()),
        },
    }
}

/// One message from the reader thread.
enum Incoming {
    Job(Job, JobFds),
    Cancel(JobId),
    Shutdown,
    /// Always the last message.
    End(End),
}

/// How the job stream ended.
enum End {
    /// End of stream after `Shutdown`: expected, finish the jobs in hand.
    Closed,
    /// End of stream without `Shutdown`: the daemon is gone.
    Eof,
    /// A protocol violation, described.
    Fatal(String),
    /// A read error.
    Read(io::Error),
}

impl End {
    fn aborts(&self) -> bool {
        !matches!(self, End::Closed)
    }
}

/// The reader thread's body: frames in, batches of messages out. It answers
/// a `Cancel` of a job still queued itself, at once (see [`crate::context`]),
/// through `out` (weak: it does not keep the result stream open once
/// [`serve`] is done with it).
fn read_jobs<J: JobStream, W: Write>(
    mut jobs: J,
    tx: &Sender<Vec<Incoming>>,
    cancel: &CancelState,
    shm: Option<&Shm>,
    out: &std::sync::Weak<Shared<W>>,
) {
    let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
    let mut fifo = VecDeque::new();
    let mut shutdown = false;
    // `shutdown` as of the end of the last batch.
    let mut queued_shutdown = false;
    loop {
        let n = match jobs.read_fds(decoder.unfilled(), &mut fifo) {
            // A partial frame left at end of stream means the daemon died
            // mid-write: the daemon is gone either way.
            Ok(0) => {
                let end = if shutdown { End::Closed } else { End::Eof };
                return send_end(tx, cancel, shm, Vec::new(), end);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return send_end(tx, cancel, shm, Vec::new(), End::Read(e)),
        };
        decoder.filled(n);

        let mut batch = Vec::new();
        let mut cancels = Vec::new();
        let fatal = loop {
            let payload = match decoder.next_frame() {
                Ok(Some(payload)) => payload,
                Ok(None) => break None,
                Err(e) => break Some(format!("bad frame: {e}")),
            };
            let msg = decode::<ToWorker>(payload);
            let fds = match msg.as_ref().map(|m| JobFds::take(m, &mut fifo)) {
                Ok(Ok(fds)) => fds,
                Ok(Err(why)) => break Some(why),
                Err(_) => JobFds::default(),
            };
            match msg {
                Ok(ToWorker::Job(job) | ToWorker::JobOut(job)) => {
                    if let Payload::Shm { offset, len } = job.input {
                        let checked = match shm {
                            Some(shm) => shm.arena.check_input(offset, len).map_err(|e| {
                                format!("job {} has a bad shared-memory input: {e}", job.id)
                            }),
                            None => Err(format!(
                                "job {} has a shared-memory input, but this worker has no \
                                 shared-memory arena (fd 5 missing, empty or not mappable)",
                                job.id
                            )),
                        };
                        if let Err(why) = checked {
                            break Some(why);
                        }
                    }
                    batch.push(Incoming::Job(job, fds));
                }
                Ok(ToWorker::Cancel { id }) => {
                    batch.push(Incoming::Cancel(id));
                    cancels.push(id);
                }
                Ok(ToWorker::Shutdown) => {
                    shutdown = true;
                    batch.push(Incoming::Shutdown);
                }
                Ok(ToWorker::Release { offset, len }) => {
                    // Handled here, not by the handler's thread: that one may
                    // be waiting for exactly this room.
                    let released = match shm {
                        Some(shm) => shm.release(offset, len),
                        None => Err(format!(
                            "Release of {len} bytes at {offset}, but this worker has no \
                             shared-memory arena"
                        )),
                    };
                    if let Err(why) = released {
                        break Some(why);
                    }
                }
                Err(e) => break Some(format!("undecodable message: {e}")),
            }
        };
        if let Some(why) = fatal {
            return send_end(tx, cancel, shm, batch, End::Fatal(why));
        }
        // The jobs before a `Shutdown` (later ones are ignored).
        let ids = batch
            .iter()
            .take_while(|m| !matches!(m, Incoming::Shutdown))
            .filter_map(|m| match m {
                Incoming::Job(job, _) => Some(job.id),
                _ => None,
            });
        if !queued_shutdown {
            cancel.queue(ids);
        }
        queued_shutdown = shutdown;
        if !batch.is_empty() && tx.send(batch).is_err() {
            return; // serve() has returned
        }
        // Only after the Cancel is in the channel: see `crate::context`.
        let answered: Vec<JobId> = cancels
            .iter()
            .copied()
            .filter(|&id| cancel.cancel(id))
            .collect();
        if let (false, Some(out)) = (answered.is_empty(), out.upgrade()) {
            let mut state = out.lock();
            if !state.closed {
                let now = Instant::now();
                for id in answered {
                    state.encode_result(id, Err(CANCELLED.to_owned()), now);
                }
                state.write_out();
            }
        }
        if let (Some(shm), false) = (shm, cancels.is_empty()) {
            shm.poke();
        }
    }
}

fn send_end(
    tx: &Sender<Vec<Incoming>>,
    cancel: &CancelState,
    shm: Option<&Shm>,
    mut batch: Vec<Incoming>,
    end: End,
) {
    let aborts = end.aborts();
    batch.push(Incoming::End(end));
    let _ = tx.send(batch);
    if aborts {
        cancel.cancel_running();
    }
    // No Release can come any more: a wait for room gives up.
    if let Some(shm) = shm {
        shm.end();
    }
}

/// Jobs received and not yet run, and what the reader has told so far.
struct Inbox {
    rx: Receiver<Vec<Incoming>>,
    queue: VecDeque<(Job, JobFds)>,
    shutdown: bool,
    ignored_after_shutdown: bool,
    end: Option<End>,
}

impl Inbox {
    fn new(rx: Receiver<Vec<Incoming>>) -> Self {
        Inbox {
            rx,
            queue: VecDeque::new(),
            shutdown: false,
            ignored_after_shutdown: false,
            end: None,
        }
    }

    fn aborting(&self) -> bool {
        self.end.as_ref().is_some_and(End::aborts)
    }

    fn take_abort(&mut self) -> Option<End> {
        if self.aborting() {
            self.end.take()
        } else {
            None
        }
    }

    /// The next job to run: from the local queue, else from the channel
    /// without blocking.
    fn next_job(&mut self) -> Option<(Job, JobFds)> {
        if self.queue.is_empty() {
            self.drain();
        }
        if self.aborting() {
            return None;
        }
        self.queue.pop_front()
    }

    /// Applies everything already in the channel.
    fn drain(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(batch) => self.apply(batch),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.disconnected();
                    return;
                }
            }
        }
    }

    /// Blocks until the reader sends something (the caller has flushed).
    fn wait(&mut self) {
        match self.rx.recv() {
            Ok(batch) => self.apply(batch),
            Err(_) => self.disconnected(),
        }
    }

    fn disconnected(&mut self) {
        // The reader always ends with `End`; without it, it panicked.
        if self.end.is_none() {
            self.end = Some(End::Read(io::Error::other("the reader thread died")));
        }
    }

    fn apply(&mut self, batch: Vec<Incoming>) {
        for msg in batch {
            self.apply_one(msg);
        }
    }

    /// Applies one message. A queued job that is cancelled leaves the
    /// queue; the reader has answered it (see [`crate::context`]).
    fn apply_one(&mut self, msg: Incoming) {
        match msg {
            Incoming::Job(job, fds) => {
                if self.shutdown || self.end.is_some() {
                    if !self.ignored_after_shutdown {
                        self.ignored_after_shutdown = true;
                        eprintln!(
                            "jobvisor worker: ignoring job {} sent after Shutdown",
                            job.id
                        );
                    }
                } else {
                    self.queue.push_back((job, fds));
                }
            }
            Incoming::Cancel(id) => {
                // A queued job the reader has answered (the running one was
                // flagged by the reader): drop it. Else already answered,
                // or never sent: nothing to do.
                if let Some(at) = self.queue.iter().position(|(j, _)| j.id == id) {
                    self.queue.remove(at);
                }
            }
            Incoming::Shutdown => self.shutdown = true,
            Incoming::End(end) => self.end = Some(end),
        }
    }
}

/// Encoded frames waiting to be written with one `write`, shared by the
/// calling thread (which encodes and flushes) and the flusher thread (which
/// writes results that have waited [`MAX_RESULT_AGE`]).
struct Results<W: Write + Send + 'static> {
    shared: Arc<Shared<W>>,
    /// The flusher thread, started the first time a job begins with a
    /// result still buffered (a worker that is killed before, or whose jobs
    /// always drain the queue, never needs one: one thread less to start
    /// and to tear down, which shortens restarts); `None` before and once
    /// it has been joined.
    flusher: Option<JoinHandle<()>>,
    /// A result may be buffered: set by every push, cleared by a flush of
    /// this thread's (never wrongly clear: other flushes only leave it set,
    /// which at worst starts the flusher early). Lets `watch` decide about
    /// starting the flusher without taking the lock on every job.
    buffered: bool,
}

struct Shared<W> {
    state: Mutex<Buffered<W>>,
    /// Wakes the flusher: a job starts while a result is buffered and the
    /// flusher is idle, or serving ended.
    wake: Condvar,
    /// The flusher is waiting for [`Self::wake`] with nothing buffered, so a
    /// job starting with results buffered must wake it. Changed only with
    /// the lock held; read without it first so that the usual case (the
    /// flusher is already watching, or nothing is buffered) takes no lock.
    flusher_idle: AtomicBool,
}

/// Everything behind the lock. Writes happen only with the lock held, one
/// whole buffer at a time, so frames never interleave.
struct Buffered<W> {
    writer: W,
    buf: Vec<u8>,
    /// When the oldest buffered result was produced.
    oldest: Option<Instant>,
    /// The first write error, until the calling thread returns it.
    error: Option<io::Error>,
    /// A write failed: results are discarded from then on, not written.
    broken: bool,
    /// Serving has ended: the flusher must exit.
    closed: bool,
}

impl<W: Write> Buffered<W> {
    fn encode_result(&mut self, id: JobId, result: Result<Payload, String>, now: Instant) {
        let msg = match result {
            Ok(output) => FromWorker::Done { id, output },
            Err(error) => FromWorker::Failed { id, error },
        };
        self.encode(&msg);
        self.oldest.get_or_insert(now);
    }

    fn encode(&mut self, msg: &FromWorker) {
        if let Err(e) = encode_frame(msg, &mut self.buf) {
            // Only an output over the frame limit can fail; say so instead.
            if let FromWorker::Done { id, .. } = msg {
                let failed = FromWorker::Failed {
                    id: *id,
                    error: format!("output cannot be sent: {e}"),
                };
                // A short message always encodes.
                let _ = encode_frame(&failed, &mut self.buf);
            }
        }
    }

    /// Writes everything buffered (or drops it after an earlier error).
    fn write_out(&mut self) {
        self.oldest = None;
        if self.buf.is_empty() {
            return;
        }
        if !self.broken {
            if let Err(e) = self.writer.write_all(&self.buf) {
                self.broken = true;
                self.error = Some(e);
            }
        }
        self.buf.clear();
        if self.buf.capacity() > 4 * FLUSH_BYTES {
            self.buf = Vec::with_capacity(64 << 10);
        }
    }

    fn take_error(&mut self) -> Result<(), ServeError> {
        self.error
            .take()
            .map_or(Ok(()), |e| Err(ServeError::Write(e)))
    }
}

impl<W: Write + Send> FlushResults for Shared<W> {
    /// Writes what is buffered; the error, if any, stays for the calling
    /// thread to return at its next flush.
    fn flush_results(&self) -> bool {
        let mut state = self.lock();
        state.write_out();
        !state.broken
    }
}

impl<W> Shared<W> {
    /// The state, even if a thread panicked holding the lock: the buffer is
    /// only ever appended to or written whole, so it stays consistent.
    fn lock(&self) -> MutexGuard<'_, Buffered<W>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<W: Write + Send + 'static> Results<W> {
    /// Wraps `writer`; the flusher thread starts when first needed.
    fn start(writer: W) -> Result<Self, ServeError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(Buffered {
                writer,
                buf: Vec::with_capacity(64 << 10),
                oldest: None,
                error: None,
                broken: false,
                closed: false,
            }),
            wake: Condvar::new(),
            flusher_idle: AtomicBool::new(false),
        });
        Ok(Results {
            shared,
            flusher: None,
            buffered: false,
        })
    }

    /// Starts the flusher thread. If the system refuses a thread, results
    /// are still written, only without the age bound while a job runs.
    fn start_flusher(&mut self) {
        let flusher_shared = Arc::clone(&self.shared);
        match thread::Builder::new()
            .name("jobvisor-flusher".into())
            .spawn(move || flush_aged(&flusher_shared))
        {
            Ok(t) => self.flusher = Some(t),
            Err(e) => eprintln!("jobvisor worker: cannot start the result flusher thread: {e}"),
        }
    }

    /// Buffers a job's result, then flushes if it is worth it now; returns a
    /// write error, including one the flusher ran into.
    fn push_result_and_flush_if_due(
        &mut self,
        id: JobId,
        result: Result<Payload, String>,
        now: Instant,
        slow_job: bool,
    ) -> Result<(), ServeError> {
        let mut state = self.shared.lock();
        state.encode_result(id, result, now);
        let old = state
            .oldest
            .is_some_and(|t| now.duration_since(t) >= MAX_RESULT_AGE);
        if slow_job || old || state.buf.len() >= FLUSH_BYTES {
            state.write_out();
        }
        self.buffered = state.oldest.is_some();
        state.take_error()
    }

    /// Called before running a job: if results are buffered, makes sure the
    /// flusher is timing them, since the job may run for long. (Not on every
    /// push: a push followed by a flush, as when the queue runs dry, needs
    /// no flusher, and waking it costs more than a tiny job.)
    fn watch(&mut self) {
        if self.flusher.is_none() {
            // Not started yet: needed only if something is buffered.
            if self.buffered {
                self.start_flusher();
            }
            return;
        }
        // The flusher sets the flag and waits under the lock, and the result
        // was buffered under the lock too: if the flusher went idle before
        // that, this load sees it.
        if !self.shared.flusher_idle.load(Ordering::Relaxed) {
            return;
        }
        let state = self.shared.lock();
        if state.oldest.is_some() && self.shared.flusher_idle.swap(false, Ordering::Relaxed) {
            self.shared.wake.notify_one();
        }
    }

    fn flush(&mut self) -> Result<(), ServeError> {
        let mut state = self.shared.lock();
        state.write_out();
        self.buffered = state.oldest.is_some();
        state.take_error()
    }

    /// A handle for [`Output`] to flush with before it waits for `Release`s.
    fn flusher(&self) -> Arc<dyn FlushResults> {
        Arc::clone(&self.shared) as Arc<dyn FlushResults>
    }

    /// Ends serving after the job stream ended abnormally: results already
    /// produced are still sent if the daemon reads them (best effort).
    fn abort(mut self, end: End) -> Result<Stop, ServeError> {
        let _ = self.flush();
        match end {
            End::Closed | End::Eof => Ok(Stop::Eof),
            End::Fatal(why) => Err(ServeError::Protocol(why)),
            End::Read(e) => Err(ServeError::Read(e)),
        }
    }
}

impl<W: Write + Send + 'static> Drop for Results<W> {
    /// Stops the flusher, after a last flush for the paths that did not
    /// (a panicking handler): results produced are never left behind.
    /// Joining it means the writer is dropped (the stream closed) by the
    /// time [`serve`] returns.
    fn drop(&mut self) {
        {
            let mut state = self.shared.lock();
            state.write_out();
            state.closed = true;
        }
        self.shared.wake.notify_one();
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
    }
}

/// The flusher thread's body: writes the buffer once its oldest result has
/// waited [`MAX_RESULT_AGE`], unless the calling thread flushed it first.
///
/// After finding results it stays on watch for [`LINGER`], waking every
/// [`MAX_RESULT_AGE`] (a wait that starts while the buffer is empty ends no
/// later than a result buffered meanwhile comes due), so that a steady
/// stream of batches costs one timed wake-up per period and no notify.
/// Then it goes idle until [`Results::watch`] wakes it.
fn flush_aged<W: Write>(shared: &Shared<W>) {
    let mut state = shared.lock();
    let mut watch_until = Instant::now();
    while !state.closed {
        let now = Instant::now();
        let timeout = match state.oldest {
            Some(oldest) => {
                watch_until = now + LINGER;
                let due = oldest + MAX_RESULT_AGE;
                if now >= due {
                    state.write_out();
                    continue;
                }
                due - now
            }
            None if now < watch_until => MAX_RESULT_AGE,
            None => {
                shared.flusher_idle.store(true, Ordering::Relaxed);
                state = shared
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                shared.flusher_idle.store(false, Ordering::Relaxed);
                continue;
            }
        };
        state = shared
            .wake
            .wait_timeout(state, timeout)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc_proto::worker::FromWorker::{Done, Failed, Raised, Ready};
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    use std::os::unix::net::UnixStream;

    const DEADLINE: Duration = Duration::from_secs(20);

    /// The daemon's side of a worker served on a thread.
    struct Daemon {
        jobs: Option<UnixStream>,
        results: UnixStream,
        decoder: FrameDecoder,
        done: Receiver<Result<Stop, ServeError>>,
    }

    impl Daemon {
        fn start<F>(handler: F) -> Daemon
        where
            F: FnMut(&JobContext, &[u8]) -> Result<Vec<u8>, String> + Send + 'static,
        {
            let (jobs, worker_jobs) = UnixStream::pair().unwrap();
            let (worker_results, results) = UnixStream::pair().unwrap();
            results.set_read_timeout(Some(DEADLINE)).unwrap();
            let (tx, done) = mpsc::channel();
            thread::spawn(move || {
                let _ = tx.send(serve(worker_jobs, worker_results, handler));
            });
            let mut daemon = Daemon {
                jobs: Some(jobs),
                results,
                decoder: FrameDecoder::new(MAX_FRAME_LEN),
                done,
            };
            match daemon.recv() {
                Ready {
                    protocol_version,
                    pid,
                } => {
                    assert_eq!(protocol_version, PROTOCOL_VERSION);
                    assert_eq!(pid, std::process::id());
                }
                other => panic!("expected Ready first, got {other:?}"),
            }
            daemon
        }

        fn send_raw(&mut self, bytes: &[u8]) {
            self.jobs.as_ref().unwrap().write_all(bytes).unwrap();
        }

        fn send(&mut self, msgs: &[ToWorker]) {
            let mut buf = Vec::new();
            for m in msgs {
                encode_frame(m, &mut buf).unwrap();
            }
            self.send_raw(&buf);
        }

        fn close_jobs(&mut self) {
            self.jobs = None;
        }

        /// The next message from the worker (panics after `DEADLINE`).
        fn recv(&mut self) -> FromWorker {
            loop {
                if let Some(frame) = self.decoder.next_frame().unwrap() {
                    return decode(frame).unwrap();
                }
                let n = self.results.read(self.decoder.unfilled()).unwrap();
                assert!(n > 0, "worker closed its result stream");
                self.decoder.filled(n);
            }
        }

        /// How `serve` ended (panics after `DEADLINE`).
        fn outcome(&self) -> Result<Stop, ServeError> {
            self.done
                .recv_timeout(DEADLINE)
                .expect("serve did not return")
        }
    }

    fn job(id: JobId, input: &[u8]) -> ToWorker {
        ToWorker::Job(Job {
            id,
            attempt: 1,
            deadline_ms: None,
            input: Payload::Inline(input.into()),
        })
    }

    fn done(id: JobId, output: &[u8]) -> FromWorker {
        Done {
            id,
            output: Payload::Inline(output.into()),
        }
    }

    fn failed(id: JobId, error: &str) -> FromWorker {
        Failed {
            id,
            error: error.to_owned(),
        }
    }

    fn echo(_: &JobContext, input: &[u8]) -> Result<Vec<u8>, String> {
        Ok(input.to_vec())
    }

    /// Blocks on the cancel descriptor until the running job is cancelled.
    fn wait_cancelled(ctx: &JobContext) {
        let mut fds = [PollFd::new(ctx.cancel_fd().unwrap(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(DEADLINE).unwrap();
        assert_eq!(
            nix::poll::poll(&mut fds, timeout).unwrap(),
            1,
            "never cancelled"
        );
        assert!(ctx.is_cancelled());
    }

    #[test]
    fn echoes_ten_thousand_jobs_written_at_once() {
        const N: u64 = 10_000;
        let mut d = Daemon::start(echo);
        let mut buf = Vec::new();
        for id in 1..=N {
            encode_frame(&job(id, &id.to_le_bytes()), &mut buf).unwrap();
        }
        encode_frame(&ToWorker::Shutdown, &mut buf).unwrap();
        // Written from another thread: the worker blocks on its results
        // while nobody reads them.
        let mut writer = d.jobs.as_ref().unwrap().try_clone().unwrap();
        let feeder = thread::spawn(move || writer.write_all(&buf).unwrap());
        let mut seen = vec![false; N as usize + 1];
        for _ in 0..N {
            match d.recv() {
                Done {
                    id,
                    output: Payload::Inline(out),
                } => {
                    assert_eq!(&out[..], &id.to_le_bytes());
                    assert!(
                        !std::mem::replace(&mut seen[id as usize], true),
                        "{id} twice"
                    );
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        feeder.join().unwrap();
        assert!(matches!(d.outcome(), Ok(Stop::Shutdown)));
    }

    #[test]
    fn handler_error_fails_the_job_and_context_has_the_job() {
        let mut d = Daemon::start(|ctx: &JobContext, input: &[u8]| {
            assert_eq!(ctx.attempt(), 3);
            assert_eq!(
                ctx.deadline(),
                Some(std::time::SystemTime::UNIX_EPOCH + Duration::from_millis(5_000))
            );
            match input {
                b"bad" => Err(format!("job {} refused", ctx.id())),
                _ => Ok(b"fine".to_vec()),
            }
        });
        let with_attempt = |id, input: &[u8]| {
            ToWorker::Job(Job {
                id,
                attempt: 3,
                deadline_ms: Some(5_000),
                input: Payload::Inline(input.into()),
            })
        };
        d.send(&[with_attempt(7, b"bad"), with_attempt(8, b"ok")]);
        assert_eq!(d.recv(), failed(7, "job 7 refused"));
        assert_eq!(d.recv(), done(8, b"fine"));
        d.close_jobs();
        assert!(matches!(d.outcome(), Ok(Stop::Eof)));
    }

    fn sorted(mut msgs: Vec<FromWorker>) -> Vec<FromWorker> {
        msgs.sort_by_key(|m| match m {
            Done { id, .. } | Failed { id, .. } | Raised { id, .. } => *id,
            Ready { .. } => 0,
        });
        msgs
    }

    #[test]
    fn cancel_of_a_queued_job_answers_without_running_it() {
        let ran = Arc::new(Mutex::new(Vec::new()));
        let ran2 = Arc::clone(&ran);
        let (started_tx, started) = mpsc::channel();
        let mut d = Daemon::start(move |ctx: &JobContext, _: &[u8]| {
            ran2.lock().unwrap().push(ctx.id());
            if ctx.id() == 1 {
                started_tx.send(()).unwrap();
                // Cancel{2} precedes Cancel{1} in the stream, so it is in
                // the worker's channel once this job sees its own cancel.
                wait_cancelled(ctx);
                return Ok(b"finished anyway".to_vec());
            }
            Ok(Vec::new())
        });
        d.send(&[job(1, b"")]);
        started.recv_timeout(DEADLINE).unwrap();
        d.send(&[
            job(2, b""),
            job(3, b""),
            ToWorker::Cancel { id: 2 },
            ToWorker::Cancel { id: 1 },
            ToWorker::Cancel { id: 99 }, // unknown: ignored
        ]);
        let got = sorted(vec![d.recv(), d.recv(), d.recv()]);
        assert_eq!(
            got,
            vec![
                done(1, b"finished anyway"),
                failed(2, CANCELLED),
                done(3, b"")
            ]
        );
        assert_eq!(*ran.lock().unwrap(), vec![1, 3]);

        // Cancelled before it could start, in the same read as the job.
        d.send(&[job(4, b""), job(5, b""), ToWorker::Cancel { id: 4 }]);
        let got = sorted(vec![d.recv(), d.recv()]);
        assert_eq!(got, vec![failed(4, CANCELLED), done(5, b"")]);
        assert_eq!(*ran.lock().unwrap(), vec![1, 3, 5]);
        d.send(&[ToWorker::Shutdown]);
        assert!(matches!(d.outcome(), Ok(Stop::Shutdown)));
    }

    /// The daemon takes a prefetched job back (for an idle worker) with a
    /// `Cancel`: it is answered at once, while the job ahead of it still
    /// runs, and never run.
    #[test]
    fn cancel_of_a_queued_job_is_answered_while_another_runs() {
        let ran = Arc::new(Mutex::new(Vec::new()));
        let ran2 = Arc::clone(&ran);
        let (started_tx, started) = mpsc::channel();
        let (release_tx, release) = mpsc::channel::<()>();
        let release = Mutex::new(release);
        let mut d = Daemon::start(move |ctx: &JobContext, _: &[u8]| {
            ran2.lock().unwrap().push(ctx.id());
            if ctx.id() == 1 {
                started_tx.send(()).unwrap();
                release.lock().unwrap().recv_timeout(DEADLINE).unwrap();
            }
            Ok(Vec::new())
        });
        d.send(&[job(1, b""), job(2, b""), job(3, b"")]);
        started.recv_timeout(DEADLINE).unwrap();
        d.send(&[ToWorker::Cancel { id: 3 }, ToWorker::Cancel { id: 2 }]);
        // Job 1 is still running: nothing else could have answered.
        assert_eq!(d.recv(), failed(3, CANCELLED));
        assert_eq!(d.recv(), failed(2, CANCELLED));
        // Sent again (the same id may come back), it runs.
        d.send(&[job(2, b"")]);
        release_tx.send(()).unwrap();
        assert_eq!(
            sorted(vec![d.recv(), d.recv()]),
            vec![done(1, b""), done(2, b"")]
        );
        assert_eq!(*ran.lock().unwrap(), vec![1, 2]);
        d.send(&[ToWorker::Shutdown]);
        assert!(matches!(d.outcome(), Ok(Stop::Shutdown)));
    }

    #[test]
    fn shutdown_finishes_jobs_in_hand_even_if_the_pipe_closes() {
        for close_after in [false, true] {
            let mut d = Daemon::start(echo);
            d.send(&[
                job(1, b"a"),
                job(2, b"b"),
                job(3, b"c"),
                ToWorker::Shutdown,
                job(4, b"late"),
            ]);
            if close_after {
                d.close_jobs();
            }
            assert_eq!(d.recv(), done(1, b"a"));
            assert_eq!(d.recv(), done(2, b"b"));
            assert_eq!(d.recv(), done(3, b"c"));
            assert!(matches!(d.outcome(), Ok(Stop::Shutdown)));
            // Nothing more (job 4 came after Shutdown): the stream ends.
            let n = d.results.read(d.decoder.unfilled()).unwrap();
            assert_eq!(n, 0);
        }
    }

    #[test]
    fn end_of_stream_returns_and_cancels_the_running_job() {
        let mut d = Daemon::start(echo);
        d.close_jobs();
        assert!(matches!(d.outcome(), Ok(Stop::Eof)));

        let (started_tx, started) = mpsc::channel();
        let mut d = Daemon::start(move |ctx: &JobContext, _: &[u8]| {
            started_tx.send(()).unwrap();
            wait_cancelled(ctx);
            Err("stopped".to_owned())
        });
        d.send(&[job(1, b""), job(2, b"")]);
        started.recv_timeout(DEADLINE).unwrap();
        d.close_jobs();
        assert!(matches!(d.outcome(), Ok(Stop::Eof)));
        // Job 2 was dropped, never started.
        assert!(started.try_recv().is_err());
    }

    #[test]
    fn garbage_and_oversized_frames_are_protocol_errors() {
        let mut d = Daemon::start(echo);
        d.send(&[job(1, b"x")]);
        assert_eq!(d.recv(), done(1, b"x"));
        d.send_raw(&[3, 0, 0, 0, 0xff, 0xff, 0xff]);
        match d.outcome() {
            Err(e @ ServeError::Protocol(_)) => {
                assert_eq!(e.exit_code(), 2);
                assert!(e.to_string().contains("undecodable"), "{e}");
            }
            other => panic!("unexpected {other:?}"),
        }

        let mut d = Daemon::start(echo);
        d.send_raw(&u32::MAX.to_le_bytes());
        match d.outcome() {
            Err(ServeError::Protocol(why)) => assert!(why.contains("exceeds"), "{why}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn shared_memory_input_is_a_protocol_error() {
        let mut d = Daemon::start(echo);
        d.send(&[ToWorker::Job(Job {
            id: 5,
            attempt: 1,
            deadline_ms: None,
            input: Payload::Shm { offset: 0, len: 10 },
        })]);
        match d.outcome() {
            Err(ServeError::Protocol(why)) => assert!(why.contains("shared-memory"), "{why}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_fast_result_is_sent_while_the_next_job_runs() {
        let (started_tx, started) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let mut d = Daemon::start(move |ctx: &JobContext, _: &[u8]| {
            if ctx.id() == 2 {
                started_tx.send(()).unwrap();
                release_rx.recv_timeout(DEADLINE).unwrap();
            }
            Ok(Vec::new())
        });
        // One write: job 2 is already queued when job 1 finishes.
        d.send(&[job(1, b""), job(2, b"")]);
        let sent = Instant::now();
        started.recv_timeout(DEADLINE).unwrap();
        // Typically well under a millisecond; the bound is loose for slow CI.
        d.results
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        assert_eq!(d.recv(), done(1, b""));
        assert!(
            sent.elapsed() < Duration::from_secs(1),
            "{:?}",
            sent.elapsed()
        );
        d.results.set_read_timeout(Some(DEADLINE)).unwrap();

        release.send(()).unwrap();
        assert_eq!(d.recv(), done(2, b""));
        d.send(&[ToWorker::Shutdown]);
        assert!(matches!(d.outcome(), Ok(Stop::Shutdown)));
    }

    #[test]
    fn a_closed_result_stream_is_a_write_error() {
        let (_jobs, worker_jobs) = UnixStream::pair().unwrap();
        let (worker_results, results) = UnixStream::pair().unwrap();
        drop(results);
        let err = serve(worker_jobs, worker_results, echo).unwrap_err();
        assert!(matches!(err, ServeError::Write(_)), "{err:?}");
        assert_eq!(err.exit_code(), 1);
    }
}
