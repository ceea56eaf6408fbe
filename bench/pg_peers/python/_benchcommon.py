"""Shared plumbing for the Python job-queue peer drivers.

Argument parsing, worker-process management (own process group, parent-death
signal, bounded stop), bounded polling, pacing, percentiles and the one JSON
line per variant. Only the standard library is used here.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import math
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Awaitable, Callable, Iterable

POLL_S = 0.1  # completion polling period from the parent (100 ms)
STOP_GRACE_S = 30.0  # how long a worker gets to exit after SIGTERM


class BenchError(RuntimeError):
    """A phase failed or exceeded its deadline: printed, exit status 2."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM received by the driver: clean up, exit status 130."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# arguments


def parse_args(system: str, *, redis: bool = False, argv: list[str] | None = None):
    p = argparse.ArgumentParser(
        description=f"{system} burn-down + latency benchmark (see README.md)"
    )
    if redis:
        p.add_argument("--redis", required=True, help="redis://127.0.0.1:PORT/DB")
    else:
        p.add_argument("--dsn", required=True, help="postgres://USER@HOST:PORT/DB")
    p.add_argument("--jobs", type=int, default=200_000, help="burn-down jobs (N)")
    p.add_argument("--latency-jobs", type=int, default=1000, help="latency jobs (L)")
    p.add_argument("--procs", type=int, default=2, help="worker processes / pool size")
    p.add_argument(
        "--variant", choices=("default", "tuned", "both"), default="both"
    )
    p.add_argument(
        "--rate", type=float, default=100.0, help="latency enqueue pace, jobs/s"
    )
    p.add_argument(
        "--phase-timeout",
        type=float,
        default=1800.0,
        help="deadline of every phase in seconds (default 30 min)",
    )
    a = p.parse_args(argv)
    if a.jobs < 1 or a.latency_jobs < 0 or a.procs < 1 or a.rate <= 0:
        p.error("--jobs >= 1, --latency-jobs >= 0, --procs >= 1, --rate > 0")
    return a


def variants(arg: str) -> list[str]:
    return ["default", "tuned"] if arg == "both" else [arg]


# --------------------------------------------------------------------------
# signals


def install_parent_signal_handlers() -> None:
    def handler(signum, _frame):
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _child_preexec() -> None:
    # New session (own process group, killed as a whole at cleanup) and
    # SIGKILL if the driver dies without cleaning up (PR_SET_PDEATHSIG = 1).
    os.setsid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass
    # The driver itself turns SIGINT into cleanup; children get SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --------------------------------------------------------------------------
# workers


class Workers:
    """A set of worker processes, each the leader of its own process group."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self.logs: list = []

    def start(self, cmds: Iterable[list[str]], env: dict | None = None, tag: str = "worker") -> None:
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        for i, cmd in enumerate(cmds):
            # worker stderr goes straight to ours (logs belong on stderr);
            # worker stdout is diverted to stderr too: our stdout carries JSON only.
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=sys.stderr.fileno(),
                stderr=sys.stderr.fileno(),
                env=full_env,
                preexec_fn=_child_preexec,
                close_fds=True,
            )
            self.procs.append(proc)
            log(f"started {tag} {i} pid {proc.pid}: {' '.join(cmd[:4])} ...")

    def check_alive(self) -> None:
        for p in self.procs:
            rc = p.poll()
            if rc is not None:
                raise BenchError(f"worker pid {p.pid} exited early with status {rc}")

    def stop(self, grace: float = STOP_GRACE_S) -> int:
        """SIGTERM every worker, wait (bounded), SIGKILL the group of any
        straggler and of every worker's leftover children. Returns the number
        of workers that did not exit cleanly (status != 0 or killed)."""
        bad = 0
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for p in self.procs:
            remaining = deadline - time.monotonic()
            try:
                p.wait(timeout=max(0.0, remaining))
            except subprocess.TimeoutExpired:
                log(f"worker pid {p.pid} did not stop within {grace:.0f}s: SIGKILL")
                bad += 1
                _killpg(p.pid)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    log(f"worker pid {p.pid} still alive after SIGKILL")
            else:
                if p.returncode != 0:
                    log(f"worker pid {p.pid} exited with status {p.returncode}")
                    bad += 1
            # anything left in that worker's process group (e.g. pool children)
            _killpg(p.pid)
        self.procs = []
        return bad


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------
# waiting, pacing, statistics


async def wait_until(
    check: Callable[[], Awaitable[bool]],
    what: str,
    timeout: float,
    workers: Workers | None = None,
    progress: Callable[[], Awaitable[str]] | None = None,
) -> float:
    """Poll ``check`` every 100 ms until true; BenchError past ``timeout``.
    ``progress`` (a more expensive count) is only called every 10 s for the
    log and on failure. Returns the monotonic time at which the check first
    succeeded."""
    start = time.monotonic()
    deadline = start + timeout
    next_report = start + 10.0
    while True:
        if await check():
            return time.monotonic()
        now = time.monotonic()
        if now > deadline:
            extra = f" ({await progress()})" if progress else ""
            raise BenchError(f"{what}: not done after {timeout:.0f}s{extra}")
        if workers is not None:
            workers.check_alive()
        if progress is not None and now >= next_report:
            log(f"{what}: {await progress()} after {now - start:.0f}s")
            next_report = now + 10.0
        await asyncio.sleep(POLL_S)


async def paced(count: int, rate: float, deadline_s: float, send: Callable[[float], Awaitable[None]]) -> None:
    """Call ``send(enqueue_wall_time)`` ``count`` times at ``rate``/s; the
    argument is time.time() taken just before the library's enqueue call."""
    period = 1.0 / rate
    t0 = time.monotonic()
    limit = t0 + deadline_s
    for i in range(count):
        target = t0 + i * period
        delay = target - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if time.monotonic() > limit:
            raise BenchError(f"latency enqueue: only {i}/{count} sent within {deadline_s:.0f}s")
        await send(time.time())


