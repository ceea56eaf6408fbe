//! The Python package (`python/`): its codec unit tests, a
//! `python3 -m jobvisor.worker MODULE:FUNC` pool driven by `jobvisorctl`
//! (setup, failures, ordering, shared-memory payloads, `kill -9`), and
//! `jobvisor.Client` / `jobvisor.Executor` against a real daemon.

use jobvisor::*;
use nix::sys::signal::Signal;
use std::process::Command;

/// `<repo>/python`.
fn python_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// `python3 ARGS` as a client of `d`: the package and the modules of the
/// test's directory importable, `JOBVISOR_SOCKET` set.
fn python_client(d: &Daemon, args: &[&str]) -> std::process::Output {
    Command::new("python3")
        .args(args)
        .env(
            "PYTHONPATH",
            format!("{}:{}", python_dir().display(), d.dir.path().display()),
        )
        .env("JOBVISOR_SOCKET", d.socket())
        .output()
        .expect("python3 (the CI script installs it)")
}

/// The `env` of a pool whose workers import the package and modules in `dir`.
fn pool_env(dir: &std::path::Path) -> String {
    format!(
        "env = {{ PYTHONPATH = \"{}:{}\" }}\n",
        python_dir().display(),
        dir.display()
    )
}

const JOBS_PY: &str = r#"
import os, time
SETUP = []

def setup():
    SETUP.append(os.getpid())

def handle(data):
    if len(data) > 1000:
        return bytes(reversed(data))        # large: through the arena
    text = bytes(data).decode()
    if text.startswith("fail"):
        raise ValueError("asked to fail")
    if text == "int":
        return 42
    if text.startswith("sleep:"):
        time.sleep(float(text[6:]))
        return "slept"
    return f"{text.upper()} setup={len(SETUP)}"
"#;

#[test]
fn the_python_package_tests_pass() {
    // Codec and worker unit tests, and the embedded Executor and Pool run
    // as scripts against the daemon built here (python/tests/).
    let bin_dir = bin("jobvisord");
    let o = Command::new("python3")
        .args(["-m", "unittest", "discover", "-s", "tests"])
        .current_dir(python_dir())
        .env("JOBVISOR_BIN_DIR", bin_dir.parent().expect("a directory"))
        .env("JOBVISOR_REQUIRE_BINARIES", "1")
        .output()
        .expect("python3 (the CI script installs it)");
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("OK"), "{text}");
}

