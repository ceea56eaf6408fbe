//! Fake-clock tests of the supervision rules: no processes, no sleeping.

use super::*;
use std::path::Path;

fn cfg(pools: &str) -> Config {
    let text = format!("[daemon]\ncontrol_socket = \"s.sock\"\nstate_dir = \"st\"\n{pools}");
    crate::config::parse(&text, Path::new("/tmp/jobvisor-test.toml")).expect("valid config")
}

fn pool(name: &str, workers: u32, extra: &str) -> String {
    format!("[pools.{name}]\ncommand = [\"w\"]\nworkers = {workers}\n{extra}\n")
}

/// Drives a supervisor and plays the reactor: assigns pids, records actions.
struct Sim {
    sup: Supervisor,
    now: Instant,
    next_pid: u32,
    log: Vec<Action>,
}

impl Sim {
    fn new(config: &Config) -> Sim {
        let mut s = Sim {
            sup: Supervisor::new(config, 7, Instant::now(), 1_700_000_000_000),
            now: Instant::now(),
            next_pid: 1000,
            log: Vec::new(),
        };
        s.sup.start(s.now);
        s.pump();
        s
    }

    /// Executes queued actions: spawns succeed and get pids.
    fn pump(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        while let Some(a) = self.sup.poll_action() {
            if let Action::Spawn { proc, .. } = &a {
                self.next_pid += 1;
                self.sup.on_spawned(*proc, self.next_pid, self.now);
            }
            if !matches!(a, Action::Log { .. }) {
                out.push(a.clone());
            }
            self.log.push(a);
        }
        out
    }

    fn advance(&mut self, d: Duration) -> Vec<Action> {
        self.now += d;
        self.sup.on_timer(self.now);
        self.pump()
    }

    fn procs(&self, pool: &str) -> Vec<Option<ProcId>> {
        self.sup.pools[pool]
            .slots
            .iter()
            .map(|s| match &s.state {
                SlotState::Running(p) => Some(p.id),
                _ => None,
            })
            .collect()
    }

    fn ready_all(&mut self, pool: &str) {
        for p in self.procs(pool).into_iter().flatten() {
            self.sup.on_ready(p, ipc_proto::PROTOCOL_VERSION, self.now);
        }
        self.pump();
    }

    fn kill(&mut self, proc: ProcId) -> Vec<Action> {
        self.sup.on_exit(
            proc,
            ExitInfo {
                description: "killed by SIGKILL".into(),
                transient: false,
                output_tail: None,
            },
            self.now,
        );
        self.pump()
    }

    fn states(&self, pool: &str) -> Vec<WorkerState> {
        self.sup.status(Some(pool), self.now).unwrap().pools[0]
            .workers
            .iter()
            .map(|w| w.state)
            .collect()
    }
}

fn spawns(actions: &[Action]) -> usize {
    actions
        .iter()
        .filter(|a| matches!(a, Action::Spawn { .. }))
        .count()
}

#[test]
fn start_spawns_every_worker_and_settles_on_ready() {
    let mut s = Sim::new(&cfg(&format!("{}{}", pool("a", 3, ""), pool("b", 1, ""))));
    assert_eq!(spawns(&s.log), 4);
    assert!(!s.sup.startup_settled());
    s.ready_all("a");
    assert!(!s.sup.startup_settled());
    s.ready_all("b");
    assert!(s.sup.startup_settled());
    assert_eq!(s.states("a"), vec![WorkerState::Ready; 3]);
    // Nothing armed while everything is healthy: the daemon sleeps.
    assert_eq!(s.sup.next_deadline(), None);
}

#[test]
fn quick_deaths_back_off_exponentially_with_jitter_up_to_the_max() {
    let mut s = Sim::new(&cfg(&pool(
        "a",
        1,
        "backoff_initial = \"100ms\"\nbackoff_max = \"1s\"\nhealthy_after = \"10s\"\nmax_restarts = 100",
    )));
    s.ready_all("a");
    let mut expected = Duration::from_millis(100);
    for _ in 0..8 {
        let proc = s.procs("a")[0].unwrap();
        s.advance(Duration::from_millis(50));
        let acts = s.kill(proc);
        assert_eq!(spawns(&acts), 0, "a quick death waits");
        assert_eq!(s.states("a"), vec![WorkerState::Backoff]);
        let delay = s.sup.next_deadline().unwrap() - s.now;
        assert!(
            delay >= expected.mul_f64(0.8)
                && delay <= expected.mul_f64(1.2).min(Duration::from_secs(1)),
            "delay {delay:?}, expected about {expected:?}"
        );
        // Nothing happens before the deadline…
        assert_eq!(spawns(&s.advance(delay - Duration::from_millis(1))), 0);
        // …and the respawn happens at it.
        assert_eq!(spawns(&s.advance(Duration::from_millis(1))), 1);
        s.ready_all("a");
        expected = (expected * 2).min(Duration::from_secs(1));
    }
}

#[test]
fn healthy_death_respawns_at_once_and_resets_the_backoff() {
    let mut s = Sim::new(&cfg(&pool(
        "a",
        1,
        "backoff_initial = \"100ms\"\nbackoff_max = \"30s\"\nhealthy_after = \"5s\"\nmax_restarts = 100",
    )));
    s.ready_all("a");
    // Three quick deaths push the backoff to 800 ms.
    for _ in 0..3 {
        let p = s.procs("a")[0].unwrap();
        s.kill(p);
        let d = s.sup.next_deadline().unwrap() - s.now;
        s.advance(d);
        s.ready_all("a");
    }
    assert_eq!(
        s.sup.pools["a"].slots[0].backoff,
        Duration::from_millis(800)
    );
    // It stays up past healthy_after, then dies: replaced in the same turn.
    s.advance(Duration::from_secs(6));
    let p = s.procs("a")[0].unwrap();
    let acts = s.kill(p);
    assert_eq!(spawns(&acts), 1, "replacement spawned in the same turn");
    assert_eq!(s.states("a"), vec![WorkerState::Starting]);
    // The next quick death starts again from backoff_initial.
    s.ready_all("a");
    let p = s.procs("a")[0].unwrap();
    s.kill(p);
    let d = s.sup.next_deadline().unwrap() - s.now;
    assert!(d <= Duration::from_millis(120), "{d:?}");
    assert_eq!(s.sup.pools["a"].slots[0].restarts, 5);
}

