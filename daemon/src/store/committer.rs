//! The store thread: collects ops into batches, coalesces them, writes each
//! batch's payload files and then commits the batch in one transaction,
//! reports completions, retries failed updates and prunes between batches.
//!
//! The thread sleeps in `recv` (or `recv_timeout` when a retry or a pruning
//! pass is due): an idle store costs no wakeups.

use super::db::{self, Db, DeletedFiles, PendingInsert, PendingUpdate};
use super::files::Kind;
use super::{
    Completion, InsertFailure, JobUpdate, NewJob, Op, Query, StoreError, DEFAULT_RETENTION,
    FILE_PAYLOAD_MIN, MAX_BATCH_BLOB_BYTES, MAX_BATCH_OPS, PRUNE_CHUNK,
};
use mio::Waker;
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the handle sends to the thread.
pub(super) enum Msg {
    /// An op and its sequence number.
    Op { seq: u64, op: Op },
    /// Commit what is queued, then stop.
    Close,
    /// A wake-up from the PostgreSQL listener (unused with SQLite).
    Notify(super::pg::Notice),
    /// Test instrumentation.
    #[cfg(test)]
    Test(TestHook),
}

/// A message that ends a batch early.
enum Control {
    Close,
    #[cfg(test)]
    Test(TestHook),
}

/// Test instrumentation, run by the thread between batches.
#[cfg(test)]
pub(super) enum TestHook {
    /// Run SQL on the store's connection.
    Exec(String, std::sync::mpsc::Sender<Result<(), String>>),
    /// Block until the receiver yields (or its sender is dropped), so that
    /// the ops submitted meanwhile form one batch.
    Pause(std::sync::mpsc::Receiver<()>),
    /// Panic the thread.
    Panic,
    /// Run a whole pruning pass now, then report.
    PruneNow(std::sync::mpsc::Sender<()>),
    /// Report the counters.
    Stats(std::sync::mpsc::Sender<Stats>),
}

/// Counters for tests.
#[cfg(test)]
#[derive(Debug, Clone, Default)]
pub(super) struct Stats {
    /// Transactions that committed a batch.
    pub commits: u64,
    /// INSERT statements executed.
    pub inserts: u64,
    /// UPDATE statements executed.
    pub updates: u64,
    /// Payload files the store thread wrote (and synced).
    pub files: u64,
    /// Time spent writing and committing batches.
    pub busy: Duration,
    /// CPU time of the store thread (less noisy than `busy` on a shared
    /// machine; leaves out waiting for fsync).
    pub cpu: Duration,
}

#[cfg(test)]
fn thread_cpu_time() -> Duration {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

/// Timings, shortened by tests.
#[derive(Debug, Clone)]
pub(super) struct Tuning {
    /// Minimum time between two pruning passes.
    pub prune_every: Duration,
    /// First retry of a failed commit; doubles up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            prune_every: Duration::from_secs(10),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
        }
    }
}

/// Where a job id sits in the current batch.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Insert(usize),
    Update(usize),
}

/// The ops collected for one transaction, coalesced per job.
#[derive(Default)]
struct Batch {
    /// Highest sequence number in the batch.
    upto: u64,
    /// Ops received for this batch (carried updates not counted).
    ops: usize,
    /// Input and output bytes so far.
    blob_bytes: usize,
    inserts: Vec<PendingInsert>,
    updates: Vec<PendingUpdate>,
    queries: Vec<(u64, Query)>,
    slots: HashMap<u64, Slot>,
    /// Jobs whose committed output file this batch's update replaces by an
    /// output in the database: the file goes once the batch commits.
    replaced_outputs: Vec<u64>,
}

/// Payload bytes an op brings to a batch.
fn payload_bytes(op: &Op) -> usize {
    match op {
        Op::Insert(job) => job.input_len() as usize,
        Op::Update(update) => update.output.as_ref().map_or(0, |o| o.len()),
        Op::Query { .. }
        | Op::Retention { .. }
        | Op::Claim { .. }
        | Op::Watch { .. }
        | Op::ReserveIds => 0,
    }
}

