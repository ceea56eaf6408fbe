//! `payloads = "memory"`: a pool's large inputs and outputs never reach
//! `payload_dir`; they round-trip bit-exact, an output nobody waited for is
//! said to be gone, and a `kill -9` of the daemon ends the memory jobs it
//! held `dead` with a clear error while durable jobs recover.

use jobvisor::*;
use nix::sys::signal::Signal;
use std::path::Path;

fn cfg() -> String {
    format!(
        "[daemon]\ncontrol_socket = \"ctl.sock\"\nstate_dir = \"state\"\npayload_dir = \"big\"\n\
         [pools.mecho]\ncommand = [{w}, \"echo\"]\nworkers = 1\nshm_size = \"520MiB\"\npayloads = \"memory\"\n\
         [pools.mchaos]\ncommand = [{t}, \"chaos\", \"100\"]\nworkers = 1\nshm_size = \"16MiB\"\npayloads = \"memory\"\nbackoff_initial = \"0s\"\n\
         [pools.msleep]\ncommand = [{t}, \"sleep\"]\nworkers = 1\nshm_size = \"8MiB\"\npayloads = \"memory\"\n\
         [pools.mdie]\ncommand = [{t}, \"done-then-die\"]\nworkers = 1\nshm_size = \"16MiB\"\npayloads = \"memory\"\nbackoff_initial = \"0s\"\n\
         [pools.ddie]\ncommand = [{t}, \"done-then-die\"]\nworkers = 1\nshm_size = \"16MiB\"\nbackoff_initial = \"0s\"\n\
         [pools.mhalf]\ncommand = [{t}, \"half-then-die\"]\nworkers = 1\nshm_size = \"64MiB\"\npayloads = \"memory\"\nbackoff_initial = \"0s\"\n\
         [pools.mlie]\ncommand = [{t}, \"fd-lie\"]\nworkers = 1\nshm_size = \"16MiB\"\npayloads = \"memory\"\nbackoff_initial = \"0s\"\n\
         [pools.echo]\ncommand = [{w}, \"echo\"]\nworkers = 1\nshm_size = \"64MiB\"\n\
         [pools.slow]\ncommand = [{t}, \"sleep\"]\nworkers = 1\n",
        w = worker_bin(),
        t = test_worker()
    )
}

/// Payload files (`*.in` and `*.out`) in the payload directory.
fn payload_files(payloads: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(payloads)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".in") || n.ends_with(".out"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn memory_mode_round_trips_bit_exact_without_touching_payload_dir() {
    let d = Daemon::start("memory-rt", &cfg());
    d.wait_ready("mecho", 1);
    let payloads = d.dir.path().join("big");
    for len in [0, 65_535, 65_536, 65_537, 1 << 20, 3 << 20] {
        d.assert_echo_round_trip("mecho", &pattern(len));
    }
    // From stdin: the CLI fills a sealed memfd and passes it.
    let data = pattern(2 << 20);
    let r = d.ctl_stdin(&["submit", "mecho", "-", "--wait"], Some(&data));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.raw == data,
        "stdin: output differs ({} bytes)",
        r.raw.len()
    );
    assert_eq!(payload_files(&payloads), Vec::<String>::new());

    // A worker that dies with the job (every first attempt aborts): the
    // retry reads the input the daemon still holds.
    d.wait_ready("mchaos", 1);
    d.assert_echo_round_trip("mchaos", &pattern(5 << 20));

    // Nobody waiting when it ended: the large output went nowhere, and
    // `result` says so (the small ones are kept as usual).
    let f = d.dir.path().join("in-2m");
    std::fs::write(&f, pattern(2 << 20)).unwrap();
    let id = d.submit_id(&["mecho", "--input-file", f.to_str().unwrap()]);
    d.wait_state(id, "succeeded");
    let r = d.ctl(&["--json", "result", &id.to_string()]);
    let j = r.json();
    assert_eq!(j["state"], "succeeded", "{j}");
    let e = j["error"].as_str().unwrap_or_default();
    assert!(e.starts_with("output not kept: payloads = memory"), "{j}");
    let small = d.submit_id(&["mecho", "--input", "small"]);
    d.wait_state(small, "succeeded");
    let r = d.ctl(&["result", &small.to_string()]);
    assert_eq!(
        (r.code, r.raw.as_slice()),
        (0, &b"small"[..]),
        "{}",
        r.stderr
    );
    assert_eq!(payload_files(&payloads), Vec::<String>::new());
}

