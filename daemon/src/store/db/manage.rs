//! The store's side of `retry` and `prune`: each one transaction of its
//! own, run by the store thread after the batch before it committed (so it
//! sees every earlier op of the daemon), payload files removed once the
//! transaction has committed.

use super::*;
use crate::store::Retried;

/// A finished job to queue again, as [`SELECT_ACTIVE`] reads a queued one
/// (plus its output file, which the retry drops).
const SELECT_RETRY: &str = "SELECT id, pool, state, priority, key, max_attempts, timeout_ms, \
     created_ms, attempts, COALESCE(input, (SELECT input FROM job_inputs WHERE id = jobs.id)), \
     input_file_len, owner, output_file_len FROM jobs WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)";
/// Back to `queued` (the attempts stay): no end, error or output.
const REQUEUE: &str = "UPDATE jobs SET state = ?2, max_attempts = ?3, finished_ms = NULL, \
     error = NULL, output = NULL, output_file_len = NULL WHERE id = ?1";
/// One step of a prune.
const DELETE_PRUNED: &str = "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs \
     WHERE finished_ms IS NOT NULL AND finished_ms < ?1 AND state >= 2 \
     AND (?2 IS NULL OR state = ?2) AND (?3 IS NULL OR pool = ?3) \
     AND (?4 IS NULL OR owner = ?4) LIMIT ?5) \
     RETURNING id, input_file_len, output_file_len";

/// States a job may be retried from.
fn retryable(state: JobState) -> bool {
    matches!(
        state,
        JobState::Failed | JobState::Cancelled | JobState::TimedOut | JobState::Dead
    )
}

impl Db {
    /// Queues job `id` again if it ended without success: in one
    /// transaction its row goes back to `queued`, keeps its attempts and is
    /// allowed at least one more (`max_attempts` raised to attempts + 1 if
    /// they were used up); its output (a failure's detail) is dropped.
    pub fn retry(&self, id: u64, owner: Option<u32>) -> rusqlite::Result<QueryResult> {
        let mut dropped_output = false;
        let result = self.in_tx(|conn| {
            let mut stmt = conn.prepare_cached(SELECT_RETRY)?;
            let mut rows = stmt.query(params![to_sql_u64(id), owner])?;
            let Some(row) = rows.next()? else {
                return Ok(Retried::NotFound);
            };
            let code: i64 = row.get(2)?;
            let Some(state) = state_from_code(code) else {
                return Ok(Retried::NotRetryable(JobState::Dead));
            };
            if !retryable(state) {
                return Ok(Retried::NotRetryable(state));
            }
            let conversion = |e: String| {
                rusqlite::Error::FromSqlConversionFailure(8, rusqlite::types::Type::Text, e.into())
            };
            let attempts = parse_attempts(row.get_ref(8)?).map_err(conversion)?;
            let file_len: Option<i64> = row.get(10)?;
            let (input, input_file): (Arc<[u8]>, Option<u64>) = match (file_len, row.get_ref(9)?) {
                (Some(len), _) => {
                    let len = from_sql_u64(len);
                    if self.payloads.check(id, Kind::Input, len).is_err() {
                        return Ok(Retried::InputGone);
                    }
                    (Arc::default(), Some(len))
                }
                (None, ValueRef::Blob(b)) => (Arc::from(b), None),
                (None, _) => return Ok(Retried::InputGone),
            };
            let max_attempts: u32 = row.get(5)?;
            let max_attempts = max_attempts.max(attempts.len() as u32 + 1);
            let job = NewJob {
                id,
                pool: row.get(1)?,
                priority: row.get(3)?,
                key: row.get(4)?,
                max_attempts,
                timeout_ms: row.get::<_, Option<i64>>(6)?.map(from_sql_u64),
                input,
                input_source: None,
                created_ms: from_sql_u64(row.get(7)?),
                owner: row.get(11)?,
                spill: false,
                memory: false,
            };
            dropped_output = row.get::<_, Option<i64>>(12)?.is_some();
            drop(rows);
            conn.prepare_cached(REQUEUE)?.execute(params![
                to_sql_u64(id),
                state_code(JobState::Queued),
                max_attempts
            ])?;
            Ok(Retried::Queued(RecoveredJob {
                job,
                attempts,
                input_file,
            }))
        })?;
        if dropped_output && matches!(result, Retried::Queued(_)) {
            self.payloads.remove_deleted(&[(id, Kind::Output)]);
        }
        Ok(QueryResult::Retry(result))
    }

    /// Deletes up to `limit` finished jobs that finished before
    /// `finished_before_ms` (of one state, pool, owner if given), in one
    /// transaction, then their payload files; returns how many.
    pub fn prune(
        &self,
        finished_before_ms: u64,
        state: Option<JobState>,
        pool: Option<&str>,
        owner: Option<u32>,
        limit: u32,
    ) -> rusqlite::Result<u64> {
        let (n, files) = self.in_tx(|conn| {
            let mut stmt = conn.prepare_cached(DELETE_PRUNED)?;
            let deleted = deleted_files(stmt.query(params![
                to_sql_u64(finished_before_ms),
                state.map(state_code),
                pool,
                owner,
                limit
            ])?);
            deleted
        })?;
        self.payloads.remove_deleted(&files);
        Ok(n as u64)
    }
}
