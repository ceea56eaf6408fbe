#!/usr/bin/env python3
"""PostgreSQL job queues side by side: a burn-down of no-op jobs on one
throwaway PostgreSQL server, jobvisor against Graphile Worker, pg-boss,
procrastinate, pgqueuer, and Celery with a Redis broker (issue 16).

    cargo build --release
    python3 bench/pg_burndown.py                 # 200,000 jobs each (~15-30 min)
    python3 bench/pg_burndown.py --jobs 20000 --latency-jobs 300    # quicker
    python3 bench/pg_burndown.py --only jobvisor,graphile-worker
    python3 bench/pg_burndown.py --only jobvisor,pg-boss,pgqueuer --variant tuned
    python3 bench/pg_burndown.py --variant tuned --repeat 3   # medians of 3 runs

What it does, in one invocation:
  1. starts its own PostgreSQL (the newest /usr/lib/postgresql/*/bin, apt-get
     installs `postgresql` when absent): initdb in a temp dir, loopback, trust,
     `synchronous_commit = on` (the default, stated), `max_connections = 200`,
     otherwise the distribution's defaults; and its own `redis-server` (apt
     `redis-server`), no persistence, for Celery;
  2. installs the peers where missing: `npm ci` in bench/pg_peers/node (pinned
     by its package-lock.json), a venv in bench/out/pgpeers-venv from
     bench/pg_peers/python/requirements.txt;
  3. runs each system's driver (bench/pg_peers/*) one after the other, each on
     a fresh database of that server: N jobs enqueued, then the workers
     (--procs processes, 2 = the cores) burn them down; then --latency-jobs
     jobs at 100/s measure enqueue -> start. Every driver prints one JSON line
     per variant (the library's defaults; a tuned variant where the driver
     has one);
  4. prints one table (jobs/s, burn and enqueue seconds, latency p50/p99, the
     ratio of jobvisor's jobs/s to each) and the verdict of the target,
     jobvisor >= 2x the best peer's jobs/s; writes bench/out/pg_burndown.json
     and bench/out/pg_burndown.md. Then, unless --no-requeue, the time for a
     killed node's running job to run again on another node (jobvisor), next
     to the peers' documented defaults.

Exit status: 0 when every driver ran (a missed target is a FAIL row), 1 when
one failed (its row says why), 130 on Ctrl-C. Every wait is bounded.
"""

import argparse, json, os, platform, pwd, shutil, signal, socket, subprocess, sys
import tempfile, time

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(HERE, "pg_peers")
OUT = os.path.join(HERE, "out")
VENV = os.path.join(OUT, "pgpeers-venv")
BIN = os.environ.get("JOBVISOR_BIN_DIR", os.path.join(ROOT, "target", "release"))
DRIVER_LIMIT = 3600.0  # seconds per driver run, all phases

# name -> (argv builder, needs)
SYSTEMS = ["jobvisor", "graphile-worker", "pg-boss", "procrastinate", "pgqueuer", "celery"]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv, **kw):
    kw.setdefault("check", True)
    return subprocess.run(argv, **kw)


