//! Submits: checks, the in-memory job, its durable insert, and the
//! answers of the store about inserts (durable, failed).

use super::*;

impl Supervisor {
    /// A client submits a job. On success the `Submitted` reply follows
    /// once the job is durable.
    pub fn submit(
        &mut self,
        client: ClientId,
        pool_name: &str,
        input: impl Into<SubmitInput>,
        options: JobOptions,
        wait: bool,
        now: Instant,
    ) {
        let extra = SubmitExtra::default();
        self.submit_with(client, pool_name, input, options, wait, extra, now)
    }

    /// [`Self::submit`] with the choices of a `SubmitWith`.
    #[allow(clippy::too_many_arguments)]
    pub fn submit_with(
        &mut self,
        client: ClientId,
        pool_name: &str,
        input: impl Into<SubmitInput>,
        options: JobOptions,
        wait: bool,
        extra: SubmitExtra,
        now: Instant,
    ) {
        let input = input.into();
        if let Err(e) = self.try_submit(client, pool_name, input, options, wait, extra, now) {
            self.refuse_submit(client, e);
        }
    }

    /// Refuses a submit, answering in order with the client's earlier
    /// submits (whose answers may wait for durability).
    pub fn refuse_submit(&mut self, client: ClientId, e: CtlError) {
        {
            let resp = e.into_response();
            if self.jt.pending.is_empty() {
                self.reply(client, resp);
            } else {
                let seq = self.jt.store_seq;
                self.jt.pending.push_back((
                    seq,
                    Pending::Reply {
                        client,
                        resp: Box::new(resp),
                    },
                ));
            }
        }
    }

