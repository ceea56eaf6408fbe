//! What held in the security review, and must keep holding: descriptors a
//! hostile client passes as inputs that are not readable regular files are
//! refused (each alone, the daemon unharmed), lengths beyond the file are
//! refused, a file truncated while the daemon copies it is a clean error
//! (never a SIGBUS), and an `events` subscriber that does not read is cut
//! off instead of growing the daemon. (Bad shared-memory references and
//! garbage frames from workers, arena seals and `kill -9` mid-submit are
//! covered in `shm.rs`, `jobs.rs` and `supervision.rs`.)

use ipc_proto::control::{ErrorKind, Request, Response};
use jobvisor::*;
use jobvisor_client::Connection;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

fn cfg() -> String {
    format!(
        "{}[pools.echo]\ncommand = [{}, \"echo\"]\nworkers = 2\nshm_size = \"64MiB\"\n",
        daemon_section(),
        worker_bin()
    )
}

fn submit_fd(len: u64) -> Request {
    Request::SubmitFd {
        pool: "echo".into(),
        len,
        options: Default::default(),
        wait: false,
    }
}

/// Submits `fd` announcing `len` bytes; the daemon's answer.
fn submit_with(c: &mut Connection, fd: &impl AsFd, len: u64) -> Response {
    c.send_with_fd(&submit_fd(len), fd).unwrap();
    c.recv().unwrap()
}

