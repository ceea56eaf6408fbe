"""procrastinate burn-down + latency benchmark driver (see README.md).

    VENV/bin/python bench/pg_peers/python/procrastinate_bench.py \
        --dsn postgres://USER@127.0.0.1:PORT/DB --jobs 200000 --latency-jobs 1000 --procs 2

Parent: (re)creates procrastinate's schema, batch-defers N no-op jobs, starts
--procs worker processes (this file with the hidden ``_worker`` command),
polls ``procrastinate_jobs`` every 100 ms until no job is todo/doing, then
defers the latency jobs one at a time at 100/s, waits, stops the workers and
prints one JSON line per variant on stdout.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from importlib.metadata import version as pkg_version

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _benchcommon as bc  # noqa: E402

SYSTEM = "procrastinate"
TASK_NAME = "bench_noop"
DEFER_CHUNK = 10_000  # jobs per batch_defer_async call (one INSERT ... unnest each)

# Worker settings per variant. "default" is procrastinate's own defaults
# (Worker(): concurrency=1, listen_notify=True, fetch_job_polling_interval=5 s,
# delete_jobs="never", update_heartbeat_interval=10 s); "tuned" raises
# concurrency (async sub-workers), as docs/howto/production/concurrency.md
# recommends for throughput.
TUNED_CONCURRENCY = 10
VARIANTS = {
    "default": {},
    "tuned": {"concurrency": TUNED_CONCURRENCY},
}


def settings_text(variant: str, procs: int) -> str:
    base = (
        f"{procs} worker processes, App.run_worker_async() with PsycopgConnector "
        f"(psycopg_pool defaults); async no-op task; batch_defer_async in chunks of "
        f"{DEFER_CHUNK}; listen_notify on"
    )
    if variant == "default":
        return base + "; worker defaults (concurrency=1, delete_jobs=never)"
    return base + f"; TUNED: concurrency={TUNED_CONCURRENCY} per process (delete_jobs=never)"


def make_app(dsn: str, latency_file: str | None = None):
    import procrastinate

    # The app lives in this script, which runs as __main__; procrastinate warns
    # about that (task lookup by dotted path), irrelevant here: the task has an
    # explicit name and every process builds the same app.
    logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
    state: dict = {"fh": None}

    @app.task(name=TASK_NAME)
    async def bench_noop(t: float | None = None) -> None:
        if t is not None:
            ms = (time.time() - t) * 1000.0
            fh = state["fh"]
            if fh is None:
                fh = state["fh"] = open(latency_file, "a", buffering=1)  # type: ignore[arg-type]
            fh.write(f"{ms:.3f}\n")

    return app, bench_noop, state


# --------------------------------------------------------------------------
# worker process


def worker_main(argv: list[str]) -> None:
    dsn, variant, latency_file = argv
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app, _task, state = make_app(dsn, latency_file)

    async def run() -> None:
        async with app.open_async():
            # SIGTERM/SIGINT -> procrastinate's own graceful shutdown.
            await app.run_worker_async(**VARIANTS[variant])

    try:
        asyncio.run(run())
    finally:
        if state["fh"] is not None:
            state["fh"].close()


# --------------------------------------------------------------------------
# parent


async def drop_procrastinate_objects(conn) -> None:
    """Remove every procrastinate_* table, function and type in the current
    schema so that the library's schema can be applied afresh."""
    async with conn.cursor() as cur:
        await cur.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind IN ('r','p','v','m') "
            "AND c.relname LIKE 'procrastinate\\_%'"
        )
        tables = [r[0] for r in await cur.fetchall()]
        for t in tables:
            await cur.execute(f'DROP TABLE IF EXISTS "{t}" CASCADE')
        await cur.execute(
            "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = current_schema() AND p.proname LIKE 'procrastinate\\_%'"
        )
        for (sig,) in await cur.fetchall():
            await cur.execute(f"DROP FUNCTION IF EXISTS {sig} CASCADE")
        await cur.execute(
            "SELECT t.typname FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
            "LEFT JOIN pg_class c ON c.oid = t.typrelid "
            "WHERE n.nspname = current_schema() AND t.typname LIKE 'procrastinate\\_%' "
            "AND (t.typtype IN ('e','d') OR (t.typtype = 'c' AND c.relkind = 'c'))"
        )
        for (typ,) in await cur.fetchall():
            await cur.execute(f'DROP TYPE IF EXISTS "{typ}" CASCADE')
        if tables:
            bc.log(f"dropped {len(tables)} existing procrastinate tables")


