//! Black-box tests of jobvisord as a systemd service, without systemd: the
//! tests play the service manager. They bind the notification socket
//! (`NOTIFY_SOCKET`), set `WATCHDOG_USEC`, pass a listening socket the way
//! `sd_listen_fds(3)` expects (`LISTEN_FDS`/`LISTEN_PID`, fd 3), and flood
//! a worker's stderr to see the output rate limit.

use jobvisor::*;
use nix::sys::signal::Signal;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn echo_pool(name: &str, workers: u32) -> String {
    format!(
        "[pools.{name}]\ncommand = [{}, \"echo\"]\nworkers = {workers}\n",
        worker_bin()
    )
}

fn is(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

fn monotonic_usec() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000
}

/// `/proc/PID/environ` as `KEY=VALUE` strings.
fn environ(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .map(|e| String::from_utf8_lossy(e).into_owned())
        .collect()
}

fn first_worker_pid(socket: &Path, pool: &str) -> u32 {
    let v = ctl_at(socket, &["--json", "status", pool]).json();
    v["pools"][0]["workers"][0]["pid"].as_u64().expect("pid") as u32
}

#[test]
fn notify_ready_status_reload_and_stopping() {
    // The slow pool makes READY=1 at start-up wrong: it must wait for it.
    let mut d = Daemon::prepare("sd-notify", "");
    let slow = script(
        d.dir.path(),
        "slow.sh",
        &format!("sleep 0.5\nexec {} echo", worker_bin()),
    );
    let config = format!(
        "{}{}[pools.slow]\ncommand = [{:?}]\nworkers = 1\n",
        daemon_section(),
        echo_pool("echo", 2),
        slow.display().to_string()
    );
    d.write_config(&config);
    let notify = NotifySocket::bind(d.dir.path());
    let mut cmd = d.command();
    cmd.env("NOTIFY_SOCKET", notify.path());
    d.launch(cmd);

    let msgs = notify.until("READY=1", DEADLINE, |m| is(m, "READY=1"));
    let ready = msgs.last().unwrap();
    assert_eq!(
        notify_field(ready, "MAINPID"),
        Some(d.pid().to_string().as_str()),
        "{ready:?}"
    );
    let status = notify_field(ready, "STATUS").expect("READY carries a STATUS");
    assert!(status.starts_with("3/3 workers ready"), "{status:?}");
    for m in &msgs[..msgs.len() - 1] {
        assert!(m.starts_with("STATUS="), "before READY=1: {m:?}");
    }
    // READY=1 came only once every worker was ready, so they still are.
    d.wait_ready("echo", 2);
    d.wait_ready("slow", 1);
    // Workers never see the daemon's systemd variables.
    let wpid = first_worker_pid(&d.socket(), "echo");
    assert!(
        !environ(wpid)
            .iter()
            .any(|e| e.starts_with("NOTIFY_SOCKET=")),
        "worker inherited NOTIFY_SOCKET"
    );

    // A change shows up as STATUS= (rate-limited, but it does come).
    assert_eq!(d.ctl(&["scale", "echo", "3"]).code, 0);
    notify.until("STATUS with 4/4 workers ready", DEADLINE, |m| {
        notify_field(m, "STATUS").is_some_and(|s| s.starts_with("4/4 workers ready"))
    });

    // Reload: RELOADING=1 with the monotonic time, then READY=1.
    let before = monotonic_usec();
    assert_eq!(d.ctl(&["reload"]).code, 0);
    let after = monotonic_usec();
    let msgs = notify.until("READY=1 after reload", DEADLINE, |m| is(m, "READY=1"));
    assert!(msgs.len() >= 2, "{msgs:?}");
    let reloading = &msgs[msgs.len() - 2];
    assert!(is(reloading, "RELOADING=1"), "{msgs:?}");
    let usec: u64 = notify_field(reloading, "MONOTONIC_USEC")
        .expect("MONOTONIC_USEC")
        .parse()
        .unwrap();
    assert!(
        before <= usec && usec <= after,
        "{before} <= {usec} <= {after}"
    );

    // A rejected config: the old one serves on, and systemd still hears
    // READY=1 (else it would wait for it until its timeout).
    d.write_config("[daemon\n");
    assert_eq!(d.ctl(&["reload"]).code, 2);
    let msgs = notify.until("READY=1 after a rejected reload", DEADLINE, |m| {
        is(m, "READY=1")
    });
    assert!(is(&msgs[msgs.len() - 2], "RELOADING=1"), "{msgs:?}");
    d.write_config(&config);

    assert_eq!(d.ctl(&["shutdown"]).code, 0);
    notify.until("STOPPING=1", DEADLINE, |m| is(m, "STOPPING=1"));
    assert!(d.wait_exit(DEADLINE).success());
    let rest = notify.collect(Duration::from_millis(100));
    assert!(
        !rest.iter().any(|(_, m)| is(m, "STOPPING=1")),
        "STOPPING=1 sent twice: {rest:?}"
    );
}

