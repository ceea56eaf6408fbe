//! Dispatch: which queued job goes to which worker and when (prefetch,
//! levelling, take-back), the start of an attempt, and a job leaving its
//! worker (keys, semaphores, requeues).

use super::*;

impl Supervisor {
    /// Hands queued jobs of `name` to its ready workers, then, with adaptive
    /// prefetch, takes back jobs waiting behind a long-running one for a
    /// worker left idle.
    pub(super) fn dispatch(&mut self, name: &str, now: Instant) {
        if self.pools.get(name).is_some_and(|p| p.paused) {
            return;
        }
        self.dispatch_levelled(name, now);
        self.take_back(name, now);
        if self.cluster {
            self.claim_ahead(name, now);
        }
    }

    /// Cluster: asks the store for jobs of `name` once its local queue is
    /// down to half of what its workers should find here: about
    /// [`CLAIM_WINDOW`] of work each (short jobs: many per round trip; long
    /// ones: what fits), or at least the room they have. With short jobs
    /// the busy workers count too, so the next claim is under way while
    /// they still have work rather than once they run dry; jobs longer than
    /// half the window are claimed only for room (not held here while
    /// another node may have idle workers).
    fn claim_ahead(&mut self, name: &str, now: Instant) {
        // A demand under way (or none allowed): nothing to size.
        let pool = &self.pools[name];
        if pool.jobs.claiming || pool.paused || pool.removing {
            return;
        }
        let prefetch = self.prefetch_now(name);
        let slots: Vec<(usize, usize)> = (0..self.pools[name].slots.len())
            .map(|idx| self.room_for_jobs(name, idx, prefetch, now))
            .collect();
        let room: usize = slots.iter().map(|(r, _)| r).sum();
        let per_worker = match self.pools[name].jobs.mean_run_ns {
            Some(ns) if ns > 0.0 => {
                ((CLAIM_WINDOW.as_nanos() as f64 / ns) as usize).clamp(1, CLAIM_MAX_PER_WORKER)
            }
            _ => CLAIM_AHEAD,
        };
        let short = self.pools[name]
            .jobs
            .mean_run_ns
            .is_some_and(|ns| ns < CLAIM_WINDOW.as_nanos() as f64 / 2.0);
        let workers = slots
            .iter()
            .filter(|(r, n)| *r > 0 || (short && *n > 0))
            .count();
        let wanted = room.max(workers * per_worker);
        let queued = self.pools[name].jobs.queue.len();
        if queued == 0 || queued * 2 < wanted {
            self.demand(name, wanted.saturating_sub(queued));
        }
    }

    /// Jobs in flight per worker in pool `name` now: its `prefetch`, or the
    /// adaptive depth (see [`ADAPTIVE_PREFETCH_MAX`]).
    pub(in crate::supervisor) fn prefetch_now(&self, name: &str) -> usize {
        let pool = &self.pools[name];
        match pool.config.prefetch {
            Some(n) => n as usize,
            None => pool.jobs.adaptive.max(1) as usize,
        }
    }

    /// How many more jobs worker `idx` of `name` may be sent now (0 when it
    /// is not ready, runs a suspect alone, or, with adaptive prefetch, its
    /// running job has run [`TAKE_BACK_AFTER`]), and its current count.
    pub(super) fn room_for_jobs(
        &self,
        name: &str,
        idx: usize,
        prefetch: usize,
        now: Instant,
    ) -> (usize, usize) {
        let pool = &self.pools[name];
        let SlotState::Running(p) = &pool.slots[idx].state else {
            return (0, 0);
        };
        let n = p.inflight.len();
        if !matches!(p.phase, Phase::Ready) || p.solo {
            return (0, n);
        }
        let long_running = pool.config.prefetch.is_none()
            && p.head_since
                .is_some_and(|t| now.saturating_duration_since(t) >= TAKE_BACK_AFTER);
        let mut limit = if long_running { 1 } else { prefetch };
        // A worker is sent no job beyond its max_jobs_per_worker: it is
        // recycled after that many, not after those it was sent ahead.
        let max_jobs = pool.config.max_jobs_per_worker;
        if max_jobs > 0 {
            limit = limit.min(max_jobs.saturating_sub(p.jobs_handled) as usize);
        }
        (limit.saturating_sub(n), n)
    }

