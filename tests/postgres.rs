//! `[store] url = "postgres://…"`: daemons keep their jobs in a real
//! PostgreSQL server (a throwaway one, `tests/support/pg.rs`) and share its
//! queues: jobs run and are listed as with SQLite, large payloads live in
//! the rows, a `kill -9` of a node loses no acknowledged job (its running
//! ones run again), a server restart mid-run loses nothing either, three
//! nodes run 10,000 jobs exactly once, a stopped node's late result is
//! refused (fencing), and so is a partitioned one's (as root: the node in a
//! network namespace of its own, its link cut), key mutexes and semaphores
//! hold across nodes, an idle node uses no CPU, nodes without
//! notifications poll, `status` warns of a transaction holding back
//! cleanup, TLS follows libpq's URL parameters, and a bad URL is a config
//! error.

use jobvisor::pg::TestPg;
use jobvisor::*;
use nix::sys::signal::Signal;

#[test]
fn jobs_run_on_postgres_and_survive_a_daemon_kill() {
    let Some((pg, url)) = TestPg::with_db("daemon") else {
        return;
    };
    let mut d = Daemon::start("pg-daemon", &node_cfg(&url));
    d.wait_ready("echo", 2);
    d.wait_ready("slow", 2);
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
}

#[test]
fn a_postgres_restart_mid_run_loses_no_acknowledged_job() {
    let Some((pg, url)) = TestPg::with_db("restart") else {
        return;
    };
    let d = Daemon::start("pg-restart", &node_cfg(&url));
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
fn status_cluster_without_postgres_says_why() {
    let d = Daemon::start("pg-no-cluster", &daemon_section());
    let r = d.ctl(&["status", "--cluster"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("PostgreSQL store"), "{}", r.stderr);
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

/// TLS as libpq's URL parameters ask: `verify-full` with the server's CA
/// and a client certificate (the role may log in with that only) runs
/// jobs, every connection of the node encrypted; `verify-ca` accepts a
/// certificate that does not name the host connected to, where
/// `verify-full` refuses it; a CA that signed nothing of the server's is
/// refused; `require` encrypts without a CA; each refusal is one line
/// that says why, and the daemon exits 1.
#[test]
fn nodes_connect_over_tls_as_libpq_parameters_ask() {
    let Some((pg, _)) = TestPg::with_db("tls") else {
        return;
    };
    let tls = pg.enable_tls();
    let (ca, other) = (tls.join("ca.crt"), tls.join("other-ca.crt"));
    let port = pg.port();
    let client = format!(
        "sslcert={}&sslkey={}",
        tls.join("client.crt").display(),
        tls.join("client.key").display()
    );
    let url = format!(
        "postgres://certuser@localhost:{port}/jv?sslmode=verify-full&sslrootcert={}&{client}",
        ca.display()
    );
    let d = Daemon::start("pg-tls", &node_cfg(&url));
    d.wait_ready("echo", 2);
    let r = d.ctl(&["submit", "echo", "--input", "over tls", "--wait"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "over tls"), "{}", r.stderr);
    // The store's, the claim thread's and the listener's connections.
    let sql = "SELECT count(*) FILTER (WHERE s.ssl) || ' of ' || count(*) \
               FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
               WHERE a.usename = 'certuser'";
    wait_for("three encrypted connections", DEADLINE, || {
        (pg.psql("postgres", sql) == "3 of 3").then_some(())
    });
    drop(d);
    let refused = |name: &str, url: String, says: &str| {
        let d = Daemon::prepare(name, &node_cfg(&url));
        let out = d.command().output().expect("run jobvisord");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{url}: {err}");
        assert!(err.contains(says), "{url}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    };
    // The certificate names localhost, not 127.0.0.1.
    let by_ip = |mode: &str, root: &std::path::Path| {
        format!(
            "postgres://certuser@127.0.0.1:{port}/jv?sslmode={mode}&sslrootcert={}&{client}",
            root.display()
        )
    };
    refused(
        "pg-tls-name",
        by_ip("verify-full", &ca),
        "certificate not valid for name \"127.0.0.1\"",
    );
    refused(
        "pg-tls-ca",
        by_ip("verify-ca", &other),
        "invalid peer certificate: UnknownIssuer",
    );
    let d = Daemon::start("pg-tls-verify-ca", &node_cfg(&by_ip("verify-ca", &ca)));
    d.wait_ready("echo", 2);
    let r = d.ctl(&["submit", "echo", "--input", "ca only", "--wait"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    drop(d);
    // `require` without a CA: encrypted, not verified (the role `jobvisor`
    // logs in without a certificate).
    let d = Daemon::start(
        "pg-tls-require",
        &node_cfg(&format!(
            "postgres://jobvisor@127.0.0.1:{port}/jv?sslmode=require"
        )),
    );
    d.wait_ready("echo", 2);
    let r = d.ctl(&["submit", "echo", "--input", "encrypted", "--wait"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let sql = "SELECT bool_and(s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
               WHERE a.usename = 'jobvisor' AND a.datname = 'jv' AND a.pid <> pg_backend_pid()";
    assert_eq!(pg.psql("postgres", sql), "t");
}

/// The longest a test waits for a node to take over another's job: the
/// default `node_timeout` (10 s), a sweep (1 s), a claim, on a loaded
/// machine.
const TAKEOVER: std::time::Duration = std::time::Duration::from_secs(30);

/// A node's config: its own directory, the shared store.
fn node_cfg(url: &str) -> String {
    format!(
        "{}[store]\nurl = \"{url}\"\n\
         [pools.echo]\ncommand = [{w}, \"echo\"]\nworkers = 2\n\
         [pools.slow]\ncommand = [{t}, \"sleep\"]\nworkers = 2\n",
        daemon_section(),
        w = worker_bin(),
        t = test_worker()
    )
}

/// How many attempts each of `ids` took (from node `d`'s view).
fn attempts_of(d: &Daemon, id: u64) -> usize {
    d.job_doc(id)["attempts"].as_array().map_or(0, Vec::len)
}

#[test]
fn nodes_share_one_queue_and_run_every_job_exactly_once() {
    let Some((pg, url)) = TestPg::with_db("nodes") else {
        return;
    };
    let nodes: Vec<Daemon> = (0..3)
        .map(|i| Daemon::start(&format!("pg-node-{i}"), &node_cfg(&url)))
        .collect();
    for d in &nodes {
        d.wait_ready("echo", 2);
    }
    // 10,000 jobs, a third through each node, all at once.
    const SHARE: [usize; 3] = [3334, 3333, 3333];
    let maps: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let input: String = (0..SHARE[i]).map(|k| format!("n{i}-{k}\n")).collect();
            let mut cmd = std::process::Command::new(bin("jobvisorctl"));
            cmd.arg("--socket")
                .arg(d.socket())
                .args(["--json", "map", "echo"]);
            std::thread::spawn(move || run_with_stdin(cmd, Some(input.as_bytes())))
        })
        .collect();
    let mut outs = Vec::new();
    for m in maps {
        let r = m.join().expect("a map");
        assert_eq!(r.code, 0, "{}", r.stderr);
        outs.push(r.stdout);
    }
    for (i, out) in outs.iter().enumerate() {
        let docs: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(docs.len(), SHARE[i]);
        for doc in &docs {
            let k = doc["index"].as_u64().expect("an index");
            assert_eq!(doc["state"], "succeeded", "{doc}");
            assert_eq!(doc["output"], format!("n{i}-{k}"), "{doc}");
        }
    }
    // Each exactly once: one row, one attempt.
    let stored = pg.psql(
        "jv",
        "SELECT count(*), count(DISTINCT id), max(jsonb_array_length(attempts::jsonb)) \
         FROM jobvisor_done WHERE state = 2",
    );
    assert_eq!(stored, "10000|10000|1");
    // The work was shared: every node's workers ran some.
    let by_node = pg.psql(
        "jv",
        "SELECT count(DISTINCT (attempts::jsonb -> 0 ->> 'pid')) FROM jobvisor_done",
    );
    assert!(
        by_node.parse::<usize>().unwrap() >= 3,
        "{by_node} worker pids"
    );
    // Any node sees (and waits for) any job.
    let id = nodes[0].submit_id(&["echo", "--input", "seen"]);
    let r = nodes[2].ctl(&["--json", "wait", &id.to_string()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("succeeded"), "{}", r.stdout);
    let r = nodes[1].ctl(&["result", &id.to_string()]);
    assert_eq!(
        (r.code, r.raw.as_slice()),
        (0, &b"seen"[..]),
        "{}",
        r.stderr
    );
    // Any node lists the nodes: three alive, four workers each, fresh
    // heartbeats, this host.
    let list = nodes[2].ctl(&["--json", "status", "--cluster"]).json();
    let alive: Vec<&serde_json::Value> = list
        .as_array()
        .expect("an array")
        .iter()
        .filter(|n| n["alive"] == true)
        .collect();
    assert_eq!(alive.len(), 3, "{list}");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    for n in &alive {
        assert_eq!(n["workers"], 4, "{n}");
        assert!(n["heartbeat_age_ms"].as_u64().unwrap() < 5000, "{n}");
        assert_eq!(n["host"], host.trim(), "{n}");
    }
    let pids: Vec<u64> = alive.iter().map(|n| n["pid"].as_u64().unwrap()).collect();
    for d in &nodes {
        assert!(pids.contains(&u64::from(d.pid())), "{pids:?}");
    }
    // One of them leads (holds the lease that declares dead nodes dead).
    wait_for("one leader", DEADLINE, || {
        let list = nodes[1].ctl(&["--json", "status", "--cluster"]).json();
        let leaders = list
            .as_array()?
            .iter()
            .filter(|n| n["leader"] == true)
            .count();
        (leaders == 1).then_some(())
    });
    let text = nodes[0].ctl(&["status", "--cluster"]);
    assert!(
        text.stdout.starts_with("NODE  HOST")
            && text.stdout.matches(" alive ").count() == 2
            && text.stdout.matches(" leader ").count() == 1,
        "{}",
        text.stdout
    );
}

#[test]
fn a_killed_nodes_jobs_run_elsewhere_and_a_stopped_nodes_late_result_is_refused() {
    let Some((pg, url)) = TestPg::with_db("failover") else {
        return;
    };
    let mut a = Daemon::start("pg-fail-a", &node_cfg(&url));
    a.wait_ready("slow", 2);
    // Only A runs at first: B joins once A's jobs run.
    let long: Vec<u64> = (0..2)
        .map(|_| a.submit_id(&["slow", "--input", "4000"]))
        .collect();
    for id in &long {
        wait_for("a job running on A", DEADLINE, || {
            (a.job_doc(*id)["state"] == "running").then_some(())
        });
    }
    let b = Daemon::start("pg-fail-b", &node_cfg(&url));
    b.wait_ready("slow", 2);
    // A, the first node, holds the leader's lease.
    let leader = |d: &Daemon| -> Option<u64> {
        let list = d.ctl(&["--json", "status", "--cluster"]).json();
        list.as_array()?
            .iter()
            .find(|n| n["leader"] == true && n["alive"] == true)?["pid"]
            .as_u64()
    };
    wait_for("A to lead", DEADLINE, || {
        (leader(&b) == Some(u64::from(a.pid()))).then_some(())
    });
    // A is killed: within 20 s B has them (heartbeats stop; B takes the
    // lease once it has run out, and 10 s after A's last heartbeat sweeps
    // A's jobs back to the queue; B claims), and they succeed there.
    let started = std::time::Instant::now();
    kill(a.pid(), Signal::SIGKILL);
    a.wait_exit(DEADLINE);
    for id in &long {
        wait_for("the job running on B", TAKEOVER, || {
            (b.job_doc(*id)["attempts"].as_array().map(Vec::len) == Some(2)).then_some(())
        });
    }
    let requeued = started.elapsed();
    assert!(
        requeued < std::time::Duration::from_secs(20),
        "{requeued:?}"
    );
    for id in &long {
        let j = b.wait_state(*id, "succeeded");
        assert_eq!(j["attempts"][0]["outcome"], "lost", "{j}");
    }
    assert_eq!(leader(&b), Some(u64::from(b.pid())), "B leads now");
    eprintln!("a killed node's running jobs ran again after {requeued:?}");

    // Fencing: A (back) runs a job, then is stopped (SIGSTOP) past the
    // heartbeat limit: B takes the job over. A's worker finishes its
    // attempt meanwhile; once A resumes, its result is refused.
    a.spawn();
    a.wait_ready("slow", 2);
    b.ctl(&["pause", "slow"]);
    let id = a.submit_id(&["slow", "--input", "2500"]);
    // Running on A, as the database says (A writes that row a moment
    // after the start).
    let sql = format!("SELECT state FROM jobvisor_jobs WHERE id = {id}");
    wait_for("the job running on A", DEADLINE, || {
        (pg.psql("jv", &sql) == "1").then_some(())
    });
    b.ctl(&["resume", "slow"]);
    kill(a.pid(), Signal::SIGSTOP);
    wait_for("B to take the job over", TAKEOVER, || {
        (b.job_doc(id)["attempts"].as_array().map(Vec::len) == Some(2)).then_some(())
    });
    kill(a.pid(), Signal::SIGCONT);
    let j = b.wait_state(id, "succeeded");
    wait_for("A's refusal in its log", DEADLINE, || {
        a.log_text().contains("refused").then_some(())
    });
    assert_eq!(attempts_of(&b, id), 2, "{j}");
    assert_eq!(j["attempts"][0]["outcome"], "lost", "{j}");
    assert_eq!(j["attempts"][1]["outcome"], "succeeded", "{j}");

    // A clean shutdown hands back at once what the node still holds: a
    // job it claimed (B is paused, so A takes it) runs on B right away,
    // not after the sweep's delay.
    b.ctl(&["pause", "slow"]);
    let held = a.submit_id(&["slow", "--input", "300000"]);
    let sql = format!("SELECT node IS NOT NULL FROM jobvisor_jobs WHERE id = {held}");
    wait_for("A to claim it", DEADLINE, || {
        (a.job_doc(held)["state"] == "running").then_some(())
    });
    assert_eq!(pg.psql("jv", &sql), "t");
    assert_eq!(a.ctl(&["shutdown", "--now"]).code, 0);
    a.wait_exit(DEADLINE);
    assert_eq!(pg.psql("jv", &sql), "f", "still held by the node that left");
    assert_eq!(
        pg.psql("jv", "SELECT count(*) FROM jobvisor_nodes WHERE NOT gone"),
        "1"
    );
}

#[test]
fn a_queued_job_of_the_cluster_is_cancelled_from_any_node() {
    let Some((_pg, url)) = TestPg::with_db("cancel") else {
        return;
    };
    let a = Daemon::start("pg-cancel-a", &node_cfg(&url));
    let b = Daemon::start("pg-cancel-b", &node_cfg(&url));
    a.wait_ready("slow", 2);
    b.wait_ready("slow", 2);
    // Nobody claims: the job waits in the shared queue.
    for d in [&a, &b] {
        assert_eq!(d.ctl(&["pause", "slow"]).code, 0);
    }
    let id = a.submit_id(&["slow", "--input", "1"]);
    // Either node's status counts it: `queued` is the shared queue's (read
    // at most once a second).
    for d in [&a, &b] {
        wait_for("the shared queue in status", DEADLINE, || {
            (d.pool("slow")["queued"] == 1).then_some(())
        });
    }
    let r = b.ctl(&["cancel", &id.to_string()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = a.wait_state(id, "cancelled");
    assert_eq!(j["error"], "cancelled before it started", "{j}");
    // A job a node runs: the other node asks it to cancel it.
    assert_eq!(a.ctl(&["resume", "slow"]).code, 0);
    let id = a.submit_id(&["slow", "--input", "300000"]);
    a.wait_state(id, "running");
    let r = b.ctl(&["cancel", &id.to_string()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("was asked to cancel it"), "{}", r.stdout);
    let j = b.wait_state(id, "cancelled");
    assert_eq!(j["attempts"][0]["outcome"], "cancelled", "{j}");
    wait_for("A's note", DEADLINE, || {
        a.log_text()
            .contains("cancel from another node")
            .then_some(())
    });
}

/// CPU time (user + system, clock ticks) of each thread of `pid`: (tid
/// and name, ticks).
fn thread_ticks(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name; utime and stime are the
        // 14th and 15th of the line.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|x| x.parse().ok())
            .collect();
        let tid = t.file_name().to_string_lossy().into_owned();
        out.push((format!("{tid} {}", comm.trim()), f.iter().sum()));
    }
    out
}

#[test]
fn an_idle_node_uses_no_cpu() {
    let Some((_pg, url)) = TestPg::with_db("idle") else {
        return;
    };
    let d = Daemon::start("pg-idle", &node_cfg(&url));
    d.wait_ready("echo", 2);
    // A few jobs first, so that every thread (store, listener) has worked
    // and then gone quiet.
    let id = d.submit_id(&["echo", "--input", "x"]);
    d.wait_state(id, "succeeded");
    let before = thread_ticks(d.pid());
    // The measured window: an idle node heartbeats and polls once a
    // second; a thread that spins uses the whole window.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let after = thread_ticks(d.pid());
    for (name, t) in &after {
        let t0 = before
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, t)| *t);
        // 100 ticks a second: 30 ticks is a tenth of the window.
        assert!(
            t - t0 < 30,
            "thread {name} used {} ticks of CPU in 3 s of idleness",
            t - t0
        );
    }
}

#[test]
fn key_mutexes_and_semaphores_hold_across_nodes() {
    let Some((pg, url)) = TestPg::with_db("holds") else {
        return;
    };
    let keys = TempDir::new("pg-mutexdir");
    let sems = TempDir::new("pg-semdir");
    // Two nodes, each with 3 workers per pool: alone, either could run
    // 3 jobs of a key or of the semaphore at once.
    let cfg = format!(
        "{}[store]\nurl = \"{url}\"\n[semaphores]\ngpu = 2\n\
         [pools.m]\ncommand = [{t}, \"mutex\", {m:?}]\nworkers = 3\n\
         [pools.g]\ncommand = [{t}, \"sem\", {s:?}, \"2\"]\nworkers = 3\nsemaphores = [\"gpu\"]\n",
        daemon_section(),
        t = test_worker(),
        m = keys.path().display().to_string(),
        s = sems.path().display().to_string(),
    );
    let nodes: Vec<Daemon> = (0..2)
        .map(|i| Daemon::start(&format!("pg-holds-{i}"), &cfg))
        .collect();
    for d in &nodes {
        d.wait_ready("m", 3);
        d.wait_ready("g", 3);
    }
    let mut ids = Vec::new();
    for i in 0..16 {
        let d = &nodes[i % 2];
        let key = ["k1", "k2"][(i / 2) % 2];
        ids.push(d.submit_id(&["m", "--input", &format!("{key}:40"), "--key", key]));
        ids.push(d.submit_id(&["g", "--input", "40"]));
    }
    for id in &ids {
        nodes[0].wait_state(*id, "succeeded");
    }
    for dir in [&keys, &sems] {
        assert!(
            !dir.path().join("violations").exists(),
            "{}",
            std::fs::read_to_string(dir.path().join("violations")).unwrap_or_default()
        );
    }
    // The store's own record agrees: the runs of one key never overlap,
    // and at most 2 jobs of the semaphore ran at any moment.
    let runs = |sql: &str| -> Vec<(u64, u64)> {
        pg.psql("jv", sql)
            .lines()
            .map(|l| {
                let (a, b) = l.split_once('|').unwrap();
                (a.parse().unwrap(), b.parse().unwrap())
            })
            .collect()
    };
    let attempt = "(attempts::jsonb -> 0 ->> 'started_ms'), (attempts::jsonb -> 0 ->> 'ended_ms')";
    for key in ["k1", "k2"] {
        let mut v = runs(&format!(
            "SELECT {attempt} FROM jobvisor_done WHERE key = '{key}' ORDER BY 1"
        ));
        assert_eq!(v.len(), 8);
        v.sort();
        for w in v.windows(2) {
            assert!(w[0].1 <= w[1].0, "key {key}: overlapping {w:?}");
        }
    }
    let v = runs(&format!(
        "SELECT {attempt} FROM jobvisor_done WHERE pool = 'g'"
    ));
    assert_eq!(v.len(), 16);
    for (s, _) in &v {
        let at_once = v.iter().filter(|(a, b)| a <= s && s < b).count();
        assert!(
            at_once <= 2,
            "{at_once} jobs of the semaphore at {s}: {v:?}"
        );
    }
    // Nothing is left held.
    assert_eq!(
        pg.psql(
            "jv",
            "SELECT (SELECT count(*) FROM jobvisor_keys) + (SELECT count(*) FROM jobvisor_sem_holds)"
        ),
        "0"
    );
}

#[test]
fn status_warns_of_a_transaction_holding_back_cleanup() {
    let Some((pg, url)) = TestPg::with_db("xmin") else {
        return;
    };
    let cfg = node_cfg(&url).replace("[store]\n", "[store]\nxmin_warning = \"1s\"\n");
    let d = Daemon::start("pg-xmin", &cfg);
    d.wait_ready("echo", 2);
    let r = d.ctl(&["--json", "status"]).json();
    assert_eq!(r["warnings"], serde_json::json!([]), "{r}");
    // A session that opens a snapshot and keeps it.
    let mut session = pg.psql_session(
        "jv",
        "SET application_name = 'forgotten';\n\
         BEGIN ISOLATION LEVEL REPEATABLE READ;\nSELECT count(*) FROM jobvisor_jobs;\n",
    );
    let text = wait_for("the warning", DEADLINE, || {
        let r = d.ctl(&["status"]);
        r.stdout.contains("held back").then_some(r.stdout)
    });
    assert!(
        text.contains("\"forgotten\"") && text.contains("pg_terminate_backend"),
        "{text}"
    );
    let r = d.ctl(&["--json", "status"]).json();
    assert_eq!(r["warnings"].as_array().map(Vec::len), Some(1), "{r}");
    // Ended: no more warning.
    let _ = session.kill();
    let _ = session.wait();
    wait_for("the warning to go", DEADLINE, || {
        let r = d.ctl(&["--json", "status"]).json();
        (r["warnings"] == serde_json::json!([])).then_some(())
    });
}

#[test]
fn nodes_without_notifications_poll() {
    let Some((_pg, url)) = TestPg::with_db("nonotify") else {
        return;
    };
    let cfg = node_cfg(&url).replace("[store]\n", "[store]\nnotify = false\n");
    let a = Daemon::start("pg-nonotify-a", &cfg);
    let b = Daemon::start("pg-nonotify-b", &cfg);
    a.wait_ready("echo", 2);
    b.wait_ready("echo", 2);
    // No listener: every wake-up is a poll.
    for d in [&a, &b] {
        let names: Vec<String> = thread_ticks(d.pid()).into_iter().map(|(n, _)| n).collect();
        assert!(
            !names.iter().any(|n| n.ends_with("jobvisor-listen")),
            "{names:?}"
        );
    }
    // Jobs submitted on either node run, and a node waits for a job that
    // runs anywhere.
    let input: String = (0..200).map(|k| format!("x{k}\n")).collect();
    let r = a.ctl_stdin(&["map", "echo"], Some(input.as_bytes()));
    assert_eq!(r.code, 0, "{}", r.stderr);
    // In the order they finished.
    let mut got: Vec<&str> = r.stdout.lines().collect();
    let mut want: Vec<&str> = input.lines().collect();
    got.sort_unstable();
    want.sort_unstable();
    assert_eq!(got, want);
    let id = b.submit_id(&["echo", "--input", "polled"]);
    let r = a.ctl(&["wait", &id.to_string()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = a.ctl(&["result", &id.to_string()]);
    assert_eq!(r.raw, b"polled");
    // A cancel from the other node reaches the holder by its poll.
    assert_eq!(b.ctl(&["pause", "slow"]).code, 0);
    let id = a.submit_id(&["slow", "--input", "300000"]);
    a.wait_state(id, "running");
    let r = b.ctl(&["cancel", &id.to_string()]);
    assert_eq!(r.code, 0, "{r:?}");
    b.wait_state(id, "cancelled");
}

/// A network namespace joined to this one by a veth pair: a host of its
/// own at `10.213.N.2`, this namespace being `10.213.N.1`, so that a
/// partition is one `ip link set … down`. Removed on drop.
struct NetNs {
    name: String,
    host_if: String,
    host_ip: String,
}

impl NetNs {
    /// Creates it, or says why it cannot (not root, no `ip`) and returns
    /// `None`; under CI, which runs as root, that is a failure.
    fn create() -> Option<NetNs> {
        let skip = |why: String| {
            if std::env::var_os("CI").is_some() {
                panic!("{why}");
            }
            eprintln!("SKIPPED (partition in a network namespace): {why}");
            None
        };
        if !nix::unistd::geteuid().is_root() {
            return skip("needs root (network namespaces)".into());
        }
        let n = std::process::id() % 250 + 1;
        let ns = NetNs {
            name: format!("jvt{}", std::process::id()),
            host_if: format!("jvh{}", std::process::id()),
            host_ip: format!("10.213.{n}.1"),
        };
        let peer = format!("jvn{}", std::process::id());
        let steps: Vec<Vec<String>> = vec![
            vec!["netns", "add", &ns.name],
            vec![
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
            ],
            vec!["link", "set", &peer, "netns", &ns.name],
            vec![
                "addr",
                "add",
                &format!("{}/30", ns.host_ip),
                "dev",
                &ns.host_if,
            ],
            vec!["link", "set", &ns.host_if, "up"],
            vec![
                "-n",
                &ns.name,
                "addr",
                "add",
                &format!("10.213.{n}.2/30"),
                "dev",
                &peer,
            ],
            vec!["-n", &ns.name, "link", "set", &peer, "up"],
            vec!["-n", &ns.name, "link", "set", "lo", "up"],
        ]
        .into_iter()
        .map(|v| v.into_iter().map(String::from).collect())
        .collect();
        for args in steps {
            if let Err(e) = ip(&args) {
                return skip(e);
            }
        }
        Some(ns)
    }

    /// The network `10.213.N.0/30`.
    fn net(&self) -> String {
        let mut parts: Vec<&str> = self.host_ip.split('.').collect();
        parts[3] = "0";
        format!("{}/30", parts.join("."))
    }

    /// Cuts the link (`up = false`) or restores it.
    fn link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["link", "set", &self.host_if, state].map(String::from)).unwrap();
    }

    /// `cmd` (a built binary and its arguments and environment) run inside
    /// the namespace, as the same process (`ip netns exec` execs it).
    fn wrap(&self, cmd: &std::process::Command) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.name])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            c.current_dir(dir);
        }
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // The veth pair goes with the namespace.
        let _ = ip(&["netns", "del", &self.name].map(String::from));
    }
}

/// `ip ARGS`, or what it said.
fn ip(args: &[String]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip ({e}): install iproute2"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

#[test]
fn a_partitioned_nodes_jobs_run_elsewhere_and_its_late_result_is_refused() {
    let Some(ns) = NetNs::create() else {
        return;
    };
    let Some((pg, url)) = TestPg::with_db("partition") else {
        return;
    };
    pg.listen_also(&ns.host_ip, &ns.net());
    // A reaches the server only through the veth; B on loopback.
    let url_a = url.replace("127.0.0.1", &ns.host_ip);
    let mut a = Daemon::prepare("pg-part-a", &node_cfg(&url_a));
    let cmd = ns.wrap(&a.command());
    a.launch(cmd);
    wait_for("A's control socket", DEADLINE, || {
        (a.ctl(&["status"]).code == 0).then_some(())
    });
    a.wait_ready("slow", 2);
    let b = Daemon::start("pg-part-b", &node_cfg(&url));
    b.wait_ready("slow", 2);
    // A runs a job (B is paused meanwhile, so that A claims it).
    b.ctl(&["pause", "slow"]);
    let id = a.submit_id(&["slow", "--input", "3000"]);
    let sql = format!("SELECT state FROM jobvisor_jobs WHERE id = {id}");
    wait_for("the job running on A", DEADLINE, || {
        (pg.psql("jv", &sql) == "1").then_some(())
    });
    b.ctl(&["resume", "slow"]);
    // The partition: A's heartbeats stop reaching the server; B's sweep
    // declares A dead and B runs the job again.
    let cut = std::time::Instant::now();
    ns.link(false);
    wait_for("B to take the job over", TAKEOVER, || {
        (b.job_doc(id)["attempts"].as_array().map(Vec::len) == Some(2)).then_some(())
    });
    eprintln!(
        "the partitioned node's job ran again after {:?}",
        cut.elapsed()
    );
    let j = b.wait_state(id, "succeeded");
    // A's worker finished its attempt meanwhile; once the link is back,
    // A's result reaches the server and is refused (fenced), and A rejoins.
    ns.link(true);
    wait_for(
        "A's refusal in its log",
        std::time::Duration::from_secs(60),
        || a.log_text().contains("refused").then_some(()),
    );
    let j2 = b.job_doc(id);
    assert_eq!(j2, j, "the job's record changed after A's late result");
    assert_eq!(j["attempts"][0]["outcome"], "lost", "{j}");
    assert_eq!(j["attempts"][1]["outcome"], "succeeded", "{j}");
    // A rejoined: it runs jobs again.
    wait_for(
        "A back in the cluster",
        std::time::Duration::from_secs(60),
        || a.log_text().contains("rejoins").then_some(()),
    );
    b.ctl(&["pause", "slow"]);
    let again = a.submit_id(&["slow", "--input", "1"]);
    a.wait_state(again, "succeeded");
}
