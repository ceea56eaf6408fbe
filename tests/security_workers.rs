//! Black-box security tests of the worker side: workers (and whatever they
//! start) are untrusted, and may run as a user of their own who can signal
//! them. Each test plays that hostile user or worker against the real
//! `jobvisord`.
//!
//! Tests that create throwaway users need root; they print a SKIPPED line
//! and return otherwise.

use jobvisor::users::{need_root, TestUser};
use jobvisor::*;
use nix::sys::signal::Signal;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Kills and reaps a helper process on drop (also after a panic).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `jobvisorctl status` and panics if it has not answered within
/// `limit`: the event loop is frozen.
fn status_answers_within(d: &Daemon, limit: Duration, context: &str) {
    let child = Command::new(bin("jobvisorctl"))
        .arg("--socket")
        .arg(d.socket())
        .arg("status")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn jobvisorctl");
    let mut child = Reaped(child);
    let status = wait_for(
        &format!("`jobvisorctl status` to answer ({context}): the daemon's loop is frozen"),
        limit,
        || child.0.try_wait().ok().flatten(),
    );
    assert!(status.success(), "status failed ({context}): {status:?}");
}

/// Item: a worker's user stops the child between its credential change and
/// its `execve`. With a `CLONE_VFORK` spawn the daemon's loop thread waited
/// in the clone until the child exec'd, i.e. forever; now the loop must go
/// on answering.
#[test]
fn worker_user_stopping_a_spawn_does_not_freeze_the_daemon() {
    if !need_root("worker_user_stopping_a_spawn_does_not_freeze_the_daemon") {
        return;
    }
    let user = TestUser::create();
    // Workers that exit at once, restarted after ~1 ms: hundreds of spawns
    // a second, each with a credential change the attacker can race.
    let cfg = format!(
        "{}[pools.churn]\ncommand = [\"/bin/true\"]\nworkers = 2\nuser = {:?}\ncwd = \"/\"\n\
         backoff_initial = \"1ms\"\nbackoff_max = \"2ms\"\nmax_restarts = 100000000\n\
         restart_window = \"1s\"\nstart_timeout = \"300ms\"\n",
        daemon_section(),
        user.name
    );
    let d = Daemon::start("spawnstop", &cfg);
    let mut attacker = user.command(bin("jobvisor-test-worker"));
    attacker
        .args(["stop-spawns", "jobvisord"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut attacker = Reaped(attacker.spawn().expect("spawn the attacker"));
    let held = Arc::new(Mutex::new(Vec::<u32>::new()));
    {
        let out = attacker.0.stdout.take().expect("stdout");
        let held = held.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(pid) = line.strip_prefix("held ").and_then(|p| p.parse().ok()) {
                    held.lock().unwrap().push(pid);
                }
            }
        });
    }
    // Until the attacker has caught three spawns in the window (or the
    // test gives up as inconclusive), the daemon must answer every status.
    let end = Instant::now() + Duration::from_secs(60);
    let mut checked_after = 0;
    while checked_after < 3 {
        let caught = held.lock().unwrap().len();
        status_answers_within(&d, Duration::from_secs(5), &format!("{caught} spawns held"));
        checked_after = caught;
        assert!(
            Instant::now() < end,
            "inconclusive: the attacker caught only {caught} spawns between credential change and exec in 60 s"
        );
    }
    // And the pool goes on being supervised: a held child is killed at its
    // start_timeout and replaced (the daemon can still signal it).
    let pids = held.lock().unwrap().clone();
    wait_for("the held children to be killed", DEADLINE, || {
        pids.iter().all(|p| !alive(*p)).then_some(())
    });
    status_answers_within(&d, Duration::from_secs(5), "at the end");
}

/// Item: `PR_SET_PDEATHSIG` is cleared by the credential change, so it
/// must be set after it: a worker running as another user dies with the
/// daemon (PROTOCOL.md §2).
#[test]
fn worker_of_another_user_dies_with_the_daemon() {
    if !need_root("worker_of_another_user_dies_with_the_daemon") {
        return;
    }
    let user = TestUser::create();
    // `sleep` does not speak the protocol and ignores end of file on its
    // pipes: only the death signal ends it.
    let cfg = format!(
        "{}[pools.sleepy]\ncommand = [\"sleep\", \"1000\"]\nworkers = 1\nuser = {:?}\ncwd = \"/\"\nstart_timeout = \"10min\"\n",
        daemon_section(),
        user.name
    );
    let mut d = Daemon::start("pdeath", &cfg);
    let pid = wait_for("the worker's pid", DEADLINE, || {
        d.pool("sleepy")["workers"][0]["pid"].as_u64()
    }) as u32;
    wait_for("the worker to run as the pool's user", DEADLINE, || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let uid = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        (uid.split_whitespace().next() == Some(&user.uid.to_string())
            && exe.to_string_lossy().contains("sleep"))
        .then_some(())
    });
    kill(d.pid(), Signal::SIGKILL);
    d.wait_exit(DEADLINE);
    wait_for(
        "the worker to die with the daemon (PR_SET_PDEATHSIG)",
        Duration::from_secs(10),
        || (!alive(pid)).then_some(()),
    );
}

