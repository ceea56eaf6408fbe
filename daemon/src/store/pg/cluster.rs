//! Nodes sharing queues through PostgreSQL: registration and heartbeats,
//! the sweep of dead nodes' jobs, claims with `FOR UPDATE SKIP LOCKED`,
//! blocks of job ids, and the listener of wake-ups (LISTEN/NOTIFY).
//!
//! - Every daemon is a **node**: a row of `jobvisor_nodes`, registered at
//!   start, its `heartbeat_at` renewed every [`HEARTBEAT`] by the store
//!   thread. A node silent for `[store] node_timeout` is declared dead by
//!   the **leader**, the node that holds the lease row (`jobvisor_leader`):
//!   each heartbeat of the leader renews it for [`LEASE`], and once it has
//!   run out any node's heartbeat takes it (the row is locked `SKIP
//!   LOCKED`, so a heartbeat never waits for another node's). The leader
//!   sweeps in the transaction that renewed its lease: the dead nodes'
//!   claimed and running jobs go back to the queue (`node` cleared), and
//!   the nodes are woken.
//! - A **claim** takes queued jobs nobody holds, in priority order, skipping
//!   rows another node is claiming (`SKIP LOCKED`), and stamps them with the
//!   node and a new claim number. Every update of a claimed job is
//!   **fenced**: it applies only while the row still has this node and
//!   that number, so a node declared dead (a partition, a long pause) can
//!   never record a result over the attempt another node now runs; its
//!   refused updates come back as [`Completion::Fenced`].
//! - Wake-ups: an insert notifies `jobvisor_queued` (payload: the pool),
//!   once per pool per batch; a finished job `jobvisor_done` (payload: ids,
//!   comma-separated). A listener thread with its own connection forwards
//!   them to the store thread; a poll every [`POLL`] (jittered) stands in
//!   for a lost notification (a pooler that drops them, a reconnection).

use super::*;
use std::collections::HashSet;

/// How often a node renews its heartbeat (and sweeps).
pub(super) const HEARTBEAT: Duration = Duration::from_secs(1);
/// Held demands are retried this often without a notification.
pub(super) const POLL: Duration = Duration::from_secs(1);
/// Job ids come in blocks of this many.
pub(super) const ID_BLOCK: u64 = 1 << 20;
/// How long the leader's lease lasts past its last heartbeat: a few
/// heartbeats, well under the least `node_timeout` (3 s), so a dead
/// leader's successor sweeps in time.
pub(super) const LEASE: Duration = Duration::from_secs(2);
/// Takes or renews the lease for node `$1` for `$2` seconds, unless another
/// node holds it (its lease not run out) or is renewing it right now (the
/// row locked): then no row.
const TAKE_LEASE: &str = "UPDATE jobvisor_leader SET node = $1, \
     until = now() + make_interval(secs => $2) WHERE id = (SELECT id FROM jobvisor_leader \
     WHERE node = $1 OR until < now() FOR UPDATE SKIP LOCKED) RETURNING node";
/// Longest `pg_notify` payload sent (the server's limit is 8000 bytes).
const NOTIFY_MAX: usize = 7000;

/// Rows a claim returns, in `RETURNING` order (sorted afterwards). A job
/// with a key is taken only if it can hold the key: the key's row in
/// `jobvisor_keys` is inserted in the same statement, and a key another
/// job holds (or that another claim is inserting: the unique index waits
/// for it) leaves the job queued. Of several candidates with one key, the
/// first in priority order is taken.
const CLAIM: &str = "WITH c AS (SELECT id, key, priority FROM jobvisor_jobs q \
     WHERE pool = $1 AND state = 0 AND node IS NULL \
     AND (key IS NULL OR NOT EXISTS (SELECT 1 FROM jobvisor_keys k WHERE k.key = q.key)) \
     ORDER BY priority DESC, id LIMIT $2 FOR UPDATE SKIP LOCKED), \
     k AS (INSERT INTO jobvisor_keys (key, job) SELECT DISTINCT ON (key) key, id FROM c \
     WHERE key IS NOT NULL ORDER BY key, priority DESC, id ON CONFLICT DO NOTHING RETURNING job) \
     UPDATE jobvisor_jobs j SET node = $3, claim = j.claim + 1 FROM c \
     WHERE j.id = c.id AND (c.key IS NULL OR c.id IN (SELECT job FROM k)) \
     RETURNING j.id, j.pool, j.priority, j.key, j.max_attempts, j.timeout_ms, j.created_ms, \
     j.attempts, j.owner, j.input, j.claim"; // `JOB_COLUMNS` of `j`, then the claim