async def run_variant(args, variant: str, workdir: str) -> str:
    import psycopg

    n, lat_n, procs = args.jobs, args.latency_jobs, args.procs
    app, task, _ = make_app(args.dsn)

    poll = await psycopg.AsyncConnection.connect(args.dsn, autocommit=True)
    workers = bc.Workers()
    try:
        # fresh schema: drop leftovers of a previous variant/run, apply the library's schema
        await drop_procrastinate_objects(poll)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            try:
                await poll.execute("CHECKPOINT")
            except psycopg.Error:
                pass
            bc.log(f"[{variant}] schema applied; deferring {n} jobs")

            # 1. enqueue (timed)
            t0 = time.monotonic()
            left = n
            while left > 0:
                k = min(DEFER_CHUNK, left)
                await task.batch_defer_async(*([{}] * k))
                left -= k
                if time.monotonic() - t0 > args.phase_timeout:
                    raise bc.BenchError(f"enqueue: {n - left}/{n} after {args.phase_timeout:.0f}s")
            enqueue_s = time.monotonic() - t0
            bc.log(f"[{variant}] enqueued {n} in {enqueue_s:.2f}s ({n / enqueue_s:.0f}/s)")

            # Completion check, every 100 ms: "no todo and no doing row", answered
            # from procrastinate's partial indexes (seq scans disabled on this
            # connection only) so that polling a 200k-row table stays cheap and
            # does not steal CPU from the workers. The full count is only taken
            # for the progress log (every 10 s) and the final failed count.
            await poll.execute("SET enable_seqscan = off")

            async def all_done() -> bool:
                cur = await poll.execute(
                    "SELECT NOT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE status = 'todo')"
                    " AND NOT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE status = 'doing')"
                )
                return (await cur.fetchone())[0]

            async def pending() -> int:
                cur = await poll.execute(
                    "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo','doing')"
                )
                return (await cur.fetchone())[0]

            async def burn_progress() -> str:
                return f"{n - await pending()}/{n} done"

            async def lat_progress() -> str:
                return f"{await pending()} pending"

            # 2. burn-down: from worker start until every job is done
            lat_files = [bc.lat_path(workdir, variant, i) for i in range(procs)]
            burn_s = await bc.burn_down(
                __file__, args, variant, lat_files, workers, all_done, burn_progress, SYSTEM
            )

            # 3. latency: workers idle, one defer at a time at --rate
            await asyncio.sleep(1.0)

            async def send(t: float) -> None:
                await task.defer_async(t=t)

            await bc.paced(lat_n, args.rate, args.phase_timeout, send)
            await bc.wait_until(
                all_done,
                f"[{variant}] latency jobs",
                args.phase_timeout,
                workers,
                progress=lat_progress,
            )
            await poll.execute("SET enable_seqscan = on")
            cur = await poll.execute(
                "SELECT count(*) FROM procrastinate_jobs"
                " WHERE status NOT IN ('todo','doing','succeeded')"
            )
            failed = (await cur.fetchone())[0]
    finally:
        bad_exits = workers.stop()
        await poll.close()

    lat = bc.read_latency_files(lat_files)
    return bc.variant_result(
        system=SYSTEM,
        version=pkg_version("procrastinate"),
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