def apt_install(*pkgs):
    if os.geteuid() != 0:
        raise SystemExit(f"pg_burndown: {' '.join(pkgs)} missing; install it (apt-get install "
                         f"{' '.join(pkgs)}) or run as root")
    log(f"apt-get install {' '.join(pkgs)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *pkgs], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        run(["apt-get", "update"], env=env, capture_output=True)
        run(["apt-get", "install", "-y", "--no-install-recommends", *pkgs], env=env,
            capture_output=True)


def pg_bin():
    base = "/usr/lib/postgresql"
    if not os.path.isdir(base) or not os.listdir(base):
        apt_install("postgresql")
    versions = sorted((int(v), v) for v in os.listdir(base) if v.isdigit()
                      and os.path.exists(os.path.join(base, v, "bin", "initdb")))
    if not versions:
        raise SystemExit("pg_burndown: no initdb under /usr/lib/postgresql")
    return os.path.join(base, versions[-1][1], "bin")


class Servers:
    """The throwaway PostgreSQL and Redis servers."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="jv-pgburn-")
        self.bin = pg_bin()
        self.pg_port = free_port()
        self.redis_port = None
        self.redis = None
        self.as_user = None
        if os.geteuid() == 0:
            self.as_user = pwd.getpwnam("postgres") if _has_user("postgres") else \
                pwd.getpwnam("nobody")
            os.chown(self.dir, self.as_user.pw_uid, self.as_user.pw_gid)
        data = os.path.join(self.dir, "data")
        self.pg(["initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                capture_output=True)
        opts = (f"-p {self.pg_port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                "-c synchronous_commit=on -c max_connections=200")
        self.pg(["pg_ctl", "-D", data, "-o", opts, "-l", os.path.join(self.dir, "pg.log"),
                 "-w", "-t", "60", "start"], capture_output=True)
        self.data = data
        self.version = self.pg(["postgres", "--version"], capture_output=True,
                               text=True).stdout.strip()

    def pg(self, argv, **kw):
        cmd = [os.path.join(self.bin, argv[0]), *argv[1:]]
        if self.as_user is not None:
            u = self.as_user

            def demote():
                os.setgid(u.pw_gid)
                os.setuid(u.pw_uid)
            kw["preexec_fn"] = demote
        kw.setdefault("cwd", self.dir)
        return run(cmd, **kw)

    def createdb(self, name):
        self.pg(["createdb", "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "postgres", name],
                capture_output=True)
        return f"postgres://postgres@127.0.0.1:{self.pg_port}/{name}"

    def start_redis(self):
        if shutil.which("redis-server") is None:
            apt_install("redis-server")
        self.redis_port = free_port()
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        end = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.redis_port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > end or self.redis.poll() is not None:
                raise SystemExit("pg_burndown: redis-server did not start")
            time.sleep(0.05)
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def stop(self):
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            try:
                self.redis.wait(10)
            except subprocess.TimeoutExpired:
                self.redis.kill()
        try:
            self.pg(["pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop"],
                    capture_output=True, check=False)
        except Exception:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _has_user(name):
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def ensure_node():
    d = os.path.join(PEERS, "node")
    if not os.path.isdir(os.path.join(d, "node_modules")):
        if shutil.which("npm") is None:
            raise RuntimeError("npm is missing (apt-get install nodejs npm)")
        log("npm ci in bench/pg_peers/node")
        run(["npm", "ci", "--no-audit", "--no-fund"], cwd=d, capture_output=True)
    return d


def ensure_venv():
    py = os.path.join(VENV, "bin", "python")
    stamp = os.path.join(VENV, "requirements.txt")
    req = os.path.join(PEERS, "python", "requirements.txt")
    if not os.path.exists(py) or not os.path.exists(stamp) \
            or open(stamp).read() != open(req).read():
        log(f"venv {VENV} with {req}")
        run([sys.executable, "-m", "venv", VENV], capture_output=True)
        run([py, "-m", "pip", "install", "-q", "-r", req], capture_output=True)
        shutil.copy(req, stamp)
    return py


def driver_argv(system, servers, jobs, latency_jobs, procs, variant="both", round_no=1):
    """The driver's command line; its database is fresh (a suffix per round
    of --repeat)."""
    common = ["--jobs", str(jobs), "--latency-jobs", str(latency_jobs), "--procs", str(procs)]
    suffix = "" if round_no == 1 else f"_r{round_no}"
    if system != "jobvisor":
        common += ["--variant", variant]
    if system == "jobvisor":
        # The venv's python: its psycopg polls for the end, as the peers do.
        return [ensure_venv(), os.path.join(PEERS, "jobvisor_bench.py"),
                "--dsn", servers.createdb("jobvisor" + suffix), *common]
    if system in ("graphile-worker", "pg-boss"):
        d = ensure_node()
        script = {"graphile-worker": "graphile.js", "pg-boss": "pgboss.js"}[system]
        return ["node", os.path.join(d, script), "--dsn",
                servers.createdb(system.replace("-", "_") + suffix), *common]
    py = ensure_venv()
    if system == "celery":
        url = servers.redis_url if getattr(servers, "redis_url", None) else servers.start_redis()
        servers.redis_url = url
        run(["redis-cli", "-p", str(servers.redis_port), "FLUSHALL"], capture_output=True,
            check=False)
        return [py, os.path.join(PEERS, "python", "celery_bench.py"), "--redis", url, *common]
    return [py, os.path.join(PEERS, "python", f"{system}_bench.py"), "--dsn",
            servers.createdb(system + suffix), *common]


def label(row):
    """The row's system, marked "(tuned)" when its settings are not the
    library's defaults and its name does not say so already."""
    name = row["system"]
    if "tuned" in row.get("settings", "").lower() and "tuned" not in name:
        name += " (tuned)"
    return name


