#!/usr/bin/env python3
"""Hostile control clients against a release jobvisord: memory and latency.

    python3 bench/attacks.py [--only announce,trickle,results,waitdup,conns,queued]

Each row runs one attack of the security review (issue "Safe as a root
service") against a fresh daemon (`target/release`, or $JOBVISOR_BIN_DIR)
and measures, while it runs, the round trip of a `status` request from a
separate in-process client (connect + Hello + Status, no process start:
bench/supervision.py's raw_status_rtt; 20 samples) and the daemon's RSS
(peak of samples taken meanwhile). Targets: RSS < 256 MiB, status < 100 ms.
Writes bench/out/attacks.json and bench/out/attacks.md. Exit 0 when every
attack ran (missed targets are FAIL rows), 1 when one aborted.
"""

import argparse
import datetime
import socket
import struct
import sys
import threading
import time
from pathlib import Path

sys.dont_write_bytecode = True
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "python"))
import supervision as sv  # noqa: E402
from jobvisor import _wire as w  # noqa: E402

MiB = 1 << 20
RSS_TARGET_MIB = 256
RTT_TARGET_MS = 100


def rss_mib(pid):
    return sv.status_kib(sv.proc_status(pid), "VmRSS") / 1024


def frame(payload):
    return struct.pack("<I", len(payload)) + payload


def greeted(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(path))
    s.sendall(sv.RAW_HELLO)
    h = sv._read_frame(s)
    if h[:1] != b"\x00":
        raise sv.SectionError(f"refused: {h[:200]!r}")
    return s


def submit_req(pool, data):
    return frame(b"\x06" + w.string(pool) + w.bytes_(data) + b"\x00\x00\x00\x00" + b"\x00")


def measure(d, seconds=None, samples=20):
    """status RTTs (ms) and the RSS peak (MiB) over `samples` requests (or
    for `seconds`)."""
    rtts, peak = [], rss_mib(d.pid)
    end = time.monotonic() + seconds if seconds else None
    while (end and time.monotonic() < end) or (not end and len(rtts) < samples):
        rtts.append(sv.raw_status_rtt(d.socket) * 1000)
        peak = max(peak, rss_mib(d.pid))
    rtts.sort()
    return {"status_ms_median": rtts[len(rtts) // 2], "status_ms_max": rtts[-1],
            "status_samples": len(rtts), "rss_peak_mib": peak}


def echo_daemon(bins, name, **pool):
    keys = {"command": [str(bins["jobvisor-worker"]), "echo"], "workers": 2}
    keys.update(pool)
    d = sv.Daemon(name, bins, {"echo": keys}, log_level="info")
    d.wait_ready_status("echo", keys["workers"], 20)
    return d


def job_with_output(d, n):
    """A finished echo job with an output of n bytes: its id."""
    s = greeted(d.socket)
    s.sendall(frame(b"\x06" + w.string("echo") + w.bytes_(b"x" * n) + b"\x00\x00\x00\x00" + b"\x01"))
    r = sv._read_frame(s)
    if r[:1] != b"\x05":
        raise sv.SectionError(f"submit: {r[:200]!r}")
    rd = w.Reader(r)
    rd.u8()
    job_id = rd.uvarint()
    sv._read_frame(s)  # the job document
    s.close()
    return job_id


def att_announce(bins):
    d = echo_daemon(bins, "att-announce")
    before = rss_mib(d.pid)
    conns = []
    for _ in range(40):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(d.socket))
        try:
            s.sendall(struct.pack("<I", 64 * MiB) + b"\x00" * 4096)
        except OSError:
            pass
        conns.append(s)
    m = measure(d)
    for s in conns:
        s.close()
    return {"what": "40 connections announcing 64 MiB frames before Hello", "rss_before_mib": before, **m}


def att_trickle(bins):
    d = echo_daemon(bins, "att-trickle")
    before = rss_mib(d.pid)
    conns = [greeted(d.socket) for _ in range(30)]
    for s in conns:
        s.sendall(struct.pack("<I", 2 * MiB - 16) + b"\x01" * 65536)
    m = measure(d)
    for s in conns:
        s.close()
    return {"what": "30 greeted connections announcing 2 MiB requests, 64 KiB sent", "rss_before_mib": before, **m}


def att_results(bins):
    d = echo_daemon(bins, "att-results")
    job = job_with_output(d, MiB - 64)
    before = rss_mib(d.pid)
    s = greeted(d.socket)
    req = frame(b"\x08" + w.uvarint(job))
    n = 3000
    t = threading.Thread(target=lambda: s.sendall(req * n), daemon=True)
    t.start()
    m = measure(d, seconds=3)
    # Then read them all: every request answered.
    got = 0
    while got < n:
        sv._read_frame(s)
        got += 1
        if got % 300 == 0:
            m["rss_peak_mib"] = max(m["rss_peak_mib"], rss_mib(d.pid))
    s.close()
    return {"what": f"{n} pipelined Result requests (1 MiB output), not read for 3 s", "rss_before_mib": before,
            "answered": got, **m}


