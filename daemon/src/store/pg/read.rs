//! Reading the store (jobs, listings), and the writes that answer as
//! queries: retry, prune, and the retention's pruning steps.

use super::*;

pub(super) const SELECT_DOC: &str =
    "SELECT id, pool, state, priority, key, created_ms, finished_ms, error, \
     attempts, output, output_memory_len FROM jobvisor_all";

impl Pg {
    /// Answers a query from committed data.
    pub(super) fn query(&mut self, query: &Query) -> Result<QueryResult, String> {
        self.ensure_connected()?;
        let read = |e: postgres::Error| format!("cannot read the job store: {}", one_line(&e));
        match query {
            Query::Nodes => self.nodes().map_err(read).map(QueryResult::Nodes),
            Query::Warnings => self.warnings().map_err(read).map(QueryResult::Warnings),
            Query::QueueCounts => self
                .client
                .query(
                    "SELECT pool, count(*) FROM jobvisor_jobs WHERE state = 0 AND node IS NULL \
                     GROUP BY pool",
                    &[],
                )
                .map_err(read)
                .map(|rows| {
                    QueryResult::QueueCounts(
                        rows.iter().map(|r| (r.get(0), to_u64(r.get(1)))).collect(),
                    )
                }),
            Query::CancelQueued { id, owner } => {
                let (cancelled, requested_on) = self.cancel_queued(*id, *owner).map_err(read)?;
                let doc = match self.query(&Query::Job {
                    id: *id,
                    owner: *owner,
                    output: false,
                })? {
                    QueryResult::Job(doc) => doc,
                    _ => None,
                };
                Ok(QueryResult::Cancel {
                    cancelled,
                    doc,
                    requested_on,
                })
            }
            Query::Job { id, owner, output } => {
                let row = self
                    .client
                    .query_opt(
                        &format!(
                            "{SELECT_DOC} WHERE id = $1 AND ($2::bigint IS NULL OR owner = $2)"
                        ),
                        &[&to_i64(*id), &owner.map(i64::from)],
                    )
                    .map_err(read)?;
                let Some(row) = row else {
                    return Ok(QueryResult::Job(None));
                };
                let mut doc = doc_from_row(&row, *output)?;
                if *output && row.get::<_, Option<i64>>(10).is_some() {
                    doc.note_error(crate::store::db::MEMORY_OUTPUT_NOT_KEPT.to_string());
                }
                Ok(QueryResult::Job(Some(doc)))
            }
            Query::List {
                pool,
                state,
                limit,
                owner,
                before,
                since_ms,
            } => {
                let sql = format!(
                    "{SELECT_DOC} WHERE ($1::text IS NULL OR pool = $1) \
                     AND ($2::smallint IS NULL OR state = $2) \
                     AND ($3::bigint IS NULL OR owner = $3) AND ($4::bigint IS NULL OR id < $4) \
                     AND ($5::bigint IS NULL OR created_ms >= $5) ORDER BY id DESC LIMIT $6"
                );
                let rows = self
                    .client
                    .query(
                        &sql,
                        &[
                            pool,
                            &state.map(code),
                            &owner.map(i64::from),
                            &before.map(to_i64),
                            &since_ms.map(to_i64),
                            &i64::from(*limit),
                        ],
                    )
                    .map_err(read)?;
                let docs = rows
                    .iter()
                    .map(|r| doc_from_row(r, false))
                    .collect::<Result<_, _>>()?;
                Ok(QueryResult::List(docs))
            }
            Query::Retry { id, owner } => self.retry(*id, *owner).map_err(read),
            Query::Prune {
                finished_before_ms,
                state,
                pool,
                owner,
                limit,
            } => {
                let n = self
                    .client
                    .execute(
                        "DELETE FROM jobvisor_done WHERE id IN (SELECT id FROM jobvisor_done \
                         WHERE finished_ms < $1 \
                         AND ($2::smallint IS NULL OR state = $2) AND ($3::text IS NULL OR pool = $3) \
                         AND ($4::bigint IS NULL OR owner = $4) LIMIT $5)",
                        &[
                            &to_i64(*finished_before_ms),
                            &state.map(code),
                            pool,
                            &owner.map(i64::from),
                            &i64::from(*limit),
                        ],
                    )
                    .map_err(read)?;
                Ok(QueryResult::Pruned(n))
            }
        }
    }

    pub(super) fn retry(
        &mut self,
        id: u64,
        owner: Option<u32>,
    ) -> Result<QueryResult, postgres::Error> {
        let mut tx = self.client.transaction()?;
        let owner = owner.map(i64::from);
        let row = tx.query_opt(
            &format!(
                "SELECT {JOB_COLUMNS}, state, input_memory_len FROM jobvisor_done \
             WHERE id = $1 AND ($2::bigint IS NULL OR owner = $2) FOR UPDATE"
            ),
            &[&to_i64(id), &owner],
        )?;
        let Some(row) = row else {
            // Active (not retryable), or unknown.
            let active = tx.query_opt(
                "SELECT state FROM jobvisor_jobs WHERE id = $1 \
                 AND ($2::bigint IS NULL OR owner = $2)",
                &[&to_i64(id), &owner],
            )?;
            return Ok(QueryResult::Retry(match active {
                Some(r) => Retried::NotRetryable(state_from(r.get(0)).unwrap_or(JobState::Queued)),
                None => Retried::NotFound,
            }));
        };
        let state = state_from(row.get(10)).unwrap_or(JobState::Dead);
        if !matches!(
            state,
            JobState::Failed | JobState::Cancelled | JobState::TimedOut | JobState::Dead
        ) {
            return Ok(QueryResult::Retry(Retried::NotRetryable(state)));
        }
        if row.get::<_, Option<i64>>(11).is_some() {
            return Ok(QueryResult::Retry(Retried::InputGone));
        }
        let attempts = attempts_from(row.get(7)).unwrap_or_default();
        let max_attempts = (row.get::<_, i32>(4).max(1) as u32).max(attempts.len() as u32 + 1);
        // Back to the queue table, queued, its attempts kept.
        tx.execute(
            "WITH m AS (DELETE FROM jobvisor_done WHERE id = $1 RETURNING *) \
             INSERT INTO jobvisor_jobs (id, pool, state, priority, key, max_attempts, \
             timeout_ms, created_ms, attempts, owner, input, input_memory_len) \
             SELECT id, pool, $2, priority, key, $3, timeout_ms, created_ms, attempts, owner, \
             input, input_memory_len FROM m",
            &[&to_i64(id), &code(JobState::Queued), &(max_attempts as i32)],
        )?;
        tx.commit()?;
        Ok(QueryResult::Retry(Retried::Queued(RecoveredJob {
            job: queued_job(&row, max_attempts),
            attempts,
            input_file: None,
        })))
    }

