//! Hostile control clients: what a user who can reach the socket sends, and
//! what the daemon must still do. Each test plays one attack of the security
//! review against the real daemon: memory stays bounded (RSS well under
//! 256 MiB), root's `status` keeps answering, connections are capped per
//! user and in total below the descriptor limit, and admin commands need
//! admin rights. Tests that need other users create throwaway ones (root
//! only; they say SKIPPED otherwise).

use ipc_proto::control::{Request, Response};
use ipc_proto::{decode, encode_frame, FrameDecoder};
use jobvisor::users::{need_root, TestGroup, TestUser};
use jobvisor::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// What the daemon may hold while an attack runs (the review's target).
const RSS_LIMIT_KIB: u64 = 256 << 10;

fn echo_cfg(daemon_extra: &str) -> String {
    format!(
        "{}{daemon_extra}\n[pools.echo]\ncommand = [{}, \"echo\"]\nworkers = 2\n",
        daemon_section(),
        worker_bin()
    )
}

fn frame(req: &Request) -> Vec<u8> {
    let mut buf = Vec::new();
    encode_frame(req, &mut buf).unwrap();
    buf
}

fn hello() -> Vec<u8> {
    frame(&Request::Hello {
        protocol_version: ipc_proto::PROTOCOL_VERSION,
    })
}

/// A raw connection that reads whole responses.
struct Raw {
    s: UnixStream,
    dec: FrameDecoder,
}

impl Raw {
    fn connect(d: &Daemon) -> Raw {
        let s = UnixStream::connect(d.socket()).expect("connect");
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        Raw {
            s,
            dec: FrameDecoder::new(ipc_proto::MAX_FRAME_LEN),
        }
    }

    fn greeted(d: &Daemon) -> Raw {
        let mut r = Raw::connect(d);
        r.s.write_all(&hello()).unwrap();
        match r.recv() {
            Some(Response::Hello { .. }) => r,
            other => panic!("no Hello back: {other:?}"),
        }
    }

