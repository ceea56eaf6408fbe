"""pgqueuer burn-down + latency benchmark driver (see README.md).

    VENV/bin/python bench/pg_peers/python/pgqueuer_bench.py \
        --dsn postgres://USER@127.0.0.1:PORT/DB --jobs 200000 --latency-jobs 1000 --procs 2

Parent: (re)installs pgqueuer's schema (Queries.uninstall/install, what
``pgq uninstall``/``pgq install`` run), enqueues N no-op jobs with the list
form of ``Queries.enqueue``, starts --procs worker processes (this file with
the hidden ``_worker`` command, each running ``pgqueuer.run(factory)``, the
programmatic ``pgq run``), polls the ``pgqueuer`` table every 100 ms until no
job is queued/picked, then enqueues the latency jobs one at a time at 100/s,
waits, stops the workers and prints one JSON line per variant on stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from datetime import timedelta
from importlib.metadata import version as pkg_version

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchcommon as bc  # noqa: E402

SYSTEM = "pgqueuer"
ENTRYPOINT = "bench_noop"
ENQUEUE_CHUNK = 10_000  # jobs per Queries.enqueue(list, list, list) call

# Worker settings per variant, passed to pgqueuer.run(). "default" = the
# library's defaults (those of `pgq run`): batch_size=10, dequeue_timeout=30 s,
# heartbeat_timeout=30 s, max_concurrent_tasks unlimited, one asyncpg
# connection per worker. "tuned" raises batch_size, which
# docs/guides/performance-tuning.md recommends for short-lived jobs.
TUNED_BATCH = 1000
VARIANTS = {
    "default": {},
    "tuned": {"batch_size": TUNED_BATCH},
}


def settings_text(variant: str, procs: int) -> str:
    base = (
        f"{procs} worker processes, pgqueuer.run(factory) (= pgq run) over one asyncpg "
        f"connection each; async no-op entrypoint; durable tables; Queries.enqueue with "
        f"lists in chunks of {ENQUEUE_CHUNK}"
    )
    if variant == "default":
        return base + "; run() defaults (batch_size=10, dequeue_timeout=30s, heartbeat_timeout=30s)"
    return base + f"; TUNED: batch_size={TUNED_BATCH} (other run() args default)"


# --------------------------------------------------------------------------
# worker process


def make_factory(dsn: str, latency_file: str, state: dict):
    import asyncpg
    from pgqueuer import PgQueuer
    from pgqueuer.models import Job

    @contextlib.asynccontextmanager
    async def factory():
        connection = await asyncpg.connect(dsn)
        pgq = PgQueuer.from_asyncpg_connection(connection)

        @pgq.entrypoint(ENTRYPOINT)
        async def bench_noop(job: Job) -> None:
            if job.payload:
                ms = (time.time() - float(job.payload)) * 1000.0
                fh = state.get("fh")
                if fh is None:
                    fh = state["fh"] = open(latency_file, "a", buffering=1)
                fh.write(f"{ms:.3f}\n")

        try:
            yield pgq
        finally:
            await connection.close()

    return factory


def worker_main(argv: list[str]) -> None:
    import pgqueuer

    dsn, variant, latency_file = argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    state: dict = {}
    try:
        # pgqueuer.run installs SIGINT/SIGTERM handlers -> graceful shutdown.
        asyncio.run(pgqueuer.run(make_factory(dsn, latency_file, state), **VARIANTS[variant]))
    finally:
        if state.get("fh") is not None:
            state["fh"].close()


# --------------------------------------------------------------------------
# parent


async def run_variant(args, variant: str, workdir: str) -> str:
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    n, lat_n, procs = args.jobs, args.latency_jobs, args.procs
    conn = await asyncpg.connect(args.dsn)  # enqueue connection
    poll = await asyncpg.connect(args.dsn)  # completion polling connection
    workers = bc.Workers()
    lat_files = [bc.lat_path(workdir, variant, i) for i in range(procs)]
    try:
        queries = Queries(AsyncpgDriver(conn))
        if await queries.schema_is_installed():
            bc.log(f"[{variant}] removing existing pgqueuer schema objects")
            await queries.uninstall()
        await queries.install()
        with contextlib.suppress(asyncpg.PostgresError):
            await poll.execute("CHECKPOINT")
        bc.log(f"[{variant}] schema installed; enqueueing {n} jobs")

        # 1. enqueue (timed)
        t0 = time.monotonic()
        left = n
        while left > 0:
            k = min(ENQUEUE_CHUNK, left)
            await queries.enqueue([ENTRYPOINT] * k, [None] * k, [0] * k)
            left -= k
            if time.monotonic() - t0 > args.phase_timeout:
                raise bc.BenchError(f"enqueue: {n - left}/{n} after {args.phase_timeout:.0f}s")
        enqueue_s = time.monotonic() - t0
        bc.log(f"[{variant}] enqueued {n} in {enqueue_s:.2f}s ({n / enqueue_s:.0f}/s)")

        # Completion check, every 100 ms: "no queued and no picked row", answered
        # from pgqueuer's partial indexes (seq scans disabled on this connection
        # only) so that polling stays cheap while the table holds 200k (dead)
        # rows. The count is only taken for the progress log (every 10 s).
        await poll.execute("SET enable_seqscan = off")

        async def all_done() -> bool:
            return await poll.fetchval(
                "SELECT NOT EXISTS (SELECT 1 FROM pgqueuer WHERE status = 'queued')"
                " AND NOT EXISTS (SELECT 1 FROM pgqueuer WHERE status = 'picked')"
            )

        async def pending() -> int:
            return await poll.fetchval(
                "SELECT count(*) FROM pgqueuer WHERE status IN ('queued','picked')"
            )

        async def burn_progress() -> str:
            return f"{n - await pending()}/{n} done"

        async def lat_progress() -> str:
            return f"{await pending()} pending"

        # 2. burn-down: from worker start until every job is done
        burn_s = await bc.burn_down(
            __file__, args, variant, lat_files, workers, all_done, burn_progress, SYSTEM
        )

        # 3. latency: workers idle, one enqueue at a time at --rate
        await asyncio.sleep(1.0)

        async def send(t: float) -> None:
            await queries.enqueue(ENTRYPOINT, repr(t).encode())

        await bc.paced(lat_n, args.rate, args.phase_timeout, send)
        await bc.wait_until(
            all_done,
            f"[{variant}] latency jobs",
            args.phase_timeout,
            workers,
            progress=lat_progress,
        )
        await poll.execute("SET enable_seqscan = on")
        # let the workers' log buffers (flushed every 0.1 s) reach pgqueuer_log
        await asyncio.sleep(0.5)
        failed = await poll.fetchval(
            "SELECT (SELECT count(*) FROM pgqueuer_log WHERE status IN ('exception','canceled'))"
            " + (SELECT count(*) FROM pgqueuer WHERE status = 'failed')"
        )
    finally:
        bad_exits = workers.stop()
        await conn.close()
        await poll.close()

    lat = bc.read_latency_files(lat_files)
    return bc.variant_result(
        system=SYSTEM,
        version=pkg_version("pgqueuer"),
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
    await bc.run_variants(SYSTEM, args, run_variant)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker_main(sys.argv[2:])
        return
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    args = bc.parse_args(SYSTEM)
    bc.run_main(SYSTEM, lambda: parent_main(args))


if __name__ == "__main__":
    main()
