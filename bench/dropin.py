#!/usr/bin/env python3
"""The Python drop-in against what it replaces, in one run (issue 12):

1. embedded ``jobvisor.Executor(2).map`` of 20,000 no-op calls against
   ``ProcessPoolExecutor(2).map`` (target: >= 2x);
2. ``jobvisor.Pool(2).imap_unordered(chunksize=1)`` against
   ``multiprocessing.Pool(2)``, same call (target: >= 1x);
3. time to the first result from a cold start (constructor + one call)
   against ``ProcessPoolExecutor`` with the spawn start method
   (target: <= 1.5x);
4. a 64 MiB numpy array round trip (``submit(echo, arr).result()``)
   against ``multiprocessing.Pool.apply`` (target: >= 6x).

Both sides of each row run alternately in this process (the machine is
shared and noisy), ``--reps`` times; rows report medians and the ratio of
the medians. jobvisor runs with its defaults (embedded mode, durable jobs),
on the release binaries (``cargo build --release``; ``--bin-dir`` to use
others).

    python3 bench/dropin.py [--reps 5] [--calls 20000] [--out bench/out]
"""

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def noop(x):
    return x


def echo(a):
    return a


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "out"))
    args = ap.parse_args()
    os.environ.setdefault("JOBVISOR_BIN_DIR", args.bin_dir)
    sys.path.insert(0, os.path.join(ROOT, "python"))
    import jobvisor
    try:
        import numpy as np
    except ImportError:
        sys.exit("bench/dropin.py: numpy is needed (pip install numpy)")

    n = args.calls
    rows = []

    def row(name, ours, theirs, unit, higher_is_better, target, what):
        mo, mt = statistics.median(ours), statistics.median(theirs)
        ratio = mo / mt
        ok = ratio >= target if higher_is_better else ratio <= target
        rows.append({"row": name, "jobvisor": mo, "peer": mt, "unit": unit, "ratio": ratio,
                     "target": ("≥ " if higher_is_better else "≤ ") + f"{target}x",
                     "ok": ok, "what": what, "samples_jobvisor": ours, "samples_peer": theirs})
        print(f"{name}: jobvisor {mo:,.1f} {unit}, {what} {mt:,.1f} {unit}, "
              f"ratio {ratio:.2f} (target {rows[-1]['target']}) {'ok' if ok else 'MISSED'}", flush=True)

    # 1. Executor.map
    ours, theirs = [], []
    with jobvisor.Executor(2) as ex, cf.ProcessPoolExecutor(2) as ppe:
        list(ex.map(noop, range(100)))
        list(ppe.map(noop, range(100)))
        for _ in range(args.reps):
            ours.append(n / timed(lambda: list(ex.map(noop, range(n)))))
            theirs.append(n / timed(lambda: list(ppe.map(noop, range(n)))))
    row(f"Executor(2).map no-op, N={n:,}", ours, theirs, "calls/s", True, 2,
        "ProcessPoolExecutor(2)")

    # 2. Pool.imap_unordered, chunksize 1
    ours, theirs = [], []
    with jobvisor.Pool(2) as p, mp.Pool(2) as q:
        p.map(noop, range(100))
        q.map(noop, range(100))
        for _ in range(args.reps):
            ours.append(n / timed(lambda: list(p.imap_unordered(noop, range(n), chunksize=1))))
            theirs.append(n / timed(lambda: list(q.imap_unordered(noop, range(n), chunksize=1))))
    row(f"Pool(2).imap_unordered chunksize=1 no-op, N={n:,}", ours, theirs, "calls/s", True, 1,
        "multiprocessing.Pool(2)")

    # 3. Cold start to the first result
    spawn = mp.get_context("spawn")
    ours, theirs = [], []
    for _ in range(args.reps):
        # Only the time to the first result counts: the shutdown is after.
        t = time.perf_counter()
        ex = jobvisor.Executor(2)
        ex.submit(noop, 1).result()
        ours.append((time.perf_counter() - t) * 1000)
        ex.shutdown()
        t = time.perf_counter()
        ex = cf.ProcessPoolExecutor(2, mp_context=spawn)
        ex.submit(noop, 1).result()
        theirs.append((time.perf_counter() - t) * 1000)
        ex.shutdown()
    row("cold start to first result, Executor(2)", ours, theirs, "ms", False, 1.5,
        "ProcessPoolExecutor(2, spawn)")

    # 4. A big numpy array there and back
    arr = np.arange((args.mib << 20) // 8, dtype=np.float64)
    ours, theirs = [], []
    with jobvisor.Executor(2) as ex, mp.Pool(2) as q:
        assert np.array_equal(ex.submit(echo, arr).result(), arr)
        assert np.array_equal(q.apply(echo, (arr,)), arr)
        for _ in range(args.reps):
            ours.append(timed(lambda: ex.submit(echo, arr).result()) * 1000)
            theirs.append(timed(lambda: q.apply(echo, (arr,))) * 1000)
    # Lower is better; the target is on the speed ratio.
    mo, mt = statistics.median(ours), statistics.median(theirs)
    rows.append({"row": f"{args.mib} MiB numpy round trip", "jobvisor": mo, "peer": mt, "unit": "ms",
                 "ratio": mt / mo, "target": "≥ 6x (speed)", "ok": mt / mo >= 6,
                 "what": "multiprocessing.Pool(2).apply", "samples_jobvisor": ours,
                 "samples_peer": theirs})
    print(f"{args.mib} MiB numpy round trip: jobvisor {mo:.1f} ms, Pool.apply {mt:.1f} ms, "
          f"speed ratio {mt / mo:.2f} (target ≥ 6x) {'ok' if mt / mo >= 6 else 'MISSED'}", flush=True)

    os.makedirs(args.out, exist_ok=True)
    cmd = "python3 bench/dropin.py" + "".join(f" {a}" for a in sys.argv[1:])
    with open(os.path.join(args.out, "dropin.json"), "w") as f:
        json.dump({"command": cmd, "rows": rows}, f, indent=2)
    with open(os.path.join(args.out, "dropin.md"), "w") as f:
        f.write(f"# Python drop-in vs multiprocessing\n\n- command: `{cmd}`\n"
                f"- {args.reps} alternating runs per row, medians\n\n"
                "| row | jobvisor | peer | ratio | target | |\n|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['row']} | {r['jobvisor']:,.1f} {r['unit']} | {r['what']}: "
                    f"{r['peer']:,.1f} {r['unit']} | {r['ratio']:.2f}x | {r['target']} | "
                    f"{'ok' if r['ok'] else 'missed'} |\n")


if __name__ == "__main__":
    main()
