//! Writing a batch: its inserts and updates as one statement per kind,
//! columns sent as arrays (`UNNEST`), finished jobs moved to
//! `jobvisor_done`.

use super::*;

/// A batch's inserts, one array per column (`UNNEST`).
pub(super) const INSERT_MANY: &str = "INSERT INTO jobvisor_jobs (id, pool, state, priority, key, \
     max_attempts, timeout_ms, created_ms, attempts, owner, input, input_memory_len) \
     SELECT id, pool, 0, priority, key, max_attempts, timeout_ms, created_ms, '[]', owner, \
     input, memory_len FROM UNNEST($1::bigint[], $2::text[], $3::integer[], $4::text[], \
     $5::integer[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bytea[], $10::bigint[]) \
     AS t(id, pool, priority, key, max_attempts, timeout_ms, created_ms, owner, input, \
     memory_len)";
/// A batch's updates (one per job), one array per column. Fenced (see
/// `cluster`): a claimed job's update applies only while the row has this
/// node (`$8`) and the claim (`$9`); the ids updated come back.
pub(super) const UPDATE_MANY: &str = "UPDATE jobvisor_jobs AS j SET state = t.state, \
     attempts = t.attempts, output = t.output, error = t.error, finished_ms = t.finished_ms, \
     output_memory_len = t.memory_len FROM UNNEST($1::bigint[], $2::smallint[], $3::text[], \
     $4::bytea[], $5::text[], $6::bigint[], $7::bigint[], $9::integer[]) \
     AS t(id, state, attempts, output, error, finished_ms, memory_len, claim) \
     WHERE j.id = t.id AND (t.claim IS NULL OR (j.node = $8 AND j.claim = t.claim)) \
     RETURNING j.id";
/// A batch's final updates of jobs in the queue table: each row moves to
/// `jobvisor_done` with its new values (the `DELETE`'s `RETURNING` takes
/// them from the arrays it joined: one pass, no second join); the ids
/// moved come back.
pub(super) const MOVE_MANY: &str = "WITH m AS (DELETE FROM jobvisor_jobs j USING \
     UNNEST($1::bigint[], $2::smallint[], $3::text[], $4::bytea[], $5::text[], $6::bigint[], \
     $7::bigint[], $9::integer[]) \
     AS t(id, state, attempts, output, error, finished_ms, memory_len, claim) \
     WHERE j.id = t.id AND (t.claim IS NULL OR (j.node = $8 AND j.claim = t.claim)) \
     RETURNING j.id, j.pool, t.state, j.priority, j.key, j.max_attempts, j.timeout_ms, \
     j.created_ms, t.finished_ms, t.error, t.attempts, j.owner, j.input, j.input_memory_len, \
     t.output, t.memory_len) \
     INSERT INTO jobvisor_done (id, pool, state, priority, key, max_attempts, timeout_ms, \
     created_ms, finished_ms, error, attempts, owner, input, input_memory_len, output, \
     output_memory_len) SELECT * FROM m RETURNING id";
/// The highest id ever given, kept up.
const MAX_ID: &str = "UPDATE jobvisor_meta SET value = GREATEST(value, $1) WHERE name = 'max_id'";
/// Final updates of jobs already finished (a later replacement).
pub(super) const DONE_UPDATE_MANY: &str = "UPDATE jobvisor_done AS j SET state = t.state, \
     attempts = t.attempts, output = t.output, error = t.error, finished_ms = t.finished_ms, \
     output_memory_len = t.memory_len FROM UNNEST($1::bigint[], $2::smallint[], $3::text[], \
     $4::bytea[], $5::text[], $6::bigint[], $7::bigint[]) \
     AS t(id, state, attempts, output, error, finished_ms, memory_len) WHERE j.id = t.id";
/// Jobs inserted and finished in one batch go straight to `jobvisor_done`.
pub(super) const DONE_INSERT_MANY: &str =
    "INSERT INTO jobvisor_done (id, pool, state, priority, key, \
     max_attempts, timeout_ms, created_ms, finished_ms, error, attempts, owner, input, \
     input_memory_len, output, output_memory_len) \
     SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::smallint[], $4::integer[], $5::text[], \
     $6::integer[], $7::bigint[], $8::bigint[], $9::bigint[], $10::text[], $11::text[], \
     $12::bigint[], $13::bytea[], $14::bigint[], $15::bytea[], $16::bigint[])";