    /// Hands queued jobs of `name` to its ready workers up to the prefetch
    /// depth each, always to the one with the fewest in flight (ties: in
    /// slot order), so an idle worker is served first and equal workers
    /// round-robin.
    pub(super) fn dispatch_levelled(&mut self, name: &str, now: Instant) {
        let Some(pool) = self.pools.get(name) else {
            return;
        };
        if pool.removing || pool.jobs.queue.is_empty() {
            return;
        }
        let prefetch = self.prefetch_now(name);
        let mut ready: BinaryHeap<Reverse<(usize, usize)>> = (0..pool.slots.len())
            .filter_map(|idx| {
                let (room, n) = self.room_for_jobs(name, idx, prefetch, now);
                (room > 0).then_some(Reverse((n, idx)))
            })
            .collect();
        // Workers the head job cannot go to (it must run alone, or its input
        // does not fit their arena): asked again once another job is taken.
        let mut passed = Vec::new();
        while let Some(Reverse((n, idx))) = ready.pop() {
            let (empty, room, fds) = match &self.pools[name].slots[idx].state {
                SlotState::Running(p) => {
                    (p.inflight.is_empty(), p.arena.largest_free(), p.takes_fds)
                }
                _ => continue,
            };
            match self.next_runnable(name, empty, room, fds) {
                Next::None => return,
                Next::NeedsEmptyWorker => passed.push(Reverse((n, idx))),
                Next::Unrunnable(id, error) => {
                    self.finish(id, JobState::Failed, None, Some(error), now);
                    ready.push(Reverse((n, idx)));
                    ready.extend(passed.drain(..));
                }
                Next::Job(id) => {
                    self.assign(name, idx, id, now);
                    let (room, n) = self.room_for_jobs(name, idx, prefetch, now);
                    if room > 0 {
                        ready.push(Reverse((n, idx)));
                    }
                    ready.extend(passed.drain(..));
                }
            }
        }
    }

    /// Adaptive prefetch: if a ready worker of `name` has no job in hand,
    /// asks back (`Cancel`) the jobs waiting unstarted behind the running
    /// job of a busy worker once that job has run [`TAKE_BACK_AFTER`] (or
    /// arms [`PoolJobs::take_back_at`] for when it will have). At most as
    /// many as the idle workers may hold; the longest-running workers' last
    /// jobs first. Their answers come back to [`Self::job_result`], which
    /// requeues them at the head of the queue, uncharged, for the idle
    /// workers to take.
    pub(super) fn take_back(&mut self, name: &str, now: Instant) {
        let Some(pool) = self.pools.get_mut(name) else {
            return;
        };
        pool.jobs.take_back_at = None;
        if pool.removing || pool.config.prefetch.is_some() {
            return;
        }
        let ready = |p: &Proc| matches!(p.phase, Phase::Ready);
        let idle = pool
            .slots
            .iter()
            .filter(
                |s| matches!(&s.state, SlotState::Running(p) if ready(p) && p.inflight.is_empty()),
            )
            .count();
        if idle == 0 {
            return;
        }
        let mut budget = idle * pool.jobs.adaptive.max(1) as usize;
        // (since when its front job runs, slot index) of workers with jobs
        // waiting behind their running one.
        let mut busy: Vec<(Instant, usize)> = Vec::new();
        let mut later: Option<Instant> = None;
        for (idx, slot) in pool.slots.iter().enumerate() {
            let SlotState::Running(p) = &slot.state else {
                continue;
            };
            let waiting = p.inflight.iter().skip(1).any(|id| {
                self.jt
                    .jobs
                    .get(id)
                    .is_some_and(|j| !j.taken_back && !j.cancel_requested)
            });
            let Some(since) = p.head_since.filter(|_| ready(p) && waiting) else {
                continue;
            };
            let due = since + TAKE_BACK_AFTER;
            if due <= now {
                busy.push((since, idx));
            } else {
                later = Some(later.map_or(due, |t: Instant| t.min(due)));
            }
        }
        pool.jobs.take_back_at = later;
        busy.sort();
        for (since, idx) in busy {
            if budget == 0 {
                break;
            }
            let SlotState::Running(p) = &self.pools[name].slots[idx].state else {
                continue;
            };
            let (proc, slot_id) = (p.id, self.pools[name].slots[idx].id);
            let mut ids = Vec::new();
            for &id in p.inflight.iter().skip(1).rev() {
                if budget == 0 {
                    break;
                }
                let Some(job) = self.jt.jobs.get_mut(&id) else {
                    continue;
                };
                if job.taken_back || job.cancel_requested {
                    continue;
                }
                job.taken_back = true;
                budget -= 1;
                ids.push(id);
            }
            if ids.is_empty() {
                continue;
            }
            self.log(
                Level::Debug,
                format!(
                    "pool {name}: taking back {} jobs waiting on worker {slot_id} behind a job running for {} ms, for {idle} idle workers",
                    ids.len(),
                    now.saturating_duration_since(since).as_millis()
                ),
            );
            for id in ids {
                self.actions.push_back(Action::Send {
                    proc,
                    msg: ToWorker::Cancel { id },
                });
            }
        }
    }