/// Whether a payload goes to a file.
fn is_file_payload(payload: Option<&Arc<[u8]>>) -> bool {
    payload.is_some_and(|p| p.len() >= FILE_PAYLOAD_MIN)
}

impl Batch {
    fn is_full(&self) -> bool {
        self.ops >= MAX_BATCH_OPS || self.blob_bytes >= MAX_BATCH_BLOB_BYTES
    }

    /// Whether `bytes` more payload may join: a batch that has payloads
    /// stays within [`MAX_BATCH_BLOB_BYTES`], a larger payload goes alone.
    fn has_room_for(&self, bytes: usize) -> bool {
        bytes == 0 || self.blob_bytes == 0 || self.blob_bytes + bytes <= MAX_BATCH_BLOB_BYTES
    }

    fn has_writes(&self) -> bool {
        !self.inserts.is_empty() || !self.updates.is_empty()
    }

    fn add_insert(&mut self, job: NewJob) {
        self.blob_bytes += job.input_len() as usize;
        self.slots.insert(job.id, Slot::Insert(self.inserts.len()));
        self.inserts.push(PendingInsert {
            job,
            update: None,
            input_file: false,
            output_file: false,
        });
    }

    /// Keeps only the last update of a job, folded into its insert if the
    /// insert is in this batch too.
    fn add_update(&mut self, update: JobUpdate) {
        self.blob_bytes += update.output.as_ref().map_or(0, |o| o.len());
        match self.slots.get(&update.id) {
            Some(&Slot::Insert(i)) => self.inserts[i].update = Some(update),
            Some(&Slot::Update(i)) => self.updates[i].update = update,
            None => {
                self.slots
                    .insert(update.id, Slot::Update(self.updates.len()));
                self.updates.push(PendingUpdate {
                    update,
                    output_file: false,
                });
            }
        }
    }

    fn clear(&mut self) {
        self.ops = 0;
        self.blob_bytes = 0;
        self.inserts.clear();
        self.updates.clear();
        self.queries.clear();
        self.slots.clear();
        self.replaced_outputs.clear();
    }
}

/// A payload file a batch writes before its transaction.
struct FileWrite {
    id: u64,
    kind: Kind,
    data: FileData,
}

/// What a payload file is written from.
enum FileData {
    Bytes(Arc<[u8]>),
    /// The first `.1` bytes of a client's file.
    Source(Arc<std::fs::File>, u64),
    /// Already written (not yet synced).
    Written(std::fs::File),
}

/// An error writing a payload file from a client's file that is the
/// store's own (its disk), not the client's file: the submit is refused
/// as "the store could not take it" rather than "your file is unreadable".
fn is_store_side(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS | libc::EFBIG)
    )
}

/// Why a batch could not be made durable.
#[derive(Debug)]
pub(super) enum BatchError {
    /// A payload file could not be written (or synced).
    File { path: PathBuf, source: io::Error },
    /// The transaction failed.
    Commit(rusqlite::Error),
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchError::File { path, source } => write!(
                f,
                "cannot write payload file {}: {}",
                path.display(),
                db::os_reason(source)
            ),
            BatchError::Commit(e) => write!(f, "commit failed: {e}"),
        }
    }
}

/// The latest [`Op::Retention`].
struct Retention {
    per_pool: BTreeMap<String, Duration>,
    default: Duration,
    max_finished: u64,
}

impl Retention {
    fn of(&self, pool: &str) -> Duration {
        self.per_pool.get(pool).copied().unwrap_or(self.default)
    }
}

/// Pruning schedule and the pass in progress.
struct Pruner {
    /// Start of the last pass (or of the thread).
    last_pass: Instant,
    /// Something was written (or the retention changed) since that pass.
    dirty: bool,
    /// When the oldest finished job left by the last pass expires.
    next_expiry_ms: Option<u64>,
    work: Option<PruneWork>,
}

/// A pass in progress: pools to visit, then the `max_finished` cap.
struct PruneWork {
    pools: Vec<String>,
    next_pool: usize,
    /// Finished jobs over the cap still to delete; `None` until counted.
    over_cap: Option<u64>,
    next_expiry_ms: Option<u64>,
}

