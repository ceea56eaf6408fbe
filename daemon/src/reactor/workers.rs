//! Worker I/O on the loop: registering a spawned worker's pipes, writing
//! its job frames, reading its results and its output (rate-limited into the
//! log), and noticing its death (reaping, orphans, exec failures).

use super::*;
use ipc_proto::control::LogStream;
use std::os::fd::AsFd;

/// Read rounds (of `OUTPUT_READ_BUDGET` each) given to an exited worker's
/// output pipes for what they still hold.
const GONE_OUTPUT_ROUNDS: usize = 8;

/// The record that ends a stretch of rate-limited worker output.
pub(super) fn log_suppressed(pool: &str, slot: u32, lines: u64) {
    crate::warn!(
        "[{pool}/{slot}] suppressed {lines} lines (worker output is limited to {} lines/s, bursts of {})",
        crate::log::OUTPUT_LINES_PER_SEC,
        crate::log::OUTPUT_BURST
    );
}

impl Reactor {
    pub(super) fn register_worker(
        &mut self,
        proc: ProcId,
        pool: &str,
        slot: u32,
        sp: spawn::Spawned,
    ) {
        let reg = self.poll.registry();
        let mut ok = true;
        for (fd, kind) in [
            (&sp.results, Kind::Results),
            (&sp.stdout, Kind::Stdout),
            (&sp.stderr, Kind::Stderr),
        ] {
            if let Err(e) = reg.register(
                &mut SourceFd(&fd.as_raw_fd()),
                token(kind, proc),
                Interest::READABLE,
            ) {
                crate::error!("epoll register: {e}");
                ok = false;
            }
        }
        let pid = sp.pid;
        let mapping = match crate::shm::Mapping::new(&sp.arena, sp.shm_size) {
            Ok(m) => Some(m),
            Err(e) => {
                crate::error!(
                    "pool {pool} worker {slot}: cannot map its shared-memory arena ({e}); large payloads will fail"
                );
                None
            }
        };
        self.pids.insert(pid, proc);
        self.procs.insert(
            proc,
            WorkerIo {
                pid,
                pool: pool.to_string(),
                slot,
                jobs: Some(sp.jobs),
                jobs_out: Vec::new(),
                jobs_written: 0,
                jobs_writable_armed: false,
                results: Some(sp.results),
                decoder: FrameDecoder::new(ipc_proto::MAX_FRAME_LEN),
                stdout: Some(sp.stdout),
                stderr: Some(sp.stderr),
                stdout_line: Vec::new(),
                stderr_line: Vec::new(),
                limiter: crate::log::OutputLimiter::new(Instant::now()),
                tail: Default::default(),
                mapping: mapping.map(Arc::new),
                hold_out: Default::default(),
                fds_out: Default::default(),
                copies_in: 0,
                held_in: Default::default(),
                held_end: None,
                exit: None,
                layout: ipc_proto::arena::ArenaLayout::split(sp.shm_size),
                _arena: sp.arena,
                exec_status: Some(sp.exec_status),
                exec_error: None,
                program: sp.program,
            },
        );
        self.core.on_spawned(proc, pid, Instant::now());
        let note = format!("pid {pid} started");
        self.logs
            .push(pool, slot, LogStream::Daemon, logs::now_ms(), &note);
        crate::log::log(
            Level::Debug,
            &format!("pool {pool} worker {slot} spawned (pid {pid})"),
        );
        if !ok {
            self.core
                .on_protocol_error(proc, "cannot watch its pipes".into(), Instant::now());
        }
    }

