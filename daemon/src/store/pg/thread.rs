//! The store thread's loop for PostgreSQL.

use super::read::Retention;
use super::*;

/// Pruning runs at most this often, one chunk per statement.
pub(super) const PRUNE_EVERY: Duration = if cfg!(test) {
    Duration::from_millis(100)
} else {
    Duration::from_secs(10)
};
pub(super) const PRUNE_CHUNK: u32 = crate::store::PRUNE_CHUNK;

/// The store thread's body: batches of ops in one transaction each, like
/// the SQLite committer (see the module docs of `store`).
pub(in crate::store) fn run(
    mut pg: Pg,
    ops: mpsc::Receiver<Msg>,
    done: mpsc::Sender<Completion>,
    waker: Arc<mio::Waker>,
    latency: Arc<crate::store::latency::CommitLatency>,
) -> Result<(), StoreError> {
    // Updates of failed batches, retried first.
    let mut retry: VecDeque<(u64, Op)> = VecDeque::new();
    let mut backoff = Duration::from_millis(100);
    let mut retry_at: Option<Instant> = None;
    let mut retention = Retention {
        per_pool: BTreeMap::new(),
        default: crate::store::DEFAULT_RETENTION,
        max_finished: u64::MAX,
    };
    let mut prune_at = Instant::now() + PRUNE_EVERY;
    let mut closing = false;
    loop {
        let deadline = retry_at.unwrap_or(prune_at);
        let first = match ops.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(m) => Some(m),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        };
        let mut batch: Vec<(u64, Op)> = retry.drain(..).collect();
        let mut take = |m: Msg, batch: &mut Vec<(u64, Op)>| match m {
            Msg::Op { seq, op } => batch.push((seq, op)),
            Msg::Close => closing = true,
            #[cfg(test)]
            Msg::Test(_) => {}
        };
        if let Some(m) = first {
            take(m, &mut batch);
            while batch.len() < MAX_BATCH_OPS {
                match ops.try_recv() {
                    Ok(m) => take(m, &mut batch),
                    Err(_) => break,
                }
            }
        }
        if batch.is_empty() && !closing {
            if Instant::now() >= prune_at {
                let step = pg.prune_step(&retention, PRUNE_CHUNK);
                pg.suspect |= step.is_err();
                let more = step.unwrap_or(false);
                prune_at = Instant::now()
                    + if more {
                        Duration::from_millis(10)
                    } else {
                        PRUNE_EVERY
                    };
            }
            continue;
        }
        for (_, op) in &batch {
            if let Op::Retention {
                per_pool,
                default,
                max_finished,
            } = op
            {
                retention = Retention {
                    per_pool: per_pool.clone(),
                    default: *default,
                    max_finished: *max_finished,
                };
            }
        }
        let upto = batch.iter().map(|(s, _)| *s).max().unwrap_or(0);
        let mut failed = Vec::new();
        let started = Instant::now();
        let result = pg.apply(&batch, &mut failed);
        pg.suspect |= result.is_err();
        latency.observe(started.elapsed());
        match result {
            Ok(()) => {
                backoff = Duration::from_millis(100);
                retry_at = None;
                if !failed.is_empty() {
                    let _ = done.send(Completion::InsertsFailed { failed });
                }
                if upto > 0 {
                    let _ = done.send(Completion::Durable { upto });
                }
                for (_, op) in &batch {
                    if let Op::Query { token, query } = op {
                        let result = pg.query(query);
                        pg.suspect |= result.is_err();
                        let _ = done.send(Completion::Query {
                            token: *token,
                            result,
                        });
                    }
                }
            }
            Err(error) => {
                let lost_inserts = batch
                    .iter()
                    .filter_map(|(_, op)| match op {
                        Op::Insert(j) => Some(j.id),
                        _ => None,
                    })
                    .collect();
                for (seq, op) in batch {
                    match op {
                        Op::Update(_) | Op::Retention { .. } => retry.push_back((seq, op)),
                        Op::Query { token, .. } => {
                            let _ = done.send(Completion::Query {
                                token,
                                result: Err(format!(
                                    "job store {} unavailable: {error}",
                                    pg.display()
                                )),
                            });
                        }
                        Op::Insert(_) => {}
                    }
                }
                let _ = done.send(Completion::Failed {
                    upto,
                    lost_inserts,
                    error: format!("job store {}: {error}", pg.display()),
                });
                retry_at = Some(Instant::now() + backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        let _ = waker.wake();
        if closing {
            return if retry.is_empty() {
                Ok(())
            } else {
                Err(StoreError::Postgres {
                    url: pg.display(),
                    what: "the last updates could not be committed",
                    detail: "the server is unreachable".into(),
                })
            };
        }
    }
}