/// Pending retry of carried updates.
#[derive(Clone, Copy)]
struct Retry {
    at: Instant,
    backoff: Duration,
}

pub(super) struct Committer {
    db: Db,
    ops: Receiver<Msg>,
    done: Sender<Completion>,
    waker: Arc<Waker>,
    tuning: Tuning,
    batch: Batch,
    /// An op received while draining that did not fit in the batch: it
    /// starts the next one.
    held: Option<(u64, Op)>,
    /// Updates of failed batches, applied again with the next one.
    carry: Vec<JobUpdate>,
    /// Set while `carry` waits for a commit that succeeds.
    retry: Option<Retry>,
    last_seq: u64,
    retention: Retention,
    pruner: Pruner,
    /// Inserts of the current batch that failed alone (see
    /// [`Committer::write_inputs_alone`]), reported before the batch's
    /// outcome.
    failed_inserts: Vec<(u64, InsertFailure)>,
    /// How long committed batches took (for metrics).
    latency: Arc<super::latency::CommitLatency>,
    #[cfg(test)]
    stats: Stats,
}

impl Committer {
    pub fn new(
        db: Db,
        ops: Receiver<Msg>,
        done: Sender<Completion>,
        waker: Arc<Waker>,
        tuning: Tuning,
        latency: Arc<super::latency::CommitLatency>,
    ) -> Committer {
        Committer {
            db,
            ops,
            done,
            waker,
            tuning,
            batch: Batch::default(),
            held: None,
            carry: Vec::new(),
            retry: None,
            last_seq: 0,
            retention: Retention {
                per_pool: BTreeMap::new(),
                default: DEFAULT_RETENTION,
                max_finished: u64::MAX,
            },
            pruner: Pruner {
                // The first pass waits one interval, which gives the daemon
                // time to send its retention settings.
                last_pass: Instant::now(),
                dirty: true,
                next_expiry_ms: None,
                work: None,
            },
            failed_inserts: Vec::new(),
            latency,
            #[cfg(test)]
            stats: Stats::default(),
        }
    }

    /// The thread's body; returns when the handle closes (or is dropped).
    pub fn run(mut self) -> Result<(), StoreError> {
        loop {
            let control = match self.next_msg() {
                None => Control::Close,
                Some(Msg::Op { seq, op }) => {
                    self.start_batch();
                    self.add(seq, op);
                    let control = self.drain();
                    self.commit_batch();
                    match control {
                        Some(c) => c,
                        None => continue,
                    }
                }
                Some(Msg::Close) => Control::Close,
                Some(Msg::Notify(_)) => continue,
                #[cfg(test)]
                Some(Msg::Test(hook)) => Control::Test(hook),
            };
            match control {
                Control::Close => return self.shutdown(),
                #[cfg(test)]
                Control::Test(hook) => self.test_hook(hook),
            }
        }
    }

    /// Waits for the next message, running retries and pruning steps while
    /// none comes. `None` once the handle is gone.
    fn next_msg(&mut self) -> Option<Msg> {
        if let Some((seq, op)) = self.held.take() {
            return Some(Msg::Op { seq, op });
        }
        loop {
            if self.pruner.work.is_some() {
                // Mid-pass: ops go first, a chunk only when none is waiting.
                match self.ops.try_recv() {
                    Ok(msg) => return Some(msg),
                    Err(TryRecvError::Empty) => self.prune_step(),
                    Err(TryRecvError::Disconnected) => return None,
                }
                continue;
            }
            let now = Instant::now();
            let retry = self.retry.map(|r| r.at);
            let prune = match self.retry {
                Some(_) => None, // no pruning while commits fail
                None => self.prune_due(now),
            };
            let deadline = match (retry, prune) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let msg = match deadline {
                None => self.ops.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(at) => self.ops.recv_timeout(at.saturating_duration_since(now)),
            };
            match msg {
                Ok(msg) => return Some(msg),
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {
                    let now = Instant::now();
                    if self.retry.is_some_and(|r| now >= r.at) {
                        self.start_batch();
                        self.commit_batch();
                    } else if prune.is_some_and(|at| now >= at) {
                        self.prune_begin();
                    }
                }
            }
        }
    }

