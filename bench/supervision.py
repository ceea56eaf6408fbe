#!/usr/bin/env python3
"""Supervision benchmark for jobvisor (restart latency, pm2 comparison, idle
cost, crash loop, long life).

    python3 bench/supervision.py [--quick]

Binaries come from $JOBVISOR_BIN_DIR (default: <repo>/target/release).
Results: bench/out/supervision.json, bench/out/supervision.md, daemon logs in
bench/out/logs/. See bench/README.md for what each section measures.

Exit status: 0 when every section ran, 1 when a section aborted (timeout or
error; the other sections still run), 130 on Ctrl-C. Missed targets are
reported as FAIL in the table but do not change the exit status.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
LOGS = OUT / "logs"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


class SectionError(Exception):
    """A bounded step failed (timeout, unexpected state): aborts one section."""


# --------------------------------------------------------------------------
# cleanup registry: everything started is registered here and torn down in
# reverse order, on success, on error and on Ctrl-C / SIGTERM.

_CLEANUPS = []


def on_cleanup(fn):
    _CLEANUPS.append(fn)
    return fn


def run_cleanups(down_to=0):
    """Runs (and forgets) the cleanups registered after the first `down_to`."""
    while len(_CLEANUPS) > down_to:
        fn = _CLEANUPS.pop()
        try:
            fn()
        except Exception as e:  # keep cleaning
            print(f"cleanup: {e}", file=sys.stderr)


def _sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------
# small helpers


def now():
    return time.perf_counter()


def pct(values, p):
    """Percentile with linear interpolation (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary_ms(seconds):
    ms = [x * 1000.0 for x in seconds]
    return {
        "n": len(ms),
        "min": min(ms),
        "median": statistics.median(ms),
        "mean": statistics.fmean(ms),
        "p90": pct(ms, 90),
        "p99": pct(ms, 99),
        "max": max(ms),
    }


def read_text(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return None


def proc_cmdline(pid):
    t = read_text(f"/proc/{pid}/cmdline")
    return t.split("\0") if t else []


def proc_stat(pid):
    """Fields of /proc/PID/stat after the comm field (index 0 = state)."""
    t = read_text(f"/proc/{pid}/stat")
    if t is None:
        return None
    return t[t.rindex(")") + 2:].split()


def proc_cpu_ticks(pid):
    f = proc_stat(pid)
    if f is None:
        raise SectionError(f"process {pid} is gone")
    return int(f[11]) + int(f[12])  # utime, stime


def proc_status(pid):
    t = read_text(f"/proc/{pid}/status")
    if t is None:
        raise SectionError(f"process {pid} is gone")
    d = {}
    for line in t.splitlines():
        k, _, v = line.partition(":")
        d[k] = v.strip()
    return d


def status_kib(d, key):
    return int(d.get(key, "0 kB").split()[0])


def proc_tasks(pid):
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def proc_ctx(pid):
    """(voluntary, involuntary) context switches: leader only and all threads."""
    lead = proc_status(pid)
    lv = int(lead["voluntary_ctxt_switches"])
    li = int(lead["nonvoluntary_ctxt_switches"])
    tv = ti = 0
    for tid in proc_tasks(pid):
        t = read_text(f"/proc/{pid}/task/{tid}/status")
        if t is None:
            continue
        for line in t.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                tv += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                ti += int(line.split()[1])
    return {"leader": lv + li, "all_threads": tv + ti}


def proc_schedstat_ns(pid):
    total = 0
    for tid in proc_tasks(pid):
        t = read_text(f"/proc/{pid}/task/{tid}/schedstat")
        if t:
            total += int(t.split()[0])
    return total


def proc_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def children_of(ppid):
    """(pid, state) of every process whose parent is ppid (scans /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = proc_stat(name)
        if f and int(f[1]) == ppid:
            out.append((int(name), f[0]))
    return out


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # inline table, e.g. a pool's env
        return "{ " + ", ".join(f"{toml_value(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


# --------------------------------------------------------------------------
# daemon driver


READY_RE = re.compile(r"pool (\S+) worker (\d+) ready \(pid (\d+)\)")
SPAWNED_RE = re.compile(r"pool (\S+) worker (\d+) spawned \(pid (\d+)\)")
EXITED_RE = re.compile(r"pool (\S+) worker (\d+) \(pid (\d+)\) exited: (.*) after \S+$")
LEVEL_RE = re.compile(r"^jobvisord: (\w+): ")


class LogWatcher(threading.Thread):
    """Reads the daemon's stderr, timestamps each chunk on arrival and indexes
    worker events (ready / spawned / exited) for the waiting bench thread."""

    def __init__(self, fd):
        super().__init__(daemon=True, name="jobvisord-stderr")
        self.fd = fd
        self.cond = threading.Condition()
        self.lines = []  # (ts, text)
        self.ready = {}  # (pool, slot) -> (pid, ts)   latest Ready per slot
        self.ready_pid = {}  # pid -> ts
        self.spawned_pid = {}  # pid -> ts
        self.exited_pid = {}  # pid -> (ts, description)
        self.eof = False

    def run(self):
        buf = b""
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except OSError:
                data = b""
            ts = now()
            if not data:
                with self.cond:
                    self.eof = True
                    self.cond.notify_all()
                return
            buf += data
            *complete, buf = buf.split(b"\n")
            with self.cond:
                for raw in complete:
                    line = raw.decode("utf-8", "replace")
                    self.lines.append((ts, line))
                    m = READY_RE.search(line)
                    if m:
                        pid = int(m[3])
                        self.ready[(m[1], int(m[2]))] = (pid, ts)
                        self.ready_pid[pid] = ts
                        continue
                    m = SPAWNED_RE.search(line)
                    if m:
                        self.spawned_pid[int(m[3])] = ts
                        continue
                    m = EXITED_RE.search(line)
                    if m:
                        self.exited_pid[int(m[3])] = (ts, m[4])
                self.cond.notify_all()

    def wait_for(self, pred, timeout, what):
        with self.cond:
            ok = self.cond.wait_for(lambda: pred() or self.eof, timeout)
            if ok and pred():
                return
        if self.eof:
            raise SectionError(f"daemon exited while waiting for {what}")
        raise SectionError(f"timeout ({timeout}s) waiting for {what}")


class Daemon:
    def __init__(self, name, bins, pools, log_level="debug", log_to_file=False, state_dir=None,
                 payload_dir=None, keep_log=True):
        """state_dir: the store's directory (default: "state" in the temp dir);
        payload_dir: where large payloads go (default: the daemon's, in state_dir);
        keep_log: False puts the log in the temp dir, which goes with it,
        instead of LOGS."""
        self.name = name
        self.bins = bins
        self.dir = Path(tempfile.mkdtemp(prefix=f"jvbench-{name}-"))
        on_cleanup(lambda: shutil.rmtree(self.dir, ignore_errors=True))
        self.config = self.dir / "jobvisor.toml"
        self.socket = self.dir / "ctl.sock"
        self.log_path = (LOGS if keep_log else self.dir) / f"{name}.daemon.log"
        self.pools = pools
        self.seen_worker_pids = set()
        lines = ["[daemon]", 'control_socket = "ctl.sock"',
                 f"state_dir = {toml_value(str(state_dir) if state_dir else 'state')}"]
        if payload_dir:
            lines.append(f"payload_dir = {toml_value(str(payload_dir))}")
        lines.append("")
        for pool, keys in pools.items():
            lines.append(f"[pools.{pool}]")
            for k, v in keys.items():
                lines.append(f"{k} = {toml_value(v)}")
            lines.append("")
        self.config.write_text("\n".join(lines))
        chk = subprocess.run(
            [bins["jobvisord"], "--check", "--config", str(self.config)],
            capture_output=True, text=True, timeout=30,
        )
        if chk.returncode != 0:
            raise SectionError(f"config refused: {chk.stderr.strip() or chk.stdout.strip()}")
        env = dict(os.environ, JOBVISOR_LOG=log_level)
        env.pop("JOURNAL_STREAM", None)
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        env.pop("LISTEN_FDS", None)
        self.log_file = None
        if log_to_file:
            self.log_file = open(self.log_path, "wb")
            stderr = self.log_file
        else:
            stderr = subprocess.PIPE
        self.proc = subprocess.Popen(
            [bins["jobvisord"], "--config", str(self.config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            env=env, cwd=self.dir, start_new_session=True,
        )
        self.pid = self.proc.pid
        self.exit_code = None
        self.shutdown_s = None
        on_cleanup(self.stop)
        self.watch = None
        if not log_to_file:
            self.watch = LogWatcher(self.proc.stderr.fileno())
            self.watch.start()
        self.wait_socket(10.0)

    # -- control
    def wait_socket(self, timeout):
        deadline = now() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise SectionError(f"jobvisord exited with {self.proc.returncode} at start-up")
            if now() > deadline:
                raise SectionError(f"timeout ({timeout}s) waiting for the control socket")
            time.sleep(0.005)

    def ctl_argv(self, *args):
        return [self.bins["jobvisorctl"], "--socket", str(self.socket), "--json", *args]

    def ctl(self, *args, timeout=10.0):
        try:
            r = subprocess.run(self.ctl_argv(*args), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SectionError(f"jobvisorctl {' '.join(args)} timed out after {timeout}s")
        if r.returncode != 0:
            raise SectionError(f"jobvisorctl {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def status(self):
        st = self.ctl("status")
        pools = {p["name"]: p for p in st["pools"]}
        for p in pools.values():
            for w in p["workers"]:
                if w.get("pid"):
                    self.seen_worker_pids.add(w["pid"])
        return pools

    def wait_ready_status(self, pool, n, timeout):
        """Polls status until pool has n workers in state ready."""
        deadline = now() + timeout
        while True:
            p = self.status()[pool]
            ws = [w for w in p["workers"] if w["state"] == "ready"]
            if len(ws) >= n:
                return p
            if now() > deadline:
                raise SectionError(f"timeout ({timeout}s) waiting for {n} ready workers in pool {pool}: {p}")
            time.sleep(0.02)

    def wait_ready_log(self, pool, n, timeout):
        w = self.watch
        w.wait_for(lambda: sum(1 for (p, _) in w.ready if p == pool) >= n, timeout,
                   f"{n} ready workers in pool {pool}")
        with w.cond:
            return {slot: pid for (p, slot), (pid, _) in w.ready.items() if p == pool}

    def check_alive(self):
        if self.proc.poll() is not None:
            raise SectionError(f"jobvisord died (exit {self.proc.returncode})")

    # -- teardown
    def stop(self):
        if self.proc.poll() is None:
            t0 = now()
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=15)
                self.shutdown_s = now() - t0
            except subprocess.TimeoutExpired:
                print(f"[{self.name}] jobvisord ignored SIGTERM for 15 s; SIGKILL", file=sys.stderr)
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.exit_code = self.proc.returncode
        # workers die with the daemon (PDEATHSIG); make sure of it
        for pid in sorted(self.seen_worker_pids | self.log_worker_pids()):
            cmd = proc_cmdline(pid)
            if cmd and any("jobvisor-worker" in c for c in cmd[:1]):
                st = proc_stat(pid)
                if st and st[0] != "Z":
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
        if self.watch is not None:
            self.watch.join(timeout=5)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "w") as f:
                for _, line in self.watch.lines:
                    f.write(line + "\n")
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    def log_worker_pids(self):
        if self.watch is None:
            return set()
        with self.watch.cond:
            return set(self.watch.spawned_pid) | set(self.watch.ready_pid)

    def log_problems(self, expected=("exited: killed by SIGKILL",)):
        """Warn/error lines other than the expected ones, grouped by shape."""
        text = read_text(self.log_path) or ""
        counts = {}
        total = 0
        for line in text.splitlines():
            m = LEVEL_RE.match(line)
            if not m or m[1] not in ("warn", "error"):
                continue
            if any(e in line for e in expected):
                continue
            total += 1
            shape = re.sub(r"\d+", "N", line)
            if shape not in counts:
                counts[shape] = [0, line]
            counts[shape][0] += 1
        top = sorted(counts.values(), key=lambda x: -x[0])[:5]
        return {"unexpected_warn_error_lines": total,
                "examples": [f"{n}x {line}" for n, line in top]}


def _frame(payload):
    return struct.pack("<I", len(payload)) + payload


def _read_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise SectionError("the daemon closed the control connection")
        buf += chunk
    return buf


def _read_frame(sock):
    (n,) = struct.unpack("<I", _read_exact(sock, 4))
    return _read_exact(sock, n)


# bincode 2 standard config (varint): Request::Hello{protocol_version: 1} and
# Request::Status{pool: None}; Response::Hello is variant 0, Response::Status 1.
RAW_HELLO = _frame(b"\x00\x01")
RAW_STATUS = _frame(b"\x01\x00")


def raw_status_rtt(sock_path, expect=b""):
    """In-process control client: connect + Hello + Status, no process spawn.
    Returns seconds; raises SectionError if the answer is not as expected."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10.0)
    try:
        t0 = now()
        s.connect(str(sock_path))
        s.sendall(RAW_HELLO)
        h = _read_frame(s)
        s.sendall(RAW_STATUS)
        r = _read_frame(s)
        t1 = now()
    except socket.timeout:
        raise SectionError("raw control client: no answer within 10 s")
    finally:
        s.close()
    if not h or h[0] != 0 or not r or r[0] != 1 or expect not in r:
        raise SectionError(f"raw control client: unexpected answer (protocol changed?) {h[:8]!r} {r[:8]!r}")
    return t1 - t0


def spawn_floor(bins, argv_tail=("--socket", "/nonexistent/jvbench.sock", "--json", "status")):
    """A jobvisorctl run that fails at connect (exit 3): process start cost."""
    a = now()
    subprocess.run([bins["jobvisorctl"], *argv_tail], capture_output=True, timeout=10)
    return now() - a


def zombies_of(pid):
    return [c for c, state in children_of(pid) if state == "Z"]


def echo_pool(bins, workers, **extra):
    d = {"command": [str(bins["jobvisor-worker"]), "echo"], "workers": workers}
    d.update(extra)
    return d


def kill_worker(pid):
    cmd = proc_cmdline(pid)
    if not cmd or "jobvisor-worker" not in cmd[0]:
        raise SectionError(f"pid {pid} is not a live jobvisor-worker ({cmd!r})")
    os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------
# sections


def sec_restart(ctx, res):
    bins = ctx["bins"]
    n_kills, n_warm, slots = 200, 5, 8
    d = Daemon("restart", bins, {"echo": echo_pool(
        bins, slots, healthy_after="0s", backoff_initial="0s",
        max_restarts=1_000_000_000, restart_window="1s")})
    w = d.watch
    cur = d.wait_ready_log("echo", slots, 20.0)
    lat, to_exit, to_spawn = [], [], []
    for i in range(n_warm + n_kills):
        slot = i % slots
        old = cur[slot]
        t0 = now()
        kill_worker(old)
        w.wait_for(lambda: w.ready[("echo", slot)][0] != old, 5.0,
                   f"replacement of worker {slot} (pid {old}) to be ready (kill #{i})")
        with w.cond:
            new, t_ready = w.ready[("echo", slot)]
            t_exit = w.exited_pid.get(old, (None,))[0]
            t_spawn = w.spawned_pid.get(new)
        cur[slot] = new
        if i < n_warm:
            continue
        lat.append(t_ready - t0)
        if t_exit is not None:
            to_exit.append(t_exit - t0)
        if t_spawn is not None:
            to_spawn.append(t_spawn - t0)
    time.sleep(0.2)
    d.check_alive()
    st = d.status()["echo"]
    m = res["metrics"]
    m["kills"] = n_kills
    m["warmup_kills_discarded"] = n_warm
    m["latency_ms"] = summary_ms(lat)
    m["kill_to_exited_line_ms_median"] = statistics.median(to_exit) * 1000 if to_exit else None
    m["kill_to_spawned_line_ms_median"] = statistics.median(to_spawn) * 1000 if to_spawn else None
    m["pool_state_after"] = st["state"]
    m["workers_ready_after"] = sum(1 for x in st["workers"] if x["state"] == "ready")
    m["restarts_counted"] = sum(x["restarts"] for x in st["workers"])
    m["zombies_after"] = len(zombies_of(d.pid))
    m["daemon_rss_mib"] = status_kib(proc_status(d.pid), "VmRSS") / 1024
    d.stop()
    m["daemon_exit_code"] = d.exit_code
    m["daemon_shutdown_ms"] = d.shutdown_s * 1000 if d.shutdown_s is not None else None
    m["log"] = d.log_problems()
    ctx["jobvisor_restart_median_ms"] = m["latency_ms"]["median"]
    rows = res["rows"]
    L = m["latency_ms"]
    rows.append(("restart latency median", f"{L['median']:.3f} ms", "< 2 ms", L["median"] < 2.0))
    rows.append(("restart latency p90 / p99 / max",
                 f"{L['p90']:.3f} / {L['p99']:.3f} / {L['max']:.3f} ms", "", None))
    rows.append(("  kill->exit logged / ->spawned (median)",
                 f"{m['kill_to_exited_line_ms_median']:.3f} / {m['kill_to_spawned_line_ms_median']:.3f} ms"
                 if to_exit and to_spawn else "n/a", "", None))


def find_pm2(ctx, res):
    pm2 = shutil.which("pm2")
    if pm2:
        return pm2
    npm = shutil.which("npm")
    if not npm:
        return None, "pm2 missing and npm not found"
    print("  pm2 not found: npm install -g pm2 ...", flush=True)
    try:
        r = subprocess.run([npm, "install", "-g", "pm2"], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return None, "npm install -g pm2 timed out after 600 s"
    res["metrics"]["pm2_install"] = "npm install -g pm2: exit %d" % r.returncode
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return None, "npm install -g pm2 failed: " + " | ".join(tail)
    pm2 = shutil.which("pm2")
    if not pm2:
        try:
            prefix = subprocess.run([npm, "prefix", "-g"], capture_output=True, text=True,
                                    timeout=30).stdout.strip()
            cand = Path(prefix) / "bin" / "pm2"
            if cand.exists():
                pm2 = str(cand)
        except Exception:
            pass
    if not pm2:
        return None, "npm install -g pm2 succeeded but no pm2 binary was found on PATH"
    return pm2


def sec_pm2(ctx, res):
    found = find_pm2(ctx, res)
    if isinstance(found, tuple):
        res["skipped"] = found[1]
        res["rows"].append(("pm2 restart latency", "skipped", "", None))
        print(f"  pm2 skipped: {found[1]}", flush=True)
        return
    pm2 = found
    m = res["metrics"]
    version = None
    try:
        pkg = Path(os.path.realpath(pm2)).parent.parent / "package.json"
        version = json.loads(pkg.read_text())["version"]
    except Exception:
        pass
    m["pm2_version"] = version
    n_kills, n_warm = 50, 3
    sleep_bin = shutil.which("sleep") or "/bin/sleep"
    home = Path(tempfile.mkdtemp(prefix="jvbench-pm2-"))
    on_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))
    env = dict(os.environ, PM2_HOME=str(home / "pm2home"))
    eco = home / "ecosystem.json"
    eco.write_text(json.dumps({"apps": [{
        "name": "sleeper", "script": sleep_bin, "args": "100000", "interpreter": "none",
        "exec_mode": "fork", "autorestart": True, "restart_delay": 0, "max_restarts": 100000,
    }]}))
    state = {"god": None, "sleeps": set(), "cleaned": False}

    def pm2_cleanup():
        if state["cleaned"]:
            return
        state["cleaned"] = True
        try:
            subprocess.run([pm2, "kill"], env=env, capture_output=True, timeout=30)
        except Exception as e:
            print(f"pm2 kill: {e}", file=sys.stderr)
        time.sleep(0.2)
        god = state["god"]
        if god and proc_stat(god) and proc_stat(god)[0] != "Z":
            try:
                os.kill(god, signal.SIGKILL)
            except OSError:
                pass
        for pid in state["sleeps"]:
            cmd = proc_cmdline(pid)
            if cmd and cmd[0] == sleep_bin and cmd[1:2] == ["100000"]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
    on_cleanup(pm2_cleanup)

    r = subprocess.run([pm2, "start", str(eco)], env=env, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SectionError(f"pm2 start failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-300:]}")
    pidfile = home / "pm2home" / "pm2.pid"
    deadline = now() + 20
    while not pidfile.exists():
        if now() > deadline:
            raise SectionError("no pm2.pid after pm2 start")
        time.sleep(0.05)
    god = int(pidfile.read_text().strip())
    state["god"] = god

    def is_sleep_child(pid):
        f = proc_stat(pid)
        if not f or int(f[1]) != god or f[0] == "Z":
            return False
        cmd = proc_cmdline(pid)
        return bool(cmd) and cmd[0] == sleep_bin

    def find_sleep(timeout):
        deadline = now() + timeout
        while True:
            for pid, st in children_of(god):
                if is_sleep_child(pid):
                    return pid
            if now() > deadline:
                raise SectionError(f"no sleep child of the pm2 daemon (pid {god}) after {timeout}s")
            time.sleep(0.01)

    cur = find_sleep(20)
    state["sleeps"].add(cur)
    lat = []
    for i in range(n_warm + n_kills):
        time.sleep(0.05)  # let pm2 finish its bookkeeping of the previous restart
        before = set(os.listdir("/proc"))
        rejected = set()
        t0 = now()
        os.kill(cur, signal.SIGKILL)
        deadline = t0 + 10.0
        new = None
        while new is None:
            for name in os.listdir("/proc"):
                if name in before or name in rejected or not name.isdigit():
                    continue
                pid = int(name)
                f = proc_stat(pid)
                if not f or int(f[1]) != god:
                    rejected.add(name)
                    continue
                if is_sleep_child(pid):  # exec done (before: node's pre-exec fork)
                    new = pid
                    break
            if new is None:
                if now() > deadline:
                    raise SectionError(f"pm2 did not restart sleep within 10 s (kill #{i})")
                time.sleep(0.0001)
        t1 = now()
        state["sleeps"].add(new)
        cur = new
        if i >= n_warm:
            lat.append(t1 - t0)
    m["kills"] = n_kills
    m["warmup_kills_discarded"] = n_warm
    m["latency_ms"] = summary_ms(lat)
    try:
        jl = subprocess.run([pm2, "jlist"], env=env, capture_output=True, text=True, timeout=30)
        apps = json.loads(jl.stdout[jl.stdout.index("["):])
        m["pm2_restart_time_counter"] = apps[0]["pm2_env"].get("restart_time")
    except Exception:
        pass
    pm2_cleanup()
    L = m["latency_ms"]
    rows = res["rows"]
    rows.append((f"pm2 {version or ''} restart latency median (new sleep pid exec'd)",
                 f"{L['median']:.3f} ms", "", None))
    rows.append(("pm2 p90 / p99 / max", f"{L['p90']:.3f} / {L['p99']:.3f} / {L['max']:.3f} ms", "", None))
    jv = ctx.get("jobvisor_restart_median_ms")
    if jv:
        m["ratio_pm2_over_jobvisor"] = L["median"] / jv
        rows.append(("ratio pm2 / jobvisor (median)", f"{L['median'] / jv:.1f}x", "> 1", L["median"] / jv > 1))


def sec_idle(ctx, res):
    bins = ctx["bins"]
    window = 10.0 if ctx["quick"] else 30.0
    d = Daemon("idle", bins, {"echo": echo_pool(bins, 8)})
    workers = d.wait_ready_log("echo", 8, 20.0)
    time.sleep(2.0)  # settle: start-up work done
    wpids = list(workers.values())
    pid = d.pid
    c0, s0, x0 = proc_cpu_ticks(pid), proc_schedstat_ns(pid), proc_ctx(pid)
    wx0 = sum(proc_ctx(p)["all_threads"] for p in wpids)
    t0 = now()
    time.sleep(window)
    t1 = now()
    c1, s1, x1 = proc_cpu_ticks(pid), proc_schedstat_ns(pid), proc_ctx(pid)
    wx1 = sum(proc_ctx(p)["all_threads"] for p in wpids)
    st = proc_status(pid)
    el = t1 - t0
    m = res["metrics"]
    m["window_s"] = el
    m["daemon_threads"] = int(st["Threads"])
    m["cpu_ms_stat"] = (c1 - c0) * 1000.0 / CLK_TCK
    m["cpu_ms_schedstat"] = (s1 - s0) / 1e6
    m["wakeups_per_s"] = (x1["all_threads"] - x0["all_threads"]) / el
    m["wakeups_per_s_leader_only"] = (x1["leader"] - x0["leader"]) / el
    m["worker_wakeups_per_s_all8"] = (wx1 - wx0) / el
    m["rss_mib"] = status_kib(st, "VmRSS") / 1024
    m["hwm_mib"] = status_kib(st, "VmHWM") / 1024
    m["daemon_fds"] = proc_fds(pid)
    m["log_lines_during_window"] = sum(1 for ts, _ in d.watch.lines if t0 <= ts <= t1)
    # status latency on an idle daemon, for comparison with the crash loop
    lat = []
    for _ in range(200):
        a = now()
        r = subprocess.run(d.ctl_argv("status"), capture_output=True, timeout=10)
        lat.append(now() - a)
        if r.returncode != 0:
            raise SectionError(f"jobvisorctl status exited {r.returncode}: {r.stderr.decode().strip()}")
    m["ctl_status_ms_idle"] = summary_ms(lat)
    m["ctl_spawn_floor_ms_idle"] = summary_ms([spawn_floor(bins) for _ in range(200)])
    try:
        m["raw_status_ms_idle"] = summary_ms([raw_status_rtt(d.socket, b"echo") for _ in range(200)])
    except (SectionError, OSError) as e:
        m["raw_status_ms_idle"] = f"n/a: {e}"
    d.stop()
    m["daemon_exit_code"] = d.exit_code
    m["log"] = d.log_problems()
    rows = res["rows"]
    rows.append((f"idle daemon CPU over {el:.0f} s (stat / schedstat)",
                 f"{m['cpu_ms_stat']:.0f} / {m['cpu_ms_schedstat']:.2f} ms", "~0", m["cpu_ms_schedstat"] < 5))
    rows.append(("idle daemon wakeups (ctx switches, all threads)",
                 f"{m['wakeups_per_s']:.2f} /s", "~0 /s", m["wakeups_per_s"] < 0.5))
    rows.append(("idle daemon RSS", f"{m['rss_mib']:.2f} MiB", "< 10 MiB", m["rss_mib"] < 10))
    rows.append(("idle workers wakeups (8 workers together)",
                 f"{m['worker_wakeups_per_s_all8']:.2f} /s", "", None))
    L = m["ctl_status_ms_idle"]
    rows.append(("jobvisorctl status, idle daemon p50 / p99",
                 f"{L['median']:.2f} / {L['p99']:.2f} ms", "", None))
    F = m["ctl_spawn_floor_ms_idle"]
    rows.append(("  jobvisorctl start-up floor (no daemon) p50 / p99",
                 f"{F['median']:.2f} / {F['p99']:.2f} ms", "", None))
    R = m["raw_status_ms_idle"]
    rows.append(("  in-process status round trip p50 / p99",
                 f"{R['median']:.3f} / {R['p99']:.3f} ms" if isinstance(R, dict) else R, "", None))


def sec_crash(ctx, res):
    bins = ctx["bins"]
    duration, n_calls = 10.0, 200
    m = res["metrics"]
    base = {"command": ["/bin/false"], "workers": 2, "backoff_initial": "0s",
            "max_restarts": 1_000_000_000, "restart_window": "1s"}
    try:
        d = Daemon("crash", bins, {"crash": dict(base, backoff_max="0s"), "echo": echo_pool(bins, 2)},
                   log_level="info", log_to_file=True)
        m["backoff_max"] = "0s"
    except SectionError as e:
        if "config refused" not in str(e):
            raise
        m["backoff_max"] = "1ms"
        m["backoff_max_0s_refused"] = str(e)
        d = Daemon("crash", bins, {"crash": dict(base, backoff_max="1ms"), "echo": echo_pool(bins, 2)},
                   log_level="info", log_to_file=True)
    p = d.wait_ready_status("echo", 2, 20.0)
    echo_pids = sorted(w["pid"] for w in p["workers"])
    time.sleep(1.0)  # warm-up of the loop
    pools = d.status()
    r0 = sum(w["restarts"] for w in pools["crash"]["workers"])
    cpu0, ts0 = proc_schedstat_ns(d.pid), now()
    lat, changed, crash_states = [], [], set()
    floor, raw, raw_err = [], [], None
    interval = duration / n_calls
    for i in range(n_calls):
        slot_t = ts0 + i * interval
        delay = slot_t - now()
        if delay > 0:
            time.sleep(delay)
        a = now()
        try:
            r = subprocess.run(d.ctl_argv("status"), capture_output=True, timeout=10)
        except subprocess.TimeoutExpired:
            raise SectionError("jobvisorctl status timed out after 10 s during the crash loop")
        lat.append(now() - a)
        if r.returncode != 0:
            raise SectionError(f"jobvisorctl status exited {r.returncode}: {r.stderr.decode().strip()}")
        st = {x["name"]: x for x in json.loads(r.stdout)["pools"]}
        pids = sorted(w["pid"] for w in st["echo"]["workers"])
        if pids != echo_pids:
            changed.append(pids)
        crash_states.add(st["crash"]["state"])
        floor.append(spawn_floor(bins))
        if raw_err is None:
            try:
                raw.append(raw_status_rtt(d.socket, b"crash"))
            except (SectionError, OSError) as e:
                raw_err = f"n/a: {e}"
    pools = d.status()
    ts1, cpu1 = now(), proc_schedstat_ns(d.pid)
    r1 = sum(w["restarts"] for w in pools["crash"]["workers"])
    d.check_alive()
    el = ts1 - ts0
    m["window_s"] = el
    m["deaths"] = r1 - r0
    m["deaths_per_s"] = (r1 - r0) / el
    m["daemon_cpu_percent"] = (cpu1 - cpu0) / 1e9 / el * 100
    m["ctl_status_ms"] = summary_ms(lat)
    m["ctl_spawn_floor_ms"] = summary_ms(floor)
    m["raw_status_ms"] = raw_err or summary_ms(raw)
    m["echo_pids"] = echo_pids
    m["echo_pid_changes"] = len(changed)
    m["crash_pool_states_seen"] = sorted(crash_states)
    m["crash_pool_last_error"] = pools["crash"]["last_error"]
    m["daemon_rss_mib"] = status_kib(proc_status(d.pid), "VmRSS") / 1024
    m["zombies_at_end"] = len(zombies_of(d.pid))
    d.stop()
    m["daemon_exit_code"] = d.exit_code
    m["daemon_shutdown_ms"] = d.shutdown_s * 1000 if d.shutdown_s is not None else None
    m["log_bytes"] = d.log_path.stat().st_size if d.log_path.exists() else 0
    m["log"] = d.log_problems(expected=("pool crash worker",))
    rows = res["rows"]
    L = m["ctl_status_ms"]
    rows.append((f"crash loop: deaths/s (2 x /bin/false, backoff {m['backoff_max']})",
                 f"{m['deaths_per_s']:.0f} /s", "", None))
    rows.append(("crash loop: daemon CPU", f"{m['daemon_cpu_percent']:.0f} %", "", None))
    rows.append(("crash loop: jobvisorctl status p50 / p99",
                 f"{L['median']:.2f} / {L['p99']:.2f} ms", "p99 < 10 ms", L["p99"] < 10))
    F = m["ctl_spawn_floor_ms"]
    rows.append(("  jobvisorctl start-up floor (no daemon) p50 / p99",
                 f"{F['median']:.2f} / {F['p99']:.2f} ms", "", None))
    R = m["raw_status_ms"]
    rows.append(("  in-process status round trip p50 / p99",
                 f"{R['median']:.3f} / {R['p99']:.3f} ms" if isinstance(R, dict) else R, "", None))
    rows.append(("crash loop: echo pool pids unchanged",
                 "yes" if not changed else f"NO ({len(changed)} of {n_calls} samples)", "yes", not changed))
    rows.append(("crash loop: crash pool state(s)", ",".join(sorted(crash_states)), "running",
                 crash_states == {"running"}))


def sec_longlife(ctx, res):
    bins = ctx["bins"]
    n_kills = 2000 if ctx["quick"] else 10000
    slots = 4
    d = Daemon("longlife", bins, {"echo": echo_pool(
        bins, slots, healthy_after="0s", backoff_initial="0s",
        max_restarts=1_000_000_000, restart_window="1s")})
    w = d.watch
    cur = d.wait_ready_log("echo", slots, 20.0)
    m = res["metrics"]
    samples = []
    rss_first = None
    kills = 0
    rounds = []
    t_start = now()
    while kills < n_kills:
        old = dict(cur)
        t0 = now()
        for slot in range(slots):
            kill_worker(old[slot])
        w.wait_for(lambda: all(w.ready[("echo", s)][0] != old[s] for s in range(slots)), 10.0,
                   f"4 replacements to be ready after {kills} kills")
        with w.cond:
            for s in range(slots):
                cur[s] = w.ready[("echo", s)][0]
            t1 = max(w.ready[("echo", s)][1] for s in range(slots))
        rounds.append(t1 - t0)
        kills += slots
        if rss_first is None and kills >= 100:
            time.sleep(0.05)
            rss_first = status_kib(proc_status(d.pid), "VmRSS")
            samples.append((kills, rss_first, proc_fds(d.pid)))
        elif kills % 1000 == 0:
            samples.append((kills, status_kib(proc_status(d.pid), "VmRSS"), proc_fds(d.pid)))
    elapsed = now() - t_start
    time.sleep(0.2)
    d.check_alive()
    st = proc_status(d.pid)
    rss_end = status_kib(st, "VmRSS")
    if not samples or samples[-1][0] != kills:
        samples.append((kills, rss_end, proc_fds(d.pid)))
    pool = d.status()["echo"]
    m["kills"] = kills
    m["elapsed_s"] = elapsed
    m["kills_per_s"] = kills / elapsed
    m["round_ms_kill4_to_4ready"] = summary_ms(rounds)
    m["rss_kib_after_100"] = rss_first
    m["rss_kib_end"] = rss_end
    m["rss_growth_kib"] = rss_end - rss_first
    m["hwm_kib"] = status_kib(st, "VmHWM")
    m["samples_kills_rsskib_fds"] = samples
    m["fds_after_100"] = samples[0][2]
    m["fds_end"] = proc_fds(d.pid)
    m["threads_end"] = int(st["Threads"])
    m["zombies_at_end"] = len(zombies_of(d.pid))
    m["restarts_counted"] = sum(x["restarts"] for x in pool["workers"])
    m["pool_state_end"] = pool["state"]
    d.stop()
    m["daemon_exit_code"] = d.exit_code
    m["log"] = d.log_problems()
    rows = res["rows"]
    rows.append((f"long life: {kills} kills, {m['kills_per_s']:.0f} kills/s",
                 f"round (kill 4 -> 4 ready) p50 {m['round_ms_kill4_to_4ready']['median']:.2f} ms", "", None))
    rows.append(("long life: RSS after 100 kills -> end",
                 f"{rss_first} -> {rss_end} KiB ({rss_end - rss_first:+d} KiB)", "within 1 MiB",
                 abs(rss_end - rss_first) <= 1024))
    rows.append(("long life: daemon fds after 100 kills -> end",
                 f"{m['fds_after_100']} -> {m['fds_end']}", "equal", m["fds_after_100"] == m["fds_end"]))


SECTIONS = [
    ("restart", "Restart latency (8 echo workers, 200 SIGKILLs)", sec_restart),
    ("pm2", "pm2 restart latency (same run, 50 SIGKILLs)", sec_pm2),
    ("idle", "Idle cost (8 idle echo workers)", sec_idle),
    ("crash", "Crash loop (2 x /bin/false + 2 echo)", sec_crash),
    ("longlife", "Long life (4 echo workers, many SIGKILLs)", sec_longlife),
]


# --------------------------------------------------------------------------
# report


def run_sections(sections, ctx, only, after_error=lambda: None):
    """Runs each (key, title, fn) section in `only` (all if empty) as
    fn(ctx, res), each with its own cleanups, and tears everything down at
    the end, also on Ctrl-C / SIGTERM. A section's error ends that section
    only. `after_error` runs first on each error (it may re-raise an
    interrupt that a library disguised). Returns (results, interrupted)."""
    results = {}
    interrupted = False
    try:
        for key, title, fn in sections:
            if only and key not in only:
                continue
            print(f"== {title}", flush=True)
            res = {"title": title, "metrics": {}, "rows": [], "error": None}
            results[key] = res
            t = now()
            mark = len(_CLEANUPS)
            try:
                fn(ctx, res)
            except SectionError as e:
                after_error()
                res["error"] = str(e)
                print(f"  ERROR: {e}", flush=True)
            except KeyboardInterrupt:
                res["error"] = "interrupted"
                raise
            except Exception as e:
                after_error()
                res["error"] = f"{type(e).__name__}: {e}"
                res["traceback"] = traceback.format_exc()
                print(f"  ERROR: {res['error']}\n{res['traceback']}", flush=True)
            finally:
                run_cleanups(down_to=mark)
            res["seconds"] = now() - t
            print_rows(res["rows"])
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: cleaning up", file=sys.stderr)
    finally:
        # a second Ctrl-C / SIGTERM must not cut the teardown short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        run_cleanups()
    return results, interrupted


def print_rows(rows):
    for name, value, target, verdict in rows:
        print(f"  {name}: {value}" + (f"  (target {target}: {fmt_verdict(verdict)})" if target else ""),
              flush=True)


def fmt_verdict(v):
    return "" if v is None else ("ok" if v else "FAIL")


def machine_info():
    cpu = "?"
    t = read_text("/proc/cpuinfo") or ""
    for line in t.splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    commit = "?"
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if dirty:
            commit += " (+ uncommitted changes)"
    except Exception:
        pass
    return {"kernel": platform.release(), "cpu": cpu, "ncpu": os.cpu_count(),
            "python": platform.python_version(), "commit": commit}


def error_row_cells(error):
    """The metric and value cells of an aborted section's FAIL row."""
    return "ERROR", error


def render(results, sections, error_cells=error_row_cells):
    """The table: one (section, metric, value, target, verdict) row per row
    of each section in `results`, in the order of `sections`; a section that
    aborted ends with a FAIL row whose metric and value are error_cells(error)."""
    rows = []
    for key, _, _ in sections:
        r = results.get(key)
        if r is None:
            continue
        for name, value, target, verdict in r["rows"]:
            rows.append((key, name, value, target, fmt_verdict(verdict)))
        if r.get("error"):
            rows.append((key, *error_cells(r["error"]), "", "FAIL"))
    return rows


def text_table(rows):
    hdr = ("section", "metric", "value", "target", "")
    widths = [max(len(str(r[i])) for r in rows + [hdr]) for i in range(5)]
    out = []
    for r in [hdr] + rows:
        out.append("  ".join(str(c).ljust(widths[i]) for i, c in enumerate(r)).rstrip())
        if r is hdr:
            out.append("  ".join("-" * wd for wd in widths))
    return "\n".join(out)


def md_table(rows):
    out = ["| section | metric | value | target | |", "|---|---|---|---|---|"]
    for r in rows:
        out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
    return "\n".join(out)


def write_outputs(results, meta, rows, sections, stem, title, header, error_label="Error",
                  json_rows=False):
    """Writes OUT/<stem>.json (meta, the table, each section's record, with
    its rows when json_rows) and OUT/<stem>.md (`title`, the `header` lines,
    the table, then each section's metrics, its error as **<error_label>:**)."""
    OUT.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "table": [list(r) for r in rows], "sections": {}}
    for key, r in results.items():
        doc["sections"][key] = {k: v for k, v in r.items() if k != "rows"}
        if json_rows:
            doc["sections"][key]["rows"] = [list(x) for x in r["rows"]]
    (OUT / f"{stem}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md = [f"# {title}", "", *header, "", md_table(rows), ""]
    for key, section_title, _ in sections:
        r = results.get(key)
        if r is None:
            continue
        md += [f"## {section_title}", ""]
        if r.get("skipped"):
            md.append(f"Skipped: {r['skipped']}")
        if r.get("error"):
            md.append(f"**{error_label}:** {r['error']}")
        md += ["```json", json.dumps(r["metrics"], indent=2, default=str), "```", ""]
    (OUT / f"{stem}.md").write_text("\n".join(md))


def finish(results, meta, sections, stem, title, header, footer, error_cells=error_row_cells,
           error_label="Error", json_rows=False):
    """The end of a run: renders the table, writes OUT/<stem>.json and
    OUT/<stem>.md (see render and write_outputs), prints the table and then
    the `footer` text. Returns the exit status: 130 when meta says the run
    was interrupted, 1 when a section aborted, else 0."""
    rows = render(results, sections, error_cells)
    write_outputs(results, meta, rows, sections, stem, title, header, error_label, json_rows)
    print()
    print(text_table(rows))
    print(footer)
    if meta["interrupted"]:
        return 130
    return 1 if any(r.get("error") for r in results.values()) else 0


def resolve_bins():
    env = os.environ.get("JOBVISOR_BIN_DIR")
    bdir = Path(env).resolve() if env else REPO / "target" / "release"
    bins = {n: bdir / n for n in ("jobvisord", "jobvisorctl", "jobvisor-worker")}
    missing = [str(p) for p in bins.values() if not os.access(p, os.X_OK)]
    if missing:
        sys.exit(f"missing binaries: {', '.join(missing)}\n"
                 f"build them with `cargo build --release` or point JOBVISOR_BIN_DIR at a target/release dir")
    return bdir, bins


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="idle window 10 s, long life 2,000 kills")
    ap.add_argument("--only", default="", help="comma-separated subset of: "
                    + ",".join(k for k, _, _ in SECTIONS))
    args = ap.parse_args()
    bdir, bins = resolve_bins()
    signal.signal(signal.SIGTERM, _sigterm)
    LOGS.mkdir(parents=True, exist_ok=True)
    only = {x for x in args.only.split(",") if x}
    ctx = {"bins": bins, "quick": args.quick}
    started = now()
    results, interrupted = run_sections(SECTIONS, ctx, only)
    cmd = "python3 bench/supervision.py" + (" --quick" if args.quick else "") + \
        (f" --only {args.only}" if args.only else "")
    meta = {"command": cmd, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "duration_s": now() - started, "quick": args.quick, "bin_dir": str(bdir),
            "machine": machine_info(), "interrupted": interrupted}
    mi = meta["machine"]
    header = [f"- command: `{meta['command']}`",
              f"- date: {meta['date']}, duration {meta['duration_s']:.0f} s",
              f"- machine: {mi['cpu']}, {mi['ncpu']} CPUs, kernel {mi['kernel']}, Python {mi['python']}",
              f"- commit: {mi['commit']}, binaries: `{meta['bin_dir']}`"]
    return finish(results, meta, SECTIONS, "supervision", "jobvisor supervision benchmark", header,
                  f"\nwrote {OUT / 'supervision.json'} and {OUT / 'supervision.md'} (daemon logs in {LOGS})")


if __name__ == "__main__":
    sys.exit(main())
