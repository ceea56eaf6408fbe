//! `map POOL [--ordered]`: one job per stdin line, pipelined on one
//! connection, one output line per job.
//!
//! Throughput comes from never waiting for a round trip. Two threads share
//! the connection:
//!
//! - the *submitter* (a spawned thread) reads stdin and queues one
//!   `Submit { wait: true }` frame per line into one buffer, written with one
//!   system call when it holds [`SEND_BUFFER`] bytes, when the window is
//!   full, when the next read of stdin could block (nothing is ready), and at
//!   the end of the input. Frames are never left unsent while the submitter
//!   sleeps, so the daemon always has every line read so far.
//! - the *collector* (the calling thread) reads the answers: `Submitted` or
//!   `Error` per submit, in request order (so the n-th answer is about line
//!   n), then each job's `Job` document when it finishes, in any order
//!   (matched by id). It prints results, flushing stdout whenever no further
//!   answer is already buffered.
//!
//! The window bounds memory on both sides: at most [`WINDOW`] lines are
//! between "read from stdin" and "result printed". With `--ordered` a result
//! counts as printed only when it leaves the reorder buffer, so one slow job
//! holds back at most [`WINDOW`] finished ones rather than everything after
//! it.
//!
//! A refused submit (unknown pool: exit 4, queue full: exit 5, …) stops the
//! submitting: its reason is printed once; jobs already accepted are still
//! waited for and printed (they run anyway), and then `map` exits with the
//! refusal's code. A line too large for a frame stops the submitting the
//! same way (exit 2).
//!
//! Daemon requirements: answer submits in request order per connection,
//! send a submit's `Submitted` before its `Job`, and keep reading requests
//! while it has answers queued for us (we always read, so that cannot
//! deadlock).

