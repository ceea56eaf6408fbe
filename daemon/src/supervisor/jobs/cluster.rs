//! Nodes sharing queues through PostgreSQL (see `store::pg::cluster`): a
//! job submitted here is only stored; every node claims queued jobs for
//! its idle workers, runs them like its own, and its waiters of a job that
//! runs elsewhere hear of its end through the store.
//!
//! What changes in the core when `cluster` is set:
//! - a submit stores the job and keeps nothing (its waiters become remote
//!   waits, `Op::Watch`);
//! - a pool whose local queue runs low (dry, for long jobs) while workers
//!   have room or are busy with short jobs asks the store for jobs
//!   (`Op::Claim`, one demand at a time per pool), and the claimed ones
//!   are queued here;
//! - a job's final row may be refused (fenced: this node was declared
//!   dead meanwhile and the job runs elsewhere): its waiters then wait
//!   for the other node's result;
//! - ids come in blocks from the store (`Op::ReserveIds`).

use super::*;

/// The shared queue's counts in `status` are read again once older.
const COUNTS_FRESH: Duration = Duration::from_secs(1);

/// Ask for the next block of ids when fewer than this are left.
const ID_LOW_WATER: u64 = 1 << 16;

impl Supervisor {
    /// Job ids: the next one to give, taking the reserved block when the
    /// current one is used up; `None` when none is left yet.
    pub(super) fn next_job_id(&mut self) -> Option<u64> {
        if self.jt.next_id >= self.jt.id_end {
            let (start, end) = self.jt.spare_ids.take()?;
            self.jt.next_id = start;
            self.jt.id_end = end;
        }
        let id = self.jt.next_id.max(1);
        self.jt.next_id = id + 1;
        if self.cluster
            && !self.jt.ids_asked
            && self.jt.spare_ids.is_none()
            && self.jt.id_end - self.jt.next_id < ID_LOW_WATER
        {
            self.jt.ids_asked = true;
            self.store(Op::ReserveIds);
        }
        Some(id)
    }

    /// A new block of ids from the store.
    pub fn on_ids(&mut self, start: u64, end: u64) {
        self.jt.ids_asked = false;
        self.jt.spare_ids = Some((start, end));
    }

    /// A client waits for job `id`, which is not (or no longer) here.
    pub(super) fn wait_remote(&mut self, id: u64, waiter: Waiter) {
        let first = !self.jt.remote_waits.contains_key(&id);
        self.jt.remote_waits.entry(id).or_default().push(waiter);
        if first {
            self.store(Op::Watch { id });
        }
    }

    /// Asks the store for up to `room` jobs of `name` (see `claim_ahead`),
    /// unless a demand of the pool is under way.
    pub(super) fn demand(&mut self, name: &str, room: usize) {
        let Some(pool) = self.pools.get_mut(name) else {
            return;
        };
        if !self.cluster || room == 0 || pool.jobs.claiming || pool.paused || pool.removing {
            return;
        }
        pool.jobs.claiming = true;
        let sems = pool
            .config
            .semaphores
            .iter()
            .map(|s| {
                (
                    s.clone(),
                    self.semaphores.get(s).copied().unwrap_or(u32::MAX),
                )
            })
            .collect();
        self.store(Op::Claim {
            pool: name.to_string(),
            max: u32::try_from(room).unwrap_or(u32::MAX),
            sems,
        });
    }

    /// `status --cluster`: the nodes sharing the store.
    pub fn nodes(&mut self, client: ClientId) {
        if !self.cluster {
            return self.reply(
                client,
                Response::Error {
                    kind: ipc_proto::control::ErrorKind::Invalid,
                    message: "this daemon has no cluster: nodes share queues through a PostgreSQL store ([store] url = \"postgres://…\")".into(),
                },
            );
        }
        self.query(Query::Nodes, QueryPurpose::Nodes { client });
    }

