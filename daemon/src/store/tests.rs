//! Store tests on real files in a temporary directory.

use super::committer::{Stats, TestHook, Tuning};
use super::db::{LOST_ON_RESTART, SCHEMA_VERSION};
use super::spares::{SPARE_MAX_BYTES, SPARE_MAX_FILES, SPARE_TARGET};
use super::*;
use ipc_proto::control::{Attempt, JobState, Outcome};
use ipc_proto::Bytes;
use mio::{Events, Poll, Token, Waker};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

const DEADLINE: Duration = Duration::from_secs(120);
const HOUR_MS: u64 = 3_600_000;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("jobvisor-store-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn db(&self) -> PathBuf {
        self.0.join("jobs.db")
    }

    fn payloads(&self) -> PathBuf {
        self.0.join("payloads")
    }

    /// `payloads/<id>.<ext>`.
    fn payload(&self, id: u64, ext: &str) -> PathBuf {
        self.payloads().join(format!("{id}.{ext}"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A store plus the poll its waker belongs to, as the event loop has them.
struct Harness {
    store: Store,
    /// The payload directory, to read outputs the store leaves in files.
    payloads: PathBuf,
    poll: Poll,
    events: Events,
    next_token: u64,
}

impl Harness {
    fn open(dir: &Path) -> (Harness, Recovered) {
        Harness::open_tuned(dir, Tuning::default())
    }

    fn open_tuned(dir: &Path, tuning: Tuning) -> (Harness, Recovered) {
        let poll = Poll::new().expect("poll");
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).expect("waker"));
        let (store, recovered) = match Store::open_tuned(dir, &dir.join("payloads"), waker, tuning)
        {
            Ok(x) => x,
            Err(e) => panic!("open {}: {e}", dir.display()),
        };
        let h = Harness {
            store,
            payloads: dir.join("payloads"),
            poll,
            events: Events::with_capacity(8),
            next_token: 1_000_000,
        };
        (h, recovered)
    }

    fn submit(&mut self, op: Op) -> u64 {
        self.store.submit(op)
    }

    /// The next completion, sleeping on the waker like the event loop.
    fn next(&mut self) -> Completion {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(c) = self.store.try_completion() {
                return c;
            }
            let now = Instant::now();
            assert!(now < deadline, "no completion within {DEADLINE:?}");
            self.poll
                .poll(&mut self.events, Some(deadline - now))
                .expect("poll");
        }
    }

    /// Consumes completions until every op up to `seq` is durable.
    fn wait_durable(&mut self, seq: u64) {
        loop {
            match self.next() {
                Completion::Durable { upto } if upto >= seq => return,
                Completion::Durable { .. } | Completion::Query { .. } => {}
                // Answers to cluster ops, which only their tests wait for.
                Completion::Claimed { .. }
                | Completion::RemoteDone { .. }
                | Completion::Ids { .. }
                | Completion::CancelRequested { .. } => {}
                c @ (Completion::Failed { .. }
                | Completion::InsertsFailed { .. }
                | Completion::Fenced { .. }) => {
                    panic!("unexpected {c:?}")
                }
            }
        }
    }

    fn query(&mut self, query: Query) -> QueryResult {
        self.next_token += 1;
        let token = self.next_token;
        self.submit(Op::Query { token, query });
        loop {
            match self.next() {
                Completion::Query { token: t, result } if t == token => {
                    return result.expect("query failed")
                }
                // Durable or Failed of the batch carrying the query.
                _ => {}
            }
        }
    }

    fn job(&mut self, id: u64) -> Option<JobDoc> {
        match self.query(Query::Job {
            id,
            owner: None,
            output: true,
        }) {
            QueryResult::Job(doc) => doc,
            // What the daemon hands the client: the file's contents.
            QueryResult::JobWithOutputFile(mut doc, len) => {
                assert!(doc.output.is_none());
                let bytes = std::fs::read(output_file(&self.payloads, id))
                    .expect("the output file the store vouched for");
                assert_eq!(bytes.len() as u64, len, "job {id}'s output file");
                doc.output = Some(Bytes(bytes));
                Some(doc)
            }
            r => panic!("unexpected {r:?}"),
        }
    }

    fn list(&mut self, pool: Option<&str>, state: Option<JobState>, limit: u32) -> Vec<u64> {
        let query = Query::List {
            pool: pool.map(str::to_string),
            state,
            limit,
            owner: None,
            before: None,
            since_ms: None,
        };
        match self.query(query) {
            QueryResult::List(docs) => {
                assert!(docs.iter().all(|d| d.output.is_none()));
                docs.iter().map(|d| d.id).collect()
            }
            r => panic!("unexpected {r:?}"),
        }
    }

    /// Waits until the store thread is done with the batches before: the
    /// payload files they left unreferenced are disposed of after their
    /// acknowledgement.
    fn settle(&self) {
        self.stats();
    }

    fn stats(&self) -> Stats {
        let (tx, rx) = mpsc::channel();
        self.store.test_hook(TestHook::Stats(tx));
        rx.recv().expect("stats")
    }

    fn exec(&self, sql: &str) {
        let (tx, rx) = mpsc::channel();
        self.store.test_hook(TestHook::Exec(sql.to_string(), tx));
        rx.recv().expect("exec reply").expect("exec");
    }

    fn prune_now(&self) {
        let (tx, rx) = mpsc::channel();
        self.store.test_hook(TestHook::PruneNow(tx));
        rx.recv().expect("prune reply");
    }

    /// Blocks the store thread until the returned sender is dropped, so
    /// that everything submitted meanwhile lands in one batch.
    fn pause(&self) -> mpsc::Sender<()> {
        let (tx, rx) = mpsc::channel();
        self.store.test_hook(TestHook::Pause(rx));
        tx
    }

    fn close(self) {
        self.store.close().expect("close");
    }
}

fn new_job(id: u64, pool: &str) -> NewJob {
    NewJob {
        id,
        pool: pool.to_string(),
        priority: 0,
        key: None,
        max_attempts: 3,
        timeout_ms: None,
        input: format!("input {id}").into_bytes().into(),
        input_source: None,
        created_ms: 1_700_000_000_000 + id,
        owner: 1000,
        spill: false,
        memory: false,
    }
}

fn attempt(n: u32, outcome: Option<Outcome>) -> Attempt {
    Attempt {
        n,
        worker: 1,
        pid: 4242,
        started_ms: 1_700_000_001_000,
        ended_ms: outcome.map(|_| 1_700_000_002_000),
        outcome,
        error: None,
    }
}

fn running(id: u64, attempts: Vec<Attempt>) -> Op {
    Op::Update(JobUpdate::progress(id, JobState::Running, attempts))
}

fn finished(id: u64, state: JobState, finished_ms: u64) -> Op {
    Op::Update(finished_update(id, state, finished_ms))
}

/// A job's final update: `state` at `finished_ms`, with the output
/// "output <id>" if it succeeded, the error "boom" otherwise.
fn finished_update(id: u64, state: JobState, finished_ms: u64) -> JobUpdate {
    JobUpdate {
        id,
        state,
        attempts: vec![attempt(1, Some(Outcome::Succeeded))],
        output: (state == JobState::Succeeded).then(|| format!("output {id}").into_bytes().into()),
        output_file_len: None,
        output_memory_len: None,
        error: (state != JobState::Succeeded).then(|| "boom".to_string()),
        finished_ms: Some(finished_ms),
        drop_input_file: true,
    }
}

fn ids(recovered: &Recovered) -> Vec<u64> {
    recovered.jobs.iter().map(|j| j.job.id).collect()
}

fn count(recovered: &Recovered, pool: &str, state: JobState) -> u64 {
    recovered
        .counts
        .get(pool)
        .and_then(|m| m.get(&state))
        .copied()
        .unwrap_or(0)
}