    /// Applies the retention: drops the partitions of `jobvisor_done` older
    /// than every pool's retention (whole days, no row deleted), deletes
    /// the rows of pools whose retention is shorter, and the oldest rows
    /// past `max_finished`, at most `chunk` rows per statement; true if
    /// there may be more.
    pub(super) fn prune_step(&mut self, retention: &Retention, chunk: u32) -> Result<bool, String> {
        self.ensure_connected()?;
        let err = |e: postgres::Error| one_line(&e);
        let now = crate::store::db::now_ms();
        let cutoff = |d: &Duration| to_i64(now.saturating_sub(d.as_millis() as u64));
        let longest = retention
            .per_pool
            .values()
            .chain([&retention.default])
            .max()
            .copied()
            .unwrap_or(retention.default);
        let all_gone = cutoff(&longest);
        let old: Vec<i64> = self
            .days
            .iter()
            .copied()
            .filter(|d| (d + 1) * DAY_MS <= all_gone)
            .collect();
        for day in old {
            self.client
                .batch_execute(&format!("DROP TABLE IF EXISTS jobvisor_done_d{day}"))
                .map_err(err)?;
            self.days.remove(&day);
        }
        let mut more = false;
        let limit = i64::from(chunk);
        for (pool, keep) in &retention.per_pool {
            let n = self
                .client
                .execute(
                    "DELETE FROM jobvisor_done WHERE id IN (SELECT id FROM jobvisor_done \
                     WHERE pool = $1 AND finished_ms < $2 LIMIT $3)",
                    &[pool, &cutoff(keep), &limit],
                )
                .map_err(err)?;
            more |= n == u64::from(chunk);
        }
        let named: Vec<&str> = retention.per_pool.keys().map(String::as_str).collect();
        let n = self
            .client
            .execute(
                "DELETE FROM jobvisor_done WHERE id IN (SELECT id FROM jobvisor_done \
                 WHERE NOT (pool = ANY($1)) AND finished_ms < $2 LIMIT $3)",
                &[&named, &cutoff(&retention.default), &limit],
            )
            .map_err(err)?;
        more |= n == u64::from(chunk);
        if retention.max_finished < u64::MAX {
            // The planner's estimate first: an exact count only near the cap.
            let estimate: f64 = self
                .client
                .query_one(
                    "SELECT COALESCE(sum(c.reltuples), 0)::float8 FROM pg_inherits i \
                     JOIN pg_class c ON c.oid = i.inhrelid \
                     WHERE i.inhparent = 'jobvisor_done'::regclass",
                    &[],
                )
                .map_err(err)?
                .get(0);
            if estimate >= retention.max_finished as f64 * 0.9 {
                let finished: i64 = self
                    .client
                    .query_one("SELECT count(*) FROM jobvisor_done", &[])
                    .map_err(err)?
                    .get(0);
                let over = to_u64(finished).saturating_sub(retention.max_finished);
                if over > 0 {
                    self.client
                        .execute(
                            "DELETE FROM jobvisor_done WHERE id IN (SELECT id FROM jobvisor_done \
                             ORDER BY finished_ms, id LIMIT $1)",
                            &[&(over.min(u64::from(chunk)) as i64)],
                        )
                        .map_err(err)?;
                    more |= over > u64::from(chunk);
                }
            }
        }
        Ok(more)
    }
}

pub(super) fn doc_from_row(row: &postgres::Row, with_output: bool) -> Result<JobDoc, String> {
    let id = to_u64(row.get(0));
    let state = state_from(row.get(2)).ok_or_else(|| format!("job {id}: unknown state"))?;
    let attempts = attempts_from(row.get(8)).map_err(|e| format!("job {id}: {e}"))?;
    Ok(JobDoc {
        id,
        pool: row.get(1),
        state,
        priority: row.get(3),
        key: row.get(4),
        created_ms: to_u64(row.get(5)),
        finished_ms: row.get::<_, Option<i64>>(6).map(to_u64),
        attempts,
        output: if with_output {
            row.get::<_, Option<Vec<u8>>>(9).map(Bytes)
        } else {
            None
        },
        error: row.get(7),
    })
}

/// The latest [`Op::Retention`].
pub(super) struct Retention {
    pub(super) per_pool: BTreeMap<String, Duration>,
    pub(super) default: Duration,
    pub(super) max_finished: u64,
}