#[test]
fn a_python_module_function_serves_a_pool() {
    let mut d = Daemon::prepare("py-worker", "");
    std::fs::write(d.dir.path().join("jobs.py"), JOBS_PY).unwrap();
    let cfg = format!(
        "{}[pools.py]\ncommand = [\"python3\", \"-m\", \"jobvisor.worker\", \"jobs:handle\"]\nworkers = 1\nprefetch = 4\ninline_limit = \"1KiB\"\nshm_size = \"8MiB\"\nbackoff_initial = \"0s\"\nstop_timeout = \"60s\"\n{}",
        daemon_section(),
        pool_env(d.dir.path())
    );
    d.write_config(&cfg);
    d.spawn();
    let pid = d.wait_ready("py", 1)[0];

    // setup() ran once, before Ready.
    let r = d.ctl(&["submit", "py", "--input", "hello", "--wait"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "HELLO setup=1"), "{r:?}");
    // An exception fails the job (exit 1), names it, and the worker lives on.
    let r = d.ctl(&["--json", "submit", "py", "--input", "fail now", "--wait"]);
    assert_eq!(r.code, 1, "{r:?}");
    let j = r.json();
    assert_eq!(j["state"], "failed");
    assert_eq!(j["error"], "ValueError: asked to fail");
    // Prefetched jobs come back in order.
    let lines: String = (0..100).map(|i| format!("line {i}\n")).collect();
    let r = d.ctl_stdin(&["map", "py", "--ordered"], Some(lines.as_bytes()));
    assert_eq!(r.code, 0, "{r:?}");
    let expected: String = (0..100).map(|i| format!("LINE {i} setup=1\n")).collect();
    assert_eq!(r.stdout, expected);
    // Over inline_limit both ways: a read-only view of the arena in, the
    // output through the arena back; bit-exact.
    for size in [1025, 100_000, 3 << 20] {
        let input = pattern(size);
        let f = d.dir.path().join("in");
        std::fs::write(&f, &input).unwrap();
        let file = f.to_str().unwrap();
        let r = d.ctl(&["submit", "py", "--wait", "--input-file", file]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let mut want = input.clone();
        want.reverse();
        assert!(r.raw == want, "{size} bytes: output differs");
    }
    assert_eq!(d.pool("py")["workers"][0]["pid"], pid, "no restart so far");

    // kill -9 mid-job: the attempt is lost, the job runs again and succeeds.
    let r = d.ctl(&["submit", "py", "--input", "sleep:30"]);
    assert_eq!(r.code, 0, "{r:?}");
    let id = r.stdout.trim().to_string();
    wait_for("the sleep job to run", DEADLINE, || {
        (d.ctl(&["--json", "result", &id]).json()["state"] == "running").then_some(())
    });
    kill(pid, Signal::SIGKILL);
    wait_for("a new worker", DEADLINE, || {
        let p = d.pool("py");
        let w = &p["workers"][0];
        (w["state"] != "starting" && w["pid"].as_u64().is_some_and(|p| p as u32 != pid))
            .then_some(())
    });
    // The retry sleeps 30 s too: cancel it. The worker stops the running
    // call and lives on (had it ignored the cancel, the daemon would have
    // replaced it after stop_timeout: a new pid).
    let running = wait_for("the retry to run", DEADLINE, || {
        let j = d.ctl(&["--json", "result", &id]).json();
        (j["state"] == "running").then_some(j)
    });
    assert_eq!(running["attempts"][0]["outcome"], "lost", "{running}");
    let pid = running["attempts"][1]["pid"].as_u64().unwrap() as u32;
    assert_eq!(d.ctl(&["cancel", &id]).code, 0);
    let r = d.ctl(&["--json", "wait", &id]);
    let j = r.json();
    assert_eq!(j["state"], "cancelled", "{j}");
    assert_eq!(j["attempts"][1]["error"], "cancelled", "{j}");
    assert_eq!(
        d.pool("py")["workers"][0]["pid"],
        pid,
        "the worker was not replaced"
    );
    assert_eq!(
        d.pool("py")["workers"][0]["restarts"],
        1,
        "only the kill -9"
    );
    // A handler returning something that is not bytes-like: a clear error.
    let r = d.ctl(&["--json", "submit", "py", "--input", "int", "--wait"]);
    assert_eq!(
        r.json()["error"],
        "TypeError: the handler returned int; return bytes, bytearray, memoryview, str or None"
    );
    let r = d.ctl(&["submit", "py", "--input", "still warm", "--wait"]);
    assert_eq!(r.stdout, "STILL WARM setup=1", "{r:?}");
    assert!(alive(d.pid()));
    let log = d.log_text();
    assert!(
        !log.contains("Warning") && !log.contains("Traceback"),
        "{log}"
    );
}

#[test]
fn a_missing_module_is_a_clear_error_in_the_log() {
    let d = Daemon::start(
        "py-missing",
        &format!(
            "{}[pools.py]\ncommand = [\"python3\", \"-m\", \"jobvisor.worker\", \"no_such_module:f\"]\nworkers = 1\n{}",
            daemon_section(),
            pool_env(std::path::Path::new("/nonexistent"))
        ),
    );
    wait_for("the import error in the log", DEADLINE, || {
        d.log_text()
            .contains("jobvisor.worker: cannot import no_such_module: ModuleNotFoundError")
            .then_some(())
    });
    assert!(alive(d.pid()));
}

const CLIENT_PY: &str = r#"
import os, sys
from jobvisor import Client, Error, Executor, JobError
import calls

sock = os.environ["JOBVISOR_SOCKET"]
with Client() as c:
    assert c.daemon["protocol_version"] == 1
    job = c.submit("py", b"hi", wait=True)
    assert (job.state, job.output) == ("succeeded", b"HI setup=1"), job
    job_id = c.submit("py", b"queued", priority=5, key="k")
    assert [d.state for d in c.wait(job_id)] == ["succeeded"]
    assert c.result(job_id).output == b"QUEUED setup=1"
    try:
        c.wait(job_id, 10**9)
        raise SystemExit("waiting on an unknown job succeeded")
    except Error as e:
        assert e.exit_code == 4, e
    assert c.result(job_id).state == "succeeded"   # the stream was read to its end
    big = bytes(range(256)) * 8192                      # 2 MiB: a memfd both ways
    job = c.submit("py", big, wait=True)
    assert job.output == big[::-1], len(job.output or b"")
    assert type(job.output) is bytes
with Client(map_outputs=True) as m:
    # A large output is the mapped descriptor (no copy), a small one bytes.
    job = m.submit("py", big, wait=True)
    assert isinstance(job.output, memoryview) and job.output == big[::-1], type(job.output)
    job.output[0] = 0                                   # copy-on-write: private
    assert m.submit("py", b"small", wait=True).output == b"SMALL setup=1"
    assert m.map("py", [big])[0].output == big[::-1]
    # submit(wait=True) reuses one input memfd per pool: inputs that grow,
    # shrink and differ come back whole, and a refused submit drops the
    # buffers of its pool only.
    fd_of = lambda pool="py": m._buffers[pool].input.fd if pool in m._buffers else None
    sizes = [3 << 20, 1 << 20, (2 << 20) + 7, 3 << 20]
    for i, n in enumerate(sizes):
        data = bytes([i + 1]) * n
        job = m.submit("py", data, wait=True)
        assert job.output == data[::-1], (n, len(job.output))
        if i == 0:
            first = fd_of()
        assert fd_of() == first, "the buffer is reused"
    try:
        m.submit("nope", big, wait=True)
        raise SystemExit("unknown pool accepted")
    except Error:
        pass
    assert fd_of("nope") is None, "a buffer whose job did not end is dropped"
    assert fd_of() == first, "another pool's buffer stays"
    assert m.submit("py", big, wait=True).output == big[::-1]
with Client() as c:
    try:
        c.submit("nope", b"x")
        raise SystemExit("unknown pool accepted")
    except Error as e:
        assert (e.kind, e.exit_code) == ("not_found", 4), e
    try:
        c.result(10**9)
        raise SystemExit("unknown job found")
    except Error as e:
        assert e.exit_code == 4
    failed = c.submit("py", b"fail", wait=True)
    assert (failed.state, failed.error) == ("failed", "ValueError: asked to fail")
    names = sorted(p["name"] for p in c.status())
    assert names == ["call", "py"], names
    assert c.jobs(pool="py", limit=1)[0].id == failed.id
    docs = c.map("py", [f"item {i}" for i in range(50)] + [big])
    assert [d.output for d in docs[:50]] == [f"ITEM {i} setup=1".encode() for i in range(50)]
    assert docs[50].output == big[::-1]
    try:
        c.map("py", ["a", "b"], priority=1, colour="red")
        raise SystemExit("unknown option accepted")
    except TypeError:
        pass

with Executor("call", socket=sock) as ex:
    assert list(ex.map(calls.add, range(300), range(300))) == [2 * i for i in range(300)]
    f = ex.submit(calls.boom, "key")
    try:
        f.result(timeout=30)
        raise SystemExit("no exception")
    except KeyError as e:
        assert e.args == ("key",)
    assert ex.submit(calls.big, 3 << 20).result(timeout=30) == b"x" * (3 << 20)
    assert ex.submit(calls.add, "a" * (2 << 20), "b").result(timeout=30)[-2:] == "ab"
    try:
        ex.submit(calls.die).result(timeout=60)
        raise SystemExit("a call that kills its worker succeeded")
    except JobError as e:
        assert e.state == "dead", e
print("client ok")
"#;

const CALLS_PY: &str = r#"
import os

def add(a, b):
    return a + b

def boom(x):
    raise KeyError(x)

def big(n):
    return b"x" * n

def die():
    os._exit(3)
"#;

#[test]
fn the_python_client_and_executor_drive_a_daemon() {
    let mut d = Daemon::prepare("py-client", "");
    std::fs::write(d.dir.path().join("jobs.py"), JOBS_PY).unwrap();
    std::fs::write(d.dir.path().join("calls.py"), CALLS_PY).unwrap();
    std::fs::write(d.dir.path().join("client.py"), CLIENT_PY).unwrap();
    let env = pool_env(d.dir.path());
    let cfg = format!(
        "{}[pools.py]\ncommand = [\"python3\", \"-m\", \"jobvisor.worker\", \"jobs:handle\"]\nworkers = 1\ninline_limit = \"1KiB\"\n{env}\
         [pools.call]\ncommand = [\"python3\", \"-m\", \"jobvisor.worker\", \"--call\"]\nworkers = 2\nmax_attempts = 2\nbackoff_initial = \"0s\"\n{env}",
        daemon_section(),
    );
    d.write_config(&cfg);
    d.spawn();
    d.wait_ready("py", 1);
    d.wait_ready("call", 2);
    let o = python_client(&d, &[d.dir.path().join("client.py").to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && out.contains("client ok"),
        "{out}\n{err}"
    );
    assert!(alive(d.pid()));
}

/// The `python3 -c` a broken pool runs: it imports the package first, so
/// without it on `PYTHONPATH` the worker dies before `Ready` with a
/// traceback on stderr.
const BROKEN_PY_COMMAND: &str = "command = [\"python3\", \"-c\", \"import sys, jobvisor.worker as w; sys.exit(w.main(['jobs:handle']))\"]\nworkers = 1\nbackoff_initial = \"0s\"\nbackoff_max = \"10ms\"\nmax_restarts = 1\n";

const POOL_FAILED_PY: &str = r#"
import signal, sys
from jobvisor import Client, Error

signal.alarm(60)  # a deadline: a missing PoolFailed would hang a wait

with Client() as c:
    for call in (lambda: c.submit("py", b"x", wait=True),
                 lambda: c.map("py", [b"y"])):
        try:
            call()
            raise SystemExit("a wait on a failed pool returned")
        except Error as e:
            assert e.kind == "failed", e
            assert "pool py failed: worker 0: exit status 1 before Ready: Traceback" in str(e), e
            assert "No module named 'jobvisor'" in str(e), e
with Client() as c:
    try:
        c.wait(int(sys.argv[1]))
        raise SystemExit("a wait on a failed pool returned")
    except Error as e:
        assert e.kind == "failed" and "jobvisorctl reload" in str(e), e
print("pool_failed ok")
"#;

#[test]
fn a_python_pool_that_cannot_start_says_why_and_a_reload_with_a_fixed_spec_revives_it() {
    let mut d = Daemon::prepare("py-broken", "");
    std::fs::write(d.dir.path().join("jobs.py"), JOBS_PY).unwrap();
    std::fs::write(d.dir.path().join("client.py"), POOL_FAILED_PY).unwrap();
    // No package on the path: `import jobvisor.worker` fails.
    let broken = format!(
        "{}[pools.py]\n{BROKEN_PY_COMMAND}env = {{ PYTHONPATH = \"/nonexistent\" }}\n",
        daemon_section()
    );
    d.write_config(&broken);
    d.spawn();
    let p = wait_for("pool py to fail", DEADLINE, || {
        let p = d.pool("py");
        (p["state"] == "failed").then_some(p)
    });
    // 1. The crash text is the worker's own: its traceback, lines kept.
    let e = p["last_error"].as_str().unwrap();
    assert!(
        e.contains(
            "; last: worker 0: exit status 1 before Ready: Traceback (most recent call last):\n"
        ),
        "{e}"
    );
    assert!(
        e.ends_with("\nModuleNotFoundError: No module named 'jobvisor'"),
        "{e}"
    );
    let human = d.ctl(&["status", "py"]);
    assert!(
        human
            .stdout
            .contains("\n    ModuleNotFoundError: No module named 'jobvisor'\n"),
        "{}",
        human.stdout
    );
    let log = d.log_text();
    assert!(
        log.contains("exited: exit status 1 after")
            && log.contains("before Ready: Traceback (most recent call last):\\n"),
        "{log}"
    );
    // 5. A plain submit is refused (exit 5); one that waits is queued and
    // told at once (exit 5, one line, the job id).
    let r = d.ctl(&["submit", "py", "--input", "plain"]);
    assert_eq!(r.code, 5, "{r:?}");
    assert!(r.stderr.contains("jobvisorctl reload"), "{r:?}");
    let r = d.ctl(&["submit", "py", "--input", "first", "--wait"]);
    assert_eq!(r.code, 5, "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    assert!(
        r.stderr.starts_with(
            "jobvisorctl: pool py failed: worker 0: exit status 1 before Ready: Traceback (most recent call last): … ModuleNotFoundError: No module named 'jobvisor'; fix its command, then `jobvisorctl reload` (job "
        ),
        "{r:?}"
    );
    let first: u64 = r
        .stderr
        .rsplit("(job ")
        .next()
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no job id: {r:?}"));
    let r = d.ctl(&["wait", &first.to_string()]);
    assert_eq!(r.code, 5, "{r:?}");
    assert!(r.stderr.contains("pool py failed: "), "{r:?}");
    let r = d.ctl_stdin(&["map", "py"], Some(b"a\n"));
    assert_eq!(r.code, 5, "{r:?}");
    assert!(r.stderr.contains("pool py failed: "), "{r:?}");
    // The Python client raises at once too.
    let o = Command::new("python3")
        .arg(d.dir.path().join("client.py"))
        .arg(first.to_string())
        .env("PYTHONPATH", python_dir())
        .env("JOBVISOR_SOCKET", d.socket())
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        o.status.success() && out.contains("pool_failed ok"),
        "{out}\n{err}"
    );
    assert_eq!(d.pool("py")["state"], "failed");
    // 2. A reload that fixes the spec (the env) brings the pool back, with
    // its queued jobs: no `restart`.
    let fixed = format!(
        "{}[pools.py]\n{BROKEN_PY_COMMAND}{}",
        daemon_section(),
        pool_env(d.dir.path())
    );
    d.write_config(&fixed);
    let r = d.ctl(&["reload"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("cleared the failed state of py"), "{r:?}");
    let r = d.ctl(&["--json", "wait", &first.to_string()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["state"], "succeeded");
    let r = d.ctl(&["result", &first.to_string()]);
    assert_eq!(r.stdout, "FIRST setup=1", "{r:?}");
    let p = d.pool("py");
    assert_eq!(p["state"], "running");
    assert_eq!(p["last_error"], serde_json::Value::Null, "{p}");
    // Everything queued meanwhile ran (the map's lines, the client's).
    wait_for("the queued jobs to run", DEADLINE, || {
        let p = d.pool("py");
        (p["queued"] == 0 && p["running"] == 0).then_some(())
    });
    assert_eq!(d.pool("py")["succeeded"], 4, "{}", d.pool("py"));
}

/// A worker written against `jobvisor._wire` alone that fails every job
/// with `Raised`: a traceback as the error, `pickled-<input>` as the
/// detail; input `big` gets a 2 MiB detail through the arena.
const RAISING_WORKER_PY: &str = r#"
import mmap, os
from jobvisor import _wire as w

jobs_fd, results_fd, arena_fd = (int(x) for x in os.environ["JOBVISOR_FDS"].split(","))
size = int(os.environ["JOBVISOR_SHM_SIZE"])
arena = mmap.mmap(arena_fd, size)
pages = size // 4096
out_start = (pages - pages // 2) * 4096          # the output half (PROTOCOL.md section 10)
send = lambda payload: w.write_all(results_fd, w.frame(payload))
send(b"\x00" + w.uvarint(w.PROTOCOL_VERSION) + w.uvarint(os.getpid()))
frames = w.FrameReader(jobs_fd)
while True:
    try:
        m = w.Reader(frames.next())
    except EOFError:
        break
    kind = m.uvarint(32)
    if kind == 2:                                    # Shutdown
        break
    if kind != 0:                                    # Cancel, Release: nothing to do
        continue
    job_id, _attempt, _deadline = m.uvarint(), m.uvarint(32), m.option(m.uvarint)
    assert m.uvarint(32) == 0, "inline inputs only"
    text = m.bytes_().decode()
    error = ("Traceback (most recent call last):\n  File \"jobs.py\", line 3, in f\n"
             f"    raise ValueError(\"boom {text}\")\nValueError: boom {text}\n")
    if text == "big":
        detail = b"x" * (2 << 20)
        arena[out_start:out_start + len(detail)] = detail
        send(w.encode_raised(job_id, error, (out_start, len(detail))))
    else:
        send(w.encode_raised(job_id, error, b"pickled-" + text.encode()))
"#;

#[test]
fn a_raised_failure_keeps_its_detail_and_the_cli_shows_its_lines() {
    let mut d = Daemon::prepare("py-raised", "");
    std::fs::write(d.dir.path().join("raising.py"), RAISING_WORKER_PY).unwrap();
    let cfg = format!(
        "{}[pools.raise]\ncommand = [\"python3\", {:?}]\nworkers = 1\nshm_size = \"8MiB\"\nenv = {{ PYTHONPATH = {:?} }}\n",
        daemon_section(),
        d.dir.path().join("raising.py").display().to_string(),
        python_dir().display().to_string()
    );
    d.write_config(&cfg);
    d.spawn();
    d.wait_ready("raise", 1);
    // 3. Failed, not retried, error and detail kept.
    let r = d.ctl(&["--json", "submit", "raise", "--input", "7", "--wait"]);
    assert_eq!(r.code, 1, "{r:?}");
    let j = r.json();
    assert_eq!(j["state"], "failed", "{j}");
    assert_eq!(j["attempts"].as_array().unwrap().len(), 1, "{j}");
    assert_eq!(j["output"], "pickled-7", "{j}");
    assert!(
        j["error"]
            .as_str()
            .unwrap()
            .starts_with("Traceback (most recent call last):\n"),
        "{j}"
    );
    let id = j["id"].to_string();
    let r = d.ctl(&["--json", "result", &id]);
    assert_eq!(r.json()["output"], "pickled-7", "{r:?}");
    assert_eq!(r.json()["error"], j["error"], "{r:?}");
    // 4. Without --json: the error's lines, never the detail.
    let r = d.ctl(&["result", &id]);
    assert_eq!(r.code, 1, "{r:?}");
    assert_eq!(r.stdout, "", "{r:?}");
    assert_eq!(
        r.stderr,
        format!(
            "jobvisorctl: job {id} failed: ValueError: boom 7\n  Traceback (most recent call last):\n    File \"jobs.py\", line 3, in f\n      raise ValueError(\"boom 7\")\n  ValueError: boom 7\n"
        )
    );
    let r = d.ctl(&["jobs"]);
    assert_eq!(r.code, 0, "{r:?}");
    let line = r.stdout.lines().nth(1).unwrap_or_default();
    assert!(
        line.trim_start()
            .starts_with(&format!("{id}  raise  failed"))
            && line.ends_with("  ValueError: boom 7"),
        "{r:?}"
    );
    let r = d.ctl(&["wait", &id]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (1, format!("{id} failed: ValueError: boom 7\n").as_str()),
        "{r:?}"
    );
    // A detail through the arena, large enough for a payload file and a
    // descriptor (JobFd): kept whole; the human result shows none of it.
    let r = d.ctl(&["submit", "raise", "--input", "big", "--wait"]);
    assert_eq!((r.code, r.raw.len()), (1, 0), "{}", r.stderr);
    assert!(
        r.stderr.starts_with("jobvisorctl: job ")
            && r.stderr.contains(" failed: ValueError: boom big\n"),
        "{r:?}"
    );
    // The newest job (one JSON document per listed job).
    let big = d.ctl(&["--json", "jobs", "--limit", "1"]).json()[0]["id"]
        .as_u64()
        .expect("a job id");
    assert_ne!(big.to_string(), id);
    let r = d.ctl(&["--json", "result", &big.to_string()]);
    let j = r.json();
    assert_eq!(j["state"], "failed");
    assert!(
        j["output"].as_str().unwrap() == "x".repeat(2 << 20),
        "a 2 MiB detail"
    );
    let r = d.ctl(&["result", &big.to_string()]);
    assert_eq!((r.code, r.raw.len()), (1, 0), "{}", r.stderr);
    // The worker lives on: a failed job is not a crash.
    assert_eq!(d.pool("raise")["workers"][0]["restarts"], 0);
}

/// A Python call that raises, as an operator sees it: `jobs` shows the
/// exception line, `result` the traceback as lines and never the pickled
/// exception; the caller gets the exception itself with the traceback as
/// its cause.
#[test]
fn a_failed_python_call_shows_its_exception_line_and_traceback() {
    let mut d = Daemon::prepare("py-raised", "");
    std::fs::write(
        d.dir.path().join("calls.py"),
        "def boom(x):\n    raise ValueError(f\"boom {x}\")\n",
    )
    .unwrap();
    let env = pool_env(d.dir.path());
    d.write_config(&format!(
        "{}[pools.call]\ncommand = [\"python3\", \"-m\", \"jobvisor.worker\", \"--call\"]\nworkers = 1\n{env}",
        daemon_section(),
    ));
    d.spawn();
    d.wait_ready("call", 1);
    let script = r#"
import calls, jobvisor
with jobvisor.Executor(pool="call") as ex:
    try:
        ex.submit(calls.boom, 7).result(timeout=60)
    except ValueError as e:
        assert str(e) == "boom 7", e
        assert isinstance(e.__cause__, jobvisor.RemoteTraceback), repr(e.__cause__)
        assert "in boom" in str(e.__cause__), str(e.__cause__)
        print("raised ok")
# The Pool, connected to the same shared pool.
with jobvisor.Pool(pool="call") as p:
    assert p.map(abs, [-1, -2, 3]) == [1, 2, 3]
    assert sorted(p.imap_unordered(abs, range(-5, 0))) == [1, 2, 3, 4, 5]
    try:
        p.apply(calls.boom, (8,))
    except ValueError as e:
        assert str(e) == "boom 8", e
        print("pool ok")
"#;
    let o = python_client(&d, &["-c", script]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("raised ok") && out.contains("pool ok"),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let jobs = d.ctl(&["jobs", "--pool", "call"]);
    assert_eq!(jobs.code, 0, "{jobs:?}");
    assert!(
        jobs.stdout.contains("ValueError: boom 7"),
        "{}",
        jobs.stdout
    );
    assert!(!jobs.stdout.contains("Traceback"), "{}", jobs.stdout);
    let listed = d.ctl(&["--json", "jobs", "--pool", "call"]);
    let id = listed
        .json_list()
        .into_iter()
        .find(|j| j["error"].as_str().is_some_and(|e| e.ends_with("boom 7")))
        .and_then(|j| j["id"].as_u64())
        .expect("the job of boom(7)")
        .to_string();
    let r = d.ctl(&["result", &id]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stderr.contains("Traceback (most recent call last):"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("raise ValueError(f\"boom {x}\")"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("ValueError: boom 7"), "{}", r.stderr);
    assert!(!r.stderr.contains("pickled"), "{}", r.stderr);
    assert!(
        r.stdout.is_empty(),
        "a failed job's output is not printed: {:?}",
        r.stdout
    );
}
