"""jobvisor.Executor() and jobvisor.Pool() in embedded mode, run as a user
runs them: a script (with its functions in ``__main__``) started with this
interpreter, which starts a private jobvisord.

The daemon comes from ``$JOBVISOR_BIN_DIR`` (the Rust test suite sets it to
the binaries it built) or from the installed package. Without either, the
tests are skipped with a message, unless ``JOBVISOR_REQUIRE_BINARIES`` is
set (as the suite sets it): then they fail.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE_ROOT = os.path.dirname(HERE)
DEADLINE = 60


def have_binaries():
    sys.path.insert(0, PACKAGE_ROOT)
    try:
        from jobvisor import _bin
        _bin.find("jobvisord")
        return True, ""
    except Exception as e:
        return False, str(e)
    finally:
        sys.path.remove(PACKAGE_ROOT)


FOUND, WHY = have_binaries()
if not FOUND and os.environ.get("JOBVISOR_REQUIRE_BINARIES"):
    raise RuntimeError(f"jobvisord is required for these tests: {WHY}")


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose (its parent has not reaped it yet).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(cond, what, timeout=10):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@unittest.skipUnless(FOUND, f"jobvisord not found ({WHY}); set JOBVISOR_BIN_DIR")
class Embedded(unittest.TestCase):
    def run_script(self, body, *, env=None, expect_ok=True, timeout=DEADLINE, files=None):
        """Writes `body` as main.py in a new directory, runs it with this
        interpreter there; returns (stdout, stderr, returncode)."""
        d = tempfile.mkdtemp(prefix="jv-embedded-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", d]))
        for name, text in (files or {}).items():
            with open(os.path.join(d, name), "w") as f:
                f.write(textwrap.dedent(text))
        path = os.path.join(d, "main.py")
        with open(path, "w") as f:
            f.write(textwrap.dedent(body))
        e = dict(os.environ)
        e["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, e.get("PYTHONPATH")) if p)
        e.update(env or {})
        p = subprocess.run([sys.executable, path], cwd=d, env=e, capture_output=True, text=True,
                           timeout=timeout)
        if expect_ok:
            self.assertEqual(p.returncode, 0, f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
        return p.stdout, p.stderr, p.returncode

    def test_executor_map_of_a_function_defined_in_the_script(self):
        out, _, _ = self.run_script("""
            import jobvisor

            def square(x):
                return x * x

            if __name__ == "__main__":
                with jobvisor.Executor() as ex:
                    print(sum(ex.map(square, range(1000))))
                    print(ex.submit(square, 12).result())
        """)
        self.assertEqual(out.split(), [str(sum(x * x for x in range(1000))), "144"])

    def test_pool_map_of_a_function_defined_in_the_script(self):
        out, _, _ = self.run_script("""
            import jobvisor

            def square(x):
                return x * x

            if __name__ == "__main__":
                with jobvisor.Pool() as p:
                    print(sum(p.map(square, range(1000))))
        """)
        self.assertEqual(out.split(), [str(sum(x * x for x in range(1000)))])

    def test_the_pool_api(self):
        out, _, _ = self.run_script("""
            import json, multiprocessing, threading, time
            import jobvisor

            def square(x):
                return x * x

            def add(a, b):
                return a + b

            def fail(x):
                raise ValueError(f"bad {x}")

            def slow(x):
                time.sleep(x)
                return x

            if __name__ == "__main__":
                r = {}
                with jobvisor.Pool(2) as p:
                    r["apply"] = p.apply(add, (2, 3))
                    r["apply_kwds"] = p.apply(add, (), {"a": 1, "b": 2})
                    got = []
                    errs = []
                    a = p.apply_async(square, (7,), callback=got.append)
                    r["apply_async"] = a.get(timeout=30)
                    a.wait()
                    r["ready"], r["successful"] = a.ready(), a.successful()
                    e = p.apply_async(fail, (1,), error_callback=errs.append)
                    e.wait(30)
                    r["failed_successful"] = e.successful()
                    try:
                        e.get()
                    except ValueError as exc:
                        r["failed_get"] = str(exc)
                    r["callback"] = got
                    r["error_callback"] = [str(x) for x in errs]
                    r["map"] = p.map(square, range(10))
                    r["map_chunks"] = p.map(square, range(10), chunksize=3)
                    r["map_empty"] = p.map(square, [])
                    m = p.map_async(square, range(5), callback=got.append)
                    r["map_async"] = m.get(30)
                    r["imap"] = list(p.imap(square, range(10)))
                    r["imap_chunks"] = list(p.imap(square, iter(range(10)), chunksize=4))
                    r["imap_unordered"] = sorted(p.imap_unordered(square, range(10)))
                    r["imap_unordered_chunks"] = sorted(p.imap_unordered(square, range(10), chunksize=3))
                    r["starmap"] = p.starmap(add, [(1, 2), (3, 4)])
                    r["starmap_chunks"] = p.starmap(add, [(1, 2), (3, 4), (5, 6)], chunksize=2)
                    r["starmap_async"] = p.starmap_async(add, [(5, 5)]).get(30)
                    try:
                        p.map(fail, range(3))
                    except ValueError as exc:
                        r["map_raises"] = str(exc)
                    it = p.imap(slow, [0.5])
                    try:
                        it.next(timeout=0.01)
                    except multiprocessing.TimeoutError:
                        r["imap_timeout"] = True
                    r["imap_after_timeout"] = it.next(timeout=30)
                    s = p.apply_async(slow, (0.5,))
                    try:
                        s.get(timeout=0.01)
                    except multiprocessing.TimeoutError:
                        r["get_timeout"] = True
                    try:
                        s.successful()
                    except ValueError:
                        r["successful_not_ready"] = True
                    try:
                        p.join()
                    except ValueError:
                        r["join_running"] = True
                p2 = jobvisor.Pool(1)
                res = p2.map_async(square, range(20))
                p2.close()
                try:
                    p2.apply(square, (1,))
                except ValueError:
                    r["closed_refuses"] = True
                p2.join()
                r["close_join"] = res.get(1)
                p3 = jobvisor.Pool(1)
                long = p3.apply_async(slow, (30,))
                t = time.monotonic()
                p3.terminate()
                p3.join()
                r["terminate_fast"] = time.monotonic() - t < 10
                try:
                    long.get(10)
                except Exception as exc:
                    r["terminated_task"] = type(exc).__name__
                print(json.dumps(r))
        """)
        r = json.loads(out)
        sq = [x * x for x in range(10)]
        self.assertEqual(r["apply"], 5)
        self.assertEqual(r["apply_kwds"], 3)
        self.assertEqual(r["apply_async"], 49)
        self.assertEqual((r["ready"], r["successful"]), (True, True))
        self.assertIs(r["failed_successful"], False)
        self.assertEqual(r["failed_get"], "bad 1")
        self.assertEqual(r["callback"], [49, [0, 1, 4, 9, 16]])
        self.assertEqual(r["error_callback"], ["bad 1"])
        for k in ("map", "map_chunks", "imap", "imap_chunks", "imap_unordered", "imap_unordered_chunks"):
            self.assertEqual(r[k], sq, k)
        self.assertEqual(r["map_empty"], [])
        self.assertEqual(r["map_async"], sq[:5])
        self.assertEqual(r["starmap"], [3, 7])
        self.assertEqual(r["starmap_chunks"], [3, 7, 11])
        self.assertEqual(r["starmap_async"], [10])
        self.assertTrue(r["map_raises"].startswith("bad "))
        for k in ("imap_timeout", "get_timeout", "successful_not_ready", "join_running",
                  "closed_refuses", "terminate_fast"):
            self.assertIs(r.get(k), True, k)
        self.assertEqual(r["imap_after_timeout"], 0.5)
        self.assertEqual(r["close_join"], [x * x for x in range(20)])
        self.assertEqual(r["terminated_task"], "Abandoned")

    def test_the_executor_api(self):
        out, _, _ = self.run_script("""
            import concurrent.futures as cf, json, time
            import jobvisor

            def add(a, b=0):
                return a + b

            def slow(x):
                time.sleep(x)
                return x

            if __name__ == "__main__":
                r = {}
                with jobvisor.Executor(max_workers=2) as ex:
                    r["submit"] = ex.submit(add, 1, b=2).result(30)
                    r["map"] = list(ex.map(add, range(5), range(5)))
                    r["map_chunks"] = list(ex.map(add, range(50), chunksize=7))
                    fs = [ex.submit(add, i) for i in range(20)]
                    r["as_completed"] = sorted(f.result() for f in cf.as_completed(fs, timeout=30))
                    done, not_done = cf.wait(fs, timeout=30)
                    r["wait"] = (len(done), len(not_done))
                    try:
                        list(ex.map(slow, [5], timeout=0.2))
                    except cf.TimeoutError:
                        r["map_timeout"] = True
                ex = jobvisor.Executor(1)
                first = ex.submit(slow, 0.5)
                queued = [ex.submit(slow, 0.01) for _ in range(5)]
                ex.shutdown(wait=True, cancel_futures=True)
                r["cancel_futures"] = sum(f.cancelled() for f in queued)
                # The call the worker had taken finished, as in ProcessPoolExecutor.
                r["taken_call"] = (first.cancelled(), first.result())
                try:
                    ex.submit(add, 1)
                except RuntimeError:
                    r["after_shutdown"] = True
                ex = jobvisor.Executor(1)
                f = ex.submit(slow, 0.3)
                ex.shutdown(wait=False)
                r["shutdown_nowait_result"] = f.result(30)
                ex = jobvisor.Executor(1)
                f = ex.submit(slow, 30)
                time.sleep(0.3)
                t = time.monotonic()
                r["cancel_running"] = f.cancel()
                ex.shutdown(wait=True)
                r["cancel_fast"] = time.monotonic() - t < 10
                print(json.dumps(r))
        """)
        r = json.loads(out)
        self.assertEqual(r["submit"], 3)
        self.assertEqual(r["map"], [0, 2, 4, 6, 8])
        self.assertEqual(r["map_chunks"], list(range(50)))
        self.assertEqual(r["as_completed"], list(range(20)))
        self.assertEqual(r["wait"], [20, 0])
        self.assertIs(r.get("map_timeout"), True)
        self.assertEqual(r["cancel_futures"], 5)
        self.assertEqual(r["taken_call"], [False, 0.5])
        self.assertIs(r.get("after_shutdown"), True)
        self.assertEqual(r["shutdown_nowait_result"], 0.3)
        self.assertIs(r["cancel_running"], True)
        self.assertIs(r["cancel_fast"], True)

    def test_the_initializer_runs_once_per_worker(self):
        out, _, _ = self.run_script("""
            import json, os
            import jobvisor

            RUNS = []

            def init(tag):
                RUNS.append(tag)

            def where(_):
                return os.getpid(), list(RUNS)

            if __name__ == "__main__":
                with jobvisor.Executor(2, initializer=init, initargs=("hi",)) as ex:
                    a = list(ex.map(where, range(200)))
                with jobvisor.Pool(2, init, ("ho",)) as p:
                    b = p.map(where, range(200), chunksize=1)
                print(json.dumps([a, b]))
        """)
        for results, tag in zip(json.loads(out), ("hi", "ho")):
            self.assertTrue(all(runs == [tag] for _, runs in results), results[:5])
            self.assertLessEqual(len({pid for pid, _ in results}), 2)

    def test_max_tasks_per_child_recycles_workers(self):
        out, _, _ = self.run_script("""
            import json, os
            import jobvisor

            def pid(_):
                return os.getpid()

            if __name__ == "__main__":
                with jobvisor.Executor(1, max_tasks_per_child=2) as ex:
                    a = [ex.submit(pid, i).result() for i in range(6)]
                with jobvisor.Pool(1, maxtasksperchild=3) as p:
                    b = [p.apply(pid, (i,)) for i in range(6)]
                print(json.dumps([a, b]))
        """)
        a, b = json.loads(out)
        self.assertEqual([a.count(p) for p in dict.fromkeys(a)], [2, 2, 2], a)
        self.assertEqual([b.count(p) for p in dict.fromkeys(b)], [3, 3], b)

    def test_a_call_that_kills_its_worker_is_retried_then_raises_job_error(self):
        out, _, _ = self.run_script("""
            import os
            import jobvisor

            def die(_):
                os._exit(7)

            def ok(x):
                return x + 1

            if __name__ == "__main__":
                with jobvisor.Executor(2) as ex:
                    try:
                        ex.submit(die, 1).result(60)
                    except jobvisor.JobError as e:
                        print("JobError", e.state, len(e.job.attempts))
                    print("still works", ex.submit(ok, 1).result(60))
                with jobvisor.Pool(2) as p:
                    try:
                        p.apply(die, (1,))
                    except jobvisor.JobError as e:
                        print("Pool JobError", e.state)
        """)
        self.assertIn("JobError dead 3", out)
        self.assertIn("still works 2", out)
        self.assertIn("Pool JobError dead", out)

    def test_a_remote_exception_carries_its_traceback(self):
        out, _, _ = self.run_script("""
            import jobvisor

            class Custom(Exception):
                pass

            def boom(x):
                raise Custom(f"boom {x}")

            if __name__ == "__main__":
                with jobvisor.Executor(1) as ex:
                    try:
                        ex.submit(boom, 7).result()
                    except Custom as e:
                        print("caught", e)
                        print("cause", type(e.__cause__).__name__)
                        print(str(e.__cause__))
        """)
        self.assertIn("caught boom 7", out)
        self.assertIn("cause RemoteTraceback", out)
        self.assertIn('raise Custom(f"boom {x}")', out)
        self.assertIn("in boom", out)

    def test_unpicklable_calls_fail_like_process_pool_executor_without_cloudpickle(self):
        out, _, _ = self.run_script("""
            import sys
            sys.modules["cloudpickle"] = None   # as if it were not installed
            import pickle
            import jobvisor

            if __name__ == "__main__":
                with jobvisor.Executor(1) as ex:
                    f = ex.submit(lambda x: x, 1)
                    try:
                        f.result(30)
                    except (pickle.PicklingError, AttributeError) as e:
                        print("refused", type(e).__name__)
                with jobvisor.Pool(1) as p:
                    try:
                        p.apply(lambda x: x, (1,))
                    except (pickle.PicklingError, AttributeError) as e:
                        print("pool refused", type(e).__name__)
        """)
        self.assertIn("refused", out)
        self.assertIn("pool refused", out)

    @unittest.skipUnless(__import__("importlib").util.find_spec("cloudpickle"), "cloudpickle not installed")
    def test_lambdas_and_closures_work_with_cloudpickle(self):
        out, _, _ = self.run_script("""
            import jobvisor

            if __name__ == "__main__":
                k = 10
                with jobvisor.Executor(1) as ex:
                    print(ex.submit(lambda x: x + k, 1).result(30))
                    print(list(ex.map(lambda x: x * k, [1, 2])))
        """)
        self.assertEqual(out.split(), ["11", "[10,", "20]"])

    def test_a_broken_import_in_the_workers_raises_its_text_at_once(self):
        out, _, _ = self.run_script("""
            import time
            import jobvisor

            if __name__ == "__mp_main__":   # only in the workers
                import no_such_module_here

            def square(x):
                return x * x

            if __name__ == "__main__":
                t = time.monotonic()
                with jobvisor.Executor(2) as ex:
                    try:
                        ex.submit(square, 3).result(60)
                    except jobvisor.PoolFailedError as e:
                        from concurrent.futures.process import BrokenProcessPool
                        print("Executor", isinstance(e, BrokenProcessPool), time.monotonic() - t < 20)
                        print(str(e).splitlines()[-1])
                    try:
                        ex.submit(square, 4).result(60)
                    except jobvisor.PoolFailedError:
                        print("later submits too")
                with jobvisor.Pool(1) as p:
                    try:
                        p.map(square, range(3))
                    except jobvisor.PoolFailedError as e:
                        print("Pool", str(e).splitlines()[-1])
        """)
        lines = out.splitlines()
        self.assertEqual(lines[0], "Executor True True", out)
        self.assertEqual(lines[1], "ModuleNotFoundError: No module named 'no_such_module_here'")
        self.assertEqual(lines[2], "later submits too")
        self.assertEqual(lines[3], "Pool ModuleNotFoundError: No module named 'no_such_module_here'")

    def test_a_failing_initializer_raises_its_text(self):
        out, _, _ = self.run_script("""
            import jobvisor

            def init():
                raise OSError("no database here")

            def square(x):
                return x * x

            if __name__ == "__main__":
                with jobvisor.Executor(1, initializer=init) as ex:
                    try:
                        ex.submit(square, 3).result(60)
                    except jobvisor.PoolFailedError as e:
                        print(str(e).splitlines()[-1])
        """)
        self.assertEqual(out.strip(), "OSError: no database here")

    def test_top_level_code_without_a_main_guard_is_refused_in_workers(self):
        _, err, rc = self.run_script("""
            import jobvisor

            def square(x):
                return x * x

            ex = jobvisor.Executor(1)
            print(ex.submit(square, 3).result(30))
            ex.shutdown()
        """, expect_ok=False)
        self.assertNotEqual(rc, 0)
        self.assertIn('if __name__ == "__main__":', err)

    def test_nothing_is_left_after_the_script_exits_or_is_killed(self):
        probe = """
            import json, os, sys, time
            import jobvisor

            def pid(_):
                return os.getpid()

            if __name__ == "__main__":
                ex = jobvisor.Executor(2)
                workers = set(ex.map(pid, range(50)))
                print(json.dumps({"daemon": ex._daemon.proc.pid, "dir": ex._daemon.dir,
                                  "workers": sorted(workers)}), flush=True)
                if sys.argv[-1] == "hang":
                    ex.submit(time.sleep, 60)
                    time.sleep(60)
        """
        # A script that just ends (no shutdown call): the atexit hook.
        out, _, _ = self.run_script(probe)
        info = json.loads(out)
        for p in [info["daemon"]] + info["workers"]:
            wait_until(lambda: not alive(p), f"process {p} to be gone")
        self.assertFalse(os.path.exists(info["dir"]), info["dir"])

        # kill -9 while a call is running.
        d = tempfile.mkdtemp(prefix="jv-embedded-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", d]))
        path = os.path.join(d, "main.py")
        with open(path, "w") as f:
            f.write(textwrap.dedent(probe))
        e = dict(os.environ)
        e["PYTHONPATH"] = os.pathsep.join(x for x in (PACKAGE_ROOT, e.get("PYTHONPATH")) if x)
        p = subprocess.Popen([sys.executable, path, "hang"], cwd=d, env=e, stdout=subprocess.PIPE,
                             text=True)
        try:
            info = json.loads(p.stdout.readline())
            p.send_signal(signal.SIGKILL)
            p.wait(10)
        finally:
            p.kill()
            p.wait()
            p.stdout.close()
        for q in [info["daemon"]] + info["workers"]:
            wait_until(lambda: not alive(q), f"process {q} to be gone after kill -9")
        wait_until(lambda: not os.path.exists(info["dir"]), f"{info['dir']} to be removed")

    def test_asyncio_run_in_executor(self):
        out, _, _ = self.run_script("""
            import asyncio
            import jobvisor

            def square(x):
                return x * x

            async def main():
                loop = asyncio.get_running_loop()
                with jobvisor.Executor(2) as ex:
                    results = await asyncio.gather(*(loop.run_in_executor(ex, square, i) for i in range(10)))
                print(results)

            if __name__ == "__main__":
                asyncio.run(main())
        """)
        self.assertEqual(out.strip(), str([i * i for i in range(10)]))

    def test_the_asyncio_client_and_executor(self):
        out, _, _ = self.run_script("""
            import asyncio, json
            import jobvisor
            from jobvisor import aio

            def square(x):
                return x * x

            async def main():
                r = {}
                async with aio.Executor(2) as ex:
                    r["submit"] = await ex.submit(square, 9)
                    r["map"] = [x async for x in ex.map(square, range(5))]
                    r["gather"] = await asyncio.gather(*(ex.submit(square, i) for i in range(5)))
                    # The byte-job client, on the same private daemon.
                    async with await aio.Client.connect(socket=ex._ex._daemon.socket) as c:
                        # A `--call` worker fails a byte job that is not a pickled call.
                        job_id = await c.submit("calls", b"not a pickle")
                        [job] = await c.wait(job_id)
                        r["wait"] = job.state
                        big = bytes(3 << 20)
                        job = await c.submit("calls", big, wait=True)
                        r["submit_wait"] = job.state
                        states = [j.state async for j in c.map("calls", [b"a", b"b", b"c"])]
                        r["map_states"] = states
                        r["status"] = [p["name"] for p in await c.status()]
                print(json.dumps(r))

            if __name__ == "__main__":
                asyncio.run(main())
        """)
        r = json.loads(out)
        self.assertEqual(r["submit"], 81)
        self.assertEqual(r["map"], [0, 1, 4, 9, 16])
        self.assertEqual(r["gather"], [0, 1, 4, 9, 16])
        self.assertEqual(r["wait"], "failed")
        self.assertEqual(r["submit_wait"], "failed")
        self.assertEqual(r["map_states"], ["failed"] * 3)
        self.assertEqual(r["status"], ["calls"])

    def test_large_bytes_arguments_and_results_travel_out_of_band(self):
        out, _, _ = self.run_script("""
            import hashlib
            import jobvisor

            def digest_and_reverse(data):
                return hashlib.sha256(data).hexdigest(), bytes(reversed(data[:100])) + bytes(len(data) - 100)

            def echo(data):
                return data

            if __name__ == "__main__":
                data = bytes(range(256)) * (8 << 12)     # 8 MiB
                with jobvisor.Executor(1) as ex:
                    d, back = ex.submit(digest_and_reverse, data).result(60)
                    print(d == hashlib.sha256(data).hexdigest(), len(back) == len(data),
                          back[:100] == bytes(reversed(data[:100])))
                    for n in (0, 1, 65535, 65536, (1 << 20) - 1, 1 << 20, 3 << 20):
                        blob = bytes(range(256)) * (n // 256) + bytes(n % 256)
                        got = ex.submit(echo, blob).result(60)
                        assert got == blob and type(got) is bytes, n
                        got = ex.submit(echo, bytearray(blob)).result(60)
                        assert got == blob and type(got) is bytearray, n
                    print("echo ok")
        """)
        self.assertEqual(out.split(), ["True", "True", "True", "echo", "ok"])

    @unittest.skipUnless(__import__("importlib").util.find_spec("numpy"), "numpy not installed")
    def test_a_numpy_array_arrives_as_a_view_of_shared_memory(self):
        out, _, _ = self.run_script("""
            import numpy as np
            import jobvisor

            def inspect(a):
                # A view of the worker's shared memory, writable as under
                # multiprocessing.
                a[0] += 1
                return bool(a.flags.owndata), bool(a.flags.writeable), a

            if __name__ == "__main__":
                arr = np.arange(4 << 20, dtype=np.float64)     # 32 MiB
                with jobvisor.Executor(1) as ex:
                    owns, writable, back = ex.submit(inspect, arr).result(60)
                print("owndata", owns, "writeable", writable)
                print("equal", bool(np.array_equal(back[1:], arr[1:])), back[0] == arr[0] + 1)
                print("result owns its data", bool(back.flags.owndata))
                print("caller's array unchanged", arr[0] == 0)
        """)
        self.assertIn("owndata False writeable True", out)
        self.assertIn("equal True True", out)
        self.assertIn("result owns its data False", out)
        self.assertIn("caller's array unchanged True", out)


if __name__ == "__main__":
    unittest.main()