    /// Starts a batch with the updates carried over from failed ones.
    fn start_batch(&mut self) {
        self.batch.clear();
        self.batch.upto = self.last_seq;
        for update in std::mem::take(&mut self.carry) {
            self.batch.add_update(update);
        }
    }

    fn add(&mut self, seq: u64, op: Op) {
        self.last_seq = seq;
        self.batch.upto = seq;
        self.batch.ops += 1;
        match op {
            Op::Insert(job) => self.batch.add_insert(job),
            Op::Update(update) => self.batch.add_update(update),
            Op::Query { token, query } => self.batch.queries.push((token, query)),
            // Cluster ops: PostgreSQL only, never sent to SQLite.
            Op::Claim { .. } | Op::Watch { .. } | Op::ReserveIds => {}
            Op::Retention {
                per_pool,
                default,
                max_finished,
            } => {
                self.retention = Retention {
                    per_pool,
                    default,
                    max_finished,
                };
                self.pruner.dirty = true;
            }
        }
    }

    /// Adds every op already queued, up to the batch limits; stops early at
    /// a control message, which is returned.
    fn drain(&mut self) -> Option<Control> {
        while !self.batch.is_full() {
            match self.ops.try_recv() {
                Ok(Msg::Op { seq, op }) if !self.batch.has_room_for(payload_bytes(&op)) => {
                    self.held = Some((seq, op));
                    return None;
                }
                Ok(Msg::Op { seq, op }) => self.add(seq, op),
                Ok(Msg::Close) | Err(TryRecvError::Disconnected) => return Some(Control::Close),
                Ok(Msg::Notify(_)) => {}
                #[cfg(test)]
                Ok(Msg::Test(hook)) => return Some(Control::Test(hook)),
                Err(TryRecvError::Empty) => return None,
            }
        }
        None
    }

    /// Commits the batch, reports it, answers its queries, wakes the loop.
    /// Returns the error, if it failed.
    fn commit_batch(&mut self) -> Option<BatchError> {
        let upto = self.batch.upto;
        let fresh = self.batch.ops > 0; // not just a retry of carried updates
        let mut notify = fresh;
        let mut failure = None;
        // Payload files the commit left unreferenced: disposed of last, so
        // that acknowledgements never wait on renames and unlinks.
        let mut unreferenced = DeletedFiles::new();
        if self.batch.has_writes() {
            let start = Instant::now();
            let written = self.write_batch();
            if written.is_ok() {
                self.latency.observe(start.elapsed());
            }
            #[cfg(test)]
            {
                self.stats.busy += start.elapsed();
            }
            if !self.failed_inserts.is_empty() {
                let failed = std::mem::take(&mut self.failed_inserts);
                let _ = self.done.send(Completion::InsertsFailed { failed });
                notify = true;
            }
            match written {
                Ok(files) => {
                    #[cfg(test)]
                    {
                        self.stats.commits += 1;
                        self.stats.inserts += self.batch.inserts.len() as u64;
                        self.stats.updates += self.batch.updates.len() as u64;
                    }
                    self.retry = None;
                    self.pruner.dirty = true;
                    // A successful retry reports the healing too.
                    notify = true;
                    let _ = self.done.send(Completion::Durable { upto });
                    unreferenced = files;
                }
                Err(e) => {
                    self.carry = std::mem::take(&mut self.batch.updates)
                        .into_iter()
                        .map(|p| p.update)
                        .collect();
                    self.retry = (!self.carry.is_empty()).then(|| {
                        let backoff = match self.retry {
                            Some(r) => (r.backoff * 2).min(self.tuning.retry_max),
                            None => self.tuning.retry_initial,
                        };
                        Retry {
                            at: Instant::now() + backoff,
                            backoff,
                        }
                    });
                    // A retry that fails again has nothing new to report.
                    if fresh {
                        let lost_inserts = self.batch.inserts.iter().map(|p| p.job.id).collect();
                        let error = format!("job store {}: {e}", self.db.path().display());
                        let _ = self.done.send(Completion::Failed {
                            upto,
                            lost_inserts,
                            error,
                        });
                    }
                    failure = Some(e);
                }
            }
        } else if fresh {
            let _ = self.done.send(Completion::Durable { upto });
        }
        // Answered after the commit, so a query sees every op before it.
        for (token, query) in self.batch.queries.drain(..) {
            let result = self.db.query(&query);
            let _ = self.done.send(Completion::Query { token, result });
        }
        if notify {
            // Fails only if the poll is gone, i.e. the daemon is exiting.
            let _ = self.waker.wake();
        }
        self.db.payloads().remove_deleted(&unreferenced);
        self.batch.clear();
        failure
    }

