#!/usr/bin/env python3
"""Runs the adaptation of CPython's multiprocessing.Pool and
concurrent.futures.ProcessPoolExecutor tests (see README.md) against one
implementation:

    python3 python/compat/run.py --impl stdlib     # the reference: must pass
    python3 python/compat/run.py --impl jobvisor   # jobvisor.Pool / jobvisor.Executor

Options: -v (one line per test), -k PATTERN (only tests whose id contains
it; repeatable), --test-timeout S (per test, default 120), --total-timeout S
(whole run, default 1200).

Bounded: a watchdog thread fails the run (exit 3) when one test (with the
class set-up/tear-down around it) exceeds --test-timeout or the whole run
exceeds --total-timeout, after printing every thread's stack and killing the
run's child processes; faulthandler ends the run (exit 1) a minute later
should the interpreter itself be stuck.

Exit status: 0 all passed, 1 failures, 3 a test timed out.

With --impl jobvisor, `jobvisor` must be importable (python/ on PYTHONPATH)
and find jobvisord (JOBVISOR_BIN_DIR).
"""

import argparse
import faulthandler
import os
import signal
import sys
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
MODULES = ["test_pool", "test_executor", "test_jobvisor"]


def main_sqr(x):
    """For MainModuleFunctionTest: a function of the caller's __main__,
    which a worker finds by importing this script as __mp_main__."""
    return x * x


def _children(pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(d))
    return out


def _kill_children():
    kids = _children(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for k in kids:
            try:
                os.kill(k, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + 2
        while time.monotonic() < end and any(os.path.exists(f"/proc/{k}") and
                                             not _zombie(k) for k in kids):
            time.sleep(0.05)


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


class Watchdog(threading.Thread):
    def __init__(self, timeout, total_timeout):
        super().__init__(name="compat-watchdog", daemon=True)
        self.timeout = timeout
        self.total_timeout = total_timeout
        self.end = time.monotonic() + total_timeout
        self.lock = threading.Lock()
        self.deadline = None
        self.label = None
        self.fired = threading.Event()

    def hold_if_fired(self):
        # Once the watchdog fired, the main thread must not go on (killing
        # the children may unblock it) nor end the run first: it waits for
        # the watchdog's os._exit(3).
        if self.fired.is_set():
            while True:
                time.sleep(60)

    def arm(self, label):
        with self.lock:
            self.deadline = time.monotonic() + self.timeout
            self.label = label

    def disarm(self):
        with self.lock:
            self.deadline = None

    def run(self):
        while True:
            time.sleep(0.5)
            with self.lock:
                now = time.monotonic()
                late = self.deadline is not None and now > self.deadline
                label = f"{self.label} exceeded {self.timeout:g} s"
                if now > self.end:
                    late = True
                    label = f"the whole run exceeded {self.total_timeout:g} s (at {self.label})"
            if late:
                self.fired.set()
                sys.stderr.write(f"\n\nTIMEOUT: {label}; stacks of every thread:\n")
                sys.stderr.flush()
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                _kill_children()
                sys.stderr.write(f"TIMEOUT: {label}\n")
                sys.stderr.flush()
                os._exit(3)


def make_result_class(watchdog, durations):
    class Result(unittest.TextTestResult):
        def startTest(self, test):
            watchdog.hold_if_fired()
            watchdog.arm(test.id())
            self._t0 = time.monotonic()
            super().startTest(test)

        def stopTest(self, test):
            watchdog.hold_if_fired()
            durations.append((time.monotonic() - self._t0, test.id()))
            super().stopTest(test)
            # Covers the tear-down of this class and the set-up of the next.
            watchdog.arm(f"after {test.id()} (class tear-down/set-up)")
    return Result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", choices=["stdlib", "jobvisor"], required=True)
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("-k", action="append", default=[], metavar="PATTERN")
    ap.add_argument("--test-timeout", type=float, default=120.0)
    ap.add_argument("--total-timeout", type=float, default=1200.0)
    args = ap.parse_args()
    if sys.version_info < (3, 11):
        # max_tasks_per_child (ProcessPoolExecutor) is new in 3.11.
        ap.error(f"needs Python >= 3.11, this is {sys.version.split()[0]}")

    # Read by compat_impl, here and in every process the tests start.
    os.environ["JOBVISOR_COMPAT_IMPL"] = args.impl
    if sys.path[0] != HERE:
        sys.path.insert(0, HERE)
    faulthandler.enable()
    # The backstop, should the interpreter itself be stuck (the watchdog
    # thread could not run): exit 1 after printing the stacks.
    faulthandler.dump_traceback_later(args.total_timeout + 60, exit=True)

    import compat_impl
    print(f"compat: --impl {args.impl} (Python {sys.version.split()[0]}, {sys.executable})",
          flush=True)

    loader = unittest.TestLoader()
    if args.k:
        loader.testNamePatterns = [f"*{k}*" for k in args.k]
    suite = unittest.TestSuite(loader.loadTestsFromName(m) for m in MODULES)

    watchdog = Watchdog(args.test_timeout, args.total_timeout)
    watchdog.arm("loading")
    watchdog.start()
    durations = []
    runner = unittest.TextTestRunner(stream=sys.stderr, verbosity=2 if args.verbose else 1,
                                     resultclass=make_result_class(watchdog, durations))
    t0 = time.monotonic()
    result = runner.run(suite)
    watchdog.hold_if_fired()
    watchdog.disarm()
    faulthandler.cancel_dump_traceback_later()
    elapsed = time.monotonic() - t0

    durations.sort(reverse=True)
    print("slowest tests:", file=sys.stderr)
    for dt, name in durations[:10]:
        print(f"  {dt:6.2f} s  {name}", file=sys.stderr)
    print(f"compat --impl {args.impl}: ran {result.testsRun}, "
          f"failures {len(result.failures)}, errors {len(result.errors)}, "
          f"skipped {len(result.skipped)}, {elapsed:.1f} s: "
          f"{'OK' if result.wasSuccessful() else 'FAILED'}", flush=True)
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