    /// Whether an input of `len` bytes can be given to a worker of
    /// `pool_name` (checked before a large input is even read).
    pub fn check_input_len(&self, pool_name: &str, len: u64) -> Result<(), CtlError> {
        let Some(pool) = self.pools.get(pool_name) else {
            return Err(self.unknown_pool(pool_name));
        };
        // An input up to `inline_limit` travels inline in a `Job` frame: it
        // must fit in one, with room for the frame's other fields. A larger
        // one goes through the worker's arena.
        let max_input = (ipc_proto::MAX_FRAME_LEN - MAX_FRAME_HEADROOM) as u64;
        if len <= pool.config.inline_limit && len > max_input {
            return Err(CtlError::Invalid(format!(
                "input of {len} bytes is over the limit of {max_input} bytes for inline payloads; lower pool {pool_name}'s inline_limit so that it goes through shared memory"
            )));
        }
        let room = arena_input_capacity(pool.config.shm_size);
        if may_use_arena(len, pool.config.inline_limit) && len > room {
            return Err(CtlError::Invalid(format!(
                "input of {len} bytes does not fit pool {pool_name}'s shared-memory input area ({room} bytes, half of shm_size); raise shm_size"
            )));
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn try_submit(
        &mut self,
        client: ClientId,
        pool_name: &str,
        input: SubmitInput,
        options: JobOptions,
        wait: bool,
        extra: SubmitExtra,
        now: Instant,
    ) -> Result<(), CtlError> {
        let (input, source) = match input {
            SubmitInput::Bytes(b) => (b, None),
            SubmitInput::Source(s) => (Arc::default(), Some(s)),
        };
        if self.shutting_down {
            return Err(CtlError::Rejected(
                "the daemon is shutting down; submit again once it is back".into(),
            ));
        }
        if !self.pools.contains_key(pool_name) {
            return Err(self.unknown_pool(pool_name));
        }
        let pool = self.pools.get_mut(pool_name).expect("checked");
        if pool.removing {
            return Err(CtlError::Rejected(format!(
                "pool {pool_name} is being removed"
            )));
        }
        // A client that waits is told at once (`PoolFailed`, after its
        // `Submitted`) and its job runs once the pool is fixed; one that
        // does not wait would not hear of it: refused.
        if pool.state == PoolState::Failed && !wait {
            return Err(CtlError::Rejected(format!(
                "pool {pool_name} has failed ({}); fix its command and run `jobvisorctl reload` (or fix the cause and run `jobvisorctl restart {pool_name}`), then retry",
                pool.failure.as_deref().unwrap_or("crash loop")
            )));
        }
        let cap = pool.config.queue_capacity;
        if pool.jobs.queued >= cap {
            return Err(CtlError::Rejected(format!(
                "pool {pool_name} queue is full ({cap} jobs waiting, queue_capacity = {cap}); retry later or raise queue_capacity"
            )));
        }
        let len = source.as_ref().map_or(input.len() as u64, |s| s.len);
        self.check_input_len(pool_name, len)?;
        let pool = self.pools.get_mut(pool_name).expect("checked");
        if options.max_attempts == Some(0) {
            return Err(CtlError::Invalid(
                "--max-attempts must be at least 1".into(),
            ));
        }
        if options.timeout_ms == Some(0) {
            return Err(CtlError::Invalid("--timeout must be above 0".into()));
        }
        let max_attempts = options.max_attempts.unwrap_or(pool.config.max_attempts);
        let timeout = options
            .timeout_ms
            .map(Duration::from_millis)
            .or(pool.config.timeout);
        let in_memory = match extra.payloads {
            Some(mode) => mode == crate::config::PayloadMode::Memory,
            None => self.pool_keeps_payloads_in_memory(pool_name),
        };
        if self.cluster && in_memory {
            return Err(CtlError::Invalid(format!(
                "payloads = \"memory\" (pool {pool_name}'s, or this submit's) cannot be used with a PostgreSQL store: the job may run on another node, which could not get its input; use durable payloads"
            )));
        }
        let Some(id) = self.next_job_id() else {
            return Err(CtlError::Rejected(
                "no job ids are reserved for this daemon yet (its store is not answering); retry in a moment".into(),
            ));
        };
        let created_ms = self.wall(now);
        let owner = self.viewer(client).uid;
        let len = input.len() as u64; // 0 for a file input
        if extra.output_buffer.is_some() && !wait {
            return Err(CtlError::Invalid(
                "an output buffer needs a submit that waits for the result".into(),
            ));
        }
        // Only where outputs stay in memory; elsewhere they go to the store.
        let output_buffer = extra.output_buffer.filter(|_| in_memory);
        let memory =
            in_memory && (source.is_some() || len >= crate::store::FILE_PAYLOAD_MIN as u64);
        let files = usize::from(memory && source.is_some()) + usize::from(output_buffer.is_some());
        if files > 0 && self.jt.held_sources.get() + files > MAX_HELD_SOURCES {
            return Err(CtlError::Rejected(format!(
                "pool {pool_name} has payloads = \"memory\" and the daemon already holds the input files of {MAX_HELD_SOURCES} of its jobs; retry once some have ended"
            )));
        }
        if memory && self.jt.memory_bytes + len > MEMORY_BYTES_BUDGET {
            return Err(CtlError::Rejected(format!(
                "pool {pool_name} has payloads = \"memory\" and the daemon already holds {} of large inputs sent as bytes; retry once some jobs have ended, or pass large inputs as a descriptor (a file or memfd)",
                crate::config::show_size(self.jt.memory_bytes)
            )));
        }
        // Over the budget, an input that can go through the pool's arena is
        // kept in a payload file once stored (see QUEUED_INPUT_BUDGET).
        if !self.payload_files
            && !self.cluster
            && !memory
            && self.jt.mem_inputs + len > STORE_INPUT_BUDGET
        {
            return Err(CtlError::Rejected(format!(
                "the daemon already holds {} of inputs of queued and running jobs (a PostgreSQL store keeps them in memory until their jobs end, at most {}); retry once some have ended",
                crate::config::show_size(self.jt.mem_inputs),
                crate::config::show_size(STORE_INPUT_BUDGET)
            )));
        }
        let spill = !memory
            && self.payload_files
            && len >= SPILL_MIN
            && self.jt.mem_inputs + len > QUEUED_INPUT_BUDGET
            && len <= arena_input_capacity(self.pools[pool_name].config.shm_size);
        if !self.cluster {
            self.jt.mem_inputs += len;
        }
        if memory {
            self.jt.memory_bytes += len;
        }
        let op = Op::Insert(NewJob {
            id,
            pool: pool_name.to_string(),
            priority: options.priority,
            key: options.key.clone(),
            max_attempts,
            timeout_ms: timeout.map(|t| t.as_millis() as u64),
            input: input.clone(),
            input_source: source.clone(),
            created_ms,
            owner,
            spill,
            memory,
        });
        let seq = self.store(op);
        self.jt
            .pending
            .push_back((seq, Pending::Insert { id, client, wait }));
        if !self.cluster {
            // (With a cluster, it is stored only: whichever node has room
            // claims it.)
            let job = Job {
                id,
                owner,
                spilled: spill,
                pool: pool_name.to_string(),
                priority: options.priority,
                key: options.key,
                max_attempts,
                timeout,
                input,
                input_file: source.as_ref().map(|s| s.len),
                held: (memory && source.is_some()).then(|| HeldSource::new(&self.jt.held_sources)),
                outputs_in_memory: in_memory,
                input_shareable: extra.input_shareable && memory && source.is_some(),
                held_buffer: output_buffer
                    .is_some()
                    .then(|| HeldSource::new(&self.jt.held_sources)),
                output_buffer,
                input_source: source.map(|s| s.file),
                memory,
                attempts: Vec::new(),
                created_ms,
                phase: JobPhase::Queued,
                cancel_requested: false,
                holds: false,
                suspect: false,
                unstored: false,
                taken_back: false,
            };
            self.queue_submitted(pool_name, job);
        }
        self.event(
            now,
            "job_queued",
            Some(pool_name),
            None,
            Some((id, JobState::Queued)),
            None,
        );
        Ok(())
    }

    /// A submitted job, not stored yet, into the table and its pool's queue.
    fn queue_submitted(&mut self, pool_name: &str, job: Job) {
        let (id, priority) = (job.id, job.priority);
        self.jt.jobs.insert(id, job);
        // Dispatched at once, before the insert is durable: the client is
        // acknowledged (and hears of the result) only after it is, but the
        // work need not wait for the fsync, and a job that finishes within
        // one commit window costs a single row write (the store merges the
        // insert with the final update). If the daemon dies before the
        // commit, the client never got an id: nothing accepted is lost, the
        // job may merely have run once unacknowledged (at-least-once).
        self.jt.tail_order += 1;
        let entry = QEntry {
            priority,
            order: Reverse(self.jt.tail_order),
            id,
        };
        self.enqueue_entry(pool_name, entry);
    }

    /// Every store op numbered `<= upto` is durable.
    pub fn on_durable(&mut self, upto: u64) {
        while self.jt.pending.front().is_some_and(|(s, _)| *s <= upto) {
            let (_, p) = self.jt.pending.pop_front().expect("checked");
            match p {
                Pending::Insert { id, client, wait } => self.insert_durable(id, client, wait),
                Pending::Final { id } => self.final_durable(id),
                Pending::Reply { client, resp } => self.reply(client, *resp),
            }
        }
    }

    /// A store batch ending at `upto` failed: its inserts were not stored.
    /// Final rows are retried by the store and acknowledged later.
    pub fn on_store_failed(&mut self, upto: u64, lost: &[u64], error: &str, _now: Instant) {
        let lost: std::collections::HashSet<u64> = lost.iter().copied().collect();
        let mut keep = VecDeque::new();
        while let Some((seq, p)) = self.jt.pending.pop_front() {
            match p {
                Pending::Insert { id, client, .. } if seq <= upto && lost.contains(&id) => {
                    self.forget_unstored(id);
                    self.reply(
                        client,
                        Response::Error {
                            kind: ipc_proto::control::ErrorKind::Rejected,
                            message: format!(
                                "the job could not be stored ({error}); nothing was queued, submit it again once the store is writable"
                            ),
                        },
                    );
                }
                Pending::Reply { client, resp } if seq <= upto => self.reply(client, *resp),
                other => keep.push_back((seq, other)),
            }
        }
        self.jt.pending = keep;
        self.log(Level::Error, format!("job store: {error}"));
    }

    /// Inserts that failed alone (their input could not be stored; the
    /// rest of their batch goes on): each client hears why, in order with
    /// its other replies, and the jobs are dropped.
    pub fn on_inserts_failed(&mut self, failed: Vec<(u64, crate::store::InsertFailure)>) {
        use crate::store::InsertFailure;
        for (id, why) in failed {
            let (kind, message) = match why {
                InsertFailure::Input(m) => (ipc_proto::control::ErrorKind::Invalid, m),
                InsertFailure::Store(m) => (ipc_proto::control::ErrorKind::Rejected, m),
            };
            let pending = self.jt.pending.iter_mut().find_map(|(_, p)| match *p {
                Pending::Insert { id: i, client, .. } if i == id => Some((p, client)),
                _ => None,
            });
            if let Some((p, client)) = pending {
                // Its `Submitted` becomes the error, in the same place.
                *p = Pending::Reply {
                    client,
                    resp: Box::new(Response::Error { kind, message }),
                };
            }
            self.forget_unstored(id);
        }
    }

    /// A job whose insert failed: it was never acknowledged, so it is
    /// dropped (a running one when its worker is done with it).
    fn forget_unstored(&mut self, id: u64) {
        let Some(job) = self.jt.jobs.get_mut(&id) else {
            return;
        };
        match job.phase {
            JobPhase::Queued => {
                let pool = job.pool.clone();
                self.jt.mem_inputs -= job.input.len() as u64;
                if job.memory {
                    self.jt.memory_bytes -= job.input.len() as u64;
                }
                self.jt.jobs.remove(&id);
                if let Some(p) = self.pools.get_mut(&pool) {
                    p.jobs.queued = p.jobs.queued.saturating_sub(1);
                }
            }
            JobPhase::Running { .. } => job.unstored = true,
            JobPhase::Finishing(_) => {}
        }
    }
}