#[test]
fn memory_mode_round_trips_64_and_256_mib_bit_exact() {
    let d = Daemon::start("memory-big", &cfg());
    d.wait_ready("mecho", 1);
    for len in [64 << 20, 256 << 20] {
        d.assert_echo_round_trip("mecho", &pattern(len));
    }
    assert_eq!(
        payload_files(&d.dir.path().join("big")),
        Vec::<String>::new()
    );
}

#[test]
fn kill9_ends_memory_jobs_dead_and_durable_jobs_recover() {
    let mut d = Daemon::start("memory-kill9", &cfg());
    for pool in ["mecho", "msleep", "echo", "slow"] {
        d.wait_ready(pool, 1);
    }
    // A blocker holds key k: jobs with --key k stay queued.
    let blocker = d.hold_key_k();
    let data = pattern(3 << 20);
    let f = d.dir.path().join("in-3m");
    std::fs::write(&f, &data).unwrap();
    let file = f.to_str().unwrap();
    let queued: Vec<u64> = (0..2)
        .map(|_| d.submit_id(&["mecho", "--key", "k", "--input-file", file]))
        .collect();
    let durable = d.submit_id(&["echo", "--key", "k", "--input-file", file]);
    // A memory job running: 10 minutes of sleep, padded past 1 MiB.
    let mut sleep = b"600000".to_vec();
    sleep.resize(2 << 20, b' ');
    let s = d.dir.path().join("in-sleep");
    std::fs::write(&s, &sleep).unwrap();
    let running = d.submit_id(&["msleep", "--input-file", s.to_str().unwrap()]);
    wait_for("the memory job to run", DEADLINE, || {
        (d.pool("msleep")["running"] == 1).then_some(())
    });
    let payloads = d.dir.path().join("big");
    assert_eq!(payload_files(&payloads), vec![format!("{durable}.in")]);

    kill(d.pid(), Signal::SIGKILL);
    d.wait_exit(DEADLINE);
    d.spawn();
    d.wait_ready("echo", 1);
    assert_eq!(d.ctl(&["cancel", &blocker.to_string()]).code, 0);
    let r = d.ctl(&["wait", &durable.to_string()]);
    assert_eq!(r.code, 0, "{} {}", r.stderr, r.stdout);
    let r = d.ctl(&["result", &durable.to_string()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.raw == data, "durable job's output differs");
    for id in queued.iter().copied().chain([running]) {
        let doc = d.job_doc(id);
        assert_eq!(doc["state"], "dead", "job {id}: {doc}");
        let e = doc["error"].as_str().unwrap_or_default();
        assert!(
            e.starts_with("input lost: payloads = memory") && e.contains("submit it again"),
            "job {id}: {e}"
        );
    }
    // Never rerun without its input: a retry is refused, saying why.
    let r = d.ctl(&["retry", &queued[0].to_string()]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("payloads = \"memory\""), "{}", r.stderr);
    assert!(alive(d.pid()));
}

/// `python3 -c SCRIPT N` as a client of `d` (the checkout's package
/// importable): `N` memory-mode 16 MiB round trips through `mecho`.
fn python_round_trips(d: &Daemon, n: usize) {
    const SCRIPT: &str = r#"
import os, sys
from jobvisor import Client
n = int(sys.argv[1])
data = os.urandom(16 << 20)
with Client(map_outputs=True) as c:
    for i in range(n):
        job = c.submit("mecho", data, wait=True)
        assert job.state == "succeeded" and len(job.output) == len(data), job
        if i % 100 == 0:
            assert job.output == data, f"job {i}: output differs"
        del job
print("ok")
"#;
    python_client(d, SCRIPT, &[&n.to_string()]);
}

#[test]
fn daemon_rss_stays_flat_across_a_thousand_16_mib_memory_jobs() {
    let d = Daemon::start("memory-rss", &cfg());
    d.wait_ready("mecho", 1);
    // Warm-up: the arena's pages the daemon touches are in its RSS now.
    python_round_trips(&d, 50);
    let before = rss_kib(d.pid());
    python_round_trips(&d, 1000);
    let after = rss_kib(d.pid());
    eprintln!("daemon RSS: {before} KiB after 50 jobs, {after} KiB after 1,050");
    // 1,000 jobs moved ~16 GB each way; what the daemon keeps must not grow
    // with them (one job's output is 16 MiB: less than that is noise).
    assert!(
        after < before + 16 * 1024,
        "daemon RSS grew from {before} KiB to {after} KiB"
    );
    assert_eq!(
        payload_files(&d.dir.path().join("big")),
        Vec::<String>::new()
    );
}

#[test]
fn a_client_that_lets_go_of_its_file_early_loses_nothing_and_a_shrunk_file_is_a_clear_error() {
    let d = Daemon::start("memory-early", &cfg());
    for pool in ["mecho", "slow"] {
        d.wait_ready(pool, 1);
    }
    let blocker = d.hold_key_k();
    // Submits 2 MiB from the file `name`, queued behind the blocker.
    let submit_held = |name: &str| {
        let f = d.dir.path().join(name);
        std::fs::write(&f, pattern(2 << 20)).unwrap();
        let args = ["mecho", "--key", "k", "--input-file", f.to_str().unwrap()];
        (d.submit_id(&args), f)
    };
    // The CLI exits (closing its descriptor) and the file is removed
    // before the job runs: the daemon's descriptor keeps the input.
    let (kept, gone) = submit_held("in-gone");
    std::fs::remove_file(&gone).unwrap();
    // A plain file (not sealed) that shrinks after the submit.
    let (short, shrunk) = submit_held("in-shrunk");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shrunk)
        .unwrap()
        .set_len(1000)
        .unwrap();
    // Both files are held (metrics say so), until their jobs end.
    let held = |d: &Daemon| {
        let r = d.ctl(&["metrics"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let text = r.stdout;
        assert!(
            text.contains("\njobvisor_memory_payload_files_max 1024\n"),
            "{text}"
        );
        text.lines()
            .find_map(|l| l.strip_prefix("jobvisor_memory_payload_files "))
            .map(|n| n.to_string())
    };
    assert_eq!(held(&d).as_deref(), Some("2"));
    assert_eq!(d.ctl(&["cancel", &blocker.to_string()]).code, 0);
    let doc = d.wait_state(kept, "succeeded");
    assert_eq!(doc["attempts"].as_array().map(Vec::len), Some(1), "{doc}");
    let doc = wait_for("the shrunk job to end", DEADLINE, || {
        let doc = d.job_doc(short);
        (doc["state"] != "queued" && doc["state"] != "running").then_some(doc)
    });
    assert_ne!(doc["state"], "succeeded", "{doc}");
    let e = doc["error"].as_str().unwrap_or_default();
    assert!(
        e.contains("cannot be read from the file it was submitted from"),
        "{doc}"
    );
    assert_eq!(held(&d).as_deref(), Some("0"));
    // The daemon is fine, and so is the next job.
    assert!(alive(d.pid()));
    d.assert_echo_round_trip("mecho", &pattern(3 << 20));
}

#[test]
fn a_worker_that_dies_right_after_its_shared_memory_answer_loses_nothing() {
    let d = Daemon::start("memory-die", &cfg());
    // Its `Done` names a range of the arena and it aborts at once: the
    // daemon copies the output from its own mapping, after the worker is
    // gone, into a memfd (memory) or a payload file (durable).
    for pool in ["mdie", "ddie"] {
        d.wait_ready(pool, 1);
        let data = pattern(3 << 20);
        let f = d.dir.path().join(format!("in-{pool}"));
        std::fs::write(&f, &data).unwrap();
        let id = d.submit_id(&[pool, "--input-file", f.to_str().unwrap()]);
        let doc = d.wait_state(id, "succeeded");
        assert_eq!(doc["attempts"].as_array().map(Vec::len), Some(1), "{doc}");
        d.wait_ready(pool, 1); // restarted after the abort
        d.assert_echo_round_trip(pool, &data);
    }
    assert!(alive(d.pid()));
}

/// `python3 -c SCRIPT ARGS…` as a client of `d` (the checkout's package
/// importable); panics unless it prints "ok".
fn python_client(d: &Daemon, script: &str, args: &[&str]) {
    let o = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .env(
            "PYTHONPATH",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("python"),
        )
        .env("JOBVISOR_SOCKET", d.socket())
        .output()
        .expect("python3 (the CI script installs it)");
    assert!(
        o.status.success() && o.stdout.starts_with(b"ok"),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Round trips through the Python client's buffers: bit-exact at every
/// size, both output forms; each large output in the client's own output
/// buffer; the buffers reused while no view of an output is held, replaced
/// while one is.
const BUFFERS_PY: &str = r#"
import os, sys
from jobvisor import Client
pool = sys.argv[1]
sizes = [0, 65535, 65536, 65537, 1 << 20, 64 << 20, 256 << 20]
for mapped in (False, True):
    with Client(map_outputs=mapped) as c:
        for n in sizes:
            data = os.urandom(n)
            job = c.submit(pool, data, wait=True)
            assert job.state == "succeeded", (n, job.state, job.error)
            assert job.output == data, f"{n} bytes: output differs"
            if n >= 1 << 20:
                b = c._buffers[pool]
                got = os.pread(b.output.fd, n, 0)
                assert got == data, f"{n} bytes: not in the output buffer"
            del job
        b = c._buffers[pool]
        ino = lambda fd: os.fstat(fd).st_ino
        inodes = (ino(b.input.fd), ino(b.output.fd))
        data = os.urandom(3 << 20)
        assert c.submit(pool, data, wait=True).output == data
        assert (ino(b.input.fd), ino(b.output.fd)) == inodes, "buffers not reused"
        if mapped:
            kept = c.submit(pool, data, wait=True)      # a view held ...
            other = os.urandom(3 << 20)
            assert c.submit(pool, other, wait=True).output == other
            assert kept.output == data, "a held output was overwritten"
            assert ino(b.output.fd) != inodes[1], "... yet the buffer was reused"
print("ok")
"#;

#[test]
fn python_buffers_round_trip_through_descriptor_and_copy_workers() {
    let py =
        format!(
        "[pools.mpy]\ncommand = [\"python3\", \"-m\", \"jobvisor.worker\", \"echo_mod:echo\"]\n\
         workers = 1\nshm_size = \"520MiB\"\npayloads = \"memory\"\n\
         env = {{ PYTHONPATH = \"{}:.\" }}\n",
        Path::new(env!("CARGO_MANIFEST_DIR")).join("python").display()
    );
    let mut d = Daemon::prepare("memory-buffers", &format!("{}{py}", cfg()));
    std::fs::write(
        d.dir.path().join("echo_mod.py"),
        "def echo(x):\n    return bytes(x)\n",
    )
    .unwrap();
    d.spawn();
    d.wait_ready("mecho", 1);
    d.wait_ready("mpy", 1);
    // The Rust worker speaks protocol 2: the input reaches it as the
    // client's memfd, and it writes each large output into the client's
    // buffer itself (the daemon logs each such answer).
    python_client(&d, BUFFERS_PY, &["mecho"]);
    let log = d.log_text();
    let in_buffer = log.matches("output in the client's buffer").count();
    assert!(in_buffer >= 10, "{in_buffer} outputs in buffers:\n{log}");
    // The Python worker speaks protocol 1: the daemon copies through its
    // arena, and into the client's buffer.
    python_client(&d, BUFFERS_PY, &["mpy"]);
    assert_eq!(
        d.log_text()
            .matches("output in the client's buffer")
            .count(),
        in_buffer,
        "a protocol-1 worker answered with a descriptor"
    );
    assert_eq!(
        payload_files(&d.dir.path().join("big")),
        Vec::<String>::new()
    );
}

#[test]
fn output_buffers_are_checked_and_a_worker_that_lies_about_one_is_replaced() {
    let d = Daemon::start("memory-buffer-checks", &cfg());
    d.wait_ready("mlie", 1);
    // A buffer that could shrink under a mapping, one sealed against
    // writes, and one given to a submit that does not wait: refused (2).
    python_client(
        &d,
        r#"
import fcntl, os
from jobvisor import Client, client
def submit(c, fd, wait=True, data=b"x" * (2 << 20)):
    inp = client.sealed_memfd(data)
    try:
        c.conn.send(client.encode_submit_with("mlie", len(data), client._options(None, None, 0, None),
                                               wait, True, None, True), [inp, fd])
    finally:
        os.close(inp)
    return c.conn.recv()
with Client() as c:
    plain = os.memfd_create("b", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    kind, e = submit(c, plain)
    assert kind == "error" and e.exit_code == 2 and "not sealed against shrinking" in str(e), (kind, e)
    fcntl.fcntl(plain, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE)
    kind, e = submit(c, plain)
    assert kind == "error" and "sealed against writes" in str(e), (kind, e)
    ok = os.memfd_create("b", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    fcntl.fcntl(ok, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    kind, e = submit(c, ok, wait=False)
    assert kind == "error" and "needs a submit that waits" in str(e), (kind, e)
    # A worker that claims a 1 TiB output in the buffer (or in one it was
    # never given) breaks the protocol: it is replaced, the job retried.
    for data in (os.urandom(3 << 20), b"small"):
        job = c.submit("mlie", data, wait=True)
        assert job.state == "succeeded" and job.output == data, (job.state, job.error)
print("ok")
"#,
        &[],
    );
    let log = d.log_text();
    assert!(
        log.contains("an output of 1099511627776 bytes in an output buffer of"),
        "{log}"
    );
    assert!(
        log.contains("an output in a buffer it was not given"),
        "{log}"
    );
}

#[test]
fn a_submit_chooses_memory_payloads_for_one_job_of_a_durable_pool() {
    let d = Daemon::start("memory-per-job", &cfg());
    d.wait_ready("echo", 1);
    let payloads = d.dir.path().join("big");
    let data = pattern(2 << 20);
    let f = d.dir.path().join("in-2m");
    std::fs::write(&f, &data).unwrap();
    let file = f.to_str().unwrap();
    let r = d.ctl(&[
        "submit",
        "echo",
        "--input-file",
        file,
        "--payloads",
        "memory",
        "--wait",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.raw == data, "output differs ({} bytes)", r.raw.len());
    assert_eq!(payload_files(&payloads), Vec::<String>::new());
    // Not waited for: the output went nowhere, as in a memory pool.
    let id = d.submit_id(&["echo", "--input-file", file, "--payloads", "memory"]);
    d.wait_state(id, "succeeded");
    let j = d.ctl(&["--json", "result", &id.to_string()]).json();
    let e = j["error"].as_str().unwrap_or_default();
    assert!(e.starts_with("output not kept: payloads = memory"), "{j}");
    // The pool's own default still stores: its payload files appear.
    let durable = d.submit_id(&["echo", "--input-file", file]);
    d.wait_state(durable, "succeeded");
    let files = payload_files(&payloads);
    assert!(
        files.contains(&format!("{durable}.out"))
            && files.iter().all(|n| n.starts_with(&format!("{durable}."))),
        "{files:?}"
    );
    let r = d.ctl(&["submit", "echo", "--payloads", "fast"]);
    assert_eq!(r.code, 2, "{r:?}");
    // The Python clients choose it the same way.
    python_client(
        &d,
        r#"
import asyncio, os
from jobvisor import Client, aio
data = os.urandom(3 << 20)
with Client() as c:
    job = c.submit("echo", data, wait=True, payloads="memory")
    assert job.output == data, len(job.output or b"")
    job = c.submit("echo", b"small", wait=True, payloads="durable")
    assert job.output == b"small", job.output
    try:
        c.submit("echo", b"x", payloads="fast")
        raise SystemExit("an unknown mode accepted")
    except ValueError:
        pass
async def main():
    async with await aio.Client.connect() as a:
        job = await a.submit("echo", data, wait=True, payloads="memory")
        assert job.output == data
asyncio.run(main())
print("ok")
"#,
        &[],
    );
    assert_eq!(
        payload_files(&payloads)
            .iter()
            .filter(|n| !n.starts_with(&format!("{durable}.")))
            .count(),
        0,
        "a memory job wrote payload files: {:?}",
        payload_files(&payloads)
    );
}

#[test]
fn a_worker_that_dies_half_way_through_writing_into_the_buffer_loses_nothing() {
    let d = Daemon::start("memory-half", &cfg());
    d.wait_ready("mhalf", 1);
    // Through the Python client: the first attempt writes half the output
    // into the client's output buffer, then garbage, and aborts; the retry
    // writes it whole. Twice, reusing the buffers.
    python_client(
        &d,
        r#"
import os
from jobvisor import Client
with Client(map_outputs=True) as c:
    for n in (8 << 20, 5 << 20):
        data = os.urandom(n)
        job = c.submit("mhalf", data, wait=True)
        assert job.state == "succeeded", (job.state, job.error)
        assert len(job.attempts) == 2, job.attempts
        assert job.output == data, "output differs"
        del job
print("ok")
"#,
        &[],
    );
    assert!(d.log_text().contains("output in the client's buffer"));
}