impl Pg {
    /// Applies one batch in one transaction: inserts (`Err` per insert
    /// whose input file cannot be read: left out), then updates, in order.
    pub(super) fn apply(
        &mut self,
        ops: &[(u64, Op)],
        failed: &mut Vec<(u64, InsertFailure)>,
    ) -> Result<Vec<u64>, String> {
        // (Reconnects if a statement failed: what follows the batch, such
        // as `reserve_ids`, uses the connection as it is.)
        self.ensure_connected()?;
        // Nothing to write (a batch of demands, watches, queries…): no
        // transaction, no round trip.
        if !ops
            .iter()
            .any(|(_, op)| matches!(op, Op::Insert(_) | Op::Update(_)))
        {
            return Ok(Vec::new());
        }
        let err = |e: postgres::Error| one_line(&e);
        // The last update of each job only (each is a full replacement).
        let mut last_update: HashMap<u64, &JobUpdate> = HashMap::new();
        let mut update_order = Vec::new();
        for (_, op) in ops {
            if let Op::Update(u) = op {
                if u.output_file_len.is_some() {
                    return Err("an output in a payload file, which a PostgreSQL store \
                                does not use (a daemon bug)"
                        .into());
                }
                if last_update.insert(u.id, u).is_none() {
                    update_order.push(u.id);
                }
            }
        }
        // Each kind of write is one statement for the whole batch, its
        // columns sent as arrays: inserts of jobs still active, inserts of
        // jobs that also finished in the batch (straight to
        // `jobvisor_done`), updates of active jobs, moves of jobs that
        // finished.
        let mut ins = Inserts::default();
        let mut done = Inserts::default();
        let mut done_upd = Updates::default();
        let mut inserted = std::collections::HashSet::new();
        for (_, op) in ops {
            if let Op::Insert(job) = op {
                let input = match input_bytes(job) {
                    Ok(input) => input,
                    Err(e) => {
                        failed.push((job.id, e));
                        continue;
                    }
                };
                match last_update.get(&job.id).filter(|u| u.state.is_terminal()) {
                    Some(u) => {
                        done.push(job, input);
                        done_upd.push(u, None);
                    }
                    None => ins.push(job, input),
                }
                inserted.insert(job.id);
            }
        }
        let mut active = Updates::default();
        let mut finished = Updates::default();
        let held = self.held();
        for id in update_order {
            let u = last_update[&id];
            let claim = held.claims.get(&id).copied();
            if u.state.is_terminal() {
                if !inserted.contains(&id) {
                    finished.push(u, claim);
                }
            } else if !failed.iter().any(|(f, _)| *f == id) {
                active.push(u, claim);
            }
        }
        let max_id = ins
            .id
            .iter()
            .chain(&done.id)
            .copied()
            .max()
            .map_or(self.max_id, |m| self.max_id.max(to_u64(m)));
        let days: std::collections::BTreeSet<i64> = finished
            .finished_ms
            .iter()
            .chain(&done_upd.finished_ms)
            .flatten()
            .map(|ms| ms / DAY_MS)
            .filter(|d| !self.days.contains(d))
            .collect();
        drop(held);
        let node = self.node();
        let shared = Arc::clone(&self.shared);
        let mut fenced = Vec::new();
        let mut moved_ids: Vec<i64> = done.id.clone();
        let mut tx = self.client.transaction().map_err(err)?;
        for &day in &days {
            create_partition(&mut tx, day).map_err(err)?;
        }
        if !ins.id.is_empty() {
            let input: Vec<&[u8]> = ins.input.iter().map(|b| b.as_ref()).collect();
            let st = self.stmts.get(&mut tx, INSERT_MANY).map_err(err)?;
            tx.execute(
                &st,
                &[
                    &ins.id,
                    &ins.pool,
                    &ins.priority,
                    &ins.key,
                    &ins.max_attempts,
                    &ins.timeout_ms,
                    &ins.created_ms,
                    &ins.owner,
                    &input,
                    &ins.memory_len,
                ],
            )
            .map_err(err)?;
            let pools: std::collections::BTreeSet<String> = ins.pool.iter().cloned().collect();
            cluster::notify_pools(
                &mut tx,
                &mut self.stmts,
                &pools.into_iter().collect::<Vec<_>>(),
            )
            .map_err(err)?;
        }
        if !done.id.is_empty() {
            let input: Vec<&[u8]> = done.input.iter().map(|b| b.as_ref()).collect();
            let output = done_upd.outputs();
            let st = self.stmts.get(&mut tx, DONE_INSERT_MANY).map_err(err)?;
            tx.execute(
                &st,
                &[
                    &done.id,
                    &done.pool,
                    &done_upd.state,
                    &done.priority,
                    &done.key,
                    &done.max_attempts,
                    &done.timeout_ms,
                    &done.created_ms,
                    &done_upd.finished_ms,
                    &done_upd.error,
                    &done_upd.attempts,
                    &done.owner,
                    &input,
                    &done.memory_len,
                    &output,
                    &done_upd.memory_len,
                ],
            )
            .map_err(err)?;
        }
        if !active.id.is_empty() {
            let st = self.stmts.get(&mut tx, UPDATE_MANY).map_err(err)?;
            let updated: std::collections::HashSet<i64> = tx
                .query(&st, &active.params(&active.outputs(), &node))
                .map_err(err)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            for (i, id) in active.id.iter().enumerate() {
                if active.claim[i].is_some() && !updated.contains(id) {
                    fenced.push(to_u64(*id));
                }
            }
        }
        if !finished.id.is_empty() {
            let output = finished.outputs();
            let st = self.stmts.get(&mut tx, MOVE_MANY).map_err(err)?;
            let moved: std::collections::HashSet<i64> = tx
                .query(&st, &finished.params(&output, &node))
                .map_err(err)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            // Not moved: a claimed job is no longer this node's (fenced);
            // another is already in `jobvisor_done` (replaced there).
            let mut later = Updates::default();
            for (i, id) in finished.id.iter().enumerate() {
                if moved.contains(id) {
                    continue;
                }
                match finished.claim[i] {
                    Some(_) => fenced.push(to_u64(*id)),
                    None => later.take(&finished, i),
                }
            }
            if !later.id.is_empty() {
                let outputs = later.outputs();
                tx.execute(DONE_UPDATE_MANY, &later.params(&outputs, &node)[..7])
                    .map_err(err)?;
            }
            // Keys and semaphores of jobs that leave this node.
            let freed: Vec<i64> = {
                let held = shared
                    .held
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                moved
                    .iter()
                    .copied()
                    .filter(|&i| held.holds.contains(&to_u64(i)))
                    .collect()
            };
            cluster::release_holds(&mut tx, &mut self.stmts, &freed).map_err(err)?;
            moved_ids.extend(moved);
        }
        cluster::notify_done(&mut tx, &mut self.stmts, &moved_ids).map_err(err)?;
        if max_id > self.max_id {
            let st = self.stmts.get(&mut tx, MAX_ID).map_err(err)?;
            tx.execute(&st, &[&to_i64(max_id)]).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        self.max_id = max_id;
        self.days.extend(days);
        let mut held = self.held();
        for id in moved_ids
            .iter()
            .map(|&i| to_u64(i))
            .chain(fenced.iter().copied())
        {
            held.claims.remove(&id);
            held.holds.remove(&id);
        }
        drop(held);
        Ok(fenced)
    }
}

/// Columns of a batch's inserts.
#[derive(Default)]
pub(super) struct Inserts {
    id: Vec<i64>,
    pool: Vec<String>,
    priority: Vec<i32>,
    key: Vec<Option<String>>,
    max_attempts: Vec<i32>,
    timeout_ms: Vec<Option<i64>>,
    created_ms: Vec<i64>,
    owner: Vec<i64>,
    input: Vec<Arc<[u8]>>,
    memory_len: Vec<Option<i64>>,
}

impl Inserts {
    fn push(&mut self, job: &NewJob, input: Arc<[u8]>) {
        self.id.push(to_i64(job.id));
        self.pool.push(job.pool.clone());
        self.priority.push(job.priority);
        self.key.push(job.key.clone());
        self.max_attempts
            .push(job.max_attempts.min(i32::MAX as u32) as i32);
        self.timeout_ms.push(job.timeout_ms.map(to_i64));
        self.created_ms.push(to_i64(job.created_ms));
        self.owner.push(i64::from(job.owner));
        self.input.push(input);
        self.memory_len
            .push(job.memory.then(|| to_i64(job.input_len())));
    }
}

/// Columns of a batch's updates.
#[derive(Default)]
pub(super) struct Updates {
    id: Vec<i64>,
    state: Vec<i16>,
    attempts: Vec<String>,
    output: Vec<Option<Arc<[u8]>>>,
    error: Vec<Option<String>>,
    finished_ms: Vec<Option<i64>>,
    memory_len: Vec<Option<i64>>,
    /// The claim that fences each update (`None`: not a claimed job).
    claim: Vec<Option<i32>>,
}

impl Updates {
    /// The outputs as the statements take them.
    fn outputs(&self) -> Vec<Option<&[u8]>> {
        self.output.iter().map(|o| o.as_deref()).collect()
    }