#[test]
fn crash_loop_fails_the_pool_only_and_restart_clears_it() {
    let mut s = Sim::new(&cfg(&format!(
        "{}{}",
        pool(
            "bad",
            2,
            "backoff_initial = \"0s\"\nmax_restarts = 4\nrestart_window = \"10s\""
        ),
        pool("good", 1, "")
    )));
    s.ready_all("good");
    let good = s.procs("good");
    let mut deaths = 0;
    while s.sup.pools["bad"].state == PoolState::Running {
        let p = s.procs("bad").into_iter().flatten().next().unwrap();
        s.advance(Duration::from_millis(10));
        s.kill(p);
        deaths += 1;
        assert!(deaths < 20);
    }
    assert_eq!(deaths, 5, "max_restarts = 4 tolerates 4, fails on the 5th");
    let status = s.sup.status(Some("bad"), s.now).unwrap();
    assert!(status.pools[0]
        .last_error
        .as_ref()
        .unwrap()
        .contains("jobvisorctl restart bad"));
    // No more spawns for the failed pool, ever.
    let remaining: Vec<_> = s.procs("bad").into_iter().flatten().collect();
    for p in remaining {
        assert_eq!(spawns(&s.kill(p)), 0);
    }
    assert_eq!(spawns(&s.advance(Duration::from_secs(60))), 0);
    assert_eq!(s.sup.next_deadline(), None);
    // The other pool is untouched.
    assert_eq!(s.procs("good"), good);
    assert_eq!(s.sup.pools["good"].state, PoolState::Running);
    // restart clears the state and spawns again.
    let msg = s.sup.restart("bad", s.now).unwrap();
    assert!(msg.contains("cleared failed"));
    assert_eq!(spawns(&s.pump()), 2);
    assert_eq!(s.sup.pools["bad"].state, PoolState::Running);
    assert!(s.sup.pools["bad"].crashes.is_empty());
}

#[test]
fn crashes_outside_the_window_do_not_count() {
    let mut s = Sim::new(&cfg(&pool(
        "a",
        1,
        "backoff_initial = \"0s\"\nmax_restarts = 2\nrestart_window = \"1s\"",
    )));
    for _ in 0..10 {
        s.ready_all("a");
        s.advance(Duration::from_millis(600));
        let p = s.procs("a")[0].unwrap();
        s.kill(p);
    }
    assert_eq!(s.sup.pools["a"].state, PoolState::Running);
}

#[test]
fn start_timeout_kills_and_counts_as_a_crash() {
    let mut s = Sim::new(&cfg(&pool(
        "a",
        1,
        "start_timeout = \"2s\"\nbackoff_initial = \"0s\"",
    )));
    let p = s.procs("a")[0].unwrap();
    assert_eq!(s.sup.next_deadline(), Some(s.now + Duration::from_secs(2)));
    let acts = s.advance(Duration::from_secs(2));
    assert!(acts.contains(&Action::Signal {
        proc: p,
        signal: Signal::SIGKILL
    }));
    assert_eq!(spawns(&s.kill(p)), 1);
    assert_eq!(s.sup.pools["a"].slots[0].restarts, 1);
    assert_eq!(s.sup.pools["a"].crashes.len(), 1);
}

#[test]
fn shutdown_runs_the_stop_ladder_then_exits() {
    let mut s = Sim::new(&cfg(&pool(
        "a",
        2,
        "stop_timeout = \"3s\"\nstop_signal = \"INT\"",
    )));
    s.ready_all("a");
    let procs: Vec<ProcId> = s.procs("a").into_iter().flatten().collect();
    s.sup.shutdown(false, s.now);
    let acts = s.pump();
    for p in &procs {
        assert!(acts.contains(&Action::Send {
            proc: *p,
            msg: ToWorker::Shutdown
        }));
        assert!(acts.contains(&Action::Signal {
            proc: *p,
            signal: Signal::SIGINT
        }));
    }
    assert_eq!(s.states("a"), vec![WorkerState::Stopping; 2]);
    // One exits by itself; the other ignores the signal.
    let acts = s.kill(procs[0]);
    assert!(!acts.contains(&Action::Exit));
    assert_eq!(spawns(&acts), 0, "nothing respawns during shutdown");
    let acts = s.advance(Duration::from_secs(3));
    assert_eq!(
        acts,
        vec![Action::Signal {
            proc: procs[1],
            signal: Signal::SIGKILL
        }]
    );
    assert_eq!(s.sup.next_deadline(), None);
    let acts = s.kill(procs[1]);
    assert_eq!(acts, vec![Action::Exit]);
}

#[test]
fn immediate_shutdown_kills_at_once() {
    let mut s = Sim::new(&cfg(&pool("a", 1, "stop_timeout = \"60s\"")));
    s.ready_all("a");
    let p = s.procs("a")[0].unwrap();
    s.sup.shutdown(false, s.now);
    s.pump();
    s.sup.shutdown(true, s.now);
    let acts = s.pump();
    assert!(acts.contains(&Action::Signal {
        proc: p,
        signal: Signal::SIGKILL
    }));
    assert_eq!(s.kill(p), vec![Action::Exit]);
}

#[test]
fn scale_down_stops_the_highest_slots_and_up_adds() {
    let mut s = Sim::new(&cfg(&pool("a", 4, "")));
    s.ready_all("a");
    let procs: Vec<ProcId> = s.procs("a").into_iter().flatten().collect();
    s.sup.scale("a", 2, s.now).unwrap();
    let acts = s.pump();
    assert!(acts.contains(&Action::Send {
        proc: procs[3],
        msg: ToWorker::Shutdown
    }));
    assert!(acts.contains(&Action::Send {
        proc: procs[2],
        msg: ToWorker::Shutdown
    }));
    s.kill(procs[3]);
    s.kill(procs[2]);
    assert_eq!(s.procs("a"), vec![Some(procs[0]), Some(procs[1])]);
    s.sup.scale("a", 3, s.now).unwrap();
    assert_eq!(spawns(&s.pump()), 1);
    assert_eq!(s.sup.pools["a"].slots[2].id, 2);
    // Scaling to 0 stops every worker (jobs then wait for a scale up).
    assert!(s.sup.scale("a", 0, s.now).is_ok());
    assert_eq!(s.sup.pools["a"].desired, 0);
    s.sup.scale("a", 3, s.now).unwrap();
    assert!(matches!(
        s.sup.scale("zz", 1, s.now),
        Err(CtlError::NotFound(_))
    ));
}

#[test]
fn reload_replaces_changed_pools_one_worker_at_a_time() {
    let old = cfg(&format!(
        "{}{}{}",
        pool("same", 2, ""),
        pool("changed", 3, ""),
        pool("gone", 1, "")
    ));
    let mut s = Sim::new(&old);
    for p in ["same", "changed", "gone"] {
        s.ready_all(p);
    }
    let same = s.procs("same");
    let changed: Vec<ProcId> = s.procs("changed").into_iter().flatten().collect();
    let gone = s.procs("gone")[0].unwrap();
    let new = cfg(&format!(
        "{}{}{}",
        pool("same", 2, ""),
        pool("changed", 3, "env = { V = \"2\" }"),
        pool("added", 1, "")
    ));
    let msg = s.sup.reload(&new, s.now).unwrap();
    assert!(msg.contains("added added"), "{msg}");
    let acts = s.pump();
    // Added pool spawns; removed pool is stopped; only the first changed
    // worker is being replaced.
    assert_eq!(spawns(&acts), 1);
    assert!(acts.contains(&Action::Signal {
        proc: gone,
        signal: Signal::SIGTERM
    }));
    let stopping: Vec<_> = changed
        .iter()
        .filter(|p| {
            acts.contains(&Action::Signal {
                proc: **p,
                signal: Signal::SIGTERM,
            })
        })
        .collect();
    assert_eq!(stopping, vec![&changed[0]]);
    assert_eq!(s.procs("same"), same, "unchanged pool untouched");
    // Rolling: exit → respawn → ready → next one.
    for (i, old_proc) in changed.iter().enumerate() {
        let acts = s.kill(*old_proc);
        assert_eq!(spawns(&acts), 1, "replacement {i}");
        let fresh = s.procs("changed")[i].unwrap();
        s.sup.on_ready(fresh, ipc_proto::PROTOCOL_VERSION, s.now);
        let acts = s.pump();
        if let Some(next) = changed.get(i + 1) {
            assert!(acts.contains(&Action::Signal {
                proc: *next,
                signal: Signal::SIGTERM
            }));
        }
    }
    s.kill(gone);
    assert!(!s.sup.pools.contains_key("gone"));
    assert_eq!(s.procs("same"), same);
}

