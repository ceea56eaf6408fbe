//! Black-box supervision tests: real jobvisord, real workers, real signals.

use jobvisor::*;
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

fn echo_pool(name: &str, workers: u32, extra: &str) -> String {
    format!(
        "[pools.{name}]\ncommand = [{}, \"echo\"]\nworkers = {workers}\n{extra}\n",
        worker_bin()
    )
}

/// `echo_pool` whose workers start slowly: `sh` waits 300 ms before it
/// execs the worker, so a test can see whether a command waited for them.
fn slow_echo_pool(name: &str, workers: u32, extra: &str) -> String {
    echo_pool(name, workers, extra).replace(
        "command = [",
        "command = [\"sh\", \"-c\", \"sleep 0.3; exec \\\"$0\\\" \\\"$@\\\"\", ",
    )
}

/// A pool `stubborn` of one worker that ignores TERM and outlives the
/// worker's own clean exit on the Shutdown frame: only SIGKILL ends it.
fn stubborn_pool(dir: &TempDir, stop_timeout: &str) -> String {
    let stubborn = script(
        dir.path(),
        "stubborn.sh",
        &format!(
            "trap '' TERM\n{} echo\nexec sleep 1000",
            bin("jobvisor-worker").display()
        ),
    );
    format!(
        "[pools.stubborn]\ncommand = [{:?}]\nworkers = 1\nstop_timeout = {stop_timeout:?}\n",
        stubborn.display().to_string()
    )
}

