//! Managing stored jobs: `retry` (a job that ended without success runs
//! again, its attempts kept, durable across a daemon kill), `prune`
//! (finished jobs deleted by age, state and pool, payload files with
//! them) and `jobs` paging (`--before`, `--since`, a full page says how to
//! get the next).

use jobvisor::*;
use nix::sys::signal::Signal;

fn config() -> String {
    echo_fail_pools(1, "max_attempts = 2\n")
}

#[test]
fn retry_runs_a_finished_job_again_and_keeps_its_history() {
    let mut d = Daemon::start("retry", &config());
    d.wait_ready("echo", 1);
    d.wait_ready("fail", 1);

    // Failed (an error is final, not retried by itself); a retry runs it
    // again, and again once its attempts are used up.
    let failed = d.submit_id(&["fail", "--input", "boom"]);
    let j = d.wait_state(failed, "failed");
    assert_eq!(j["attempts"].as_array().unwrap().len(), 1);
    for n in [2, 3] {
        let r = d.ctl(&["retry", &failed.to_string()]);
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(
            r.stdout.trim(),
            format!("job {failed} queued again (attempt {n} of {})", n.max(2))
        );
        let j = wait_for("the retried attempt", DEADLINE, || {
            let j = d.job_doc(failed);
            (j["state"] == "failed" && j["attempts"].as_array().unwrap().len() == n).then_some(j)
        });
        let attempts = j["attempts"].as_array().unwrap();
        assert!(attempts.iter().all(|a| a["error"] == "boom"), "{j}");
    }

    // Cancelled while queued (a large input: kept in its payload file for
    // the retry), retried, and queued again durably: a kill -9 of the
    // daemon before it runs loses nothing.
    assert_eq!(d.ctl(&["pause", "echo"]).code, 0);
    let big = d.dir.path().join("big");
    std::fs::write(&big, pattern(3 << 20)).unwrap();
    let r = d.ctl(&["submit", "echo", "--input-file", big.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    let cancelled: u64 = r.stdout.trim().parse().unwrap();
    assert_eq!(d.ctl(&["cancel", &cancelled.to_string()]).code, 0);
    d.wait_state(cancelled, "cancelled");
    let r = d.ctl(&["retry", &cancelled.to_string(), "999999"]);
    assert_eq!(r.code, 4, "the unknown id's code: {r:?}");
    assert!(
        r.stdout
            .contains(&format!("job {cancelled} queued again (attempt 1 of ")),
        "{r:?}"
    );
    assert!(r.stderr.contains("retry: no job 999999"), "{r:?}");
    // Queued now: nothing to retry.
    let r = d.ctl(&["retry", &cancelled.to_string()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr
            .contains(&format!("job {cancelled} is queued; only a failed")),
        "{r:?}"
    );

    kill(d.pid(), Signal::SIGKILL);
    d.wait_exit(DEADLINE);
    d.spawn();
    // (A restarted daemon's pools are not paused.)
    let out = d.dir.path().join("out");
    let j = d.wait_state(cancelled, "succeeded");
    assert_eq!(j["attempts"].as_array().unwrap().len(), 1, "{j}");
    let r = d.ctl(&["result", &cancelled.to_string()]);
    std::fs::write(&out, &r.raw).unwrap();
    assert_eq!(
        sha256sum(&out),
        sha256sum(&big),
        "the retried job ran on its input"
    );

    // Succeeded: nothing to retry.
    let r = d.ctl(&["retry", &cancelled.to_string()]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains(&format!("job {cancelled} succeeded; only a failed, dead, cancelled or timed-out job can be retried")), "{r:?}");
    let r = d.ctl(&["retry"]);
    assert_eq!(r.code, 2, "{r:?}");
}

#[test]
fn prune_deletes_finished_jobs_by_state_pool_and_age() {
    let d = Daemon::start("prune", &config());
    d.wait_ready("echo", 1);
    d.wait_ready("fail", 1);
    let ok: Vec<u64> = (0..3)
        .map(|i| d.submit_id(&["echo", "--input", &format!("x{i}")]))
        .collect();
    let bad = d.submit_id(&["fail", "--input", "no"]);
    for id in &ok {
        d.wait_state(*id, "succeeded");
    }
    d.wait_state(bad, "failed");

    // Finished a moment ago: not before an hour ago.
    let r = d.ctl(&["prune", "--before", "1h"]);
    assert_eq!(
        (r.code, r.stdout.trim()),
        (0, "pruned 0 finished jobs"),
        "{r:?}"
    );
    let r = d.ctl(&["prune", "--state", "queued"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("only finished jobs are pruned"), "{r:?}");

    let r = d.ctl(&["--json", "prune", "--state", "failed"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["pruned"], 1);
    assert_eq!(d.ctl(&["result", &bad.to_string()]).code, 4);
    let r = d.ctl(&["prune", "--pool", "fail"]);
    assert_eq!(r.stdout.trim(), "pruned 0 finished jobs", "{r:?}");

    // A running job is never pruned.
    assert_eq!(d.ctl(&["pause", "echo"]).code, 0);
    let queued = d.submit_id(&["echo", "--input", "later"]);
    let r = d.ctl(&["prune"]);
    assert_eq!(r.stdout.trim(), "pruned 3 finished jobs", "{r:?}");
    for id in &ok {
        assert_eq!(d.ctl(&["result", &id.to_string()]).code, 4);
    }
    let r = d.ctl(&["--json", "jobs"]);
    let ids: Vec<u64> = r
        .json_list()
        .iter()
        .map(|j| j["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [queued]);
}

#[test]
fn jobs_pages_and_since() {
    let d = Daemon::start("jobs-pages", &config());
    d.wait_ready("echo", 1);
    let ids: Vec<u64> = (0..5)
        .map(|i| d.submit_id(&["echo", "--input", &format!("p{i}")]))
        .collect();
    let listed = |args: &[&str]| -> (Vec<u64>, String) {
        let mut all = vec!["--json", "jobs"];
        all.extend_from_slice(args);
        let r = d.ctl(&all);
        assert_eq!(r.code, 0, "{r:?}");
        let ids = r
            .json_list()
            .iter()
            .map(|j| j["id"].as_u64().unwrap())
            .collect();
        (ids, r.stderr)
    };
    assert_eq!(listed(&[]).0, ids.iter().rev().copied().collect::<Vec<_>>());
    // Times: each row's age and run time; the JSON has the timestamps.
    for id in &ids {
        d.wait_state(*id, "succeeded");
    }
    let r = d.ctl(&["jobs"]);
    let mut rows = r.stdout.lines();
    let head: Vec<&str> = rows.next().unwrap().split_whitespace().collect();
    assert_eq!(
        head,
        ["ID", "POOL", "STATE", "ATTEMPTS", "AGE", "RUN", "ERROR"]
    );
    for row in rows {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert!(cells[4].ends_with('s') && cells[5].ends_with('s'), "{row}");
    }
    let r = d.ctl(&["--json", "jobs"]);
    for j in r.json_list() {
        assert!(j["created_ms"].as_u64().unwrap() <= j["finished_ms"].as_u64().unwrap());
        let a = &j["attempts"][0];
        assert!(a["started_ms"].as_u64().unwrap() <= a["ended_ms"].as_u64().unwrap());
    }
    // A full page names the next one.
    let r = d.ctl(&["jobs", "--limit", "2", "--pool", "echo"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout.lines().count(), 3, "header and 2 rows: {r:?}");
    let next = format!(
        "next page: jobvisorctl jobs --before {} --pool echo --limit 2",
        ids[3]
    );
    assert!(r.stderr.contains(&next), "{r:?}");
    assert_eq!(
        listed(&["--limit", "2", "--before", &ids[3].to_string()]).0,
        [ids[2], ids[1]]
    );
    assert_eq!(listed(&["--before", &ids[1].to_string()]).0, [ids[0]]);
    // --since: everything was submitted within the hour, nothing after 2999.
    assert_eq!(listed(&["--since", "1h"]).0.len(), 5);
    assert!(listed(&["--since", "2999-01-01T00:00:00Z"]).0.is_empty());
    let r = d.ctl(&["jobs", "--since", "2999-01-01T00:00:00Z"]);
    assert_eq!(r.stdout.trim(), "no jobs", "{r:?}");
    let r = d.ctl(&["jobs", "--since", "soon"]);
    assert_eq!(r.code, 2, "{r:?}");
}

/// On a terminal, states are coloured; not with `NO_COLOR`, nor when piped.
#[test]
fn colours_on_a_terminal_only() {
    let d = Daemon::start("colours", &config());
    d.wait_ready("echo", 1);
    let id = d.submit_id(&["echo", "--input", "x"]);
    d.wait_state(id, "succeeded");
    // `script` runs the command on a pseudo-terminal of its own.
    let on_tty = |args: &str, no_color: bool| {
        let cmd = format!(
            "{} --socket {} {args}",
            bin("jobvisorctl").display(),
            d.socket().display()
        );
        let mut c = std::process::Command::new("script");
        c.args(["-qec", &cmd, "/dev/null"]);
        c.env_remove("NO_COLOR").env("TERM", "xterm");
        if no_color {
            c.env("NO_COLOR", "1");
        }
        let r = run_with_stdin(c, None);
        assert_eq!(r.code, 0, "{r:?}");
        r.stdout
    };
    let green = "\x1b[32msucceeded";
    assert!(
        on_tty("jobs", false).contains(green),
        "{:?}",
        on_tty("jobs", false)
    );
    assert!(on_tty("status", false).contains("\x1b[32mready"));
    assert!(!on_tty("jobs", true).contains('\x1b'));
    assert!(!on_tty("status", true).contains('\x1b'));
    let r = d.ctl(&["jobs"]);
    assert!(
        r.stdout.contains("succeeded") && !r.stdout.contains('\x1b'),
        "{r:?}"
    );
}

/// `map` on a terminal: a progress bar with rate and ETA on stderr while
/// it runs, and a summary line at the end (stdout keeps only the outputs).
#[test]
fn map_shows_progress_and_a_summary_on_a_terminal() {
    let d = Daemon::start("map-tty", &sleep_pool(1, ""));
    d.wait_ready("s", 1);
    let input = d.dir.path().join("in");
    std::fs::write(&input, "60\n".repeat(12)).unwrap();
    let out = d.dir.path().join("out");
    // `script` gives the command a pseudo-terminal (stderr on it; stdout
    // to a file).
    let cmd = format!(
        "{} --socket {} map s < {} > {}",
        bin("jobvisorctl").display(),
        d.socket().display(),
        input.display(),
        out.display()
    );
    let mut c = std::process::Command::new("script");
    c.args(["-qec", &cmd, "/dev/null"]);
    c.env_remove("NO_COLOR").env("TERM", "xterm");
    let r = run_with_stdin(c, None);
    assert_eq!(r.code, 0, "{r:?}");
    let tty = r.stdout;
    assert!(
        tty.contains("12/12 done") || tty.contains("/12 done"),
        "{tty:?}"
    );
    assert!(
        tty.contains("[#") && tty.contains("/s, ETA "),
        "a bar with rate and ETA: {tty:?}"
    );
    assert!(
        tty.contains("map: 12 jobs: 12 succeeded, 0 failed in "),
        "{tty:?}"
    );
    let outputs = std::fs::read_to_string(&out).unwrap();
    assert_eq!(outputs.lines().count(), 12, "{outputs:?}");
    assert!(outputs.lines().all(|l| l == "slept 60"), "{outputs:?}");
}
