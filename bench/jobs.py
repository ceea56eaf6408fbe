#!/usr/bin/env python3
"""Tiny-job throughput: jobvisor vs Python's process pools, in one run.

    python3 bench/jobs.py [--n 200000] [--quick]

Runs, on the same N no-op jobs and the same machine, one after the other:
  1. `jobvisorctl map echo` on a pool of 2 `jobvisor-worker echo` workers,
     every job durable (SQLite WAL, synchronous=FULL, group commit);
  2. multiprocessing.Pool(2).imap_unordered(noop, ..., chunksize=1);
  3. concurrent.futures.ProcessPoolExecutor(2).map(noop, ..., chunksize=1);
and prints jobs/s of each and the ratios. Then: latency of single
`jobvisorctl submit --wait` calls (p50/p99, includes process start of the
CLI and one fsync), and store growth per million jobs.
Writes bench/out/jobs.json and bench/out/jobs.md.

Importable: bench/run.py calls bench_jobvisor, bench_pool and bench_executor
(every wait there is bounded when a timeout is passed).
"""
import argparse, concurrent.futures, contextlib, json, multiprocessing, os, shutil, signal
import subprocess, tempfile, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("JOBVISOR_BIN_DIR", os.path.join(ROOT, "target", "release"))


def default_signals():
    """Pool initializer: forked workers must not inherit the harness's
    SIGTERM handler (Pool.terminate() would make each print a traceback)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def noop(x):
    return x


# The Python package and this directory (so that workers can import `noop`).
PY_PATH = os.path.join(ROOT, "python") + ":" + os.path.dirname(os.path.abspath(__file__))
PY_CALL = ["python3", "-m", "jobvisor.worker", "--call"]


def wait_socket(ctl, sock, deadline=20.0):
    end = time.time() + deadline
    while time.time() < end:
        if subprocess.run([ctl, "--socket", sock, "status"], capture_output=True, timeout=10).returncode == 0:
            return
        time.sleep(0.02)
    raise RuntimeError("jobvisord did not come up")


class Daemon:
    """A daemon with an `echo` pool, or (`python_call`) a pool of
    `python3 -m jobvisor.worker --call` workers instead."""

    def __init__(self, prefetch, workers=2, python_call=False):
        self.proc = None
        self.log = None
        self.dir = tempfile.mkdtemp(prefix="jobvisor-bench-")
        try:
            self._start(prefetch, workers, python_call)
        except BaseException:
            self.stop()
            raise

    def _start(self, prefetch, workers, python_call):
        self.sock = os.path.join(self.dir, "ctl.sock")
        self.ctl = os.path.join(BIN, "jobvisorctl")
        cfg = os.path.join(self.dir, "jobvisor.toml")
        with open(cfg, "w") as f:
            f.write(f"""[daemon]
control_socket = "ctl.sock"
state_dir = "state"
[pools.echo]
command = {json.dumps(PY_CALL if python_call else [os.path.join(BIN, 'jobvisor-worker'), 'echo'])}
env = {{ PYTHONPATH = {json.dumps(PY_PATH)} }}
workers = {workers}
prefetch = {prefetch}
queue_capacity = 10000000
""")
        self.log = open(os.path.join(self.dir, "daemon.log"), "w")
        self.proc = subprocess.Popen([os.path.join(BIN, "jobvisord"), "--config", cfg],
                                     stderr=self.log, stdout=subprocess.DEVNULL)
        wait_socket(self.ctl, self.sock)
        end = time.time() + 20
        while True:
            st = json.loads(subprocess.run([self.ctl, "--socket", self.sock, "--json", "status"],
                                           capture_output=True, text=True, timeout=10).stdout)
            ws = st["pools"][0]["workers"]
            if len(ws) == workers and all(w["state"] == "ready" for w in ws):
                break
            if time.time() > end:
                raise RuntimeError(f"jobvisord: {workers} workers not ready within 20 s: {ws}")
            time.sleep(0.02)

    def store_bytes(self):
        total = 0
        for name in os.listdir(os.path.join(self.dir, "state")):
            total += os.path.getsize(os.path.join(self.dir, "state", name))
        return total

    def stop(self):
        """Idempotent: SIGTERM (SIGKILL after 30 s), remove the temp dir."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.log is not None:
            self.log.close()
            self.log = None
        shutil.rmtree(self.dir, ignore_errors=True)