    /// Writes the batch's payload files, then commits its rows; returns the
    /// files the committed rows no longer reference (or never did: outputs
    /// of updates of jobs whose insert was lost), for the caller to dispose
    /// of. On failure nothing of the batch is stored, and the files it
    /// wrote are removed.
    ///
    /// A payload file is written only where no committed row references
    /// one (a referenced file is never replaced in place: a crash before
    /// the commit would leave the row pointing at other bytes).
    fn write_batch(&mut self) -> Result<DeletedFiles, BatchError> {
        let files = self.plan_files();
        let files = self.write_inputs_alone(files);
        if let Err(e) = self.write_files(&files) {
            self.discard_files(&files);
            return Err(e);
        }
        #[cfg(test)]
        {
            self.stats.files += files.len() as u64;
        }
        match self
            .db
            .write(&self.batch.inserts, &self.batch.updates, db::now_ms())
        {
            Ok(mut unreferenced) => {
                let replaced = self.batch.replaced_outputs.iter();
                unreferenced.extend(replaced.map(|&id| (id, Kind::Output)));
                Ok(unreferenced)
            }
            Err(e) => {
                self.discard_files(&files);
                Err(BatchError::Commit(e))
            }
        }
    }

    /// Decides which payloads of the batch go to files (setting the rows'
    /// flags) and returns the files to write.
    fn plan_files(&mut self) -> Vec<FileWrite> {
        let mut files = Vec::new();
        let max_id = self.db.max_id();
        for p in &mut self.batch.inserts {
            let id = p.job.id;
            let output = p.update.as_ref().and_then(|u| u.output.as_ref());
            let prewritten = p
                .update
                .as_ref()
                .is_some_and(|u| u.output_file_len.is_some());
            // A job inserted already ended keeps no large input: no file.
            let big_input = p.job.input_in_file() && !p.input_dropped();
            // Ids come in ascending order, above every stored one. A lower
            // id may belong to a stored job (the insert then fails): its
            // files must not be replaced first.
            let free = (big_input || is_file_payload(output))
                && (id > max_id || self.db.references_any(id) == Ok(false));
            p.input_file = free && big_input;
            // An output the daemon already wrote to its file is recorded as
            // such whatever else this row does.
            p.output_file = prewritten || (free && is_file_payload(output));
            if p.input_file {
                let data = match &p.job.input_source {
                    Some(src) => FileData::Source(Arc::clone(&src.file), src.len),
                    None => FileData::Bytes(Arc::clone(&p.job.input)),
                };
                files.push(FileWrite {
                    id,
                    kind: Kind::Input,
                    data,
                });
            }
            if let Some(data) = output.filter(|_| p.output_file) {
                let data = FileData::Bytes(Arc::clone(data));
                files.push(FileWrite {
                    id,
                    kind: Kind::Output,
                    data,
                });
            }
        }
        for p in &mut self.batch.updates {
            let id = p.update.id;
            p.output_file = p.update.output_file_len.is_some();
            let Some(output) = p
                .update
                .output
                .as_ref()
                .filter(|o| is_file_payload(Some(o)))
            else {
                continue;
            };
            match self.db.references(id, Kind::Output) {
                Ok(false) => {
                    p.output_file = true;
                    files.push(FileWrite {
                        id,
                        kind: Kind::Output,
                        data: FileData::Bytes(Arc::clone(output)),
                    });
                }
                // Its row has an output file already (the daemon never
                // replaces a job's output, but the API allows it): this
                // output goes into the database, the old file once the
                // batch commits.
                Ok(true) => self.batch.replaced_outputs.push(id),
                // Unknown: keep it in the database (the transaction is
                // likely to fail as well).
                Err(_) => {}
            }
        }
        files
    }

