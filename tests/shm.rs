//! Shared-memory payloads between the daemon and its workers: sizes around
//! `inline_limit` round-trip bit-exact, a lying worker is restarted and the
//! job retried, and a full arena makes jobs wait instead of failing.

use jobvisor::*;
use nix::sys::signal::Signal;

fn cfg(extra_echo: &str) -> String {
    format!(
        "{}[pools.echo]\ncommand = [{w}, \"echo\"]\nworkers = 2\ninline_limit = \"4KiB\"\nshm_size = \"16MiB\"\n{extra_echo}\n[pools.sha256]\ncommand = [{w}, \"sha256\"]\nworkers = 1\ninline_limit = \"4KiB\"\nshm_size = \"16MiB\"\n",
        daemon_section(),
        w = worker_bin()
    )
}

/// `map POOL --ordered` of `input` (its `lines`, newline-terminated) must
/// give back every line whole and in order.
fn map_ordered_round_trip(d: &Daemon, pool: &str, input: &str, lines: &[String]) {
    let r = d.ctl_stdin(&["map", pool, "--ordered"], Some(input.as_bytes()));
    assert_eq!(r.code, 0, "{}", r.stderr);
    let got: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(got.len(), lines.len());
    for (i, (g, want)) in got.iter().zip(lines).enumerate() {
        assert!(
            g == want,
            "line {i}: {} bytes, want {}",
            g.len(),
            want.len()
        );
    }
}

#[test]
fn payloads_around_inline_limit_round_trip_bit_exact() {
    let d = Daemon::start("shm-sizes", &cfg(""));
    d.wait_ready("echo", 2);
    d.wait_ready("sha256", 1);
    let limit = 4096usize;
    for n in [0, limit - 1, limit, limit + 1, 1 << 20, 3 << 20] {
        let data = pattern(n);
        let f = d.dir.path().join(format!("in-{n}"));
        std::fs::write(&f, &data).unwrap();
        let file = f.to_str().unwrap();
        let r = d.ctl(&["submit", "echo", "--wait", "--input-file", file]);
        assert_eq!(r.code, 0, "echo {n}: {}", r.stderr);
        assert!(
            r.raw == data,
            "echo of {n} bytes differs (got {} bytes)",
            r.raw.len()
        );
        let r = d.ctl(&["submit", "sha256", "--wait", "--input-file", file]);
        assert_eq!(r.code, 0, "sha256 {n}: {}", r.stderr);
        assert_eq!(r.stdout, sha256sum(&f), "sha256 of {n} bytes");
    }
    // The large ones really went through the arena, both ways.
    assert!(
        d.log_text()
            .contains(&format!("{}-byte output through shared memory", 1 << 20)),
        "no shared-memory output in the log"
    );
    // Nothing was retried: every job took one attempt.
    let r = d.ctl(&["--json", "jobs"]);
    for j in r.json_list() {
        assert_eq!(j["attempts"].as_array().unwrap().len(), 1, "{j}");
    }
}