    /// Whether nodes share the queues (a PostgreSQL store).
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// `status` on a cluster node: this node's pools and workers, with
    /// `queued` counting the jobs of the shared queue that no node holds
    /// too (if the store cannot answer, this node's alone). Counting is a
    /// scan of the queue's index, so it is done at most once per
    /// [`COUNTS_FRESH`] whoever asks: statuses meanwhile share the last
    /// counts, or wait for the ones being read.
    pub fn status_of_cluster(&mut self, client: ClientId, pool: Option<String>, now: Instant) {
        let report = match self.status(pool.as_deref(), now) {
            Ok(r) => r,
            Err(e) => return self.reply(client, e.into_response()),
        };
        let fresh = self
            .jt
            .queue_counts
            .as_ref()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) < COUNTS_FRESH);
        if fresh {
            return self.reply_status(client, report);
        }
        *self.jt.backlog.entry(client).or_insert(0) += 1;
        self.jt.status_waiting.push((client, report));
        if self.jt.counts_asked.is_none() {
            self.jt.counts_asked = Some(now);
            self.query(Query::QueueCounts, QueryPurpose::Status);
        }
    }

    /// Replies with `report`, its pools' `queued` counting the shared
    /// queue's jobs as last read.
    pub(super) fn reply_status(
        &mut self,
        client: ClientId,
        mut report: ipc_proto::control::StatusReport,
    ) {
        if let Some((_, counts)) = &self.jt.queue_counts {
            for p in &mut report.pools {
                if let Some((_, n)) = counts.iter().find(|(name, _)| *name == p.name) {
                    p.queued += n;
                }
            }
        }
        self.reply(client, Response::Status(report));
    }

    /// `status`: what the store would have the operator know.
    pub fn store_warnings(&mut self, client: ClientId) {
        self.query(Query::Warnings, QueryPurpose::Warnings { client });
    }

    /// Withdraws the pool's held demand, if any (`Op::Claim` of 0).
    pub(in crate::supervisor) fn withdraw_demand(&mut self, name: &str) {
        let Some(pool) = self.pools.get_mut(name) else {
            return;
        };
        if self.cluster && std::mem::take(&mut pool.jobs.claiming) {
            self.store(Op::Claim {
                pool: name.to_string(),
                max: 0,
                sems: Vec::new(),
            });
        }
    }

    /// Jobs the store claimed for this node: queued here, run like any.
    pub fn on_claimed(&mut self, pool: String, jobs: Vec<crate::store::RecoveredJob>) {
        if let Some(p) = self.pools.get_mut(&pool) {
            p.jobs.claiming = false;
            p.jobs.dirty = true;
        }
        for r in jobs {
            let id = r.job.id;
            if self.jt.jobs.contains_key(&id) {
                continue;
            }
            self.admit_queued(r);
            // Its waiters here hear of it as of any local job.
            if let Some(ws) = self.jt.remote_waits.remove(&id) {
                self.jt.waiters.entry(id).or_default().extend(ws);
            }
        }
    }

    /// Watched jobs finished (here or on another node): their documents go
    /// to the clients waiting here.
    pub fn on_remote_done(&mut self, ids: Vec<u64>) {
        for id in ids {
            let Some(waiters) = self.jt.remote_waits.remove(&id) else {
                continue;
            };
            let query = Query::Job {
                id,
                owner: None,
                output: waiters.iter().any(|w| w.with_output),
            };
            self.query(query, QueryPurpose::Remote { id, waiters });
        }
    }

    /// The answer to a [`QueryPurpose::Remote`]: each waiter gets the
    /// document (with the output if it asked for it).
    pub(super) fn remote_doc(&mut self, id: u64, waiters: Vec<Waiter>, doc: Option<JobDoc>) {
        for w in waiters {
            match &doc {
                Some(d) if !d.state.is_terminal() => {
                    // Requeued (its node died) before it ended: wait on.
                    self.wait_remote(id, w);
                    continue;
                }
                Some(d) => {
                    let mut d = d.clone();
                    if !w.with_output {
                        d.output = None;
                    }
                    self.reply(w.client, Response::Job(d));
                }
                None => self.reply(w.client, not_found_job(id)),
            }
            if let Some(g) = w.group {
                self.group_done(g);
            }
        }
    }

    /// Another node asked this one to cancel jobs it holds (its client was
    /// checked there): each is cancelled as a local `cancel` would.
    pub fn on_remote_cancel(&mut self, ids: Vec<u64>, now: Instant) {
        for id in ids {
            if !self.jt.jobs.contains_key(&id) {
                continue;
            }
            let what = match self.cancel_here(id, now) {
                Ok(m) | Err(m) => m,
            };
            self.log(Level::Info, format!("cancel from another node: {what}"));
        }
    }

    /// Final rows the store refused: this node was declared dead while it
    /// ran them, and they run elsewhere; their waiters wait for that.
    pub fn on_fenced(&mut self, ids: Vec<u64>) {
        for id in ids {
            self.log(
                Level::Warn,
                format!("job {id}: this node's result was refused (the job was given to another node while this one was cut off); its waiters get the other node's result"),
            );
            if let Some(ws) = self.jt.waiters.remove(&id) {
                for w in ws {
                    self.wait_remote(id, w);
                }
            }
        }
    }
}