fn open(path: &std::path::Path, flags: nix::fcntl::OFlag) -> OwnedFd {
    nix::fcntl::open(
        path,
        flags | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Directories, FIFOs, sockets, character devices, `O_PATH` and write-only
/// descriptors, and lengths beyond the file: each refused with one clear
/// error (exit-2 kind), small or large; the connection and the daemon carry
/// on, and a good submit right after works.
#[test]
fn unreadable_or_unsuitable_descriptors_are_refused_one_by_one() {
    use nix::fcntl::OFlag;
    let d = Daemon::start("held-fds", &cfg());
    d.wait_ready("echo", 2);
    let dir = d.dir.path();
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let file = dir.join("file");
    std::fs::write(&file, pattern(3 << 20)).unwrap();
    let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
    let cases: Vec<(&str, OwnedFd, &str)> = vec![
        (
            "a directory",
            open(dir, OFlag::O_RDONLY | OFlag::O_DIRECTORY),
            "not a regular file",
        ),
        (
            "a FIFO",
            open(&fifo, OFlag::O_RDWR | OFlag::O_NONBLOCK),
            "not a regular file",
        ),
        ("a socket", sock.into(), "not a regular file"),
        (
            "/dev/zero",
            open(std::path::Path::new("/dev/zero"), OFlag::O_RDONLY),
            "not a regular file",
        ),
        ("O_PATH", open(&file, OFlag::O_PATH), "not open for reading"),
        (
            "write-only",
            open(&file, OFlag::O_WRONLY),
            "not open for reading",
        ),
    ];
    let mut c = Connection::connect(&d.socket()).unwrap();
    for (what, fd, want) in &cases {
        for len in [100u64, 2 << 20] {
            match submit_with(&mut c, fd, len) {
                Response::Error { kind, message } => {
                    assert_eq!(kind, ErrorKind::Invalid, "{what}, {len} bytes: {message}");
                    assert!(message.contains(want), "{what}, {len} bytes: {message}");
                }
                other => panic!("{what}, {len} bytes: accepted: {other:?}"),
            }
        }
    }
    // Beyond the end of the file: refused, and the error names no content.
    let f = open(&file, OFlag::O_RDONLY);
    for len in [(3 << 20) + 1, 16 << 20] {
        match submit_with(&mut c, &f, len) {
            Response::Error { kind, message } => {
                assert_eq!(kind, ErrorKind::Invalid, "{message}");
                assert!(message.contains("fewer than"), "{message}");
            }
            other => panic!("{len} bytes of a 3 MiB file accepted: {other:?}"),
        }
    }
    // The same connection, a good one: accepted and run.
    let id = match submit_with(&mut c, &f, 3 << 20) {
        Response::Submitted { id } => id,
        other => panic!("a good descriptor refused: {other:?}"),
    };
    let r = d.ctl(&["result", &id.to_string()]);
    let r = if r.code == 0 {
        r
    } else {
        assert_eq!(d.ctl(&["wait", &id.to_string()]).code, 0);
        d.ctl(&["result", &id.to_string()])
    };
    assert!(r.raw == pattern(3 << 20), "{} bytes back", r.raw.len());
    assert!(alive(d.pid()));
}

/// A client truncates its input file while the daemon copies it: the
/// submit succeeds with the whole input or fails with a clear error; the
/// daemon never reads past the end into a SIGBUS, and serves on.
#[test]
fn a_file_truncated_mid_copy_is_a_clean_error() {
    let d = Daemon::start("held-trunc", &cfg());
    d.wait_ready("echo", 2);
    let path = d.dir.path().join("shrinking");
    let data = pattern(24 << 20);
    for round in 0..6 {
        std::fs::write(&path, &data).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let mut c = Connection::connect(&d.socket()).unwrap();
        c.send_with_fd(&submit_fd(data.len() as u64), &f).unwrap();
        // Cut it while the daemon copies (at once, or a little later).
        if round % 2 == 1 {
            std::thread::yield_now();
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        match c.recv().unwrap() {
            Response::Submitted { id } => {
                let w = d.ctl(&["wait", &id.to_string()]);
                let r = d.ctl(&["result", &id.to_string()]);
                if w.code == 0 {
                    assert!(
                        r.raw == data,
                        "round {round}: a succeeded job has its whole input"
                    );
                } else {
                    // Failed cleanly, saying its input could not be read.
                    let j = d.ctl(&["--json", "result", &id.to_string()]).json();
                    assert_eq!(j["state"], "failed", "round {round}: {j}");
                    let e = j["error"].as_str().unwrap_or_default();
                    assert!(e.contains("input"), "round {round}: {e}");
                }
            }
            Response::Error { message, .. } => {
                assert!(
                    message.contains("shrink")
                        || message.contains("fewer than")
                        || message.contains("input ended"),
                    "round {round}: {message}"
                );
            }
            other => panic!("round {round}: {other:?}"),
        }
        assert!(alive(d.pid()), "round {round}: the daemon died");
    }
    assert_eq!(d.ctl(&["status"]).code, 0);
}

/// An `events` subscriber that never reads is disconnected once 8 MiB of
/// events wait for it; the daemon's memory does not follow the backlog.
#[test]
fn a_subscriber_that_does_not_read_is_cut_off() {
    let d = Daemon::start("held-events", &cfg());
    d.wait_ready("echo", 2);
    let mut sub = Connection::connect(&d.socket()).unwrap();
    sub.send(&Request::Events).unwrap();
    let before = rss_kib(d.pid());
    // Each job makes three events of a few dozen bytes.
    let mut n = 0;
    wait_for(
        "the subscriber to be cut off",
        Duration::from_secs(120),
        || {
            let input: String = (0..20_000).map(|i| format!("{i}\n")).collect();
            let r = d.ctl_stdin(&["map", "echo"], Some(input.as_bytes()));
            assert_eq!(r.code, 0, "{r:?}");
            n += 20_000;
            d.log_text().contains("too far behind").then_some(())
        },
    );
    let grown = rss_kib(d.pid()).saturating_sub(before);
    assert!(
        grown < 64 << 10,
        "daemon grew by {} MiB after {n} jobs",
        grown >> 10
    );
    // The subscriber gets the end of its stream, not an endless backlog.
    let mut events = 0u64;
    loop {
        match sub.recv() {
            Ok(Response::Event(_)) => events += 1,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => break,
        }
    }
    assert!(events > 0);
    assert_eq!(d.ctl(&["status"]).code, 0);
}
