"""The implementation under test, chosen by $JOBVISOR_COMPAT_IMPL (run.py
sets it from --impl): "stdlib" (multiprocessing's spawn context, the
reference) or "jobvisor".

Only construction differs between the two; everything the tests assert is
the same, except where README.md says otherwise. The names the adapted tests
use:

- ``Pool(processes=None, initializer=None, initargs=(), maxtasksperchild=None)``
- ``Executor(max_workers=None, *, initializer=None, initargs=(), max_tasks_per_child=None)``
- ``POOL_REMOTE_TRACEBACK`` / ``EXECUTOR_REMOTE_TRACEBACK``: the types the
  ``__cause__`` of a re-raised remote exception may have;
- ``JobError``: jobvisor's error for a call whose worker kept crashing
  (None with stdlib);
- ``POOL_IMPORT`` / ``EXECUTOR_IMPORT``: the import line of the scripts that
  some tests run in a child interpreter.
"""

import concurrent.futures
import concurrent.futures.process
import multiprocessing
import multiprocessing.pool
import os

IMPL = os.environ.get("JOBVISOR_COMPAT_IMPL", "stdlib")
SPAWN = multiprocessing.get_context("spawn")

if IMPL == "stdlib":
    def Pool(processes=None, initializer=None, initargs=(), maxtasksperchild=None):
        return SPAWN.Pool(processes, initializer, initargs, maxtasksperchild)

    def Executor(max_workers=None, *, initializer=None, initargs=(), max_tasks_per_child=None):
        return concurrent.futures.ProcessPoolExecutor(
            max_workers, mp_context=SPAWN, initializer=initializer, initargs=initargs,
            max_tasks_per_child=max_tasks_per_child)

    POOL_REMOTE_TRACEBACK = (multiprocessing.pool.RemoteTraceback,)
    EXECUTOR_REMOTE_TRACEBACK = (concurrent.futures.process._RemoteTraceback,)
    JobError = None
    POOL_IMPORT = ("import multiprocessing; "
                   "Pool = multiprocessing.get_context('spawn').Pool")
    EXECUTOR_IMPORT = ("import functools, multiprocessing, concurrent.futures; "
                       "Executor = functools.partial(concurrent.futures.ProcessPoolExecutor, "
                       "mp_context=multiprocessing.get_context('spawn'))")
elif IMPL == "jobvisor":
    # CPython's tests expect plain pickle (an unpicklable lambda result must
    # fail); jobvisor would use cloudpickle where it is installed.
    os.environ["JOBVISOR_CLOUDPICKLE"] = "0"
    import jobvisor

    Pool = jobvisor.Pool
    Executor = jobvisor.Executor
    # jobvisor may reuse the standard library's classes or have its own
    # (an exception whose `tb` is the worker's formatted traceback).
    _own = tuple(getattr(jobvisor, n) for n in ("RemoteTraceback",) if hasattr(jobvisor, n))
    POOL_REMOTE_TRACEBACK = _own + (multiprocessing.pool.RemoteTraceback,)
    EXECUTOR_REMOTE_TRACEBACK = _own + (concurrent.futures.process._RemoteTraceback,)
    JobError = jobvisor.JobError
    POOL_IMPORT = "from jobvisor import Pool"
    EXECUTOR_IMPORT = "from jobvisor import Executor"
else:
    raise SystemExit(f"JOBVISOR_COMPAT_IMPL={IMPL!r}: expected stdlib or jobvisor")