    /// The next response, or `None` at end of stream.
    fn recv(&mut self) -> Option<Response> {
        loop {
            if let Some(f) = self.dec.next_frame().expect("frame") {
                return Some(decode::<Response>(f).expect("response"));
            }
            let spare = self.dec.unfilled();
            match self.s.read(spare) {
                Ok(0) => return None,
                Ok(n) => self.dec.filled(n),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Waits for the daemon to close the connection (what it sends first
    /// is returned).
    fn closed_by_daemon(&mut self) -> Vec<Response> {
        let mut got = Vec::new();
        while let Some(r) = self.recv() {
            got.push(r);
        }
        got
    }
}

/// Root's `status` answers, and how long it took.
fn root_status(d: &Daemon) -> Duration {
    let t = Instant::now();
    let r = d.ctl(&["status"]);
    assert_eq!(r.code, 0, "root's status while under attack: {r:?}");
    t.elapsed()
}

/// Runs `status` a few times: the slowest answer must come well within a
/// second (the review's target of 100 ms is what the daemon's loop adds;
/// a loaded CI machine starting a debug `jobvisorctl` adds more, so the
/// test allows for that; the figures are in the issue note).
fn assert_status_responsive(d: &Daemon) {
    let worst = (0..5).map(|_| root_status(d)).max().unwrap();
    assert!(
        worst < Duration::from_secs(1),
        "root's status took {worst:?} under attack"
    );
}

fn assert_rss_bounded(d: &Daemon, what: &str) {
    let kib = rss_kib(d.pid());
    assert!(
        kib < RSS_LIMIT_KIB,
        "{what}: daemon RSS {} MiB (limit {} MiB)",
        kib >> 10,
        RSS_LIMIT_KIB >> 10
    );
}

/// A finished echo job whose output is `len` bytes (kept inline: under the
/// 1 MiB that would make it a payload file).
fn job_with_output(d: &Daemon, len: usize) -> u64 {
    let f = d.dir.path().join("input");
    std::fs::write(&f, pattern(len)).unwrap();
    let id = d.submit_id(&["echo", "--input-file", f.to_str().unwrap()]);
    let r = d.ctl(&["wait", &id.to_string()]);
    assert_eq!(r.code, 0, "{r:?}");
    id
}

/// 40 connections that never greet, each announcing a 64 MiB frame: the
/// daemon holds next to nothing for them (a frame before `Hello` may be
/// 1 KiB) and closes each at once; greeted ones announcing more than the
/// request limit are closed too.
#[test]
fn announced_frames_allocate_nothing() {
    let d = Daemon::start("sec-announce", &echo_cfg(""));
    d.wait_ready("echo", 2);
    let before = rss_kib(d.pid());
    let prefix = (64u32 << 20).to_le_bytes();
    let mut conns: Vec<Raw> = (0..40).map(|_| Raw::connect(&d)).collect();
    for c in &mut conns {
        c.s.write_all(&prefix).unwrap();
        c.s.write_all(&[0u8; 4096]).ok();
    }
    for c in &mut conns {
        let got = c.closed_by_daemon();
        assert!(got.is_empty(), "answered a garbage greeting: {got:?}");
    }
    // Greeted: a frame over the request limit is a protocol error, not an
    // allocation; one under it that never completes costs what arrived.
    let mut big = Raw::greeted(&d);
    big.s.write_all(&(64u32 << 20).to_le_bytes()).unwrap();
    assert!(big.closed_by_daemon().is_empty());
    let mut trickles: Vec<Raw> = (0..20).map(|_| Raw::greeted(&d)).collect();
    let limit = ipc_proto::control::MAX_REQUEST_LEN as u32;
    for t in &mut trickles {
        t.s.write_all(&limit.to_le_bytes()).unwrap();
        t.s.write_all(&[1u8; 100]).unwrap();
    }
    assert_status_responsive(&d);
    let grown = rss_kib(d.pid()).saturating_sub(before);
    assert!(
        grown < 32 << 10,
        "20 trickling connections grew the daemon by {} MiB",
        grown >> 10
    );
    assert_rss_bounded(&d, "announced frames");
}

/// A connection that says nothing is closed after the greeting deadline;
/// one that greets stays.
#[test]
fn silent_connections_are_closed_after_the_greeting_deadline() {
    let d = Daemon::start("sec-greet", &echo_cfg(""));
    let mut silent = Raw::connect(&d);
    let mut greeted = Raw::greeted(&d);
    let t = Instant::now();
    assert!(silent.closed_by_daemon().is_empty());
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_secs(4),
        "closed after {waited:?}, before the deadline"
    );
    // The greeted one still works.
    greeted
        .s
        .write_all(&frame(&Request::Status { pool: None }))
        .unwrap();
    assert!(matches!(greeted.recv(), Some(Response::Status(_))));
}

/// One `Wait` naming the same job many times gets one answer: the list is
/// deduplicated. (On the old daemon every copy was answered with the
/// job's document, each loaded from the store.)
#[test]
fn a_wait_naming_one_job_many_times_is_answered_once() {
    let d = Daemon::start("sec-waitdup", &echo_cfg(""));
    d.wait_ready("echo", 2);
    let id = job_with_output(&d, (1 << 20) - 64);
    let mut c = Raw::greeted(&d);
    c.s.write_all(&frame(&Request::Wait {
        ids: vec![id; 200_000],
    }))
    .unwrap();
    let mut jobs = 0;
    loop {
        match c.recv() {
            Some(Response::Job(doc)) => {
                assert_eq!(doc.id, id);
                assert!(doc.output.is_none(), "wait sends no outputs");
                jobs += 1;
            }
            Some(Response::End) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(jobs, 1, "one answer per distinct job");
    assert_rss_bounded(&d, "duplicated wait ids");
    // Too many distinct ids at once: refused with a clear error.
    let ids: Vec<u64> = (1..=ipc_proto::control::MAX_WAIT_IDS as u64 + 1).collect();
    c.s.write_all(&frame(&Request::Wait { ids })).unwrap();
    match c.recv() {
        Some(Response::Error { message, .. }) => {
            assert!(message.contains("at most"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// 3,000 pipelined `Result` requests for a job with an output just under
/// 1 MiB, from a client that does not read: the daemon stops producing
/// replies while the client's unread output is over its cap, so its memory
/// stays bounded; every request is still answered once the client reads.
#[test]
fn pipelined_results_are_produced_only_as_fast_as_the_client_reads() {
    let d = Daemon::start("sec-results", &echo_cfg(""));
    d.wait_ready("echo", 2);
    let len = (1 << 20) - 64;
    let id = job_with_output(&d, len);
    let c = Raw::greeted(&d);
    let n = 3000;
    let req = frame(&Request::Result { id });
    let mut writer = c.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for _ in 0..n {
            writer.write_all(&req).unwrap();
        }
    });
    let mut c = c;
    // Let the daemon go as far as it will while nobody reads: until it
    // stops producing, RSS must stay bounded and root served.
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        peak = peak.max(rss_kib(d.pid()));
        root_status(&d);
    }
    assert!(
        peak < RSS_LIMIT_KIB,
        "daemon RSS reached {} MiB while the client did not read",
        peak >> 10
    );
    assert_status_responsive(&d);
    // Now read everything: each request answered, with its output.
    for i in 0..n {
        match c.recv() {
            Some(Response::Job(doc)) => {
                assert_eq!(doc.output.map(|o| o.0.len()), Some(len), "reply {i}")
            }
            other => panic!("reply {i}: {other:?}"),
        }
        if i % 500 == 0 {
            peak = peak.max(rss_kib(d.pid()));
        }
    }
    sender.join().unwrap();
    assert!(peak < RSS_LIMIT_KIB, "peak RSS {} MiB", peak >> 10);
    drop(c);
    assert_rss_bounded(&d, "after the client left");
}

/// Idle (greeted) connections cannot take the descriptors a respawn needs:
/// connections are refused with a clear error past what the descriptor
/// limit leaves after the workers' share, and a killed worker is replaced.
#[test]
fn idle_connections_cannot_starve_respawns() {
    let mut d = Daemon::prepare("sec-fds", &echo_cfg(""));
    let mut cmd = d.command();
    limit_nofile(&mut cmd, 160);
    d.launch(cmd);
    let pid = d.pid();
    wait_for("the daemon to answer", DEADLINE, || {
        assert!(alive(pid), "daemon died: {}", d.log_text());
        (d.ctl(&["status"]).code == 0).then_some(())
    });
    let pids = d.wait_ready("echo", 2);
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..200 {
        let mut c = Raw::connect(&d);
        // A refused connection may be closed before our Hello arrives.
        let _ = c.s.write_all(&hello());
        match c.recv() {
            Some(Response::Hello { .. }) => held.push(c),
            Some(Response::Error { message, .. }) => {
                refused = Some(message);
                break;
            }
            other => panic!("unexpected answer: {other:?}"),
        }
    }
    let msg = refused.expect("connections were never refused");
    assert!(msg.contains("LimitNOFILE"), "{msg}");
    assert!(held.len() >= 16, "only {} connections admitted", held.len());
    // Every slot is held: jobvisorctl says so, with exit 5 (rejected for
    // now) and the line that names the limit.
    let r = d.ctl(&["status"]);
    assert_eq!(r.code, 5, "{r:?}");
    assert!(r.stderr.contains("LimitNOFILE"), "{r:?}");
    // A killed worker is replaced although the clients hold their share.
    kill(pids[0], nix::sys::signal::Signal::SIGKILL);
    drop(held.pop());
    wait_for("the killed worker to be replaced", DEADLINE, || {
        let new = d.wait_ready("echo", 2);
        (!new.contains(&pids[0])).then_some(())
    });
    drop(held);
    assert_eq!(d.pool("echo")["state"], "running");
}

/// Runs a Python script as `user` that opens `n` connections to `socket`,
/// greets on each and prints, per connection, `ok` or the refusal; then
/// waits for its stdin to close (holding the connections).
fn hold_connections_as(
    user: &TestUser,
    socket: &std::path::Path,
    n: usize,
) -> (std::process::Child, Vec<String>) {
    let hello_hex: String = hello().iter().map(|b| format!("{b:02x}")).collect();
    let script = format!(
        r#"
import socket, sys
hello = bytes.fromhex("{hello_hex}")
conns = []
for i in range({n}):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect({socket:?})
    try:
        s.sendall(hello)
    except BrokenPipeError:
        pass  # refused: the answer is waiting all the same
    head = b""
    while len(head) < 5:
        b = s.recv(5 - len(head))
        if not b: break
        head += b
    n = int.from_bytes(head[:4], "little")
    body = head[4:]
    while len(body) < n:
        b = s.recv(n - len(body))
        if not b: break
        body += b
    # Response::Hello is variant 0; anything else is a refusal.
    print("ok" if body[:1] == b"\x00" else "refused " + body.decode("utf-8", "replace"), flush=True)
    conns.append(s)
print("done", flush=True)
sys.stdin.read()
"#,
        socket = socket.to_str().unwrap()
    );
    let mut child = user
        .command("python3")
        .arg("-c")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    loop {
        let mut l = String::new();
        if std::io::BufRead::read_line(&mut out, &mut l).unwrap() == 0 {
            panic!("connection holder died: {lines:?}");
        }
        let l = l.trim().to_string();
        if l == "done" {
            break;
        }
        lines.push(l);
    }
    (child, lines)
}

/// A user over `max_connections_per_user` is refused with a clear error;
/// root still gets in; when the user's connections go, the user gets in.
#[test]
fn connections_are_capped_per_user() {
    if !need_root("connections_are_capped_per_user") {
        return;
    }
    let user = TestUser::create();
    let d = Daemon::start(
        "sec-peruser",
        &echo_cfg("socket_mode = \"0666\"\nmax_connections_per_user = 5\n"),
    );
    let (mut holder, lines) = hold_connections_as(&user, &d.socket(), 7);
    let ok = lines.iter().filter(|l| *l == "ok").count();
    assert_eq!(ok, 5, "{lines:?}");
    assert!(
        lines[5].contains("max_connections_per_user = 5"),
        "{lines:?}"
    );
    let r = user.ctl(&d.socket(), &["status"]);
    assert_eq!(r.code, 5, "{r:?}");
    assert!(r.stderr.contains("max_connections_per_user"), "{r:?}");
    assert_eq!(d.ctl(&["status"]).code, 0, "root is not limited per user");
    drop(holder.stdin.take());
    holder.wait().unwrap();
    wait_for("the user's connections to be released", DEADLINE, || {
        (user.ctl(&d.socket(), &["status"]).code == 0).then_some(())
    });
}

/// Past `max_connections`, everyone but admins is refused; admins keep a
/// few connections in reserve.
#[test]
fn connections_are_capped_in_total_with_room_for_admins() {
    if !need_root("connections_are_capped_in_total_with_room_for_admins") {
        return;
    }
    let a = TestUser::create();
    let b = TestUser::create();
    let d = Daemon::start(
        "sec-total",
        &echo_cfg("socket_mode = \"0666\"\nmax_connections = 6\n"),
    );
    let (mut ha, la) = hold_connections_as(&a, &d.socket(), 6);
    assert!(la.iter().all(|l| l == "ok"), "{la:?}");
    let (mut hb, lb) = hold_connections_as(&b, &d.socket(), 1);
    assert!(lb[0].contains("daemon.max_connections = 6"), "{lb:?}");
    assert_eq!(d.ctl(&["status"]).code, 0, "an admin still gets in");
    for h in [&mut ha, &mut hb] {
        drop(h.stdin.take());
        h.wait().unwrap();
    }
}

/// Admin commands (and `logs`: worker output may carry anyone's job data)
/// need root, the daemon's uid or `admin_group`; `status` is open to every
/// user of the socket.
#[test]
fn admin_commands_need_admin_rights() {
    if !need_root("admin_commands_need_admin_rights") {
        return;
    }
    let admins = TestGroup::create();
    let user = TestUser::create();
    let operator = TestUser::create_in(&[&admins]);
    let d = Daemon::start(
        "sec-admin",
        &echo_cfg(&format!(
            "socket_mode = \"0666\"\nadmin_group = \"{}\"\n",
            admins.name
        )),
    );
    d.wait_ready("echo", 2);
    let s = d.socket();
    assert_eq!(user.ctl(&s, &["status"]).code, 0);
    for args in [
        &["scale", "echo", "3"][..],
        &["restart", "echo"],
        &["pause", "echo"],
        &["resume", "echo"],
        &["reload"],
        &["shutdown", "--now"],
        &["logs", "echo"],
    ] {
        let r = user.ctl(&s, args);
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
        assert!(
            r.stderr.contains("needs admin rights") && r.stderr.contains(&admins.name),
            "{args:?}: {r:?}"
        );
    }
    assert!(alive(d.pid()));
    assert_eq!(d.pool("echo")["workers"].as_array().unwrap().len(), 2);
    let r = operator.ctl(&s, &["scale", "echo", "3"]);
    assert_eq!(r.code, 0, "a member of admin_group may: {r:?}");
    let r = operator.ctl(&s, &["logs", "echo"]);
    assert_eq!(r.code, 0, "a member of admin_group may read logs: {r:?}");
    assert!(r.stdout.contains("[jobvisord] pid"), "{r:?}");
    d.wait_ready("echo", 3);
    assert_eq!(d.ctl(&["scale", "echo", "2"]).code, 0, "root may");
}

/// Inputs passed as descriptors are examined off the loop, and the client's
/// replies keep their order: a small memfd input, an inline one, a
/// write-only descriptor (refused alone, with a clear error), another
/// inline one.
#[test]
fn descriptor_inputs_keep_reply_order_and_fail_alone() {
    use jobvisor_client::Connection;
    let d = Daemon::start("sec-fdin", &echo_cfg(""));
    d.wait_ready("echo", 2);
    let mut c = Connection::connect(&d.socket()).unwrap();
    let submit = |input: &[u8]| Request::Submit {
        pool: "echo".into(),
        input: ipc_proto::Bytes(input.to_vec()),
        options: Default::default(),
        wait: false,
    };
    let submit_fd = |len: u64| Request::SubmitFd {
        pool: "echo".into(),
        len,
        options: Default::default(),
        wait: false,
    };
    let small = jobvisor_client::fdpass::sealed_memfd(c"small", b"from a descriptor").unwrap();
    let path = d.dir.path().join("wo");
    std::fs::write(&path, b"0123456789").unwrap();
    let write_only = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    c.send_with_fd(&submit_fd(17), &small).unwrap();
    c.send(&submit(b"inline one")).unwrap();
    c.send_with_fd(&submit_fd(10), &write_only).unwrap();
    c.send(&submit(b"inline two")).unwrap();
    let mut ids = Vec::new();
    for i in 0..4 {
        match c.recv().unwrap() {
            Response::Submitted { id } => ids.push(id),
            Response::Error { message, .. } if i == 2 => {
                assert!(message.contains("not open for reading"), "{message}");
                assert!(!message.contains("0123456789"));
            }
            other => panic!("reply {i}: {other:?} after {ids:?}"),
        }
    }
    assert_eq!(ids.len(), 3);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let r = d.ctl(&["result", &ids[0].to_string()]);
    assert_eq!(r.stdout, "from a descriptor");
}

/// Jobs belong to their submitter: another user can neither see, wait on,
/// cancel nor list them, nor hear their events (all answered as for an
/// unknown job); admins see everyone's.
#[test]
fn users_see_and_control_only_their_own_jobs() {
    if !need_root("users_see_and_control_only_their_own_jobs") {
        return;
    }
    let admins = TestGroup::create();
    let alice = TestUser::create();
    let bob = TestUser::create();
    let operator = TestUser::create_in(&[&admins]);
    let cfg = format!(
        "{}[pools.slow]\ncommand = [{}, \"exec\", \"--\", \"sleep\", \"30\"]\nworkers = 1\nstop_timeout = \"100ms\"\n",
        echo_cfg(&format!(
            "socket_mode = \"0666\"\nadmin_group = \"{}\"\n",
            admins.name
        )),
        worker_bin()
    );
    let d = Daemon::start("sec-owner", &cfg);
    d.wait_ready("echo", 2);
    let s = d.socket();
    // Bob listens to events from the start.
    let mut events = bob
        .command(bin("jobvisorctl"))
        .args(["--socket", s.to_str().unwrap(), "--json", "events"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("events");
    let r = alice.ctl(&s, &["submit", "echo", "--input", "alice's secret"]);
    assert_eq!(r.code, 0, "{r:?}");
    let a: u64 = r.stdout.trim().parse().unwrap();
    assert_eq!(alice.ctl(&s, &["wait", &a.to_string()]).code, 0);
    let r = alice.ctl(&s, &["result", &a.to_string()]);
    assert_eq!(r.stdout, "alice's secret");
    for args in [
        &["result", &a.to_string()][..],
        &["wait", &a.to_string()],
        &["cancel", &a.to_string()],
        &["retry", &a.to_string()],
    ] {
        let r = bob.ctl(&s, args);
        assert_eq!(r.code, 4, "bob {args:?}: {r:?}");
        assert!(!r.stdout.contains("secret") && !r.stderr.contains("secret"));
        // The same words as for a job that was never submitted.
        assert!(
            r.stderr.contains(&format!("no job {a} (never submitted")),
            "{r:?}"
        );
    }
    let r = bob.ctl(&s, &["--json", "jobs"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!r.stdout.contains(&format!("\"id\":{a},")), "{r:?}");
    // Alice's running and queued jobs (in the daemon's memory, not yet
    // read back from the store) are as invisible.
    let running = alice.ctl(&s, &["submit", "slow", "--input", "1"]);
    let queued = alice.ctl(&s, &["submit", "slow", "--input", "2"]);
    for r in [&running, &queued] {
        assert_eq!(r.code, 0, "{r:?}");
        let id = r.stdout.trim();
        for args in [&["result", id][..], &["cancel", id], &["wait", id]] {
            let r = bob.ctl(&s, args);
            assert_eq!(r.code, 4, "bob {args:?}: {r:?}");
        }
        assert_eq!(d.ctl(&["cancel", id]).code, 0, "root may cancel it");
    }
    // Bob's own job: his events show it, and none of alice's.
    let r = bob.ctl(&s, &["submit", "echo", "--input", "bob's", "--wait"]);
    assert_eq!(r.code, 0, "{r:?}");
    let b = d.submit_id(&["echo", "--input", "root's"]);
    // Lines are read on a thread of their own, so the wait stays bounded
    // if none comes.
    let (tx, rx) = std::sync::mpsc::channel();
    let out = events.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
            let Ok(l) = line else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let bob_job = wait_for("bob's job_finished event", DEADLINE, || {
        let l = rx.recv_timeout(Duration::from_millis(50)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&l).ok()?;
        seen.push(v.clone());
        (v["event"] == "job_finished").then_some(v["job"].as_u64())
    });
    let _ = events.kill();
    let _ = events.wait();
    assert!(bob_job.is_some_and(|j| j != a && j != b), "{seen:?}");
    for v in &seen {
        assert!(
            v["job"].as_u64() != Some(a) && v["job"].as_u64() != Some(b),
            "bob heard of another user's job: {v}"
        );
    }
    // Root and admin_group see alice's job.
    assert_eq!(d.ctl(&["result", &a.to_string()]).stdout, "alice's secret");
    let r = operator.ctl(&s, &["result", &a.to_string()]);
    assert_eq!(r.stdout, "alice's secret", "{r:?}");
    let r = operator.ctl(&s, &["--json", "jobs"]);
    assert!(r.stdout.contains(&format!("\"id\":{a}")), "{r:?}");
    // Bob's prune deletes his finished jobs only; an admin's, anyone's.
    let r = bob.ctl(&s, &["--json", "prune"]);
    assert_eq!((r.code, r.json()["pruned"].as_u64()), (0, Some(1)), "{r:?}");
    assert_eq!(d.ctl(&["result", &a.to_string()]).code, 0, "alice's stays");
    let r = operator.ctl(&s, &["prune", "--pool", "echo"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        d.ctl(&["result", &a.to_string()]).code,
        4,
        "pruned by an admin"
    );
}

/// 300 queued inputs of just under 1 MiB each (300 MiB) do not all live in
/// the daemon's memory, before or after a `kill -9` and restart: past a
/// budget they are kept in payload files, and every job still runs with its
/// own input.
#[test]
fn queued_inputs_under_a_mebibyte_do_not_fill_memory() {
    use jobvisor_client::Connection;
    // The pool's workers never become ready, so every job stays queued
    // until a reload gives it real ones.
    let cfg = |cmd: &str| {
        format!(
            "{}[pools.echo]\ncommand = [{cmd}]\nworkers = 1\nshm_size = \"8MiB\"\nstart_timeout = \"10m\"\n",
            daemon_section()
        )
    };
    let mut d = Daemon::start("sec-spill", &cfg("\"sleep\", \"600\""));
    let n = 300;
    let len = (1 << 20) - 64;
    let input = |i: usize| {
        let mut v = pattern(len);
        v[..8].copy_from_slice(&(i as u64).to_le_bytes());
        v
    };
    let mut c = Connection::connect(&d.socket()).unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        c.send(&Request::Submit {
            pool: "echo".into(),
            input: ipc_proto::Bytes(input(i)),
            options: Default::default(),
            wait: false,
        })
        .unwrap();
        match c.recv().unwrap() {
            Response::Submitted { id } => ids.push(id),
            other => panic!("submit {i}: {other:?}"),
        }
    }
    drop(c);
    assert_rss_bounded(&d, "300 queued inputs of 1 MiB");
    // Again after a restart: recovery does not load them either.
    kill(d.pid(), nix::sys::signal::Signal::SIGKILL);
    d.wait_exit(DEADLINE);
    d.spawn();
    assert_eq!(d.pool("echo")["queued"], n, "every job recovered");
    assert_rss_bounded(&d, "300 recovered inputs of 1 MiB");
    // Let them run: each comes back with its own input.
    d.write_config(&cfg(&format!("{}, \"echo\"", worker_bin())));
    assert_eq!(d.ctl(&["reload"]).code, 0);
    for (i, id) in ids.iter().enumerate() {
        let w = d.ctl(&["wait", &id.to_string()]);
        assert_eq!(w.code, 0, "job {id}: {w:?}");
        if i % 37 == 0 || i == n - 1 {
            let r = d.ctl(&["result", &id.to_string()]);
            assert!(r.raw == input(i), "job {id}'s output is not its input");
        }
    }
    assert_rss_bounded(&d, "after the 300 jobs ran");
}
