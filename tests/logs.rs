//! `jobvisorctl logs`: the output the daemon keeps of each worker (bounded,
//! across restarts), `-n`, `--since`, `POOL/N`, `--json`, and `-f`
//! following new lines as they are written.

use jobvisor::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;

/// Pool `talk`: each worker prints `hello from N` (stdout) and `ready N`
/// (stderr) before it starts serving, then runs the test worker's `say`
/// mode (`said INPUT` / `warned INPUT` per job). Pool `flood` prints
/// 5,000 numbered lines first.
fn config(dir: &std::path::Path) -> String {
    let talk = script(
        dir,
        "talk.sh",
        &format!(
            "echo \"hello from $JOBVISOR_WORKER_ID\"\necho \"ready $JOBVISOR_WORKER_ID\" >&2\nexec {} say",
            bin("jobvisor-test-worker").display()
        ),
    );
    let flood = script(
        dir,
        "flood.sh",
        &format!(
            "seq 1 5000\nexec {} echo",
            bin("jobvisor-test-worker").display()
        ),
    );
    format!(
        "{}[pools.talk]\ncommand = [{:?}]\nworkers = 2\n[pools.flood]\ncommand = [{:?}]\nworkers = 1\n",
        daemon_section(),
        talk.display().to_string(),
        flood.display().to_string()
    )
}

fn start(tag: &str) -> Daemon {
    let mut d = Daemon::prepare(tag, "");
    d.write_config(&config(d.dir.path()));
    d.spawn();
    d
}

fn lines(r: &Ctl) -> Vec<&str> {
    r.stdout.lines().collect()
}