/// Item: a job's error text is capped where the daemon keeps it, so a
/// worker failing with a 60 MiB text leaves a job whose document can still
/// be sent: `result` answers with the head, the tail and a note.
#[test]
fn huge_failure_text_is_cut_and_the_result_still_answers() {
    let cfg = format!(
        "{}[pools.bigfail]\ncommand = [{}, \"fail-big\"]\nworkers = 1\n",
        daemon_section(),
        test_worker()
    );
    let d = Daemon::start("bigfail", &cfg);
    d.wait_ready("bigfail", 1);
    let id = d.submit_id(&["bigfail", "--input", "60"]);
    let r = d.ctl(&["wait", &id.to_string()]);
    assert_eq!(r.code, 1, "wait: {r:?}");
    let r = d.ctl(&["--json", "result", &id.to_string()]);
    assert_eq!(r.code, 1, "result: {r:?}");
    let j = r.json();
    assert_eq!(j["state"], "failed");
    let error = j["error"].as_str().expect("error text");
    assert!(error.len() <= 128 << 10, "kept {} bytes", error.len());
    assert!(error.starts_with("BEGINéé"), "{}", &error[..40]);
    assert!(error.ends_with("ééEND"), "{}", &error[error.len() - 40..]);
    assert!(error.contains("bytes cut]"), "no note in the kept text");
    // The worker is fine and so is the daemon.
    let r = d.ctl(&["--json", "status"]);
    assert_eq!(r.code, 0, "{r:?}");
}

/// A unique `sleep` argument for this test run, so the test finds exactly
/// the processes it started.
fn marker(tag: u32) -> String {
    (7_000_000 + (std::process::id() % 100_000) * 10 + tag).to_string()
}

/// Live processes whose command line is `sleep MARKER`.
fn sleepers(marker: &str) -> Vec<u32> {
    let want = format!("sleep\0{marker}\0");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if (cmd == want || cmd.ends_with(&format!("/{want}"))) && alive(pid) {
            out.push(pid);
        }
    }
    out
}

/// A pool `esc` whose job starts two escapers: one `setsid`, one that
/// double-forks into a session of its own with a child of its own.
fn escape_cfg(m: &str) -> String {
    let job = format!(
        "setsid sleep {m} </dev/null >/dev/null 2>&1 & \
         (setsid sh -c 'sleep {m} & exec sleep {m}' </dev/null >/dev/null 2>&1 &) ; echo started"
    );
    format!(
        "{}[pools.esc]\ncommand = [{}, \"exec\", \"--\", \"sh\", \"-c\", {job:?}]\nworkers = 1\n",
        daemon_section(),
        worker_bin()
    )
}

fn start_escapers(d: &Daemon, m: &str) -> Vec<u32> {
    d.wait_ready("esc", 1);
    let r = d.ctl(&["submit", "esc", "--input", "", "--wait"]);
    assert_eq!(r.code, 0, "{r:?}");
    wait_for("the three escapers", DEADLINE, || {
        let s = sleepers(m);
        (s.len() == 3).then_some(s)
    })
}

/// Item: descendants of a worker that left its process group (`setsid`,
/// double fork) die with it.
#[test]
fn a_workers_setsid_descendants_die_with_it() {
    let m = marker(1);
    let d = Daemon::start("escape", &escape_cfg(&m));
    let worker = d.wait_ready("esc", 1)[0];
    let escapers = start_escapers(&d, &m);
    kill(worker, Signal::SIGKILL);
    wait_for(
        "the worker's escaped descendants to be killed",
        DEADLINE,
        || escapers.iter().all(|p| !alive(*p)).then_some(()),
    );
    // The replacement worker runs and nothing else is left over.
    d.wait_ready("esc", 1);
    assert!(sleepers(&m).is_empty());
}