    /// The parameters of `UPDATE_MANY`, `MOVE_MANY` and `DONE_UPDATE_MANY`
    /// (`outputs` a `Vec`: the array parameter's own type).
    #[allow(clippy::ptr_arg)]
    fn params<'a>(
        &'a self,
        outputs: &'a Vec<Option<&'a [u8]>>,
        node: &'a i64,
    ) -> [&'a (dyn postgres::types::ToSql + Sync); 9] {
        [
            &self.id,
            &self.state,
            &self.attempts,
            outputs,
            &self.error,
            &self.finished_ms,
            &self.memory_len,
            node,
            &self.claim,
        ]
    }

    /// Copies update `i` of `from`.
    fn take(&mut self, from: &Updates, i: usize) {
        self.id.push(from.id[i]);
        self.state.push(from.state[i]);
        self.attempts.push(from.attempts[i].clone());
        self.output.push(from.output[i].clone());
        self.error.push(from.error[i].clone());
        self.finished_ms.push(from.finished_ms[i]);
        self.memory_len.push(from.memory_len[i]);
        self.claim.push(from.claim[i]);
    }

    fn push(&mut self, u: &JobUpdate, claim: Option<i32>) {
        self.claim.push(claim);
        self.id.push(to_i64(u.id));
        self.state.push(code(u.state));
        self.attempts.push(attempts_text(&u.attempts));
        self.output.push(u.output.clone());
        self.error.push(u.error.clone());
        self.finished_ms.push(
            u.state
                .is_terminal()
                .then(|| to_i64(u.finished_ms.unwrap_or_else(crate::store::db::now_ms))),
        );
        self.memory_len.push(u.output_memory_len.map(to_i64));
    }
}

/// A job's input as bytes: in memory, or read from the client's file (on
/// this thread: the event loop never reads it).
pub(super) fn input_bytes(job: &NewJob) -> Result<Arc<[u8]>, InsertFailure> {
    if job.memory {
        return Ok(Arc::default());
    }
    let Some(src) = &job.input_source else {
        return Ok(Arc::clone(&job.input));
    };
    let len = usize::try_from(src.len)
        .map_err(|_| InsertFailure::Input("the input is too large".into()))?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(len)
        .map_err(|_| InsertFailure::Store(format!("cannot allocate {len} bytes for the input")))?;
    buf.resize(len, 0);
    src.file.read_exact_at(&mut buf, 0).map_err(|e| {
        InsertFailure::Input(format!(
            "its input cannot be read from the file it was submitted from ({e}); submit it again"
        ))
    })?;
    Ok(buf.into())
}