def percentile(sorted_vals: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_vals:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_vals)))
    return sorted_vals[min(rank, len(sorted_vals)) - 1]


def read_latency_files(paths: Iterable[str]) -> list[float]:
    vals: list[float] = []
    for path in paths:
        try:
            with open(path) as fh:
                for line in fh:
                    line = line.strip()
                    if line:
                        vals.append(float(line))
        except FileNotFoundError:
            pass
    vals.sort()
    return vals


def result_line(
    *,
    system: str,
    version: str,
    jobs: int,
    procs: int,
    settings: str,
    enqueue_s: float,
    burn_s: float,
    latency_jobs: int,
    latencies_ms: list[float],
    errors: int,
) -> str:
    p50 = percentile(latencies_ms, 50)
    p99 = percentile(latencies_ms, 99)
    return json.dumps(
        {
            "system": system,
            "version": version,
            "jobs": jobs,
            "procs": procs,
            "settings": settings,
            "enqueue_s": round(enqueue_s, 4),
            "burn_s": round(burn_s, 4),
            "jobs_per_s": round(jobs / burn_s, 1) if burn_s > 0 else None,
            "latency_jobs": latency_jobs,
            "latency_p50_ms": round(p50, 3) if p50 is not None else None,
            "latency_p99_ms": round(p99, 3) if p99 is not None else None,
            "errors": errors,
        }
    )


def variant_result(
    *,
    system: str,
    version: str,
    variant: str,
    jobs: int,
    procs: int,
    settings: str,
    enqueue_s: float,
    burn_s: float,
    latency_jobs: int,
    latencies_ms: list[float],
    failed: int,
    bad_exits: int,
) -> str:
    """A variant's result line; failed jobs, missing latency samples and
    bad worker exits are logged and counted as errors."""
    missing = max(0, latency_jobs - len(latencies_ms))
    if missing or failed or bad_exits:
        log(f"[{variant}] errors: failed jobs {failed}, missing latency samples {missing}, "
            f"bad worker exits {bad_exits}")
    return result_line(
        system=system,
        version=version,
        jobs=jobs,
        procs=procs,
        settings=settings,
        enqueue_s=enqueue_s,
        burn_s=burn_s,
        latency_jobs=latency_jobs,
        latencies_ms=latencies_ms,
        errors=int(failed) + missing + bad_exits,
    )


async def run_variants(system: str, args, run_variant) -> None:
    """Runs `run_variant(args, variant, workdir)` for each variant asked,
    printing each result line, in a work directory removed afterwards."""
    workdir = make_workdir(system)
    try:
        for v in variants(args.variant):
            emit(await run_variant(args, v, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def make_workdir(system: str) -> str:
    return tempfile.mkdtemp(prefix=f"{system}-bench-")


def lat_path(workdir: str, variant: str, index: int) -> str:
    return os.path.join(workdir, f"latency-{variant}-{index}.txt")


def run_main(system: str, coro_factory: Callable[[], Awaitable[None]]) -> None:
    """Run the parent's asyncio main; map failures to exit codes."""
    install_parent_signal_handlers()
    try:
        asyncio.run(coro_factory())
    except Interrupted as exc:
        log(f"{system}: interrupted ({exc}); workers stopped")
        sys.exit(130)
    except BenchError as exc:
        log(f"{system}: FAILED: {exc}")
        sys.exit(2)


async def burn_down(script, args, variant, lat_files, workers, all_done, progress, system):
    """Starts one `script _worker DSN VARIANT LATENCY_FILE` process per
    latency file and times them from their start until `all_done()`;
    returns the seconds."""
    cmds = [
        [sys.executable, os.path.abspath(script), "_worker", args.dsn, variant, f]
        for f in lat_files
    ]
    tb = time.monotonic()
    workers.start(cmds, tag=f"{system} worker")
    t_done = await wait_until(
        all_done, f"[{variant}] burn-down", args.phase_timeout, workers, progress=progress
    )
    burn_s = t_done - tb
    log(f"[{variant}] burn-down {args.jobs} in {burn_s:.2f}s ({args.jobs / burn_s:.0f}/s)")
    return burn_s