use super::args::{job_options, MapArgs};
use super::jobs::{max_input_len, too_large};
use super::render::{map_json, pool_failed_line, state_and_error};
use super::{warn, Ctx, Failure, Out};
use crate::client::{RequestWriter, ResponseReader};
use ipc_proto::control::{ErrorKind, JobDoc, JobOptions, JobState, Request, Response};
use ipc_proto::Bytes;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{self, BufReader, IsTerminal, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most lines between "read" and "result printed".
pub const WINDOW: u64 = 20_000;
/// Queued submit bytes that trigger a write.
const SEND_BUFFER: usize = 256 << 10;
/// Read size for stdin.
const STDIN_BUFFER: usize = 256 << 10;
/// Least time between two progress updates.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// State shared by the submitter and the collector.
#[derive(Default)]
struct Shared {
    /// Lines queued for submission (each holds a window slot).
    queued: u64,
    /// Lines whose result was printed (or skipped): slots given back.
    released: u64,
    /// The submitter sleeps on the condvar for a slot.
    submitter_waiting: bool,
    /// A submit was refused: queue nothing more.
    stop: bool,
    /// The submitter will queue nothing more.
    submitter_done: bool,
    /// Why the submitter stopped before the end of its input.
    submitter_error: Option<Failure>,
}

struct Window {
    state: Mutex<Shared>,
    slot_freed: Condvar,
}

impl Window {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panicked peer thread leaves consistent counters; carry on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `map`.
pub fn run(ctx: &Ctx, a: MapArgs) -> Result<u8, Failure> {
    let options = job_options(&a.opts, None)?;
    let stdin = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map(File::from)
        .map_err(|e| Failure::usage(format!("map: cannot read stdin: {e}")))?;
    let (writer, reader) = ctx
        .connect("map")?
        .split()
        .map_err(|e| Failure::client("map", e))?;
    let (wake_tx, wake_rx) = UnixStream::pair()
        .map_err(|e| Failure::new(1, format!("map: cannot create a socket pair: {e}")))?;
    let window = Arc::new(Window {
        state: Mutex::new(Shared::default()),
        slot_freed: Condvar::new(),
    });
    let pool = a.pool.clone();
    let mut submitter = Submitter {
        window: window.clone(),
        conn: writer,
        pool: a.pool,
        options,
    };
    // Ctrl-C: stop submitting, then cancel what was accepted and is not
    // finished (see `Collector::interrupted`). The signal also writes to
    // the wake socket, so the collector's poll returns whatever thread
    // the signal lands on. A second Ctrl-C ends the process at once.
    let interrupts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let on_int = interrupts.clone();
    let wake_sig = wake_tx
        .try_clone()
        .map_err(|e| Failure::new(1, format!("map: cannot clone a socket: {e}")))?;
    // SAFETY: the handler only bumps an atomic, writes one byte to a socket
    // with write(2), or exits: all async-signal-safe.
    unsafe {
        signal_hook::low_level::register(signal_hook::consts::SIGINT, move || {
            if on_int.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 1 {
                signal_hook::low_level::exit(130);
            }
            let _ = nix::unistd::write(&wake_sig, &[1]);
        })
    }
    .map_err(|e| Failure::new(1, format!("map: cannot handle SIGINT: {e}")))?;
    std::thread::Builder::new()
        .name("map-submit".into())
        .spawn(move || submitter.run(stdin, wake_tx))
        .map_err(|e| Failure::new(1, format!("map: cannot start a thread: {e}")))?;
    let mut c = Collector::new(ctx.json, a.ordered);
    c.interrupts = Some(interrupts);
    // The submitter thread may still be blocked reading stdin when we
    // return (after a refusal); exiting the process ends it.
    let code = c.run(&window, reader, wake_rx)?;
    if c.interrupted {
        return Err(cancel_unfinished(ctx, &c));
    }
    if window.lock().queued == 0 {
        // Empty input: nothing was submitted, so nothing said whether the
        // pool exists. A typo must not pass for an empty success.
        let mut conn = ctx.connect("map")?;
        match conn
            .call(&Request::Status { pool: Some(pool) })
            .map_err(|e| Failure::client("map", e))?
        {
            Response::Status(_) => {}
            Response::Error { kind, message } => {
                return Err(Failure::daemon("map", kind, &message))
            }
            other => return Err(Failure::unexpected("map", &other)),
        }
    }
    Ok(code)
}

struct Submitter {
    window: Arc<Window>,
    conn: RequestWriter,
    pool: String,
    options: JobOptions,
}

impl Submitter {
    fn run(&mut self, input: File, wake: UnixStream) {
        let res = self.submit_lines(input);
        let flushed = self.flush();
        let mut g = self.window.lock();
        g.submitter_done = true;
        g.submitter_error = res.and(flushed).err();
        drop(g);
        // The collector may be asleep in poll with nothing left to read.
        let _ = (&wake).write_all(&[1]);
    }

    fn flush(&mut self) -> Result<(), Failure> {
        self.conn.flush().map_err(|e| Failure::client("map", e))
    }

    fn submit_lines(&mut self, input: File) -> Result<(), Failure> {
        let max = max_input_len(&self.pool, None);
        let mut reader = BufReader::with_capacity(STDIN_BUFFER, input);
        let mut line = Vec::new();
        let mut n: u64 = 0;
        loop {
            let conn = &mut self.conn;
            let more = read_line(&mut reader, &mut line, |f| {
                if conn.buffered() > 0 && !ready(f.as_fd()) {
                    conn.flush().map_err(|e| Failure::client("map", e))?;
                }
                Ok(())
            })?;
            if !more {
                return Ok(());
            }
            n += 1;
            if line.len() > max {
                return Err(too_large(
                    &format!("map: line {n}"),
                    Some(line.len() as u64),
                    max,
                ));
            }
            if !self.take_slot()? {
                return Ok(());
            }
            // Lend the buffers to the request and take them back, so a line
            // costs no allocation.
            let req = Request::Submit {
                pool: std::mem::take(&mut self.pool),
                input: Bytes(std::mem::take(&mut line)),
                options: self.options.clone(),
                wait: true,
            };
            let queued = self.conn.queue(&req);
            if let Request::Submit { pool, input, .. } = req {
                self.pool = pool;
                line = input.0;
            }
            if let Err(e) = queued {
                // Not sent: no answer will come for it.
                self.window.lock().queued -= 1;
                return Err(Failure::client("map", e));
            }
            if self.conn.buffered() >= SEND_BUFFER {
                self.flush()?;
            }
        }
    }

    /// Waits for a window slot; false if submitting must stop.
    fn take_slot(&mut self) -> Result<bool, Failure> {
        let mut g = self.window.lock();
        loop {
            if g.stop {
                return Ok(false);
            }
            if g.queued - g.released < WINDOW {
                g.queued += 1;
                return Ok(true);
            }
            if self.conn.buffered() > 0 {
                // Never sleep on unsent frames: their answers free the slots.
                drop(g);
                self.flush()?;
                g = self.window.lock();
                continue;
            }
            g.submitter_waiting = true;
            g = self
                .window
                .slot_freed
                .wait(g)
                .unwrap_or_else(|e| e.into_inner());
            g.submitter_waiting = false;
        }
    }
}

/// True if reading `fd` would not block (data, end of file or an error
/// is pending). Regular files always are.
fn ready(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(n) => n > 0,
        // Let the read itself report the problem.
        Err(_) => true,
    }
}

/// Reads the next line into `line` without its `\n` or `\r\n` (a `\r` not
/// followed by `\n` is kept). The last line needs no newline; an empty line
/// is a line. Returns false at the end of the input. `before_read` runs
/// whenever the buffer is empty, i.e. before every read that could block.
pub fn read_line<R: Read>(
    r: &mut BufReader<R>,
    line: &mut Vec<u8>,
    mut before_read: impl FnMut(&R) -> Result<(), Failure>,
) -> Result<bool, Failure> {
    line.clear();
    let mut any = false;
    loop {
        if r.buffer().is_empty() {
            before_read(r.get_ref())?;
        }
        let buf = match io::BufRead::fill_buf(r) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Failure::usage(format!("map: cannot read stdin: {e}"))),
        };
        if buf.is_empty() {
            return Ok(any);
        }
        any = true;
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&buf[..i]);
                io::BufRead::consume(r, i + 1);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(true);
            }
            None => {
                let n = buf.len();
                line.extend_from_slice(buf);
                io::BufRead::consume(r, n);
            }
        }
    }
}

