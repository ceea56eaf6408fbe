//! The PostgreSQL store on a real, throwaway server (`tests/support/pg.rs`):
//! the same ops and answers as the SQLite store, recovery, a second daemon
//! refused, a newer schema refused, and a server restart survived.

use super::*;

#[path = "../../../tests/support/pg.rs"]
mod testpg;
use testpg::TestPg;

impl Harness {
    fn open_pg(url: &str) -> (Harness, Recovered) {
        let poll = Poll::new().expect("poll");
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).expect("waker"));
        let (store, recovered) = match Store::open_postgres(url, waker) {
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
fn jobs_round_trip_and_recover_on_postgres() {
    let Some((pg, url)) = TestPg::with_db("store-rt") else {
        return;
    };
    let (mut h, recovered) = Harness::open_pg(&url);
    assert_eq!((recovered.jobs.len(), recovered.next_id), (0, 1));
    // Three jobs: one finishes with a large output, one is left running,
    // one queued.
    for id in 1..=3 {
        h.submit(Op::Insert(new_job(id, "p")));
    }
    let big: Arc<[u8]> = (0..3 << 20).map(|i| i as u8).collect::<Vec<u8>>().into();
    // Recent: older finished jobs would be pruned (default retention).
    let mut done = finished_update(1, JobState::Succeeded, super::super::db::now_ms());
    done.output = Some(Arc::clone(&big));
    h.submit(Op::Update(done));
    let seq = h.submit(running(2, vec![attempt(1, None)]));
    h.wait_durable(seq);
    let doc = h.job(1).expect("job 1");
    assert_eq!(doc.state, JobState::Succeeded);
    assert_eq!(doc.output.as_ref().map(|b| b.0.as_slice()), Some(&big[..]));
    assert_eq!(h.list(Some("p"), None, 10), vec![3, 2, 1]);
    assert_eq!(h.list(None, Some(JobState::Running), 10), vec![2]);
    assert!(h.job(99).is_none());
    // The daemon dies (no close): the next one requeues the running job
    // with its attempt lost, and keeps ids growing.
    drop(h);
    let (mut h, recovered) = Harness::open_pg(&url);
    let ids: Vec<u64> = recovered.jobs.iter().map(|j| j.job.id).collect();
    assert_eq!(ids, vec![2, 3]);
    let two = &recovered.jobs[0];
    assert_eq!(two.attempts[0].outcome, Some(Outcome::Lost));
    assert_eq!(two.job.input.as_ref(), b"input 2");
    assert_eq!(recovered.next_id, 4);
    assert_eq!(recovered.counts["p"][&JobState::Succeeded], 1);
    assert_eq!(recovered.counts["p"][&JobState::Queued], 2);
    // Retry of a finished job, prune.
    let seq = h.submit(finished(3, JobState::Failed, super::super::db::now_ms()));
    h.wait_durable(seq);
    match h.query(Query::Retry { id: 3, owner: None }) {
        QueryResult::Retry(Retried::Queued(j)) => assert_eq!(j.job.max_attempts, 3),
        r => panic!("{r:?}"),
    }
    match h.query(Query::Retry { id: 1, owner: None }) {
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
    assert!(h.job(1).is_none());
    drop(pg);
}

#[test]
fn a_second_daemon_and_a_newer_schema_are_refused() {
    let Some((pg, url)) = TestPg::with_db("store-refuse") else {
        return;
    };
    let (h, _) = Harness::open_pg(&url);
    let poll = Poll::new().unwrap();
    let waker = Arc::new(Waker::new(poll.registry(), Token(0)).unwrap());
    match Store::open_postgres(&url, Arc::clone(&waker)) {
        Err(e @ StoreError::PostgresInUse { .. }) => {
            assert!(e.to_string().contains("in use by another jobvisord"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a second daemon opened the same database"),
    }
    drop(h);
    pg.psql("jv", "INSERT INTO jobvisor_schema VALUES (99)");
    match Store::open_postgres(&url, waker) {
        Err(e @ StoreError::TooNew { .. }) => {
            assert!(e.to_string().contains("schema version 99"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a newer schema was used"),
    }
    let bad = format!("postgres://jobvisor@127.0.0.1:{}/nope", pg.port());
    let poll2 = Poll::new().unwrap();
    match Store::open_postgres(
        &bad,
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
    assert_eq!(ids(&recovered), vec![2]);
    assert_eq!(recovered.next_id, 3);
    assert_eq!(
        pg.psql("jv", "SELECT max(version) FROM jobvisor_schema"),
        "2"
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