#[test]
fn logs_keep_each_workers_output_across_restarts() {
    let d = start("logs-kept");
    d.wait_ready("talk", 2);
    assert_eq!(
        d.ctl(&["submit", "talk", "--input", "job-1", "--wait"])
            .code,
        0
    );
    // The job's lines are read by the loop a moment after its result.
    let all = wait_for("the job's output in logs", DEADLINE, || {
        let r = d.ctl(&["logs", "talk"]);
        assert_eq!(r.code, 0, "{r:?}");
        (r.stdout.contains("said job-1") && r.stdout.contains("warned job-1")).then_some(r)
    });
    for w in ["0", "1"] {
        let hello = format!(" talk/{w} hello from {w}");
        assert!(all.stdout.contains(&hello), "{all:?}");
        let ready = format!(" talk/{w} [stderr] ready {w}");
        assert!(all.stdout.contains(&ready), "{all:?}");
    }
    assert!(all.stdout.contains("[jobvisord] pid "), "{all:?}");
    // Each line starts with its UTC time, oldest first.
    let times: Vec<&str> = lines(&all)
        .iter()
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert!(
        times.iter().all(|t| t.len() == 24 && t.ends_with('Z')),
        "{times:?}"
    );
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted);

    // One worker, the last line only.
    let r = d.ctl(&["logs", "talk/1", "-n", "1"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(lines(&r).len(), 1, "{r:?}");
    assert!(lines(&r)[0].contains(" talk/1 "), "{r:?}");

    // The lines outlive the process that wrote them.
    let pid = d.pool("talk")["workers"][0]["pid"].as_u64().unwrap() as u32;
    kill(pid, Signal::SIGKILL);
    let r = wait_for("the restart noted in logs", DEADLINE, || {
        let r = d.ctl(&["logs", "talk/0", "-n", "1000"]);
        let restarted = r
            .stdout
            .contains(&format!("pid {pid} exited: killed by SIGKILL"))
            && r.stdout.matches("hello from 0").count() == 2;
        restarted.then_some(r)
    });
    assert!(
        r.stdout.contains(&format!("[jobvisord] pid {pid} started")),
        "{r:?}"
    );

    // --json: one array of line objects.
    let r = d.ctl(&["--json", "logs", "talk/0"]);
    assert_eq!(r.code, 0, "{r:?}");
    let items = r.json_list();
    assert!(!items.is_empty());
    for it in &items {
        assert_eq!(it["pool"], "talk");
        assert_eq!(it["worker"], 0);
        assert!(["stdout", "stderr", "jobvisord"].contains(&it["stream"].as_str().unwrap()));
        assert!(it["ts_ms"].as_u64().unwrap() > 1_700_000_000_000);
        assert!(it["line"].is_string());
    }
}

#[test]
fn logs_are_bounded_and_filtered_by_time() {
    let d = start("logs-bounds");
    d.wait_ready("flood", 1);
    // 5,000 lines written; the last 1,000 are kept.
    let r = wait_for("the flood read to its end", DEADLINE, || {
        let r = d.ctl(&["logs", "flood", "-n", "100000"]);
        lines(&r)
            .last()
            .is_some_and(|l| l.ends_with(" flood/0 5000"))
            .then_some(r)
    });
    let got = lines(&r);
    assert_eq!(got.len(), 1000, "{}", got.len());
    assert!(got[0].ends_with(" flood/0 4001"), "{}", got[0]);

    // --since: an age, a time; a time in the future keeps nothing.
    let r = d.ctl(&["logs", "flood", "--since", "1h", "-n", "3"]);
    assert_eq!(lines(&r).len(), 3, "{r:?}");
    let r = d.ctl(&["logs", "flood", "--since", "2999-01-01T00:00:00Z"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, ""), "{r:?}");
    let r = d.ctl(&["logs", "flood", "--since", "yesterday"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("write a time ago"), "{r:?}");

    // Unknown pool, worker, malformed target.
    let r = d.ctl(&["logs", "flod"]);
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr
            .contains("no pool named \"flod\"; configured pools: flood, talk"),
        "{r:?}"
    );
    let r = d.ctl(&["logs", "flood/7"]);
    assert_eq!(r.code, 4, "{r:?}");
    assert!(r.stderr.contains("has one worker, 0"), "{r:?}");
    let r = d.ctl(&["logs", "flood/x"]);
    assert_eq!(r.code, 2, "{r:?}");
}

#[test]
fn logs_follow_prints_new_lines_as_they_come() {
    let d = start("logs-follow");
    d.wait_ready("talk", 2);
    for json in [false, true] {
        let mut cmd = Command::new(bin("jobvisorctl"));
        cmd.arg("--socket").arg(d.socket());
        if json {
            cmd.arg("--json");
        }
        let mut child = cmd
            .args(["logs", "talk/0", "-f", "-n", "0"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                if tx.send(line.unwrap()).is_err() {
                    break;
                }
            }
        });
        let input = format!("followed-{json}");
        // Jobs go to the first idle worker, 0: submit until it has said it.
        let deadline = std::time::Instant::now() + DEADLINE;
        let mut seen = Vec::new();
        while !seen
            .iter()
            .any(|l: &String| l.contains(&format!("said {input}")))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "no line followed: {seen:?}"
            );
            assert_eq!(
                d.ctl(&["submit", "talk", "--input", &input, "--wait"]).code,
                0
            );
            while let Ok(l) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
                seen.push(l);
            }
        }
        for l in &seen {
            if json {
                let v: Value = serde_json::from_str(l).expect("one object per line");
                assert_eq!(v["worker"], 0, "{l}");
            } else {
                assert!(l.contains(" talk/0 "), "only worker 0's lines: {l}");
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
    }
    // A follower sees the daemon's end: exit 0. (Its first line, the last
    // kept one, comes once it is following.)
    let mut child = Command::new(bin("jobvisorctl"))
        .arg("--socket")
        .arg(d.socket())
        .args(["logs", "talk", "-f", "-n", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    assert!(first.contains(" talk/"), "{first:?}");
    assert_eq!(d.ctl(&["shutdown"]).code, 0);
    // It saw the workers stop, then the end of the stream.
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(
        rest.contains("[jobvisord] pid ") && rest.contains(" exited: "),
        "{rest:?}"
    );
    let status = wait_for("the follower to end", DEADLINE, || {
        child.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(0));
}