#[test]
fn reload_of_worker_count_only_keeps_processes() {
    let mut s = Sim::new(&cfg(&pool("a", 2, "")));
    s.ready_all("a");
    let before = s.procs("a");
    s.sup
        .reload(&cfg(&pool("a", 3, "timeout = \"5s\"")), s.now)
        .unwrap();
    assert_eq!(spawns(&s.pump()), 1);
    assert_eq!(&s.procs("a")[..2], &before[..]);
}

#[test]
fn events_about_unknown_processes_are_ignored() {
    let mut s = Sim::new(&cfg(&pool("a", 1, "")));
    s.ready_all("a");
    let p = s.procs("a")[0].unwrap();
    s.kill(p);
    let after = s.pump();
    // A late EOF / protocol error / exit for the dead process: no effect.
    s.sup.on_channel_closed(p, s.now);
    s.sup.on_protocol_error(p, "late".into(), s.now);
    s.sup.on_exit(
        p,
        ExitInfo {
            description: "again".into(),
            transient: false,
            output_tail: None,
        },
        s.now,
    );
    s.sup.on_ready(p, 1, s.now);
    assert!(s.pump().is_empty());
    assert!(after.is_empty());
}

#[test]
fn protocol_error_kills_and_counts_as_crash() {
    let mut s = Sim::new(&cfg(&pool("a", 1, "backoff_initial = \"0s\"")));
    s.ready_all("a");
    let p = s.procs("a")[0].unwrap();
    s.sup.on_protocol_error(p, "garbage".into(), s.now);
    let acts = s.pump();
    assert_eq!(
        acts,
        vec![Action::Signal {
            proc: p,
            signal: Signal::SIGKILL
        }]
    );
    assert_eq!(spawns(&s.kill(p)), 1);
    assert_eq!(s.sup.pools["a"].slots[0].restarts, 1);
}

#[test]
fn spawn_failure_is_a_crash_with_a_reason() {
    let config = cfg(&pool("a", 1, "backoff_initial = \"0s\"\nmax_restarts = 2"));
    let mut sup = Supervisor::new(&config, 1, Instant::now(), 1_700_000_000_000);
    let now = Instant::now();
    sup.start(now);
    let mut failures = 0;
    while let Some(a) = sup.poll_action() {
        if let Action::Spawn { proc, .. } = a {
            failures += 1;
            sup.on_spawn_failed(proc, "command not found: \"w\"".into(), now);
        }
    }
    assert_eq!(failures, 3);
    let st = sup.status(None, now).unwrap();
    assert_eq!(st.pools[0].state, PoolState::Failed);
    assert!(st.pools[0]
        .last_error
        .as_ref()
        .unwrap()
        .contains("command not found"));
}

#[test]
fn transient_spawn_failures_back_off_and_are_not_crashes() {
    // backoff_initial 0 and max_restarts 2: three real failures would fail
    // the pool at once (see above); shortages must not.
    let config = cfg(&pool("a", 1, "backoff_initial = \"0s\"\nmax_restarts = 2"));
    let mut sup = Supervisor::new(&config, 1, Instant::now(), 1_700_000_000_000);
    let mut now = Instant::now();
    sup.start(now);
    let next_spawn = |sup: &mut Supervisor| {
        let mut found = None;
        while let Some(a) = sup.poll_action() {
            if let Action::Spawn { proc, .. } = a {
                assert!(found.is_none(), "one slot, one spawn");
                found = Some(proc);
            }
        }
        found
    };
    let mut delays = Vec::new();
    for _ in 0..10 {
        let proc = next_spawn(&mut sup).expect("a spawn");
        sup.on_spawn_failed(
            proc,
            SpawnError {
                message: "pipe: EMFILE: Too many open files".into(),
                transient: true,
            },
            now,
        );
        assert_eq!(next_spawn(&mut sup), None, "not retried at once");
        let deadline = sup.next_deadline().expect("a retry is armed");
        let delay = deadline - now;
        assert!(delay >= TRANSIENT_RETRY_MIN.mul_f64(0.8), "{delay:?}");
        delays.push(delay);
        now = deadline;
        sup.on_timer(now);
    }
    assert!(delays[9] > delays[0], "the retries back off: {delays:?}");
    let st = sup.status(None, now).unwrap();
    assert_eq!(st.pools[0].state, PoolState::Running);
    assert!(sup.pools["a"].crashes.is_empty());
    assert_eq!(sup.pools["a"].slots[0].restarts, 0);
    assert!(st.pools[0].last_error.as_ref().unwrap().contains("EMFILE"));
    // Once descriptors are back, the spawn works and the worker runs.
    let proc = next_spawn(&mut sup).expect("retried");
    sup.on_spawned(proc, 4242, now);
    sup.on_ready(proc, ipc_proto::PROTOCOL_VERSION, now);
    let st = sup.status(None, now).unwrap();
    assert_eq!(st.pools[0].workers[0].state, WorkerState::Ready);
    // A real failure after all that is still a crash.
    sup.on_exit(
        proc,
        ExitInfo {
            description: "killed by SIGKILL".into(),
            transient: false,
            output_tail: None,
        },
        now,
    );
    assert_eq!(sup.pools["a"].crashes.len(), 1);
}

#[test]
fn failure_text_is_capped_with_head_tail_and_note() {
    use super::jobs::{cap_error_text, MAX_ERROR_TEXT};
    assert_eq!(cap_error_text("short".into()), "short");
    let exact = "x".repeat(MAX_ERROR_TEXT);
    assert_eq!(cap_error_text(exact.clone()), exact);
    // Two-byte characters, an odd prefix so the cuts fall mid-character.
    let big = format!("A{}Z", "é".repeat(3 << 20));
    let kept = cap_error_text(big.clone());
    assert!(kept.len() <= MAX_ERROR_TEXT, "{}", kept.len());
    assert!(kept.len() > MAX_ERROR_TEXT - 100, "{}", kept.len());
    assert!(kept.starts_with("Aéé") && kept.ends_with("ééZ"));
    let (head, rest) = kept.split_once(" … [").expect("a note");
    let (note, tail) = rest.split_once(" bytes cut] … ").expect("a note");
    let cut: usize = note.parse().expect("a count");
    assert_eq!(head.len() + cut + tail.len(), big.len());
    assert!(big.starts_with(head) && big.ends_with(tail));
}

// ---- jobs ----

mod jobs {
    use super::*;
    use crate::store::{Op, Recovered};
    use ipc_proto::control::{JobOptions, Outcome};

