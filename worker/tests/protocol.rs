//! Black-box tests of `jobvisor-worker`: the real binary with the daemon's
//! descriptor layout (fd 3 jobs, fd 4 results, fd 5 arena), spoken to over
//! pipes, with deadlines on every wait.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ipc_proto::worker::{FromWorker, Job, Payload, ToWorker};
use ipc_proto::{decode, encode_frame, FrameDecoder, MAX_FRAME_LEN, PROTOCOL_VERSION};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use sha2::{Digest, Sha256};

const DEADLINE: Duration = Duration::from_secs(20);
const BIN: &str = env!("CARGO_BIN_EXE_jobvisor-worker");

/// A copy of `fd` numbered 10 or above, close-on-exec, so that dup2 onto
/// 3/4/5 in the child can never clobber another source descriptor.
fn high_dup(fd: &impl AsFd) -> OwnedFd {
    let raw = fcntl(fd.as_fd(), FcntlArg::F_DUPFD_CLOEXEC(10)).unwrap();
    // SAFETY: `raw` was just returned by F_DUPFD_CLOEXEC: open, owned by
    // nothing else.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

#[path = "support/mem.rs"]
mod mem;
use mem::{pattern, release_of, Mem};

/// A worker process and the daemon's ends of its pipes.
struct Worker {
    child: Option<Child>,
    jobs: Option<File>,
    results: File,
    decoder: FrameDecoder,
    /// The arena, when the worker was given a non-empty one.
    mem: Option<Mem>,
}

impl Worker {
    /// A worker with an empty memfd on fd 5: inline only.
    fn spawn(args: &[&str]) -> Worker {
        Worker::spawn_with(args, 0, None)
    }

    /// A worker with an arena of `shm_size` bytes and that inline limit.
    fn spawn_with_arena(args: &[&str], shm_size: usize, inline_limit: usize) -> Worker {
        Worker::spawn_with(args, shm_size, Some(inline_limit))
    }

    fn spawn_with(args: &[&str], shm_size: usize, inline_limit: Option<usize>) -> Worker {
        let (worker_jobs, jobs) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        let (results, worker_results) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        let arena = nix::sys::memfd::memfd_create(
            "jobvisor-test-arena",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
        )
        .unwrap();
        let mem = (shm_size > 0).then(|| {
            nix::unistd::ftruncate(&arena, shm_size as i64).unwrap();
            Mem::map(&arena, shm_size)
        });
        let sources = [
            high_dup(&worker_jobs),
            high_dup(&worker_results),
            high_dup(&arena),
        ];
        let raw = sources.each_ref().map(AsRawFd::as_raw_fd);
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("JOBVISOR_FDS", "3,4,5")
            .env("JOBVISOR_POOL", "test")
            .env("JOBVISOR_WORKER_ID", "1")
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(limit) = inline_limit {
            cmd.env("JOBVISOR_INLINE_LIMIT", limit.to_string())
                .env("JOBVISOR_SHM_SIZE", shm_size.to_string());
        }
        let place = move || {
            for (target, source) in (3..).zip(raw) {
                // SAFETY: dup2 is async-signal-safe; every source is >= 10, so
                // no target (3, 4, 5) is a source still needed, and the
                // targets come out without close-on-exec.
                if unsafe { libc::dup2(source, target) } < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        };
        // SAFETY: the hook only calls dup2 (async-signal-safe) between fork
        // and exec, and allocates nothing.
        unsafe { cmd.pre_exec(place) };
        let child = cmd.spawn().unwrap();
        // Only the child keeps the worker's ends (sources are close-on-exec
        // copies, dropped here with the originals).
        drop((sources, worker_jobs, worker_results, arena));
        Worker {
            child: Some(child),
            jobs: Some(File::from(jobs)),
            results: File::from(results),
            decoder: FrameDecoder::new(MAX_FRAME_LEN),
            mem,
        }
    }

    fn mem(&self) -> &Mem {
        self.mem.as_ref().expect("spawned without an arena")
    }

    /// Job `id` with `input` written at `offset` of the input region.
    fn shm_job(&self, id: u64, offset: u64, input: &[u8]) -> ToWorker {
        ToWorker::Job(Job {
            id,
            attempt: 1,
            deadline_ms: None,
            input: self.mem().put(offset, input),
        })
    }

    /// The next message, which must be `Done` for `want`, from a worker
    /// with an arena: its payload and its bytes (read from the output region
    /// for `Shm`).
    fn done(&mut self, want: u64) -> (Payload, Vec<u8>) {
        match self.recv() {
            FromWorker::Done { id, output } if id == want => {
                let bytes = self.mem().bytes(&output);
                (output, bytes)
            }
            other => panic!("expected Done for job {want}, got {other:?}"),
        }
    }

    fn release(&mut self, payload: &Payload) {
        let release = release_of(payload)
            .unwrap_or_else(|| panic!("not a shared-memory payload: {payload:?}"));
        self.send(&[release]);
    }

    /// Like `try_recv`, but `None` also when nothing comes within `wait`.
    fn recv_within(&mut self, wait: Duration) -> Option<FromWorker> {
        if let Some(frame) = self.decoder.next_frame().unwrap() {
            return Some(decode(frame).unwrap());
        }
        let mut fds = [PollFd::new(self.results.as_fd(), PollFlags::POLLIN)];
        let n = poll(&mut fds, PollTimeout::try_from(wait).unwrap()).unwrap();
        if n == 0 {
            return None;
        }
        self.try_recv()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn send(&mut self, msgs: &[ToWorker]) {
        let mut buf = Vec::new();
        for m in msgs {
            encode_frame(m, &mut buf).unwrap();
        }
        self.send_raw(&buf);
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.jobs.as_ref().unwrap().write_all(bytes).unwrap();
    }

    fn close_jobs(&mut self) {
        self.jobs = None;
    }

    /// The next message, or `None` at end of stream; panics after DEADLINE.
    fn try_recv(&mut self) -> Option<FromWorker> {
        let until = Instant::now() + DEADLINE;
        loop {
            if let Some(frame) = self.decoder.next_frame().unwrap() {
                return Some(decode(frame).unwrap());
            }
            let left = until.saturating_duration_since(Instant::now());
            let mut fds = [PollFd::new(self.results.as_fd(), PollFlags::POLLIN)];
            let n = poll(&mut fds, PollTimeout::try_from(left).unwrap()).unwrap();
            assert!(n > 0, "no message from the worker within {DEADLINE:?}");
            let n = self.results.read(self.decoder.unfilled()).unwrap();
            if n == 0 {
                return None;
            }
            self.decoder.filled(n);
        }
    }

    fn recv(&mut self) -> FromWorker {
        self.try_recv().expect("worker closed its result pipe")
    }

    /// Waits for exit (panics after DEADLINE); returns status and stderr.
    fn exit(&mut self) -> (ExitStatus, String) {
        wait(self.child.take().unwrap())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for `child` with a deadline; returns its status and its stderr.
fn wait(mut child: Child) -> (ExitStatus, String) {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut err = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            stderr.read_to_string(&mut err).unwrap();
        }
        let _ = tx.send((child.wait().unwrap(), err));
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(result) => result,
        Err(_) => {
            // SAFETY: plain kill(2) of our own unreaped child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!("worker {pid} did not exit within {DEADLINE:?}");
        }
    }
}

fn job(id: u64, input: &[u8]) -> ToWorker {
    ToWorker::Job(Job {
        id,
        attempt: 1,
        deadline_ms: None,
        input: Payload::Inline(input.into()),
    })
}

fn done(id: u64, output: &[u8]) -> FromWorker {
    FromWorker::Done {
        id,
        output: Payload::Inline(output.into()),
    }
}

fn ready(w: &mut Worker) {
    let pid = w.pid();
    assert_eq!(
        w.recv(),
        FromWorker::Ready {
            protocol_version: PROTOCOL_VERSION,
            pid
        }
    );
}

fn error_of(msg: FromWorker, want_id: u64) -> String {
    match msg {
        FromWorker::Failed { id, error } if id == want_id => error,
        other => panic!("expected Failed for job {want_id}, got {other:?}"),
    }
}

#[test]
fn ready_echo_and_shutdown() {
    let mut w = Worker::spawn(&["echo"]);
    ready(&mut w);
    w.send(&[job(1, b"hello"), job(2, b""), job(3, &[0, 255, 10])]);
    assert_eq!(w.recv(), done(1, b"hello"));
    assert_eq!(w.recv(), done(2, b""));
    assert_eq!(w.recv(), done(3, &[0, 255, 10]));
    w.send(&[job(4, b"last"), ToWorker::Shutdown]);
    assert_eq!(w.recv(), done(4, b"last"));
    assert_eq!(w.try_recv(), None);
    let (status, stderr) = w.exit();
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
}

#[test]
fn sha256_of_abc() {
    let mut w = Worker::spawn(&["sha256"]);
    ready(&mut w);
    w.send(&[job(9, b"abc")]);
    assert_eq!(
        w.recv(),
        done(
            9,
            b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        )
    );
}

#[test]
fn exec_pipes_input_through_the_command() {
    let mut w = Worker::spawn(&["exec", "--", "sh", "-c", "tr a-z A-Z"]);
    ready(&mut w);
    w.send(&[job(1, b"hello, world\n")]);
    assert_eq!(w.recv(), done(1, b"HELLO, WORLD\n"));
    // Bigger than any pipe buffer both ways: must not deadlock.
    let big: Vec<u8> = (0..4 << 20).map(|i| b'a' + (i % 26) as u8).collect();
    w.send(&[job(2, &big)]);
    assert_eq!(w.recv(), done(2, &big.to_ascii_uppercase()));
}

#[test]
fn exec_failure_reports_status_and_stderr() {
    let mut w = Worker::spawn(&["exec", "--", "sh", "-c", "echo oops >&2; exit 3"]);
    ready(&mut w);
    w.send(&[job(1, b"ignored input")]);
    let error = error_of(w.recv(), 1);
    assert!(error.contains("exit status 3"), "{error}");
    assert!(error.contains("oops"), "{error}");

    let mut w = Worker::spawn(&["exec", "--", "sh", "-c", "kill -9 $$"]);
    ready(&mut w);
    w.send(&[job(2, b"")]);
    let error = error_of(w.recv(), 2);
    assert!(error.contains("signal 9"), "{error}");

    let mut w = Worker::spawn(&["exec", "--", "/nonexistent/command"]);
    ready(&mut w);
    w.send(&[job(3, b"")]);
    let error = error_of(w.recv(), 3);
    assert!(error.contains("cannot run /nonexistent/command"), "{error}");
}

#[test]
fn exec_cancel_right_after_the_job() {
    let mut w = Worker::spawn(&["exec", "--", "sh", "-c", "exec sleep 60"]);
    ready(&mut w);
    let since = Instant::now();
    w.send(&[job(1, b""), ToWorker::Cancel { id: 1 }]);
    // Cancelled while queued or while running; both long before 60 s.
    assert_eq!(error_of(w.recv(), 1), "cancelled");
    assert!(since.elapsed() < Duration::from_secs(30));
}

#[test]
fn exec_cancel_of_a_running_command() {
    // The command tells us through a FIFO that it runs, then sleeps.
    let dir = std::env::temp_dir().join(format!("jobvisor-worker-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("started");
    let _ = std::fs::remove_file(&fifo);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let script = format!("echo x > '{}'; exec sleep 60", fifo.display());
    let mut w = Worker::spawn(&["exec", "--", "sh", "-c", &script]);
    ready(&mut w);
    let (tx, started) = mpsc::channel();
    let reader_path = fifo.clone();
    thread::spawn(move || {
        let mut s = String::new();
        File::open(reader_path)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        let _ = tx.send(());
    });
    w.send(&[job(2, b"")]);
    started
        .recv_timeout(DEADLINE)
        .expect("command did not start");
    let since = Instant::now();
    w.send(&[ToWorker::Cancel { id: 2 }]);
    assert_eq!(error_of(w.recv(), 2), "cancelled");
    assert!(since.elapsed() < Duration::from_secs(30));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn closing_the_job_pipe_exits_zero() {
    let mut w = Worker::spawn(&["echo"]);
    ready(&mut w);
    w.close_jobs();
    let (status, stderr) = w.exit();
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");

    // Even with a command running: it is cancelled.
    let mut w = Worker::spawn(&["exec", "--", "sh", "-c", "exec sleep 60"]);
    ready(&mut w);
    w.send(&[job(1, b"")]);
    w.close_jobs();
    let (status, stderr) = w.exit();
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
}

#[test]
fn garbage_frame_exits_two() {
    let mut w = Worker::spawn(&["echo"]);
    ready(&mut w);
    w.send_raw(&[4, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    let (status, stderr) = w.exit();
    assert_eq!(status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("protocol error"), "{stderr}");
}

#[test]
fn shared_memory_input_exits_two() {
    let mut w = Worker::spawn(&["echo"]);
    ready(&mut w);
    w.send(&[ToWorker::Job(Job {
        id: 1,
        attempt: 1,
        deadline_ms: None,
        input: Payload::Shm { offset: 0, len: 4 },
    })]);
    let (status, stderr) = w.exit();
    assert_eq!(status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("shared-memory"), "{stderr}");
}

const SHM_SIZE: usize = 4 << 20;
const LIMIT: usize = 4096;
const MIB: usize = 1 << 20;

#[test]
fn echo_round_trips_through_shared_memory() {
    let mut w = Worker::spawn_with_arena(&["echo"], SHM_SIZE, LIMIT);
    ready(&mut w);
    let mut id = 0;
    for round in 0..3 {
        for len in [0, LIMIT - 1, LIMIT, LIMIT + 1, MIB] {
            id += 1;
            let input = pattern(len, id as u8);
            // Inputs over the limit travel as Shm, as the daemon sends them.
            let msg = if len > LIMIT {
                w.shm_job(id, 64 * round, &input)
            } else {
                job(id, &input)
            };
            w.send(&[msg]);
            let (payload, output) = w.done(id);
            assert!(output == input, "{len} bytes: output differs");
            match payload {
                Payload::Inline(_) => assert!(len <= LIMIT, "{len} bytes came back inline"),
                Payload::Shm { len: l, .. } => {
                    assert!(len > LIMIT, "{len} bytes came back in shm");
                    assert_eq!(l, len as u64);
                    w.release(&payload);
                }
                Payload::Fd { .. } => panic!("{len} bytes: a descriptor output, never asked for"),
            }
        }
    }
    // Two 1 MiB jobs in flight at once fill both regions exactly.
    w.send(&[
        w.shm_job(100, 0, &pattern(MIB, 1)),
        w.shm_job(101, MIB as u64, &pattern(MIB, 2)),
    ]);
    let (p1, o1) = w.done(100);
    let (p2, o2) = w.done(101);
    assert!(o1 == pattern(MIB, 1) && o2 == pattern(MIB, 2));
    w.release(&p1);
    w.release(&p2);
    w.send(&[ToWorker::Shutdown]);
    assert_eq!(w.try_recv(), None);
    let (status, stderr) = w.exit();
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
}

#[test]
fn echo_waits_for_release_when_the_output_region_is_full() {
    let mut w = Worker::spawn_with_arena(&["echo"], SHM_SIZE, LIMIT);
    ready(&mut w);
    // Three 700 KiB outputs do not fit in the 2 MiB output region at once.
    let inputs: Vec<Vec<u8>> = (1..=3).map(|i| pattern(700 << 10, i)).collect();
    w.send(&[job(1, &inputs[0]), job(2, &inputs[1]), job(3, &inputs[2])]);
    let (p1, o1) = w.done(1);
    let (p2, o2) = w.done(2);
    assert!(o1 == inputs[0] && o2 == inputs[1]);
    assert_eq!(w.recv_within(Duration::from_millis(300)), None);
    w.release(&p1);
    let (p3, o3) = w.done(3);
    assert!(matches!(p3, Payload::Shm { .. }), "{p3:?}");
    assert!(o3 == inputs[2]);
    w.release(&p2);
    w.release(&p3);
    w.close_jobs();
    let (status, stderr) = w.exit();
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
}

#[test]
fn sha256_of_a_shared_memory_input() {
    let mut w = Worker::spawn_with_arena(&["sha256"], SHM_SIZE, LIMIT);
    ready(&mut w);
    let input = pattern(MIB, 9);
    let expected: String = Sha256::digest(&input)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    w.send(&[w.shm_job(1, 4096, &input)]);
    assert_eq!(w.recv(), done(1, expected.as_bytes()));
}

#[test]
fn bad_shared_memory_references_exit_two() {
    // An input reference into the output region.
    let mut w = Worker::spawn_with_arena(&["echo"], SHM_SIZE, LIMIT);
    ready(&mut w);
    w.send(&[ToWorker::Job(Job {
        id: 1,
        attempt: 1,
        deadline_ms: None,
        input: Payload::Shm {
            offset: (SHM_SIZE / 2) as u64,
            len: 10,
        },
    })]);
    let (status, stderr) = w.exit();
    assert_eq!(status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("bad shared-memory input"), "{stderr}");

    // A Release of a range never handed out.
    let mut w = Worker::spawn_with_arena(&["echo"], SHM_SIZE, LIMIT);
    ready(&mut w);
    w.send(&[ToWorker::Release {
        offset: (SHM_SIZE / 2) as u64,
        len: 5000,
    }]);
    let (status, stderr) = w.exit();
    assert_eq!(status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("Release of 5000 bytes"), "{stderr}");
}

#[test]
fn closed_result_pipe_exits_one() {
    let mut w = Worker::spawn(&["echo"]);
    ready(&mut w);
    let Worker { results, .. } = &mut w;
    // Replace our read end with a closed one: the worker's next write fails.
    let (r, _) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    drop(std::mem::replace(results, File::from(r)));
    // Another test's fork may hold a copy of the old read end for a moment
    // (close-on-exec acts only at exec), and a write while it does succeeds:
    // keep sending jobs until one makes the worker exit.
    let mut writer = w.jobs.take().unwrap();
    let feeder = thread::spawn(move || {
        for id in 1..=1000 {
            let mut frame = Vec::new();
            encode_frame(&job(id, b"x"), &mut frame).unwrap();
            if writer.write_all(&frame).is_err() {
                return; // EPIPE: the worker is gone
            }
            thread::sleep(Duration::from_millis(20));
        }
    });
    let (status, stderr) = w.exit();
    feeder.join().unwrap();
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert!(
        status.signal().is_none(),
        "killed by SIGPIPE instead of EPIPE"
    );
}

#[test]
fn outside_a_daemon_exits_two_with_one_line() {
    let child = Command::new(BIN)
        .arg("echo")
        .env_remove("JOBVISOR_FDS")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, stderr) = wait(child);
    assert_eq!(status.code(), Some(2));
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("jobvisord"), "{stderr}");

    // JOBVISOR_FDS set, but fd 3/4 not open (spawned without them).
    let child = Command::new(BIN)
        .arg("echo")
        .env("JOBVISOR_FDS", "3,4,5")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (status, stderr) = wait(child);
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("jobvisord"), "{stderr}");
}

#[test]
fn usage_errors() {
    let run = |args: &[&str]| {
        let child = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait(child)
    };
    let (status, _) = run(&["--help"]);
    assert_eq!(status.code(), Some(0));
    for bad in [&[][..], &["frobnicate"], &["exec"], &["echo", "extra"]] {
        let (status, stderr) = run(bad);
        assert_eq!(status.code(), Some(2), "{bad:?}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{bad:?}: {stderr}");
    }
    let (_, stderr) = run(&["frobnicate"]);
    assert!(stderr.contains("echo, sha256, exec"), "{stderr}");
}

/// Throughput through the real binary, `prefetch`-style: a window of jobs in
/// flight (`BENCH_WINDOW`, default 256).
/// Run with `cargo test --release -p worker --test protocol -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_echo_throughput() {
    const N: u64 = 1_000_000;
    let window: u64 = std::env::var("BENCH_WINDOW").map_or(256, |w| w.parse().unwrap());
    let credit_every = (window / 4).max(1);
    let mut w = Worker::spawn(&["echo"]);
    ready(&mut w);
    let mut writer = w.jobs.as_ref().unwrap().try_clone().unwrap();
    let (credit_tx, credit) = mpsc::channel::<u64>();
    let started = Instant::now();
    let feeder = thread::spawn(move || {
        let mut sent = 0;
        let mut buf = Vec::new();
        let mut allowed = window;
        while sent < N {
            buf.clear();
            while sent < allowed.min(N) {
                sent += 1;
                encode_frame(&job(sent, b"tiny"), &mut buf).unwrap();
            }
            writer.write_all(&buf).unwrap();
            let Ok(done) = credit.recv() else { return };
            allowed = done + window;
            while let Ok(done) = credit.try_recv() {
                allowed = done + window;
            }
        }
    });
    for i in 1..=N {
        match w.recv() {
            FromWorker::Done { .. } => {}
            other => panic!("{other:?}"),
        }
        if i % credit_every == 0 {
            let _ = credit_tx.send(i);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    drop(credit_tx);
    feeder.join().unwrap();
    println!("{N} jobs in {secs:.2}s: {:.0} jobs/s", N as f64 / secs);
}
