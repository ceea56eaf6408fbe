//! Black-box job tests: submit, map, wait, result, cancel, jobs, retries,
//! timeouts, priorities, keys, semaphores, backpressure, recycling, and
//! durability across worker and daemon crashes.

use jobvisor::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

fn pool(name: &str, cmd: &str, workers: u32, extra: &str) -> String {
    format!("[pools.{name}]\ncommand = [{cmd}]\nworkers = {workers}\n{extra}\n")
}

fn echo_cfg(extra: &str) -> String {
    format!(
        "{}{}{}",
        daemon_section(),
        pool("echo", &format!("{}, \"echo\"", worker_bin()), 2, extra),
        pool("sha256", &format!("{}, \"sha256\"", worker_bin()), 1, "")
    )
}

fn lines_json(out: &str) -> Vec<Value> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

fn job(d: &Daemon, id: u64) -> Value {
    d.job_doc(id)
}

fn wait_state(d: &Daemon, id: u64, state: &str) -> Value {
    d.wait_state(id, state)
}

#[test]
fn map_prints_every_output_and_ordered_keeps_input_order() {
    let d = Daemon::start("map", &echo_cfg(""));
    d.wait_ready("echo", 2);
    let r = d.ctl_stdin(&["map", "echo"], Some(b"a\nb\nc\n"));
    assert_eq!(r.code, 0, "{r:?}");
    let mut got: Vec<&str> = r.stdout.lines().collect();
    got.sort();
    assert_eq!(got, vec!["a", "b", "c"]);
    let input: String = (0..500).map(|i| format!("line {i}\n")).collect();
    let r = d.ctl_stdin(&["map", "echo", "--ordered"], Some(input.as_bytes()));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, input);
    // JSON: one object per line with the input index.
    let r = d.ctl_stdin(&["--json", "map", "echo"], Some(b"x\ny\n"));
    assert_eq!(r.code, 0);
    let docs = lines_json(&r.stdout);
    assert_eq!(docs.len(), 2);
    for doc in docs {
        let idx = doc["index"].as_u64().unwrap();
        assert_eq!(doc["output"], ["x", "y"][idx as usize]);
        assert_eq!(doc["state"], "succeeded");
        assert!(doc["id"].as_u64().unwrap() > 0);
    }
}

#[test]
fn submit_wait_sha256_matches_sha256sum() {
    let d = Daemon::start("sha", &echo_cfg(""));
    d.wait_ready("sha256", 1);
    let f = d.dir.path().join("input.bin");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&f, &data).unwrap();
    let r = d.submit_file_wait("sha256", &f);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, sha256sum(&f));
    // Binary-safe raw output, stdin input.
    let bin_in: Vec<u8> = (0..=255u8).rev().collect();
    let r = d.ctl_stdin(&["submit", "echo", "-", "--wait"], Some(&bin_in));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.raw, bin_in);
    // The job document has the attempt history.
    let id = d.submit_id(&["echo", "--input", "hello"]);
    let j = wait_state(&d, id, "succeeded");
    assert_eq!(j["output"], "hello");
    assert_eq!(j["attempts"][0]["n"], 1);
    assert_eq!(j["attempts"][0]["outcome"], "succeeded");
    assert!(j["attempts"][0]["pid"].as_u64().unwrap() > 0);
}