    /// A sim that also plays the store: it numbers store ops and can
    /// acknowledge them.
    struct JobSim {
        sim: Sim,
        store_seq: u64,
        sent: Vec<(ProcId, ToWorker)>,
        replies: Vec<(ClientId, Response)>,
        stored: Vec<Op>,
    }

    impl JobSim {
        fn new(pools: &str) -> JobSim {
            JobSim::with_recovered(pools, Vec::new())
        }

        /// Started with `jobs` recovered from the store.
        fn with_recovered(pools: &str, jobs: Vec<crate::store::RecoveredJob>) -> JobSim {
            let config = cfg(pools);
            let mut sup = Supervisor::new(&config, 7, Instant::now(), 1_700_000_000_000);
            let next_id = jobs.iter().map(|j| j.job.id).max().unwrap_or(0) + 1;
            sup.recover(Recovered {
                jobs,
                next_id,
                id_end: u64::MAX,
                counts: Default::default(),
            });
            let now = Instant::now();
            sup.start(now);
            let mut s = JobSim {
                sim: Sim {
                    sup,
                    now,
                    next_pid: 1000,
                    log: Vec::new(),
                },
                store_seq: 0,
                sent: Vec::new(),
                replies: Vec::new(),
                stored: Vec::new(),
            };
            s.pump();
            for name in config.pools.keys() {
                s.ready(name);
            }
            s
        }

        fn pump(&mut self) {
            self.sim.sup.pump(self.sim.now);
            for a in self.sim.pump() {
                match a {
                    Action::Store(op) => {
                        self.store_seq += 1;
                        self.stored.push(op);
                    }
                    Action::Send { proc, msg } => self.sent.push((proc, msg)),
                    Action::Reply { client, resp } => self.replies.push((client, resp)),
                    // What the client ends up with.
                    Action::ReplyJob {
                        client,
                        mut doc,
                        output,
                    } => {
                        // The sim has no store files: only in-memory ones.
                        let JobOutput::Mem(output) = output else {
                            panic!("an output in a file in the sim")
                        };
                        doc.output = Some(ipc_proto::Bytes(output.to_vec()));
                        self.replies.push((client, Response::Job(doc)));
                    }
                    _ => {}
                }
            }
        }

        fn kill(&mut self, proc: ProcId) {
            self.sim.sup.on_exit(
                proc,
                ExitInfo {
                    description: "killed by SIGKILL".into(),
                    transient: false,
                    output_tail: None,
                },
                self.sim.now,
            );
            self.pump();
        }

        fn ready(&mut self, pool: &str) {
            for p in self.sim.procs(pool).into_iter().flatten() {
                self.sim
                    .sup
                    .on_ready(p, ipc_proto::PROTOCOL_VERSION, self.sim.now);
            }
            self.pump();
        }

        fn durable(&mut self) {
            self.sim.sup.on_durable(self.store_seq);
            self.pump();
        }

        fn submit(&mut self, pool: &str, input: &str, options: JobOptions) {
            self.sim
                .sup
                .submit(1, pool, input.as_bytes(), options, true, self.sim.now);
            self.pump();
        }

        /// Jobs sent to `proc` so far, as (id, attempt).
        fn jobs_sent_to(&self, proc: ProcId) -> Vec<(u64, u32)> {
            self.sent
                .iter()
                .filter(|(p, _)| *p == proc)
                .filter_map(|(_, m)| match m {
                    ToWorker::Job(j) => Some((j.id, j.attempt)),
                    _ => None,
                })
                .collect()
        }

        fn done(&mut self, proc: ProcId, id: u64) {
            self.sim
                .sup
                .on_job_done(proc, id, b"ok"[..].into(), self.sim.now);
            self.pump();
        }

        fn job_doc(&self, id: u64) -> Option<&ipc_proto::control::JobDoc> {
            self.replies.iter().rev().find_map(|(_, r)| match r {
                Response::Job(d) if d.id == id => Some(d),
                _ => None,
            })
        }
    }

    fn prio(p: i32) -> JobOptions {
        JobOptions {
            priority: p,
            ..Default::default()
        }
    }

    #[test]
    fn a_workers_huge_failure_text_is_kept_cut() {
        let mut s = JobSim::new(&pool("a", 1, ""));
        let w = s.sim.procs("a")[0].unwrap();
        s.submit("a", "x", JobOptions::default());
        let huge = format!("head{}tail", "y".repeat(60 << 20));
        s.sim.sup.on_job_failed(w, 1, huge, s.sim.now);
        s.pump();
        s.durable();
        let doc = s.job_doc(1).expect("the failed job's document");
        assert_eq!(doc.state, JobState::Failed);
        let error = doc.error.as_deref().expect("error text");
        assert!(error.len() <= super::super::jobs::MAX_ERROR_TEXT);
        assert!(error.starts_with("headyyy") && error.ends_with("yyytail"));
        assert!(error.contains(" bytes cut] "));
        // The store keeps the cut text too, not 60 MiB.
        assert!(format!("{:?}", s.stored).len() < 1 << 20);
    }

    #[test]
    fn ack_waits_for_durability_but_dispatch_does_not() {
        let mut s = JobSim::new(&pool("a", 1, ""));
        let w = s.sim.procs("a")[0].unwrap();
        s.submit("a", "x", JobOptions::default());
        assert!(s.stored.iter().any(|op| matches!(op, Op::Insert(_))));
        assert_eq!(s.jobs_sent_to(w), vec![(1, 1)], "dispatched at once");
        assert!(s.replies.is_empty(), "no ack before the insert is durable");
        s.done(w, 1);
        assert!(
            s.replies.is_empty(),
            "no result before the insert is durable"
        );
        s.durable();
        assert!(matches!(s.replies[0].1, Response::Submitted { id: 1 }));
        let doc = s.job_doc(1).expect("result after durable");
        assert_eq!(doc.state, JobState::Succeeded);
        assert_eq!(doc.output.as_deref(), Some(&b"ok"[..]));
    }

    #[test]
    fn priority_then_fifo_and_prefetch_limit() {
        let mut s = JobSim::new(&pool("a", 1, "prefetch = 2"));
        let w = s.sim.procs("a")[0].unwrap();
        // Fill the worker (2 in flight) so the rest queue.
        s.submit("a", "fill1", prio(0));
        s.submit("a", "fill2", prio(0));
        for (i, p) in [0, 5, 0, 9, 5].into_iter().enumerate() {
            s.submit("a", &format!("j{i}"), prio(p));
        }
        assert_eq!(s.jobs_sent_to(w).len(), 2, "prefetch = 2");
        let mut order = Vec::new();
        for _ in 0..7 {
            let sent = s.jobs_sent_to(w);
            let next = sent[order.len()].0;
            order.push(next);
            s.done(w, next);
        }
        // ids 3..=7 are j0..j4 with priorities 0,5,0,9,5.
        assert_eq!(order, vec![1, 2, 6, 4, 7, 3, 5]);
    }

    impl JobSim {
        /// Debug lines logged so far that contain `what`.
        fn logged(&self, what: &str) -> Vec<String> {
            self.sim
                .log
                .iter()
                .filter_map(|a| match a {
                    Action::Log { msg, .. } if msg.contains(what) => Some(msg.clone()),
                    _ => None,
                })
                .collect()
        }