/// Item: the daemon's shutdown leaves no worker descendant behind.
#[test]
fn shutdown_leaves_no_worker_descendant() {
    let m = marker(2);
    let mut d = Daemon::start("escape-shutdown", &escape_cfg(&m));
    let escapers = start_escapers(&d, &m);
    let r = d.ctl(&["shutdown"]);
    assert_eq!(r.code, 0, "{r:?}");
    d.wait_exit(DEADLINE);
    wait_for(
        "the escaped descendants to be gone after shutdown",
        DEADLINE,
        || escapers.iter().all(|p| !alive(*p)).then_some(()),
    );
}

/// Attribution is by session: a worker's background process in a process
/// group of its own (but still in the worker's session) is adopted by the
/// daemon once its parent exits, is left alone while its worker lives,
/// even when other workers exit, and dies with its worker although the
/// group kill misses it.
#[test]
fn a_background_process_lives_with_its_worker_and_dies_with_it() {
    let m = marker(3);
    let job = format!(
        "perl -e 'setpgrp(0, 0); exec(\"sleep\", \"{m}\")' </dev/null >/dev/null 2>&1 & echo started"
    );
    let cfg = format!(
        "{}[pools.bg]\ncommand = [{w}, \"exec\", \"--\", \"sh\", \"-c\", {job:?}]\nworkers = 1\n\
         [pools.other]\ncommand = [{w}, \"echo\"]\nworkers = 1\n",
        daemon_section(),
        w = worker_bin()
    );
    let d = Daemon::start("background", &cfg);
    let worker = d.wait_ready("bg", 1)[0];
    let other = d.wait_ready("other", 1)[0];
    let r = d.ctl(&["submit", "bg", "--input", "", "--wait"]);
    assert_eq!(r.code, 0, "{r:?}");
    let bg = wait_for(
        "the background process, adopted by the daemon",
        DEADLINE,
        || {
            let s = sleepers(&m);
            (s.len() == 1 && ppid(s[0]) == Some(d.pid())).then(|| s[0])
        },
    );
    assert!(
        !group_members(worker).contains(&bg),
        "in a group of its own"
    );
    // Another worker exits: the sweep that follows leaves it alone.
    kill(other, Signal::SIGKILL);
    wait_for("the other pool's replacement", DEADLINE, || {
        let p = d.pool("other")["workers"][0].clone();
        (p["state"] == "ready" && p["pid"].as_u64() != Some(other as u64)).then_some(())
    });
    assert!(alive(bg), "killed while its worker lives");
    // Its own worker exits: it goes too.
    kill(worker, Signal::SIGKILL);
    wait_for(
        "the background process to die with its worker",
        DEADLINE,
        || (!alive(bg)).then_some(()),
    );
}

/// Item: a spawn that fails for lack of descriptors is not a crash of the
/// pool: it is retried after a backoff, `max_restarts` is not charged, and
/// the pool stays running. (Clients cannot take the descriptors any more:
/// connections are capped below the limit. So here the pool itself wants
/// more workers than the daemon's descriptor limit can hold.)
#[test]
fn spawn_failing_for_lack_of_descriptors_is_retried_not_a_crash() {
    const LIMIT: u64 = 56;
    let cfg = format!(
        "{}[pools.p]\ncommand = [{}, \"echo\"]\nworkers = 12\nmax_restarts = 1\n\
         restart_window = \"10min\"\nbackoff_initial = \"0s\"\nbackoff_max = \"400ms\"\n",
        daemon_section(),
        test_worker()
    );
    let mut d = Daemon::prepare("emfile", &cfg);
    let mut cmd = d.command();
    limit_nofile(&mut cmd, LIMIT);
    d.launch(cmd);
    wait_for("the control socket to answer", DEADLINE, || {
        (d.ctl(&["status"]).code == 0).then_some(())
    });
    // Some of the twelve spawns cannot get their descriptors: retried, more
    // often than max_restarts would allow crashes, and the pool does not
    // fail.
    wait_for("three retried spawns", DEADLINE, || {
        let log = d.log_text();
        (log.matches("not counted as a crash").count() >= 3).then_some(())
    });
    assert!(d.log_text().contains("Too many open files"));
    assert!(!d.log_text().contains("pool p failed"), "{}", d.log_text());
    assert_eq!(d.pool("p")["state"], "running");
    // Fewer workers fit: the pool comes up whole.
    assert_eq!(d.ctl(&["scale", "p", "2"]).code, 0);
    d.wait_ready("p", 2);
    assert_eq!(d.pool("p")["state"], "running");
}

/// A delegated cgroup2 directory for the daemon to run in (as systemd makes
/// one with `Delegate=yes`: the `trusted.delegate` attribute), removed on
/// drop; `None` (the test skips) without root or a writable cgroup2 mount.
struct DelegatedCgroup(std::path::PathBuf);