def att_waitdup(bins):
    d = echo_daemon(bins, "att-waitdup")
    job = job_with_output(d, MiB - 64)
    before = rss_mib(d.pid)
    s = greeted(d.socket)
    ids = 200_000
    s.sendall(frame(b"\x07" + w.uvarint(ids) + w.uvarint(job) * ids))
    docs = 0
    while True:
        r = sv._read_frame(s)
        if r[:1] == b"\x04":
            break
        docs += 1
    m = measure(d)
    s.close()
    return {"what": f"one Wait naming one job {ids:,} times", "rss_before_mib": before, "answers": docs, **m}


def att_conns(bins):
    """A user (nobody) opens 600 idle greeted connections: capped per user;
    root's status still gets in."""
    import os
    d = echo_daemon(bins, "att-conns")
    os.chmod(d.dir, 0o755)
    os.chmod(d.socket, 0o666)
    before = rss_mib(d.pid)
    r, wfd = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the hostile user
        try:
            os.setgid(65534)
            os.setuid(65534)
            held, refused = [], 0
            for _ in range(600):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(30)
                s.connect(str(d.socket))
                try:
                    s.sendall(sv.RAW_HELLO)
                except OSError:
                    pass
                h = sv._read_frame(s)
                if h[:1] == b"\x00":
                    held.append(s)
                else:
                    refused += 1
                    s.close()
            os.write(ready_w, f"{len(held)} {refused}".encode())
            os.read(r, 1)  # hold them until told
        finally:
            os._exit(0)
    os.close(ready_w)
    admitted, refused = map(int, os.read(ready_r, 100).split())
    m = measure(d)
    fds = sv.proc_fds(d.pid)
    os.write(wfd, b"x")
    os.waitpid(pid, 0)
    return {"what": "600 idle greeted connections of one user (nobody)", "rss_before_mib": before,
            "admitted": admitted, "refused": refused, "daemon_fds": fds, **m}


def att_queued(bins):
    # Workers that never become ready: every job stays queued.
    d = sv.Daemon("att-queued", bins, {"echo": {"command": ["sleep", "600"], "workers": 1,
                                                "start_timeout": "10m"}}, log_level="info")
    before = rss_mib(d.pid)
    s = greeted(d.socket)
    n = 300
    data = b"q" * (MiB - 64)
    for _ in range(n):
        s.sendall(submit_req("echo", data))
        r = sv._read_frame(s)
        if r[:1] != b"\x05":
            raise sv.SectionError(f"submit refused: {r[:200]!r}")
    m = measure(d)
    s.close()
    return {"what": f"{n} queued inputs of 1 MiB - 64 bytes", "rss_before_mib": before, **m}


ATTACKS = [("announce", att_announce), ("trickle", att_trickle), ("results", att_results),
           ("waitdup", att_waitdup), ("conns", att_conns), ("queued", att_queued)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(k for k, _ in ATTACKS))
    args = ap.parse_args()
    only = {x for x in args.only.split(",") if x}
    bdir, bins = sv.resolve_bins()
    sv.LOGS.mkdir(parents=True, exist_ok=True)
    results, rows, failed = {}, [], False
    for key, fn in ATTACKS:
        if only and key not in only:
            continue
        mark = len(sv._CLEANUPS)
        try:
            r = fn(bins)
        except Exception as e:  # one row per attack, the others still run
            failed = True
            results[key] = {"error": f"{type(e).__name__}: {e}"}
            rows.append((key, "ERROR", str(e)[:80], "", ""))
            continue
        finally:
            sv.run_cleanups(mark)
        results[key] = r
        rss_ok = r["rss_peak_mib"] < RSS_TARGET_MIB
        rtt_ok = r["status_ms_max"] < RTT_TARGET_MS
        rows.append((key, r["what"], f"{r['rss_before_mib']:.1f} -> {r['rss_peak_mib']:.1f} MiB",
                     f"{r['status_ms_median']:.2f} / {r['status_ms_max']:.2f} ms",
                     "ok" if rss_ok and rtt_ok else "FAIL"))
    head = ("attack", "what", "daemon RSS (before -> peak)", "status median / max", "target")
    widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(c).ljust(wd) for c, wd in zip(r, widths))
    print(line(head))
    for r in rows:
        print(line(r))
    sv.OUT.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python3 bench/attacks.py" + (f" --only {args.only}" if args.only else ""),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "bin_dir": str(bdir),
            "machine": sv.machine_info(), "targets": {"rss_mib": RSS_TARGET_MIB, "status_ms": RTT_TARGET_MS}}
    import json
    (sv.OUT / "attacks.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    md = ["# jobvisor under hostile clients", "", f"- command: `{meta['command']}`",
          f"- date: {meta['date']}", "", "| " + " | ".join(head) + " |",
          "|" + "---|" * len(head)] + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    (sv.OUT / "attacks.md").write_text("\n".join(md) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