def run_driver(system, argv):
    log(f"{system}: {' '.join(argv)}")
    t = time.monotonic()
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=DRIVER_LIMIT,
                           cwd=ROOT, start_new_session=True)
    except subprocess.TimeoutExpired as e:
        return [{"system": system, "error": f"no result within {DRIVER_LIMIT:.0f} s"}], \
            (e.stderr or "") if isinstance(e.stderr, str) else ""
    rows = []
    for line in r.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            row["system"] = label(row)
            rows.append(row)
    if r.returncode != 0 or not rows:
        tail = (r.stderr or "").strip().splitlines()[-5:]
        rows.append({"system": system, "error": f"exit {r.returncode}: " + " | ".join(tail)})
    log(f"{system}: done in {time.monotonic() - t:.0f} s")
    return rows, r.stderr


MEDIAN_KEYS = ("jobs_per_s", "burn_s", "enqueue_s", "latency_p50_ms", "latency_p99_ms")


def medians(rows):
    """One row per system label: with several runs (--repeat), each figure
    is the median of its runs (taken separately), and `runs_jobs_per_s`
    lists every run's jobs/s; a label with a failed run keeps the error."""
    by_label = {}
    for r in rows:
        by_label.setdefault(r["system"], []).append(r)
    out = []
    for label_, runs in by_label.items():
        bad = [r for r in runs if "error" in r]
        if bad or len(runs) == 1:
            out.append(bad[0] if bad else runs[0])
            continue
        row = dict(runs[0])
        for k in MEDIAN_KEYS:
            vals = sorted(r[k] for r in runs if r.get(k) is not None)
            if vals:
                mid = len(vals) // 2
                row[k] = vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
        row["runs_jobs_per_s"] = [r["jobs_per_s"] for r in runs]
        out.append(row)
    return out


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(rows, jv):
    head = (f"{'system':44} {'jobs/s':>9} {'burn s':>8} {'enqueue s':>9} {'p50 ms':>8} "
            f"{'p99 ms':>8} {'jobvisor/it':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['system']:44} ERROR: {r['error'][:200]}")
            continue
        ratio = jv / r["jobs_per_s"] if jv and r["jobs_per_s"] else None
        lines.append(
            f"{r['system'][:44]:44} {fmt(r['jobs_per_s'], '9.0f')} {fmt(r['burn_s'], '8.2f')} "
            f"{fmt(r.get('enqueue_s'), '9.2f')} {fmt(r.get('latency_p50_ms'), '8.2f')} "
            f"{fmt(r.get('latency_p99_ms'), '8.2f')} "
            f"{(format(ratio, '10.2f') + 'x') if ratio else '-':>11}")
    return "\n".join(lines)