fn open_err(dir: &Path) -> StoreError {
    let poll = Poll::new().expect("poll");
    let waker = Arc::new(Waker::new(poll.registry(), Token(0)).expect("waker"));
    match Store::open(dir, waker) {
        Ok(_) => panic!("opening {} should fail", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn store_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<Store>();
}

#[test]
fn round_trip_insert_update_query() {
    let dir = TempDir::new("roundtrip");
    let (mut h, rec) = Harness::open(dir.path());
    assert!(rec.jobs.is_empty());
    assert_eq!(rec.next_id, 1);
    assert!(rec.counts.is_empty());

    let mut job = new_job(1, "a");
    job.priority = 5;
    job.key = Some("k".into());
    job.timeout_ms = Some(1500);
    let seq = h.submit(Op::Insert(job));
    assert_eq!(seq, 1);
    h.wait_durable(seq);
    let doc = h.job(1).expect("job 1");
    assert_eq!(doc.pool, "a");
    assert_eq!(doc.state, JobState::Queued);
    assert_eq!(doc.priority, 5);
    assert_eq!(doc.key.as_deref(), Some("k"));
    assert_eq!(doc.created_ms, 1_700_000_000_001);
    assert!(doc.attempts.is_empty() && doc.output.is_none() && doc.finished_ms.is_none());

    h.submit(running(1, vec![attempt(1, None)]));
    let seq = h.submit(finished(1, JobState::Succeeded, 1_700_000_003_000));
    h.wait_durable(seq);
    let doc = h.job(1).expect("job 1");
    assert_eq!(doc.state, JobState::Succeeded);
    assert_eq!(doc.output, Some(Bytes(b"output 1".to_vec())));
    assert_eq!(doc.finished_ms, Some(1_700_000_003_000));
    assert_eq!(doc.attempts, vec![attempt(1, Some(Outcome::Succeeded))]);
    assert_eq!(h.job(99), None);

    // A large input goes to `job_inputs`; it must come back intact.
    let big: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    h.submit(Op::Insert(new_job(2, "b")));
    let mut job3 = new_job(3, "a");
    job3.input = big.clone().into();
    let seq = h.submit(Op::Insert(job3));
    h.wait_durable(seq);

    assert_eq!(h.list(None, None, u32::MAX), vec![3, 2, 1]);
    assert_eq!(h.list(None, None, 1), vec![3]);
    assert_eq!(h.list(Some("a"), None, 10), vec![3, 1]);
    assert_eq!(h.list(None, Some(JobState::Succeeded), 10), vec![1]);
    assert_eq!(h.list(Some("a"), Some(JobState::Queued), 10), vec![3]);
    assert_eq!(h.list(Some("nope"), None, 10), Vec::<u64>::new());
    h.close();

    let (h, rec) = Harness::open(dir.path());
    assert_eq!(ids(&rec), vec![2, 3]);
    assert_eq!(*rec.jobs[1].job.input, *big);
    assert_eq!(rec.jobs[0].job, new_job(2, "b"));
    assert_eq!(rec.next_id, 4);
    assert_eq!(count(&rec, "a", JobState::Succeeded), 1);
    assert_eq!(count(&rec, "a", JobState::Queued), 1);
    assert_eq!(count(&rec, "b", JobState::Queued), 1);
    h.close();
}

#[test]
fn group_commit_acks_in_order() {
    let dir = TempDir::new("group");
    let (mut h, _) = Harness::open(dir.path());

    // Everything queued while the thread is busy becomes one transaction.
    let release = h.pause();
    for id in 1..=100 {
        h.submit(Op::Insert(new_job(id, "p")));
    }
    drop(release);
    assert_eq!(h.next(), Completion::Durable { upto: 100 });
    assert_eq!(h.stats().commits, 1);

    // A stream of ops: acks strictly increase and end with the last op.
    let mut last = 0;
    for id in 101..=5_000 {
        last = h.submit(Op::Insert(new_job(id, "p")));
    }
    let mut uptos = Vec::new();
    while uptos.last() != Some(&last) {
        match h.next() {
            Completion::Durable { upto } => uptos.push(upto),
            c => panic!("unexpected {c:?}"),
        }
    }
    assert!(uptos.windows(2).all(|w| w[0] < w[1]), "{uptos:?}");
    eprintln!("4900 inserts acked in {} commits", uptos.len());
    h.close();
}

#[test]
fn coalescing_keeps_only_the_final_values() {
    let dir = TempDir::new("coalesce");
    let (mut h, _) = Harness::open(dir.path());
    let seq = h.submit(Op::Insert(new_job(3, "p")));
    h.wait_durable(seq);
    let before = h.stats();

    let release = h.pause();
    h.submit(Op::Insert(new_job(1, "p")));
    h.submit(running(1, vec![attempt(1, None)]));
    h.submit(finished(1, JobState::Succeeded, 1_700_000_009_000));
    h.submit(Op::Insert(new_job(2, "p")));
    h.submit(running(2, vec![attempt(1, None)]));
    h.submit(running(3, vec![attempt(1, None)]));
    let last = h.submit(finished(3, JobState::Failed, 1_700_000_009_500));
    drop(release);
    assert_eq!(h.next(), Completion::Durable { upto: last });

    let after = h.stats();
    assert_eq!(after.commits - before.commits, 1);
    assert_eq!(after.inserts - before.inserts, 2, "one insert per new job");
    assert_eq!(after.updates - before.updates, 1, "one update for job 3");

    let one = h.job(1).expect("job 1");
    assert_eq!(one.state, JobState::Succeeded);
    assert_eq!(one.output, Some(Bytes(b"output 1".to_vec())));
    assert_eq!(one.finished_ms, Some(1_700_000_009_000));
    let two = h.job(2).expect("job 2");
    assert_eq!(two.state, JobState::Running);
    assert_eq!(two.attempts, vec![attempt(1, None)]);
    let three = h.job(3).expect("job 3");
    assert_eq!(three.state, JobState::Failed);
    assert_eq!(three.error.as_deref(), Some("boom"));
    h.close();
}

#[test]
fn queries_see_every_earlier_op() {
    let dir = TempDir::new("queries");
    let (mut h, _) = Harness::open(dir.path());
    let release = h.pause();
    h.submit(Op::Insert(new_job(1, "p")));
    h.submit(Op::Query {
        token: 7,
        query: Query::Job {
            id: 1,
            owner: None,
            output: true,
        },
    });
    h.submit(Op::Insert(new_job(2, "p")));
    h.submit(Op::Query {
        token: 8,
        query: Query::List {
            pool: None,
            state: None,
            limit: 10,
            owner: None,
            before: None,
            since_ms: None,
        },
    });
    drop(release);
    assert_eq!(h.next(), Completion::Durable { upto: 4 });
    match h.next() {
        Completion::Query {
            token: 7,
            result: Ok(QueryResult::Job(Some(doc))),
        } => assert_eq!(doc.id, 1),
        c => panic!("unexpected {c:?}"),
    }
    match h.next() {
        Completion::Query {
            token: 8,
            result: Ok(QueryResult::List(docs)),
        } => assert_eq!(docs.iter().map(|d| d.id).collect::<Vec<_>>(), vec![2, 1]),
        c => panic!("unexpected {c:?}"),
    }
    h.close();
}

#[test]
fn recovery_requeues_running_jobs_or_declares_them_dead() {
    let dir = TempDir::new("recovery");
    let (mut h, _) = Harness::open(dir.path());
    h.submit(Op::Insert(new_job(1, "p")));
    let mut two = new_job(2, "p");
    two.max_attempts = 2;
    h.submit(Op::Insert(two));
    h.submit(Op::Insert(new_job(3, "q")));
    h.submit(Op::Insert(new_job(4, "q")));
    h.submit(running(1, vec![attempt(1, None)]));
    h.submit(running(
        2,
        vec![attempt(1, Some(Outcome::Lost)), attempt(2, None)],
    ));
    let seq = h.submit(finished(4, JobState::Succeeded, 1_700_000_005_000));
    h.wait_durable(seq);
    // Simulate a crash: the store is not told anything about the running jobs.
    h.close();

    let before = db::now_ms();
    let (mut h, rec) = Harness::open(dir.path());
    assert_eq!(ids(&rec), vec![1, 3]);
    assert_eq!(rec.next_id, 5);
    let lost = &rec.jobs[0].attempts[0];
    assert_eq!(lost.outcome, Some(Outcome::Lost));
    assert!(lost.ended_ms.is_some_and(|t| t >= before));
    assert_eq!(lost.error.as_deref(), Some(LOST_ON_RESTART));
    assert!(rec.jobs[1].attempts.is_empty());
    assert_eq!(count(&rec, "p", JobState::Queued), 1);
    assert_eq!(count(&rec, "p", JobState::Dead), 1);
    assert_eq!(count(&rec, "p", JobState::Running), 0);
    assert_eq!(count(&rec, "q", JobState::Queued), 1);
    assert_eq!(count(&rec, "q", JobState::Succeeded), 1);

    // The changes were written, not just reported.
    let one = h.job(1).expect("job 1");
    assert_eq!(one.state, JobState::Queued);
    assert_eq!(one.attempts, rec.jobs[0].attempts);
    let two = h.job(2).expect("job 2");
    assert_eq!(two.state, JobState::Dead);
    assert!(two.finished_ms.is_some_and(|t| t >= before));
    assert_eq!(two.error.as_deref(), Some(LOST_ON_RESTART));
    assert_eq!(two.attempts[1].outcome, Some(Outcome::Lost));
    h.close();

    // A second recovery finds nothing more to do.
    let (h, again) = Harness::open(dir.path());
    assert_eq!(again.jobs, rec.jobs);
    assert_eq!(again.counts, rec.counts);
    h.close();
}

#[test]
fn next_id_survives_pruning_of_the_newest_job() {
    let dir = TempDir::new("nextid");
    let (mut h, _) = Harness::open(dir.path());
    let old = db::now_ms() - 48 * HOUR_MS;
    for id in 1..=3 {
        h.submit(Op::Insert(new_job(id, "p")));
    }
    let seq = h.submit(finished(3, JobState::Succeeded, old));
    h.wait_durable(seq);
    h.prune_now();
    assert_eq!(h.job(3), None, "pruned after the default 24h");
    assert!(h.job(2).is_some());
    h.close();

    let (mut h, rec) = Harness::open(dir.path());
    assert_eq!(ids(&rec), vec![1, 2]);
    assert_eq!(rec.next_id, 4);
    // Even when the newest job goes while the store is open.
    h.submit(Op::Insert(new_job(4, "p")));
    let seq = h.submit(finished(4, JobState::Failed, old));
    h.wait_durable(seq);
    h.prune_now();
    assert_eq!(h.job(4), None);
    h.close();
    let (h, rec) = Harness::open(dir.path());
    assert_eq!(rec.next_id, 5);
    h.close();
}

#[test]
fn retention_and_max_finished_cap() {
    let dir = TempDir::new("retention");
    let (mut h, _) = Harness::open(dir.path());
    let now = db::now_ms();
    for id in 1..=10 {
        let pool = if id <= 2 { "short" } else { "long" };
        h.submit(Op::Insert(new_job(id, pool)));
    }
    h.submit(finished(1, JobState::Succeeded, now - 2 * HOUR_MS)); // expired (1h)
    h.submit(finished(2, JobState::Cancelled, now - HOUR_MS / 6)); // kept, then capped
    h.submit(finished(3, JobState::TimedOut, now - 2 * HOUR_MS)); // kept (24h), then capped
    h.submit(finished(4, JobState::Dead, now - 30 * HOUR_MS)); // expired (24h)
                                                               // Non-terminal jobs are never pruned, even with an old finished_ms.
    h.submit(Op::Update(JobUpdate {
        id: 5,
        state: JobState::Queued,
        attempts: vec![attempt(1, Some(Outcome::Lost))],
        output: None,
        output_file_len: None,
        output_memory_len: None,
        error: None,
        finished_ms: Some(now - 100 * HOUR_MS),
        drop_input_file: false,
    }));
    h.submit(running(6, vec![attempt(1, None)]));
    for id in 7..=10 {
        h.submit(finished(id, JobState::Succeeded, now));
    }
    let seq = h.submit(Op::Retention {
        per_pool: BTreeMap::from([("short".to_string(), Duration::from_secs(3600))]),
        default: Duration::from_secs(24 * 3600),
        max_finished: 4,
    });
    h.wait_durable(seq);
    assert_eq!(h.job(5).expect("job 5").finished_ms, None);

    h.prune_now();
    assert_eq!(h.list(None, None, 100), vec![10, 9, 8, 7, 6, 5]);
    // Nothing left to do: a second pass deletes nothing.
    h.prune_now();
    assert_eq!(h.list(None, None, 100), vec![10, 9, 8, 7, 6, 5]);
    h.close();
}

#[test]
fn pruning_runs_by_itself() {
    let dir = TempDir::new("autoprune");
    let tuning = Tuning {
        prune_every: Duration::from_millis(50),
        ..Tuning::default()
    };
    let (mut h, _) = Harness::open_tuned(dir.path(), tuning);
    let now = db::now_ms();
    h.submit(Op::Insert(new_job(1, "p")));
    h.submit(Op::Insert(new_job(2, "p")));
    h.submit(finished(1, JobState::Succeeded, now - 2 * HOUR_MS));
    // Job 2 expires 300 ms from now: the pass after that must find it
    // without any op arriving.
    h.submit(finished(2, JobState::Succeeded, now - HOUR_MS + 300));
    let seq = h.submit(Op::Retention {
        per_pool: BTreeMap::new(),
        default: Duration::from_secs(3600),
        max_finished: 1000,
    });
    h.wait_durable(seq);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.list(None, None, 10).is_empty() {
        assert!(Instant::now() < deadline, "jobs were not pruned");
        std::thread::sleep(Duration::from_millis(20));
    }
    h.close();
}

#[test]
fn failed_commit_loses_inserts_and_retries_updates() {
    let dir = TempDir::new("diskfull");
    let tuning = fast_retry();
    let (mut h, _) = Harness::open_tuned(dir.path(), tuning);
    let seq = h.submit(Op::Insert(new_job(1, "p")));
    h.wait_durable(seq);

    // The database may not grow any more: as good as a full disk.
    h.exec("PRAGMA max_page_count = 1");
    let big = vec![7u8; 300_000];
    let release = h.pause();
    h.submit(succeeded_at(1, &big, 1_700_000_100_000));
    let mut two = new_job(2, "p");
    two.input = big.clone().into();
    let failed_upto = h.submit(Op::Insert(two));
    drop(release);
    match h.next() {
        Completion::Failed {
            upto,
            lost_inserts,
            error,
        } => {
            assert_eq!(upto, failed_upto);
            assert_eq!(lost_inserts, vec![2]);
            assert!(
                error.contains("jobs.db") && error.contains("full"),
                "{error}"
            );
        }
        c => panic!("unexpected {c:?}"),
    }
    assert_eq!(h.job(1).expect("job 1").state, JobState::Queued);

    // Space comes back: the kept update is committed without any new op.
    h.exec("PRAGMA max_page_count = 1073741823");
    // (The query above went with a batch that failed too, hence `>`.)
    assert!(matches!(h.next(), Completion::Durable { upto } if upto > failed_upto));
    let one = h.job(1).expect("job 1");
    assert_eq!(one.state, JobState::Succeeded);
    assert_eq!(one.output, Some(Bytes(big)));
    assert_eq!(h.job(2), None, "a lost insert is never stored later");
    h.close();
}

#[test]
fn a_dead_store_thread_fails_every_pending_op() {
    let dir = TempDir::new("panic");
    let (mut h, _) = Harness::open(dir.path());
    let seq = h.submit(Op::Insert(new_job(1, "p")));
    h.wait_durable(seq);

    h.store.test_hook(TestHook::Panic);
    h.submit(Op::Insert(new_job(2, "p")));
    h.submit(Op::Query {
        token: 9,
        query: Query::Job {
            id: 1,
            owner: None,
            output: true,
        },
    });
    match h.next() {
        Completion::Failed {
            upto,
            lost_inserts,
            error,
        } => {
            assert_eq!((upto, lost_inserts), (3, vec![2]));
            assert!(
                error.contains("panicked: test hook asked for a panic"),
                "{error}"
            );
        }
        c => panic!("unexpected {c:?}"),
    }
    assert!(matches!(
        h.next(),
        Completion::Query {
            token: 9,
            result: Err(_)
        }
    ));
    // Ops submitted afterwards fail too.
    h.submit(Op::Insert(new_job(3, "p")));
    assert!(matches!(
        h.next(),
        Completion::Failed { upto: 4, lost_inserts, .. } if lost_inserts == vec![3]
    ));
    assert_eq!(h.store.try_completion(), None);
    let err = h.store.close().expect_err("close after a panic");
    assert!(err.to_string().contains("panicked"), "{err}");
}

#[test]
fn close_then_reopen_keeps_everything_acknowledged() {
    let dir = TempDir::new("reopen");
    let (mut h, _) = Harness::open(dir.path());
    let mut acked = 0;
    for id in 1..=10_000u64 {
        h.submit(Op::Insert(new_job(
            id,
            if id % 2 == 0 { "even" } else { "odd" },
        )));
        if id % 3 == 0 {
            h.submit(finished(id, JobState::Succeeded, db::now_ms()));
        }
        while let Some(c) = h.store.try_completion() {
            if let Completion::Durable { upto } = c {
                acked = upto;
            }
        }
    }
    // Whatever was acknowledged, and what close() committed, is there.
    h.close();
    let (h, rec) = Harness::open(dir.path());
    eprintln!("{acked} ops acknowledged before close");
    assert_eq!(rec.next_id, 10_001);
    assert_eq!(rec.jobs.len(), 10_000 - 3_333);
    assert!(rec.jobs.iter().all(|j| j.job.id % 3 != 0));
    let done = count(&rec, "even", JobState::Succeeded) + count(&rec, "odd", JobState::Succeeded);
    assert_eq!(done, 3_333);
    h.close();
}

/// Runs a test of this binary in a child process; returns its output, or
/// `None` if the child could not be started (e.g. the binary is not
/// executable by `uid`).
fn run_child(test: &str, dir: &Path, uid: Option<u32>) -> Option<std::process::Output> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args([
        "--exact",
        test,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("JOBVISOR_STORE_TEST_DIR", dir);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    match cmd.output() {
        Ok(out) => Some(out),
        Err(e) => {
            eprintln!("skipping: cannot run {test} as a child: {e}");
            None
        }
    }
}

fn child_dir() -> Option<PathBuf> {
    std::env::var_os("JOBVISOR_STORE_TEST_DIR").map(PathBuf::from)
}

#[test]
fn permission_denied_is_explained() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("perm");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    if nix::unistd::geteuid().is_root() {
        // Root ignores permissions: ask the question as "nobody", in a
        // directory nobody owns (else it is refused as another user's).
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o555)).expect("chmod");
        std::os::unix::fs::chown(&state, Some(65534), Some(65534)).expect("chown");
        let Some(out) = run_child("store::tests::permission_denied_child", &state, Some(65534))
        else {
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
    } else {
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o500)).expect("chmod");
        check_permission_denied(&state);
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    }
}