        fn failed(&mut self, proc: ProcId, id: u64, error: &str) {
            self.sim
                .sup
                .on_job_failed(proc, id, error.into(), self.sim.now);
            self.pump();
        }

        fn advance(&mut self, d: Duration) {
            self.sim.now += d;
            self.sim.sup.on_timer(self.sim.now);
            self.pump();
        }

        /// Jobs in flight on `proc` now, front (running) first.
        fn inflight(&self, pool: &str, proc: ProcId) -> Vec<u64> {
            self.sim.sup.pools[pool]
                .slots
                .iter()
                .find_map(|s| match &s.state {
                    SlotState::Running(p) if p.id == proc => {
                        Some(p.inflight.iter().copied().collect())
                    }
                    _ => None,
                })
                .unwrap_or_default()
        }

        fn cancels_sent_to(&self, proc: ProcId) -> Vec<u64> {
            self.sent
                .iter()
                .filter_map(|(p, m)| match m {
                    ToWorker::Cancel { id } if *p == proc => Some(*id),
                    _ => None,
                })
                .collect()
        }
    }

    #[test]
    fn adaptive_depth_follows_the_mean_with_hysteresis() {
        use crate::supervisor::jobs::adaptive_depth;
        let us = |n: f64| n * 1_000.0;
        // Long jobs: one at a time, at once, whatever the current depth.
        assert_eq!(adaptive_depth(64, us(1_000.0)), 1);
        assert_eq!(adaptive_depth(2, us(5_000.0)), 1);
        // Short: 1 + 1ms/mean, a power of two, at most 64.
        assert_eq!(adaptive_depth(1, us(10.0)), 64);
        assert_eq!(adaptive_depth(1, us(60.0)), 16);
        assert_eq!(adaptive_depth(1, us(300.0)), 4);
        assert_eq!(adaptive_depth(1, us(900.0)), 2);
        // Up as soon as the depth doubles; down only once it halves twice.
        assert_eq!(adaptive_depth(16, us(30.0)), 32);
        assert_eq!(adaptive_depth(64, us(30.0)), 64, "32 is within a halving");
        assert_eq!(adaptive_depth(64, us(60.0)), 16);
        assert_eq!(adaptive_depth(4, us(600.0)), 4, "2 is within a halving");
    }

    #[test]
    fn short_jobs_raise_the_default_prefetch_and_long_ones_bring_it_back_to_one() {
        let mut s = JobSim::new(&pool("a", 1, ""));
        let w = s.sim.procs("a")[0].unwrap();
        for i in 0..100 {
            s.submit("a", &format!("j{i}"), JobOptions::default());
        }
        assert_eq!(s.inflight("a", w), vec![1], "one at a time until measured");
        s.sim.now += Duration::from_micros(10);
        s.done(w, 1);
        assert_eq!(
            s.logged("adaptive prefetch 1 -> 64").len(),
            1,
            "{:?}",
            s.logged("adaptive")
        );
        assert_eq!(s.inflight("a", w).len(), 64);
        // Run times are counted from when a job reaches the front: ten
        // prefetched jobs answered 10 us apart keep it short.
        for id in 2..12 {
            s.sim.now += Duration::from_micros(10);
            s.done(w, id);
        }
        assert_eq!(s.inflight("a", w).len(), 64);
        // Long jobs bring it down: no more is sent until the worker is back
        // under the new depth.
        for id in 12..16 {
            s.sim.now += Duration::from_millis(5);
            s.done(w, id);
        }
        assert!(
            !s.logged("-> 1 (mean job run time").is_empty(),
            "{:?}",
            s.logged("adaptive")
        );
        let held = s.inflight("a", w).len();
        s.sim.now += Duration::from_millis(5);
        let front = s.inflight("a", w)[0];
        s.done(w, front);
        assert_eq!(s.inflight("a", w).len(), held - 1, "nothing more sent");
    }

    #[test]
    fn an_explicit_prefetch_is_not_adapted() {
        let mut s = JobSim::new(&pool("a", 1, "prefetch = 1"));
        let w = s.sim.procs("a")[0].unwrap();
        for i in 0..10 {
            s.submit("a", &format!("j{i}"), JobOptions::default());
        }
        for id in 1..=5 {
            assert_eq!(s.inflight("a", w), vec![id]);
            s.sim.now += Duration::from_micros(10);
            s.done(w, id);
        }
        assert_eq!(s.inflight("a", w), vec![6]);
        assert!(s.logged("adaptive").is_empty());
    }

    /// Two workers at depth 64; jobs 3..=6 spread over both; worker 2 ends
    /// its jobs while worker 1's front job runs on with job 5 behind it.
    fn idle_worker_beside_a_long_job(extra: &str) -> (JobSim, ProcId, ProcId) {
        let mut s = JobSim::new(&pool("a", 2, extra));
        let (w1, w2) = (s.sim.procs("a")[0].unwrap(), s.sim.procs("a")[1].unwrap());
        s.submit("a", "warm1", JobOptions::default());
        s.submit("a", "warm2", JobOptions::default());
        s.sim.now += Duration::from_micros(10);
        s.done(w1, 1);
        s.done(w2, 2);
        for name in ["long", "x", "y", "z"] {
            s.submit("a", name, JobOptions::default());
        }
        assert_eq!(s.inflight("a", w1), vec![3, 5], "levelled: long and y");
        assert_eq!(s.inflight("a", w2), vec![4, 6]);
        s.sim.now += Duration::from_micros(500);
        s.done(w2, 4);
        s.done(w2, 6);
        (s, w1, w2)
    }

    #[test]
    fn an_idle_worker_takes_back_jobs_waiting_behind_a_long_one_uncharged() {
        let (mut s, w1, w2) = idle_worker_beside_a_long_job("");
        assert!(s.cancels_sent_to(w1).is_empty(), "job 3 is not long yet");
        // The take-back waits for a timer, not for polling.
        let due = s.sim.sup.next_deadline().expect("armed");
        assert!(due <= s.sim.now + TAKE_BACK_AFTER);
        s.advance(due - s.sim.now);
        assert_eq!(s.cancels_sent_to(w1), vec![5]);
        assert!(!s.logged("taking back 1 jobs").is_empty());
        // The worker answers it as a cancelled queued job: back to the
        // queue, then to the idle worker, with the same attempt number.
        s.failed(w1, 5, "cancelled");
        assert_eq!(s.inflight("a", w1), vec![3]);
        assert_eq!(s.jobs_sent_to(w2).last(), Some(&(5, 1)));
        s.done(w2, 5);
        s.done(w1, 3);
        s.durable();
        let doc = s.job_doc(5).unwrap();
        assert_eq!(doc.state, JobState::Succeeded);
        assert_eq!(
            doc.attempts.len(),
            1,
            "the returned dispatch is not an attempt"
        );
        assert_eq!(doc.attempts[0].worker, 1, "the second worker's");
    }