#[test]
fn watchdog_pings_come_from_the_loop() {
    let mut d = Daemon::prepare(
        "sd-watchdog",
        &format!("{}{}", daemon_section(), echo_pool("echo", 1)),
    );
    let notify = NotifySocket::bind(d.dir.path());
    let mut cmd = d.command();
    cmd.env("NOTIFY_SOCKET", notify.path())
        .env("WATCHDOG_USEC", "200000");
    d.launch(cmd);
    notify.until("READY=1", DEADLINE, |m| is(m, "READY=1"));
    notify.until("a first WATCHDOG=1", DEADLINE, |m| is(m, "WATCHDOG=1"));

    // Half of WATCHDOG_USEC: about every 100 ms.
    let window = notify.collect(Duration::from_secs(1));
    let pings: Vec<Instant> = window
        .iter()
        .filter(|(_, m)| is(m, "WATCHDOG=1"))
        .map(|(t, _)| *t)
        .collect();
    assert!(
        (5..=15).contains(&pings.len()),
        "{} pings in 1 s",
        pings.len()
    );
    let min_gap = pings.windows(2).map(|w| w[1] - w[0]).min().unwrap();
    assert!(
        min_gap >= Duration::from_millis(50),
        "pings {min_gap:?} apart"
    );
    // Idle: nothing else is sent (no periodic STATUS=).
    let others: Vec<&String> = window
        .iter()
        .map(|(_, m)| m)
        .filter(|m| !is(m, "WATCHDOG=1"))
        .collect();
    assert!(others.is_empty(), "idle daemon sent {others:?}");

    // A stopped loop sends no pings; systemd would restart it.
    kill(d.pid(), Signal::SIGSTOP);
    notify.collect(Duration::from_millis(50)); // in flight before the stop
    let stopped = notify.collect(Duration::from_millis(500));
    kill(d.pid(), Signal::SIGCONT);
    assert!(
        !stopped.iter().any(|(_, m)| is(m, "WATCHDOG=1")),
        "pings while stopped: {stopped:?}"
    );
    notify.until("pings after SIGCONT", Duration::from_secs(2), |m| {
        is(m, "WATCHDOG=1")
    });
}

#[test]
fn watchdog_meant_for_another_pid_is_ignored() {
    let mut d = Daemon::prepare(
        "sd-watchdog-pid",
        &format!("{}{}", daemon_section(), echo_pool("echo", 1)),
    );
    let notify = NotifySocket::bind(d.dir.path());
    let mut cmd = d.command();
    cmd.env("NOTIFY_SOCKET", notify.path())
        .env("WATCHDOG_USEC", "200000")
        .env("WATCHDOG_PID", std::process::id().to_string());
    d.launch(cmd);
    notify.until("READY=1", DEADLINE, |m| is(m, "READY=1"));
    let window = notify.collect(Duration::from_millis(700));
    assert!(
        !window.iter().any(|(_, m)| is(m, "WATCHDOG=1")),
        "pinged for another pid: {window:?}"
    );
}

/// Starts jobvisord the way systemd does for a socket unit (see
/// [`socket_activated`]), with `listener` as its control socket.
fn activated(d: &Daemon, listener: &UnixListener) -> Command {
    socket_activated(&d.config_path(), listener.as_raw_fd(), "control")
}

/// Speaks `Hello` over a raw connection; returns the daemon's pid.
fn hello(stream: &mut UnixStream) -> u32 {
    use ipc_proto::control::{Request, Response};
    let mut out = Vec::new();
    ipc_proto::encode_frame(
        &Request::Hello {
            protocol_version: ipc_proto::PROTOCOL_VERSION,
        },
        &mut out,
    )
    .unwrap();
    stream.write_all(&out).expect("send Hello");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut dec = ipc_proto::FrameDecoder::new(ipc_proto::MAX_FRAME_LEN);
    loop {
        if let Some(f) = dec.next_frame().unwrap() {
            match ipc_proto::decode::<Response>(f).unwrap() {
                Response::Hello { pid, .. } => return pid,
                other => panic!("unexpected answer to Hello: {other:?}"),
            }
        }
        let n = stream.read(dec.unfilled()).expect("read the Hello answer");
        assert!(n > 0, "the daemon closed the early connection");
        dec.filled(n);
    }
}

