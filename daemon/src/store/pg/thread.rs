//! The store thread's loop for PostgreSQL: batches of ops in one
//! transaction each (like the SQLite committer), and between them the
//! cluster's work: heartbeats and sweeps, wake-ups and polls passed on to
//! the claim thread (`claimer`, which holds the demands), watched jobs
//! reported when they finish.

use super::claimer::ClaimMsg;
use super::cluster::{ClusterState, Notice, HEARTBEAT, POLL};
use super::read::Retention;
use super::*;
use std::collections::HashSet;

/// Pruning runs at most this often, one chunk per statement.
pub(super) const PRUNE_EVERY: Duration = if cfg!(test) {
    Duration::from_millis(100)
} else {
    Duration::from_secs(10)
};
pub(super) const PRUNE_CHUNK: u32 = crate::store::PRUNE_CHUNK;

/// The store thread's body (see the module docs of `store` and `cluster`);
/// it starts the claim thread on `claims`. The listener thread is stopped
/// when it returns, the claim thread too.
pub(in crate::store) fn run(
    mut pg: Pg,
    claims: super::claimer::Claims,
    ops: mpsc::Receiver<Msg>,
    done: mpsc::Sender<Completion>,
    waker: Arc<mio::Waker>,
    latency: Arc<crate::store::latency::CommitLatency>,
    link: crate::store::HandleLink,
) -> Result<(), StoreError> {
    struct StopListener(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for StopListener {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _stop = StopListener(Arc::clone(&closed));
    if pg.notify {
        let (url, tx) = (pg.url.clone(), link.ops.clone());
        std::thread::Builder::new()
            .name("jobvisor-listen".into())
            .spawn(move || super::cluster::listen(url, tx, closed))
            .map_err(|e| StoreError::Thread {
                path: pg.display().into(),
                reason: format!("could not start its listener ({e})"),
            })?;
    }
    drop(link.ops);
    let claimer = claims.tx;
    struct StopClaims(mpsc::Sender<ClaimMsg>);
    impl Drop for StopClaims {
        fn drop(&mut self) {
            let _ = self.0.send(ClaimMsg::Stop);
        }
    }
    let _stop_claims = StopClaims(claimer.clone());
    let claim_thread =
        super::claimer::start(claims.pg, claims.rx, done.clone(), Arc::clone(&waker))?;
    let alive = link.alive;
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
    let mut beat_at = Instant::now() + HEARTBEAT;
    // Without notifications, polling is the only wake-up.
    let poll = if pg.notify {
        POLL
    } else {
        crate::store::POLL_WITHOUT_NOTIFY
    };
    let mut poll_at = Instant::now() + poll;
    let mut rng = fastrand::Rng::new();
    let mut cluster = ClusterState::default();
    let mut closing = false;
    loop {
        // The handle is gone (dropped without `close`, as when the daemon
        // dies): stop, as the SQLite committer does on a closed channel.
        if alive.upgrade().is_none() {
            return Ok(());
        }
        // A claim thread that stopped (a bug: it panicked) would leave the
        // node taking no work, silently: fail the store instead.
        if claim_thread.is_finished() {
            return Err(StoreError::Thread {
                path: pg.display().into(),
                reason: "its claim thread stopped".into(),
            });
        }
        let deadline = [Some(prune_at), Some(beat_at), Some(poll_at), retry_at]
            .into_iter()
            .flatten()
            .min()
            .expect("some deadline");
        let first = match ops.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(m) => Some(m),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        };
        let mut batch: Vec<(u64, Op)> = retry.drain(..).collect();
        let mut notices = Vec::new();
        let mut take = |m: Msg, batch: &mut Vec<(u64, Op)>| match m {
            Msg::Op { seq, op } => batch.push((seq, op)),
            Msg::Close => closing = true,
            Msg::Notify(n) => notices.push(n),
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
        let now = Instant::now();
        // The cluster's timers and wake-ups.
        let mut wake_pools: Vec<String> = Vec::new();
        let mut poll_all = false;
        // A completion went to the loop: wake it.
        let mut told_loop = false;
        for n in notices {
            match n {
                // A key was freed: its jobs may be of any pool.
                Notice::Queued(pool) if pool == "*" => poll_all = true,
                // A pool, or `sem:NAME` (a semaphore was freed: the pools
                // using it; the claim thread knows them).
                Notice::Queued(pool) => wake_pools.push(pool),
                Notice::Done(ids) => {
                    let ids: Vec<u64> = ids
                        .into_iter()
                        .filter(|i| cluster.watch.remove(i))
                        .collect();
                    if !ids.is_empty() {
                        let _ = done.send(Completion::RemoteDone { ids });
                        told_loop = true;
                    }
                }
                Notice::Reconnected => poll_all = true,
                Notice::Cancel { node, id } if node == pg.node() => {
                    if cluster.cancels.insert(id) {
                        let _ = done.send(Completion::CancelRequested { ids: vec![id] });
                        told_loop = true;
                    }
                }
                Notice::Cancel { .. } => {}
            }
        }
        if now >= beat_at {
            let late = now - beat_at;
            if late > HEARTBEAT * 2 {
                crate::warn!(
                    "store {}: this node's heartbeat is {late:.1?} late (the machine is overloaded, or the store was slow); past node_timeout ({:?}) the other nodes declare it dead",
                    pg.display(),
                    pg.node_timeout
                );
            }
            match pg.heartbeat() {
                Ok(pools) => wake_pools.extend(pools),
                Err(e) => {
                    pg.suspect = true;
                    crate::warn!("store {}: heartbeat failed: {e}", pg.display());
                }
            }
            beat_at = now + HEARTBEAT;
        }
        if now >= poll_at {
            poll_all = true;
            let jitter = poll.as_millis() as u64 / 4;
            poll_at = now + poll + Duration::from_millis(rng.u64(0..=jitter));
        }
        if batch.is_empty() && !closing {
            wake_claims(&claimer, wake_pools, poll_all);
            let mut sent = false;
            if poll_all {
                sent |= poll_cancels(&mut pg, &mut cluster, &done);
            }
            if poll_all && !cluster.watch.is_empty() {
                let all: Vec<u64> = cluster.watch.iter().copied().collect();
                sent |= report_finished(&mut pg, &mut cluster, &done, &all);
            }
            if told_loop {
                sent = true;
            }
            if now >= prune_at {
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
            // The loop sleeps unless there is news for it.
            if sent {
                let _ = waker.wake();
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
            Ok(fenced) => {
                backoff = Duration::from_millis(100);
                retry_at = None;
                if !failed.is_empty() {
                    let _ = done.send(Completion::InsertsFailed { failed });
                }
                if !fenced.is_empty() {
                    crate::warn!(
                        "store {}: results of jobs {fenced:?} refused: they were given to another node (this one was declared dead meanwhile)",
                        pg.display()
                    );
                    let _ = done.send(Completion::Fenced { ids: fenced });
                }
                if upto > 0 {
                    let _ = done.send(Completion::Durable { upto });
                }
                let mut watched = Vec::new();
                for (_, op) in &batch {
                    match op {
                        Op::Query { token, query } => {
                            let result = pg.query(query);
                            pg.suspect |= result.is_err();
                            let _ = done.send(Completion::Query {
                                token: *token,
                                result,
                            });
                        }
                        Op::Watch { id } => {
                            cluster.watch.insert(*id);
                            watched.push(*id);
                        }
                        // Jobs stored here: this node's own demand for
                        // their pool claims now, not on the notification's
                        // round trip through the server.
                        Op::Insert(job) if !wake_pools.contains(&job.pool) => {
                            wake_pools.push(job.pool.clone());
                        }
                        Op::ReserveIds => match pg.reserve_ids() {
                            Ok((start, end)) => {
                                let _ = done.send(Completion::Ids { start, end });
                            }
                            Err(e) => {
                                pg.suspect = true;
                                crate::warn!(
                                    "store {}: cannot reserve job ids ({}); retrying",
                                    pg.display(),
                                    one_line(&e)
                                );
                                retry.push_back((0, Op::ReserveIds));
                                retry_at = Some(Instant::now() + backoff);
                            }
                        },
                        _ => {}
                    }
                }
                // A job may have finished before it was watched.
                if !watched.is_empty() {
                    report_finished(&mut pg, &mut cluster, &done, &watched);
                }
                wake_claims(&claimer, wake_pools, poll_all);
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
                        // (A claim is a no-op here: the `Store` handle sent
                        // its demand to the claim thread; only its number is
                        // reported.)
                        Op::Update(_)
                        | Op::Retention { .. }
                        | Op::Claim { .. }
                        | Op::Watch { .. }
                        | Op::ReserveIds => retry.push_back((seq, op)),
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
            // No claim after this node hands its jobs back.
            let _ = claimer.send(ClaimMsg::Stop);
            let _ = claim_thread.join();
            return if retry.iter().all(|(_, op)| !matches!(op, Op::Update(_))) {
                if let Err(e) = pg.leave() {
                    crate::warn!(
                        "store {}: could not hand this node's jobs back ({e}); other nodes take them once its heartbeat is old",
                        pg.display()
                    );
                }
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

/// Tells the claim thread which demands to try: those of `pools`, or all.
fn wake_claims(claimer: &mpsc::Sender<ClaimMsg>, pools: Vec<String>, all: bool) {
    if all || !pools.is_empty() {
        let _ = claimer.send(ClaimMsg::Wake { pools, all });
    }
}

/// Passes on the cancels asked of this node that were not yet (their
/// notification missed); true if it sent any.
fn poll_cancels(pg: &mut Pg, cluster: &mut ClusterState, done: &mpsc::Sender<Completion>) -> bool {
    let Ok(now) = pg.cancels_requested() else {
        pg.suspect = true;
        return false;
    };
    let now: HashSet<u64> = now.into_iter().collect();
    let new: Vec<u64> = now.difference(&cluster.cancels).copied().collect();
    cluster.cancels = now;
    if new.is_empty() {
        return false;
    }
    let _ = done.send(Completion::CancelRequested { ids: new });
    true
}

/// Reports which of the watched `ids` have finished (a poll: their
/// notification may have been missed, or have come before the watch).
fn report_finished(
    pg: &mut Pg,
    cluster: &mut ClusterState,
    done: &mpsc::Sender<Completion>,
    ids: &[u64],
) -> bool {
    match pg.finished_among(ids) {
        Ok(ids) if !ids.is_empty() => {
            for id in &ids {
                cluster.watch.remove(id);
            }
            let _ = done.send(Completion::RemoteDone { ids });
            true
        }
        Ok(_) => false,
        Err(_) => {
            pg.suspect = true;
            false
        }
    }
}