impl DelegatedCgroup {
    fn make(tag: &str) -> Option<DelegatedCgroup> {
        if !jobvisor::users::need_root("a delegated cgroup") {
            return None;
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let mount = mounts.lines().find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            post.starts_with("cgroup2 ")
                .then(|| pre.split(' ').nth(4).map(std::path::PathBuf::from))
                .flatten()
        })?;
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?.to_string();
        let dir = mount
            .join(rel.trim_start_matches('/'))
            .join(format!("jvtest-{tag}-{}", std::process::id()));
        if std::fs::create_dir(&dir).is_err() {
            eprintln!("SKIPPED: cannot create a cgroup under {}", mount.display());
            return None;
        }
        let set = std::process::Command::new("setfattr")
            .args(["-n", "trusted.delegate", "-v", "1"])
            .arg(&dir)
            .status();
        if !set.is_ok_and(|s| s.success()) {
            // No setfattr: the syscall itself.
            use std::os::unix::ffi::OsStrExt;
            let p = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
            // SAFETY: NUL-terminated strings and a 1-byte value.
            let rc = unsafe {
                libc::setxattr(
                    p.as_ptr(),
                    c"trusted.delegate".as_ptr(),
                    b"1".as_ptr().cast(),
                    1,
                    0,
                )
            };
            if rc != 0 {
                eprintln!("SKIPPED: cannot mark {} delegated", dir.display());
                let _ = std::fs::remove_dir(&dir);
                return None;
            }
        }
        Some(DelegatedCgroup(dir))
    }

    /// Worker cgroups now in it.
    fn children(&self) -> Vec<String> {
        std::fs::read_dir(&self.0)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for DelegatedCgroup {
    fn drop(&mut self) {
        for c in self.children() {
            let _ = std::fs::write(self.0.join(&c).join("cgroup.kill"), b"1");
            let _ = std::fs::remove_dir(self.0.join(c));
        }
        let _ = std::fs::write(self.0.join("cgroup.kill"), b"1");
        let _ = wait_for_quiet(&self.0);
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn wait_for_quiet(dir: &std::path::Path) -> Option<()> {
    let end = std::time::Instant::now() + DEADLINE;
    while std::time::Instant::now() < end {
        if std::fs::read_to_string(dir.join("cgroup.procs")).map_or(true, |s| s.trim().is_empty()) {
            return Some(());
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    None
}

/// Where the daemon's cgroup is delegated to it, every worker gets a cgroup
/// of its own: its escaped descendants are in it and are killed with it
/// (`cgroup.kill`), and the cgroup is removed.
#[test]
fn with_a_delegated_cgroup_each_worker_has_its_own() {
    let Some(cg) = DelegatedCgroup::make("w") else {
        return;
    };
    let m = marker(4);
    let mut d = Daemon::prepare("cgroup", &escape_cfg(&m));
    let mut cmd = d.command();
    let procs = cg.0.join("cgroup.procs");
    {
        use std::os::unix::process::CommandExt;
        let procs = std::ffi::CString::new(procs.to_str().unwrap()).unwrap();
        // SAFETY: open/write/close are async-signal-safe; the string was
        // made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
    }
    d.launch(cmd);
    wait_for("the daemon to answer", DEADLINE, || {
        assert!(alive(d.pid()), "{}", d.log_text());
        (d.ctl(&["status"]).code == 0).then_some(())
    });
    assert!(
        d.log_text().contains("workers run in cgroups of their own"),
        "{}",
        d.log_text()
    );
    let worker = d.wait_ready("esc", 1)[0];
    let escapers = start_escapers(&d, &m);
    let in_cgroup = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_string))
            .unwrap_or_default()
    };
    let own = in_cgroup(worker);
    assert!(own.contains("/worker-esc-0-"), "worker in {own}");
    for p in &escapers {
        assert_eq!(in_cgroup(*p), own, "escaper {p} left the worker's cgroup");
    }
    kill(worker, Signal::SIGKILL);
    wait_for("the worker's cgroup to be killed", DEADLINE, || {
        escapers.iter().all(|p| !alive(*p)).then_some(())
    });
    let old = own.rsplit('/').next().unwrap().to_string();
    d.wait_ready("esc", 1);
    wait_for("the dead worker's cgroup to be removed", DEADLINE, || {
        (!cg.children().contains(&old)).then_some(())
    });
    assert_eq!(cg.children().len(), 1, "{:?}", cg.children());
    // Shutdown leaves no worker cgroup.
    assert_eq!(d.ctl(&["shutdown"]).code, 0);
    d.wait_exit(DEADLINE);
    assert!(cg.children().is_empty(), "{:?}", cg.children());
}
