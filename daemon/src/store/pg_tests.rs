//! The PostgreSQL store on a real, throwaway server (`tests/support/pg.rs`):
//! the same ops and answers as the SQLite store, recovery, a second daemon
//! refused, a newer schema refused, and a server restart survived.

use super::*;

#[path = "../../../tests/support/pg.rs"]
mod testpg;
use testpg::TestPg;

impl Harness {
    /// Claims jobs of `pool` for this node, waiting until there are some.
    fn claim(&mut self, pool: &str, max: u32) -> Vec<RecoveredJob> {
        self.submit(Op::Claim {
            pool: pool.to_string(),
            max,
            sems: Vec::new(),
        });
        loop {
            match self.next() {
                Completion::Claimed { pool: p, jobs } if p == pool => return jobs,
                Completion::Durable { .. } => {}
                c => panic!("unexpected {c:?}"),
            }
        }
    }

    /// [`Self::claim`], or nothing if none is queued (the demand is then
    /// dropped).
    fn try_claim(&mut self, pool: &str, max: u32) -> Vec<RecoveredJob> {
        self.try_claim_sems(pool, max, &[])
    }

    /// [`Self::try_claim`] for a pool holding semaphores `sems` (name,
    /// limit).
    fn try_claim_sems(&mut self, pool: &str, max: u32, sems: &[(&str, u32)]) -> Vec<RecoveredJob> {
        let seq = self.submit(Op::Claim {
            pool: pool.to_string(),
            max,
            sems: sems.iter().map(|(n, l)| (n.to_string(), *l)).collect(),
        });
        let deadline = Instant::now() + Duration::from_millis(300);
        let mut durable = false;
        loop {
            if let Some(c) = self.store.try_completion() {
                match c {
                    Completion::Claimed { jobs, .. } => return jobs,
                    Completion::Durable { upto } if upto >= seq => durable = true,
                    Completion::Durable { .. } => {}
                    c => panic!("unexpected {c:?}"),
                }
                continue;
            }
            if durable && Instant::now() >= deadline {
                // Withdrawn, so that no later wake-up claims for it.
                self.submit(Op::Claim {
                    pool: pool.to_string(),
                    max: 0,
                    sems: Vec::new(),
                });
                return Vec::new();
            }
            let _ = self
                .poll
                .poll(&mut self.events, Some(Duration::from_millis(20)));
        }
    }

    fn open_pg(url: &str) -> (Harness, Recovered) {
        let poll = Poll::new().expect("poll");
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).expect("waker"));
        let (store, recovered) = match Store::open_postgres(&store_config(url), waker) {
            Ok(x) => x,
            Err(e) => panic!("open {url}: {e}"),
        };
        let h = Harness {
            store,
            payloads: PathBuf::new(),
            poll,
            events: Events::with_capacity(8),
            next_token: 1_000_000,
        };
        (h, recovered)
    }
}