/// Puts items numbered 0, 1, 2, … back in order. Holds at most as many
/// items as the gap between the lowest missing number and the highest
/// inserted one (bounded by [`WINDOW`] here).
#[derive(Debug)]
pub struct Reorder<T> {
    next: u64,
    slots: VecDeque<Option<T>>,
}

impl<T> Default for Reorder<T> {
    fn default() -> Self {
        Reorder {
            next: 0,
            slots: VecDeque::new(),
        }
    }
}

impl<T> Reorder<T> {
    /// Adds item `index`. An index already popped or inserted replaces
    /// nothing and is dropped (it cannot happen with one answer per line).
    pub fn insert(&mut self, index: u64, item: T) {
        let Some(off) = index.checked_sub(self.next) else {
            return;
        };
        let off = off as usize;
        if off >= self.slots.len() {
            self.slots.resize_with(off + 1, || None);
        }
        if self.slots[off].is_none() {
            self.slots[off] = Some(item);
        }
    }

    /// The next item in order, if it has arrived.
    pub fn pop(&mut self) -> Option<(u64, T)> {
        if !matches!(self.slots.front(), Some(Some(_))) {
            return None;
        }
        let item = self.slots.pop_front().flatten()?;
        let index = self.next;
        self.next += 1;
        Some((index, item))
    }

    /// Items held back.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }
}

/// The result of one line.
enum Entry {
    Done(JobDoc),
    /// The submit was refused; nothing to print.
    Refused,
}

/// On a terminal's stderr, at most every [`PROGRESS_EVERY`]:
/// `[#######.............] 1234/5000 done, 3 failed, 812/s, ETA 4s` (the
/// bar and the ETA once the input is all read: before, the total is not
/// known), and a summary line at the end.
struct Progress {
    started: Instant,
    last: Instant,
    shown: bool,
    stdout_is_tty: bool,
}