    /// The exec-status pipe of a worker that exited before `Ready`: a
    /// record on it means a setup step or the exec failed (the child then
    /// exits with 127, and its exit carries this reason instead).
    ///
    /// The pipe is deliberately not watched in epoll: the exit (SIGCHLD)
    /// or the `Ready` frame always follows, so reading it then costs the
    /// loop no extra wakeup per spawn (a wakeup that, on two cores, would
    /// compete with the starting worker).
    pub(super) fn on_exec_status(&mut self, proc: ProcId) {
        let Some(w) = self.procs.get_mut(&proc) else {
            return;
        };
        let Some(fd) = &w.exec_status else { return };
        let mut buf = [0u8; 8];
        let mut got = 0;
        let done = loop {
            match nix::unistd::read(fd, &mut buf[got..]) {
                Ok(0) => break true,
                Ok(n) => {
                    got += n;
                    if got == buf.len() {
                        break true;
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => break false,
                Err(_) => break true,
            }
        };
        if got > 0 {
            let msg = spawn::exec_failure(&w.program, &buf[..got]);
            let transient = spawn::exec_failure_is_transient(&buf[..got]);
            crate::error!("pool {} worker {}: {msg}", w.pool, w.slot);
            w.exec_error = Some((msg, transient));
        }
        if done {
            w.exec_status = None;
        }
    }

    pub(super) fn send(&mut self, proc: ProcId, msg: &ToWorker) {
        let Some(w) = self.procs.get_mut(&proc) else {
            return;
        };
        if w.jobs.is_none() {
            return;
        }
        if let Err(e) = encode_frame(msg, &mut w.jobs_out) {
            crate::error!("cannot encode a message for worker {}: {e}", w.pid);
            return;
        }
        self.dirty_workers.insert(proc);
    }

    /// [`Self::send`] with descriptors attached to the frame (worker
    /// protocol 2: a `Payload::Fd` input, an output buffer).
    pub(super) fn send_fds(
        &mut self,
        proc: ProcId,
        msg: &ToWorker,
        fds: Vec<crate::supervisor::PassedFd>,
    ) {
        let Some(w) = self.procs.get_mut(&proc) else {
            return;
        };
        if w.jobs.is_none() {
            return;
        }
        let at = w.jobs_out.len();
        if let Err(e) = encode_frame(msg, &mut w.jobs_out) {
            crate::error!("cannot encode a message for worker {}: {e}", w.pid);
            return;
        }
        w.fds_out
            .push_back((at, fds.into_iter().map(|f| f.0).collect()));
        self.dirty_workers.insert(proc);
    }

    /// Writes pending frames to a worker without ever blocking: what the
    /// socket does not take waits for a writable event. Descriptors go
    /// with the first byte of their frame (`sendmsg`).
    pub(super) fn flush_jobs(&mut self, proc: ProcId) {
        let Some(w) = self.procs.get_mut(&proc) else {
            return;
        };
        let Some(fd) = &w.jobs else { return };
        // Up to the first frame whose arena input is still being copied.
        let limit = w.hold_out.front().copied().unwrap_or(w.jobs_out.len());
        while w.jobs_written < limit {
            let next_fds = w.fds_out.front().map(|(at, _)| *at);
            let written = match next_fds {
                Some(at) if at == w.jobs_written => {
                    let files = &w.fds_out.front().expect("checked").1;
                    let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
                    crate::fdpass::send_fds(fd, &w.jobs_out[w.jobs_written..limit], &fds)
                        .map_err(|e| {
                            nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
                        })
                        .inspect(|_| {
                            w.fds_out.pop_front();
                        })
                }
                // Up to the frame that carries descriptors.
                Some(at) if at < limit => nix::unistd::write(fd, &w.jobs_out[w.jobs_written..at]),
                _ => nix::unistd::write(fd, &w.jobs_out[w.jobs_written..limit]),
            };
            match written {
                Ok(n) => w.jobs_written += n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => {
                    if !w.jobs_writable_armed {
                        w.jobs_writable_armed = true;
                        let _ = self.poll.registry().register(
                            &mut SourceFd(&fd.as_raw_fd()),
                            token(Kind::Jobs, proc),
                            Interest::WRITABLE,
                        );
                    }
                    return;
                }
                Err(_) => {
                    // EPIPE: the worker closed its end or died; its exit
                    // (or EOF on results) is handled on its own path.
                    w.jobs_out.clear();
                    w.jobs_written = 0;
                    w.hold_out.iter_mut().for_each(|at| *at = 0);
                    w.fds_out.clear();
                    return;
                }
            }
        }
        if w.jobs_written < w.jobs_out.len() {
            // Held behind a copy; `on_copied` flushes again.
            return;
        }
        w.jobs_out.clear();
        w.jobs_written = 0;
        // Holds still pending sit at the end (their frames come next).
        w.hold_out.iter_mut().for_each(|at| *at = 0);
        if w.jobs_writable_armed {
            w.jobs_writable_armed = false;
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&fd.as_raw_fd()));
        }
    }

