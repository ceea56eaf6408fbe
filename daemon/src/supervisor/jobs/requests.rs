//! Clients' requests about jobs: the answers of store queries, `wait`,
//! `result`, `jobs`, `cancel`, and who a client is.

use super::*;

impl Supervisor {
    /// The answer to a store query.
    pub fn on_query_result(&mut self, token: u64, result: Result<QueryResult, String>) {
        let Some(purpose) = self.jt.queries.remove(&token) else {
            return;
        };
        self.backlog_sub(purpose.client());
        let (purpose, result) = match (result, purpose) {
            (Ok(r), p) => (p, r),
            // The store is out of reach: this node's own figures still.
            (Err(_), QueryPurpose::Status) => {
                self.jt.counts_asked = None;
                for (client, report) in std::mem::take(&mut self.jt.status_waiting) {
                    self.backlog_sub(client);
                    self.reply(client, Response::Status(report));
                }
                return;
            }
            (Err(e), purpose) => {
                let client = purpose.client();
                self.reply(
                    client,
                    Response::Error {
                        kind: ipc_proto::control::ErrorKind::Failed,
                        message: format!("reading the job store failed: {e}"),
                    },
                );
                return;
            }
        };
        // A job whose output is a payload file: the document comes without
        // it (a `wait` or `cancel` needs none; `result` sends the file).
        let (result, output_file) = match result {
            QueryResult::JobWithOutputFile(doc, len) => (QueryResult::Job(Some(doc)), Some(len)),
            r => (r, None),
        };
        match (purpose, result) {
            (QueryPurpose::Wait { client, group, id }, QueryResult::Job(doc)) => {
                if self.cluster && doc.as_ref().is_some_and(|d| !d.state.is_terminal()) {
                    // Queued or running on some node: wait for its end.
                    let waiter = Waiter {
                        client,
                        with_output: false,
                        group: Some(group),
                    };
                    return self.wait_remote(id, waiter);
                }
                match doc {
                    Some(mut d) => {
                        d.output = None;
                        self.reply(client, Response::Job(d));
                    }
                    None => self.reply(client, not_found_job(id)),
                }
                self.group_done(group);
            }
            (QueryPurpose::Result { client, id }, QueryResult::Job(doc)) => {
                match (doc, output_file) {
                    // The output stays in its file; the client gets that.
                    (Some(doc), Some(len)) => self.actions.push_back(Action::ReplyJob {
                        client,
                        doc,
                        output: JobOutput::File(len),
                    }),
                    (Some(d), None) => self.reply(client, Response::Job(d)),
                    (None, _) => self.reply(client, not_found_job(id)),
                }
            }
            (
                QueryPurpose::Cancel { client, id },
                QueryResult::Cancel {
                    cancelled: true, ..
                },
            ) => self.reply(
                client,
                Response::Ok {
                    message: format!("job {id} cancelled"),
                },
            ),
            (
                QueryPurpose::Cancel { client, id },
                QueryResult::Cancel {
                    requested_on: Some(node),
                    ..
                },
            ) => self.reply(
                client,
                Response::Ok {
                    message: format!(
                        "job {id} is held by node {node}, which was asked to cancel it; `jobvisorctl wait {id}` waits for its end"
                    ),
                },
            ),
            (QueryPurpose::Cancel { client, id }, QueryResult::Cancel { doc, .. })
            | (QueryPurpose::Cancel { client, id }, QueryResult::Job(doc)) => match doc {
                Some(d) => self.reply(
                    client,
                    Response::Error {
                        kind: ipc_proto::control::ErrorKind::Failed,
                        message: format!(
                            "job {id} already {}; nothing to cancel",
                            d.state.as_str()
                        ),
                    },
                ),
                None => self.reply(client, not_found_job(id)),
            },
            (QueryPurpose::Jobs { client, pool }, QueryResult::List(docs)) => {
                if docs.is_empty() {
                    if let Some(name) = pool.filter(|p| !self.pools.contains_key(p)) {
                        // A pool removed by a reload still lists its jobs.
                        let (kind, message) = self.unknown_pool(&name).parts();
                        self.reply(client, Response::Error { kind, message });
                    }
                }
                for d in docs {
                    self.reply(client, Response::Job(d));
                }
                self.reply(client, Response::End);
            }
            (QueryPurpose::Retry { client, id }, QueryResult::Retry(r)) => {
                self.retried(client, id, r)
            }
            (QueryPurpose::Prune { client }, QueryResult::Pruned(count)) => {
                self.reply(client, Response::Pruned { count })
            }
            (QueryPurpose::Remote { id, waiters }, QueryResult::Job(doc)) => {
                self.remote_doc(id, waiters, doc)
            }
            (QueryPurpose::Nodes { client }, QueryResult::Nodes(nodes)) => {
                self.reply(client, Response::Nodes(nodes))
            }
            (QueryPurpose::Warnings { client }, QueryResult::Warnings(lines)) => {
                self.reply(client, Response::Warnings(lines))
            }
            (QueryPurpose::Status, QueryResult::QueueCounts(counts)) => {
                if let Some(asked) = self.jt.counts_asked.take() {
                    self.jt.queue_counts = Some((asked, counts));
                }
                for (client, report) in std::mem::take(&mut self.jt.status_waiting) {
                    self.backlog_sub(client);
                    self.reply_status(client, report);
                }
            }
            (p, _) => self.log(
                Level::Error,
                format!("store answered a query of the wrong kind for {p:?}"),
            ),
        }
    }