    #[test]
    fn a_taken_back_job_that_finished_meanwhile_or_was_cancelled_stays_so() {
        // Done crossed the Cancel: an ordinary success.
        let (mut s, w1, _) = idle_worker_beside_a_long_job("");
        s.advance(TAKE_BACK_AFTER);
        assert_eq!(s.cancels_sent_to(w1), vec![5]);
        s.done(w1, 3);
        s.done(w1, 5);
        s.durable();
        assert_eq!(s.job_doc(5).unwrap().state, JobState::Succeeded);
        assert_eq!(s.job_doc(5).unwrap().attempts.len(), 1);

        // A client's cancel while it is being taken back: no second Cancel,
        // and the answer makes it cancelled, not requeued.
        let (mut s, w1, w2) = idle_worker_beside_a_long_job("");
        s.advance(TAKE_BACK_AFTER);
        s.sim.sup.cancel(1, 5, s.sim.now);
        s.pump();
        assert_eq!(s.cancels_sent_to(w1), vec![5]);
        s.failed(w1, 5, "cancelled");
        s.durable();
        assert_eq!(s.job_doc(5).unwrap().state, JobState::Cancelled);
        assert!(!s.jobs_sent_to(w2).contains(&(5, 1)));

        // A client's cancel first: it is not taken back, and stays cancelled.
        let (mut s, w1, w2) = idle_worker_beside_a_long_job("");
        s.sim.sup.cancel(1, 5, s.sim.now);
        s.pump();
        s.advance(TAKE_BACK_AFTER);
        assert_eq!(s.cancels_sent_to(w1), vec![5], "the client's only");
        s.failed(w1, 5, "cancelled");
        s.durable();
        assert_eq!(s.job_doc(5).unwrap().state, JobState::Cancelled);
        assert!(!s.jobs_sent_to(w2).contains(&(5, 1)));
    }

    #[test]
    fn an_explicit_prefetch_takes_nothing_back() {
        let mut s = JobSim::new(&pool("a", 2, "prefetch = 2"));
        let (w1, w2) = (s.sim.procs("a")[0].unwrap(), s.sim.procs("a")[1].unwrap());
        for name in ["long", "x", "y", "z"] {
            s.submit("a", name, JobOptions::default());
        }
        assert_eq!(s.inflight("a", w1), vec![1, 3]);
        s.done(w2, 2);
        s.done(w2, 4);
        assert_eq!(s.sim.sup.pools["a"].jobs.take_back_at, None);
        s.advance(Duration::from_secs(1));
        assert!(s.cancels_sent_to(w1).is_empty());
    }

    #[test]
    fn lost_attempt_is_retried_at_the_head_then_dead() {
        let mut s = JobSim::new(&pool("a", 1, "backoff_initial = \"0s\"\nmax_attempts = 2"));
        s.submit("a", "poison", JobOptions::default());
        s.submit("a", "other", JobOptions::default());
        s.durable();
        for attempt in 1..=2 {
            let w = s.sim.procs("a")[0].unwrap();
            assert_eq!(
                s.jobs_sent_to(w),
                vec![(1, attempt)],
                "the poison job first, alone"
            );
            s.kill(w);
            s.ready("a");
        }
        s.durable();
        let doc = s.job_doc(1).expect("finished");
        assert_eq!(doc.state, JobState::Dead);
        assert_eq!(doc.attempts.len(), 2);
        assert!(doc
            .attempts
            .iter()
            .all(|a| a.outcome == Some(Outcome::Lost)));
        // The other job was never charged and runs now.
        let w = s.sim.procs("a")[0].unwrap();
        assert_eq!(s.jobs_sent_to(w), vec![(2, 1)]);
    }

    #[test]
    fn death_with_several_in_flight_charges_nobody_and_isolates_suspects() {
        let mut s = JobSim::new(&pool(
            "a",
            1,
            "backoff_initial = \"0s\"\nprefetch = 3\nmax_attempts = 3",
        ));
        for i in 0..3 {
            s.submit("a", &format!("j{i}"), JobOptions::default());
        }
        let w = s.sim.procs("a")[0].unwrap();
        assert_eq!(s.jobs_sent_to(w).len(), 3);
        s.kill(w);
        s.ready("a");
        // Suspects run one at a time, still on their first attempt.
        let w = s.sim.procs("a")[0].unwrap();
        assert_eq!(s.jobs_sent_to(w), vec![(1, 1)]);
        s.done(w, 1);
        assert_eq!(s.jobs_sent_to(w), vec![(1, 1), (2, 1)]);
        // Job 2 kills the worker while alone: now it is charged.
        s.kill(w);
        s.ready("a");
        let w = s.sim.procs("a")[0].unwrap();
        assert_eq!(s.jobs_sent_to(w), vec![(2, 2)]);
        s.done(w, 2);
        s.done(w, 3);
        s.durable();
        assert_eq!(s.job_doc(1).unwrap().attempts.len(), 1);
        assert_eq!(s.job_doc(2).unwrap().attempts.len(), 2);
        assert_eq!(s.job_doc(3).unwrap().attempts.len(), 1);
    }

    #[test]
    fn timeout_stops_the_worker_and_retries() {
        let mut s = JobSim::new(&pool(
            "a",
            1,
            "timeout = \"1s\"\nstop_timeout = \"2s\"\nmax_attempts = 2\nbackoff_initial = \"0s\"",
        ));
        s.submit("a", "slow", JobOptions::default());
        let w = s.sim.procs("a")[0].unwrap();
        s.sim.now += Duration::from_millis(999);
        s.sim.sup.on_timer(s.sim.now);
        s.pump();
        assert!(!s.sim.log.contains(&Action::Signal {
            proc: w,
            signal: Signal::SIGTERM
        }));
        assert_eq!(
            s.sim.sup.next_deadline(),
            Some(s.sim.now + Duration::from_millis(1))
        );
        s.sim.now += Duration::from_millis(1);
        s.sim.sup.on_timer(s.sim.now);
        s.pump();
        assert!(s.sim.log.contains(&Action::Signal {
            proc: w,
            signal: Signal::SIGTERM
        }));
        // The replacement gets attempt 2 once ready.
        s.kill(w);
        s.ready("a");
        let w2 = s.sim.procs("a")[0].unwrap();
        assert_eq!(s.jobs_sent_to(w2), vec![(1, 2)]);
        assert_eq!(s.sim.sup.pools["a"].slots[0].restarts, 0, "not a crash");
    }

    #[test]
    fn key_mutex_parks_and_releases() {
        let mut s = JobSim::new(&pool("a", 2, ""));
        let keyed = |k: &str| JobOptions {
            key: Some(k.into()),
            ..Default::default()
        };
        s.submit("a", "1", keyed("k"));
        s.submit("a", "2", keyed("k"));
        s.submit("a", "3", keyed("other"));
        let procs: Vec<ProcId> = s.sim.procs("a").into_iter().flatten().collect();
        let all: Vec<(u64, u32)> = procs.iter().flat_map(|p| s.jobs_sent_to(*p)).collect();
        assert_eq!(all.len(), 2);
        assert!(all.contains(&(1, 1)) && all.contains(&(3, 1)), "{all:?}");
        let holder = procs
            .iter()
            .copied()
            .find(|p| s.jobs_sent_to(*p).contains(&(1, 1)))
            .unwrap();
        s.done(holder, 1);
        let all: Vec<(u64, u32)> = procs.iter().flat_map(|p| s.jobs_sent_to(*p)).collect();
        assert!(
            all.contains(&(2, 1)),
            "released key lets job 2 run: {all:?}"
        );
    }