fn worker_pids(d: &Daemon, pool: &str) -> Vec<Option<u32>> {
    d.pool(pool)["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().map(|p| p as u32))
        .collect()
}

#[test]
fn example_config_runs_with_every_worker_ready() {
    let dir = TempDir::new("example");
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
    let cfg = dir.path().join("config.example.toml");
    std::fs::copy(&example, &cfg).unwrap();
    let mut child = std::process::Command::new(bin("jobvisord"))
        .arg("--config")
        .arg(&cfg)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ctl = |args: &[&str]| {
        let mut c = std::process::Command::new(bin("jobvisorctl"));
        c.arg("--config").arg(&cfg).args(args);
        run_with_stdin(c, None)
    };
    let report = wait_for("every example worker ready", DEADLINE, || {
        let r = ctl(&["--json", "status"]);
        if r.code != 0 {
            return None;
        }
        let v = r.json();
        let pools = v["pools"].as_array()?.clone();
        let all_ready = !pools.is_empty()
            && pools.iter().all(|p| {
                let ws = p["workers"].as_array().unwrap();
                ws.len() as u64 == p["desired_workers"].as_u64().unwrap()
                    && ws
                        .iter()
                        .all(|w| w["state"] == "ready" && w["pid"].as_u64().is_some())
            });
        all_ready.then_some(v)
    });
    for p in report["pools"].as_array().unwrap() {
        for w in p["workers"].as_array().unwrap() {
            assert!(alive(w["pid"].as_u64().unwrap() as u32));
        }
    }
    // The human form names every worker's pid too.
    let human = ctl(&["status"]);
    assert_eq!(human.code, 0);
    for p in report["pools"].as_array().unwrap() {
        for w in p["workers"].as_array().unwrap() {
            assert!(
                human.stdout.contains(&w["pid"].to_string()),
                "{}",
                human.stdout
            );
        }
    }
    assert_eq!(ctl(&["shutdown"]).code, 0);
    let st = wait_for("example daemon exit", DEADLINE, || {
        child.try_wait().unwrap()
    });
    assert!(st.success());
}

#[test]
fn killed_worker_is_replaced_and_others_keep_their_pids() {
    let d = Daemon::start(
        "kill9",
        &format!("{}{}", daemon_section(), echo_pool("echo", 3, "")),
    );
    let pids = d.wait_ready("echo", 3);
    kill(pids[1], Signal::SIGKILL);
    let new = wait_for("a replacement for worker 1", DEADLINE, || {
        let p = d.pool("echo");
        let w = &p["workers"][1];
        (w["state"] == "ready" && w["pid"].as_u64() != Some(pids[1] as u64)).then_some(p)
    });
    let ws = new["workers"].as_array().unwrap();
    assert_eq!(ws[1]["restarts"], 1);
    assert_eq!(ws[0]["pid"].as_u64(), Some(pids[0] as u64));
    assert_eq!(ws[2]["pid"].as_u64(), Some(pids[2] as u64));
    assert_eq!(ws[0]["restarts"], 0);
    assert!(!alive(pids[1]));
}

#[test]
fn crash_looping_pool_fails_alone_and_restart_brings_it_back() {
    let dir_marker = TempDir::new("crashloop-bin");
    let wrapper = script(
        dir_marker.path(),
        "flaky.sh",
        &format!(
            "if [ -e {0}/fixed ]; then exec {1} echo; fi\necho 'cannot start: not fixed yet' >&2\nexit 3",
            dir_marker.path().display(),
            bin("jobvisor-worker").display()
        ),
    );
    let cfg = format!(
        "{}{}[pools.bad]\ncommand = [{:?}]\nworkers = 2\nbackoff_initial = \"0s\"\nbackoff_max = \"10ms\"\nmax_restarts = 5\nrestart_window = \"60s\"\n",
        daemon_section(),
        echo_pool("good", 2, ""),
        wrapper.display().to_string()
    );
    let d = Daemon::start("crashloop", &cfg);
    let good = d.wait_ready("good", 2);
    let bad = wait_for("pool bad to fail", DEADLINE, || {
        let p = d.pool("bad");
        (p["state"] == "failed").then_some(p)
    });
    assert!(
        bad["last_error"].as_str().unwrap().contains("restart bad"),
        "{bad}"
    );
    // No more spawns once failed: the restart counters stay put.
    let before: u64 = bad["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["restarts"].as_u64().unwrap())
        .sum();
    assert!(before >= 5, "{bad}");
    // The daemon and the other pool are untouched.
    assert!(alive(d.pid()));
    assert_eq!(d.wait_ready("good", 2), good);
    let again = d.pool("bad");
    let after: u64 = again["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["restarts"].as_u64().unwrap())
        .sum();
    assert_eq!(before, after);
    assert_eq!(again["state"], "failed");
    // `restart` without a fix fails again (exit 5, the reason said once);
    // with the fix it comes back.
    let r = d.ctl(&["restart", "bad"]);
    assert_eq!(r.code, 5, "{r:?}");
    assert!(
        r.stderr
            .starts_with("jobvisorctl: restart: pool bad failed: "),
        "{r:?}"
    );
    assert_eq!(r.stderr.matches("pool bad failed").count(), 1, "{r:?}");
    std::fs::write(dir_marker.path().join("fixed"), "").unwrap();
    let r = d.ctl(&["restart", "bad"]);
    assert_eq!(r.code, 0, "{r:?}");
    d.wait_ready("bad", 2);
    assert_eq!(d.pool("bad")["state"], "running");
    assert!(d.log_text().contains("cannot start: not fixed yet"));
}

#[test]
fn missing_command_is_a_clear_error_not_a_crash() {
    let cfg = format!(
        "{}{}[pools.ghost]\ncommand = [\"no-such-binary-jobvisor-test\"]\nworkers = 1\nbackoff_initial = \"0s\"\nmax_restarts = 2\n",
        daemon_section(),
        echo_pool("good", 1, "")
    );
    let d = Daemon::start("missing", &cfg);
    let p = wait_for("pool ghost to fail", DEADLINE, || {
        let p = d.pool("ghost");
        (p["state"] == "failed").then_some(p)
    });
    assert!(
        p["last_error"]
            .as_str()
            .unwrap()
            .contains("command not found"),
        "{p}"
    );
    d.wait_ready("good", 1);
    let human = d.ctl(&["status", "ghost"]);
    assert!(
        human.stdout.contains("command not found"),
        "{}",
        human.stdout
    );
}

#[test]
fn workers_have_exactly_fds_0_to_5_and_the_env() {
    let d = Daemon::start(
        "fds",
        &format!(
            "{}{}",
            daemon_section(),
            echo_pool(
                "echo",
                2,
                "env = { EXTRA = \"x y\" }\nstop_signal = \"SIGINT\""
            )
        ),
    );
    for (slot, pid) in d.wait_ready("echo", 2).into_iter().enumerate() {
        let mut fds: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_str().unwrap().parse().unwrap())
            .collect();
        fds.sort();
        assert_eq!(fds, vec![0, 1, 2, 3, 4, 5], "worker {pid}");
        let stdin = std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap();
        assert_eq!(stdin, std::path::Path::new("/dev/null"));
        let arena = std::fs::read_link(format!("/proc/{pid}/fd/5")).unwrap();
        assert!(arena.to_string_lossy().contains("memfd:"), "{arena:?}");
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let env: Vec<String> = env
            .split(|b| *b == 0)
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        assert!(env.contains(&"JOBVISOR_FDS=3,4,5".to_string()));
        assert!(env.contains(&"JOBVISOR_POOL=echo".to_string()));
        assert!(env.contains(&format!("JOBVISOR_WORKER_ID={slot}")));
        assert!(env.contains(&"EXTRA=x y".to_string()));
        assert!(
            env.contains(&"JOBVISOR_STOP_SIGNAL=SIGINT".to_string()),
            "{env:?}"
        );
        // Its own process group.
        let pgid = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid as i32))).unwrap();
        assert_eq!(pgid.as_raw() as u32, pid);
    }
}