#[test]
#[ignore = "run by permission_denied_is_explained in a child process"]
fn permission_denied_child() {
    let state = child_dir().expect("JOBVISOR_STORE_TEST_DIR");
    check_permission_denied(&state);
}

fn check_permission_denied(state: &Path) {
    let err = open_err(state);
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Access { .. }), "{err:?}");
    assert_eq!(
        msg,
        format!(
            "cannot open store {}: Permission denied; make state_dir writable by this user or \
             set daemon.state_dir",
            state.display()
        )
    );
    // Not creatable either.
    let err = open_err(&state.join("sub"));
    assert!(err.to_string().contains("Permission denied"), "{err}");
}

#[test]
fn newer_schema_is_refused_untouched() {
    let dir = TempDir::new("newer");
    let (h, _) = Harness::open(dir.path());
    h.close();
    {
        let conn = rusqlite::Connection::open(dir.db()).expect("open");
        conn.pragma_update(None, "user_version", 99)
            .expect("set version");
    }
    let err = open_err(dir.path());
    assert!(
        matches!(err, StoreError::TooNew { found: 99, .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "{} has schema version 99, newer than this jobvisord supports ({SCHEMA_VERSION}); \
             upgrade jobvisord, or point it at another store (daemon.state_dir, or [store] url)",
            dir.db().display()
        )
    );
    let conn = rusqlite::Connection::open(dir.db()).expect("open");
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert_eq!(version, 99);
}

#[test]
fn garbage_file_is_refused_untouched() {
    let dir = TempDir::new("garbage");
    let garbage: Vec<u8> = b"this is not a database, it is a shopping list\n"
        .iter()
        .copied()
        .cycle()
        .take(8192)
        .collect();
    std::fs::write(dir.db(), &garbage).expect("write");
    let err = open_err(dir.path());
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err:?}");
    let msg = err.to_string();
    assert_eq!(
        msg,
        format!(
            "{} is not a valid jobvisor store (file is not a database); move it away to start \
             with an empty store (its jobs will be lost)",
            dir.db().display()
        )
    );
    assert_eq!(std::fs::read(dir.db()).expect("read"), garbage);
}

#[test]
fn another_programs_database_is_refused_untouched() {
    let dir = TempDir::new("foreign");
    {
        let conn = rusqlite::Connection::open(dir.db()).expect("open");
        conn.execute_batch("CREATE TABLE recipes (name TEXT); INSERT INTO recipes VALUES ('x');")
            .expect("create");
    }
    let err = open_err(dir.path());
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err:?}");
    assert!(err.to_string().contains("another program"), "{err}");
    let conn = rusqlite::Connection::open(dir.db()).expect("open");
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .expect("mode");
    assert_eq!(mode, "delete", "the journal mode was not changed");
}

#[test]
fn a_store_in_use_is_refused() {
    let dir = TempDir::new("inuse");
    let (h, _) = Harness::open(dir.path());
    let err = open_err(dir.path());
    assert!(matches!(err, StoreError::InUse { .. }), "{err:?}");
    assert!(
        err.to_string().contains("in use by another process"),
        "{err}"
    );
    h.close();
    // Released on close.
    let (h, _) = Harness::open(dir.path());
    h.close();
}

#[test]
fn errors_display_on_one_line() {
    let dir = TempDir::new("oneline");
    std::fs::write(dir.path().join("file"), b"x").expect("write");
    // state_dir is a file.
    let err = open_err(&dir.path().join("file"));
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    assert!(msg.contains("set daemon.state_dir"), "{msg}");
}

/// Kills a process that is writing to the store with SIGKILL and checks that
/// every job it had seen acknowledged is there.
#[test]
fn kill_9_loses_nothing_acknowledged() {
    let dir = TempDir::new("kill9");
    let exe = std::env::current_exe().expect("current_exe");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "store::tests::kill_9_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("JOBVISOR_STORE_TEST_DIR", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut acked = 0u64;
    let deadline = Instant::now() + DEADLINE;
    for line in lines.by_ref() {
        let line = line.expect("read");
        if let Some(n) = line.strip_prefix("acked ") {
            acked = n.parse().expect("number");
            if acked >= 20_000 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "child too slow");
    }
    child.kill().expect("kill -9");
    // Acks printed before the kill still count.
    for line in lines {
        if let Some(n) = line.expect("read").strip_prefix("acked ") {
            acked = acked.max(n.parse().expect("number"));
        }
    }
    child.wait().expect("wait");
    assert!(acked >= 20_000, "the child stopped early");

    let (h, rec) = Harness::open(dir.path());
    eprintln!(
        "{acked} jobs acknowledged before SIGKILL, {} found",
        rec.jobs.len()
    );
    assert!(rec.next_id > acked);
    let found = ids(&rec);
    assert!(found.len() as u64 >= acked);
    assert!(found.iter().take(acked as usize).copied().eq(1..=acked));
    h.close();
}

#[test]
#[ignore = "run by kill_9_loses_nothing_acknowledged in a child process"]
fn kill_9_child() {
    use std::io::Write;
    let dir = child_dir().expect("JOBVISOR_STORE_TEST_DIR");
    let (mut h, _) = Harness::open(&dir);
    let mut stdout = std::io::stdout().lock();
    let mut next = 1u64;
    let mut acked = 0u64;
    let deadline = Instant::now() + DEADLINE;
    while Instant::now() < deadline {
        // Keep ops in flight: submit ahead of the acks, up to a bound.
        if next - acked < 50_000 {
            for _ in 0..500 {
                h.submit(Op::Insert(new_job(next, "p")));
                next += 1;
            }
        }
        let c = if next - acked >= 50_000 {
            Some(h.next())
        } else {
            h.store.try_completion()
        };
        if let Some(Completion::Durable { upto }) = c {
            acked = upto;
            writeln!(stdout, "acked {upto}").expect("stdout");
            stdout.flush().expect("flush");
        }
    }
}

#[test]
fn throughput() {
    const JOBS: u64 = 200_000;
    let dir = TempDir::new("throughput");
    let (mut h, _) = Harness::open(dir.path());
    let before = h.stats();

    // One insert and one update per job, in separate batches (all inserts,
    // then all updates), as when jobs run between submission and result.
    let start = Instant::now();
    for id in 1..=JOBS {
        h.submit(Op::Insert(new_job(id, "bench")));
    }
    let mut last = 0;
    for id in 1..=JOBS {
        last = h.submit(succeeded_at(id, b"done!!!", 1_700_000_100_000));
    }
    h.wait_durable(last);
    let elapsed = start.elapsed();
    let stats = h.stats();
    assert_eq!(stats.inserts - before.inserts, JOBS);
    assert_eq!(stats.updates - before.updates, JOBS);
    let busy = stats.busy - before.busy;
    let cpu = stats.cpu - before.cpu;
    eprintln!(
        "throughput: {} ops in {:.2?} = {:.0} ops/s ({:.0} jobs/s), {} commits; \
         writing and committing took {busy:.2?} = {:.0} ops/s; store thread CPU {cpu:.2?} \
         = {:.0} ops/s",
        2 * JOBS,
        elapsed,
        (2 * JOBS) as f64 / elapsed.as_secs_f64(),
        JOBS as f64 / elapsed.as_secs_f64(),
        stats.commits - before.commits,
        (2 * JOBS) as f64 / busy.as_secs_f64(),
        (2 * JOBS) as f64 / cpu.as_secs_f64(),
    );

    // Insert and update of each job back to back: coalesced when they land
    // in the same batch.
    let start = Instant::now();
    for id in JOBS + 1..=2 * JOBS {
        h.submit(Op::Insert(new_job(id, "bench")));
        last = h.submit(finished(id, JobState::Succeeded, 1_700_000_100_000));
    }
    h.wait_durable(last);
    let elapsed = start.elapsed();
    let busy = h.stats().busy - stats.busy;
    eprintln!(
        "throughput, interleaved: {} ops in {:.2?} = {:.0} ops/s; writing and committing \
         took {busy:.2?}",
        2 * JOBS,
        elapsed,
        (2 * JOBS) as f64 / elapsed.as_secs_f64(),
    );
    assert_eq!(
        h.job(2 * JOBS).expect("last job").state,
        JobState::Succeeded
    );
    h.close();
}