def bench_jobvisor(n, prefetch, submits=200, timeout=None, workers=2):
    """`jobvisorctl map echo` of n lines on a fresh daemon, then `submits`
    single `submit --wait` calls (0: none). timeout bounds each CLI call
    (seconds; None: unbounded)."""
    d = Daemon(prefetch, workers)
    try:
        data = "".join(f"{i}\n" for i in range(n)).encode()
        t = time.perf_counter()
        r = subprocess.run([d.ctl, "--socket", d.sock, "map", "echo"], input=data,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
        dt = time.perf_counter() - t
        lines = r.stdout.count(b"\n")
        if r.returncode != 0 or lines != n:
            raise RuntimeError(f"map failed: rc={r.returncode} lines={lines} {r.stderr[:300]!r}")
        before = d.store_bytes()
        res = {"jobs_per_s": n / dt, "seconds": dt, "store_bytes": before}
        # Single submits: latency of a whole CLI call (spawn, connect,
        # durable insert, run, durable result).
        lat = []
        for i in range(submits):
            t0 = time.perf_counter()
            rr = subprocess.run([d.ctl, "--socket", d.sock, "submit", "echo", "--input", str(i), "--wait"],
                                capture_output=True, timeout=timeout)
            lat.append((time.perf_counter() - t0) * 1e3)
            if rr.returncode != 0:
                raise RuntimeError(f"submit failed: {rr.stderr!r}")
        if lat:
            lat.sort()
            res["submit_wait_ms_p50"] = lat[len(lat) // 2]
            res["submit_wait_ms_p99"] = lat[int(len(lat) * 0.99) - 1]
        return res
    finally:
        d.stop()


@contextlib.contextmanager
def deadline(seconds, what):
    """Raises TimeoutError in the main thread if the block is not done within
    `seconds` (SIGALRM; a no-op for None or outside the main thread)."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise TimeoutError(f"{what}: not done within {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _timed_map(run, n):
    """run(k) maps noop over range(k) and returns the results as an iterable:
    a 1,000-item warm-up, then run(n) timed until its last result is in."""
    list(run(1000))
    t = time.perf_counter()
    c = sum(1 for _ in run(n))
    dt = time.perf_counter() - t
    assert c == n
    return {"jobs_per_s": n / dt, "seconds": dt}


def bench_pool(n, chunksize=1, workers=2, timeout=None):
    """multiprocessing.Pool(workers).imap_unordered(noop, range(n), chunksize)
    after a 1,000-job warm-up. timeout: the longest the warm-up plus the
    timed map may take (seconds)."""
    with multiprocessing.get_context("fork").Pool(workers, initializer=default_signals) as p:
        with deadline(timeout, f"Pool({workers}).imap_unordered chunksize={chunksize}"):
            return _timed_map(lambda k: p.imap_unordered(noop, range(k), chunksize=chunksize), n)


def bench_jobvisor_executor(n, prefetch=64, workers=2, timeout=None):
    """jobvisor.Executor("echo").map(noop, range(n)) on a pool of `workers`
    Python `--call` workers, every call a durable job, after a 1,000-call
    warm-up. timeout: the longest the whole map may take."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "python"))
    from jobvisor import Executor
    d = Daemon(prefetch, workers, python_call=True)
    try:
        with Executor("echo", socket=d.sock) as ex:
            return _timed_map(lambda k: ex.map(noop, range(k), timeout=timeout), n)
    finally:
        d.stop()


def bench_executor(n, chunksize=1, workers=2, timeout=None):
    """ProcessPoolExecutor(workers).map(noop, range(n), chunksize) after a
    1,000-job warm-up. timeout: the longest the whole map may take."""
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx,
                                                initializer=default_signals) as ex:
        return _timed_map(lambda k: ex.map(noop, range(k), chunksize=chunksize, timeout=timeout), n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--prefetch", type=int, default=64)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    n = 50_000 if a.quick else a.n
    if not os.path.exists(os.path.join(BIN, "jobvisord")):
        subprocess.run(["cargo", "build", "--release"], cwd=ROOT, check=True)
    res = {"n": n, "prefetch": a.prefetch}
    res["jobvisor"] = bench_jobvisor(n, a.prefetch)
    res["mp_pool_chunksize1"] = bench_pool(n)
    res["executor_chunksize1"] = bench_executor(min(n, 50_000))
    jv = res["jobvisor"]["jobs_per_s"]
    rows = [
        ("jobvisorctl map echo (2 workers, durable)", jv, 1.0),
        ("multiprocessing.Pool(2) imap_unordered chunksize=1", res["mp_pool_chunksize1"]["jobs_per_s"], None),
        ("ProcessPoolExecutor(2).map chunksize=1", res["executor_chunksize1"]["jobs_per_s"], None),
    ]
    md = [f"# Tiny jobs, N = {n} (prefetch {a.prefetch})", "", "| runner | jobs/s | jobvisor / runner |", "|---|---:|---:|"]
    print(f"{'runner':55} {'jobs/s':>12} {'jobvisor/x':>11}")
    for name, v, _ in rows:
        ratio = jv / v
        print(f"{name:55} {v:12,.0f} {ratio:11.2f}")
        md.append(f"| {name} | {v:,.0f} | {ratio:.2f} |")
    growth = res["jobvisor"]["store_bytes"] / n * 1e6
    res["store_bytes_per_million_jobs"] = growth
    extra = [
        f"submit --wait latency (whole CLI call): p50 {res['jobvisor']['submit_wait_ms_p50']:.2f} ms, p99 {res['jobvisor']['submit_wait_ms_p99']:.2f} ms",
        f"store growth: {growth / 2**20:.0f} MiB per million jobs (input+output+attempts, before pruning)",
    ]
    for e in extra:
        print(e)
    md += [""] + [f"- {e}" for e in extra]
    os.makedirs(os.path.join(ROOT, "bench", "out"), exist_ok=True)
    with open(os.path.join(ROOT, "bench", "out", "jobs.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(ROOT, "bench", "out", "jobs.md"), "w") as f:
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