    /// Adaptive prefetch: counts a job's run time into its pool's mean and
    /// adjusts the pool's depth (see [`ADAPTIVE_PREFETCH_MAX`]).
    pub(super) fn record_run_time(&mut self, name: &str, run: Duration) {
        let Some(pool) = self.pools.get_mut(name) else {
            return;
        };
        if pool.config.prefetch.is_some() {
            return;
        }
        let x = run.min(RUN_TIME_CAP).as_nanos() as f64;
        let mean = match pool.jobs.mean_run_ns {
            None => x,
            Some(m) => m + (x - m) * RUN_TIME_WEIGHT,
        };
        pool.jobs.mean_run_ns = Some(mean);
        let current = pool.jobs.adaptive.max(1);
        let next = adaptive_depth(current, mean);
        pool.jobs.adaptive = next;
        if next != current {
            self.log(
                Level::Debug,
                format!(
                    "pool {name}: adaptive prefetch {current} -> {next} (mean job run time {:.0} us)",
                    mean / 1000.0
                ),
            );
            if next > current {
                if let Some(p) = self.pools.get_mut(name) {
                    p.jobs.dirty = true;
                }
            }
        }
    }

    /// Pops the next job that may run now: skips stale entries, parks jobs
    /// whose key is busy, and stops when a semaphore of the pool is full.
    /// `room` is the largest free input slot of the worker asking (only
    /// inputs over `inline_limit` need one).
    pub(super) fn next_runnable(
        &mut self,
        name: &str,
        worker_empty: bool,
        room: u64,
        fds: bool,
    ) -> Next {
        let inline_limit = self.pools[name].config.inline_limit;
        let capacity = arena_input_capacity(self.pools[name].config.shm_size);
        let sems = self.pools[name].config.semaphores.clone();
        for s in &sems {
            let limit = self.semaphores.get(s).copied().unwrap_or(u32::MAX);
            if self.jt.sem_used.get(s).copied().unwrap_or(0) >= limit {
                return Next::None;
            }
        }
        loop {
            let Some(queue) = self.pools.get_mut(name).map(|p| &mut p.jobs.queue) else {
                return Next::None;
            };
            let Some(&entry) = queue.peek() else {
                return Next::None;
            };
            let live = self
                .jt
                .jobs
                .get(&entry.id)
                .filter(|j| matches!(j.phase, JobPhase::Queued) && j.pool == name);
            match live {
                None => {
                    queue.pop();
                    continue;
                }
                Some(j) if j.through_arena(inline_limit) && j.input_len() > capacity => {
                    let error = format!(
                        "input of {} bytes does not fit pool {name}'s shared-memory input area ({capacity} bytes, half of shm_size); raise shm_size and submit it again",
                        j.input_len()
                    );
                    queue.pop();
                    return Next::Unrunnable(entry.id, error);
                }
                Some(j) if j.suspect && !worker_empty => return Next::NeedsEmptyWorker,
                // Its input goes through shared memory and this worker's
                // arena is full of in-flight inputs: back off (another
                // worker, or this one once a job finishes).
                Some(j) if j.needs_arena(inline_limit, fds) && j.input_len() > room => {
                    return Next::NeedsEmptyWorker
                }
                Some(_) => {
                    queue.pop();
                }
            }
            let job = &self.jt.jobs[&entry.id];
            if let Some(k) = &job.key {
                if self.jt.running_keys.contains_key(k) {
                    self.jt
                        .parked
                        .entry(k.clone())
                        .or_default()
                        .push_back((name.to_string(), entry));
                    continue;
                }
            }
            return Next::Job(entry.id);
        }
    }