#[test]
fn query_plans_use_the_intended_indexes() {
    use super::db::*;
    let dir = TempDir::new("plans");
    let db = Db::open(dir.path(), &dir.path().join("payloads")).expect("open");
    let uses = |sql: &str, what: &str| {
        let plan = db.plan(sql).expect("plan");
        assert!(
            plan.contains(what),
            "expected {what} in the plan of {sql}:\n{plan}"
        );
        assert!(
            !plan.contains("TEMP B-TREE") || sql == SELECT_ACTIVE,
            "{sql}:\n{plan}"
        );
    };
    uses(SELECT_ACTIVE, "jobs_active");
    uses(LIST_ACTIVE, "jobs_active");
    uses(LIST_POOL_ACTIVE, "jobs_active");
    uses(FINISHED_POOLS, "jobs_finished");
    uses(OLDEST_FINISHED, "jobs_finished");
    uses(DELETE_EXPIRED, "jobs_finished");
    uses(COUNT_FINISHED, "jobs_finished");
    uses(SELECT_JOB, "INTEGER PRIMARY KEY");
    uses(UPDATE_JOB, "INTEGER PRIMARY KEY");
    // The multi-row update walks its VALUES and seeks each row: never a
    // scan of `jobs`.
    for sql in UPDATE_MANY.iter() {
        uses(sql, "SEARCH jobs USING INTEGER PRIMARY KEY");
        let plan = db.plan(sql).expect("plan");
        assert!(!plan.contains("SCAN jobs"), "{sql}:\n{plan}");
    }
    for sql in INSERT_MANY.iter() {
        db.plan(sql).expect("the multi-row insert prepares");
    }
    // Newest first along the rowid, stopping at the limit: no sort.
    for sql in [
        LIST_ALL,
        LIST_POOL,
        LIST_FINISHED,
        LIST_POOL_FINISHED,
        DELETE_OLDEST,
    ] {
        uses(sql, "SCAN jobs");
    }
}

// ---------------------------------------------------------------------------
// Payload files

/// `len` pseudo-random bytes (xorshift), different per `seed`: a payload
/// that comes back shifted, truncated or mixed up with another fails the
/// comparison.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn job_with_input(id: u64, input: &[u8]) -> NewJob {
    NewJob {
        input: Arc::from(input),
        input_source: None,
        ..new_job(id, "p")
    }
}

fn succeeded_with(id: u64, output: &[u8]) -> Op {
    succeeded_at(id, output, db::now_ms())
}

/// The final update of a job that succeeded with `output` at `finished_ms`.
fn succeeded_at(id: u64, output: &[u8], finished_ms: u64) -> Op {
    Op::Update(JobUpdate {
        output: Some(Arc::from(output)),
        ..finished_update(id, JobState::Succeeded, finished_ms)
    })
}

/// Retries of a failed batch after 20 ms, doubling to 200 ms.
fn fast_retry() -> Tuning {
    Tuning {
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        ..Tuning::default()
    }
}

/// Names in the payload directory, sorted, but for the store's lock file
/// and the spare files' directory.
fn payload_names(dir: &TempDir) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.payloads())
        .expect("read payloads")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name != ".lock" && name != ".spare")
        .collect();
    names.sort();
    names
}

const SIZES: [usize; 3] = [FILE_PAYLOAD_MIN - 1, FILE_PAYLOAD_MIN, 8 << 20];

#[test]
fn payloads_round_trip_bit_exact_at_every_size() {
    let dir = TempDir::new("payloads");
    let (mut h, _) = Harness::open(dir.path());
    let meta = std::fs::metadata(dir.payloads()).expect("payload dir created");
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    }
    // Per size: a job that stays queued (recovery), one that runs and
    // finishes in a later batch (update), one whose insert and final update
    // share a batch (folded), and one left running (recovery of a running
    // job). `folded` is inserted after `running_id`, a higher id: payload
    // files below the id high-water mark work too.
    let mut id = 0;
    let mut cases = Vec::new();
    for (i, &size) in SIZES.iter().enumerate() {
        let seed = i as u64 * 10;
        let (queued, updated, folded, running_id) = (id + 1, id + 2, id + 3, id + 4);
        id += 4;
        let input = pattern(size, seed);
        let output = pattern(size, seed + 1);
        let seq = h.submit(Op::Insert(job_with_input(queued, &input)));
        h.wait_durable(seq);
        h.submit(Op::Insert(job_with_input(
            updated,
            &pattern(size, seed + 2),
        )));
        let seq = h.submit(Op::Insert(job_with_input(
            running_id,
            &pattern(size, seed + 3),
        )));
        h.wait_durable(seq);
        h.submit(running(running_id, vec![attempt(1, None)]));
        let seq = h.submit(succeeded_with(updated, &output));
        h.wait_durable(seq);
        let files_before = h.stats().files;
        let release = h.pause();
        h.submit(Op::Insert(job_with_input(folded, &pattern(size, seed + 4))));
        let seq = h.submit(succeeded_with(folded, &pattern(size, seed + 5)));
        drop(release);
        h.wait_durable(seq);
        // Ended within its insert's batch: its output file is written, its
        // input file is not (it would only be thrown away).
        assert_eq!(
            h.stats().files - files_before,
            u64::from(size >= FILE_PAYLOAD_MIN),
            "files written for the folded job, size {size}"
        );
        cases.push((size, seed, queued, updated, folded, running_id));
    }

    for &(size, seed, queued, updated, folded, running_id) in &cases {
        let in_file = size >= FILE_PAYLOAD_MIN;
        // The input file of a job that ended is not kept.
        for (id, active) in [
            (queued, true),
            (updated, false),
            (folded, false),
            (running_id, true),
        ] {
            assert_eq!(
                dir.payload(id, "in").exists(),
                in_file && active,
                "{id}.in, size {size}"
            );
        }
        for id in [updated, folded] {
            assert_eq!(
                dir.payload(id, "out").exists(),
                in_file,
                "{id}.out, size {size}"
            );
        }
        if in_file {
            let on_disk = std::fs::read(dir.payload(queued, "in")).expect("read");
            assert!(on_disk == pattern(size, seed), "file content, size {size}");
        }
        // A large output stays out of SQLite: the query vouches for its
        // file instead of carrying it.
        for id in [updated, folded] {
            let from_file = match h.query(Query::Job {
                id,
                owner: None,
                output: true,
            }) {
                QueryResult::JobWithOutputFile(_, len) => {
                    assert_eq!(len, size as u64, "job {id}'s output length");
                    true
                }
                QueryResult::Job(Some(_)) => false,
                r => panic!("unexpected {r:?}"),
            };
            assert_eq!(
                from_file, in_file,
                "job {id}'s output in its file, size {size}"
            );
        }
        let doc = h.job(updated).expect("updated job");
        assert_eq!(doc.error, None);
        assert!(
            doc.output == Some(Bytes(pattern(size, seed + 1))),
            "output, size {size}"
        );
        let doc = h.job(folded).expect("folded job");
        assert!(
            doc.output == Some(Bytes(pattern(size, seed + 5))),
            "folded output, size {size}"
        );
        // Lists never carry outputs, from files or not.
        assert!(h.list(None, None, 100).contains(&updated));
    }
    h.close();

    let (mut h, rec) = Harness::open(dir.path());
    let mut expected_ids = Vec::new();
    for &(size, seed, queued, _, _, running_id) in &cases {
        let in_file = size >= FILE_PAYLOAD_MIN;
        expected_ids.extend([queued, running_id]);
        let find = |id| {
            rec.jobs
                .iter()
                .find(|j| j.job.id == id)
                .unwrap_or_else(|| panic!("job {id} recovered"))
        };
        assert!(
            *input_of(&dir, find(queued)) == *pattern(size, seed),
            "queued input, size {size}"
        );
        // A large input stays out of SQLite: recovered as its file.
        assert_eq!(
            find(queued).input_file.is_some(),
            in_file,
            "queued input in its file, size {size}"
        );
        let r = find(running_id);
        assert_eq!(
            r.input_file.is_some(),
            in_file,
            "running input in its file, size {size}"
        );
        assert!(
            *input_of(&dir, r) == *pattern(size, seed + 3),
            "running input, size {size}"
        );
        assert_eq!(r.attempts[0].outcome, Some(Outcome::Lost));
        assert_eq!(h.job(running_id).expect("job").state, JobState::Queued);
    }
    assert_eq!(ids(&rec), expected_ids);
    // The sweep at open kept every referenced file.
    let (_, _, queued, updated, folded, _) = cases[2];
    assert!(dir.payload(updated, "out").exists() && dir.payload(folded, "out").exists());
    assert!(dir.payload(queued, "in").exists());
    let doc = h.job(folded).expect("folded job");
    assert!(doc.output == Some(Bytes(pattern(8 << 20, 25))));
    h.close();
}

#[test]
fn a_large_payload_gets_a_batch_of_its_own() {
    let dir = TempDir::new("bigbatch");
    let (mut h, _) = Harness::open(dir.path());
    let huge = pattern(MAX_BATCH_BLOB_BYTES + 1, 1);
    let before = h.stats();
    let release = h.pause();
    h.submit(Op::Insert(new_job(1, "p")));
    h.submit(Op::Insert(job_with_input(2, &huge)));
    h.submit(Op::Insert(new_job(3, "p")));
    h.submit(Op::Query {
        token: 5,
        query: Query::Job {
            id: 2,
            owner: None,
            output: true,
        },
    });
    drop(release);
    assert_eq!(h.next(), Completion::Durable { upto: 1 });
    assert_eq!(h.next(), Completion::Durable { upto: 2 });
    // The query goes with the small insert, which may not join the huge one.
    assert_eq!(h.next(), Completion::Durable { upto: 4 });
    assert!(matches!(
        h.next(),
        Completion::Query {
            token: 5,
            result: Ok(QueryResult::Job(Some(_)))
        }
    ));
    assert_eq!(h.stats().commits - before.commits, 3);
    assert_eq!(
        std::fs::metadata(dir.payload(2, "in")).expect("file").len(),
        huge.len() as u64
    );
    h.close();
    let (h, rec) = Harness::open(dir.path());
    assert_eq!(ids(&rec), vec![1, 2, 3]);
    assert!(*input_of(&dir, &rec.jobs[1]) == *huge);
    h.close();
}

