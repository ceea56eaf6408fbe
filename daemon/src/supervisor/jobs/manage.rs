//! `retry` and `prune`: job management that goes through the store (a
//! finished job lives only there), answered when the store has done it.

use super::*;
use crate::store::Retried;
use ipc_proto::control::ErrorKind;

/// What `retry` says about a job in a state it does not retry.
fn not_retryable(id: u64, state: JobState) -> Response {
    let why = match state {
        JobState::Queued | JobState::Running => format!("job {id} is {}", state.as_str()),
        _ => format!("job {id} {}", state.as_str()),
    };
    Response::Error {
        kind: ErrorKind::Failed,
        message: format!("{why}; only a failed, dead, cancelled or timed-out job can be retried"),
    }
}

impl Supervisor {
    /// `retry ID`: a job that ended without success is queued again,
    /// its attempts kept (at least one more is allowed). The store does
    /// it in one transaction; [`Supervisor::retried`] takes the answer.
    pub fn retry(&mut self, client: ClientId, id: u64) {
        let viewer = self.viewer(client);
        if let Some(job) = self.jt.jobs.get(&id).filter(|j| viewer.sees(j.owner)) {
            // A finishing job's final row is committed before the store
            // reads it for the retry (queries follow earlier ops); one
            // still queued or running has nothing to retry.
            let state = match &job.phase {
                JobPhase::Queued => Some(JobState::Queued),
                JobPhase::Running { .. } => Some(JobState::Running),
                JobPhase::Finishing(_) => None,
            };
            if let Some(state) = state {
                return self.reply(client, not_retryable(id, state));
            }
        }
        let owner = viewer.filter();
        self.query(
            Query::Retry { id, owner },
            QueryPurpose::Retry { client, id },
        );
    }

    /// The store's answer to a `retry`.
    pub(super) fn retried(&mut self, client: ClientId, id: u64, r: Retried) {
        let resp = match r {
            Retried::NotFound => not_found_job(id),
            Retried::NotRetryable(state) => not_retryable(id, state),
            Retried::InputGone => Response::Error {
                kind: ErrorKind::Failed,
                message: format!(
                    "job {id}'s input is no longer stored (a large input was dropped when the job ended, or its pool has payloads = \"memory\"); submit it again"
                ),
            },
            Retried::Queued(job) => {
                if self.jt.jobs.contains_key(&id) {
                    // Cannot happen: the store queued it from a finished
                    // state, and a finished job is not in memory.
                    self.log(
                        Level::Error,
                        format!("retry of job {id}: it is in memory already"),
                    );
                    return self.reply(client, not_retryable(id, JobState::Queued));
                }
                let attempt = job.attempts.len() + 1;
                let max = job.job.max_attempts;
                let pool = job.job.pool.clone();
                let configured = self.pools.contains_key(&pool);
                if self.cluster {
                    // Back in the shared queue: whichever node has room
                    // claims it.
                    if let Some(p) = self.pools.get_mut(&pool) {
                        p.jobs.dirty = true;
                    }
                } else {
                    self.admit_queued(job);
                }
                self.log(
                    Level::Info,
                    format!("job {id} queued again by a retry (attempt {attempt} of {max})"),
                );
                let note = if configured {
                    String::new()
                } else {
                    format!("; pool {pool:?} is not configured, it waits until it is added back")
                };
                Response::Ok {
                    message: format!(
                        "job {id} queued again (attempt {attempt} of {max}){note}"
                    ),
                }
            }
        };
        self.reply(client, resp);
    }

    /// `prune`: deletes at most `limit` of the client's finished jobs (an
    /// admin's: anyone's) that finished before `finished_before_ms`.
    pub fn prune(
        &mut self,
        client: ClientId,
        finished_before_ms: u64,
        state: Option<JobState>,
        pool: Option<String>,
        limit: u32,
    ) {
        if let Some(s) = state.filter(|s| !s.is_terminal()) {
            return self.reply(
                client,
                Response::Error {
                    kind: ErrorKind::Invalid,
                    message: format!(
                        "prune deletes finished jobs; a {} job is not finished (cancel it first)",
                        s.as_str()
                    ),
                },
            );
        }
        let owner = self.viewer(client).filter();
        let limit = limit.clamp(1, ipc_proto::control::MAX_PRUNE);
        self.query(
            Query::Prune {
                finished_before_ms,
                state,
                pool,
                owner,
                limit,
            },
            QueryPurpose::Prune { client },
        );
    }
}