    pub(super) fn assign(&mut self, name: &str, idx: usize, id: u64, now: Instant) {
        let wall = self.wall(now);
        let inline_limit = self.pools[name].config.inline_limit;
        let sems = self.pools[name].config.semaphores.clone();
        for s in &sems {
            *self.jt.sem_used.entry(s.clone()).or_default() += 1;
        }
        let pool = self.pools.get_mut(name).expect("exists");
        pool.jobs.queued = pool.jobs.queued.saturating_sub(1);
        pool.jobs.running += 1;
        let slot = &mut pool.slots[idx];
        let slot_id = slot.id;
        let SlotState::Running(proc) = &mut slot.state else {
            return;
        };
        let job = self.jt.jobs.get_mut(&id).expect("queued job exists");
        if let Some(k) = &job.key {
            self.jt.running_keys.insert(k.clone(), id);
        }
        job.holds = true;
        job.phase = JobPhase::Running { proc: proc.id };
        let n = job.attempts.len() as u32 + 1;
        job.attempts.push(Attempt {
            n,
            worker: slot_id,
            pid: proc.pid.unwrap_or(0),
            started_ms: wall,
            ended_ms: None,
            outcome: None,
            error: None,
        });
        if proc.inflight.is_empty() {
            proc.head_deadline = job.timeout.map(|t| now + t);
            proc.head_since = Some(now);
        }
        job.taken_back = false;
        proc.inflight.push_back(id);
        if job.suspect {
            proc.solo = true;
        }
        let mut fds = Vec::new();
        let input = if job.input_by_fd(proc.takes_fds) {
            let file = job.input_source.clone().expect("checked by input_by_fd");
            fds.push(super::PassedFd(file));
            Payload::Fd {
                len: job.input_len(),
            }
        } else if job.through_arena(inline_limit) {
            let len = job.input_len();
            // Checked by `next_runnable`: the slot exists.
            let slot = proc.arena.alloc(len).expect("room checked before popping");
            let payload = slot.payload();
            self.actions.push_back(match job.input_file {
                Some(len) => Action::WriteArenaFromFile {
                    proc: proc.id,
                    offset: slot.offset(),
                    job: id,
                    len,
                    source: job
                        .input_source
                        .clone()
                        .map(|file| crate::store::InputSource { file, len }),
                },
                None => Action::WriteArena {
                    proc: proc.id,
                    offset: slot.offset(),
                    data: job.input.clone(),
                },
            });
            proc.slots.push((id, slot));
            payload
        } else {
            Payload::Inline(Bytes(job.input.to_vec()))
        };
        let wire = WireJob {
            id,
            attempt: n,
            deadline_ms: job.timeout.map(|t| wall + t.as_millis() as u64),
            input,
        };
        // A worker that takes descriptors writes a large output straight
        // into the client's buffer.
        let buffer = job.output_buffer.clone().filter(|_| proc.takes_fds);
        let msg = match buffer {
            Some(b) => {
                fds.push(super::PassedFd(b));
                ToWorker::JobOut(wire)
            }
            None => ToWorker::Job(wire),
        };
        let pid = proc.pid;
        let proc_id = proc.id;
        self.actions.push_back(if fds.is_empty() {
            Action::Send { proc: proc_id, msg }
        } else {
            Action::SendFds {
                proc: proc_id,
                msg,
                fds,
            }
        });
        // The `running` row is written only if the job is still running a
        // moment later: most jobs finish first, and their final row is then
        // the only write (see RUNNING_PERSIST_DELAY).
        self.jt
            .unpersisted
            .push_back((now + RUNNING_PERSIST_DELAY, id, n));
        self.event(
            now,
            "job_started",
            Some(name),
            Some((slot_id, pid)),
            Some((id, JobState::Running)),
            None,
        );
    }

    /// Removes and returns a worker's in-flight jobs.
    pub(super) fn take_inflight(&mut self, name: &str, idx: usize) -> Vec<u64> {
        match &mut self.pools.get_mut(name).expect("exists").slots[idx].state {
            SlotState::Running(p) => {
                p.head_deadline = None;
                p.head_since = None;
                p.solo = false;
                p.inflight.drain(..).collect()
            }
            _ => Vec::new(),
        }
    }