#[test]
fn no_zombies_after_50_crashes() {
    let d = Daemon::start(
        "zombies",
        &format!(
            "{}{}",
            daemon_section(),
            echo_pool(
                "echo",
                2,
                "backoff_initial = \"0s\"\nbackoff_max = \"1ms\"\nmax_restarts = 1000"
            )
        ),
    );
    let mut pids = d.wait_ready("echo", 2);
    for i in 0..50 {
        let victim = pids[i % 2];
        kill(victim, Signal::SIGKILL);
        pids = wait_for("replacement", DEADLINE, || {
            let ps = worker_pids(&d, "echo");
            let ready = d.pool("echo")["workers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| w["state"] == "ready");
            (ready && ps.iter().all(|p| p.is_some() && *p != Some(victim)))
                .then(|| ps.into_iter().map(|p| p.unwrap()).collect())
        });
    }
    let kids = children(d.pid());
    let zombies: Vec<_> = kids.iter().filter(|(_, s)| s == "Z").collect();
    assert!(zombies.is_empty(), "zombies: {zombies:?}");
    assert_eq!(kids.len(), 2, "children: {kids:?}");
    let restarts: u64 = d.pool("echo")["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["restarts"].as_u64().unwrap())
        .sum();
    assert_eq!(restarts, 50);
}

#[test]
fn workers_die_with_a_kill9ed_daemon() {
    let mut d = Daemon::start(
        "pdeath",
        &format!("{}{}", daemon_section(), echo_pool("echo", 3, "")),
    );
    let pids = d.wait_ready("echo", 3);
    kill(d.pid(), Signal::SIGKILL);
    d.wait_exit(DEADLINE);
    wait_for("workers to die with the daemon", DEADLINE, || {
        pids.iter().all(|p| !alive(*p)).then_some(())
    });
}

#[test]
fn shutdown_and_sigterm_stop_everything_even_a_worker_ignoring_term() {
    for how in ["shutdown", "sigterm"] {
        let stubborn_dir = TempDir::new("stubborn");
        let cfg = format!(
            "{}{}{}",
            daemon_section(),
            echo_pool("echo", 2, ""),
            stubborn_pool(&stubborn_dir, "300ms")
        );
        let mut d = Daemon::start(how, &cfg);
        let mut pids = d.wait_ready("echo", 2);
        pids.extend(d.wait_ready("stubborn", 1));
        let t0 = Instant::now();
        if how == "shutdown" {
            let r = d.ctl(&["shutdown"]);
            assert_eq!(r.code, 0, "{r:?}");
        } else {
            kill(d.pid(), Signal::SIGTERM);
        }
        let st = d.wait_exit(DEADLINE);
        assert_eq!(st.code(), Some(0), "{how}: {st:?}");
        // The stubborn worker forced the SIGKILL step.
        assert!(t0.elapsed() >= Duration::from_millis(300), "{how}");
        for p in &pids {
            assert!(!alive(*p), "{how}: worker {p} survived");
        }
        // (The exit can come before the log reader has the last lines.)
        wait_for("the SIGKILL note in the log", DEADLINE, || {
            d.log_text().contains("SIGKILL").then_some(())
        });
        assert!(!d.socket().exists(), "{how}: socket left behind");
    }
}

#[test]
fn second_sigterm_stops_at_once() {
    let stubborn_dir = TempDir::new("stubborn2");
    let cfg = format!(
        "{}{}",
        daemon_section(),
        stubborn_pool(&stubborn_dir, "60s")
    );
    let mut d = Daemon::start("twoterms", &cfg);
    let pid = d.wait_ready("stubborn", 1)[0];
    kill(d.pid(), Signal::SIGTERM);
    wait_for("the worker to be stopping", DEADLINE, || {
        (d.pool("stubborn")["workers"][0]["state"] == "stopping").then_some(())
    });
    kill(d.pid(), Signal::SIGTERM);
    let st = d.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(0));
    assert!(!alive(pid));
}

#[test]
fn grandchildren_never_survive_kill_stop_or_shutdown() {
    let gdir = TempDir::new("grand");
    let wrapper = script(
        gdir.path(),
        "forks.sh",
        &format!(
            "sleep 1000 &\nexec {} echo",
            bin("jobvisor-worker").display()
        ),
    );
    let cfg = format!(
        "{}[pools.forks]\ncommand = [{:?}]\nworkers = 2\n",
        daemon_section(),
        wrapper.display().to_string()
    );
    let mut d = Daemon::start("grandchild", &cfg);
    let pids = d.wait_ready("forks", 2);
    let group_of = |pid: u32| {
        wait_for("the grandchild to exist", DEADLINE, || {
            let m = group_members(pid);
            (m.len() >= 2).then_some(m)
        })
    };
    // 1. The worker is killed: its whole group goes.
    let members = group_of(pids[0]);
    kill(pids[0], Signal::SIGKILL);
    wait_for("worker 0's group to be gone", DEADLINE, || {
        members.iter().all(|p| !alive(*p)).then_some(())
    });
    // 2. The worker is stopped (scale down): its whole group goes.
    let members = group_of(pids[1]);
    assert_eq!(d.ctl(&["scale", "forks", "1"]).code, 0);
    wait_for("worker 1's group to be gone", DEADLINE, || {
        members.iter().all(|p| !alive(*p)).then_some(())
    });
    // 3. The daemon shuts down: the remaining group goes.
    let left = d.wait_ready("forks", 1)[0];
    let members = group_of(left);
    assert_eq!(d.ctl(&["shutdown"]).code, 0);
    d.wait_exit(DEADLINE);
    wait_for("the last group to be gone", DEADLINE, || {
        members.iter().all(|p| !alive(*p)).then_some(())
    });
}

#[test]
fn healthy_worker_is_replaced_at_once_and_backoff_resets() {
    // A long backoff makes "at once" observable: a replacement within a
    // second cannot have waited out a 4 s backoff.
    let cfg = format!(
        "{}{}",
        daemon_section(),
        echo_pool(
            "echo",
            1,
            "healthy_after = \"1500ms\"\nbackoff_initial = \"4s\"\nbackoff_max = \"60s\"\nmax_restarts = 100"
        )
    );
    let d = Daemon::start("healthy", &cfg);
    let first = d.wait_ready("echo", 1)[0];
    let wait_healthy = |pid: u32| {
        wait_for("the worker to be up past healthy_after", DEADLINE, || {
            let w = d.pool("echo")["workers"][0].clone();
            (w["pid"].as_u64() == Some(pid as u64) && w["uptime_ms"].as_u64()? > 1700).then_some(())
        })
    };
    wait_healthy(first);
    // Healthy death: replaced at once.
    let t0 = Instant::now();
    kill(first, Signal::SIGKILL);
    let second = wait_for("an immediate replacement", DEADLINE, || {
        let w = d.pool("echo")["workers"][0].clone();
        assert_ne!(
            w["state"], "backoff",
            "a healthy worker's death must not back off"
        );
        (w["state"] == "ready" && w["pid"].as_u64() != Some(first as u64))
            .then(|| w["pid"].as_u64().unwrap() as u32)
    });
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    // A quick death: backoff (about 4 s).
    kill(second, Signal::SIGKILL);
    wait_for("the slot to back off", DEADLINE, || {
        (d.pool("echo")["workers"][0]["state"] == "backoff").then_some(())
    });
    let third = wait_for(
        "the post-backoff replacement",
        Duration::from_secs(30),
        || {
            let w = d.pool("echo")["workers"][0].clone();
            (w["state"] == "ready").then(|| w["pid"].as_u64().unwrap() as u32)
        },
    );
    // Healthy again, then dies: at once again, and not after the doubled
    // (8 s) backoff: the backoff started over.
    wait_healthy(third);
    let t0 = Instant::now();
    kill(third, Signal::SIGKILL);
    wait_for("an immediate replacement again", DEADLINE, || {
        let w = d.pool("echo")["workers"][0].clone();
        assert_ne!(w["state"], "backoff");
        (w["state"] == "ready" && w["pid"].as_u64() != Some(third as u64)).then_some(())
    });
    assert!(t0.elapsed() < Duration::from_secs(3));
    assert_eq!(d.pool("echo")["workers"][0]["restarts"], 3);
}

#[test]
fn scale_up_and_down() {
    let d = Daemon::start(
        "scale",
        &format!("{}{}", daemon_section(), echo_pool("echo", 2, "")),
    );
    let pids = d.wait_ready("echo", 2);
    let r = d.ctl(&["scale", "echo", "4"]);
    assert_eq!(r.code, 0, "{r:?}");
    let up = d.wait_ready("echo", 4);
    assert_eq!(&up[..2], &pids[..]);
    let r = d.ctl(&["scale", "echo", "1"]);
    assert_eq!(r.code, 0);
    let down = d.wait_ready("echo", 1);
    assert_eq!(down[0], pids[0]);
    wait_for("scaled-down workers to exit", DEADLINE, || {
        up[1..].iter().all(|p| !alive(*p)).then_some(())
    });
    // 0 is allowed (no workers; jobs wait), past the maximum is not.
    assert_eq!(d.ctl(&["scale", "echo", "0"]).code, 0);
    assert_eq!(d.ctl(&["scale", "echo", "5000"]).code, 2);
    assert_eq!(d.ctl(&["scale", "nope", "2"]).code, 4);
    assert_eq!(d.ctl(&["restart", "nope"]).code, 4);
    assert_eq!(d.ctl(&["status", "nope"]).code, 4);
    assert!(d.ctl(&["status", "nope"]).stderr.contains("no pool named"));
}

#[test]
fn reload_adds_removes_replaces_and_keeps_unchanged() {
    let base = format!(
        "{}{}{}{}",
        daemon_section(),
        echo_pool("same", 2, ""),
        echo_pool("changed", 2, ""),
        echo_pool("removed", 1, "")
    );
    let d = Daemon::start("reload", &base);
    let same = d.wait_ready("same", 2);
    let changed = d.wait_ready("changed", 2);
    let removed = d.wait_ready("removed", 1);
    let new = format!(
        "{}{}{}{}",
        daemon_section(),
        echo_pool("same", 2, ""),
        echo_pool("changed", 2, "env = { VERSION = \"2\" }"),
        echo_pool("added", 1, "")
    );
    d.write_config(&new);
    let r = d.ctl(&["reload"]);
    assert_eq!(r.code, 0, "{r:?}");
    d.wait_ready("added", 1);
    let now_changed = wait_for("pool changed to be replaced", DEADLINE, || {
        let ps = d.wait_ready("changed", 2);
        ps.iter().all(|p| !changed.contains(p)).then_some(ps)
    });
    for p in &now_changed {
        let env = std::fs::read(format!("/proc/{p}/environ")).unwrap();
        assert!(String::from_utf8_lossy(&env).contains("VERSION=2"));
    }
    wait_for("pool removed to disappear", DEADLINE, || {
        d.status()["pools"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["name"] != "removed")
            .then_some(())
    });
    assert!(!alive(removed[0]));
    assert_eq!(d.wait_ready("same", 2), same);
    // SIGHUP reloads too: scaling `same` up keeps its first two workers.
    d.write_config(&format!(
        "{}{}{}{}",
        daemon_section(),
        echo_pool("same", 3, ""),
        echo_pool("changed", 2, "env = { VERSION = \"2\" }"),
        echo_pool("added", 1, "")
    ));
    kill(d.pid(), Signal::SIGHUP);
    let three = d.wait_ready("same", 3);
    assert_eq!(&three[..2], &same[..]);
}

#[test]
fn bad_reload_keeps_the_old_config_running() {
    let d = Daemon::start(
        "badreload",
        &format!("{}{}", daemon_section(), echo_pool("echo", 2, "")),
    );
    let pids = d.wait_ready("echo", 2);
    d.write_config(&format!("{}{}", daemon_section(), echo_pool("echo", 0, "")));
    let r = d.ctl(&["reload"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("jobvisor.toml:"), "{}", r.stderr);
    assert!(r.stderr.contains("pools.echo.workers"), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert_eq!(d.wait_ready("echo", 2), pids);
}

#[test]
fn garbage_on_the_control_socket_only_closes_that_connection() {
    use std::io::{Read, Write};
    let d = Daemon::start(
        "garbage",
        &format!("{}{}", daemon_section(), echo_pool("echo", 1, "")),
    );
    let pids = d.wait_ready("echo", 1);
    for junk in [
        b"\xff\xff\xff\xff garbage".to_vec(),
        b"\x03\x00\x00\x00\xfa\xfb\xfc".to_vec(),
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
    ] {
        let mut s = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s.write_all(&junk).unwrap();
        let mut buf = Vec::new();
        // The daemon closes the connection (read returns EOF, possibly
        // after an error response) rather than waiting for more.
        let r = s.read_to_end(&mut buf);
        assert!(r.is_ok(), "connection not closed by the daemon: {r:?}");
    }
    // A client that connects and says nothing does not block others.
    let _idle = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
    assert_eq!(d.wait_ready("echo", 1), pids);
    assert!(alive(d.pid()));
}

#[test]
fn stale_socket_is_replaced_live_one_is_not_stolen() {
    let cfg = format!("{}{}", daemon_section(), echo_pool("echo", 1, ""));
    let mut d = Daemon::start("stale", &cfg);
    d.wait_ready("echo", 1);
    // A second daemon on the same socket refuses to start.
    let second = run_with_stdin(
        {
            let mut c = std::process::Command::new(bin("jobvisord"));
            c.arg("--config").arg(d.config_path());
            c
        },
        None,
    );
    assert_eq!(second.code, 1, "{second:?}");
    assert!(
        second.stderr.contains("in use by a running daemon"),
        "{}",
        second.stderr
    );
    assert_eq!(second.stderr.trim().lines().count(), 1, "{}", second.stderr);
    assert_eq!(d.ctl(&["status"]).code, 0);
    // kill -9 leaves a stale socket file; a new daemon replaces it.
    kill(d.pid(), Signal::SIGKILL);
    d.wait_exit(DEADLINE);
    assert!(d.socket().exists());
    d.spawn();
    d.wait_ready("echo", 1);
    // Socket mode is the configured one (0660 by default).
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(d.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
}

#[test]
fn ctl_exit_code_3_when_the_daemon_is_unreachable() {
    let dir = TempDir::new("unreachable");
    let mut c = std::process::Command::new(bin("jobvisorctl"));
    c.arg("--socket")
        .arg(dir.path().join("none.sock"))
        .arg("status");
    let r = run_with_stdin(c, None);
    assert_eq!(r.code, 3);
    assert_eq!(r.stderr.trim().lines().count(), 1);
    assert!(r.stderr.starts_with("jobvisorctl: "), "{}", r.stderr);
    assert!(r.stderr.contains("is jobvisord running"), "{}", r.stderr);
}

#[test]
fn exec_failures_are_reported_with_their_reason() {
    let dir = TempDir::new("execfail");
    let not_exec = dir.path().join("not-executable.sh");
    std::fs::write(&not_exec, "#!/bin/sh\nexit 0\n").unwrap();
    let cfg = format!(
        "{}{}[pools.noexec]\ncommand = [{:?}]\nworkers = 1\nbackoff_initial = \"0s\"\nmax_restarts = 2\n[pools.nocwd]\ncommand = [{}, \"echo\"]\ncwd = \"/nonexistent/jobvisor-test\"\nworkers = 1\nbackoff_initial = \"0s\"\nmax_restarts = 2\n",
        daemon_section(),
        echo_pool("good", 1, ""),
        not_exec.display().to_string(),
        worker_bin()
    );
    let d = Daemon::start("execfail", &cfg);
    for (pool, want) in [
        ("noexec", "Permission denied"),
        ("nocwd", "No such file or directory"),
    ] {
        let p = wait_for(&format!("pool {pool} to fail"), DEADLINE, || {
            let p = d.pool(pool);
            (p["state"] == "failed").then_some(p)
        });
        let err = p["last_error"].as_str().unwrap();
        assert!(err.contains(want), "{pool}: {err}");
    }
    assert!(d.pool("nocwd")["last_error"]
        .as_str()
        .unwrap()
        .contains("cwd"));
    d.wait_ready("good", 1);
    assert!(alive(d.pid()));
}

/// `user`/`group` (root only): the worker runs with exactly that uid, gid
/// and no supplementary groups, while the daemon and its other workers keep
/// root's. The credentials are changed in a child that shares the daemon's
/// memory until its exec, so this also checks that the change reaches the
/// worker alone.
#[test]
fn user_and_group_apply_to_that_worker_only() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (user/group are refused otherwise, see config tests)");
        return;
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        eprintln!("skipped: no user `nobody` on this machine");
        return;
    };
    let group = nix::unistd::Group::from_gid(nobody.gid)
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| "nogroup".into());
    let cfg = format!(
        "{}{}{}",
        daemon_section(),
        echo_pool("asroot", 1, ""),
        echo_pool(
            "asnobody",
            1,
            &format!("user = \"nobody\"\ngroup = {group:?}\ncwd = \"/\"")
        ),
    );
    let d = Daemon::start("creds", &cfg);
    let ids = |pid: u32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        (field("Uid:"), field("Gid:"), field("Groups:"))
    };
    let nobody_pid = d.wait_ready("asnobody", 1)[0];
    let (uid, gid, groups) = ids(nobody_pid);
    let want_uid = nobody.uid.as_raw().to_string();
    let want_gid = nobody.gid.as_raw().to_string();
    assert!(uid.iter().all(|u| *u == want_uid), "uid {uid:?}");
    assert!(gid.iter().all(|g| *g == want_gid), "gid {gid:?}");
    assert!(groups.is_empty(), "supplementary groups {groups:?}");
    // A job runs under those credentials like under root's.
    let r = d.ctl(&["submit", "asnobody", "--input", "hi", "--wait"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "hi"), "{}", r.stderr);
    for pid in [d.pid(), d.wait_ready("asroot", 1)[0]] {
        let (uid, gid, _) = ids(pid);
        assert!(uid.iter().all(|u| u == "0"), "pid {pid} uid {uid:?}");
        assert!(gid.iter().all(|g| g == "0"), "pid {pid} gid {gid:?}");
    }
    // The daemon's other threads too (a glibc setuid in the child would
    // have been broadcast to them).
    for task in std::fs::read_dir(format!("/proc/{}/task", d.pid())).unwrap() {
        let tid = task.unwrap().file_name().into_string().unwrap();
        let status =
            std::fs::read_to_string(format!("/proc/{}/task/{tid}/status", d.pid())).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            uid.split_whitespace().skip(1).all(|u| u == "0"),
            "thread {tid}: {uid}"
        );
    }
}