#[test]
fn jobs_are_claimed_run_and_a_dead_nodes_jobs_claimed_again() {
    let Some((pg, url)) = TestPg::with_db("store-rt") else {
        return;
    };
    let (mut h, recovered) = Harness::open_pg(&url);
    assert!(recovered.jobs.is_empty());
    assert!(recovered.id_end > recovered.next_id, "{recovered:?}");
    // Ids come in blocks, cluster-wide.
    let base = recovered.next_id;
    for id in base..base + 3 {
        h.submit(Op::Insert(new_job(id, "p")));
    }
    let claimed = h.claim("p", 2);
    assert_eq!(
        claimed.iter().map(|j| j.job.id).collect::<Vec<_>>(),
        vec![base, base + 1]
    );
    let big: Arc<[u8]> = (0..3 << 20).map(|i| i as u8).collect::<Vec<u8>>().into();
    let mut done = finished_update(base, JobState::Succeeded, super::super::db::now_ms());
    done.output = Some(Arc::clone(&big));
    h.submit(Op::Update(done));
    let seq = h.submit(running(base + 1, vec![attempt(1, None)]));
    h.wait_durable(seq);
    let doc = h.job(base).expect("the first job");
    assert_eq!(doc.state, JobState::Succeeded);
    assert_eq!(doc.output.as_ref().map(|b| b.0.as_slice()), Some(&big[..]));
    assert_eq!(h.list(Some("p"), None, 10), vec![base + 2, base + 1, base]);
    assert_eq!(h.list(None, Some(JobState::Running), 10), vec![base + 1]);
    assert!(h.job(1).is_none());
    // This node dies (no close): another one sweeps it once its heartbeat
    // is old, and claims its running job (the attempt closed as lost) and
    // the queued one.
    drop(h);
    let (mut h, recovered) = Harness::open_pg(&url);
    assert!(
        recovered.next_id >= base + (1 << 20),
        "a new block: {recovered:?}"
    );
    assert_eq!(recovered.counts["p"][&JobState::Succeeded], 1);
    let started = Instant::now();
    // The queued job at once; the dead node's once the sweep has run.
    let mut got = h.claim("p", 10);
    while got.len() < 2 {
        got.extend(h.claim("p", 10));
    }
    got.sort_by_key(|j| j.job.id);
    assert_eq!(
        got.iter().map(|j| j.job.id).collect::<Vec<_>>(),
        vec![base + 1, base + 2]
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(got[0].attempts[0].outcome, Some(Outcome::Lost));
    assert_eq!(
        got[0].job.input.as_ref(),
        format!("input {}", base + 1).as_bytes()
    );
    // Retry of a finished job puts it back in the shared queue; prune.
    let seq = h.submit(finished(
        base + 2,
        JobState::Failed,
        super::super::db::now_ms(),
    ));
    h.wait_durable(seq);
    match h.query(Query::Retry {
        id: base + 2,
        owner: None,
    }) {
        QueryResult::Retry(Retried::Queued(j)) => assert_eq!(j.job.max_attempts, 3),
        r => panic!("{r:?}"),
    }
    assert_eq!(h.claim("p", 5).len(), 1);
    match h.query(Query::Retry {
        id: base,
        owner: None,
    }) {
        QueryResult::Retry(Retried::NotRetryable(JobState::Succeeded)) => {}
        r => panic!("{r:?}"),
    }
    match h.query(Query::Prune {
        finished_before_ms: u64::MAX,
        state: None,
        pool: None,
        owner: None,
        limit: 100,
    }) {
        QueryResult::Pruned(1) => {}
        r => panic!("{r:?}"),
    }
    assert!(h.job(base).is_none());
    drop(pg);
}

#[test]
fn two_nodes_never_claim_one_job_twice_and_a_stale_result_is_fenced() {
    let Some((pg, url)) = TestPg::with_db("store-nodes") else {
        return;
    };
    let (mut a, ra) = Harness::open_pg(&url);
    let (mut b, rb) = Harness::open_pg(&url);
    assert!(ra.next_id + (1 << 20) <= rb.next_id || rb.next_id + (1 << 20) <= ra.next_id);
    let mut last = 0;
    for id in ra.next_id..ra.next_id + 500 {
        last = a.submit(Op::Insert(new_job(id, "p")));
    }
    a.wait_durable(last);
    // Both claim in turns until the queue is empty: every job once.
    let mut seen = std::collections::BTreeSet::new();
    loop {
        let (ja, jb) = (a.try_claim("p", 37), b.try_claim("p", 41));
        if ja.is_empty() && jb.is_empty() {
            break;
        }
        for j in ja.iter().chain(&jb) {
            assert!(seen.insert(j.job.id), "job {} claimed twice", j.job.id);
        }
    }
    assert_eq!(seen.len(), 500);
    // Fencing: a job of A's goes to B (as a sweep of a dead A would do);
    // A's late result is refused, B's recorded.
    let id = rb.next_id;
    let seq = b.submit(Op::Insert(new_job(id, "q")));
    b.wait_durable(seq);
    assert_eq!(a.claim("q", 1).len(), 1);
    pg.psql(
        "jv",
        &format!("UPDATE jobvisor_jobs SET node = NULL WHERE id = {id}"),
    );
    assert_eq!(b.claim("q", 1).len(), 1);
    a.submit(finished(id, JobState::Failed, super::super::db::now_ms()));
    let fenced = loop {
        match a.next() {
            Completion::Fenced { ids } => break ids,
            Completion::Durable { .. } => {}
            c => panic!("unexpected {c:?}"),
        }
    };
    assert_eq!(fenced, vec![id]);
    let seq = b.submit(finished(
        id,
        JobState::Succeeded,
        super::super::db::now_ms(),
    ));
    b.wait_durable(seq);
    assert_eq!(b.job(id).expect("stored").state, JobState::Succeeded);
    // A watch on a finished job is answered at once.
    a.submit(Op::Watch { id });
    loop {
        match a.next() {
            Completion::RemoteDone { ids } => break assert_eq!(ids, vec![id]),
            Completion::Durable { .. } => {}
            c => panic!("unexpected {c:?}"),
        }
    }
}

#[test]
fn a_newer_schema_and_a_bad_url_are_refused() {
    let Some((pg, url)) = TestPg::with_db("store-refuse") else {
        return;
    };
    let (h, _) = Harness::open_pg(&url);
    drop(h);
    let poll = Poll::new().unwrap();
    let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
    pg.psql("jv", "INSERT INTO jobvisor_schema VALUES (99)");
    match Store::open_postgres(&store_config(&url), waker) {
        Err(e @ StoreError::TooNew { .. }) => {
            assert!(e.to_string().contains("schema version 99"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a newer schema was used"),
    }
    let bad = format!("postgres://jobvisor@127.0.0.1:{}/nope", pg.port());
    let poll2 = Poll::new().unwrap();
    match Store::open_postgres(
        &store_config(&bad),
        Arc::new(Waker::new(poll2.registry(), Token(1)).unwrap()),
    ) {
        Err(e @ StoreError::Postgres { .. }) => {
            assert!(e.to_string().contains("cannot connect"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a missing database was used"),
    }
}

#[test]
fn a_server_restart_loses_no_acknowledged_job_and_the_store_reconnects() {
    let Some((pg, url)) = TestPg::with_db("store-restart") else {
        return;
    };
    let (mut h, _) = Harness::open_pg(&url);
    let seq = h.submit(Op::Insert(new_job(1, "p")));
    h.wait_durable(seq);
    pg.restart_immediate();
    // The first batch after the restart may fail (the connection is
    // gone): its insert is reported lost, its update is kept and retried.
    h.submit(Op::Insert(new_job(2, "p")));
    let update = h.submit(finished(1, JobState::Succeeded, super::super::db::now_ms()));
    let mut lost = Vec::new();
    loop {
        match h.next() {
            Completion::Durable { upto } if upto >= update => break,
            Completion::Failed { lost_inserts, .. } => lost.extend(lost_inserts),
            _ => {}
        }
    }
    assert!(lost.is_empty() || lost == vec![2], "{lost:?}");
    assert_eq!(h.job(1).expect("job 1").state, JobState::Succeeded);
    // Job 2 is stored unless its client was told it was lost.
    assert_eq!(h.job(2).is_some(), lost.is_empty());
}

#[test]
fn a_flood_of_inserts_and_updates_is_batched_and_the_last_update_wins() {
    let Some((_pg, url)) = TestPg::with_db("store-flood") else {
        return;
    };
    let (mut h, _) = Harness::open_pg(&url);
    // Submitted back to back: batches hold a job's insert and several of
    // its updates together (one statement each for inserts and updates:
    // only a job's last update may be applied).
    let mut last = 0;
    for id in 1..=3000 {
        h.submit(Op::Insert(new_job(id, "p")));
        h.submit(running(id, vec![attempt(1, None)]));
        let mut done = finished_update(id, JobState::Succeeded, super::super::db::now_ms());
        done.output = Some(format!("out {id}").into_bytes().into());
        last = h.submit(Op::Update(done));
    }
    h.wait_durable(last);
    assert_eq!(h.list(None, Some(JobState::Succeeded), 5000).len(), 3000);
    for id in [1, 1500, 3000] {
        let doc = h.job(id).expect("stored");
        assert_eq!(doc.state, JobState::Succeeded);
        assert_eq!(doc.output.unwrap().0, format!("out {id}").into_bytes());
        assert_eq!(doc.attempts[0].outcome, Some(Outcome::Succeeded));
    }
}

#[test]
fn finished_jobs_leave_the_queue_table_and_old_days_are_dropped_whole() {
    let Some((pg, url)) = TestPg::with_db("store-done") else {
        return;
    };
    // A version 1 store, as the first PostgreSQL release wrote it: one
    // finished job (two days ago) and one queued job in one table.
    pg.psql(
        "jv",
        &format!(
            "CREATE TABLE jobvisor_schema (version integer NOT NULL); \
             INSERT INTO jobvisor_schema VALUES (1); {}",
            super::super::pg::SCHEMA_V1
        ),
    );
    let two_days_ago = super::super::db::now_ms() - 2 * 86_400_000;
    pg.psql(
        "jv",
        &format!(
            "INSERT INTO jobvisor_jobs (id, pool, state, priority, max_attempts, created_ms, \
             finished_ms, attempts, owner, input) VALUES \
             (1, 'p', 2, 0, 3, 1, {two_days_ago}, '[]', 0, '\\x00'), \
             (2, 'p', 0, 0, 3, 1, NULL, '[]', 0, '\\x01')"
        ),
    );
    let (mut h, recovered) = Harness::open_pg(&url);
    // A long retention first (the test build prunes every 100 ms), so the
    // two-day-old job stays until the shorter one below.
    h.submit(Op::Retention {
        per_pool: BTreeMap::new(),
        default: Duration::from_secs(30 * 86_400),
        max_finished: u64::MAX,
    });
    // Nodes claim jobs: none is handed over at start.
    assert!(recovered.jobs.is_empty());
    assert!(recovered.next_id > 2, "{recovered:?}");
    assert_eq!(
        pg.psql("jv", "SELECT max(version) FROM jobvisor_schema"),
        super::super::pg::SCHEMA_VERSION.to_string()
    );
    // Names compare as bytes (version 8), in every table that has them.
    assert_eq!(
        pg.psql(
            "jv",
            "SELECT string_agg(table_name || '.' || column_name || ' ' || \
             coalesce(collation_name, '?'), ', ' ORDER BY table_name, column_name) \
             FROM information_schema.columns WHERE table_name LIKE 'jobvisor_%' \
             AND column_name IN ('pool', 'key', 'sem') \
             AND table_name NOT LIKE 'jobvisor_done_d%'"
        ),
        "jobvisor_all.key C, jobvisor_all.pool C, jobvisor_done.key C, jobvisor_done.pool C, \
         jobvisor_jobs.key C, jobvisor_jobs.pool C, jobvisor_keys.key C, jobvisor_sem_holds.sem C"
    );
    assert_eq!(pg.psql("jv", "SELECT count(*) FROM jobvisor_jobs"), "1");
    assert_eq!(pg.psql("jv", "SELECT id FROM jobvisor_done"), "1");
    assert_eq!(h.job(1).expect("finished job 1").state, JobState::Succeeded);
    // Jobs that finish now move too; the queue table keeps only the
    // active ones.
    let mut last = 0;
    for id in 3..=10 {
        h.submit(Op::Insert(new_job(id, "p")));
    }
    for id in 3..=10 {
        last = h.submit(finished(
            id,
            JobState::Succeeded,
            super::super::db::now_ms(),
        ));
    }
    h.wait_durable(last);
    assert_eq!(pg.psql("jv", "SELECT count(*) FROM jobvisor_jobs"), "1");
    assert_eq!(pg.psql("jv", "SELECT count(*) FROM jobvisor_done"), "9");
    assert_eq!(h.list(Some("p"), None, 100).len(), 10);
    // A retry brings a finished job back to the queue table.
    let seq = h.submit(finished(2, JobState::Failed, super::super::db::now_ms()));
    h.wait_durable(seq);
    match h.query(Query::Retry { id: 2, owner: None }) {
        QueryResult::Retry(Retried::Queued(j)) => assert_eq!(j.job.input.as_ref(), b"\x01"),
        r => panic!("{r:?}"),
    }
    assert_eq!(
        pg.psql("jv", "SELECT state FROM jobvisor_jobs WHERE id = 2"),
        "0"
    );
    // A one-day retention drops the partition of two days ago whole (and
    // its job with it), keeps today's.
    h.submit(Op::Retention {
        per_pool: BTreeMap::new(),
        default: Duration::from_secs(86_400),
        max_finished: u64::MAX,
    });
    wait_until("the old partition dropped", || {
        pg.psql(
            "jv",
            &format!(
                "SELECT count(*) FROM pg_class WHERE relname = 'jobvisor_done_d{}'",
                two_days_ago / 86_400_000
            ),
        ) == "0"
    });
    assert!(h.job(1).is_none());
    assert_eq!(pg.psql("jv", "SELECT count(*) FROM jobvisor_done"), "8");
}

/// Waits (polling, bounded) until `f` holds.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `[store]` section with `url`.
fn store_config(url: &str) -> crate::config::StoreConfig {
    crate::config::StoreConfig {
        url: Some(url.to_string()),
        ..Default::default()
    }
}

/// The ids of claimed jobs.
fn ids(jobs: &[RecoveredJob]) -> Vec<u64> {
    jobs.iter().map(|j| j.job.id).collect()
}

#[test]
fn keys_and_semaphores_hold_across_nodes() {
    let Some((pg, url)) = TestPg::with_db("store-holds") else {
        return;
    };
    let (mut a, ra) = Harness::open_pg(&url);
    let (mut b, _) = Harness::open_pg(&url);
    let now = super::super::db::now_ms;
    // Three jobs with key "k", one without.
    let base = ra.next_id;
    let mut last = 0;
    for (i, key) in [Some("k"), Some("k"), None, Some("k")]
        .into_iter()
        .enumerate()
    {
        let mut j = new_job(base + i as u64, "p");
        j.key = key.map(String::from);
        last = a.submit(Op::Insert(j));
    }
    a.wait_durable(last);
    // One claim takes one job of the key (the first), and the unkeyed one.
    assert_eq!(ids(&a.try_claim("p", 10)), vec![base, base + 2]);
    // The key is held: the other node gets nothing, nor does A again.
    assert!(b.try_claim("p", 10).is_empty());
    assert!(a.try_claim("p", 10).is_empty());
    // The holder ends: the next job of the key goes to whoever claims.
    let seq = a.submit(finished(base, JobState::Succeeded, now()));
    a.wait_durable(seq);
    assert_eq!(ids(&b.try_claim("p", 10)), vec![base + 1]);
    assert!(a.try_claim("p", 10).is_empty());
    // A holder whose node dies frees the key (the sweep's requeue).
    pg.psql(
        "jv",
        "UPDATE jobvisor_nodes SET heartbeat_at = now() - interval '1 minute'",
    );
    wait_until("the sweep of both nodes", || {
        pg.psql("jv", "SELECT count(*) FROM jobvisor_keys") == "0"
    });

    // Semaphore "s" of limit 3, held by the jobs of two pools.
    let (mut c, rc) = Harness::open_pg(&url);
    let (mut d, _) = Harness::open_pg(&url);
    let base = rc.next_id;
    let mut last = 0;
    for i in 0..8 {
        let pool = if i % 2 == 0 { "s1" } else { "s2" };
        last = c.submit(Op::Insert(new_job(base + i, pool)));
    }
    c.wait_durable(last);
    let on_c = ids(&c.try_claim_sems("s1", 2, &[("s", 3)]));
    assert_eq!(on_c.len(), 2);
    assert_eq!(d.try_claim_sems("s2", 4, &[("s", 3)]).len(), 1);
    assert!(d.try_claim_sems("s1", 4, &[("s", 3)]).is_empty());
    assert!(c.try_claim_sems("s2", 4, &[("s", 3)]).is_empty());
    assert_eq!(
        pg.psql("jv", "SELECT count(*) FROM jobvisor_sem_holds"),
        "3"
    );
    // C's two end: two more may run, and no more.
    let mut last = 0;
    for id in &on_c {
        last = c.submit(finished(*id, JobState::Succeeded, now()));
    }
    c.wait_durable(last);
    assert_eq!(d.try_claim_sems("s2", 4, &[("s", 3)]).len(), 2);
    assert!(c.try_claim_sems("s1", 4, &[("s", 3)]).is_empty());
    assert_eq!(
        pg.psql("jv", "SELECT count(*) FROM jobvisor_sem_holds"),
        "3"
    );
}

#[test]
fn a_node_declared_dead_claims_nothing() {
    let Some((pg, url)) = TestPg::with_db("store-dead-claim") else {
        return;
    };
    let (mut a, ra) = Harness::open_pg(&url);
    // Declared dead by the others (a sweep): until its heartbeat finds
    // out and it rejoins, its claims take nothing; so the job it claims
    // is claimed by the node it is after rejoining, never in the name of
    // the dead one (which no sweep would look at again).
    pg.psql("jv", "UPDATE jobvisor_nodes SET gone = true");
    let seq = a.submit(Op::Insert(new_job(ra.next_id, "p")));
    a.wait_durable(seq);
    assert_eq!(a.claim("p", 10).len(), 1);
    assert_eq!(
        pg.psql(
            "jv",
            "SELECT n.gone FROM jobvisor_jobs j JOIN jobvisor_nodes n ON n.id = j.node"
        ),
        "f"
    );
}