#[test]
fn socket_activation_serves_the_passed_socket_across_restarts() {
    let mut d = Daemon::prepare(
        "sd-listen",
        &format!("{}{}", daemon_section(), echo_pool("echo", 1)),
    );
    let path = d.dir.path().join("passed.sock");
    let listener = UnixListener::bind(&path).expect("bind");

    // A client that connects before any daemon runs: the kernel queues it.
    let mut early = UnixStream::connect(&path).expect("connect to the unserved socket");
    d.launch(activated(&d, &listener));
    assert_eq!(hello(&mut early), d.pid());
    wait_for("status over the passed socket", DEADLINE, || {
        (ctl_at(&path, &["status"]).code == 0).then_some(())
    });
    // The configured control_socket (ctl.sock) was never bound.
    assert!(!d.socket().exists(), "bound its own socket too");
    assert!(
        d.log_text().contains("passed by the service manager"),
        "{}",
        d.log_text()
    );
    // The worker's fd 3 is its job socket, not our listening socket (which
    // is the daemon's fd 3), and it sees no LISTEN_* variable.
    let wpid = first_worker_pid(&path, "echo");
    let fd3 = std::fs::read_link(format!("/proc/{wpid}/fd/3")).unwrap();
    let own_fd3 = std::fs::read_link(format!("/proc/{}/fd/3", d.pid())).unwrap();
    assert!(fd3.to_string_lossy().starts_with("socket:"), "{fd3:?}");
    assert_ne!(fd3, own_fd3, "the worker got the listening socket");
    assert!(
        !environ(wpid).iter().any(|e| e.starts_with("LISTEN_")),
        "worker sees LISTEN_*"
    );

    assert_eq!(ctl_at(&path, &["shutdown"]).code, 0);
    assert!(d.wait_exit(DEADLINE).success());
    assert!(path.exists(), "the daemon unlinked systemd's socket");

    // Restart: calls made while no daemon runs wait and are then served.
    let mut waiting = UnixStream::connect(&path).expect("connect while down");
    let mut ctl = Command::new(bin("jobvisorctl"));
    ctl.arg("--socket").arg(&path).args(["--json", "status"]);
    let pending = std::thread::spawn(move || run_with_stdin(ctl, None));
    d.launch(activated(&d, &listener));
    assert_eq!(hello(&mut waiting), d.pid());
    let r = pending.join().unwrap();
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["pools"][0]["name"], "echo");

    assert_eq!(ctl_at(&path, &["shutdown"]).code, 0);
    assert!(d.wait_exit(DEADLINE).success());
    assert!(path.exists());
}

#[test]
fn listen_fds_for_another_pid_are_ignored() {
    let mut d = Daemon::prepare(
        "sd-listen-pid",
        &format!("{}{}", daemon_section(), echo_pool("echo", 1)),
    );
    let mut cmd = d.command();
    cmd.env("LISTEN_FDS", "1").env("LISTEN_PID", "1");
    d.launch(cmd);
    // It binds its configured socket instead.
    wait_for("the configured socket to answer", DEADLINE, || {
        (d.ctl(&["status"]).code == 0).then_some(())
    });
    let wpid = d.wait_ready("echo", 1)[0];
    assert!(!environ(wpid).iter().any(|e| e.starts_with("LISTEN_")));
}