#[test]
fn an_input_larger_than_the_arena_is_refused() {
    let d = Daemon::start("shm-too-big", &cfg(""));
    d.wait_ready("echo", 2);
    let f = d.dir.path().join("big");
    std::fs::write(&f, pattern(6 << 20)).unwrap();
    // shm_size 16 MiB: the daemon's input half is 8 MiB.
    let file = f.to_str().unwrap();
    let r = d.ctl(&["submit", "echo", "--wait", "--input-file", file]);
    assert_eq!(r.code, 0, "6 MiB fits the 8 MiB half: {}", r.stderr);
    assert_eq!(r.raw.len(), 6 << 20);
    let big = d.dir.path().join("bigger");
    std::fs::write(&big, pattern(9 << 20)).unwrap();
    let file = big.to_str().unwrap();
    let r = d.ctl(&["submit", "echo", "--wait", "--input-file", file]);
    let err = &r.stderr;
    assert_eq!(r.code, 2, "{err}");
    assert!(err.contains("shm_size"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn a_bad_shared_memory_reference_restarts_the_worker_and_retries() {
    let cfg = format!(
        "{}[pools.liar]\ncommand = [{}, \"badshm\"]\nworkers = 1\nbackoff_initial = \"0s\"\n",
        daemon_section(),
        test_worker()
    );
    let d = Daemon::start("shm-liar", &cfg);
    let pid = d.wait_ready("liar", 1)[0];
    let r = d.ctl(&["--json", "submit", "liar", "--input", "truth", "--wait"]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(j["output"], "truth");
    assert_eq!(j["attempts"].as_array().unwrap().len(), 2, "{j}");
    assert_eq!(j["attempts"][0]["outcome"], "lost");
    assert!(!alive(pid));
    assert!(d.log_text().contains("bad shared-memory output"));
}

/// A worker cannot shrink its arena under the daemon (a shrunk memfd would
/// make the daemon's next access to its mapping a SIGBUS): the memfd is
/// sealed, and large payloads keep flowing.
#[test]
fn a_worker_cannot_shrink_its_arena() {
    let cfg = format!(
        "{}[pools.shrink]\ncommand = [{}, \"shrink\"]\nworkers = 1\n",
        daemon_section(),
        test_worker()
    );
    let d = Daemon::start("shm-shrink", &cfg);
    let pid = d.wait_ready("shrink", 1)[0];
    let r = d.ctl(&["submit", "shrink", "--input", "shrink", "--wait"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(
        r.stdout,
        "ftruncate: refused (Operation not permitted (os error 1))"
    );
    let f = d.dir.path().join("in");
    let data = pattern(2 << 20);
    std::fs::write(&f, &data).unwrap();
    let file = f.to_str().unwrap();
    for _ in 0..2 {
        let r = d.ctl(&["submit", "shrink", "--wait", "--input-file", file]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(r.raw == data, "bit-exact through the arena");
    }
    assert!(
        alive(d.pid()) && alive(pid),
        "the daemon and the worker live on"
    );
}

/// A `SubmitFd` is a request like any other: before `Hello` it is refused
/// and the connection closed, and nothing is submitted.
#[test]
fn a_submit_fd_before_hello_is_refused() {
    use ipc_proto::control::{JobOptions, Request, Response};
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let d = Daemon::start("shm-nohello", &cfg(""));
    d.wait_ready("echo", 2);
    let input = d.dir.path().join("in");
    std::fs::write(&input, pattern(2 << 20)).unwrap();
    let file = std::fs::File::open(&input).unwrap();
    let mut frame = Vec::new();
    let req = Request::SubmitFd {
        pool: "echo".into(),
        len: 2 << 20,
        options: JobOptions::default(),
        wait: false,
    };
    ipc_proto::encode_frame(&req, &mut frame).unwrap();
    let mut sock = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
    let fds = [file.as_raw_fd()];
    let sent = sendmsg::<()>(
        sock.as_raw_fd(),
        &[std::io::IoSlice::new(&frame)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .unwrap();
    assert_eq!(sent, frame.len());
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut answer = Vec::new();
    sock.read_to_end(&mut answer).unwrap(); // the daemon closes the connection
    let resp: Response = ipc_proto::decode(&answer[4..]).unwrap();
    match resp {
        Response::Error { message, .. } => {
            assert_eq!(message, "the first request must be Hello")
        }
        other => panic!("{other:?}"),
    }
    let p = d.pool("echo");
    assert_eq!(
        (p["queued"].as_u64(), p["succeeded"].as_u64()),
        (Some(0), Some(0)),
        "{p}"
    );
    assert_eq!(
        d.ctl(&["jobs"]).stdout,
        "no jobs\n",
        "nothing was submitted"
    );
}

/// One worker whose input half (128 KiB) holds one 100 KiB input at a
/// time, and prefetch allowing 8 in flight: the 12 lines of one `map` reach
/// the daemon together, so most jobs find the arena full and must wait
/// their turn for it (back off) instead of failing.
#[test]
fn a_full_arena_backs_off_instead_of_failing() {
    let cfg = format!(
        "{}[pools.echo]\ncommand = [{}, \"echo\"]\nworkers = 1\nprefetch = 8\ninline_limit = \"1KiB\"\nshm_size = \"256KiB\"\n",
        daemon_section(),
        worker_bin()
    );
    let d = Daemon::start("shm-full", &cfg);
    d.wait_ready("echo", 1);
    let mut input = String::new();
    let mut lines = Vec::new();
    for i in 0..12usize {
        // 100 KiB of one letter: over inline_limit, and two of them do not
        // fit the input half together. The index makes each line its own.
        let c = (b'a' + i as u8) as char;
        let line = format!("{i}:{}", c.to_string().repeat(100 << 10));
        input.push_str(&line);
        input.push('\n');
        lines.push(line);
    }
    map_ordered_round_trip(&d, "echo", &input, &lines);
    // Waiting for room is not a failure: one attempt each, no restart.
    let r = d.ctl(&["--json", "jobs"]);
    assert_eq!(r.code, 0, "{r:?}");
    let jobs: Vec<serde_json::Value> = r.json_list();
    assert_eq!(jobs.len(), lines.len(), "{}", r.stdout);
    for j in &jobs {
        assert_eq!(j["state"], "succeeded", "{j}");
        assert_eq!(j["attempts"].as_array().unwrap().len(), 1, "{j}");
    }
    assert_eq!(d.pool("echo")["workers"][0]["restarts"], 0);
}

/// 64 MiB both ways: the input crosses the control socket as a file
/// descriptor (the user's file itself, or a memfd filled from stdin), the
/// worker's arena both ways, and the output comes back as a descriptor
/// streamed to stdout (a pipe here). Bit-exact through `echo`, and
/// `sha256` agrees with `sha256sum`.
#[test]
fn sixty_four_mib_round_trips_bit_exact_through_file_stdin_and_result() {
    let n = 64 << 20;
    let cfg = format!(
        "{}[pools.echo]\ncommand = [{w}, \"echo\"]\nworkers = 1\nshm_size = \"160MiB\"\n[pools.sha256]\ncommand = [{w}, \"sha256\"]\nworkers = 1\nshm_size = \"160MiB\"\n",
        daemon_section(),
        w = worker_bin()
    );
    let d = Daemon::start("shm-64m", &cfg);
    d.wait_ready("echo", 1);
    d.wait_ready("sha256", 1);
    let data = pattern(n);
    let f = d.dir.path().join("in-64m");
    std::fs::write(&f, &data).unwrap();

    let file = f.to_str().unwrap();
    let r = d.ctl(&["submit", "echo", "--wait", "--input-file", file]);
    assert_eq!(r.code, 0, "echo --input-file: {}", r.stderr);
    assert!(
        r.raw == data,
        "echo of 64 MiB differs (got {} bytes)",
        r.raw.len()
    );

    let r = d.ctl_stdin(&["submit", "echo", "--wait", "-"], Some(&data));
    assert_eq!(r.code, 0, "echo from stdin: {}", r.stderr);
    assert!(
        r.raw == data,
        "echo of 64 MiB from stdin differs (got {} bytes)",
        r.raw.len()
    );

    let r = d.ctl(&["submit", "sha256", "--wait", "--input-file", file]);
    assert_eq!(r.code, 0, "sha256: {}", r.stderr);
    assert_eq!(r.stdout, sha256sum(&f));

    // Without --wait, then `result`: the stored output, streamed again.
    let r = d.ctl(&["submit", "echo", "--input-file", file]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let id = String::from_utf8(r.raw).unwrap().trim().to_string();
    let r = d.ctl(&["wait", &id]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = d.ctl(&["result", &id]);
    assert_eq!(r.code, 0, "result: {}", r.stderr);
    assert!(
        r.raw == data,
        "result of 64 MiB differs (got {} bytes)",
        r.raw.len()
    );

    // A pipe named as the input file (not a regular file): read like
    // stdin, into a memfd.
    let small = pattern(3 << 20);
    let r = d.ctl_stdin(
        &["submit", "echo", "--wait", "--input-file", "/dev/stdin"],
        Some(&small),
    );
    assert_eq!(r.code, 0, "echo from a pipe as --input-file: {}", r.stderr);
    assert!(r.raw == small, "3 MiB through a piped --input-file differs");

    // --json takes the output from the descriptor into the document.
    let small = pattern(2 << 20);
    let g = d.dir.path().join("in-2m");
    std::fs::write(&g, &small).unwrap();
    let r = d.ctl(&[
        "--json",
        "submit",
        "echo",
        "--wait",
        "--input-file",
        g.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc: serde_json::Value = serde_json::from_slice(&r.raw).unwrap();
    assert_eq!(doc["state"], "succeeded");
    let b64 = doc["output_b64"].as_str().expect("binary output as base64");
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("valid base64");
    assert!(decoded == small, "the --json output differs from the input");
}

/// Large and small jobs interleaved on one worker with several in flight:
/// the big copies run off the event loop, and neither the frames queued
/// behind a copy into the arena nor the results received behind a copy out
/// of it may overtake it. Every output must come back whole, to its job.
#[test]
fn interleaved_big_and_small_jobs_keep_their_order_through_offloaded_copies() {
    let cfg = format!(
        "{}[pools.echo]\ncommand = [{w}, \"echo\"]\nworkers = 1\nprefetch = 8\ninline_limit = \"4KiB\"\nshm_size = \"64MiB\"\n",
        daemon_section(),
        w = worker_bin()
    );
    let d = Daemon::start("shm-interleave", &cfg);
    d.wait_ready("echo", 1);
    let mut input = String::new();
    let mut lines = Vec::new();
    for i in 0..60usize {
        // 0.5-1.5 MiB lines (copied off the loop) between tiny ones.
        let line = if i % 3 == 0 {
            let n = (512 << 10) + (i << 14);
            let c = (b'a' + (i % 26) as u8) as char;
            format!("{i}:{}", c.to_string().repeat(n))
        } else {
            format!("{i}:small")
        };
        input.push_str(&line);
        input.push('\n');
        lines.push(line);
    }
    map_ordered_round_trip(&d, "echo", &input, &lines);
    // One attempt each: no worker was restarted on the way.
    assert_eq!(d.pool("echo")["workers"][0]["restarts"], 0);
}

/// A large input is as durable as a small one: a job held in the queue
/// (its key is taken by a long job in another pool) survives `kill -9` of
/// the daemon, with its input in a payload file under `payload_dir`, and
/// then runs to a bit-exact result. A payload file that went missing while
/// the daemon was down (a tmpfs after a reboot) makes its job `dead` with a
/// clear error instead of breaking the store.
#[test]
fn large_payloads_survive_kill9_and_a_lost_payload_file_is_a_clear_error() {
    let cfg = format!(
        "[daemon]\ncontrol_socket = \"ctl.sock\"\nstate_dir = \"state\"\npayload_dir = \"big\"\n\
         [pools.echo]\ncommand = [{w}, \"echo\"]\nworkers = 1\nshm_size = \"64MiB\"\n\
         [pools.slow]\ncommand = [{t}, \"sleep\"]\nworkers = 1\n",
        w = worker_bin(),
        t = test_worker()
    );
    let mut d = Daemon::start("shm-durable", &cfg);
    d.wait_ready("echo", 1);
    d.wait_ready("slow", 1);
    let blocker = d.hold_key_k();
    let data = pattern(5 << 20);
    let f = d.dir.path().join("in-5m");
    std::fs::write(&f, &data).unwrap();
    let kept = d.submit_id(&["echo", "--key", "k", "--input-file", f.to_str().unwrap()]);
    let lost = d.submit_id(&["echo", "--key", "k", "--input-file", f.to_str().unwrap()]);
    let payloads = d.dir.path().join("big");
    for id in [kept, lost] {
        let p = payloads.join(format!("{id}.in"));
        assert_eq!(
            std::fs::metadata(&p).map(|m| m.len()).ok(),
            Some(data.len() as u64),
            "{} holds the acknowledged input",
            p.display()
        );
    }

    kill(d.pid(), Signal::SIGKILL);
    d.wait_exit(DEADLINE);
    std::fs::remove_file(payloads.join(format!("{lost}.in"))).unwrap();
    d.spawn();
    d.wait_ready("echo", 1);
    // The blocker was requeued (lost attempt); cancel it to free the key.
    assert_eq!(d.ctl(&["cancel", &blocker.to_string()]).code, 0);
    let r = d.ctl(&["wait", &kept.to_string()]);
    assert_eq!(r.code, 0, "{} {}", r.stderr, r.stdout);
    let r = d.ctl(&["result", &kept.to_string()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.raw == data,
        "recovered job's output differs ({} bytes)",
        r.raw.len()
    );
    assert!(
        !payloads.join(format!("{kept}.in")).exists(),
        "an ended job's input file is not kept"
    );

    let r = d.ctl(&["--json", "result", &lost.to_string()]);
    assert_eq!(r.code, 1, "{r:?}");
    let j = r.json();
    assert_eq!(j["state"], "dead", "{j}");
    let e = j["error"].as_str().unwrap();
    assert!(
        e.contains(&format!("{lost}.in")) && e.contains("missing"),
        "{e}"
    );
    assert!(alive(d.pid()));
}

/// Names in `dir` with the given extension.
fn files_ending(dir: &std::path::Path, ext: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(ext))
        .collect();
    names.sort();
    names
}

/// The input file of a job that ended leaves the payload directory (its
/// pages are kept as a spare for the next payload file); outputs stay for
/// `result`, bit-exact, never overwritten by a recycled file; spares stay
/// within their bounds and go at the next start.
#[test]
fn ended_inputs_are_recycled_and_outputs_stay() {
    use std::os::unix::fs::PermissionsExt;
    let cfg = format!(
        "{}[pools.echo]\ncommand = [{}, \"echo\"]\nworkers = 1\n",
        daemon_section(),
        worker_bin()
    );
    let mut d = Daemon::start("shm-spares", &cfg);
    d.wait_ready("echo", 1);
    let payloads = d.dir.path().join("state/payloads");
    let spare = payloads.join(".spare");
    let mut ids = Vec::new();
    for i in 0..6 {
        let f = d.dir.path().join(format!("in-{i}"));
        std::fs::write(&f, pattern((2 << 20) + i)).unwrap();
        let id = d.submit_id(&["echo", "--input-file", f.to_str().unwrap()]);
        let r = d.ctl(&["wait", &id.to_string()]);
        assert_eq!(r.code, 0, "{} {}", r.stderr, r.stdout);
        ids.push(id);
    }
    assert_eq!(files_ending(&payloads, ".in"), Vec::<String>::new());
    assert_eq!(files_ending(&payloads, ".out").len(), ids.len());
    for (i, id) in ids.iter().enumerate() {
        let r = d.ctl(&["result", &id.to_string()]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(r.raw == pattern((2 << 20) + i), "job {id}'s output differs");
    }
    let mode = std::fs::metadata(&spare).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    let spares: Vec<u64> = std::fs::read_dir(&spare)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .collect();
    // At most 4 spares of 256 MiB in all (one more may be in the middle
    // of being made by the background filler).
    assert!(!spares.is_empty() && spares.len() <= 5, "{spares:?}");
    assert!(
        spares.iter().sum::<u64>() <= (256 << 20) + (3 << 20),
        "{spares:?}"
    );

    kill(d.pid(), Signal::SIGKILL);
    d.wait_exit(DEADLINE);
    d.spawn();
    d.wait_ready("echo", 1);
    assert_eq!(
        std::fs::read_dir(&spare).unwrap().count(),
        0,
        "spares go at start"
    );
    let r = d.ctl(&["result", &ids[0].to_string()]);
    assert!(r.code == 0 && r.raw == pattern(2 << 20));
}

/// Queued large jobs cost the daemon no memory for their inputs: once a
/// submit is acknowledged its input lives only in its payload file, which
/// is read straight into a worker's arena when the job runs. A payload file
/// that disappears meanwhile fails that one job with a message naming the
/// file; the worker (which never saw the job) and the other jobs carry on.
#[test]
fn queued_large_inputs_live_in_their_files_not_in_memory() {
    let cfg = format!(
        "{}[pools.echo]\ncommand = [{w}, \"echo\"]\nworkers = 1\nshm_size = \"128MiB\"\n\
         [pools.slow]\ncommand = [{t}, \"sleep\"]\nworkers = 1\n",
        daemon_section(),
        w = worker_bin(),
        t = test_worker()
    );
    let d = Daemon::start("shm-queued-files", &cfg);
    d.wait_ready("echo", 1);
    d.wait_ready("slow", 1);
    let blocker = d.hold_key_k();
    let size = 40 << 20;
    let before = rss_kib(d.pid());
    let mut ids = Vec::new();
    for i in 0..4 {
        let f = d.dir.path().join(format!("in-{i}"));
        std::fs::write(&f, pattern(size + i)).unwrap();
        ids.push(d.submit_id(&["echo", "--key", "k", "--input-file", f.to_str().unwrap()]));
    }
    assert_eq!(d.pool("echo")["queued"], 4);
    let grown = rss_kib(d.pid()).saturating_sub(before);
    assert!(
        grown < 64 << 10,
        "4 queued 40 MiB jobs grew the daemon by {grown} KiB: their inputs stayed in memory"
    );
    let gone = d.dir.path().join(format!("state/payloads/{}.in", ids[1]));
    std::fs::remove_file(&gone).unwrap();
    assert_eq!(d.ctl(&["cancel", &blocker.to_string()]).code, 0);
    for (i, id) in ids.iter().enumerate() {
        let r = d.ctl(&["wait", &id.to_string()]);
        if i == 1 {
            assert_eq!(r.code, 1, "{}", r.stderr);
            continue;
        }
        assert_eq!(r.code, 0, "job {id}: {} {}", r.stderr, r.stdout);
        let r = d.ctl(&["result", &id.to_string()]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert!(r.raw == pattern(size + i), "job {id}'s output differs");
    }
    let j = d.ctl(&["--json", "result", &ids[1].to_string()]).json();
    assert_eq!(j["state"], "failed", "{j}");
    let e = j["error"].as_str().unwrap();
    assert!(e.contains(gone.to_str().unwrap()), "{e}");
    assert_eq!(d.pool("echo")["workers"][0]["restarts"], 0);
    // A finished job's output file removed behind the daemon's back:
    // `result` says so instead of failing obscurely.
    let out = d.dir.path().join(format!("state/payloads/{}.out", ids[0]));
    std::fs::remove_file(&out).unwrap();
    let r = d.ctl(&["--json", "result", &ids[0].to_string()]);
    let j = r.json();
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(j["output"].is_null() && j["output_b64"].is_null(), "{j}");
    let e = j["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("missing") && e.contains(out.to_str().unwrap()),
        "{j}"
    );
    let r = d.ctl(&["result", &ids[0].to_string()]);
    assert_eq!(r.code, 1, "not an empty output: {r:?}");
    assert!(
        r.stdout.is_empty() && r.stderr.contains("output is lost"),
        "{r:?}"
    );
}

/// Workers dying (abort) with large payloads in flight: copies into and
/// out of the dead worker's arena settle before its death is handled, the
/// jobs it held are retried, and every output still comes back whole, in
/// order, to its own job.
#[test]
fn large_payloads_survive_worker_crashes_mid_copy() {
    let cfg = format!(
        "{}[pools.chaos]\ncommand = [{t}, \"chaos\", \"10\"]\nworkers = 2\nprefetch = 4\n\
         inline_limit = \"4KiB\"\nshm_size = \"32MiB\"\nbackoff_initial = \"0s\"\n\
         max_restarts = 100000\n",
        daemon_section(),
        t = test_worker()
    );
    let d = Daemon::start("shm-chaos", &cfg);
    d.wait_ready("chaos", 2);
    let mut input = String::new();
    let mut lines = Vec::new();
    for i in 0..120usize {
        // 300 KiB to 1.5 MiB: copied off the loop; from 1 MiB also stored
        // as payload files.
        let n = (300 << 10) + (i % 13) * (100 << 10);
        let c = (b'a' + (i % 26) as u8) as char;
        let line = format!("{i}:{}", c.to_string().repeat(n));
        input.push_str(&line);
        input.push('\n');
        lines.push(line);
    }
    map_ordered_round_trip(&d, "chaos", &input, &lines);
    let restarts: u64 = d.pool("chaos")["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["restarts"].as_u64().unwrap())
        .sum();
    assert!(
        restarts >= 3,
        "the chaos worker should have died a few times ({restarts})"
    );
}