#[test]
fn pruning_removes_the_payload_files() {
    let dir = TempDir::new("prunefiles");
    let (mut h, _) = Harness::open(dir.path());
    let big = pattern(FILE_PAYLOAD_MIN, 7);
    let now = db::now_ms();
    for id in 1..=5 {
        h.submit(Op::Insert(job_with_input(id, &big)));
    }
    let finish = |id, finished_ms| succeeded_at(id, &big, finished_ms);
    h.submit(finish(1, now - 30 * HOUR_MS)); // expired
    h.submit(finish(2, now - 2 * HOUR_MS)); // kept, then capped
    h.submit(finish(3, now)); // kept
    h.submit(finish(4, now)); // kept
    let seq = h.submit(Op::Retention {
        per_pool: BTreeMap::new(),
        default: Duration::from_secs(24 * 3600),
        max_finished: 2,
    });
    h.wait_durable(seq);
    h.settle();
    assert_eq!(
        payload_names(&dir),
        ["1.out", "2.out", "3.out", "4.out", "5.in"],
        "the inputs of ended jobs are not kept"
    );

    h.prune_now();
    assert_eq!(h.list(None, None, 10), vec![5, 4, 3]);
    assert_eq!(
        payload_names(&dir),
        ["3.out", "4.out", "5.in"],
        "the files of pruned jobs go, the others stay"
    );
    h.close();
}

#[test]
fn unreferenced_payload_files_are_swept_at_open() {
    let dir = TempDir::new("sweep");
    let (mut h, _) = Harness::open(dir.path());
    let big = pattern(FILE_PAYLOAD_MIN, 3);
    let seq = h.submit(Op::Insert(job_with_input(5, &big)));
    h.wait_durable(seq);
    h.close();
    // A crash between writing files and committing their rows leaves files
    // no row references; other names are not ours.
    for name in ["6.in", "5.out", "99.out", "notes.txt", "007.in", "5.in.tmp"] {
        std::fs::write(dir.payloads().join(name), b"stale").expect("write");
    }
    let (h, rec) = Harness::open(dir.path());
    assert_eq!(
        payload_names(&dir),
        ["007.in", "5.in", "5.in.tmp", "notes.txt"]
    );
    assert!(
        *input_of(&dir, &rec.jobs[0]) == *big,
        "a referenced file is kept intact"
    );
    h.close();
}

#[test]
fn two_stores_cannot_share_a_payload_dir() {
    let dir = TempDir::new("sharedpayloads");
    let shared = dir.path().join("shared");
    let open = |state: &str| {
        let poll = Poll::new().expect("poll");
        let waker = Arc::new(Waker::new(poll.registry(), Token(0)).expect("waker"));
        Store::open_with_payload_dir(&dir.path().join(state), &shared, waker)
    };
    let (first, _) = open("a").expect("first store");
    let err = match open("b") {
        Ok(_) => panic!("a second store on the same payload directory"),
        Err(e) => e,
    };
    assert!(matches!(err, StoreError::PayloadDirInUse { .. }), "{err:?}");
    assert!(err.to_string().contains("set daemon.payload_dir"), "{err}");
    first.close().expect("close");
    let (second, _) = open("b").expect("free again once the first is closed");
    second.close().expect("close");
}

#[test]
fn a_missing_or_short_input_file_makes_the_job_dead() {
    let dir = TempDir::new("noinput");
    let (mut h, _) = Harness::open(dir.path());
    let big = pattern(2 * FILE_PAYLOAD_MIN, 11);
    for id in 1..=4 {
        h.submit(Op::Insert(job_with_input(id, &big)));
    }
    let seq = h.submit(running(3, vec![attempt(1, None)]));
    h.wait_durable(seq);
    h.close();
    std::fs::remove_file(dir.payload(1, "in")).expect("rm");
    std::fs::remove_file(dir.payload(3, "in")).expect("rm");
    std::fs::write(dir.payload(2, "in"), &big[..1000]).expect("truncate");

    let (mut h, rec) = Harness::open(dir.path());
    assert_eq!(
        ids(&rec),
        vec![4],
        "only the job with its input is requeued"
    );
    assert!(*input_of(&dir, &rec.jobs[0]) == *big);
    assert_eq!(count(&rec, "p", JobState::Dead), 3);
    assert_eq!(count(&rec, "p", JobState::Queued), 1);
    let one = h.job(1).expect("job 1");
    assert_eq!(one.state, JobState::Dead);
    assert!(one.finished_ms.is_some());
    assert_eq!(
        one.error.as_deref(),
        Some(
            format!(
                "input payload file {} is missing; the job cannot run",
                dir.payload(1, "in").display()
            )
            .as_str()
        )
    );
    let two = h.job(2).expect("job 2");
    assert_eq!(two.state, JobState::Dead);
    assert_eq!(
        two.error.as_deref(),
        Some(
            format!(
                "input payload file {} has 1000 bytes instead of {}; the job cannot run",
                dir.payload(2, "in").display(),
                big.len()
            )
            .as_str()
        )
    );
    // A running job's attempt is closed as lost, then the job is dead.
    let three = h.job(3).expect("job 3");
    assert_eq!(three.state, JobState::Dead);
    assert_eq!(three.attempts[0].outcome, Some(Outcome::Lost));
    assert!(three
        .error
        .as_deref()
        .is_some_and(|e| e.contains("is missing")));
    h.close();

    // Stored, not just reported: the next start finds the same.
    let (h, again) = Harness::open(dir.path());
    assert_eq!(ids(&again), vec![4]);
    assert_eq!(count(&again, "p", JobState::Dead), 3);
    h.close();
}

#[test]
fn a_missing_output_file_is_reported_by_the_query() {
    let dir = TempDir::new("nooutput");
    let (mut h, _) = Harness::open(dir.path());
    let big = pattern(FILE_PAYLOAD_MIN, 5);
    h.submit(Op::Insert(new_job(1, "p")));
    let seq = h.submit(succeeded_with(1, &big));
    h.wait_durable(seq);
    assert!(h.job(1).expect("job").output == Some(Bytes(big.clone())));

    std::fs::remove_file(dir.payload(1, "out")).expect("rm");
    let doc = h.job(1).expect("job 1 is still there");
    assert_eq!(doc.state, JobState::Succeeded);
    assert_eq!(doc.output, None);
    assert_eq!(
        doc.error.as_deref(),
        Some(
            format!(
                "output payload file {} is missing",
                dir.payload(1, "out").display()
            )
            .as_str()
        )
    );
    // A short one likewise.
    std::fs::write(dir.payload(1, "out"), b"short").expect("write");
    let doc = h.job(1).expect("job 1");
    assert_eq!(doc.output, None);
    assert!(
        doc.error
            .as_deref()
            .is_some_and(|e| e.contains(&format!("has 5 bytes instead of {}", big.len()))),
        "{doc:?}"
    );
    h.close();
    // And the store opens regardless.
    let (mut h, _) = Harness::open(dir.path());
    assert_eq!(h.job(1).expect("job 1").output, None);
    h.close();
}

#[test]
fn a_referenced_output_file_is_never_rewritten() {
    let dir = TempDir::new("rewrite");
    let (mut h, _) = Harness::open(dir.path());
    let first = pattern(FILE_PAYLOAD_MIN, 1);
    let second = pattern(FILE_PAYLOAD_MIN, 2);
    h.submit(Op::Insert(new_job(1, "p")));
    let seq = h.submit(succeeded_with(1, &first));
    h.wait_durable(seq);
    assert!(std::fs::read(dir.payload(1, "out")).expect("read") == first);
    // A second output of the same job (the daemon never sends one) goes
    // into the database; the old file goes once that is committed.
    let seq = h.submit(succeeded_with(1, &second));
    h.wait_durable(seq);
    h.settle();
    assert!(!dir.payload(1, "out").exists());
    assert!(h.job(1).expect("job 1").output == Some(Bytes(second)));
    h.close();
}

/// An insert whose input cannot be put in its payload file fails alone:
/// the rest of its batch (another insert, an update with a large output)
/// commits, and the failure says whose fault it was.
#[test]
fn an_input_that_cannot_be_written_fails_its_insert_alone() {
    let dir = TempDir::new("alone");
    let (mut h, _) = Harness::open_tuned(dir.path(), fast_retry());
    let seq = h.submit(Op::Insert(new_job(1, "p")));
    h.wait_durable(seq);

    // Something the store cannot replace (a directory) has the name of
    // job 2's input file: its write fails (EISDIR, even for root).
    let obstacle = dir.payload(2, "in");
    std::fs::create_dir(&obstacle).expect("mkdir");
    // Job 4's input comes from a client's file that is shorter than it
    // said (cut after the submit was checked).
    let short = dir.path().join("short");
    std::fs::write(&short, pattern(FILE_PAYLOAD_MIN / 2, 4)).expect("write");
    let big = pattern(FILE_PAYLOAD_MIN, 9);
    let release = h.pause();
    h.submit(succeeded_with(1, &big));
    h.submit(Op::Insert(job_with_input(2, &big)));
    h.submit(Op::Insert(new_job(3, "p")));
    let upto = h.submit(Op::Insert(NewJob {
        input: Arc::default(),
        input_source: Some(InputSource {
            file: Arc::new(std::fs::File::open(&short).expect("open")),
            len: FILE_PAYLOAD_MIN as u64,
        }),
        ..new_job(4, "p")
    }));
    drop(release);
    match h.next() {
        Completion::InsertsFailed { failed } => {
            let ids: Vec<u64> = failed.iter().map(|(id, _)| *id).collect();
            assert_eq!(ids, vec![2, 4]);
            match &failed[0].1 {
                InsertFailure::Store(m) => {
                    assert!(m.contains("Is a directory") && m.contains("2.in"), "{m}")
                }
                other => panic!("job 2: {other:?}"),
            }
            match &failed[1].1 {
                InsertFailure::Input(m) => assert!(m.contains("ended after"), "{m}"),
                other => panic!("job 4: {other:?}"),
            }
        }
        c => panic!("unexpected {c:?}"),
    }
    assert_eq!(h.next(), Completion::Durable { upto });
    assert!(h.job(1).expect("job 1").output == Some(Bytes(big.clone())));
    assert_eq!(h.job(2), None, "a failed insert is not stored");
    assert_eq!(h.job(3).expect("job 3").state, JobState::Queued);
    assert_eq!(h.job(4), None);
    std::fs::remove_dir(&obstacle).expect("rmdir");
    assert_eq!(payload_names(&dir), ["1.out"]);
    h.close();
}