    #[test]
    fn full_queue_is_rejected_in_order_with_earlier_acks() {
        let mut s = JobSim::new(&pool("a", 1, "queue_capacity = 1"));
        s.submit("a", "running", JobOptions::default());
        s.submit("a", "queued", JobOptions::default());
        s.submit("a", "refused", JobOptions::default());
        assert!(s.replies.is_empty(), "the refusal waits behind the acks");
        s.durable();
        let kinds: Vec<&Response> = s.replies.iter().map(|(_, r)| r).collect();
        assert!(matches!(kinds[0], Response::Submitted { id: 1 }));
        assert!(matches!(kinds[1], Response::Submitted { id: 2 }));
        match kinds[2] {
            Response::Error { kind, message } => {
                assert_eq!(*kind, ipc_proto::control::ErrorKind::Rejected);
                assert!(message.contains("queue_capacity"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn memory_mode_holds_a_bounded_number_of_client_files() {
        use crate::supervisor::jobs::MAX_HELD_SOURCES;
        let mut s = JobSim::new(&pool(
            "a",
            1,
            "payloads = \"memory\"\nqueue_capacity = 100000\nprefetch = 1",
        ));
        let file = Arc::new(std::fs::File::open("/dev/null").expect("/dev/null"));
        let source = || crate::store::InputSource {
            file: Arc::clone(&file),
            len: 2 << 20,
        };
        let submit = |s: &mut JobSim| {
            s.sim
                .sup
                .submit(1, "a", source(), JobOptions::default(), false, s.sim.now);
            s.pump();
        };
        for _ in 0..=MAX_HELD_SOURCES {
            submit(&mut s);
        }
        s.durable();
        let refused = |s: &JobSim| {
            s.replies
                .iter()
                .filter(|(_, r)| {
                    matches!(r, Response::Error { kind, message }
                        if *kind == ipc_proto::control::ErrorKind::Rejected
                            && message.contains("payloads = \"memory\"")
                            && message.contains(&MAX_HELD_SOURCES.to_string()))
                })
                .count()
        };
        assert_eq!(refused(&s), 1, "the one past the bound is refused");
        let submitted = |s: &JobSim| {
            s.replies
                .iter()
                .filter(|(_, r)| matches!(r, Response::Submitted { .. }))
                .count()
        };
        assert_eq!(submitted(&s), MAX_HELD_SOURCES);
        // Once a job ends, its file is let go: one more fits, and only one.
        let w = s.sim.procs("a")[0].unwrap();
        let first = s.jobs_sent_to(w)[0].0;
        s.done(w, first);
        s.durable();
        submit(&mut s);
        submit(&mut s);
        s.durable();
        assert_eq!(submitted(&s), MAX_HELD_SOURCES + 1);
        assert_eq!(refused(&s), 2);
    }

    #[test]
    fn a_jobs_payload_mode_is_fixed_when_it_is_submitted() {
        let mut s = JobSim::new(&pool("a", 1, "payloads = \"memory\""));
        s.submit("a", "under memory", JobOptions::default());
        s.sim
            .sup
            .reload(&cfg(&pool("a", 1, "")), s.sim.now)
            .expect("reload");
        s.submit("a", "under durable", JobOptions::default());
        assert!(s.sim.sup.output_in_memory(1), "submitted under memory");
        assert!(!s.sim.sup.output_in_memory(2), "submitted under durable");
    }

    #[test]
    fn ignored_cancel_stops_the_worker_and_requeues_its_other_jobs() {
        let mut s = JobSim::new(&pool(
            "a",
            1,
            "prefetch = 2\nstop_timeout = \"1s\"\nbackoff_initial = \"0s\"",
        ));
        s.submit("a", "cancel-me", JobOptions::default());
        s.submit("a", "bystander", JobOptions::default());
        let w = s.sim.procs("a")[0].unwrap();
        assert_eq!(s.jobs_sent_to(w).len(), 2);
        s.sim.sup.cancel(1, 1, s.sim.now);
        s.pump();
        assert!(s.sent.contains(&(w, ToWorker::Cancel { id: 1 })));
        s.sim.now += Duration::from_secs(1);
        s.sim.sup.on_timer(s.sim.now);
        s.pump();
        s.kill(w);
        s.ready("a");
        let w2 = s.sim.procs("a")[0].unwrap();
        assert_eq!(
            s.jobs_sent_to(w2),
            vec![(2, 1)],
            "the bystander runs again, uncharged"
        );
        s.done(w2, 2);
        s.durable();
        assert_eq!(s.job_doc(1).unwrap().state, JobState::Cancelled);
        assert_eq!(s.job_doc(2).unwrap().state, JobState::Succeeded);
    }

    #[test]
    fn oversized_input_is_refused() {
        // Too large for an inline frame, and inline_limit keeps it inline.
        let limit = ipc_proto::MAX_FRAME_LEN - 1;
        let mut s = JobSim::new(&pool("a", 1, &format!("inline_limit = {limit}")));
        let big = vec![b'x'; limit];
        s.sim
            .sup
            .submit(1, "a", big, JobOptions::default(), false, s.sim.now);
        s.pump();
        match &s.replies[0].1 {
            Response::Error { kind, message } => {
                assert_eq!(*kind, ipc_proto::control::ErrorKind::Invalid);
                assert!(message.contains("inline_limit"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // Too large for the arena's input half.
        let mut s = JobSim::new(&pool("a", 1, "shm_size = \"16MiB\""));
        s.sim.sup.submit(
            1,
            "a",
            vec![0u8; 9 << 20],
            JobOptions::default(),
            false,
            s.sim.now,
        );
        s.pump();
        match &s.replies[0].1 {
            Response::Error { kind, message } => {
                assert_eq!(*kind, ipc_proto::control::ErrorKind::Invalid);
                assert!(message.contains("shm_size"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // Within inline_limit, but large enough to be kept in a payload
        // file, from where it goes through the arena: it must fit there
        // too (accepted, it would have stalled the pool).
        let mut s = JobSim::new(&pool(
            "a",
            1,
            "inline_limit = \"2MiB\"\nshm_size = \"2MiB\"",
        ));
        s.sim.sup.submit(
            1,
            "a",
            vec![0u8; 3 << 19],
            JobOptions::default(),
            false,
            s.sim.now,
        );
        s.pump();
        match &s.replies[0].1 {
            Response::Error { kind, message } => {
                assert_eq!(*kind, ipc_proto::control::ErrorKind::Invalid);
                assert!(message.contains("shm_size"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // Over the frame limit but within the arena: accepted.
        let mut s = JobSim::new(&pool("a", 1, ""));
        s.sim.sup.submit(
            1,
            "a",
            vec![0u8; ipc_proto::MAX_FRAME_LEN + 1],
            JobOptions::default(),
            false,
            s.sim.now,
        );
        s.pump();
        assert!(
            !s.replies
                .iter()
                .any(|(_, r)| matches!(r, Response::Error { .. })),
            "{:?}",
            s.replies.first()
        );
    }

    /// A queued job of `pool` as the store hands it over (recovered or
    /// claimed).
    fn stored_job(
        pool: &str,
        id: u64,
        input: &[u8],
        input_file: Option<u64>,
    ) -> crate::store::RecoveredJob {
        crate::store::RecoveredJob {
            job: crate::store::NewJob {
                id,
                pool: pool.into(),
                priority: 0,
                key: None,
                max_attempts: 3,
                timeout_ms: None,
                input: input.into(),
                input_source: None,
                created_ms: 1,
                owner: 0,
                spill: false,
                memory: false,
            },
            attempts: Vec::new(),
            input_file,
        }
    }

    /// Jobs as a cluster's claim hands them over.
    fn claimed(pool: &str, ids: std::ops::Range<u64>) -> Vec<crate::store::RecoveredJob> {
        ids.map(|id| stored_job(pool, id, b"x", None)).collect()
    }

    impl JobSim {
        /// The sizes of the demands stored since `from` (withdrawals left
        /// out).
        fn demands_since(&self, from: usize) -> Vec<u32> {
            self.stored[from..]
                .iter()
                .filter_map(|op| match op {
                    Op::Claim { max, .. } if *max > 0 => Some(*max),
                    _ => None,
                })
                .collect()
        }

        /// Finishes the oldest job in hand of any worker of `pool`, after it
        /// ran for `run`; false if none is.
        fn finish_one(&mut self, pool: &str, run: Duration) -> bool {
            let finished: std::collections::HashSet<u64> = self
                .stored
                .iter()
                .filter_map(|op| match op {
                    Op::Update(u) if u.state.is_terminal() => Some(u.id),
                    _ => None,
                })
                .collect();
            let procs: Vec<ProcId> = self.sim.procs(pool).into_iter().flatten().collect();
            let next = procs.iter().find_map(|&p| {
                self.jobs_sent_to(p)
                    .into_iter()
                    .find(|(id, _)| !finished.contains(id))
                    .map(|(id, _)| (p, id))
            });
            let Some((proc, id)) = next else {
                return false;
            };
            self.sim.now += run;
            self.done(proc, id);
            self.durable();
            true
        }
    }

    /// On a cluster node, a pool of short jobs asks for the next ones while
    /// it still has half of what it claimed (the claim's round trip overlaps
    /// work); a pool of long jobs asks only once a worker has room, so it
    /// never holds jobs that another node's idle workers could run.
    #[test]
    fn a_cluster_pool_claims_ahead_for_short_jobs_and_for_room_only_with_long_ones() {
        let store = "[store]\nurl = \"postgres://u@127.0.0.1/db\"\n";
        for (run, ahead) in [
            (Duration::from_micros(200), true),
            (Duration::from_millis(200), false),
        ] {
            let mut s = JobSim::new(&format!("{store}{}", pool("a", 2, "")));
            let first = s.demands_since(0);
            assert_eq!(first.len(), 1, "idle workers ask for jobs: {first:?}");
            let mut next_id = 1;
            let mut give = |s: &mut JobSim, n: u32| {
                let ids = next_id..next_id + u64::from(n);
                next_id = ids.end;
                let mark = s.stored.len();
                s.sim.sup.on_claimed("a".into(), claimed("a", ids));
                s.pump();
                mark
            };
            let mut mark = give(&mut s, first[0]);
            // Learn the run time over a few claims.
            for _ in 0..3 {
                while s.demands_since(mark).is_empty() {
                    assert!(s.finish_one("a", run), "no demand before the jobs ran out");
                }
                let n = s.demands_since(mark)[0];
                mark = give(&mut s, n);
            }
            // Run the last claim down until the pool asks again.
            while s.demands_since(mark).is_empty() {
                assert!(s.finish_one("a", run), "no demand before the jobs ran out");
            }
            let queued = s.sim.sup.status(Some("a"), s.sim.now).unwrap().pools[0].queued;
            let asked = u64::from(s.demands_since(mark)[0]);
            let held: usize = s.sim.sup.pools["a"]
                .slots
                .iter()
                .map(|sl| match &sl.state {
                    SlotState::Running(r) => r.inflight.len(),
                    _ => 0,
                })
                .sum();
            if ahead {
                // Asked at half: for more than are left.
                assert!(
                    queued > 0 && asked > queued,
                    "short jobs: the next claim ({asked}) while {queued} are still queued"
                );
            } else {
                assert_eq!(queued, 0, "long jobs: nothing is queued when the pool asks");
                assert!(
                    held < 2,
                    "long jobs: a worker has room when the pool asks ({held} held)"
                );
            }
        }
    }

    /// A recovered job whose input no longer fits the arena (shm_size was
    /// lowered) is failed with a clear error instead of blocking the
    /// pool's queue; the job behind it runs.
    #[test]
    fn a_recovered_input_too_large_for_the_arena_fails_and_the_queue_moves() {
        let recovered = |id, input: &[u8], file| stored_job("a", id, input, file);
        let s = JobSim::with_recovered(
            &pool("a", 1, "shm_size = \"2MiB\""),
            vec![
                recovered(1, b"", Some(3 << 20)),
                recovered(2, b"small", None),
            ],
        );
        let w = s.sim.procs("a")[0].unwrap();
        assert_eq!(
            s.jobs_sent_to(w),
            vec![(2, 1)],
            "job 2 runs, job 1 never does"
        );
        let failed = s
            .stored
            .iter()
            .find_map(|op| match op {
                Op::Update(u) if u.id == 1 => Some(u.clone()),
                _ => None,
            })
            .expect("job 1's final row");
        assert_eq!(failed.state, JobState::Failed);
        let error = failed.error.unwrap_or_default();
        assert!(error.contains("raise shm_size"), "{error}");
        // Kept for a `retry` (with `shm_size` raised); pruning removes it.
        assert!(!failed.drop_input_file, "its input file stays");
    }
}

#[test]
fn start_retries_fail_a_pool_whose_workers_never_start_and_spare_one_that_did() {
    // Workers that exit before Ready, while none ever was: the third such
    // death fails the pool (start_retries = 2), well under max_restarts.
    let mut s = Sim::new(&cfg(&pool(
        "a",
        2,
        "backoff_initial = \"0s\"\nmax_restarts = 100\nstart_retries = 2",
    )));
    let mut deaths = 0;
    while s.sup.pools["a"].state == PoolState::Running {
        let p = s.procs("a").into_iter().flatten().next().unwrap();
        s.advance(Duration::from_millis(10));
        s.kill(p);
        deaths += 1;
        assert!(deaths < 20);
    }
    assert_eq!(deaths, 3);
    let status = s.sup.status(Some("a"), s.now).unwrap();
    let error = status.pools[0].last_error.clone().unwrap();
    assert!(
        error.contains("exited before they were ready 3 times in a row"),
        "{error}"
    );

    // Once a worker has been ready, deaths (before Ready or not) count only
    // toward max_restarts.
    let mut s = Sim::new(&cfg(&pool(
        "b",
        1,
        "backoff_initial = \"0s\"\nmax_restarts = 100\nstart_retries = 1",
    )));
    s.ready_all("b");
    for _ in 0..10 {
        let p = s.procs("b").into_iter().flatten().next().unwrap();
        s.advance(Duration::from_millis(10));
        s.kill(p);
    }
    assert_eq!(s.sup.pools["b"].state, PoolState::Running);
}
