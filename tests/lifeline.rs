//! `jobvisord --lifeline FD`, how `jobvisor.Executor()` runs a private
//! daemon: it says `listening` and `ready` on the socket, and when the
//! other end closes it stops its workers at once and removes its state_dir.
//! (The Python side is tested by python/tests/test_embedded.py.)

use jobvisor::*;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::time::Duration;

/// A socket pair: ours (close-on-exec) and the daemon's (inherited as the
/// same number: its close-on-exec flag is cleared in the child only).
fn pair() -> (UnixStream, OwnedFd) {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    (UnixStream::from(a), b)
}

fn read_line(s: &mut UnixStream, buf: &mut Vec<u8>) -> String {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    loop {
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            return String::from_utf8_lossy(&line[..i]).into_owned();
        }
        let mut chunk = [0u8; 64];
        let n = s
            .read(&mut chunk)
            .expect("a line from the daemon within 30 s");
        assert!(n > 0, "the daemon closed the lifeline");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn the_daemon_stops_and_cleans_up_when_its_lifeline_closes() {
    let config = format!(
        "[daemon]\ncontrol_socket = \"ctl.sock\"\nstate_dir = \"state\"\n\
         [pools.echo]\ncommand = [\"{}\", \"echo\"]\nworkers = 2\n",
        bin("jobvisor-worker").display()
    );
    let mut d = Daemon::prepare("lifeline", &config);
    let (mut ours, theirs) = pair();
    let fd = theirs.as_raw_fd();
    let mut cmd = d.command();
    cmd.arg("--lifeline").arg(fd.to_string());
    // SAFETY: fcntl on an integer descriptor is async-signal-safe; it only
    // clears close-on-exec on the daemon's end in the forked child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    d.launch(cmd);
    drop(theirs);
    let mut buf = Vec::new();
    assert_eq!(read_line(&mut ours, &mut buf), "listening");
    assert_eq!(read_line(&mut ours, &mut buf), "ready");
    let r = d.ctl(&["submit", "echo", "--input", "hi", "--wait"]);
    assert_eq!(r.code, 0, "{r:?}");
    let pids: Vec<u32> = d.pool("echo")["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
        .collect();
    assert_eq!(pids.len(), 2);
    let state = d.dir.path().join("state");
    assert!(state.join("jobs.db").exists());

    drop(ours); // as if the process holding it had been killed
    let status = d.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log_text());
    for pid in pids {
        wait_for("the worker to be gone", DEADLINE, || {
            (!alive(pid)).then_some(())
        });
    }
    assert!(!state.exists(), "state_dir is removed");
    assert!(!d.socket().exists(), "the socket is removed");
    assert!(
        d.log_text().contains("--lifeline closed"),
        "{}",
        d.log_text()
    );
}

#[test]
fn a_lifeline_that_is_not_a_socket_is_a_usage_error() {
    let d = Daemon::prepare("lifeline-bad", &daemon_section());
    let o = d
        .command()
        .args(["--lifeline", "0"])
        .output()
        .expect("run jobvisord");
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--lifeline"), "{err}");
    let o = d
        .command()
        .args(["--lifeline", "987"])
        .output()
        .expect("run jobvisord");
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not open"));
}