/// A batch whose output file cannot be written fails as a whole: its
/// inserts are lost (their clients told), its updates kept and retried
/// until the file can be written.
#[test]
fn an_unwritable_output_file_fails_the_batch() {
    let dir = TempDir::new("nodir");
    let tuning = fast_retry();
    let (mut h, _) = Harness::open_tuned(dir.path(), tuning);
    let seq = h.submit(Op::Insert(new_job(1, "p")));
    h.wait_durable(seq);

    // Something the store cannot replace (a directory) has the name of
    // job 1's output file: its write fails (EISDIR, even for root).
    let obstacle = dir.payload(1, "out");
    std::fs::create_dir(&obstacle).expect("mkdir");
    let big = pattern(FILE_PAYLOAD_MIN, 9);
    let release = h.pause();
    h.submit(succeeded_with(1, &big));
    h.submit(Op::Insert(new_job(2, "p")));
    let failed_upto = h.submit(Op::Insert(new_job(3, "p")));
    drop(release);
    match h.next() {
        Completion::Failed {
            upto,
            lost_inserts,
            error,
        } => {
            assert_eq!(upto, failed_upto);
            assert_eq!(lost_inserts, vec![2, 3], "the batch's inserts are lost");
            assert_eq!(
                error,
                format!(
                    "job store {}: cannot write payload file {}: Is a directory",
                    dir.db().display(),
                    dir.payload(1, "out").display()
                )
            );
        }
        c => panic!("unexpected {c:?}"),
    }
    assert_eq!(h.job(1).expect("job 1").state, JobState::Queued);

    // The obstacle goes: the kept update is written by itself.
    std::fs::remove_dir(&obstacle).expect("rmdir");
    assert!(matches!(h.next(), Completion::Durable { upto } if upto > failed_upto));
    assert!(h.job(1).expect("job 1").output == Some(Bytes(big.clone())));
    assert_eq!(h.job(2), None, "a lost insert is never stored later");
    assert_eq!(payload_names(&dir), ["1.out"]);

    // An output for a job whose insert was lost matches no row: its file
    // does not stay behind.
    let seq = h.submit(succeeded_with(2, &big));
    h.wait_durable(seq);
    assert_eq!(h.job(2), None);
    assert_eq!(payload_names(&dir), ["1.out"]);
    h.close();
}

/// A write that fails halfway (the file size limit, `RLIMIT_FSIZE`, works
/// for root too) leaves no partial file behind. In a child process: the
/// limit is per process.
#[test]
fn a_half_written_payload_file_is_removed() {
    let dir = TempDir::new("halfwrite");
    let Some(out) = run_child("store::tests::half_write_child", dir.path(), None) else {
        return;
    };
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("1 passed"), "{text}");
}

#[test]
#[ignore = "run by a_half_written_payload_file_is_removed in a child process"]
fn half_write_child() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    use nix::sys::signal::{SigSet, Signal};
    let state = child_dir().expect("JOBVISOR_STORE_TEST_DIR");
    let dir = TempDir(state.clone());
    // Going over the limit also raises SIGXFSZ, which would kill us: keep
    // it blocked here and in the store thread (which inherits the mask).
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGXFSZ);
    mask.thread_block().expect("block SIGXFSZ");
    let tuning = fast_retry();
    let (mut h, _) = Harness::open_tuned(&state, tuning);
    let seq = h.submit(Op::Insert(new_job(1, "p")));
    h.wait_durable(seq);

    let (soft, hard) = getrlimit(Resource::RLIMIT_FSIZE).expect("getrlimit");
    let limit = 3 * FILE_PAYLOAD_MIN as u64 / 2;
    setrlimit(Resource::RLIMIT_FSIZE, limit, hard).expect("setrlimit");
    let big = pattern(2 * FILE_PAYLOAD_MIN, 4);
    let release = h.pause();
    h.submit(Op::Insert(job_with_input(2, &big)));
    let failed_upto = h.submit(succeeded_with(1, &big));
    drop(release);
    // The input fails alone; the output then fails the batch.
    match h.next() {
        Completion::InsertsFailed { failed } => {
            assert_eq!(failed.len(), 1);
            assert_eq!(failed[0].0, 2);
            assert!(
                matches!(&failed[0].1, InsertFailure::Store(m) if m.contains("File too large")),
                "{failed:?}"
            );
        }
        c => panic!("unexpected {c:?}"),
    }
    match h.next() {
        Completion::Failed {
            upto,
            lost_inserts,
            error,
        } => {
            assert_eq!((upto, lost_inserts), (failed_upto, vec![]));
            assert!(error.contains("File too large"), "{error}");
        }
        c => panic!("unexpected {c:?}"),
    }
    assert_eq!(
        payload_names(&dir),
        Vec::<String>::new(),
        "nothing half-written stays"
    );

    setrlimit(Resource::RLIMIT_FSIZE, soft, hard).expect("setrlimit");
    assert!(matches!(h.next(), Completion::Durable { upto } if upto >= failed_upto));
    assert!(h.job(1).expect("job 1").output == Some(Bytes(big)));
    assert_eq!(h.job(2), None);
    assert_eq!(payload_names(&dir), ["1.out"]);
    h.close();
    // The directory belongs to the parent's TempDir.
    std::mem::forget(dir);
}

/// The version 1 schema, as it was created by the previous release.
const SCHEMA_V1: &str = "
CREATE TABLE jobs (
    id           INTEGER PRIMARY KEY,
    pool         TEXT    NOT NULL,
    state        INTEGER NOT NULL,
    priority     INTEGER NOT NULL,
    key          TEXT,
    max_attempts INTEGER NOT NULL,
    timeout_ms   INTEGER,
    created_ms   INTEGER NOT NULL,
    finished_ms  INTEGER,
    error        TEXT,
    attempts     TEXT    NOT NULL,
    output       BLOB,
    input        BLOB
);
CREATE INDEX jobs_active ON jobs(state, id) WHERE state < 2;
CREATE INDEX jobs_finished ON jobs(pool, finished_ms) WHERE finished_ms IS NOT NULL;
CREATE TABLE job_inputs (id INTEGER PRIMARY KEY, input BLOB NOT NULL);
CREATE TRIGGER jobs_delete_input AFTER DELETE ON jobs WHEN old.input IS NULL
BEGIN
    DELETE FROM job_inputs WHERE id = old.id;
END;
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO meta VALUES ('max_id', 0);
";

#[test]
fn a_version_1_store_is_migrated_in_place() {
    let dir = TempDir::new("migrate");
    let side_input = pattern(50_000, 1);
    let output = pattern(300_000, 2);
    {
        let conn = rusqlite::Connection::open(dir.db()).expect("create v1");
        conn.pragma_update(None, "page_size", 16384)
            .expect("page size");
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .expect("wal");
        assert_eq!(mode, "wal");
        conn.execute_batch(SCHEMA_V1).expect("schema v1");
        conn.pragma_update(None, "application_id", db::APPLICATION_ID)
            .expect("application_id");
        conn.pragma_update(None, "user_version", 1)
            .expect("version 1");
        let insert = "INSERT INTO jobs (id, pool, state, priority, key, max_attempts, \
                      timeout_ms, created_ms, finished_ms, error, attempts, output, input) \
                      VALUES (?1, 'p', ?2, 3, 'k', 4, 500, 1700000000000, ?3, NULL, ?4, ?5, ?6)";
        let attempts =
            serde_json::to_string(&[attempt(1, Some(Outcome::Succeeded))]).expect("json");
        // 1: queued, inline input; 2: queued, input in job_inputs;
        // 3: succeeded with an output; 4: running.
        conn.execute(
            insert,
            rusqlite::params![1, 0, None::<i64>, "[]", None::<Vec<u8>>, b"one".to_vec()],
        )
        .expect("job 1");
        conn.execute(
            insert,
            rusqlite::params![2, 0, None::<i64>, "[]", None::<Vec<u8>>, None::<Vec<u8>>],
        )
        .expect("job 2");
        conn.execute("INSERT INTO job_inputs VALUES (2, ?1)", [&side_input])
            .expect("input 2");
        conn.execute(
            insert,
            rusqlite::params![
                3,
                2,
                1_700_000_005_000i64,
                attempts,
                output,
                b"three".to_vec()
            ],
        )
        .expect("job 3");
        let running_attempts = serde_json::to_string(&[attempt(1, None)]).expect("json");
        conn.execute(
            insert,
            rusqlite::params![
                4,
                1,
                None::<i64>,
                running_attempts,
                None::<Vec<u8>>,
                b"four".to_vec()
            ],
        )
        .expect("job 4");
        conn.execute("UPDATE meta SET value = 7 WHERE key = 'max_id'", [])
            .expect("max_id");
    }

    let (mut h, rec) = Harness::open(dir.path());
    assert_eq!(ids(&rec), vec![1, 2, 4]);
    assert_eq!(*rec.jobs[0].job.input, *b"one");
    assert!(*rec.jobs[1].job.input == *side_input);
    assert_eq!(rec.jobs[1].job.key.as_deref(), Some("k"));
    assert_eq!(rec.jobs[1].job.timeout_ms, Some(500));
    assert_eq!(rec.jobs[2].attempts[0].outcome, Some(Outcome::Lost));
    assert_eq!(rec.next_id, 8, "the id high-water mark is kept");
    let three = h.job(3).expect("job 3");
    assert_eq!(three.state, JobState::Succeeded);
    assert!(three.output == Some(Bytes(output.clone())));
    assert_eq!(three.finished_ms, Some(1_700_000_005_000));

    // The migrated store takes file payloads like a new one.
    let big = pattern(FILE_PAYLOAD_MIN, 3);
    h.submit(Op::Insert(job_with_input(8, &big)));
    h.submit(Op::Insert(job_with_input(9, &big)));
    let seq = h.submit(succeeded_with(8, &big));
    h.wait_durable(seq);
    assert!(h.job(8).expect("job 8").output == Some(Bytes(big.clone())));
    h.close();

    {
        let conn = rusqlite::Connection::open(dir.db()).expect("open");
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION);
        assert_eq!(version, 4);
        // Jobs from before memory-mode payloads have their inputs stored.
        let in_memory: Option<i64> = conn
            .query_row("SELECT input_memory_len FROM jobs WHERE id = 3", [], |r| {
                r.get(0)
            })
            .expect("input_memory_len");
        assert_eq!(in_memory, None);
        // Jobs from before owners are root's (only admins see them).
        let owner: i64 = conn
            .query_row("SELECT owner FROM jobs WHERE id = 3", [], |r| r.get(0))
            .expect("owner");
        assert_eq!(owner, 0);
        let app: i64 = conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .expect("application_id");
        assert_eq!(app, db::APPLICATION_ID);
        let lens: (Option<i64>, Option<i64>) = conn
            .query_row(
                "SELECT input_file_len, output_file_len FROM jobs WHERE id = 8",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("job 8");
        // Ended: its input file is dropped.
        assert_eq!(lens, (None, Some(big.len() as i64)));
    }
    // Opened again as version 3: nothing left to migrate.
    let (mut h, rec) = Harness::open(dir.path());
    assert_eq!(ids(&rec), vec![1, 2, 4, 9]);
    assert!(*input_of(&dir, &rec.jobs[3]) == *big);
    assert!(h.job(3).expect("job 3").output == Some(Bytes(output)));
    h.close();
}

#[test]
fn a_broken_version_1_store_is_refused_untouched() {
    let dir = TempDir::new("badv1");
    {
        let conn = rusqlite::Connection::open(dir.db()).expect("create");
        conn.execute_batch("CREATE TABLE jobs (id INTEGER PRIMARY KEY);")
            .expect("schema");
        conn.pragma_update(None, "application_id", db::APPLICATION_ID)
            .expect("application_id");
        conn.pragma_update(None, "user_version", 1)
            .expect("version");
    }
    let err = open_err(dir.path());
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err:?}");
    assert!(err.to_string().contains("schema version 1 but"), "{err}");
    let conn = rusqlite::Connection::open(dir.db()).expect("open");
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert_eq!(version, 1);
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .expect("mode");
    assert_eq!(mode, "delete", "the journal mode was not changed");
    assert!(
        !dir.payloads().exists(),
        "no payload directory for a refused store"
    );
}

/// A recovered job's input: its bytes, or (a large one, left on disk) the
/// contents of its payload file, whose length must be the one recovered.
fn input_of(dir: &TempDir, j: &RecoveredJob) -> Arc<[u8]> {
    match j.input_file {
        Some(len) => {
            assert!(j.job.input.is_empty(), "a file input is not also in memory");
            let bytes = std::fs::read(dir.payload(j.job.id, "in")).expect("input file");
            assert_eq!(bytes.len() as u64, len, "job {}'s input file", j.job.id);
            bytes.into()
        }
        None => j.job.input.clone(),
    }
}