/// Sum of N over `[pool/0] suppressed N lines` records in `log`.
fn suppressed(log: &str, pool: &str) -> u64 {
    let tag = format!("[{pool}/0] suppressed ");
    log.lines()
        .filter_map(|l| l.split_once(&tag)?.1.split(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn flooding_worker_is_rate_limited_and_others_stay_fast() {
    // The noisy worker floods stderr with 50 MB ("spam\n" × 10 M) again and
    // again, in the background, until told to stop; then it reports how
    // many rounds it wrote. Its Ready comes at once, so the flood overlaps
    // with everything below.
    let mut d = Daemon::prepare("sd-flood", "");
    let noisy = script(
        d.dir.path(),
        "noisy.sh",
        &format!(
            "(n=0\nwhile :; do\n  yes spam | head -c 50000000 >&2\n  n=$((n+1))\n  [ -e stop ] && break\ndone\necho $n > rounds.tmp && mv rounds.tmp rounds) &\nexec {} echo",
            worker_bin()
        ),
    );
    d.write_config(&format!(
        "{}{}[pools.noisy]\ncommand = [{:?}]\nworkers = 1\n",
        daemon_section(),
        echo_pool("echo", 1),
        noisy.display().to_string()
    ));
    let mut cmd = d.command();
    cmd.env("JOBVISOR_LOG", "info");
    d.launch(cmd);
    wait_for("the control socket", DEADLINE, || {
        (d.ctl(&["status"]).code == 0).then_some(())
    });
    d.wait_ready("echo", 1);

    let mut worst = Duration::ZERO;
    for i in 0..20 {
        let t = Instant::now();
        let r = d.ctl(&["submit", "echo", "--input", &format!("x{i}"), "--wait"]);
        let took = t.elapsed();
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(r.stdout, format!("x{i}"));
        worst = worst.max(took);
    }
    let rounds_file = d.dir.path().join("rounds");
    assert!(
        !rounds_file.exists(),
        "the flood ended before the submits did; the test proves nothing"
    );
    std::fs::write(d.dir.path().join("stop"), "").unwrap();
    assert!(worst < Duration::from_secs(2), "a submit took {worst:?}");

    // The daemon read every byte (head would block otherwise), and every
    // line is accounted for: logged, or counted in a "suppressed" record
    // (which comes about a second after the flood went quiet).
    let rounds: u64 = wait_for("the flood to finish", Duration::from_secs(120), || {
        std::fs::read_to_string(&rounds_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    });
    let total = rounds * 10_000_000;
    let log = wait_for("every flooded line accounted for", DEADLINE, || {
        let log = d.log_text();
        let logged = log.matches("[noisy/0] spam\n").count() as u64;
        (logged + suppressed(&log, "noisy") == total).then_some(log)
    });
    assert!(
        log.len() < 1 << 20,
        "{} bytes of log for {rounds} × 50 MB of output",
        log.len()
    );

    // Quiet again: the loop does not spin (backlog empty, no timers left).
    let pid = d.pid();
    let cpu = || {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<u64> = s
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|v| v.parse().unwrap())
            .collect();
        f[0] + f[1]
    };
    let before = cpu();
    std::thread::sleep(Duration::from_millis(500));
    let ticks = cpu() - before;
    assert!(ticks <= 5, "idle daemon used {ticks} clock ticks in 500 ms");
}

#[test]
fn output_left_at_the_read_budget_is_read_later() {
    // 800 KB written at once into a 1 MiB pipe (F_SETPIPE_SZ = 1031), then
    // silence: the daemon's first read stops at its per-event budget, and
    // no new edge will ever come for the rest. It must come back for it.
    let mut d = Daemon::prepare("sd-budget", "");
    let bulk = script(
        d.dir.path(),
        "bulk.sh",
        &format!(
            "perl -e 'fcntl(STDERR, 1031, 1048576) or die \"F_SETPIPE_SZ: $!\"; print STDERR \"x\\n\" x 400000'\nexec {} echo",
            worker_bin()
        ),
    );
    d.write_config(&format!(
        "{}[pools.bulk]\ncommand = [{:?}]\nworkers = 1\n",
        daemon_section(),
        bulk.display().to_string()
    ));
    let mut cmd = d.command();
    cmd.env("JOBVISOR_LOG", "info");
    d.launch(cmd);
    wait_for("all 400000 lines logged or counted", DEADLINE, || {
        let log = d.log_text();
        let logged = log.matches("[bulk/0] x\n").count() as u64;
        (logged + suppressed(&log, "bulk") == 400_000).then_some(())
    });
    assert!(!d.log_text().contains("F_SETPIPE_SZ"), "{}", d.log_text());
}

#[test]
fn journal_priorities_only_when_stderr_is_the_journal_stream() {
    use std::os::unix::fs::MetadataExt;
    for matching in [true, false] {
        let mut d = Daemon::prepare(
            "sd-journal",
            &format!("{}{}", daemon_section(), echo_pool("echo", 1)),
        );
        let log_path = d.dir.path().join("stderr.log");
        let file = std::fs::File::create(&log_path).unwrap();
        let meta = file.metadata().unwrap();
        // systemd sets DEVICE:INODE of the stream it connected; a stale or
        // inherited value names some other file.
        let ino = if matching { meta.ino() } else { meta.ino() + 1 };
        let mut cmd = d.command();
        cmd.env("JOURNAL_STREAM", format!("{}:{ino}", meta.dev()))
            .env("JOBVISOR_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(file);
        d.child = Some(cmd.spawn().expect("spawn jobvisord"));
        wait_for("the control socket", DEADLINE, || {
            (d.ctl(&["status"]).code == 0).then_some(())
        });
        assert_eq!(d.ctl(&["shutdown"]).code, 0);
        assert!(d.wait_exit(DEADLINE).success());
        let text = std::fs::read_to_string(&log_path).unwrap();
        let first = text.lines().next().unwrap_or_default();
        if matching {
            assert!(first.starts_with("<6>jobvisord "), "{text}");
            assert!(text.lines().all(|l| l.starts_with('<')), "{text}");
        } else {
            assert!(first.starts_with("jobvisord: info: "), "{text}");
        }
    }
}
