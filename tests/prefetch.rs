//! Black-box tests of adaptive prefetch (a pool without a `prefetch` key):
//! tiny jobs get jobs sent ahead, long ones do not, and no job waits behind
//! another while a worker of its pool is idle.

use jobvisor::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `map s` of `input` (one job per line): its duration; every job must
/// succeed.
fn timed_map(d: &Daemon, input: &str) -> Duration {
    let t = Instant::now();
    let r = d.ctl_stdin(&["map", "s"], Some(input.as_bytes()));
    let took = t.elapsed();
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout.lines().count(), input.lines().count(), "{r:?}");
    took
}

/// The adaptive depths the daemon logged for pool `pool`, in order.
fn depths(d: &Daemon, pool: &str) -> Vec<u32> {
    let tag = format!("pool {pool}: adaptive prefetch ");
    d.log_text()
        .lines()
        .filter_map(|l| l.split_once(&tag))
        .filter_map(|(_, rest)| rest.split_once(" -> "))
        .filter_map(|(_, to)| to.split(' ').next()?.parse().ok())
        .collect()
}

#[test]
fn with_the_default_prefetch_short_jobs_never_wait_behind_long_ones() {
    let d = Daemon::start("pf-mixed", &sleep_pool(2, ""));
    d.wait_ready("s", 2);
    let short = |n: usize| "1\n".repeat(n);
    // Long ones first, then interleaved, on the same (by then warm) pool:
    // 2 s of the longest job plus 200 ms of short ones spread over two
    // workers; a short job behind a long one, or the second long job behind
    // the first, would make it 4 s.
    for (what, input) in [
        ("long first", format!("2000\n2000\n{}", short(200))),
        (
            "interleaved",
            format!("{}2000\n{}2000\n{}", short(50), short(50), short(100)),
        ),
    ] {
        let took = timed_map(&d, &input);
        assert!(took < Duration::from_secs(3), "{what}: {took:?}");
    }
}

#[test]
fn a_tiny_job_stream_gets_jobs_sent_ahead() {
    let d = Daemon::start("pf-tiny", &sleep_pool(2, ""));
    d.wait_ready("s", 2);
    timed_map(&d, &"0\n".repeat(2000));
    let seen = depths(&d, "s");
    assert!(
        seen.iter().any(|&n| n > 1),
        "no adaptive prefetch above 1 in the log: {seen:?}\n{}",
        d.log_text()
    );
    // And back to one job at a time once jobs are long.
    timed_map(&d, &"20\n".repeat(30));
    assert_eq!(depths(&d, "s").last(), Some(&1), "{}", d.log_text());
}

#[test]
fn an_explicit_prefetch_of_one_is_kept() {
    let d = Daemon::start("pf-one", &sleep_pool(1, "prefetch = 1"));
    d.wait_ready("s", 1);
    timed_map(&d, &"0\n".repeat(500));
    assert!(depths(&d, "s").is_empty(), "{}", d.log_text());
    // One at a time: a second job waits in the queue while one runs.
    let long = d.submit_id(&["s", "--input", "1000"]);
    let next = d.submit_id(&["s", "--input", "0"]);
    wait_for("the first job running", DEADLINE, || {
        let p = d.pool("s");
        (p["running"] == 1 && p["queued"] == 1).then_some(())
    });
    let r = d.ctl(&["wait", &long.to_string(), &next.to_string()]);
    assert_eq!(r.code, 0, "{r:?}");
}

/// One worker holds a long job and, sent ahead, a second long one; a worker
/// added meanwhile is idle, so the second is taken back (the worker answers
/// the daemon's `Cancel` at once although its long job runs on) and runs
/// there: both are done in about 2 s, not 4.
#[test]
fn an_idle_worker_takes_back_a_job_waiting_behind_a_long_one() {
    let d = Daemon::start("pf-take", &sleep_pool(1, ""));
    d.wait_ready("s", 1);
    timed_map(&d, &"0\n".repeat(300));
    assert!(depths(&d, "s").iter().any(|&n| n > 1), "{}", d.log_text());
    let t = Instant::now();
    // Both lines in one write: the daemon sends both to the one worker.
    let mut map = Command::new(bin("jobvisorctl"))
        .arg("--socket")
        .arg(d.socket())
        .args(["map", "s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("jobvisorctl map");
    {
        use std::io::Write;
        let mut stdin = map.stdin.take().unwrap();
        stdin.write_all(b"2000\n2000\n").unwrap();
    }
    wait_for("both long jobs on the one worker", DEADLINE, || {
        (d.pool("s")["running"] == 2).then_some(())
    });
    assert_eq!(d.ctl(&["scale", "s", "2"]).code, 0);
    let out = map.wait_with_output().unwrap();
    let took = t.elapsed();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    assert!(
        d.log_text().contains("pool s: taking back 1 jobs"),
        "{}",
        d.log_text()
    );
    assert!(took < Duration::from_millis(3500), "{took:?}");
    // The returned job was not charged an attempt.
    let r = d.ctl(&["--json", "jobs", "--pool", "s", "--limit", "2"]);
    assert_eq!(r.code, 0, "{r:?}");
    for doc in r.json_list() {
        assert_eq!(doc["attempts"].as_array().unwrap().len(), 1, "{doc}");
    }
}

/// A worker recycled by `max_jobs_per_worker` while it holds prefetched
/// jobs finishes them, then is replaced: the stream goes on. (It used to
/// stay `stopping` for ever: each further result asked to recycle it again
/// instead of stopping it once drained.)
#[test]
fn a_recycled_worker_with_prefetched_jobs_is_replaced_once_they_are_done() {
    let config = format!(
        "{}[pools.e]\ncommand = [\"{}\", \"echo\"]\nworkers = 3\nmax_jobs_per_worker = 10\n",
        daemon_section(),
        bin("jobvisor-worker").display()
    );
    let d = Daemon::start("recycle-prefetch", &config);
    d.wait_ready("e", 3);
    let input: String = (0..300).map(|i| format!("{i}\n")).collect();
    let mut map = Command::new(bin("jobvisorctl"));
    map.arg("--socket").arg(d.socket()).args(["map", "e"]);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(run_with_stdin(map, Some(input.as_bytes())));
    });
    // Bounded: without the fix the map never ends.
    let r = rx
        .recv_timeout(DEADLINE)
        .unwrap_or_else(|_| panic!("the map did not finish; log:\n{}", d.log_text()));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout.lines().count(), 300);
    let recycled = d
        .log_text()
        .matches("reached max_jobs_per_worker (10); recycling it")
        .count();
    assert!(
        recycled >= 20,
        "{recycled} recycles for 300 jobs of 10 each"
    );
    // And none ran more than 10: no job is sent ahead past the limit.
    let listed = d.ctl(&["--json", "jobs", "--pool", "e"]);
    let mut per_pid = std::collections::HashMap::<u64, u32>::new();
    for job in listed.json_list() {
        let pid = job["attempts"][0]["pid"].as_u64().expect("a pid");
        *per_pid.entry(pid).or_default() += 1;
    }
    assert_eq!(per_pid.values().sum::<u32>(), 300);
    assert!(per_pid.values().all(|&n| n <= 10), "{per_pid:?}");
}