/// An output the daemon wrote to its payload file itself (straight from a
/// worker's arena) is recorded, not written again: the row points at it,
/// it survives a restart and pruning removes it; one left behind by a job
/// whose update never commits is swept at the next open.
#[test]
fn a_prewritten_output_file_is_recorded_not_rewritten() {
    let dir = TempDir::new("prewritten");
    let (mut h, _) = Harness::open(dir.path());
    let big = pattern(FILE_PAYLOAD_MIN + 7, 9);
    for id in [1, 2] {
        h.submit(Op::Insert(new_job(id, "p")));
    }
    let seq = h.submit(Op::Insert(new_job(3, "p")));
    h.wait_durable(seq);
    // Inode and mtime of a payload file.
    let stamp = |id| {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir.payload(id, "out")).expect("stat");
        (meta.ino(), meta.modified().expect("mtime"))
    };
    // As the daemon does it: the file first, the job's final update once
    // it is written. Its mtime is set well in the past, so that a rewrite
    // shows even within the file system's timestamp granularity.
    let prewrite = |id| {
        let path = dir.payload(id, "out");
        std::fs::write(&path, &*big).expect("write");
        let file = std::fs::File::options()
            .write(true)
            .open(&path)
            .expect("open");
        let past = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        file.set_modified(past).expect("set mtime");
        stamp(id)
    };
    let update = |id| {
        Op::Update(JobUpdate {
            id,
            state: JobState::Succeeded,
            attempts: vec![attempt(1, Some(Outcome::Succeeded))],
            output: None,
            output_file_len: Some(big.len() as u64),
            output_memory_len: None,
            error: None,
            finished_ms: Some(1),
            drop_input_file: true,
        })
    };
    // Job 1: insert and final update in separate batches.
    let written_1 = prewrite(1);
    let seq = h.submit(update(1));
    h.wait_durable(seq);
    assert_eq!(stamp(1), written_1, "job 1's file not rewritten");
    assert!(h.job(1).expect("job 1").output == Some(Bytes(big.to_vec())));
    // Job 4: insert and final update in one batch, folded into one row
    // write (one INSERT, no UPDATE).
    let written_4 = prewrite(4);
    let before = h.stats();
    let release = h.pause();
    h.submit(Op::Insert(new_job(4, "p")));
    let seq = h.submit(update(4));
    drop(release);
    h.wait_durable(seq);
    let after = h.stats();
    assert_eq!(
        (
            after.inserts - before.inserts,
            after.updates - before.updates
        ),
        (1, 0),
        "job 4's insert and update folded"
    );
    assert_eq!(stamp(4), written_4, "job 4's file not rewritten");
    assert!(h.job(4).expect("job 4").output == Some(Bytes(big.to_vec())));
    // An orphan: written, but its job's update never came.
    std::fs::write(dir.payload(2, "out"), b"never committed").expect("write");
    h.close();
    assert_eq!(stamp(1), written_1, "not rewritten by the store");
    let (mut h, _) = Harness::open(dir.path());
    assert!(h.job(1).expect("job 1 after a restart").output == Some(Bytes(big.to_vec())));
    assert!(h.job(4).expect("job 4 after a restart").output == Some(Bytes(big.to_vec())));
    assert!(!dir.payload(2, "out").exists(), "the orphan is swept");
    // Pruned: the files go with their rows.
    let seq = h.submit(Op::Retention {
        per_pool: BTreeMap::new(),
        default: DEFAULT_RETENTION,
        max_finished: 0,
    });
    h.wait_durable(seq);
    h.prune_now();
    assert_eq!(h.job(1), None);
    assert_eq!(h.job(4), None);
    assert!(payload_names(&dir).is_empty(), "{:?}", payload_names(&dir));
    h.close();
}

/// An input given as a client's file is copied by the store into the
/// job's payload file (the first `len` bytes from offset 0, whatever the
/// file's own offset), never passing through memory; recovery then finds
/// it like any large input.
#[test]
fn an_input_source_file_is_copied_into_the_payload_file() {
    let dir = TempDir::new("source");
    let (mut h, _) = Harness::open(dir.path());
    let big = pattern(FILE_PAYLOAD_MIN + 3, 11);
    let src_path = dir.path().join("client-file");
    let mut longer = big.to_vec();
    longer.extend_from_slice(b"trailing bytes not part of the input");
    std::fs::write(&src_path, &longer).expect("write");
    let mut file = std::fs::File::open(&src_path).expect("open");
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(1000)).expect("seek");
    let job = NewJob {
        input: Arc::default(),
        input_source: Some(InputSource {
            file: Arc::new(file),
            len: big.len() as u64,
        }),
        ..new_job(1, "p")
    };
    let seq = h.submit(Op::Insert(job));
    h.wait_durable(seq);
    assert!(std::fs::read(dir.payload(1, "in")).expect("payload file") == *big);
    // Job 2 ends in its insert's batch: its input is neither copied to a
    // payload file nor kept in the row; the job is stored all the same.
    let job = NewJob {
        input: Arc::default(),
        input_source: Some(InputSource {
            file: Arc::new(std::fs::File::open(&src_path).expect("open")),
            len: big.len() as u64,
        }),
        ..new_job(2, "p")
    };
    let files_before = h.stats().files;
    let release = h.pause();
    h.submit(Op::Insert(job));
    let seq = h.submit(succeeded_with(2, b"done"));
    drop(release);
    h.wait_durable(seq);
    assert_eq!(h.stats().files, files_before, "no payload file for job 2");
    assert!(!dir.payload(2, "in").exists());
    assert_eq!(h.job(2).expect("job 2").state, JobState::Succeeded);
    h.close();
    {
        let conn = rusqlite::Connection::open(dir.db()).expect("open");
        let kept: i64 = conn
            .query_row(
                "SELECT (input IS NOT NULL) + (input_file_len IS NOT NULL) \
                 + (SELECT COUNT(*) FROM job_inputs WHERE id = 2) FROM jobs WHERE id = 2",
                [],
                |r| r.get(0),
            )
            .expect("job 2's row");
        assert_eq!(kept, 0, "job 2's row keeps no input");
    }
    let (h, rec) = Harness::open(dir.path());
    assert_eq!(ids(&rec), vec![1]);
    assert_eq!(rec.jobs[0].input_file, Some(big.len() as u64));
    assert!(*input_of(&dir, &rec.jobs[0]) == *big);
    h.close();
}

/// An insert of an id already stored, with its input given as a client's
/// file (the daemon never sends one: ids only go up): the batch fails and
/// the insert is lost, and the stored job's input file is left as it was.
#[test]
fn an_input_source_insert_of_a_taken_id_fails_and_leaves_the_stored_file() {
    let dir = TempDir::new("source-taken");
    let (mut h, _) = Harness::open(dir.path());
    let stored = pattern(FILE_PAYLOAD_MIN, 3);
    let seq = h.submit(Op::Insert(job_with_input(1, &stored)));
    h.wait_durable(seq);
    let src_path = dir.path().join("client-file");
    std::fs::write(&src_path, pattern(FILE_PAYLOAD_MIN + 5, 4)).expect("write");
    let job = NewJob {
        input: Arc::default(),
        input_source: Some(InputSource {
            file: Arc::new(std::fs::File::open(&src_path).expect("open")),
            len: FILE_PAYLOAD_MIN as u64 + 5,
        }),
        ..new_job(1, "p")
    };
    let seq = h.submit(Op::Insert(job));
    match h.next() {
        Completion::Failed {
            upto,
            lost_inserts,
            error,
        } => {
            assert_eq!((upto, lost_inserts), (seq, vec![1]));
            assert!(error.contains("job 1: input file not copied"), "{error}");
        }
        c => panic!("unexpected {c:?}"),
    }
    assert!(std::fs::read(dir.payload(1, "in")).expect("input file") == stored);
    h.close();
    let (h, rec) = Harness::open(dir.path());
    assert_eq!(ids(&rec), vec![1]);
    assert!(*input_of(&dir, &rec.jobs[0]) == *stored);
    h.close();
}

// ---------------------------------------------------------------------------
// Spare payload files

/// Spares of a fresh `payloads` directory, without the filler thread unless
/// `idle_trim` is given.
fn spares_in(dir: &TempDir, idle_trim: Option<Duration>) -> Spares {
    std::fs::create_dir_all(dir.payloads()).expect("mkdir");
    let spares = Spares::with(
        &dir.payloads(),
        idle_trim.is_some(),
        idle_trim.unwrap_or(Duration::MAX),
    );
    let payloads = crate::private_dir::PrivateDir::open(
        &dir.payloads(),
        "daemon.payload_dir",
        false,
        crate::private_dir::Strictness::NoForeignWrite,
    )
    .expect("open");
    spares.clear(Arc::new(payloads)).expect("clear");
    spares
}

/// The name of a payload file, as the spares take it.
fn name_of(path: &Path) -> &str {
    path.file_name()
        .and_then(|n| n.to_str())
        .expect("a file name")
}

fn inode(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").ino()
}

fn spare_lens(spares: &Spares) -> Vec<u64> {
    let mut lens: Vec<u64> = spares.list().into_iter().map(|(_, n)| n).collect();
    lens.sort_unstable();
    lens
}

#[test]
fn a_recycled_file_is_the_next_payload_file_with_only_the_new_bytes() {
    use std::io::Write;
    let dir = TempDir::new("spare-reuse");
    let spares = spares_in(&dir, None);
    let old = dir.payload(1, "in");
    std::fs::write(&old, pattern(3 << 20, 1)).expect("write");
    let ino = inode(&old);
    spares.recycle(name_of(&old)).expect("recycle");
    assert!(!old.exists());
    assert_eq!(spare_lens(&spares), [3 << 20]);

    // Shorter than the spare: the same inode, cut to the new length.
    let new = dir.payload(2, "out");
    let data = pattern(2 << 20, 2);
    let mut file = spares
        .create(name_of(&new), data.len() as u64, true)
        .expect("create");
    file.write_all(&data).expect("write");
    drop(file);
    assert_eq!(inode(&new), ino, "the spare's pages are reused");
    assert!(std::fs::read(&new).expect("read") == data);
    assert_eq!(spare_lens(&spares), Vec::<u64>::new());

    // No spare left: a new file.
    let other = dir.payload(3, "out");
    spares.create(name_of(&other), 5, true).expect("create");
    assert_eq!(std::fs::metadata(&other).expect("stat").len(), 5);
}

#[test]
fn an_existing_file_is_refused_when_exclusive_and_the_spare_stays() {
    let dir = TempDir::new("spare-excl");
    let spares = spares_in(&dir, None);
    let spare = dir.payload(1, "in");
    std::fs::write(&spare, pattern(2 << 20, 1)).expect("write");
    spares.recycle(name_of(&spare)).expect("recycle");
    let taken = dir.payload(7, "out");
    std::fs::write(&taken, b"referenced").expect("write");
    let e = spares
        .create(name_of(&taken), 2 << 20, true)
        .expect_err("exists");
    assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&taken).expect("read"), b"referenced");
    assert_eq!(spare_lens(&spares), [2 << 20]);
    // Not exclusive (the store's own writes): replaced.
    spares
        .create(name_of(&taken), 2 << 20, false)
        .expect("create");
    assert_eq!(spare_lens(&spares), Vec::<u64>::new());
}