/// This node's row, share-locked, if it is not declared dead.
const NODE_ALIVE: &str = "SELECT 1 FROM jobvisor_nodes WHERE id = $1 AND NOT gone FOR SHARE";

/// Frees the keys and semaphores `ids` hold; the ids of the jobs that
/// held any, how many keys were freed and which semaphores.
const RELEASE: &str = "WITH k AS (DELETE FROM jobvisor_keys WHERE job = ANY($1) RETURNING job), \
     s AS (DELETE FROM jobvisor_sem_holds WHERE job = ANY($1) RETURNING sem) \
     SELECT (SELECT count(*) FROM k), ARRAY(SELECT DISTINCT sem FROM s)";

/// The class of the advisory locks that make the claims of a semaphore
/// one at a time (the second key is the hash of its name).
const SEM_LOCK_CLASS: i32 = 0x6a76_7365; // "jvse"

/// Frees what `ids` hold (keys, semaphores) and wakes the nodes that may
/// now claim: every held demand for a key (`*`: its jobs may be of any
/// pool), the pools using each semaphore (`sem:NAME`).
pub(super) fn release_holds(
    tx: &mut postgres::Transaction<'_>,
    st: &mut Stmts,
    ids: &[i64],
) -> Result<(), postgres::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let row = tx.query_one(RELEASE, &[&ids])?;
    let keys: i64 = row.get(0);
    let sems: Vec<String> = row.get(1);
    let mut wake: Vec<String> = sems.into_iter().map(|s| format!("sem:{s}")).collect();
    if keys > 0 {
        wake.push("*".into());
    }
    notify_pools(tx, st, &wake)
}