    pub(super) fn end_attempt(
        &mut self,
        id: u64,
        outcome: Outcome,
        error: Option<String>,
        now: Instant,
    ) {
        let wall = self.wall(now);
        if let Some(a) = self
            .jt
            .jobs
            .get_mut(&id)
            .and_then(|j| j.attempts.last_mut())
        {
            a.ended_ms = Some(wall);
            a.outcome = Some(outcome);
            a.error = error;
        }
    }

    /// The job leaves its worker: release key and semaphores, fix counters.
    pub(super) fn leave_worker(&mut self, id: u64) {
        let Some(job) = self.jt.jobs.get_mut(&id) else {
            return;
        };
        if !job.holds {
            return;
        }
        job.holds = false;
        let pool_name = job.pool.clone();
        let key = job.key.clone();
        if let Some(p) = self.pools.get_mut(&pool_name) {
            p.jobs.running = p.jobs.running.saturating_sub(1);
            p.jobs.dirty = true;
        }
        if let Some(k) = key {
            if self.jt.running_keys.get(&k) == Some(&id) {
                self.jt.running_keys.remove(&k);
                if let Some(parked) = self.jt.parked.remove(&k) {
                    for (pool, entry) in parked {
                        if let Some(p) = self.pools.get_mut(&pool) {
                            p.jobs.queue.push(entry);
                            p.jobs.dirty = true;
                        } else {
                            self.jt.orphans.entry(pool).or_default().push(entry);
                        }
                    }
                }
            }
        }
        let sems = self
            .pools
            .get(&pool_name)
            .map(|p| p.config.semaphores.clone())
            .unwrap_or_default();
        for s in &sems {
            if let Some(u) = self.jt.sem_used.get_mut(s) {
                *u = u.saturating_sub(1);
            }
            // Every pool sharing the semaphore may now proceed.
            for p in self.pools.values_mut() {
                if p.config.semaphores.contains(s) {
                    p.jobs.dirty = true;
                }
            }
        }
    }

    /// Back to the head of the queue if attempts remain, else `final_state`.
    pub(super) fn retry_or_finish(
        &mut self,
        id: u64,
        final_state: JobState,
        error: String,
        now: Instant,
    ) {
        let Some(job) = self.jt.jobs.get(&id) else {
            return;
        };
        if job.cancel_requested {
            self.finish(id, JobState::Cancelled, None, Some("cancelled".into()), now);
            return;
        }
        if (job.attempts.len() as u32) < job.max_attempts {
            self.requeue_head(id);
        } else {
            let error = if final_state == JobState::Dead {
                format!("lost on all {} attempts; last: {error}", job.attempts.len())
            } else {
                error
            };
            self.finish(id, final_state, None, Some(error), now);
        }
    }

    pub(super) fn requeue_head(&mut self, id: u64) {
        self.jt.head_order -= 1;
        let order = self.jt.head_order;
        let Some(job) = self.jt.jobs.get_mut(&id) else {
            return;
        };
        job.phase = JobPhase::Queued;
        job.taken_back = false;
        let entry = QEntry {
            priority: job.priority,
            order: Reverse(order),
            id,
        };
        let pool = job.pool.clone();
        let update = JobUpdate::progress(id, JobState::Queued, job.attempts.clone());
        self.store(Op::Update(update));
        self.enqueue_entry(&pool, entry);
        // Back in the queue of a pool that failed meanwhile: its waiters
        // cannot expect it soon.
        let waiting: Vec<ClientId> = self
            .jt
            .waiters
            .get(&id)
            .map(|ws| ws.iter().map(|w| w.client).collect())
            .unwrap_or_default();
        if !waiting.is_empty() {
            self.tell_pool_failed(&pool, Some(waiting), false);
        }
    }

    /// A prefetched job that never started goes back without an attempt.
    pub(super) fn requeue_unstarted(&mut self, id: u64) {
        if let Some(job) = self.jt.jobs.get_mut(&id) {
            job.attempts.pop();
        }
        self.leave_worker(id);
        self.requeue_head(id);
    }
}