#[test]
fn spares_stay_within_their_limits_and_fit_the_payload() {
    let dir = TempDir::new("spare-limits");
    let spares = spares_in(&dir, None);
    // Too small to keep.
    let small = dir.payload(1, "in");
    std::fs::write(&small, b"tiny").expect("write");
    spares.recycle(name_of(&small)).expect("recycle");
    assert!(!small.exists() && spares.list().is_empty());
    // At most SPARE_MAX_FILES; the others are removed.
    for id in 2..2 + SPARE_MAX_FILES as u64 + 2 {
        let path = dir.payload(id, "in");
        std::fs::write(&path, pattern(1 << 20, id)).expect("write");
        spares.recycle(name_of(&path)).expect("recycle");
        assert!(!path.exists());
    }
    assert_eq!(spares.list().len(), SPARE_MAX_FILES);
    // Never one more than twice as large as needed.
    let path = dir.payload(50, "out");
    spares.create(name_of(&path), 100, true).expect("create");
    assert_eq!(
        spares.list().len(),
        SPARE_MAX_FILES,
        "a 1 MiB spare is not taken for 100 bytes"
    );
    let path = dir.payload(51, "out");
    spares
        .create(name_of(&path), 1 << 20, true)
        .expect("create");
    assert_eq!(spares.list().len(), SPARE_MAX_FILES - 1);
}

#[test]
fn the_filler_keeps_spares_ready_and_trims_them_when_idle() {
    let dir = TempDir::new("spare-fill");
    // Synchronously first: SPARE_TARGET spares of the wanted size.
    let spares = spares_in(&dir, None);
    spares.fill(2 << 20);
    assert_eq!(spare_lens(&spares), vec![2 << 20; SPARE_TARGET]);
    spares.fill(2 << 20);
    assert_eq!(
        spare_lens(&spares),
        vec![2 << 20; SPARE_TARGET],
        "no more than needed"
    );
    // A larger size makes room by dropping smaller ones, within the cap.
    spares.fill(SPARE_MAX_BYTES / 2);
    assert_eq!(spare_lens(&spares), vec![SPARE_MAX_BYTES / 2; SPARE_TARGET]);
    spares.fill(SPARE_MAX_BYTES + 1);
    assert_eq!(spare_lens(&spares), vec![SPARE_MAX_BYTES / 2; SPARE_TARGET]);
    drop(spares);

    // The thread: asked for spares of a size, it makes them; after the idle
    // time without another request, they are removed.
    let dir = TempDir::new("spare-thread");
    let spares = spares_in(&dir, Some(Duration::from_millis(300)));
    spares.replenish(3 << 20);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = false;
    while Instant::now() < deadline {
        let lens = spare_lens(&spares);
        seen |= lens == vec![3 << 20; SPARE_TARGET];
        if seen && lens.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("spares were not filled then trimmed (seen filled: {seen})");
}

#[test]
fn ended_inputs_become_spares_and_outputs_never_do() {
    let dir = TempDir::new("spare-store");
    let (h, _) = Harness::open(dir.path());
    let big = pattern(FILE_PAYLOAD_MIN, 9);
    std::fs::create_dir_all(dir.payloads().join(".spare")).expect("mkdir");
    std::fs::write(dir.payloads().join(".spare/99"), b"left by a crash").expect("write");
    h.close();
    let (mut h, _) = Harness::open(dir.path());
    let spares = h.store.spares().expect("SQLite has spares").clone();
    assert!(
        spares.list().is_empty(),
        "the spares of a previous run go at open"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(spares.dir()).expect("stat").permissions(),
    );
    assert_eq!(mode & 0o777, 0o700);

    h.submit(Op::Insert(job_with_input(1, &big)));
    let seq = h.submit(Op::Insert(job_with_input(2, &big)));
    h.wait_durable(seq);
    let ino = inode(&dir.payload(1, "in"));
    let seq = h.submit(succeeded_with(1, &big));
    h.wait_durable(seq);
    h.settle();
    assert_eq!(payload_names(&dir), ["1.out", "2.in"]);
    assert!(
        spares.list().iter().any(|(p, _)| inode(p) == ino),
        "job 1's input is a spare"
    );
    assert_eq!(h.job(1).expect("job 1").output, Some(Bytes(big.clone())));

    // Pruned: the output file is removed, not kept as a spare (a client
    // may be reading it through a descriptor).
    let out_ino = inode(&dir.payload(1, "out"));
    let seq = h.submit(Op::Retention {
        per_pool: BTreeMap::new(),
        default: Duration::from_secs(24 * 3600),
        max_finished: 0,
    });
    h.wait_durable(seq);
    h.prune_now();
    assert_eq!(payload_names(&dir), ["2.in"]);
    assert!(spares.list().iter().all(|(p, _)| inode(p) != out_ino));
    h.close();
}

#[test]
fn a_job_recovered_dead_drops_its_input_file() {
    let dir = TempDir::new("deadinput");
    let (mut h, _) = Harness::open(dir.path());
    let big = pattern(FILE_PAYLOAD_MIN, 11);
    let job = NewJob {
        max_attempts: 1,
        ..job_with_input(1, &big)
    };
    h.submit(Op::Insert(job));
    h.submit(Op::Insert(job_with_input(2, &big)));
    let seq = h.submit(running(1, vec![attempt(1, None)]));
    h.wait_durable(seq);
    let ino = inode(&dir.payload(1, "in"));
    h.close();

    // Its only attempt was lost with the daemon: dead, and its input goes.
    let (mut h, rec) = Harness::open(dir.path());
    assert_eq!(ids(&rec), vec![2]);
    let doc = h.job(1).expect("job 1");
    assert_eq!(doc.state, JobState::Dead);
    assert_eq!(payload_names(&dir), ["2.in"]);
    let spares = h.store.spares().expect("SQLite has spares").clone();
    assert!(
        spares.list().iter().any(|(p, _)| inode(p) == ino),
        "recycled"
    );
    h.close();
}

/// Queries filter by owner: another uid's job is not found and not listed;
/// no filter sees everyone's; the owner survives recovery.
#[test]
fn queries_filter_by_owner() {
    let dir = TempDir::new("owner");
    let (mut h, _) = Harness::open(dir.path());
    h.submit(Op::Insert(new_job(1, "p")));
    let seq = h.submit(Op::Insert(NewJob {
        owner: 2000,
        ..new_job(2, "p")
    }));
    h.wait_durable(seq);
    let find = |h: &mut Harness, id: u64, owner: Option<u32>, output: bool| match h
        .query(Query::Job { id, owner, output })
    {
        QueryResult::Job(doc) => doc.map(|d| d.id),
        r => panic!("unexpected {r:?}"),
    };
    assert_eq!(find(&mut h, 1, Some(1000), true), Some(1));
    assert_eq!(find(&mut h, 1, Some(2000), true), None);
    assert_eq!(find(&mut h, 2, Some(2000), false), Some(2));
    assert_eq!(find(&mut h, 2, None, false), Some(2));
    let list = |h: &mut Harness, owner: Option<u32>| match h.query(Query::List {
        pool: None,
        state: Some(JobState::Queued),
        limit: 10,
        owner,
        before: None,
        since_ms: None,
    }) {
        QueryResult::List(docs) => docs.iter().map(|d| d.id).collect::<Vec<_>>(),
        r => panic!("unexpected {r:?}"),
    };
    assert_eq!(list(&mut h, Some(1000)), vec![1]);
    assert_eq!(list(&mut h, Some(2000)), vec![2]);
    assert_eq!(list(&mut h, Some(3000)), Vec::<u64>::new());
    assert_eq!(list(&mut h, None), vec![2, 1]);
    h.close();
    let (h, rec) = Harness::open(dir.path());
    let owners: Vec<(u64, u32)> = rec.jobs.iter().map(|r| (r.job.id, r.job.owner)).collect();
    assert_eq!(owners, vec![(1, 1000), (2, 2000)]);
    h.close();
}

/// A spilled input (small, but the daemon holds too much queued input in
/// memory) is stored as a payload file like a large one, and recovered
/// from it, not loaded into memory.
#[test]
fn a_spilled_small_input_is_a_payload_file() {
    let dir = TempDir::new("spill");
    let (mut h, _) = Harness::open(dir.path());
    let small = pattern(4096, 7);
    let seq = h.submit(Op::Insert(NewJob {
        spill: true,
        memory: false,
        ..job_with_input(1, &small)
    }));
    h.wait_durable(seq);
    assert!(std::fs::read(dir.payload(1, "in")).expect("payload file") == small);
    h.close();
    let (h, rec) = Harness::open(dir.path());
    assert_eq!(rec.jobs.len(), 1);
    assert!(rec.jobs[0].job.input.is_empty(), "not loaded into memory");
    assert_eq!(rec.jobs[0].input_file, Some(4096));
    assert!(*input_of(&dir, &rec.jobs[0]) == *small);
    h.close();
}

// ---------------------------------------------------------------------------
// payloads = "memory"

#[test]
fn memory_mode_inputs_are_never_stored_and_end_dead_after_a_restart() {
    let dir = TempDir::new("memory");
    let (mut h, _) = Harness::open(dir.path());
    let big = pattern(FILE_PAYLOAD_MIN, 7);
    let memory = |id| NewJob {
        memory: true,
        ..job_with_input(id, &big)
    };
    // 1 queued, 2 running, 3 succeeded (in a later batch), 4 durable.
    for id in 1..=3 {
        h.submit(Op::Insert(memory(id)));
    }
    h.submit(Op::Insert(job_with_input(4, &big)));
    let seq = h.submit(running(2, vec![attempt(1, None)]));
    h.wait_durable(seq);
    let seq = h.submit(succeeded_with(3, b"small output"));
    h.wait_durable(seq);
    // Only the durable job's input is a file; no row holds a memory input.
    assert_eq!(payload_names(&dir), vec!["4.in".to_string()]);
    h.close();
    {
        let conn = rusqlite::Connection::open(dir.db()).expect("open");
        let rows: Vec<(i64, Option<i64>, bool)> = conn
            .prepare(
                "SELECT id, input_memory_len, \
                 input IS NULL AND input_file_len IS NULL \
                 AND NOT EXISTS (SELECT 1 FROM job_inputs WHERE id = jobs.id) \
                 FROM jobs ORDER BY id",
            )
            .expect("prepare")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        let len = FILE_PAYLOAD_MIN as i64;
        assert_eq!(
            rows,
            vec![
                (1, Some(len), true),
                (2, Some(len), true),
                (3, Some(len), true),
                (4, None, false)
            ]
        );
    }

    let (mut h, rec) = Harness::open(dir.path());
    // The durable job is queued again; the queued and running memory jobs
    // are dead, saying why; the one that had succeeded stays so.
    assert_eq!(ids(&rec), vec![4]);
    for id in [1, 2] {
        let doc = h.job(id).expect("memory job");
        assert_eq!(doc.state, JobState::Dead, "job {id}");
        assert_eq!(doc.error.as_deref(), Some(db::MEMORY_INPUT_LOST));
    }
    assert_eq!(h.job(3).expect("job 3").state, JobState::Succeeded);
    assert!(db::MEMORY_INPUT_LOST.starts_with("input lost: payloads = memory"));
    h.close();
}

#[path = "pg_tests.rs"]
mod pg;