    /// `wait ID…`: a `Job` per id as each finishes, then `End`.
    pub fn wait_jobs(&mut self, client: ClientId, mut ids: Vec<u64>) {
        // Each job once, however often it is named: the answer per id is
        // the same, and a long list of one id must not multiply work.
        ids.sort_unstable();
        ids.dedup();
        if ids.len() > ipc_proto::control::MAX_WAIT_IDS {
            self.reply(
                client,
                Response::Error {
                    kind: ipc_proto::control::ErrorKind::Invalid,
                    message: format!(
                        "wait names {} jobs; at most {} at once: wait for them in batches",
                        ids.len(),
                        ipc_proto::control::MAX_WAIT_IDS
                    ),
                },
            );
            return;
        }
        if ids.is_empty() {
            self.reply(client, Response::End);
            return;
        }
        self.jt.next_group += 1;
        let group = self.jt.next_group;
        self.jt.wait_groups.insert(group, (client, ids.len()));
        *self.jt.backlog.entry(client).or_insert(0) += 1;
        let viewer = self.viewer(client);
        let mut pools = BTreeSet::new();
        for id in ids {
            // Another user's job is answered like an unknown one (by the
            // store, with the owner filter): nothing says it exists.
            if let Some(job) = self.jt.jobs.get(&id).filter(|j| viewer.sees(j.owner)) {
                let pool = job.pool.clone();
                self.jt.waiters.entry(id).or_default().push(Waiter {
                    client,
                    with_output: false,
                    group: Some(group),
                });
                if matches!(self.jt.jobs[&id].phase, JobPhase::Queued) {
                    pools.insert(pool);
                }
            } else {
                let query = Query::Job {
                    id,
                    owner: viewer.filter(),
                    output: false,
                };
                self.query(query, QueryPurpose::Wait { client, group, id });
            }
        }
        // Queued in a failed pool: this request hears so (once per pool).
        for pool in pools {
            self.tell_pool_failed(&pool, Some(vec![client]), true);
        }
    }

    /// `result ID`: the job's current document, output included.
    pub fn result(&mut self, client: ClientId, id: u64) {
        let viewer = self.viewer(client);
        if let Some(job) = self.jt.jobs.get(&id).filter(|j| viewer.sees(j.owner)) {
            let output = match &job.phase {
                JobPhase::Finishing(f) => f.output.clone(),
                _ => None,
            };
            let doc = self.doc(job);
            return self.reply_doc(client, doc, output);
        }
        let query = Query::Job {
            id,
            owner: viewer.filter(),
            output: true,
        };
        self.query(query, QueryPurpose::Result { client, id });
    }

