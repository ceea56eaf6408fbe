//! The claim thread: a node's second connection, which claims jobs while
//! the store thread's connection writes. On a busy node the two run side by
//! side (the server gives each its own backend), so a claim never waits for
//! a batch of results to commit, nor a batch for a claim.
//!
//! It holds the daemon's demands (`Op::Claim`, which the `Store` handle
//! sends here directly: a demand never waits behind a batch being
//! committed) and tries them at once, and when the store thread says so: a
//! wake-up for some pools (a notification, jobs this node stored) or for
//! all (a poll, a reconnection). Claimed jobs go straight to the loop. Its claims are
//! recorded in the node's [`super::Shared`] state before they are sent, so
//! the store thread fences every update of them.

use super::cluster::Sems;
use super::*;

/// What the store thread tells the claim thread.
pub(in crate::store) enum ClaimMsg {
    /// The daemon's demand for `pool` (`max` 0: none).
    Demand { pool: String, max: u32, sems: Sems },
    /// Jobs may be queued for these pools (`sem:NAME`: for the pools that
    /// use semaphore NAME), or for any with `all`.
    Wake { pools: Vec<String>, all: bool },
    /// Stop, after the claim under way (the store thread's, when it ends).
    Stop,
}

/// What the store thread needs to start the claim thread: its connection
/// (see [`Pg::second`]) and both ends of its channel (the `Store` handle
/// holds another sender).
pub(in crate::store) struct Claims {
    pub(in crate::store) pg: Pg,
    pub(in crate::store) tx: mpsc::Sender<ClaimMsg>,
    pub(in crate::store) rx: mpsc::Receiver<ClaimMsg>,
}

/// Starts the claim thread on `pg` (see [`Pg::second`]), taking its
/// messages from `rx`.
pub(super) fn start(
    pg: Pg,
    rx: mpsc::Receiver<ClaimMsg>,
    done: mpsc::Sender<Completion>,
    waker: Arc<mio::Waker>,
) -> Result<std::thread::JoinHandle<()>, StoreError> {
    let path = pg.display();
    let thread = std::thread::Builder::new()
        .name("jobvisor-claim".into())
        .spawn(move || run(pg, rx, done, waker))
        .map_err(|e| StoreError::Thread {
            path: path.into(),
            reason: format!("could not start its claim thread ({e})"),
        })?;
    Ok(thread)
}

fn run(
    mut pg: Pg,
    rx: mpsc::Receiver<ClaimMsg>,
    done: mpsc::Sender<Completion>,
    waker: Arc<mio::Waker>,
) {
    // Held demands: the pool's most jobs wanted and its semaphores.
    let mut demands: BTreeMap<String, (u32, Sems)> = BTreeMap::new();
    while let Ok(first) = rx.recv() {
        let mut wake: Vec<String> = Vec::new();
        let mut all = false;
        let mut stop = false;
        let mut take = |m: ClaimMsg, demands: &mut BTreeMap<String, (u32, Sems)>| match m {
            ClaimMsg::Demand { pool, max: 0, .. } => {
                demands.remove(&pool);
            }
            ClaimMsg::Demand { pool, max, sems } => {
                wake.push(pool.clone());
                demands.insert(pool, (max, sems));
            }
            ClaimMsg::Wake { pools, all: a } => {
                all |= a;
                wake.extend(pools);
            }
            ClaimMsg::Stop => stop = true,
        };
        take(first, &mut demands);
        while let Ok(m) = rx.try_recv() {
            take(m, &mut demands);
        }
        if stop {
            return;
        }
        let wanted: Vec<(String, u32, Sems)> = demands
            .iter()
            .filter(|(pool, (_, sems))| {
                all || wake.iter().any(|w| match w.strip_prefix("sem:") {
                    Some(sem) => sems.iter().any(|(n, _)| n == sem),
                    None => w == *pool,
                })
            })
            .map(|(p, (n, sems))| (p.clone(), *n, sems.clone()))
            .collect();
        let mut sent = false;
        for (pool, max, sems) in wanted {
            match pg.claim(&pool, max, &sems) {
                Ok(jobs) if jobs.is_empty() => {}
                Ok(jobs) => {
                    // Answered: the daemon asks again once it has room.
                    demands.remove(&pool);
                    let _ = done.send(Completion::Claimed { pool, jobs });
                    sent = true;
                }
                Err(e) => {
                    pg.suspect = true;
                    crate::warn!(
                        "store {}: claiming jobs of pool {pool} failed: {e}",
                        pg.display()
                    );
                }
            }
        }
        if sent {
            let _ = waker.wake();
        }
    }
}
