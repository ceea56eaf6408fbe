"""Celery (Redis broker) burn-down + latency benchmark driver (see README.md).

    VENV/bin/python bench/pg_peers/python/celery_bench.py \
        --redis redis://127.0.0.1:PORT/0 --jobs 200000 --latency-jobs 1000 --procs 2

Parent: FLUSHDB on the given Redis db, publishes N no-op task messages with
``apply_async`` in a loop (one shared producer), starts ONE ``celery worker``
(default prefork pool, ``-c --procs``), polls a Redis counter that every task
INCRs (there is no result backend) every 100 ms until it reaches N, then
publishes the latency tasks one at a time at 100/s (each carrying its
enqueue wall time; the task RPUSHes now - t in ms to a Redis list), waits,
stops the worker and prints one JSON line per variant on stdout.

This module is also the Celery app the worker loads (``celery -A celery_bench``);
the broker URL reaches the worker through the CELERY_BENCH_REDIS variable.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from importlib.metadata import version as pkg_version

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchcommon as bc  # noqa: E402

from celery import Celery  # noqa: E402

SYSTEM = "celery"
TASK_NAME = "bench.noop"
DONE_KEY = "bench:done"
ERR_KEY = "bench:errors"
LAT_KEY = "bench:latency_ms"
REDIS_URL = os.environ.get("CELERY_BENCH_REDIS", "redis://127.0.0.1:6379/0")

app = Celery("celery_bench", broker=REDIS_URL)
# No result backend (Celery's default): results are not stored anywhere.
app.conf.broker_connection_retry_on_startup = True

# `celery worker` options per variant. "default": the default prefork pool with
# -c P and nothing else (prefetch multiplier 4, acks early, gossip/mingle/
# heartbeat on). "tuned": prefetch multiplier 128 (docs/userguide/optimizing.rst:
# "many short-running tasks ... Say 64, or 128") and no gossip/mingle/heartbeat.
TUNED_PREFETCH = 128
VARIANTS = {
    "default": [],
    "tuned": [
        f"--prefetch-multiplier={TUNED_PREFETCH}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ],
}


def settings_text(variant: str, procs: int) -> str:
    base = (
        f"one `celery worker`, prefork pool, -c {procs}; Redis broker, no result backend; "
        f"task INCRs a Redis counter (completion signal); apply_async loop with one producer"
    )
    if variant == "default":
        return base + "; worker defaults (prefetch_multiplier=4, acks early, gossip/mingle/heartbeat on)"
    return base + (
        f"; TUNED: --prefetch-multiplier={TUNED_PREFETCH} --without-gossip --without-mingle"
        " --without-heartbeat"
    )


# --------------------------------------------------------------------------
# the task (runs in the prefork pool children)

_client = {"pid": None, "r": None}


def _redis():
    import redis

    if _client["pid"] != os.getpid():
        _client["r"] = redis.Redis.from_url(REDIS_URL)
        _client["pid"] = os.getpid()
    return _client["r"]


@app.task(name=TASK_NAME)
def bench_noop(t: float | None = None) -> None:
    r = _redis()
    try:
        if t is None:
            r.incr(DONE_KEY)
        else:
            ms = (time.time() - t) * 1000.0
            pipe = r.pipeline(transaction=False)
            pipe.rpush(LAT_KEY, f"{ms:.3f}")
            pipe.incr(DONE_KEY)
            pipe.execute()
    except Exception:
        r.incr(ERR_KEY)
        raise


# --------------------------------------------------------------------------
# parent


async def _str_async(text: str) -> str:
    return text


async def run_variant(args, variant: str, workdir: str) -> str:
    import redis

    n, lat_n, procs = args.jobs, args.latency_jobs, args.procs
    r = redis.Redis.from_url(args.redis)
    r.flushdb()
    bc.log(f"[{variant}] flushed {args.redis}; publishing {n} tasks")
    workers = bc.Workers()
    try:
        # 1. enqueue (timed): apply_async in a loop over one producer connection
        t0 = time.monotonic()
        with app.producer_or_acquire() as producer:
            for i in range(n):
                bench_noop.apply_async(producer=producer)
                if (i & 0xFFF) == 0 and time.monotonic() - t0 > args.phase_timeout:
                    raise bc.BenchError(f"enqueue: {i}/{n} after {args.phase_timeout:.0f}s")
        enqueue_s = time.monotonic() - t0
        bc.log(f"[{variant}] published {n} in {enqueue_s:.2f}s ({n / enqueue_s:.0f}/s)")

        counts = {"done": 0}

        def make_check(target: int):
            async def check() -> bool:
                counts["done"] = int(r.get(DONE_KEY) or 0)
                return counts["done"] >= target

            return check

        # 2. burn-down: from `celery worker` start until the counter reaches N
        cmd = [
            sys.executable, "-m", "celery", "-A", "celery_bench", "worker",
            "--pool=prefork", f"--concurrency={procs}", "--loglevel=WARNING",
            f"--hostname=bench-{variant}-{os.getpid()}@%h",
            *VARIANTS[variant],
        ]
        env = {
            "CELERY_BENCH_REDIS": args.redis,
            "PYTHONPATH": os.pathsep.join(
                p for p in (os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH")) if p
            ),
        }
        tb = time.monotonic()
        workers.start([cmd], env=env, tag="celery worker")
        t_done = await bc.wait_until(
            make_check(n),
            f"[{variant}] burn-down",
            args.phase_timeout,
            workers,
            progress=lambda: _str_async(f"{counts['done']}/{n} done"),
        )
        burn_s = t_done - tb
        bc.log(f"[{variant}] burn-down {n} in {burn_s:.2f}s ({n / burn_s:.0f}/s)")

        # 3. latency: worker idle, one apply_async at a time at --rate
        await asyncio.sleep(1.0)
        with app.producer_or_acquire() as producer:

            async def send(t: float) -> None:
                bench_noop.apply_async(kwargs={"t": t}, producer=producer)

            await bc.paced(lat_n, args.rate, args.phase_timeout, send)
        await bc.wait_until(
            make_check(n + lat_n),
            f"[{variant}] latency jobs",
            args.phase_timeout,
            workers,
            progress=lambda: _str_async(f"{counts['done'] - n}/{lat_n} done"),
        )
        lat = sorted(float(x) for x in r.lrange(LAT_KEY, 0, -1))
        failed = int(r.get(ERR_KEY) or 0)
    finally:
        bad_exits = workers.stop()

    r.close()
    return bc.variant_result(
        system=SYSTEM,
        version=pkg_version("celery"),
        variant=variant,
        jobs=n,
        procs=procs,
        settings=settings_text(variant, procs),
        enqueue_s=enqueue_s,
        burn_s=burn_s,
        latency_jobs=lat_n,
        latencies_ms=lat,
        failed=failed,
        bad_exits=bad_exits,
    )


async def parent_main(args) -> None:
    global REDIS_URL
    REDIS_URL = args.redis
    app.conf.broker_url = args.redis
    await bc.run_variants(SYSTEM, args, run_variant)


def main() -> None:
    args = bc.parse_args(SYSTEM, redis=True)
    bc.run_main(SYSTEM, lambda: parent_main(args))


if __name__ == "__main__":
    main()