/// Width of the progress bar, in cells.
const BAR: u64 = 20;

impl Progress {
    fn update(&mut self, done: u64, total: u64, failed: u64, input_over: bool) {
        let now = Instant::now();
        if now.duration_since(self.last) < PROGRESS_EVERY {
            return;
        }
        self.last = now;
        self.shown = true;
        let _ = write!(
            io::stderr().lock(),
            "\r{}\x1b[K",
            progress_line(
                done,
                total,
                failed,
                input_over,
                now.duration_since(self.started)
            )
        );
    }

    fn clear(&mut self) {
        if self.shown {
            self.shown = false;
            let _ = write!(io::stderr().lock(), "\r\x1b[K");
        }
    }

    /// The last word, once everything is answered (shown only after a
    /// run long enough to have shown progress).
    fn summary(&self, done: u64, failed: u64, refused: u64) {
        let secs = self.started.elapsed().as_secs_f64();
        let mut line = format!(
            "{done} jobs: {} succeeded, {failed} failed",
            done.saturating_sub(failed)
        );
        if refused > 0 {
            line.push_str(&format!(", {refused} refused"));
        }
        line.push_str(&format!(" in {secs:.1}s"));
        if secs > 0.0 {
            line.push_str(&format!(" ({:.0}/s)", done as f64 / secs));
        }
        warn(&format!("map: {line}"));
    }
}

/// One progress line (see [`Progress`]).
fn progress_line(
    done: u64,
    total: u64,
    failed: u64,
    input_over: bool,
    elapsed: Duration,
) -> String {
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
    let mut line = String::new();
    if input_over && total > 0 {
        let filled = (done.min(total) * BAR / total) as usize;
        line.push('[');
        line.push_str(&"#".repeat(filled));
        line.push_str(&".".repeat(BAR as usize - filled));
        line.push_str("] ");
    }
    line.push_str(&format!(
        "{done}/{total} done, {failed} failed, {rate:.0}/s"
    ));
    if input_over && total > done && rate > 0.0 {
        let eta = ((total - done) as f64 / rate).ceil() as u64;
        line.push_str(&format!(", ETA {}", human_eta(eta)));
    }
    line
}