    /// Writes the input files of the batch's inserts, each on its own: an
    /// insert whose input cannot be written (the client's file unreadable or
    /// cut short, or that file's write failing) leaves the batch alone,
    /// reported in `self.failed_inserts`, and the rest goes on. Returns the
    /// files still to write (outputs), and the inputs written, which
    /// [`Committer::write_files`] syncs with them.
    fn write_inputs_alone(&mut self, files: Vec<FileWrite>) -> Vec<FileWrite> {
        let mut rest = Vec::with_capacity(files.len());
        for f in files {
            if f.kind != Kind::Input {
                rest.push(f);
                continue;
            }
            let payloads = self.db.payloads();
            let written = match &f.data {
                FileData::Bytes(b) => payloads.write(f.id, f.kind, b).map_err(|e| (false, e)),
                // A failed copy is the client's file's fault unless it is
                // the store's disk (full, read-only); making the file is
                // the store's.
                FileData::Source(src, len) => payloads
                    .write_from_file(f.id, f.kind, src, *len)
                    .map_err(|(making, e)| (!making && !is_store_side(&e), e)),
                FileData::Written(file) => file.try_clone().map_err(|e| (false, e)),
            };
            match written {
                Ok(file) => rest.push(FileWrite {
                    data: FileData::Written(file),
                    ..f
                }),
                Err((from_client, e)) => {
                    let path = payloads.path(f.id, f.kind);
                    let _ = payloads.remove(f.id, f.kind);
                    self.batch.inserts.retain(|p| p.job.id != f.id);
                    let why = if from_client {
                        InsertFailure::Input(format!(
                            "submit: the input could not be read from the file passed ({}); nothing was queued: submit it again",
                            db::os_reason(&e)
                        ))
                    } else {
                        InsertFailure::Store(format!(
                            "the job could not be stored (job store {}: cannot write payload file {}: {}); nothing was queued, submit it again once the store is writable",
                            self.db.path().display(),
                            path.display(),
                            db::os_reason(&e)
                        ))
                    };
                    self.failed_inserts.push((f.id, why));
                }
            }
        }
        rest
    }

