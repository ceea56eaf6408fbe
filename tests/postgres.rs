//! `[store] url = "postgres://…"`: the daemon keeps its jobs in a real
//! PostgreSQL server (a throwaway one, `tests/support/pg.rs`): jobs run and
//! are listed as with SQLite, large payloads live in the rows, a `kill -9`
//! of the daemon loses no acknowledged job (the running one is retried), a
//! server restart mid-run loses nothing either, a second daemon on the same
//! database is refused, and a bad URL is a config error.

use jobvisor::pg::TestPg;
use jobvisor::*;
use nix::sys::signal::Signal;

fn cfg(url: &str) -> String {
    format!(
        "{}[store]\nurl = \"{url}\"\n\
         [pools.echo]\ncommand = [{w}, \"echo\"]\nworkers = 2\n\
         [pools.slow]\ncommand = [{t}, \"sleep\"]\nworkers = 1\n",
        daemon_section(),
        w = worker_bin(),
        t = test_worker()
    )
}

#[test]
fn jobs_run_on_postgres_and_survive_a_daemon_kill() {
    let Some((pg, url)) = TestPg::with_db("daemon") else {
        return;
    };
    let mut d = Daemon::start("pg-daemon", &cfg(&url));
    d.wait_ready("echo", 2);
    d.wait_ready("slow", 1);
    // Small and large inputs (the large one passed as a descriptor, kept
    // in its row, as is its output).
    let r = d.ctl(&["submit", "echo", "--input", "hello", "--wait"]);
    assert_eq!(
        (r.code, r.raw.as_slice()),
        (0, &b"hello"[..]),
        "{}",
        r.stderr
    );
    let big = pattern(3 << 20);
    let f = d.dir.path().join("in-3m");
    std::fs::write(&f, &big).unwrap();
    let r = d.ctl(&[
        "submit",
        "echo",
        "--input-file",
        f.to_str().unwrap(),
        "--wait",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.raw == big, "3 MiB output differs");
    let big_id = d.submit_id(&["echo", "--input-file", f.to_str().unwrap()]);
    d.wait_state(big_id, "succeeded");
    let r = d.ctl(&["result", &big_id.to_string()]);
    assert!(
        r.code == 0 && r.raw == big,
        "result of a large output differs"
    );
    let rows = pg.psql("jv", "SELECT count(*) FROM jobvisor_done WHERE state = 2");
    assert_eq!(rows, "3");
    // A job running and two queued behind it when the daemon is killed.
    let running = d.submit_id(&["slow", "--input", "1500"]);
    // Running in the database too (the core writes that row a moment
    // after the start, unless the job is already over).
    let sql = format!("SELECT state FROM jobvisor_jobs WHERE id = {running}");
    wait_for("the running row", DEADLINE, || {
        (pg.psql("jv", &sql) == "1").then_some(())
    });
    let queued: Vec<u64> = (0..2)
        .map(|_| d.submit_id(&["slow", "--input", "1"]))
        .collect();
    kill(d.pid(), Signal::SIGKILL);
    d.wait_exit(DEADLINE);
    d.spawn();
    let j = d.wait_state(running, "succeeded");
    assert_eq!(j["attempts"][0]["outcome"], "lost", "{j}");
    for id in queued {
        d.wait_state(id, "succeeded");
    }
    let listed = d.ctl(&["--json", "jobs", "--pool", "slow"]).json();
    assert_eq!(listed.as_array().map(Vec::len), Some(3), "{listed}");

    // A second daemon on the same database is refused, saying why.
    let other = Daemon::prepare("pg-daemon-2", &cfg(&url));
    let out = other.command().output().expect("run jobvisord");
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another jobvisord"), "{err}");
}

#[test]
fn a_postgres_restart_mid_run_loses_no_acknowledged_job() {
    let Some((pg, url)) = TestPg::with_db("restart") else {
        return;
    };
    let d = Daemon::start("pg-restart", &cfg(&url));
    d.wait_ready("echo", 2);
    let first: Vec<u64> = (0..50)
        .map(|i| d.submit_id(&["echo", "--input", &format!("a{i}")]))
        .collect();
    pg.restart_immediate();
    // Submits right after the restart may be refused (their batch could not
    // commit: the client is told); those acknowledged must all run.
    let mut second = Vec::new();
    let deadline = std::time::Instant::now() + DEADLINE;
    while second.len() < 50 {
        assert!(
            std::time::Instant::now() < deadline,
            "submits never recovered"
        );
        let r = d.ctl(&["submit", "echo", "--input", &format!("b{}", second.len())]);
        if r.code == 0 {
            second.push(r.stdout.trim().parse::<u64>().unwrap());
        }
    }
    for id in first.iter().chain(&second) {
        d.wait_state(*id, "succeeded");
    }
    let n = pg.psql("jv", "SELECT count(*) FROM jobvisor_done WHERE state = 2");
    assert!(n.parse::<usize>().unwrap() >= 100, "{n}");
    // The queue table holds only what is still active: nothing now.
    assert_eq!(pg.psql("jv", "SELECT count(*) FROM jobvisor_jobs"), "0");
}

#[test]
fn a_store_url_that_is_not_postgres_is_a_config_error() {
    let d = Daemon::prepare(
        "pg-badurl",
        &format!("{}[store]\nurl = \"mysql://x/y\"\n", daemon_section()),
    );
    let out = d.command().output().expect("run jobvisord");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("store.url") && err.contains("PostgreSQL URL"),
        "{err}"
    );
}