    pub(super) fn on_results(&mut self, proc: ProcId) {
        let now = Instant::now();
        let mut msgs = Vec::new();
        let mut problem: Option<String> = None;
        let mut eof = false;
        {
            let Some(w) = self.procs.get_mut(&proc) else {
                return;
            };
            let Some(fd) = &w.results else { return };
            loop {
                match nix::unistd::read(fd, w.decoder.unfilled()) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        w.decoder.filled(n);
                        loop {
                            match w.decoder.next_frame() {
                                Ok(Some(f)) => match decode::<FromWorker>(f) {
                                    Ok(m) => msgs.push(m),
                                    Err(e) => {
                                        problem = Some(e.to_string());
                                        break;
                                    }
                                },
                                Ok(None) => break,
                                Err(e) => {
                                    problem = Some(e.to_string());
                                    break;
                                }
                            }
                        }
                        if problem.is_some() {
                            break;
                        }
                    }
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(nix::errno::Errno::EAGAIN) => break,
                    Err(e) => {
                        problem = Some(format!("reading its result pipe: {e}"));
                        break;
                    }
                }
            }
            if eof || problem.is_some() {
                if let Some(fd) = w.results.take() {
                    let _ = self
                        .poll
                        .registry()
                        .deregister(&mut SourceFd(&fd.as_raw_fd()));
                }
                if eof && problem.is_none() {
                    if let Err(e) = w.decoder.finish() {
                        problem = Some(e.to_string());
                    }
                }
            }
        }
        for m in msgs {
            match self.procs.get_mut(&proc) {
                Some(w) if w.copies_in > 0 => w.held_in.push_back(m),
                _ => self.on_worker_msg(proc, m, now),
            }
        }
        if problem.is_some() || eof {
            match self.procs.get_mut(&proc) {
                Some(w) if w.copies_in > 0 => w.held_end = Some(problem),
                _ => self.on_results_end(proc, problem, now),
            }
        }
    }

    /// The end of a worker's result stream: a protocol error or EOF.
    pub(super) fn on_results_end(&mut self, proc: ProcId, problem: Option<String>, now: Instant) {
        if let Some(p) = problem {
            self.core.on_protocol_error(proc, p, now);
        } else {
            self.core.on_channel_closed(proc, now);
        }
    }

    /// One message from a worker, in order.
    pub(super) fn on_worker_msg(&mut self, proc: ProcId, m: FromWorker, now: Instant) {
        match m {
            FromWorker::Ready {
                protocol_version, ..
            } => {
                // It runs: the exec worked, nothing will come on the
                // status pipe.
                if let Some(w) = self.procs.get_mut(&proc) {
                    w.exec_status = None;
                }
                self.core.on_ready(proc, protocol_version, now)
            }
            FromWorker::Done { id, output } => self.on_worker_output(proc, id, output, None, now),
            FromWorker::Failed { id, error } => self.core.on_job_failed(proc, id, error, now),
            FromWorker::Raised { id, error, output } => {
                self.on_worker_output(proc, id, output, Some(error), now)
            }
        }
    }

    /// The output of a `Done` (or the detail of a `Raised`, with its
    /// `error`): inline, or copied out of the worker's arena (checked).
    fn on_worker_output(
        &mut self,
        proc: ProcId,
        id: u64,
        output: ipc_proto::worker::Payload,
        raised: Option<String>,
        now: Instant,
    ) {
        match output {
            ipc_proto::worker::Payload::Inline(bytes) => {
                self.job_output(proc, id, JobOutput::Mem(bytes.0.into()), raised, now)
            }
            ipc_proto::worker::Payload::Shm { offset, len } => {
                let mapping = match self.output_slot(proc, offset, len) {
                    Ok(m) => m,
                    Err(e) => {
                        return self.core.on_protocol_error(
                            proc,
                            format!("job {id}: bad shared-memory output: {e}"),
                            now,
                        )
                    }
                };
                if crate::log::enabled(Level::Debug) {
                    crate::log::log(
                        Level::Debug,
                        &format!("job {id}: {len}-byte output through shared memory"),
                    );
                }
                self.output_from_arena(proc, id, mapping, (offset, len), raised, now);
            }
            ipc_proto::worker::Payload::Fd { len } => {
                let file = match self.buffered_output(proc, id, len) {
                    Ok(file) => file,
                    Err(e) => {
                        return self
                            .core
                            .on_protocol_error(proc, format!("job {id}: {e}"), now)
                    }
                };
                if crate::log::enabled(Level::Debug) {
                    crate::log::log(
                        Level::Debug,
                        &format!("job {id}: {len}-byte output in the client's buffer"),
                    );
                }
                let output = JobOutput::Memfd(crate::supervisor::OutputMemfd { file, len });
                self.job_output(proc, id, output, raised, now);
            }
        }
    }

    /// The output buffer job `id` was sent to `proc` with, if it holds a
    /// `len`-byte output (`Payload::Fd`): checked against the buffer's size,
    /// so a client never maps past its end.
    fn buffered_output(
        &self,
        proc: ProcId,
        id: u64,
        len: u64,
    ) -> Result<Arc<std::fs::File>, String> {
        let file = self
            .core
            .output_buffer_sent(proc, id)
            .ok_or("an output in a buffer it was not given (Payload::Fd)")?;
        let size = file
            .metadata()
            .map_err(|e| format!("cannot check its output buffer ({e})"))?
            .len();
        if size < len {
            return Err(format!(
                "an output of {len} bytes in an output buffer of {size} bytes"
            ));
        }
        Ok(file)
    }

    /// A job's output is in (memory or its payload file): the job succeeded,
    /// or with `raised` failed with that error and this detail.
    pub(super) fn job_output(
        &mut self,
        proc: ProcId,
        id: u64,
        output: JobOutput,
        raised: Option<String>,
        now: Instant,
    ) {
        match (raised, output) {
            (Some(error), output) => self.core.on_job_raised(proc, id, error, output, now),
            (None, JobOutput::File(len)) => self.core.on_job_done_in_file(proc, id, len, now),
            (None, JobOutput::Mem(bytes)) => self.core.on_job_done(proc, id, bytes, now),
            (None, JobOutput::Memfd(m)) => self.core.on_job_done_in_memfd(proc, id, m, now),
        }
    }

    /// Reads one worker output pipe, at most [`OUTPUT_READ_BUDGET`] bytes,
    /// and logs its lines through the worker's rate limit.
    pub(super) fn on_output(&mut self, proc: ProcId, is_err: bool) {
        let Some(w) = self.procs.get_mut(&proc) else {
            self.output_backlog.remove(&(proc, is_err));
            return;
        };
        let WorkerIo {
            pool,
            slot,
            limiter,
            tail,
            ..
        } = w;
        let (fd_slot, line) = if is_err {
            (&mut w.stderr, &mut w.stderr_line)
        } else {
            (&mut w.stdout, &mut w.stdout_line)
        };
        let Some(fd) = fd_slot.as_ref() else {
            self.output_backlog.remove(&(proc, is_err));
            return;
        };
        let mut buf = [0u8; 64 * 1024];
        let mut budget = OUTPUT_READ_BUDGET;
        let mut close = false;
        let now = Instant::now();
        let time_ms = logs::now_ms();
        let stream = if is_err {
            LogStream::Stderr
        } else {
            LogStream::Stdout
        };
        let mut book = self.logs.writer(pool, *slot);
        while budget > 0 {
            let want = budget.min(buf.len());
            match nix::unistd::read(fd, &mut buf[..want]) {
                Ok(0) => {
                    close = true;
                    break;
                }
                Ok(n) => {
                    budget -= n;
                    crate::log::split_lines(line, &buf[..n], MAX_LOG_LINE, |l| {
                        tail.push(l);
                        let text = String::from_utf8_lossy(l);
                        let text = text.trim_end_matches('\r');
                        book.push(stream, time_ms, text);
                        match limiter.admit(now) {
                            crate::log::Admit::Drop => {}
                            crate::log::Admit::Log { suppressed_before } => {
                                if suppressed_before > 0 {
                                    log_suppressed(pool, *slot, suppressed_before);
                                }
                                crate::log::worker_line(pool, *slot, is_err, text);
                            }
                        }
                    });
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
        if limiter.resume_at().is_some() {
            self.suppressing.insert(proc);
        }
        // Budget spent before EAGAIN: no new edge will come for what is
        // left, so the loop comes back for it.
        if budget == 0 && !close {
            self.output_backlog.insert((proc, is_err));
        } else {
            self.output_backlog.remove(&(proc, is_err));
        }
        if close {
            if let Some(fd) = fd_slot.take() {
                let _ = self
                    .poll
                    .registry()
                    .deregister(&mut SourceFd(&fd.as_raw_fd()));
            }
        }
    }

    /// Reads again from worker pipes left at their read budget.
    pub(super) fn drain_output_backlog(&mut self) {
        if self.output_backlog.is_empty() {
            return;
        }
        let pending: Vec<(ProcId, bool)> = self.output_backlog.iter().copied().collect();
        for (proc, is_err) in pending {
            self.on_output(proc, is_err);
        }
    }

    /// Earliest "suppressed" record due for a quiet worker.
    pub(super) fn suppression_deadline(&self) -> Option<Instant> {
        self.suppressing
            .iter()
            .filter_map(|p| self.procs.get(p)?.limiter.resume_at())
            .min()
    }

    /// Collects every exited child. See the module docs for the ordering.
    pub(super) fn reap(&mut self) {
        let mut reaped = false;
        loop {
            let peek = waitid(
                Id::All,
                WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
            );
            let pid = match peek {
                Ok(WaitStatus::StillAlive) => break,
                Ok(st) => match st.pid() {
                    Some(p) => p,
                    None => break,
                },
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::ECHILD) => break,
                Err(e) => {
                    crate::error!("waitid failed: {e}");
                    break;
                }
            };
            let known = self.pids.get(&(pid.as_raw() as u32)).copied();
            if let Some(proc) = known {
                // The leader is a zombie, so its pgid is still reserved.
                let _ = killpg(pid, Signal::SIGKILL);
                // And everything in its cgroup, wherever it went.
                if let (Some(path), Some(c)) =
                    (self.proc_cgroups.remove(&proc), self.cgroups.as_mut())
                {
                    c.finish(path);
                }
            } else if let Some(c) = self.cgroups.as_mut().filter(|c| c.draining() > 0) {
                c.sweep();
            }
            let status = loop {
                match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                    Err(nix::errno::Errno::EINTR) => continue,
                    other => break other,
                }
            };
            reaped = true;
            let Some(proc) = known else {
                continue; // an adopted orphan: reaped (its children are swept below)
            };
            let description = match status {
                Ok(WaitStatus::Exited(_, code)) => format!("exit status {code}"),
                Ok(WaitStatus::Signaled(_, sig, core)) => {
                    format!(
                        "killed by {sig}{}",
                        if core { " (core dumped)" } else { "" }
                    )
                }
                Ok(other) => format!("{other:?}"),
                Err(e) => format!("unknown status ({e})"),
            };
            self.worker_gone(
                proc,
                ExitInfo {
                    description,
                    transient: false,
                    output_tail: None,
                },
            );
        }
        if reaped {
            // Descendants that escaped the group kill (see orphans.rs).
            let (pids, procs) = (&self.pids, &self.procs);
            let killed = crate::orphans::sweep(|pid| {
                pids.get(&pid)
                    .and_then(|p| procs.get(p))
                    .is_some_and(|w| w.exit.is_none())
            });
            if !killed.is_empty() {
                crate::warn!(
                    "killed worker descendants that outlived their worker: pids {killed:?}"
                );
            }
        }
    }

    /// A worker process is gone: read what it left in its pipes, drop its
    /// descriptors, tell the core.
    pub(super) fn worker_gone(&mut self, proc: ProcId, mut exit: ExitInfo) {
        self.on_exec_status(proc);
        if let Some((e, transient)) = self.procs.get_mut(&proc).and_then(|w| w.exec_error.take()) {
            // "exit status 127" says less than what the child reported.
            exit.description = e;
            exit.transient = transient;
        }
        // Its last results, then the copies they started: a `Done` that
        // arrived before the death counts before it. While copies out of its
        // arena are still running, the death waits in `WorkerIo::exit`
        // (handled by `on_copied` once the last one is in).
        self.on_results(proc);
        if let Some(w) = self.procs.get_mut(&proc).filter(|w| w.copies_in > 0) {
            w.exit = Some(exit);
            return;
        }
        self.worker_gone_now(proc, exit);
    }

    /// The rest of [`Reactor::worker_gone`], once the worker's copies are in.
    pub(super) fn worker_gone_now(&mut self, proc: ProcId, mut exit: ExitInfo) {
        // What it wrote last is in its pipes even if the exit was noticed
        // first: read it all (the writers are gone, so there is at most a
        // pipe's capacity each; bounded all the same), for its crash text.
        for is_err in [false, true] {
            for _ in 0..GONE_OUTPUT_ROUNDS {
                self.on_output(proc, is_err);
                if !self.output_backlog.contains(&(proc, is_err)) {
                    break;
                }
            }
        }
        self.output_backlog.remove(&(proc, false));
        self.output_backlog.remove(&(proc, true));
        self.suppressing.remove(&proc);
        if let Some(mut w) = self.procs.remove(&proc) {
            self.pids.remove(&w.pid);
            if let Some(n) = w.limiter.finish() {
                log_suppressed(&w.pool, w.slot, n);
            }
            let time_ms = logs::now_ms();
            for (is_err, line) in [(false, &mut w.stdout_line), (true, &mut w.stderr_line)] {
                if !line.is_empty() {
                    w.tail.push(line);
                    let text = String::from_utf8_lossy(line).into_owned();
                    let stream = if is_err {
                        LogStream::Stderr
                    } else {
                        LogStream::Stdout
                    };
                    self.logs.push(&w.pool, w.slot, stream, time_ms, &text);
                    crate::log::worker_line(&w.pool, w.slot, is_err, &text);
                    line.clear();
                }
            }
            let note = format!("pid {} exited: {}", w.pid, exit.description);
            self.logs
                .push(&w.pool, w.slot, LogStream::Daemon, time_ms, &note);
            exit.output_tail = w.tail.text();
            for fd in [&w.jobs, &w.results, &w.stdout, &w.stderr]
                .into_iter()
                .flatten()
            {
                let _ = self
                    .poll
                    .registry()
                    .deregister(&mut SourceFd(&fd.as_raw_fd()));
            }
        }
        self.core.on_exit(proc, exit, Instant::now());
    }
}
