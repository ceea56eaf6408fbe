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
import subprocess, sys, threading, time

sys.dont_write_bytecode = True  # no bench/__pycache__ in the checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import supervision as sv  # noqa: E402  (bench/supervision.py)

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


def bins():
    """The binaries in BIN (bench/run.py may point BIN elsewhere after import)."""
    return {b: os.path.join(BIN, b) for b in ("jobvisord", "jobvisorctl", "jobvisor-worker")}


def start_daemon(name, pool):
    """A fresh jobvisord (bench/supervision.py's Daemon) whose one pool,
    `echo`, is `pool`, with all its workers ready. Its log, at the default
    level (info), stays in its temp dir; stop_daemon removes both."""
    d = sv.Daemon(name, bins(), {"echo": pool}, log_level="info", log_to_file=True, keep_log=False)
    try:
        d.wait_ready_status("echo", pool["workers"], 20.0)
    except BaseException:
        stop_daemon(d)
        raise
    return d


def stop_daemon(d):
    """SIGTERM (SIGKILL after 15 s), then the temp dir with the store goes."""
    d.stop()
    shutil.rmtree(d.dir, ignore_errors=True)


def store_bytes(d):
    return sum(f.stat().st_size for f in (d.dir / "state").iterdir())


def thread_cpu(pid):
    """CPU seconds (user + system) of each thread of process pid, summed by
    thread name (the daemon's loop is `jobvisord`, its store thread
    `jobvisor-store`)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def bench_jobvisor(n, prefetch, submits=200, timeout=None, workers=2):
    """`jobvisorctl map echo` of n lines on a fresh daemon (`prefetch`
    pinned, or None for the default), then `submits`
    single `submit --wait` calls (0: none). timeout bounds each CLI call
    (seconds; None: unbounded)."""
    pool = {"command": [os.path.join(BIN, "jobvisor-worker"), "echo"], "workers": workers,
            "queue_capacity": 10_000_000}
    if prefetch is not None:  # None: the default (adaptive) prefetch
        pool["prefetch"] = prefetch
    d = start_daemon("jobs-echo", pool)
    ctl = [d.bins["jobvisorctl"], "--socket", str(d.socket)]
    try:
        data = "".join(f"{i}\n" for i in range(n)).encode()
        cpu0 = thread_cpu(d.pid)
        t = time.perf_counter()
        r = subprocess.run(ctl + ["map", "echo"], input=data,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
        dt = time.perf_counter() - t
        cpu1 = thread_cpu(d.pid)
        lines = r.stdout.count(b"\n")
        if r.returncode != 0 or lines != n:
            raise RuntimeError(f"map failed: rc={r.returncode} lines={lines} {r.stderr[:300]!r}")
        before = store_bytes(d)
        res = {"jobs_per_s": n / dt, "seconds": dt, "store_bytes": before,
               # CPU per job of the event loop and of the store thread
               # (clock ticks: coarse, hence a large N).
               "loop_us_per_job": (cpu1.get("jobvisord", 0) - cpu0.get("jobvisord", 0)) / n * 1e6,
               "store_us_per_job":
                   (cpu1.get("jobvisor-store", 0) - cpu0.get("jobvisor-store", 0)) / n * 1e6}
        # Single submits: latency of a whole CLI call (spawn, connect,
        # durable insert, run, durable result).
        lat = []
        for i in range(submits):
            t0 = time.perf_counter()
            rr = subprocess.run(ctl + ["submit", "echo", "--input", str(i), "--wait"],
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
        stop_daemon(d)


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
    sys.path.insert(0, os.path.join(ROOT, "python"))
    from jobvisor import Executor
    d = start_daemon("jobs-executor", {"command": PY_CALL, "env": {"PYTHONPATH": PY_PATH}, "workers": workers,
                                       "prefetch": prefetch, "queue_capacity": 10_000_000})
    try:
        with Executor("echo", socket=str(d.socket)) as ex:
            return _timed_map(lambda k: ex.map(noop, range(k), timeout=timeout), n)
    finally:
        stop_daemon(d)


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
    try:
        main()
    finally:
        sv.run_cleanups()  # a daemon whose start-up failed is left to the registry