#[test]
fn failed_job_exits_1_and_wait_reports_it() {
    let cfg = format!(
        "{}{}",
        daemon_section(),
        pool("fail", &format!("{}, \"fail\"", test_worker()), 1, "")
    );
    let d = Daemon::start("fail", &cfg);
    d.wait_ready("fail", 1);
    let r = d.ctl(&["submit", "fail", "--input", "boom here", "--wait"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("boom here"), "{}", r.stderr);
    let id = d.submit_id(&["fail", "--input", "again"]);
    let r = d.ctl(&["wait", &id.to_string()]);
    assert_eq!(r.code, 1, "{r:?}");
    let j = job(&d, id);
    assert_eq!(j["state"], "failed");
    assert_eq!(j["error"], "again");
    assert_eq!(
        j["attempts"].as_array().unwrap().len(),
        1,
        "a failure is not retried"
    );
    let r = d.ctl_stdin(&["map", "fail"], Some(b"x\n"));
    assert_eq!(r.code, 1);
}

#[test]
fn unknown_pool_unknown_job_and_oversized_input_are_clear_errors() {
    let d = Daemon::start("badinput", &echo_cfg(""));
    d.wait_ready("echo", 2);
    let r = d.ctl(&["submit", "nope", "--input", "x"]);
    assert_eq!(r.code, 4, "{r:?}");
    assert_eq!(r.stderr.trim().lines().count(), 1);
    assert!(r.stderr.contains("nope"), "{}", r.stderr);
    for cmd in [
        vec!["result", "999999"],
        vec!["wait", "999999"],
        vec!["cancel", "999999"],
    ] {
        let r = d.ctl(&cmd);
        assert_eq!(r.code, 4, "{cmd:?}: {r:?}");
        assert_eq!(r.stderr.trim().lines().count(), 1, "{cmd:?}: {r:?}");
        // Every command names the job it did not find, in the same words.
        assert!(
            r.stderr.contains("no job 999999 (never submitted"),
            "{cmd:?}: {r:?}"
        );
    }
    // Over half of the default shm_size (256 MiB): refused before the
    // daemon reads any of it (a sparse file: nothing to read anyway).
    let big = d.dir.path().join("big.bin");
    std::fs::File::create(&big)
        .unwrap()
        .set_len((128 << 20) + 1)
        .unwrap();
    let r = d.ctl(&["submit", "echo", "--input-file", big.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{r:?}");
    assert_eq!(r.stderr.trim().lines().count(), 1, "{r:?}");
    assert!(r.stderr.contains("shm_size"), "{r:?}");
    // Nothing of it was queued, and the daemon is fine.
    assert_eq!(d.pool("echo")["queued"], 0);
    assert_eq!(d.wait_ready("echo", 2).len(), 2);
}

#[test]
fn no_loss_under_worker_crashes() {
    let cfg = format!(
        "{}{}",
        daemon_section(),
        pool(
            "chaos",
            &format!("{}, \"chaos\", \"1\"", test_worker()),
            2,
            "backoff_initial = \"0s\"\nbackoff_max = \"5ms\"\nmax_restarts = 100000\nprefetch = 4"
        )
    );
    let d = Daemon::start("chaos", &cfg);
    d.wait_ready("chaos", 2);
    let n = 10_000;
    let input: String = (0..n).map(|i| format!("job-{i}\n")).collect();
    let r = d.ctl_stdin(&["--json", "map", "chaos"], Some(input.as_bytes()));
    let docs = lines_json(&r.stdout);
    let bad: Vec<&Value> = docs.iter().filter(|d| d["state"] != "succeeded").collect();
    assert_eq!(r.code, 0, "stderr: {} not succeeded: {bad:?}", r.stderr);
    assert_eq!(docs.len(), n);
    let mut seen = HashSet::new();
    for d in &docs {
        assert_eq!(d["state"], "succeeded", "{d}");
        let idx = d["index"].as_u64().unwrap();
        assert_eq!(d["output"], format!("job-{idx}"));
        assert!(seen.insert(idx));
    }
    // Each job has its attempt history: the aborted ones show a lost first
    // attempt and a successful second.
    let r = d.ctl(&["--json", "jobs", "--pool", "chaos", "--limit", "20000"]);
    assert_eq!(r.code, 0, "{r:?}");
    let all = r.json_list();
    assert_eq!(all.len(), n);
    let retried: Vec<&Value> = all
        .iter()
        .filter(|j| j["attempts"].as_array().unwrap().len() > 1)
        .collect();
    assert!(
        (30..=300).contains(&retried.len()),
        "about 1% should have been retried, got {}",
        retried.len()
    );
    for j in &all {
        assert_eq!(j["state"], "succeeded");
        let a = j["attempts"].as_array().unwrap();
        assert_eq!(a.last().unwrap()["outcome"], "succeeded");
        for lost in &a[..a.len() - 1] {
            assert_eq!(lost["outcome"], "lost", "{j}");
        }
    }
}

#[test]
fn no_loss_under_daemon_kill9() {
    use ipc_proto::control::{JobOptions, Request, Response};
    use jobvisor_client::Connection;
    let cfg = format!(
        "{}{}",
        daemon_section(),
        pool(
            "echo",
            &format!("{}, \"echo\"", worker_bin()),
            2,
            "prefetch = 8"
        )
    );
    let mut d = Daemon::start("kill9", &cfg);
    d.wait_ready("echo", 2);
    let total = 20_000u32;
    let sock = d.socket();
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = progress.clone();
    // A submitter that pipelines, records every acknowledged id and
    // reconnects after the daemon dies (resubmitting what was not acked).
    let submitter = std::thread::spawn(move || {
        let mut acked: Vec<u64> = Vec::new();
        let mut next = 0u32;
        let end = Instant::now() + Duration::from_secs(120);
        while next < total && Instant::now() < end {
            let Ok(mut c) = Connection::connect(&sock) else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let batch = 500.min(total - next);
            let mut ok = true;
            for i in 0..batch {
                let req = Request::Submit {
                    pool: "echo".into(),
                    input: format!("n{}", next + i).into_bytes().into(),
                    options: JobOptions::default(),
                    wait: false,
                };
                if c.send(&req).is_err() {
                    ok = false;
                    break;
                }
            }
            let mut got = 0;
            while ok && got < batch {
                match c.recv() {
                    Ok(Response::Submitted { id }) => {
                        acked.push(id);
                        got += 1;
                        seen.store(acked.len(), std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(Response::Error { message, .. }) => panic!("submit refused: {message}"),
                    Ok(_) => {}
                    Err(_) => ok = false,
                }
            }
            // Only acknowledged submits count; the rest are sent again.
            next += got;
        }
        acked
    });
    // Kill it at a quarter, half and three quarters of the submits: each
    // kill lands mid-stream, after real progress since the last restart.
    for k in 1..=3 {
        let mark = total as usize * k / 4;
        wait_for(&format!("{mark} acknowledged submits"), DEADLINE, || {
            (progress.load(std::sync::atomic::Ordering::SeqCst) >= mark).then_some(())
        });
        kill(d.pid(), Signal::SIGKILL);
        d.wait_exit(DEADLINE);
        d.spawn();
    }
    let acked = submitter.join().unwrap();
    assert_eq!(acked.len(), total as usize, "the submitter gave up");
    let unique: HashSet<u64> = acked.iter().copied().collect();
    assert_eq!(unique.len(), acked.len(), "an id was handed out twice");
    // Every acknowledged job finishes.
    let mut ids: Vec<String> = acked.iter().map(|i| i.to_string()).collect();
    ids.sort();
    let mut args = vec!["--json", "wait"];
    args.extend(ids.iter().map(String::as_str));
    let r = d.ctl(&args);
    let docs = lines_json(&r.stdout);
    assert_eq!(docs.len(), acked.len(), "stderr: {}", r.stderr);
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    for doc in &docs {
        *states
            .entry(doc["state"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let ok =
        states.get("succeeded").copied().unwrap_or(0) + states.get("dead").copied().unwrap_or(0);
    assert_eq!(ok, acked.len(), "states: {states:?}");
    assert!(
        states.get("succeeded").copied().unwrap_or(0) > acked.len() * 9 / 10,
        "{states:?}"
    );
}

#[test]
fn timeout_kills_and_retries_then_times_out() {
    let cfg = format!(
        "{}{}",
        daemon_section(),
        pool(
            "slow",
            &format!("{}, \"sleep-stubborn\"", test_worker()),
            1,
            "stop_timeout = \"200ms\"\nmax_attempts = 2"
        )
    );
    let d = Daemon::start("timeout", &cfg);
    let pid = d.wait_ready("slow", 1)[0];
    let t0 = Instant::now();
    let id = d.submit_id(&["slow", "--input", "60000", "--timeout", "300ms"]);
    let j = wait_for("the job to time out twice", DEADLINE, || {
        let j = job(&d, id);
        (j["state"] == "timed_out").then_some(j)
    });
    assert!(t0.elapsed() >= Duration::from_millis(600));
    let attempts = j["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{j}");
    for a in attempts {
        assert_eq!(a["outcome"], "timed_out");
    }
    assert!(
        !alive(pid),
        "the worker running the timed-out job was stopped"
    );
    // The worker was replaced, not counted as a crash loop.
    let p = d.pool("slow");
    assert_eq!(p["state"], "running");
    d.wait_ready("slow", 1);
    // A job within its timeout still succeeds.
    let r = d.ctl(&[
        "submit",
        "slow",
        "--input",
        "10",
        "--timeout",
        "5s",
        "--wait",
    ]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn cancel_queued_and_running() {
    let cfg = format!(
        "{}{}",
        daemon_section(),
        pool(
            "slow",
            &format!("{}, \"sleep\"", test_worker()),
            1,
            "stop_timeout = \"2s\""
        )
    );
    let d = Daemon::start("cancel", &cfg);
    d.wait_ready("slow", 1);
    let running = d.submit_id(&["slow", "--input", "60000"]);
    let queued = d.submit_id(&["slow", "--input", "10"]);
    wait_state(&d, running, "running");
    let r = d.ctl(&["cancel", &queued.to_string()]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = wait_state(&d, queued, "cancelled");
    assert!(j["attempts"].as_array().unwrap().is_empty(), "{j}");
    let r = d.ctl(&["cancel", &running.to_string()]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = wait_state(&d, running, "cancelled");
    assert_eq!(j["attempts"][0]["outcome"], "cancelled");
    // Cancelling a finished job is refused; wait reports not succeeded.
    let r = d.ctl(&["cancel", &running.to_string()]);
    assert_ne!(r.code, 0);
    assert_eq!(d.ctl(&["wait", &queued.to_string()]).code, 1);
    // The worker honoured the cancel and keeps serving.
    let r = d.ctl(&["submit", "slow", "--input", "1", "--wait"]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn cancel_of_a_worker_that_ignores_it_stops_the_worker() {
    let cfg = format!(
        "{}{}",
        daemon_section(),
        pool(
            "stubborn",
            &format!("{}, \"sleep-stubborn\"", test_worker()),
            1,
            "stop_timeout = \"300ms\""
        )
    );
    let d = Daemon::start("cancel-stubborn", &cfg);
    let pid = d.wait_ready("stubborn", 1)[0];
    let id = d.submit_id(&["stubborn", "--input", "60000"]);
    wait_state(&d, id, "running");
    assert_eq!(d.ctl(&["cancel", &id.to_string()]).code, 0);
    wait_state(&d, id, "cancelled");
    wait_for("the stubborn worker to be stopped", DEADLINE, || {
        (!alive(pid)).then_some(())
    });
    d.wait_ready("stubborn", 1);
}

#[test]
fn priority_runs_higher_first_fifo_within() {
    let cfg = format!(
        "{}{}",
        daemon_section(),
        pool("one", &format!("{}, \"sleep\"", test_worker()), 1, "")
    );
    let d = Daemon::start("priority", &cfg);
    d.wait_ready("one", 1);
    // Occupy the only worker so the rest queue up.
    let blocker = d.submit_id(&["one", "--input", "400"]);
    wait_state(&d, blocker, "running");
    let mut ids = Vec::new();
    for (prio, tag) in [(0, "a"), (5, "b"), (0, "c"), (5, "d"), (9, "e")] {
        let _ = tag;
        ids.push((
            prio,
            d.submit_id(&["one", "--input", "1", "--priority", &prio.to_string()]),
        ));
    }
    let all: Vec<String> = ids.iter().map(|(_, i)| i.to_string()).collect();
    let mut args = vec!["wait"];
    args.extend(all.iter().map(String::as_str));
    assert_eq!(d.ctl(&args).code, 0);
    let mut started: Vec<(u64, u64)> = ids
        .iter()
        .map(|(_, id)| {
            let j = job(&d, *id);
            (j["attempts"][0]["started_ms"].as_u64().unwrap(), *id)
        })
        .collect();
    started.sort();
    let order: Vec<u64> = started.iter().map(|(_, id)| *id).collect();
    // e (9), then b, d (5, FIFO), then a, c (0, FIFO).
    assert_eq!(
        order,
        vec![ids[4].1, ids[1].1, ids[3].1, ids[0].1, ids[2].1]
    );
}

#[test]
fn key_mutex_never_runs_two_jobs_with_one_key() {
    let dir = TempDir::new("mutexdir");
    let cfg = format!(
        "{}{}",
        daemon_section(),
        pool(
            "m",
            &format!(
                "{}, \"mutex\", {:?}",
                test_worker(),
                dir.path().display().to_string()
            ),
            4,
            ""
        )
    );
    let d = Daemon::start("mutex", &cfg);
    d.wait_ready("m", 4);
    let mut ids = Vec::new();
    for i in 0..24 {
        let key = ["k1", "k2"][i % 2];
        ids.push(
            d.submit_id(&["m", "--input", &format!("{key}:30"), "--key", key])
                .to_string(),
        );
    }
    let mut args = vec!["wait"];
    args.extend(ids.iter().map(String::as_str));
    let r = d.ctl(&args);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        !dir.path().join("violations").exists(),
        "{}",
        std::fs::read_to_string(dir.path().join("violations")).unwrap_or_default()
    );
    // The daemon's own record agrees: intervals of one key never overlap.
    let mut by_key: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for id in &ids {
        let j = job(&d, id.parse().unwrap());
        let a = &j["attempts"][0];
        by_key
            .entry(j["key"].as_str().unwrap().to_string())
            .or_default()
            .push((
                a["started_ms"].as_u64().unwrap(),
                a["ended_ms"].as_u64().unwrap(),
            ));
    }
    for (k, mut v) in by_key {
        v.sort();
        for w in v.windows(2) {
            assert!(w[0].1 <= w[1].0, "key {k}: overlapping {w:?}");
        }
    }
}

#[test]
fn semaphore_of_two_across_two_pools() {
    let dir = TempDir::new("semdir");
    let cmd = format!(
        "{}, \"sem\", {:?}, \"2\"",
        test_worker(),
        dir.path().display().to_string()
    );
    let cfg = format!(
        "{}[semaphores]\ngpu = 2\n{}{}",
        daemon_section(),
        pool("a", &cmd, 3, "semaphores = [\"gpu\"]"),
        pool("b", &cmd, 3, "semaphores = [\"gpu\"]")
    );
    let d = Daemon::start("sem", &cfg);
    d.wait_ready("a", 3);
    d.wait_ready("b", 3);
    let mut ids = Vec::new();
    for i in 0..16 {
        let p = ["a", "b"][i % 2];
        ids.push(d.submit_id(&[p, "--input", "40"]).to_string());
    }
    // While they run, status never shows more than 2 running in total.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let st = d.status();
        let running: u64 = st["pools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["running"].as_u64().unwrap())
            .sum();
        assert!(running <= 2, "{running} running: {st}");
        let done: u64 = st["pools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["succeeded"].as_u64().unwrap())
            .sum();
        if done == 16 || Instant::now() > end {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut args = vec!["wait"];
    args.extend(ids.iter().map(String::as_str));
    assert_eq!(d.ctl(&args).code, 0);
    assert!(
        !dir.path().join("violations").exists(),
        "{}",
        std::fs::read_to_string(dir.path().join("violations")).unwrap_or_default()
    );
}

#[test]
fn full_queue_is_rejected_at_once_with_exit_5() {
    let cfg = format!(
        "{}{}",
        daemon_section(),
        pool(
            "tiny",
            &format!("{}, \"sleep\"", test_worker()),
            1,
            "queue_capacity = 3"
        )
    );
    let d = Daemon::start("full", &cfg);
    d.wait_ready("tiny", 1);
    let first = d.submit_id(&["tiny", "--input", "2000"]);
    wait_state(&d, first, "running");
    for _ in 0..3 {
        d.submit_id(&["tiny", "--input", "1"]);
    }
    let t0 = Instant::now();
    let r = d.ctl(&["submit", "tiny", "--input", "1"]);
    assert_eq!(r.code, 5, "{r:?}");
    assert!(r.stderr.contains("queue_capacity"), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1);
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(d.pool("tiny")["queued"], 3);
}

#[test]
fn max_jobs_per_worker_recycles_without_counting_a_crash() {
    let cfg = format!(
        "{}{}",
        daemon_section(),
        pool(
            "p",
            &format!("{}, \"pid\"", test_worker()),
            1,
            "max_jobs_per_worker = 3"
        )
    );
    let d = Daemon::start("recycle", &cfg);
    d.wait_ready("p", 1);
    let input: String = (0..9).map(|i| format!("{i}\n")).collect();
    let r = d.ctl_stdin(&["map", "p", "--ordered"], Some(input.as_bytes()));
    assert_eq!(r.code, 0, "{r:?}");
    let pids: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(pids.len(), 9);
    for chunk in pids.chunks(3) {
        assert!(chunk.iter().all(|p| *p == chunk[0]), "{pids:?}");
    }
    let distinct: HashSet<&&str> = pids.iter().collect();
    assert_eq!(distinct.len(), 3, "{pids:?}");
    let w = &d.pool("p")["workers"][0];
    assert_eq!(w["restarts"], 0, "recycling is not a crash");
    assert_eq!(d.pool("p")["state"], "running");
}

#[test]
fn max_memory_recycles_between_jobs() {
    let cfg = format!(
        "{}{}",
        daemon_section(),
        pool(
            "hog",
            &format!("{}, \"memhog\"", test_worker()),
            1,
            "max_memory = \"64MiB\""
        )
    );
    let d = Daemon::start("memhog", &cfg);
    let pid = d.wait_ready("hog", 1)[0];
    let r = d.ctl(&["submit", "hog", "--input", "16", "--wait"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(d.wait_ready("hog", 1)[0], pid, "under the limit: kept");
    let r = d.ctl(&["submit", "hog", "--input", "100", "--wait"]);
    assert_eq!(r.code, 0, "the job itself succeeds: {r:?}");
    let new = wait_for("the hog to be recycled", DEADLINE, || {
        let p = d.wait_ready("hog", 1)[0];
        (p != pid).then_some(p)
    });
    assert!(!alive(pid));
    assert_ne!(new, pid);
    assert_eq!(d.pool("hog")["workers"][0]["restarts"], 0);
}

#[test]
fn garbage_or_oversized_frame_restarts_the_worker_and_retries_the_job() {
    let cfg = format!(
        "{}{}",
        daemon_section(),
        pool(
            "g",
            &format!("{}, \"garbage\"", test_worker()),
            1,
            "backoff_initial = \"0s\""
        )
    );
    let d = Daemon::start("garbage-worker", &cfg);
    d.wait_ready("g", 1);
    for input in ["garbage", "oversized"] {
        let pid = d.wait_ready("g", 1)[0];
        let r = d.ctl(&["--json", "submit", "g", "--input", input, "--wait"]);
        assert_eq!(r.code, 0, "{input}: {r:?}");
        let j = r.json();
        assert_eq!(j["output"], input);
        let a = j["attempts"].as_array().unwrap();
        assert_eq!(a.len(), 2, "{j}");
        assert_eq!(a[0]["outcome"], "lost");
        assert!(!alive(pid));
        assert!(d.log_text().contains("protocol error"), "{input}");
    }
    assert!(alive(d.pid()));
}

#[test]
fn jobs_lists_by_pool_and_state_and_events_stream() {
    let d = Daemon::start("jobs-list", &echo_cfg(""));
    d.wait_ready("echo", 2);
    let mut events = std::process::Command::new(bin("jobvisorctl"))
        .arg("--socket")
        .arg(d.socket())
        .args(["--json", "events"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = events.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The subscription is live once worker events come through: toggle
    // the pool size until one arrives (no job is involved).
    let mut workers = 2;
    wait_for("the events stream to be live", DEADLINE, || {
        workers = if workers == 2 { 3 } else { 2 };
        assert_eq!(d.ctl(&["scale", "echo", &workers.to_string()]).code, 0);
        rx.recv_timeout(Duration::from_millis(500)).ok()
    });
    while rx.try_recv().is_ok() {}
    let r = d.ctl_stdin(&["map", "echo"], Some(b"1\n2\n3\n"));
    assert_eq!(r.code, 0);
    let mut names = Vec::new();
    let end = Instant::now() + DEADLINE;
    while names
        .iter()
        .filter(|n: &&String| *n == "job_finished")
        .count()
        < 3
    {
        let left = end.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("events in time");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert!(v["ts_ms"].as_u64().unwrap() > 0);
        names.push(v["event"].as_str().unwrap().to_string());
    }
    assert!(names.contains(&"job_queued".to_string()), "{names:?}");
    assert!(names.contains(&"job_started".to_string()), "{names:?}");
    let _ = events.kill();
    let _ = events.wait();
    let r = d.ctl(&["--json", "jobs", "--pool", "echo", "--state", "succeeded"]);
    assert_eq!(r.code, 0);
    let docs = r.json_list();
    assert_eq!(docs.len(), 3);
    for j in docs {
        assert!(j.get("output").is_none() || j["output"].is_null());
        assert_eq!(j["pool"], "echo");
    }
    assert_eq!(d.ctl(&["jobs", "--state", "bogus"]).code, 2);
    let r = d.ctl(&["jobs"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("succeeded"));
}

#[test]
fn queued_jobs_survive_a_restart_and_running_ones_are_retried() {
    let cfg = format!(
        "{}{}",
        daemon_section(),
        pool("slow", &format!("{}, \"sleep\"", test_worker()), 1, "")
    );
    let mut d = Daemon::start("recover", &cfg);
    d.wait_ready("slow", 1);
    let running = d.submit_id(&["slow", "--input", "60000"]);
    let queued = d.submit_id(&["slow", "--input", "5"]);
    // Wait until the store (not just the daemon's memory) has it running.
    wait_for("the running state to be stored", DEADLINE, || {
        let r = d.ctl(&["--json", "jobs", "--state", "running"]);
        r.stdout
            .contains(&format!("\"id\":{running},"))
            .then_some(())
    });
    kill(d.pid(), Signal::SIGKILL);
    d.wait_exit(DEADLINE);
    // Make the retried job quick: rewrite nothing, just restart; the
    // running job is requeued with a lost attempt.
    d.spawn();
    let j = job(&d, running);
    assert!(j["state"] == "queued" || j["state"] == "running", "{j}");
    assert_eq!(j["attempts"][0]["outcome"], "lost", "{j}");
    // It went back to the head of the queue; cancel it so the queued job
    // behind it gets the only worker.
    assert_eq!(d.ctl(&["cancel", &running.to_string()]).code, 0);
    wait_state(&d, running, "cancelled");
    wait_state(&d, queued, "succeeded");
}

#[test]
fn shutdown_leaves_queued_jobs_in_the_store() {
    let cfg = format!(
        "{}{}",
        daemon_section(),
        pool("slow", &format!("{}, \"sleep\"", test_worker()), 1, "")
    );
    let mut d = Daemon::start("drain", &cfg);
    d.wait_ready("slow", 1);
    let running = d.submit_id(&["slow", "--input", "300"]);
    wait_state(&d, running, "running");
    let queued: Vec<u64> = (0..3)
        .map(|_| d.submit_id(&["slow", "--input", "1"]))
        .collect();
    assert_eq!(d.ctl(&["shutdown"]).code, 0);
    assert!(d.wait_exit(DEADLINE).success());
    d.spawn();
    // The running job was allowed to finish; the queued ones run now.
    assert_eq!(job(&d, running)["state"], "succeeded");
    for id in queued {
        wait_state(&d, id, "succeeded");
    }
}

/// PROTOCOL.md §9, "Jobs in hand at Shutdown": when `drain_timeout` cuts
/// the drain short, a job still in hand is the worker's; its answer, sent
/// after `Shutdown` but before the worker exits, is recorded (the job is
/// not run again). The worker ignores `stop_signal` (USR1) so that it can
/// finish.
#[test]
fn an_answer_after_shutdown_at_the_drain_timeout_is_recorded() {
    let dir = TempDir::new("drain-cut-script");
    let w = script(
        dir.path(),
        "w.sh",
        &format!(
            "trap '' USR1\nexec {} sleep",
            bin("jobvisor-test-worker").display()
        ),
    );
    let cfg = format!(
        "{}drain_timeout = \"100ms\"\n{}",
        daemon_section(),
        pool(
            "slow",
            &format!("{:?}", w.display().to_string()),
            1,
            "stop_signal = \"USR1\"\nstop_timeout = \"20s\""
        )
    );
    let mut d = Daemon::start("drain-cut", &cfg);
    d.wait_ready("slow", 1);
    let id = d.submit_id(&["slow", "--input", "1500"]);
    wait_state(&d, id, "running");
    assert_eq!(d.ctl(&["shutdown"]).code, 0);
    assert!(d.wait_exit(DEADLINE).success());
    // (The exit can come before the log reader has the last lines.)
    wait_for("the drain note in the log", DEADLINE, || {
        d.log_text()
            .contains("drain_timeout over with 1 jobs in hand")
            .then_some(())
    });
    d.spawn();
    let j = job(&d, id);
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["attempts"].as_array().unwrap().len(), 1, "{j}");
}

#[test]
fn unwritable_state_dir_is_a_clear_startup_error() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = TempDir::new("ro-state");
    let root = nix::unistd::geteuid().is_root();
    // The socket's directory is the daemon's user's; the state directory is
    // not writable by it (as root we run it as nobody, since root ignores
    // permission bits).
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    if root {
        std::os::unix::fs::chown(&run, Some(65534), Some(65534)).unwrap();
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    // Owned by the daemon's user (else it is refused as someone else's),
    // but not writable: as root we run the daemon as nobody, since root
    // ignores permission bits.
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o555)).unwrap();
    if root {
        std::os::unix::fs::chown(&state, Some(65534), Some(65534)).unwrap();
    }
    let cfg = dir.path().join("jobvisor.toml");
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\ncontrol_socket = \"run/ctl.sock\"\nstate_dir = \"state\"\n[pools.echo]\ncommand = [{}, \"echo\"]\nworkers = 1\n",
            worker_bin()
        ),
    )
    .unwrap();
    let mut c = std::process::Command::new(bin("jobvisord"));
    c.arg("--config").arg(&cfg);
    if root {
        c.uid(65534).gid(65534);
    }
    let r = run_with_stdin(c, None);
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(r.code, 1, "{r:?}");
    let err = r.stderr.trim();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("jobvisord: "), "{err}");
    assert!(err.contains("state"), "{err}");
    assert!(err.to_lowercase().contains("permission denied"), "{err}");
    assert!(err.contains("state_dir"), "says what to do: {err}");
    // Nothing was left behind in the socket directory.
    assert!(!run.join("ctl.sock").exists(), "{err}");
}

#[test]
fn full_disk_refuses_submits_clearly_and_heals() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let dir = TempDir::new("fulldisk");
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs"])
        .arg(&state)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(state.clone());
    let cfg = format!(
        "[daemon]\ncontrol_socket = \"ctl.sock\"\nstate_dir = {:?}\n{}",
        state.display().to_string(),
        pool("echo", &format!("{}, \"echo\"", worker_bin()), 1, "")
    );
    let d = Daemon::start("fulldisk-daemon", &cfg);
    d.wait_ready("echo", 1);
    // Leave little room, then submit until the store cannot take more.
    let filler = state.join("filler");
    let _ = std::process::Command::new("fallocate")
        .args(["-l", "3400k"])
        .arg(&filler)
        .status();
    let input = dir.path().join("input.bin");
    std::fs::write(&input, vec![7u8; 48 << 10]).unwrap();
    let mut accepted = Vec::new();
    let mut refusal = None;
    for _ in 0..100 {
        let r = d.ctl(&["submit", "echo", "--input-file", input.to_str().unwrap()]);
        if r.code == 0 {
            accepted.push(r.stdout.trim().to_string());
        } else {
            refusal = Some(r);
            break;
        }
    }
    let r = refusal.expect("the disk never filled up");
    assert_eq!(r.code, 5, "{r:?}");
    assert_eq!(r.stderr.trim().lines().count(), 1, "{r:?}");
    assert!(r.stderr.contains("could not be stored"), "{}", r.stderr);
    assert!(alive(d.pid()));
    // Free the space: the store heals and takes jobs again.
    std::fs::remove_file(&filler).unwrap();
    let id = wait_for("the store to accept jobs again", DEADLINE, || {
        let r = d.ctl(&["submit", "echo", "--input", "after"]);
        (r.code == 0).then(|| r.stdout.trim().to_string())
    });
    let r = d.ctl(&["wait", &id]);
    assert_eq!(r.code, 0, "{r:?}");
    // Every job acknowledged before the disk filled up finished.
    let mut args = vec!["wait"];
    args.extend(accepted.iter().map(String::as_str));
    if !accepted.is_empty() {
        let r = d.ctl(&args);
        assert_eq!(r.code, 0, "{r:?}");
    }
}

/// A pool name with a typo is an error (exit 4, naming the configured
/// pools), not an empty listing or an empty `map`; a pool removed by a
/// reload still lists its jobs.
#[test]
fn an_unknown_pool_is_not_found_in_jobs_and_in_an_empty_map() {
    let d = Daemon::start("unknown-pool", &echo_cfg(""));
    d.wait_ready("echo", 2);
    for args in [&["jobs", "--pool", "ecoh"][..], &["map", "ecoh"][..]] {
        let r = d.ctl_stdin(args, Some(b""));
        assert_eq!(r.code, 4, "{args:?}: {r:?}");
        assert!(
            r.stderr
                .contains("no pool named \"ecoh\"; configured pools: echo"),
            "{args:?}: {r:?}"
        );
    }
    let r = d.ctl_stdin(&["map", "echo"], Some(b""));
    assert_eq!((r.code, r.stdout.as_str()), (0, ""), "{r:?}");
    let r = d.ctl(&["jobs", "--pool", "echo"]);
    assert_eq!(r.code, 0, "{r:?}");

    // Jobs of a pool the config no longer has are still listed.
    let r = d.ctl(&["submit", "echo", "--input", "x", "--wait"]);
    assert_eq!(r.code, 0, "{r:?}");
    d.write_config(&format!(
        "{}[pools.other]\ncommand = [{}, \"echo\"]\nworkers = 1\n",
        daemon_section(),
        worker_bin()
    ));
    let r = d.ctl(&["reload"]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = d.ctl(&["jobs", "--pool", "echo"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("succeeded"), "{r:?}");
}

/// `cancel` takes several ids (one line each; the first error's exit code)
/// and `--pool P [--state S]` (every queued and running job of the pool).
#[test]
fn cancel_takes_several_ids_or_a_whole_pool() {
    let cfg = sleep_pool(1, "prefetch = 1");
    let d = Daemon::start("cancel-many", &cfg);
    d.wait_ready("s", 1);
    let ids: Vec<String> = (0..6)
        .map(|_| d.submit_id(&["s", "--input", "30000"]).to_string())
        .collect();
    // Two by id, and one that does not exist: exit 4, the others done.
    let r = d.ctl(&["cancel", &ids[4], &ids[5], "999999"]);
    assert_eq!(r.code, 4, "{r:?}");
    assert_eq!(r.stdout.lines().count(), 2, "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    assert!(r.stderr.contains("999999"), "{r:?}");
    // Only the queued ones of the pool: the running one goes on.
    let r = d.ctl(&["cancel", "--pool", "s", "--state", "queued"]);
    assert_eq!(
        (r.code, r.stdout.trim()),
        (0, "cancelled 3 jobs of pool s"),
        "{r:?}"
    );
    let r = d.ctl(&["--json", "jobs", "--pool", "s", "--state", "running"]);
    assert_eq!(r.json_list().len(), 1, "{r:?}");
    // Then everything left.
    let r = d.ctl(&["--json", "cancel", "--pool", "s"]);
    assert_eq!(r.code, 0, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).expect("one JSON document");
    assert_eq!(v["cancelled"].as_array().map(Vec::len), Some(1), "{r:?}");
    let r = d.ctl(&["wait", &ids[0]]);
    assert!(r.stdout.contains("cancelled"), "{r:?}");
    // Usage and an unknown pool.
    assert_eq!(d.ctl(&["cancel"]).code, 2);
    assert_eq!(
        d.ctl(&["cancel", "--pool", "s", "--state", "failed"]).code,
        2
    );
    assert_eq!(d.ctl(&["cancel", "--pool", "nope"]).code, 4);
}

/// On a terminal, `submit --wait` and `result` end an output that lacks a
/// final newline, so the prompt does not stick to it; piped, the bytes are
/// exactly the job's. (The terminal is a pty from `script`.)
#[test]
fn on_a_terminal_an_output_ends_its_line() {
    let d = Daemon::start("tty-newline", &echo_cfg(""));
    d.wait_ready("echo", 2);
    let r = d.ctl(&["submit", "echo", "--input", "hi", "--wait"]);
    assert_eq!(r.raw, b"hi", "piped: exactly the output");
    let id = d.submit_id(&["echo", "--input", "there"]);
    let _ = d.ctl(&["wait", &id.to_string()]);
    let ctl = bin("jobvisorctl");
    for args in [
        "submit echo --input hi --wait".to_string(),
        format!("result {id}"),
    ] {
        let o = std::process::Command::new("script")
            .args(["-qec"])
            .arg(format!(
                "{} --socket {} {args}; printf PROMPT",
                ctl.display(),
                d.socket().display()
            ))
            .arg("/dev/null")
            .output()
            .expect("script (util-linux)");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.ends_with("\r\nPROMPT") || out.ends_with("\nPROMPT"),
            "{args}: {out:?}"
        );
        assert!(
            !out.contains("hiPROMPT") && !out.contains("therePROMPT"),
            "{out:?}"
        );
    }
}

/// A listing that reaches its limit says so on stderr (there may be more),
/// instead of stopping silently; under the limit it says nothing.
#[test]
fn a_jobs_listing_at_its_limit_says_there_may_be_more() {
    let d = Daemon::start("jobs-limit", &echo_cfg(""));
    d.wait_ready("echo", 2);
    let r = d.ctl_stdin(&["map", "echo"], Some(b"a\nb\nc\n"));
    assert_eq!(r.code, 0, "{r:?}");
    let r = d.ctl(&["jobs", "--limit", "2"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout.lines().count(), 3, "a header and 2 jobs: {r:?}");
    assert!(
        r.stderr
            .contains("showing 2 jobs, there may be more; next page: jobvisorctl jobs --before "),
        "{r:?}"
    );
    let r = d.ctl(&["jobs", "--limit", "10"]);
    assert!(r.stderr.is_empty(), "{r:?}");
}

/// Ctrl-C on `map` cancels the jobs it had submitted and that are not
/// finished, says so with their ids, and exits 130.
#[test]
fn ctrl_c_on_map_cancels_its_unfinished_jobs() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let cfg = sleep_pool(1, "prefetch = 1");
    let d = Daemon::start("map-ctrl-c", &cfg);
    d.wait_ready("s", 1);
    let mut child = Command::new(bin("jobvisorctl"))
        .arg("--socket")
        .arg(d.socket())
        .args(["map", "s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("jobvisorctl map");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"30000\n30000\n30000\n")
        .unwrap();
    wait_for("a job of the map to run", DEADLINE, || {
        (d.ctl(&["--json", "jobs", "--pool", "s", "--state", "running"])
            .json_list()
            .len()
            == 1)
            .then_some(())
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = wait_for("jobvisorctl map to exit", DEADLINE, || {
        child.try_wait().ok().flatten()
    });
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted; cancelled 3 of 3 unfinished jobs (ids "),
        "{err}"
    );
    wait_for("every job of the map to be cancelled", DEADLINE, || {
        let all = d.ctl(&["--json", "jobs", "--pool", "s"]).json_list();
        all.iter().all(|j| j["state"] == "cancelled").then_some(())
    });
}

/// On a terminal, `map` shows a progress bar with rate and ETA, and a
/// summary line at the end (the terminal is a pty from `script`).
#[test]
fn map_on_a_terminal_shows_a_bar_and_a_summary() {
    let cfg = sleep_pool(2, "");
    let d = Daemon::start("map-progress", &cfg);
    d.wait_ready("s", 2);
    let input = d.dir.path().join("input");
    std::fs::write(&input, "5\n".repeat(300)).unwrap();
    let o = std::process::Command::new("script")
        .arg("-qec")
        .arg(format!(
            "{} --socket {} map s < {} > /dev/null",
            bin("jobvisorctl").display(),
            d.socket().display(),
            input.display()
        ))
        .arg("/dev/null")
        .output()
        .expect("script (util-linux)");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("] ") && out.contains("/300 done, 0 failed"),
        "{out:?}"
    );
    assert!(out.contains("/s, ETA "), "{out:?}");
    assert!(
        out.contains("map: 300 jobs: 300 succeeded, 0 failed in "),
        "{out:?}"
    );
}