def requeue_time(servers):
    """Two jobvisor nodes; a job runs on A (a 60 s sleep); A is killed with
    SIGKILL; seconds until the job's second attempt starts on B."""
    sys.path.insert(0, os.path.join(ROOT, "python"))
    import jobvisor
    dsn = servers.createdb("jobvisor_requeue")
    nodes = []
    env = dict(os.environ, JOBVISOR_LOG="warn",
               PYTHONPATH=os.path.join(ROOT, "python") + ":" + PEERS)
    try:
        for name in ("a", "b"):
            d = tempfile.mkdtemp(prefix=f"jv-requeue-{name}-")
            cfg = os.path.join(d, "jobvisor.toml")
            with open(cfg, "w") as f:
                f.write(f'[daemon]\ncontrol_socket = "ctl.sock"\nstate_dir = "state"\n'
                        f'[store]\nurl = {json.dumps(dsn)}\n[pools.slow]\n'
                        'command = ["python3", "-m", "jobvisor.worker", "pg_latency:sleep"]\n'
                        'workers = 1\n')
            p = subprocess.Popen([os.path.join(BIN, "jobvisord"), "--config", cfg], cwd=d,
                                 env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
            nodes.append((d, p))
            sock = os.path.join(d, "ctl.sock")
            wait_for("a control socket", lambda: os.path.exists(sock), 30)
            c = jobvisor.Client(socket=sock)
            wait_for("a ready worker", lambda: any(
                w["state"] == "ready" for w in c.status("slow")[0]["workers"]), 60)
            if name == "a":
                job = c.submit("slow", b"60")
                wait_for("the job running on A", lambda: c.status("slow")[0]["running"] == 1, 30)
            cb = c
        (da, pa) = nodes[0]
        t0 = time.monotonic()
        pa.kill()
        pa.wait()

        def second_attempt():
            (doc,) = cb.jobs(pool="slow", limit=1)
            return doc.id == job and len(doc.attempts) >= 2
        wait_for("the second attempt", second_attempt, 60, step=0.02)
        return time.monotonic() - t0
    finally:
        for d, p in nodes:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
            shutil.rmtree(d, ignore_errors=True)


def wait_for(what, cond, limit, step=0.05):
    end = time.monotonic() + limit
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError(f"{what}: not within {limit} s")
        time.sleep(step)


# Documented defaults for the rescue of a dead worker's jobs, from the
# peers' own documentation (sources in bench/README.md).
RESCUE_DEFAULTS = [
    ("Graphile Worker", "4 h to 4 h 10 min (a job stays locked 4 h; a sweep every 8-10 min "
                        "unlocks older ones; not configurable in the open-source version)"),
    ("pg-boss", "15 to 17 min (expireIn 15 min, checked by maintenance every 2 min in the "
                "10.4.2 code, 1 min in its docs)"),
    ("procrastinate", "never by itself (stalled after 30 s without a heartbeat, retried only "
                      "by a periodic task the user adds; the docs' example runs every 10 min)"),
    ("pgqueuer", "30 s (heartbeat_timeout: a picked job whose heartbeat is older is picked "
                 "again)"),
    ("Celery + Redis", "lost (acks early, the default); with acks_late, 1 h (visibility_timeout)"),
    ("River (not run)", "1 h (its rescuer's default)"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=200_000)
    ap.add_argument("--latency-jobs", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--only", default=",".join(SYSTEMS))
    ap.add_argument("--no-requeue", action="store_true")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each system (in interleaved rounds); each figure is then "
                         "the median of its runs")
    ap.add_argument("--variant", choices=["default", "tuned", "both"], default="both",
                    help="the peers' variants to run (jobvisor has one: its defaults)")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat: at least 1")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"pg_burndown: unknown system(s) {unknown}; known: {SYSTEMS}")
    for b in ("jobvisord", "jobvisorctl", "jobvisor-worker"):
        if not os.path.exists(os.path.join(BIN, b)):
            raise SystemExit(f"pg_burndown: {BIN}/{b} missing: cargo build --release first")
    os.makedirs(OUT, exist_ok=True)

    def on_signal(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_signal)
    servers = Servers()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    load0 = os.getloadavg()
    rows, failed = [], False
    try:
        log(f"{servers.version} on 127.0.0.1:{servers.pg_port}, synchronous_commit = on")
        # Rounds interleave the systems, so that a slow moment of the
        # machine falls on several of them rather than on every run of one.
        for round_no in range(1, args.repeat + 1):
            if args.repeat > 1:
                log(f"round {round_no} of {args.repeat}")
            for system in only:
                try:
                    argv = driver_argv(system, servers, args.jobs, args.latency_jobs,
                                       args.procs, args.variant, round_no)
                except Exception as e:  # an install that failed
                    rows.append({"system": system, "error": f"cannot set up: {e}"})
                    failed = True
                    continue
                got, _ = run_driver(system, argv)
                failed |= any("error" in r for r in got)
                rows.extend(got)
        all_runs = rows
        rows = medians(rows)
        jv = next((r["jobs_per_s"] for r in rows if r.get("system") == "jobvisor"
                   and "error" not in r), None)
        peers = [r for r in rows if r.get("system") != "jobvisor" and "error" not in r]
        best = max(peers, key=lambda r: r["jobs_per_s"]) if peers else None
        out = []
        if args.repeat > 1:
            out.append(f"each figure: the median of {args.repeat} runs (rounds interleave the "
                       "systems); jobs/s of every run:")
            out += [f"  {r['system']}: " + ", ".join(f"{v:.0f}" for v in r["runs_jobs_per_s"])
                    for r in rows if "runs_jobs_per_s" in r]
            out.append("")
        out += [table(rows, jv), ""]
        verdict = None
        if jv and best:
            ratio = jv / best["jobs_per_s"]
            verdict = {"best_peer": best["system"], "best_peer_jobs_per_s": best["jobs_per_s"],
                       "jobvisor_jobs_per_s": jv, "ratio": ratio, "target": 2.0,
                       "ok": ratio >= 2.0}
            out.append(f"target: jobvisor >= 2x the best peer ({best['system']}, "
                       f"{best['jobs_per_s']:.0f} jobs/s): {ratio:.2f}x "
                       f"{'ok' if ratio >= 2.0 else 'FAIL'}")
        requeue = None
        if not args.no_requeue:
            try:
                requeue = requeue_time(servers)
                out.append("")
                out.append(f"a killed node's running job runs again elsewhere after: jobvisor "
                           f"{requeue:.1f} s (measured: kill -9, second attempt started)")
            except Exception as e:
                out.append(f"requeue time: ERROR {e}")
                failed = True
            out.append("documented defaults of the peers for a dead worker's jobs:")
            for name, what in RESCUE_DEFAULTS:
                out.append(f"  {name:18} {what}")
        text = "\n".join(out)
        print(text)
        report = {
            "command": " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
            "started": started, "postgres": servers.version,
            "postgres_settings": "synchronous_commit=on, max_connections=200, else defaults",
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                        "load_start": load0, "load_end": os.getloadavg()},
            "jobs": args.jobs, "latency_jobs": args.latency_jobs, "procs": args.procs,
            "repeat": args.repeat, "rows": rows, "runs": all_runs if args.repeat > 1 else None,
            "verdict": verdict, "requeue_s": requeue,
            "rescue_defaults": RESCUE_DEFAULTS,
        }
        with open(os.path.join(OUT, "pg_burndown.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(OUT, "pg_burndown.md"), "w") as f:
            f.write(f"# PostgreSQL burn-down, {started}\n\n`{report['command']}`, "
                    f"{servers.version}, load {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}\n\n"
                    "```\n" + text + "\n```\n")
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        servers.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