impl Pg {
    /// Registers this daemon as a new node.
    pub(super) fn register(&mut self) -> Result<(), postgres::Error> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let row = self.client.query_one(
            "INSERT INTO jobvisor_nodes (host, pid, started_ms, workers) VALUES ($1, $2, $3, $4) \
             RETURNING id",
            &[
                &host,
                &(std::process::id() as i32),
                &to_i64(crate::store::db::now_ms()),
                &(self.workers.load(std::sync::atomic::Ordering::Relaxed) as i32),
            ],
        )?;
        // Claims of an earlier registration stay: their updates are fenced
        // (the rows name the old node), never applied unfenced.
        self.shared
            .node
            .store(row.get(0), std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// A new block of job ids.
    pub(super) fn reserve_ids(&mut self) -> Result<(u64, u64), postgres::Error> {
        let block: i64 = self
            .client
            .query_one("SELECT nextval('jobvisor_id_blocks')", &[])?
            .get(0);
        let start = to_u64(block) * ID_BLOCK;
        Ok((start.max(1), start + ID_BLOCK))
    }

    /// Renews this node's heartbeat (registering again if it was declared
    /// dead meanwhile: what it held is void) and sweeps dead nodes; returns
    /// the pools that got jobs back.
    pub(super) fn heartbeat(&mut self) -> Result<Vec<String>, String> {
        self.ensure_connected()?;
        let err = |e: postgres::Error| one_line(&e);
        let alive = self
            .client
            .execute(
                "UPDATE jobvisor_nodes SET heartbeat_at = now(), workers = $2 \
                 WHERE id = $1 AND NOT gone",
                &[
                    &self.node(),
                    &(self.workers.load(std::sync::atomic::Ordering::Relaxed) as i32),
                ],
            )
            .map_err(err)?;
        if alive == 0 {
            let old = self.node();
            self.register().map_err(err)?;
            // The sweep that declared it dead freed its keys and semaphores.
            self.held().holds.clear();
            crate::warn!(
                "this node (id {old}) was declared dead by the cluster (no heartbeat for {:?}: cut off, stopped or starved of CPU); its jobs went back to the queue, and it rejoins as node {}",
                self.node_timeout,
                self.node()
            );
        }
        let node = self.node();
        let mut tx = self.client.transaction().map_err(err)?;
        let lease = self.stmts.get(&mut tx, TAKE_LEASE).map_err(err)?;
        let leader = tx
            .query_opt(&lease, &[&node, &LEASE.as_secs_f64()])
            .map_err(err)?
            .is_some();
        if !leader {
            tx.commit().map_err(err)?;
            return Ok(Vec::new());
        }
        let dead: Vec<i64> = tx
            .query(
                "UPDATE jobvisor_nodes SET gone = true WHERE NOT gone \
                 AND heartbeat_at < now() - make_interval(secs => $1) RETURNING id",
                &[&self.node_timeout.as_secs_f64()],
            )
            .map_err(err)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if dead.is_empty() {
            tx.commit().map_err(err)?;
            return Ok(Vec::new());
        }
        let pools = requeue_nodes(&mut tx, &mut self.stmts, &dead).map_err(err)?;
        tx.commit().map_err(err)?;
        crate::warn!(
            "nodes {dead:?} sent no heartbeat for {:?}: declared dead, their jobs are queued again",
            self.node_timeout
        );
        Ok(pools)
    }

    /// Claims up to `max` queued jobs of `pool` for this node. A job that
    /// a dead node left with an open attempt has it closed as `lost`; one
    /// whose attempts are then used up ends `dead` instead of running.
    ///
    /// `sems` are the pool's semaphores and their limits: the claims of a
    /// semaphore are made one at a time cluster-wide (an advisory lock),
    /// and take no more jobs than it has free (its holders are the rows of
    /// `jobvisor_sem_holds`, which every claimed job of a pool using it
    /// gets, and loses when it leaves its node).
    pub(super) fn claim(
        &mut self,
        pool: &str,
        max: u32,
        sems: &[(String, u32)],
    ) -> Result<Vec<RecoveredJob>, String> {
        self.ensure_connected()?;
        let err = |e: postgres::Error| one_line(&e);
        let now = crate::store::db::now_ms();
        let node = self.node();
        let mut tx = self.client.transaction().map_err(err)?;
        // A claim need not wait for the WAL flush: if the server loses it
        // (a crash), the job is simply unclaimed again, another node may
        // run it, and this node's result for it is fenced. At least once,
        // and the record stays the other node's: nothing is lost or
        // recorded twice. Finished jobs' rows keep the server's setting.
        tx.batch_execute("SET LOCAL synchronous_commit = off")
            .map_err(err)?;
        // Only while this node is alive, and it stays so until this claim
        // commits: a sweep marking it dead waits for the share lock, then
        // requeues what the claim took; a claim after the sweep finds the
        // node gone and takes nothing (else its rows would name a dead
        // node that no sweep looks at again).
        let alive = self.stmts.get(&mut tx, NODE_ALIVE).map_err(err)?;
        if tx.query_opt(&alive, &[&node]).map_err(err)?.is_none() {
            tx.commit().map_err(err)?;
            return Err("this node was declared dead; it rejoins at its next heartbeat".into());
        }
        let mut max = i64::from(max.max(1));
        let mut sem_names: Vec<&str> = sems.iter().map(|(n, _)| n.as_str()).collect();
        sem_names.sort_unstable();
        for name in &sem_names {
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                &[&SEM_LOCK_CLASS, name],
            )
            .map_err(err)?;
        }
        if !sems.is_empty() {
            // A statement after the locks: it sees every claim committed
            // before them.
            let used = tx
                .query(
                    "SELECT s, (SELECT count(*) FROM jobvisor_sem_holds h WHERE h.sem = s) \
                     FROM unnest($1::text[]) s",
                    &[&sem_names],
                )
                .map_err(err)?;
            for r in used {
                let name: &str = r.get(0);
                let held: i64 = r.get(1);
                let limit = sems.iter().find(|(n, _)| n == name).map_or(0, |(_, l)| *l);
                max = max.min(i64::from(limit) - held);
            }
            if max <= 0 {
                tx.commit().map_err(err)?;
                return Ok(Vec::new());
            }
        }
        let claim = self.stmts.get(&mut tx, CLAIM).map_err(err)?;
        let mut rows = tx.query(&claim, &[&pool, &max, &node]).map_err(err)?;
        rows.sort_by_key(|r| (std::cmp::Reverse(r.get::<_, i32>(2)), r.get::<_, i64>(0)));
        let mut jobs = Vec::new();
        let mut claims = Vec::new();
        let mut holds = Vec::new();
        let mut ended = Vec::new();
        for row in rows {
            let id = to_u64(row.get(0));
            let mut attempts = attempts_from(row.get(7)).unwrap_or_default();
            if let Some(last) = attempts.last_mut().filter(|a| a.outcome.is_none()) {
                last.ended_ms = Some(now);
                last.outcome = Some(Outcome::Lost);
                last.error = Some("its node stopped (no heartbeat)".to_string());
            }
            let max_attempts = row.get::<_, i32>(4).max(1) as u32;
            let claim: i32 = row.get(10);
            if attempts.len() >= max_attempts as usize {
                let day = to_i64(now) / DAY_MS;
                if !self.days.contains(&day) {
                    create_partition(&mut tx, day).map_err(err)?;
                    self.days.insert(day);
                }
                let text = attempts_text(&attempts);
                let output: Option<&[u8]> = None;
                tx.execute(
                    write::MOVE_MANY,
                    &[
                        &vec![to_i64(id)],
                        &vec![code(JobState::Dead)],
                        &vec![text.as_str()],
                        &vec![output],
                        &vec![Some("its node stopped (no heartbeat) on its last attempt")],
                        &vec![to_i64(now)],
                        &vec![None::<i64>],
                        &node,
                        &vec![Some(claim)],
                    ],
                )
                .map_err(err)?;
                notify_done(&mut tx, &mut self.stmts, &[to_i64(id)]).map_err(err)?;
                ended.push(to_i64(id));
                continue;
            }
            claims.push((id, claim));
            let key: Option<String> = row.get(3);
            if key.is_some() || !sems.is_empty() {
                holds.push(id);
            }
            jobs.push(RecoveredJob {
                job: queued_job(&row, max_attempts),
                attempts,
                input_file: None,
            });
        }
        // The key a job that ended here held.
        release_holds(&mut tx, &mut self.stmts, &ended).map_err(err)?;
        if !sems.is_empty() && !jobs.is_empty() {
            let ids: Vec<i64> = jobs.iter().map(|j| to_i64(j.job.id)).collect();
            tx.execute(
                "INSERT INTO jobvisor_sem_holds SELECT s, j \
                 FROM unnest($1::text[]) s CROSS JOIN unnest($2::bigint[]) j",
                &[&sem_names, &ids],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        let mut held = self.held();
        held.claims.extend(claims);
        held.holds.extend(holds);
        Ok(jobs)
    }

    /// This node stops (a clean shutdown): the jobs it still holds (claimed
    /// and not finished) go back to the queue at once, rather than after
    /// the sweep's delay, and its row is marked gone.
    pub(super) fn leave(&mut self) -> Result<(), String> {
        self.ensure_connected()?;
        let err = |e: postgres::Error| one_line(&e);
        let node = self.node();
        let mut tx = self.client.transaction().map_err(err)?;
        requeue_nodes(&mut tx, &mut self.stmts, &[node]).map_err(err)?;
        // Its lease, if it leads, is free at once.
        tx.execute(
            "UPDATE jobvisor_leader SET until = '-infinity' WHERE node = $1",
            &[&node],
        )
        .map_err(err)?;
        tx.execute(
            "UPDATE jobvisor_nodes SET gone = true WHERE id = $1",
            &[&node],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        let mut held = self.held();
        held.claims.clear();
        held.holds.clear();
        Ok(())
    }

    /// Cancels job `id` if it is queued and no node holds it (it moves to
    /// `jobvisor_done`, and waiters anywhere hear of it): `(true, None)`.
    /// If a node holds it, marks it `cancel_requested` and tells that node
    /// (`jobvisor_cancel`, payload `NODE:ID`), which cancels it as its own:
    /// `(false, Some(node))`.
    pub(super) fn cancel_queued(
        &mut self,
        id: u64,
        owner: Option<u32>,
    ) -> Result<(bool, Option<u64>), postgres::Error> {
        let now = to_i64(crate::store::db::now_ms());
        let mut tx = self.client.transaction()?;
        let day = now / DAY_MS;
        if !self.days.contains(&day) {
            create_partition(&mut tx, day)?;
        }
        let moved = tx.query(
            "WITH m AS (DELETE FROM jobvisor_jobs WHERE id = $1 \
             AND ($2::bigint IS NULL OR owner = $2) AND state = 0 AND node IS NULL RETURNING *) \
             INSERT INTO jobvisor_done SELECT id, pool, $3, priority, key, max_attempts, \
             timeout_ms, created_ms, $4, 'cancelled before it started', attempts, owner, input, \
             input_memory_len, NULL, NULL FROM m RETURNING id",
            &[
                &to_i64(id),
                &owner.map(i64::from),
                &code(JobState::Cancelled),
                &now,
            ],
        )?;
        let ids: Vec<i64> = moved.iter().map(|r| r.get(0)).collect();
        notify_done(&mut tx, &mut self.stmts, &ids)?;
        let mut requested_on = None;
        if ids.is_empty() {
            let held = tx.query_opt(
                "UPDATE jobvisor_jobs SET cancel_requested = true WHERE id = $1 \
                 AND ($2::bigint IS NULL OR owner = $2) AND node IS NOT NULL RETURNING node",
                &[&to_i64(id), &owner.map(i64::from)],
            )?;
            if let Some(row) = held {
                let node: i64 = row.get(0);
                tx.execute(
                    "SELECT pg_notify('jobvisor_cancel', $1)",
                    &[&format!("{node}:{id}")],
                )?;
                requested_on = Some(to_u64(node));
            }
        }
        tx.commit()?;
        self.days.insert(day);
        Ok((!ids.is_empty(), requested_on))
    }

    /// The nodes alive, and those gone within the last hour.
    pub(super) fn nodes(&mut self) -> Result<Vec<ipc_proto::control::NodeStatus>, postgres::Error> {
        let rows = self.client.query(
            "WITH h AS (SELECT node, count(*) FILTER (WHERE state = 1) AS running, \
             count(*) AS held FROM jobvisor_jobs WHERE node IS NOT NULL GROUP BY node) \
             SELECT n.id, n.host, n.pid, n.started_ms, \
             (extract(epoch FROM now() - n.heartbeat_at) * 1000)::bigint, NOT n.gone, n.workers, \
             COALESCE(h.running, 0), COALESCE(h.held, 0), \
             n.id IS NOT DISTINCT FROM (SELECT node FROM jobvisor_leader WHERE until > now()) \
             FROM jobvisor_nodes n LEFT JOIN h ON h.node = n.id \
             WHERE NOT n.gone OR n.heartbeat_at > now() - interval '1 hour' ORDER BY n.id",
            &[],
        )?;
        Ok(rows
            .iter()
            .map(|r| ipc_proto::control::NodeStatus {
                id: to_u64(r.get(0)),
                host: r.get(1),
                pid: u32::try_from(r.get::<_, i32>(2)).unwrap_or(0),
                started_ms: to_u64(r.get(3)),
                heartbeat_age_ms: to_u64(r.get(4)),
                alive: r.get(5),
                workers: u32::try_from(r.get::<_, i32>(6)).unwrap_or(0),
                running: to_u64(r.get(7)),
                held: to_u64(r.get(8)),
                leader: r.get(9),
            })
            .collect())
    }

    /// Transactions that have held back the server's cleanup (their xmin)
    /// for longer than `xmin_warning`: while one is open, no dead row of
    /// `jobvisor_jobs` can be removed, the table and its indexes grow, and
    /// every claim slows down. Sessions of other roles show only with
    /// `pg_read_all_stats` (or as a superuser).
    pub(super) fn warnings(&mut self) -> Result<Vec<String>, postgres::Error> {
        let secs = self.xmin_warning.as_secs_f64();
        let mut out = Vec::new();
        for r in self.client.query(
            "SELECT pid, COALESCE(application_name, ''), COALESCE(state, ''), \
             extract(epoch FROM now() - COALESCE(xact_start, backend_start))::bigint \
             FROM pg_stat_activity WHERE backend_xmin IS NOT NULL AND pid <> pg_backend_pid() \
             AND (datname = current_database() OR backend_type = 'walsender') \
             AND now() - COALESCE(xact_start, backend_start) > make_interval(secs => $1) \
             ORDER BY 4 DESC LIMIT 5",
            &[&secs],
        )? {
            let pid: i32 = r.get(0);
            let app: &str = r.get(1);
            let state: &str = r.get(2);
            let age: i64 = r.get(3);
            out.push(format!(
                "PostgreSQL: backend {pid} (application {app:?}, {state}) has held back the server's cleanup for {}: dead rows of jobvisor_jobs pile up and claims slow down; end it (SELECT pg_terminate_backend({pid})) and fix the client that keeps its transaction open",
                crate::store::human_secs(age)
            ));
        }
        for r in self.client.query(
            "SELECT gid, extract(epoch FROM now() - prepared)::bigint FROM pg_prepared_xacts \
             WHERE database = current_database() \
             AND now() - prepared > make_interval(secs => $1) ORDER BY 2 DESC LIMIT 5",
            &[&secs],
        )? {
            let gid: &str = r.get(0);
            let age: i64 = r.get(1);
            out.push(format!(
                "PostgreSQL: prepared transaction {gid:?} has held back the server's cleanup for {}: dead rows of jobvisor_jobs pile up; COMMIT PREPARED or ROLLBACK PREPARED it",
                crate::store::human_secs(age)
            ));
        }
        Ok(out)
    }

    /// The jobs this node holds that another node asked it to cancel.
    pub(super) fn cancels_requested(&mut self) -> Result<Vec<u64>, String> {
        self.ensure_connected()?;
        Ok(self
            .client
            .query(
                "SELECT id FROM jobvisor_jobs WHERE node = $1 AND cancel_requested",
                &[&self.node()],
            )
            .map_err(|e| one_line(&e))?
            .iter()
            .map(|r| to_u64(r.get(0)))
            .collect())
    }

    /// Which of `ids` have finished (are in `jobvisor_done`).
    pub(super) fn finished_among(&mut self, ids: &[u64]) -> Result<Vec<u64>, String> {
        self.ensure_connected()?;
        let ids: Vec<i64> = ids.iter().map(|&i| to_i64(i)).collect();
        Ok(self
            .client
            .query(
                "SELECT DISTINCT id FROM jobvisor_done WHERE id = ANY($1)",
                &[&ids],
            )
            .map_err(|e| one_line(&e))?
            .iter()
            .map(|r| to_u64(r.get(0)))
            .collect())
    }
}

/// Puts the jobs `nodes` hold back in the queue, and wakes the nodes for
/// their pools; returns the pools.
fn requeue_nodes(
    tx: &mut postgres::Transaction<'_>,
    st: &mut Stmts,
    nodes: &[i64],
) -> Result<Vec<String>, postgres::Error> {
    let rows = tx.query(
        "UPDATE jobvisor_jobs SET node = NULL, state = 0 WHERE node = ANY($1) RETURNING id, pool",
        &[&nodes],
    )?;
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let pools: Vec<String> = rows
        .iter()
        .map(|r| r.get(1))
        .collect::<std::collections::BTreeSet<String>>()
        .into_iter()
        .collect();
    release_holds(tx, st, &ids)?;
    notify_pools(tx, st, &pools)?;
    Ok(pools)
}

/// Wakes the nodes for `pools` (`jobvisor_queued`).
pub(super) fn notify_pools(
    tx: &mut postgres::Transaction<'_>,
    st: &mut Stmts,
    pools: &[String],
) -> Result<(), postgres::Error> {
    if !pools.is_empty() {
        let notify = st.get(tx, NOTIFY_QUEUED)?;
        tx.execute(&notify, &[&pools])?;
    }
    Ok(())
}

/// Tells the nodes that `ids` finished (`jobvisor_done`): one statement,
/// the ids comma-separated in payloads of at most [`NOTIFY_MAX`] bytes.
pub(super) fn notify_done(
    tx: &mut postgres::Transaction<'_>,
    st: &mut Stmts,
    ids: &[i64],
) -> Result<(), postgres::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut payloads: Vec<String> = Vec::new();
    for id in ids {
        match payloads.last_mut() {
            Some(p) if p.len() <= NOTIFY_MAX => {
                p.push(',');
                p.push_str(&id.to_string());
            }
            _ => payloads.push(id.to_string()),
        }
    }
    let notify = st.get(tx, NOTIFY_DONE)?;
    tx.execute(&notify, &[&payloads])?;
    Ok(())
}

/// See [`notify_pools`].
const NOTIFY_QUEUED: &str = "SELECT pg_notify('jobvisor_queued', p) FROM unnest($1::text[]) p";
/// See [`notify_done`].
const NOTIFY_DONE: &str = "SELECT pg_notify('jobvisor_done', p) FROM unnest($1::text[]) p";

/// The listener thread: its own connection, `LISTEN`ing to the channels,
/// each notification forwarded to the store thread; reconnects after a
/// second when the connection is lost, and ends once `closed` is set.
pub(in crate::store) fn listen(
    url: String,
    tx: mpsc::Sender<Msg>,
    closed: Arc<std::sync::atomic::AtomicBool>,
) {
    use postgres::fallible_iterator::FallibleIterator;
    use std::sync::atomic::Ordering;
    while !closed.load(Ordering::Relaxed) {
        let connected = super::connect(&url).and_then(|mut c| {
            c.batch_execute("LISTEN jobvisor_queued; LISTEN jobvisor_done; LISTEN jobvisor_cancel")
                .map(|()| c)
                .map_err(|e| super::one_line(&e))
        });
        if let Ok(mut client) = connected {
            // A (re)connection may have missed notifications: the store
            // thread polls its demands once at once.
            if tx.send(Msg::Notify(Notice::Reconnected)).is_err() {
                return;
            }
            loop {
                // A new iterator each time: a `TimeoutIter` whose delay has
                // run out answers `None` at once ever after (its delay is
                // reset only by a notification), which spun this thread.
                let mut notes = client.notifications();
                let next = notes.timeout_iter(Duration::from_secs(1)).next();
                match next {
                    Ok(Some(n)) => {
                        let notice = match n.channel() {
                            "jobvisor_queued" => Notice::Queued(n.payload().to_string()),
                            "jobvisor_cancel" => {
                                let Some((node, id)) = n
                                    .payload()
                                    .split_once(':')
                                    .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                                else {
                                    continue;
                                };
                                Notice::Cancel { node, id }
                            }
                            _ => Notice::Done(
                                n.payload()
                                    .split(',')
                                    .filter_map(|s| s.parse().ok())
                                    .collect(),
                            ),
                        };
                        if tx.send(Msg::Notify(notice)).is_err() {
                            return;
                        }
                    }
                    Ok(None) if closed.load(Ordering::Relaxed) => return,
                    Ok(None) => {}
                    Err(_) => break,
                }
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// What the listener forwards.
#[derive(Debug)]
pub(in crate::store) enum Notice {
    /// Jobs were queued in this pool.
    Queued(String),
    /// These jobs finished.
    Done(Vec<u64>),
    /// The listener (re)connected: notifications may have been missed.
    Reconnected,
    /// Node `node` is asked to cancel job `id`.
    Cancel {
        /// The node holding the job.
        node: i64,
        /// The job.
        id: u64,
    },
}

/// A pool's semaphores and their limits.
pub(super) type Sems = Vec<(String, u32)>;

/// What the store thread keeps for the cluster.
#[derive(Default)]
pub(super) struct ClusterState {
    /// Jobs whose end someone here waits for.
    pub(super) watch: HashSet<u64>,
    /// Jobs this node was asked to cancel, as of the last poll (each is
    /// passed on once).
    pub(super) cancels: HashSet<u64>,
}