    /// Writes the files, syncs each, then the directory once.
    fn write_files(&self, files: &[FileWrite]) -> Result<(), BatchError> {
        if files.is_empty() {
            return Ok(());
        }
        let payloads = self.db.payloads();
        let fail = |f: &FileWrite| {
            let path = payloads.path(f.id, f.kind);
            move |source| BatchError::File { path, source }
        };
        // All written first, then all synced: the kernel may write them
        // back in parallel.
        let mut open = Vec::with_capacity(files.len());
        for f in files {
            let written = match &f.data {
                FileData::Bytes(b) => payloads.write(f.id, f.kind, b),
                FileData::Source(src, len) => payloads.write_from(f.id, f.kind, src, *len),
                FileData::Written(file) => file.try_clone(),
            };
            open.push(written.map_err(fail(f))?);
        }
        for (file, f) in open.iter().zip(files) {
            file.sync_data().map_err(fail(f))?;
        }
        match payloads.sync_dir() {
            // A file system that cannot sync a directory: nothing more
            // can be done.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            Err(source) => Err(BatchError::File {
                path: payloads.dir().to_path_buf(),
                source,
            }),
            Ok(()) => Ok(()),
        }
    }

    /// Removes the files of a failed batch (some may be partly written,
    /// some never created), except any a committed row references after
    /// all (a commit reported failed that went through): such a file, if
    /// it is not referenced, goes at the next start.
    fn discard_files(&self, files: &[FileWrite]) {
        let payloads = self.db.payloads();
        for f in files {
            if self.db.references(f.id, f.kind) == Ok(false) {
                let _ = payloads.remove(f.id, f.kind);
            }
        }
    }

    /// Commits what is left (carried updates) before the thread ends.
    fn shutdown(mut self) -> Result<(), StoreError> {
        if self.carry.is_empty() {
            return Ok(());
        }
        self.start_batch();
        let what = "the last job updates could not be committed";
        match self.commit_batch() {
            None => Ok(()),
            Some(BatchError::Commit(source)) => Err(StoreError::Sqlite {
                path: self.db.path().to_path_buf(),
                what,
                source,
            }),
            Some(BatchError::File { path, source }) => {
                Err(StoreError::Payload { path, what, source })
            }
        }
    }

    /// When the next pruning pass is due, if one will be.
    fn prune_due(&self, now: Instant) -> Option<Instant> {
        let earliest = self.pruner.last_pass + self.tuning.prune_every;
        if self.pruner.dirty {
            return Some(earliest);
        }
        // Nothing written since the last pass: only time can make a job
        // expire, and the last pass noted when the first one will.
        let expiry = self.pruner.next_expiry_ms?;
        let wait = Duration::from_millis(expiry.saturating_sub(db::now_ms()));
        Some(earliest.max(now + wait))
    }

    fn prune_begin(&mut self) {
        self.pruner.last_pass = Instant::now();
        self.pruner.dirty = false;
        match self.db.finished_pools() {
            Ok(pools) => {
                self.pruner.work = Some(PruneWork {
                    pools,
                    next_pool: 0,
                    over_cap: None,
                    next_expiry_ms: None,
                })
            }
            // Pruning is housekeeping: try again next interval.
            Err(_) => self.pruner.dirty = true,
        }
    }

    /// One statement of the pass in progress (at most [`PRUNE_CHUNK`] rows).
    fn prune_step(&mut self) {
        let Some(work) = self.pruner.work.as_mut() else {
            return;
        };
        let step = if let Some(pool) = work.pools.get(work.next_pool).cloned() {
            let retention = self.retention.of(&pool);
            let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
            let cutoff = db::now_ms().saturating_sub(retention_ms);
            let db = &self.db;
            db.delete_expired(&pool, cutoff, PRUNE_CHUNK)
                .and_then(|(deleted, files)| {
                    db.payloads().remove_deleted(&files);
                    if deleted < PRUNE_CHUNK as usize {
                        // This pool is done; its oldest survivor says when
                        // the next pass has something to do.
                        if let Some(oldest) = db.oldest_finished(&pool)? {
                            let expiry = oldest.saturating_add(retention_ms);
                            work.next_expiry_ms =
                                Some(work.next_expiry_ms.map_or(expiry, |e| e.min(expiry)));
                        }
                        work.next_pool += 1;
                    }
                    Ok(true)
                })
        } else {
            let over = match work.over_cap {
                Some(n) => Ok(n),
                None => self
                    .db
                    .count_finished()
                    .map(|n| n.saturating_sub(self.retention.max_finished)),
            };
            over.and_then(|over| {
                if over == 0 {
                    return Ok(false);
                }
                let chunk = over.min(u64::from(PRUNE_CHUNK)) as u32;
                let (deleted, files) = self.db.delete_oldest_finished(chunk)?;
                self.db.payloads().remove_deleted(&files);
                let deleted = deleted as u64;
                work.over_cap = Some(over.saturating_sub(deleted));
                Ok(deleted > 0)
            })
        };
        match step {
            Ok(true) => {}
            Ok(false) => {
                self.pruner.next_expiry_ms = work.next_expiry_ms;
                self.pruner.work = None;
            }
            Err(_) => {
                self.pruner.work = None;
                self.pruner.dirty = true;
            }
        }
    }

    #[cfg(test)]
    fn test_hook(&mut self, hook: TestHook) {
        match hook {
            TestHook::Exec(sql, reply) => {
                let _ = reply.send(self.db.execute_batch(&sql).map_err(|e| e.to_string()));
            }
            TestHook::Pause(until) => {
                let _ = until.recv();
            }
            TestHook::Panic => panic!("test hook asked for a panic"),
            TestHook::PruneNow(reply) => {
                self.prune_begin();
                while self.pruner.work.is_some() {
                    self.prune_step();
                }
                let _ = reply.send(());
            }
            TestHook::Stats(reply) => {
                let stats = Stats {
                    cpu: thread_cpu_time(),
                    ..self.stats.clone()
                };
                let _ = reply.send(stats);
            }
        }
    }
}
