#!/usr/bin/env python3
"""jobvisor's side of the PostgreSQL burn-down (bench/pg_burndown.py), with
the same command line and output as the peers' drivers:

    python3 bench/pg_peers/jobvisor_bench.py --dsn postgres://USER@HOST:PORT/DB \
        --jobs 200000 --latency-jobs 1000 --procs 2

One node: a jobvisord with `[store] url = DSN` (default settings otherwise),
pool `noop` of --procs `jobvisor-worker echo` workers (the Rust no-op worker),
pool `lat` of --procs `python3 -m jobvisor.worker pg_latency:started` workers.

1. Burn-down: `noop` is paused (its node claims nothing), N jobs are submitted
   through the Python client, pipelined (at most WINDOW unanswered; each
   answer comes once the job's row is committed): enqueue_s. Then `resume
   noop`, and burn_s runs until no row is left in `jobvisor_jobs`, polled
   every 100 ms on a connection of the driver's own, as the peers' drivers
   do (psycopg, from the peers' venv); without psycopg, until the pool's
   `succeeded` count reaches N (`status`, whose shared-queue count costs the
   node's own connection a scan once a second: a little slower).
2. Latency: with the workers idle, --latency-jobs jobs to `lat`, one every
   10 ms (100/s), each carrying time.time() taken just before its submit; the
   worker answers its own time.time() at the start of the job; the latency is
   the difference.

Prints one JSON line (see bench/pg_peers/README.md). The daemon is the
release build in $JOBVISOR_BIN_DIR (default target/release).
"""
import argparse, json, os, shutil, signal, subprocess, sys, tempfile, time

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "python"))
import jobvisor  # noqa: E402
from jobvisor import client as jvc  # noqa: E402

BIN = os.environ.get("JOBVISOR_BIN_DIR", os.path.join(ROOT, "target", "release"))
WINDOW = 1024
PHASE_LIMIT = 1800.0


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def until(what, cond, limit=PHASE_LIMIT, step=0.1):
    end = time.monotonic() + limit
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > end:
            raise SystemExit(f"jobvisor_bench: {what}: not done within {limit:.0f} s")
        time.sleep(step)


def pool_status(c, name):
    return c.status(name)[0]


def submit_pipelined(c, pool, inputs):
    """Submits every input without waiting for the jobs, at most WINDOW
    answers outstanding; returns the ids."""
    opts = jvc._options(None, None, 0, None)
    ids, sent = [], 0
    for data in inputs:
        with jvc.submit_request(pool, data, opts, False) as (payload, fd):
            c.conn.send(payload, fd)
        sent += 1
        while sent - len(ids) >= WINDOW:
            ids.append(expect_submitted(c))
    while len(ids) < sent:
        ids.append(expect_submitted(c))
    return ids


def expect_submitted(c):
    kind, value = c.conn.recv()
    if kind != "submitted":
        raise SystemExit(f"jobvisor_bench: a submit was answered {kind}: {value}")
    return value


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--jobs", type=int, default=200_000)
    ap.add_argument("--latency-jobs", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--variant", default="default")  # one variant: the defaults
    args = ap.parse_args()

    d = tempfile.mkdtemp(prefix="jv-pgbench-")
    cfg = os.path.join(d, "jobvisor.toml")
    with open(cfg, "w") as f:
        f.write(f"""[daemon]
control_socket = "ctl.sock"
state_dir = "state"
[store]
url = {json.dumps(args.dsn)}
[pools.noop]
command = [{json.dumps(os.path.join(BIN, "jobvisor-worker"))}, "echo"]
workers = {args.procs}
queue_capacity = 10000000
[pools.lat]
command = ["python3", "-m", "jobvisor.worker", "pg_latency:started"]
workers = {args.procs}
""")
    env = dict(os.environ, JOBVISOR_LOG="warn",
               PYTHONPATH=os.path.join(ROOT, "python") + ":" + HERE)
    logf = open(os.path.join(d, "daemon.log"), "wb")
    proc = subprocess.Popen([os.path.join(BIN, "jobvisord"), "--config", cfg], cwd=d, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf,
                            start_new_session=True)
    ctl = [os.path.join(BIN, "jobvisorctl"), "--socket", os.path.join(d, "ctl.sock")]
    try:
        sock = os.path.join(d, "ctl.sock")
        until("the control socket", lambda: os.path.exists(sock) or proc.poll() is not None,
              limit=30, step=0.01)
        if proc.poll() is not None:
            raise SystemExit(f"jobvisor_bench: jobvisord exited {proc.returncode}: "
                             + open(os.path.join(d, "daemon.log"), errors="replace").read()[-2000:])
        c = jobvisor.Client(socket=sock)
        for pool in ("noop", "lat"):
            until(f"{pool}'s workers", lambda: sum(
                w["state"] == "ready" for w in pool_status(c, pool)["workers"]) >= args.procs,
                limit=60, step=0.02)
        subprocess.run(ctl + ["pause", "noop"], check=True, capture_output=True)

        n = args.jobs
        t0 = time.perf_counter()
        submit_pipelined(c, "noop", (b"" for _ in range(n)))
        enqueue_s = time.perf_counter() - t0
        log(f"jobvisor: {n} jobs enqueued in {enqueue_s:.2f} s")

        try:
            import psycopg
            poll = psycopg.connect(args.dsn, autocommit=True)
        except ImportError:
            poll = None
        subprocess.run(ctl + ["resume", "noop"], check=True, capture_output=True)
        t0 = time.perf_counter()
        if poll is not None:
            until("the burn-down", lambda: poll.execute(
                "SELECT NOT EXISTS (SELECT 1 FROM jobvisor_jobs)").fetchone()[0])
            burn_s = time.perf_counter() - t0
            errors = poll.execute(
                "SELECT count(*) FROM jobvisor_done WHERE state <> 2").fetchone()[0]
            poll.close()
        else:
            st = until("the burn-down", lambda: (lambda p: p if p["succeeded"] + p["failed"] >= n
                                                  else None)(pool_status(c, "noop")))
            burn_s = time.perf_counter() - t0
            errors = st["failed"]
        log(f"jobvisor: burned down in {burn_s:.2f} s ({n / burn_s:.0f} jobs/s)")

        # Latency: paced single submits.
        lats, ids = [], []
        for i in range(args.latency_jobs):
            t = time.time()
            ids.append((c.submit("lat", repr(t)), t))
            time.sleep(0.01)
        for job_id, t in ids:
            (doc,) = c.wait(job_id)
            if doc.state != "succeeded":
                errors += 1
                continue
            out = c.result(job_id).output
            lats.append((float(bytes(out)) - t) * 1000.0)
        lats.sort()
        p = lambda q: lats[min(len(lats) - 1, int(q * len(lats)))] if lats else None  # noqa: E731
        version = subprocess.run([os.path.join(BIN, "jobvisord"), "--version"],
                                 capture_output=True, text=True).stdout.split()[-1]
        print(json.dumps({
            "system": "jobvisor", "version": version, "jobs": n, "procs": args.procs,
            "settings": f"1 node, defaults (adaptive prefetch); {args.procs} jobvisor-worker echo "
                        "workers; submits pipelined through the Python client",
            "enqueue_s": round(enqueue_s, 3), "burn_s": round(burn_s, 3),
            "jobs_per_s": round(n / burn_s, 1), "latency_jobs": len(lats),
            "latency_p50_ms": p(0.50), "latency_p99_ms": p(0.99), "errors": errors,
        }), flush=True)
        c.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        logf.close()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
