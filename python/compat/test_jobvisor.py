"""Ours, not CPython's: jobvisor's side of the CPython tests whose behaviour
jobvisor deliberately changes. A worker that crashes (segfault, os._exit,
SIGKILL) does not break the pool: the call is retried (up to 3 attempts),
then raises jobvisor.JobError, and the pool keeps working. CPython expects
BrokenProcessPool there (ProcessPoolExecutor; multiprocessing.Pool hangs).

Each test names the CPython test it stands for. Run with --impl jobvisor
only (skipped with stdlib).
"""

import functools
import os
import signal
import tempfile
import unittest

import compat_impl
import compat_support as support
from compat_funcs import (
    _crash, _crash_with_data, _return_instance, CrashAtPickle, CrashAtUnpickle,
    crash_on, crash_once, os_exit, pid_then_sleep)
from test_pool import sqr

TIMEOUT = 2 * support.SHORT_TIMEOUT

only_jobvisor = unittest.skipUnless(compat_impl.IMPL == "jobvisor",
                                    "jobvisor's deliberate difference from the standard library")


@only_jobvisor
class JobvisorExecutorCrashTest(unittest.TestCase):
    """test_process_pool.py ProcessPoolExecutorTest.test_killed_child and the
    crash cases of test_deadlock.py ExecutorDeadlockTest."""

    def setUp(self):
        self.executor = compat_impl.Executor(max_workers=2)

    def tearDown(self):
        self.executor.shutdown(wait=True)
        self.executor = None

    def _check_crash(self, func, *args):
        # The call is retried, then raises JobError ...
        res = self.executor.submit(func, *args)
        with self.assertRaises(compat_impl.JobError):
            res.result(timeout=TIMEOUT)
        # ... and the executor keeps working.
        self.assertEqual(self.executor.submit(pow, 2, 8).result(timeout=TIMEOUT), 256)

    def test_killed_child(self):
        # CPython: a child terminated mid-call breaks the pool
        # (BrokenProcessPool for the call and for later submits). jobvisor:
        # the call runs again on a live worker and returns; submits work.
        # SIGKILL rather than Process.terminate()'s SIGTERM, which a jobvisor
        # worker may take as "stop when the current call is done".
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "pid")
            fut = self.executor.submit(pid_then_sleep, path, 3)
            for _ in support.sleeping_retry(support.SHORT_TIMEOUT, "the call to start"):
                if os.path.exists(path):
                    break
            with open(path) as f:
                pid = int(f.read())
            os.kill(pid, signal.SIGKILL)
            self.assertNotEqual(fut.result(timeout=TIMEOUT), pid)
        self.assertEqual(self.executor.submit(pow, 2, 8).result(timeout=TIMEOUT), 256)

    def test_crash_at_task_unpickle(self):
        self._check_crash(id, CrashAtUnpickle())

    def test_crash_during_func_exec_on_worker(self):
        self._check_crash(_crash)

    def test_crash_during_result_pickle_on_worker(self):
        self._check_crash(_return_instance, CrashAtPickle)

    def test_os_exit_during_func_exec_on_worker(self):
        # (no CPython counterpart: os._exit in the called function)
        self._check_crash(os_exit, 3)

    def test_crash_once_is_retried(self):
        # (no CPython counterpart: a single crash is not the call's failure)
        with tempfile.TemporaryDirectory() as d:
            fut = self.executor.submit(crash_once, os.path.join(d, "marker"))
            self.assertEqual(fut.result(timeout=TIMEOUT), "ok")

    def test_shutdown_deadlock(self):
        # CPython: a worker crashing after shutdown() was called does not
        # deadlock, and the call raises BrokenProcessPool.
        f = self.executor.submit(_crash, delay=.1)
        self.executor.shutdown(wait=True)
        with self.assertRaises(compat_impl.JobError):
            f.result(timeout=TIMEOUT)

    def test_crash_big_data(self):
        # CPython: a clean exception instead of a deadlock when a child
        # crashes while data is being written to it (10 calls there; 2 here,
        # each is attempted 3 times).
        data = "a" * support.PIPE_MAX_SIZE
        with self.assertRaises(compat_impl.JobError):
            list(self.executor.map(_crash_with_data, [data] * 2, timeout=2 * TIMEOUT))


@only_jobvisor
class JobvisorPoolCrashTest(unittest.TestCase):
    """multiprocessing.Pool has no CPython test here (it hangs when a worker
    dies mid-task); jobvisor.Pool behaves as jobvisor.Executor does."""

    @classmethod
    def setUpClass(cls):
        cls.pool = compat_impl.Pool(2)

    @classmethod
    def tearDownClass(cls):
        cls.pool.terminate()
        cls.pool.join()
        cls.pool = None

    def test_apply_crash(self):
        with self.assertRaises(compat_impl.JobError):
            self.pool.apply_async(_crash).get(timeout=TIMEOUT)
        self.assertEqual(self.pool.apply_async(pow, (2, 8)).get(timeout=TIMEOUT), 256)

    def test_apply_async_crash_error_callback(self):
        scratchpad = [None]
        def errback(exc):
            scratchpad[0] = exc
        res = self.pool.apply_async(os_exit, (3,), error_callback=errback)
        res.wait(timeout=TIMEOUT)
        self.assertTrue(res.ready())
        self.assertFalse(res.successful())
        self.assertIsInstance(scratchpad[0], compat_impl.JobError)
        self.assertRaises(compat_impl.JobError, res.get, timeout=TIMEOUT)

    def test_map_crash(self):
        with self.assertRaises(compat_impl.JobError):
            self.pool.map_async(functools.partial(crash_on, bad=3), range(10)).get(timeout=2 * TIMEOUT)
        self.assertEqual(self.pool.map_async(sqr, range(10)).get(timeout=TIMEOUT),
                         [sqr(i) for i in range(10)])

    def test_imap_crash(self):
        it = self.pool.imap(functools.partial(crash_on, bad=3), range(6))
        for i in range(3):
            self.assertEqual(it.next(timeout=TIMEOUT), i * i)
        self.assertRaises(compat_impl.JobError, it.next, timeout=2 * TIMEOUT)
        self.assertEqual(it.next(timeout=TIMEOUT), 16)

    def test_crash_once_is_retried(self):
        with tempfile.TemporaryDirectory() as d:
            res = self.pool.apply_async(crash_once, (os.path.join(d, "marker"),))
            self.assertEqual(res.get(timeout=TIMEOUT), "ok")