    /// `jobs`: newest first, from the store (which has seen every earlier op).
    pub fn list_jobs(
        &mut self,
        client: ClientId,
        pool: Option<String>,
        state: Option<JobState>,
        limit: u32,
        before: Option<u64>,
        since_ms: Option<u64>,
    ) {
        let owner = self.viewer(client).filter();
        self.query(
            Query::List {
                pool: pool.clone(),
                state,
                limit,
                owner,
                before,
                since_ms,
            },
            QueryPurpose::Jobs { client, pool },
        );
    }

    /// `cancel ID`.
    pub fn cancel(&mut self, client: ClientId, id: u64, now: Instant) {
        let viewer = self.viewer(client);
        if !self.jt.jobs.get(&id).is_some_and(|j| viewer.sees(j.owner)) {
            let owner = viewer.filter();
            // With a cluster the job may be queued in the shared table.
            let query = match self.cluster {
                true => Query::CancelQueued { id, owner },
                false => Query::Job {
                    id,
                    owner,
                    output: false,
                },
            };
            self.query(query, QueryPurpose::Cancel { client, id });
            return;
        }
        let resp = match self.cancel_here(id, now) {
            Ok(message) => Response::Ok { message },
            Err(message) => Response::Error {
                kind: ipc_proto::control::ErrorKind::Failed,
                message,
            },
        };
        self.reply(client, resp);
    }

    /// Cancels job `id`, which is in memory here: a queued one ends at
    /// once, a running one's worker is asked to stop it.
    pub(super) fn cancel_here(&mut self, id: u64, now: Instant) -> Result<String, String> {
        let Some(job) = self.jt.jobs.get_mut(&id) else {
            return Err(format!("job {id} is not here"));
        };
        match &job.phase {
            JobPhase::Queued => {
                let pool = job.pool.clone();
                if let Some(p) = self.pools.get_mut(&pool) {
                    p.jobs.queued = p.jobs.queued.saturating_sub(1);
                }
                self.finish(
                    id,
                    JobState::Cancelled,
                    None,
                    Some("cancelled before it started".into()),
                    now,
                );
                Ok(format!("job {id} cancelled"))
            }
            JobPhase::Running { proc } => {
                let proc = *proc;
                if job.cancel_requested {
                    Ok(format!("job {id} is already being cancelled"))
                } else {
                    job.cancel_requested = true;
                    let stop_timeout = self
                        .pools
                        .get(&job.pool)
                        .map_or(Duration::from_secs(10), |p| p.config.stop_timeout);
                    self.jt.cancel_deadlines.insert((now + stop_timeout, id));
                    // A job being taken back already has its `Cancel` on
                    // the way; its answer now ends it as cancelled.
                    if !job.taken_back {
                        self.actions.push_back(Action::Send {
                            proc,
                            msg: ToWorker::Cancel { id },
                        });
                    }
                    Ok(format!(
                        "cancelling job {id}: its worker was asked to stop it (stopped by force after {})",
                        humantime::format_duration(stop_timeout)
                    ))
                }
            }
            JobPhase::Finishing(f) => Err(format!(
                "job {id} already {}; nothing to cancel",
                f.state.as_str()
            )),
        }
    }

    /// Who `client` is: its jobs are its uid's, and it sees only those
    /// unless it is an admin. A client the core was not told about is
    /// [`Viewer::UNKNOWN`].
    pub fn set_viewer(&mut self, client: ClientId, viewer: Viewer) {
        self.jt.viewers.insert(client, viewer);
    }

    pub(super) fn viewer(&self, client: ClientId) -> Viewer {
        self.jt
            .viewers
            .get(&client)
            .copied()
            .unwrap_or(Viewer::UNKNOWN)
    }

    /// A client disconnected: forget its waiters.
    pub fn on_client_gone(&mut self, client: ClientId) {
        self.jt.viewers.remove(&client);
        for p in self.pools.values_mut() {
            p.jobs.told_failed.remove(&client);
        }
        self.jt.waiters.retain(|_, ws| {
            ws.retain(|w| w.client != client);
            !ws.is_empty()
        });
        self.jt.wait_groups.retain(|_, (c, _)| *c != client);
        // Its queries still come back (and are answered to nobody).
        self.jt.backlog.remove(&client);
    }
}