/// Everything a connection receives, forwarded to a channel by a thread
/// (so that reads have deadlines).
fn responses(
    mut conn: jobvisor_client::Connection,
) -> std::sync::mpsc::Receiver<ipc_proto::control::Response> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        while let Ok(r) = conn.recv() {
            if tx.send(r).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn waiters_hear_at_once_when_their_pool_fails_and_still_get_their_jobs_after_a_fix() {
    use ipc_proto::control::{JobOptions, JobState, Request, Response};
    use jobvisor_client::Connection;
    let marker = TempDir::new("poolfailed-bin");
    let broken = marker.path().join("broken");
    let wrapper = script(
        marker.path(),
        "flaky.sh",
        &format!(
            "if [ -e {} ]; then echo 'cannot start: broken' >&2; exit 3; fi\nexec {} sleep",
            broken.display(),
            bin("jobvisor-test-worker").display()
        ),
    );
    let cfg = format!(
        "{}[pools.p]\ncommand = [{:?}]\nworkers = 1\nprefetch = 1\nbackoff_initial = \"0s\"\nmax_restarts = 1\nrestart_window = \"60s\"\n",
        daemon_section(),
        wrapper.display().to_string()
    );
    let d = Daemon::start("poolfailed", &cfg);
    let pid = d.wait_ready("p", 1)[0];
    let deadline = DEADLINE;
    let submit = |conn: &mut Connection, input: &str| -> u64 {
        conn.send(&Request::Submit {
            pool: "p".into(),
            input: ipc_proto::Bytes(input.as_bytes().to_vec()),
            options: JobOptions::default(),
            wait: true,
        })
        .unwrap();
        match conn.recv().unwrap() {
            Response::Submitted { id } => id,
            other => panic!("{other:?}"),
        }
    };
    // One connection waits for a running and a queued job, another for
    // the queued one.
    let mut a = Connection::connect(&d.socket()).unwrap();
    let running = submit(&mut a, "30000");
    let queued = submit(&mut a, "10");
    let a = responses(a);
    let mut b = Connection::connect(&d.socket()).unwrap();
    b.send(&Request::Wait { ids: vec![queued] }).unwrap();
    let b = responses(b);
    wait_for("the long job to run", DEADLINE, || {
        (d.pool("p")["running"] == 1).then_some(())
    });
    // The pool fails: the worker is killed mid-job, its replacement cannot
    // start. Each waiting connection hears once, with the worker's words.
    std::fs::write(&broken, "").unwrap();
    kill(pid, Signal::SIGKILL);
    for (name, rx) in [("a", &a), ("b", &b)] {
        match rx.recv_timeout(deadline) {
            Ok(Response::PoolFailed { pool, error }) => {
                assert_eq!(pool, "p");
                assert!(
                    error.starts_with("worker 0: exit status 3 before Ready: cannot start: broken"),
                    "{error}"
                );
            }
            other => panic!("{name}: {other:?}\n{}", d.log_text()),
        }
    }
    assert_eq!(d.pool("p")["state"], "failed");
    // A new request that waits hears too (after its Submitted).
    let mut c = Connection::connect(&d.socket()).unwrap();
    let late = submit(&mut c, "10");
    assert!(
        matches!(c.recv().unwrap(), Response::PoolFailed { .. }),
        "a submit with wait to a failed pool"
    );
    // The waits stay open: fixed and restarted, the jobs run and their
    // documents come; no second PoolFailed.
    std::fs::remove_file(&broken).unwrap();
    assert_eq!(d.ctl(&["restart", "p"]).code, 0);
    wait_for("the long job to run again", DEADLINE, || {
        (d.pool("p")["running"] == 1).then_some(())
    });
    assert_eq!(d.ctl(&["cancel", &running.to_string()]).code, 0);
    let mut states = std::collections::BTreeMap::new();
    for _ in 0..2 {
        match a.recv_timeout(deadline) {
            Ok(Response::Job(doc)) => states.insert(doc.id, doc.state),
            other => panic!("a: {other:?}"),
        };
    }
    assert_eq!(
        states,
        [
            (running, JobState::Cancelled),
            (queued, JobState::Succeeded)
        ]
        .into()
    );
    match b.recv_timeout(deadline) {
        Ok(Response::Job(doc)) => assert_eq!((doc.id, doc.state), (queued, JobState::Succeeded)),
        other => panic!("b: {other:?}"),
    }
    assert!(matches!(b.recv_timeout(deadline), Ok(Response::End)));
    match c.recv().unwrap() {
        Response::Job(doc) => assert_eq!((doc.id, doc.state), (late, JobState::Succeeded)),
        other => panic!("c: {other:?}"),
    }
}

/// `scale` holds across a reload that leaves the pool as it was, and gives
/// way to the config's `workers` when a reload changes the pool (as its
/// `--help` says).
#[test]
fn scale_holds_until_a_reload_changes_the_pool() {
    let config = |extra: &str| format!("{}{}", daemon_section(), echo_pool("p", 1, extra));
    let d = Daemon::start("scale-reload", &config(""));
    d.wait_ready("p", 1);
    assert_eq!(d.ctl(&["scale", "p", "3"]).code, 0);
    d.wait_ready("p", 3);
    let r = d.ctl(&["reload"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        d.pool("p")["desired_workers"],
        3,
        "an unchanged pool keeps its scale"
    );
    d.write_config(&config("env = { V = \"2\" }"));
    let r = d.ctl(&["reload"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        d.pool("p")["desired_workers"],
        1,
        "a changed pool takes its workers again"
    );
    d.wait_ready("p", 1);
    let help = d.ctl(&["scale", "--help"]);
    assert!(
        help.stdout.contains("until a reload changes that"),
        "{}",
        help.stdout
    );
}

/// `restart` returns once every new worker is ready (none of the old
/// processes left), `shutdown` once the daemon is gone; `--no-wait` returns
/// at once.
#[test]
fn restart_and_shutdown_wait_until_done() {
    let cfg = format!("{}{}", daemon_section(), slow_echo_pool("p", 2, ""));
    let mut d = Daemon::start("restart-wait", &cfg);
    let old = d.wait_ready("p", 2);
    let r = d.ctl_stdin(&["map", "p"], Some(b"a\nb\nc\nd\n"));
    assert_eq!(r.code, 0, "{r:?}");
    let before: u64 = d.pool("p")["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["jobs_done"].as_u64().unwrap())
        .sum();
    assert_eq!(before, 4);
    let r = d.ctl(&["restart", "p"]);
    assert_eq!(r.code, 0, "{r:?}");
    // No wait_for: it is done when the command returns.
    let ws = d.pool("p")["workers"].as_array().unwrap().clone();
    assert_eq!(ws.len(), 2);
    for w in &ws {
        assert_eq!(w["state"], "ready", "{ws:?}");
        assert!(
            !old.contains(&(w["pid"].as_u64().unwrap() as u32)),
            "{ws:?}"
        );
        // JOBS counts the current process's jobs, as max_jobs_per_worker.
        assert_eq!(w["jobs_done"], 0, "{ws:?}");
    }
    let r = d.ctl(&["restart", "p", "--no-wait"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        d.pool("p")["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["state"] != "ready"),
        "--no-wait returned after the restart was done"
    );
    d.wait_ready("p", 2);
    let r = d.ctl(&["shutdown"]);
    assert_eq!(r.code, 0, "{r:?}");
    let st = d.wait_exit(std::time::Duration::from_secs(2));
    assert!(st.success(), "{st:?}");
}

/// `reload` returns once the pools run the new configuration: a changed
/// pool's workers are all replaced and ready; `--no-wait` returns at once.
#[test]
fn reload_waits_until_the_pools_run_the_new_config() {
    let slow = |v: &str| {
        format!(
            "{}{}",
            daemon_section(),
            slow_echo_pool("p", 2, &format!("env = {{ V = \"{v}\" }}"))
        )
    };
    let d = Daemon::start("reload-wait", &slow("1"));
    let old = d.wait_ready("p", 2);
    d.write_config(&slow("2"));
    let r = d.ctl(&["reload"]);
    assert_eq!(r.code, 0, "{r:?}");
    let ws = d.pool("p")["workers"].as_array().unwrap().clone();
    assert_eq!(ws.len(), 2);
    for w in &ws {
        assert_eq!(w["state"], "ready", "{ws:?}");
        assert!(
            !old.contains(&(w["pid"].as_u64().unwrap() as u32)),
            "{ws:?}"
        );
    }
    d.write_config(&slow("3"));
    let r = d.ctl(&["reload", "--no-wait"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        d.pool("p")["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["state"] != "ready"),
        "--no-wait returned after the reload was done"
    );
}

/// `pause` keeps the workers but hands them no job (queued jobs wait,
/// `status` says `paused`) until `resume`; `scale POOL 0` stops every worker
/// and jobs wait for a `scale` up. Both are admin commands.
#[test]
fn pause_resume_and_scale_to_zero() {
    let d = Daemon::start(
        "pause",
        &format!("{}{}", daemon_section(), echo_pool("p", 2, "")),
    );
    let pids = d.wait_ready("p", 2);
    let r = d.ctl(&["pause", "p"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("paused"), "{r:?}");
    assert_eq!(d.pool("p")["state"], "paused");
    let id = d.submit_id(&["p", "--input", "later"]).to_string();
    // Queued while paused; a bounded look (the job would run in ms).
    let until = std::time::Instant::now() + std::time::Duration::from_millis(300);
    while std::time::Instant::now() < until {
        let j = d.ctl(&["--json", "result", &id]).json();
        assert_eq!(j["state"], "queued", "{j}");
    }
    assert_eq!(d.wait_ready("p", 2), pids, "the workers stay up");
    assert_eq!(d.ctl(&["resume", "p"]).code, 0);
    let r = d.ctl(&["wait", &id]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(d.pool("p")["state"], "running");

    let r = d.ctl(&["scale", "p", "0"]);
    assert_eq!(r.code, 0, "{r:?}");
    wait_for("the workers to be gone", DEADLINE, || {
        pids.iter().all(|p| !alive(*p)).then_some(())
    });
    let id = d.submit_id(&["p", "--input", "after"]).to_string();
    assert_eq!(d.ctl(&["--json", "result", &id]).json()["state"], "queued");
    assert_eq!(d.ctl(&["scale", "p", "1"]).code, 0);
    assert_eq!(d.ctl(&["wait", &id]).code, 0);
    assert_eq!(d.ctl(&["pause", "nope"]).code, 4);
}