fn human_eta(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// After Ctrl-C: cancels the jobs `c` saw accepted and not finished, and
/// says so; exit 130, as for a command killed by SIGINT.
fn cancel_unfinished(ctx: &Ctx, c: &Collector) -> Failure {
    let mut ids: Vec<u64> = c.pending.keys().copied().collect();
    ids.sort_unstable();
    if ids.is_empty() {
        return Failure::new(
            130,
            "map: interrupted; every accepted job had finished".into(),
        );
    }
    let mut cancelled = 0;
    if let Ok(mut conn) = ctx.connect("map") {
        for &id in &ids {
            if let Ok(Response::Ok { .. } | Response::Job(_)) = conn.call(&Request::Cancel { id }) {
                cancelled += 1;
            }
        }
    }
    let shown: Vec<String> = ids.iter().take(20).map(u64::to_string).collect();
    let more = if ids.len() > 20 { " …" } else { "" };
    Failure::new(
        130,
        format!(
            "map: interrupted; cancelled {cancelled} of {} unfinished jobs (ids {}{more})",
            ids.len(),
            shown.join(" ")
        ),
    )
}

struct Collector {
    json: bool,
    ordered: bool,
    out: Out,
    /// Accepted jobs not finished yet: id → line index.
    pending: HashMap<u64, u64>,
    /// `Job` documents that came before their `Submitted` (the daemon
    /// should not do that; tolerated).
    early: HashMap<u64, JobDoc>,
    /// Submit answers received = index of the next line to be answered.
    answered: u64,
    reorder: Reorder<Entry>,
    released: u64,
    failed: u64,
    refused: u64,
    /// The first refusal: its exit code.
    refusal: Option<u8>,
    progress: Option<Progress>,
    /// Ctrl-C count (set by `run`'s SIGINT handler).
    interrupts: Option<Arc<std::sync::atomic::AtomicUsize>>,
    /// Interrupted: submitting stopped; the loop ended once every submit
    /// was answered, leaving `pending` to cancel.
    interrupted: bool,
}

impl Collector {
    fn new(json: bool, ordered: bool) -> Collector {
        Collector {
            json,
            ordered,
            out: Out::new(),
            pending: HashMap::new(),
            early: HashMap::new(),
            answered: 0,
            reorder: Reorder::default(),
            released: 0,
            failed: 0,
            refused: 0,
            refusal: None,
            interrupts: None,
            interrupted: false,
            // The first update comes after PROGRESS_EVERY: a quick run
            // shows nothing.
            progress: io::stderr().is_terminal().then(|| Progress {
                started: Instant::now(),
                last: Instant::now(),
                shown: false,
                stdout_is_tty: io::stdout().is_terminal(),
            }),
        }
    }

    fn run(
        &mut self,
        window: &Window,
        mut conn: ResponseReader,
        wake: UnixStream,
    ) -> Result<u8, Failure> {
        let res = self.collect(window, &mut conn, &wake);
        if let Some(p) = &mut self.progress {
            let shown = p.shown;
            p.clear();
            if shown && res.is_ok() && !self.interrupted {
                p.summary(self.released, self.failed, self.refused);
            }
        }
        res?;
        self.out.flush()?;
        let submitter_error = window.lock().submitter_error.take();
        if let Some(Failure { msg: Some(m), .. }) = &submitter_error {
            warn(m);
        }
        Ok(self
            .refusal
            .or(submitter_error.map(|f| f.code))
            .unwrap_or(if self.failed > 0 { 1 } else { 0 }))
    }

    fn collect(
        &mut self,
        window: &Window,
        conn: &mut ResponseReader,
        wake: &UnixStream,
    ) -> Result<(), Failure> {
        loop {
            while let Some(r) = conn.try_next().map_err(|e| self.lost(e))? {
                self.handle(r)?;
            }
            if !self.interrupted
                && self
                    .interrupts
                    .as_ref()
                    .is_some_and(|n| n.load(std::sync::atomic::Ordering::SeqCst) > 0)
            {
                self.interrupted = true;
            }
            let (finished, total, input_over) = {
                let mut g = window.lock();
                let freed = self.released > g.released;
                g.released = self.released;
                if self.refusal.is_some() || self.interrupted {
                    g.stop = true;
                }
                if self.interrupted && (g.submitter_done || g.stop) && self.answered == g.queued {
                    // Every submit is answered: the accepted ids are known.
                    return Ok(());
                }
                if g.submitter_waiting && (freed || g.stop) {
                    window.slot_freed.notify_one();
                }
                // After a stop `queued` no longer grows, even if the
                // submitter is stuck reading stdin.
                let input_over = g.submitter_done || g.stop;
                (
                    input_over && self.answered == g.queued && self.pending.is_empty(),
                    g.queued,
                    input_over,
                )
            };
            if finished {
                return Ok(());
            }
            if let Some(p) = &mut self.progress {
                p.update(self.released, total, self.failed + self.refused, input_over);
                if p.stdout_is_tty {
                    p.clear();
                }
            }
            // Nothing more is pending right now: let the reader see it.
            self.out.flush()?;
            self.wait_readable(conn, wake)?;
        }
    }

    /// Sleeps until the daemon sends something (then reads it) or the
    /// submitter says it is done.
    fn wait_readable(
        &mut self,
        conn: &mut ResponseReader,
        wake: &UnixStream,
    ) -> Result<(), Failure> {
        let mut fds = [
            PollFd::new(conn.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(()),
            Err(e) => return Err(Failure::new(1, format!("map: poll: {e}"))),
        }
        let conn_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        let woken = fds[1].revents().is_some_and(|r| !r.is_empty());
        if woken {
            let _ = (&*wake).read(&mut [0u8; 64]);
        }
        if conn_ready {
            conn.fill().map_err(|e| self.lost(e))?;
        }
        Ok(())
    }

    fn lost(&self, e: crate::client::ClientError) -> Failure {
        let mut f = Failure::client("map", e);
        if let Some(m) = &mut f.msg {
            if !self.pending.is_empty() {
                m.push_str(&format!(
                    "; {} accepted jobs had not finished (they stay in the daemon: see 'jobvisorctl jobs')",
                    self.pending.len()
                ));
            }
        }
        f
    }

    fn handle(&mut self, r: Response) -> Result<(), Failure> {
        match r {
            Response::Submitted { id } => {
                let index = self.answered;
                self.answered += 1;
                match self.early.remove(&id) {
                    Some(doc) => self.deliver(index, Entry::Done(doc)),
                    None => {
                        self.pending.insert(id, index);
                        Ok(())
                    }
                }
            }
            Response::Job(doc) => match self.pending.remove(&doc.id) {
                Some(index) => self.deliver(index, Entry::Done(doc)),
                None => {
                    self.early.insert(doc.id, doc);
                    Ok(())
                }
            },
            Response::Error { kind, message } => {
                let index = self.answered;
                self.answered += 1;
                self.refused += 1;
                if self.refusal.is_none() {
                    self.refusal = Some(kind.exit_code());
                    if let Some(p) = &mut self.progress {
                        p.clear();
                    }
                    warn(&format!(
                        "map: line {} refused: {message}; submitted no more lines",
                        index + 1
                    ));
                }
                self.deliver(index, Entry::Refused)
            }
            // The lines still pending cannot run for now: stop here.
            Response::PoolFailed { pool, error } => {
                if let Some(p) = &mut self.progress {
                    p.clear();
                }
                Err(Failure::new(
                    ErrorKind::Rejected.exit_code(),
                    format!(
                        "{}; {} accepted jobs stay queued",
                        pool_failed_line(&pool, &error),
                        self.pending.len()
                    ),
                ))
            }
            other => Err(Failure::unexpected("map", &other)),
        }
    }

    fn deliver(&mut self, index: u64, e: Entry) -> Result<(), Failure> {
        if !self.ordered {
            return self.emit(index, e);
        }
        self.reorder.insert(index, e);
        while let Some((i, e)) = self.reorder.pop() {
            self.emit(i, e)?;
        }
        Ok(())
    }

    fn emit(&mut self, index: u64, e: Entry) -> Result<(), Failure> {
        self.released += 1;
        let Entry::Done(doc) = e else {
            return Ok(());
        };
        let ok = doc.state == JobState::Succeeded;
        if !ok {
            self.failed += 1;
        }
        if self.json {
            self.out.line(&map_json(index, &doc).to_string())
        } else if ok {
            self.out.bytes(doc.output.as_deref().unwrap_or_default())?;
            self.out.bytes(b"\n")
        } else {
            if let Some(p) = &mut self.progress {
                p.clear();
            }
            // Outputs before this failure go first, so that a terminal (or
            // `2>&1`) shows lines in the order they were printed.
            self.out.flush()?;
            warn(&format!(
                "line {} (job {}) {}",
                index + 1,
                doc.id,
                state_and_error(&doc)
            ));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn lines(input: &[u8], cap: usize) -> (Vec<Vec<u8>>, usize) {
        let mut r = BufReader::with_capacity(cap, Cursor::new(input.to_vec()));
        let mut out = Vec::new();
        let mut line = Vec::new();
        let mut reads = 0;
        while read_line(&mut r, &mut line, |_| {
            reads += 1;
            Ok(())
        })
        .unwrap()
        {
            out.push(line.clone());
        }
        (out, reads)
    }

    fn strs(v: &[&str]) -> Vec<Vec<u8>> {
        v.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[test]
    fn lines_split_on_lf_and_crlf() {
        for cap in [1, 2, 3, 64] {
            let (l, _) = lines(b"a\nbb\r\n\nccc", cap);
            assert_eq!(l, strs(&["a", "bb", "", "ccc"]), "cap {cap}");
        }
    }

    #[test]
    fn progress_shows_a_bar_rate_and_eta_once_the_total_is_known() {
        let second = Duration::from_secs(1);
        assert_eq!(
            progress_line(250, 1000, 3, true, 2 * second),
            "[#####...............] 250/1000 done, 3 failed, 125/s, ETA 6s"
        );
        // Input still being read: no bar, no ETA.
        assert_eq!(
            progress_line(250, 300, 0, false, second),
            "250/300 done, 0 failed, 250/s"
        );
        assert_eq!(human_eta(125), "2m05s");
        assert_eq!(human_eta(7300), "2h01m");
    }

    #[test]
    fn last_line_and_empty_lines() {
        assert_eq!(lines(b"", 8).0, strs(&[]));
        assert_eq!(lines(b"\n", 8).0, strs(&[""]));
        assert_eq!(lines(b"\n\n", 8).0, strs(&["", ""]));
        assert_eq!(lines(b"x\n", 8).0, strs(&["x"]));
        assert_eq!(lines(b"x", 8).0, strs(&["x"]));
        assert_eq!(lines(b"\r\n", 8).0, strs(&[""]));
        // A lone CR is data, not a line end.
        assert_eq!(lines(b"a\rb\nc\r", 8).0, strs(&["a\rb", "c\r"]));
        // Binary bytes pass through.
        assert_eq!(lines(b"\x00\xff\n", 8).0, vec![vec![0u8, 0xff]]);
    }

    #[test]
    fn hook_runs_before_each_read() {
        // 6 bytes through a 2-byte buffer: 3 fills, plus the one seeing EOF.
        let (_, reads) = lines(b"ab\ncd\n", 2);
        assert_eq!(reads, 4);
        let (_, reads) = lines(b"ab\ncd\n", 64);
        assert_eq!(reads, 2);
    }

    #[test]
    fn hook_errors_stop_reading() {
        let mut r = BufReader::new(Cursor::new(b"a\n".to_vec()));
        let mut line = Vec::new();
        let e = read_line(&mut r, &mut line, |_| Err(Failure::new(3, "gone".into())));
        assert_eq!(e.unwrap_err().code, 3);
    }

    #[test]
    fn reorder_releases_in_index_order() {
        let mut r = Reorder::default();
        r.insert(2, "c");
        r.insert(1, "b");
        assert_eq!(r.pop(), None);
        assert_eq!(r.held(), 2);
        r.insert(0, "a");
        assert_eq!(r.pop(), Some((0, "a")));
        assert_eq!(r.pop(), Some((1, "b")));
        assert_eq!(r.pop(), Some((2, "c")));
        assert_eq!(r.pop(), None);
        r.insert(3, "d");
        assert_eq!(r.pop(), Some((3, "d")));
        // Stale or duplicate indices are ignored.
        r.insert(0, "x");
        r.insert(5, "f");
        r.insert(5, "g");
        r.insert(4, "e");
        assert_eq!(r.pop(), Some((4, "e")));
        assert_eq!(r.pop(), Some((5, "f")));
        assert_eq!(r.pop(), None);
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn reorder_any_permutation() {
        let n = 200u64;
        let mut order: Vec<u64> = (0..n).collect();
        fastrand::seed(7);
        fastrand::shuffle(&mut order);
        let mut r = Reorder::default();
        let mut got = Vec::new();
        for i in order {
            r.insert(i, i * 10);
            while let Some((idx, v)) = r.pop() {
                assert_eq!(v, idx * 10);
                got.push(idx);
            }
        }
        assert_eq!(got, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn stdin_readiness_of_a_pipe() {
        let (a, mut b) = UnixStream::pair().unwrap();
        assert!(!ready(a.as_fd()));
        b.write_all(b"x").unwrap();
        assert!(ready(a.as_fd()));
        drop(b);
        let mut buf = [0u8; 4];
        assert_eq!((&a).read(&mut buf).unwrap(), 1);
        // End of file is "ready": the read returns at once.
        assert!(ready(a.as_fd()));
    }
}
