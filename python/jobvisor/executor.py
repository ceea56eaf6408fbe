"""``jobvisor.Executor``: a drop-in ``concurrent.futures.ProcessPoolExecutor``
whose calls are durable jobs on supervised workers.

    from jobvisor import Executor          # was: from concurrent.futures import ProcessPoolExecutor
    with Executor() as ex:
        print(list(ex.map(pow, [2, 3], [10, 10])))   # [1024, 59049]

**Embedded** (no ``pool``): the Executor starts a private ``jobvisord`` for
this process with ``max_workers`` workers (default ``os.cpu_count()``)
running ``sys.executable``, with this process's ``sys.path``, working
directory, environment and main module (as the spawn start method does:
functions defined in your script work; code at the script's top level must
be under ``if __name__ == "__main__":``). ``initializer(*initargs)`` runs
once in each worker before it takes calls; ``max_tasks_per_child`` replaces
a worker after that many calls. Everything stops at ``shutdown()``, at
interpreter exit, and also when this process is killed (``kill -9``
included): no process or file is left behind.

**Connected** (``pool="name"``, optional ``socket=``/``config=``): calls run
on that pool of a shared daemon (its workers run
``python3 -m jobvisor.worker --call``; they must be able to import your
functions by module and name).

Each ``submit(fn, *args, **kwargs)`` is one job whose input is the pickled
call. Large binary arguments and results (``bytes``, ``bytearray``,
``memoryview``, numpy arrays: anything pickled through
``pickle.PickleBuffer``) travel out of band through shared memory; a numpy
argument is a view of the worker's shared memory, valid during the call.
A call that raises re-raises here with the worker's traceback as
``__cause__``. Where jobvisor differs from ``ProcessPoolExecutor``, it is
on purpose:

- a worker that dies during a call (``os._exit``, a segfault, the OOM
  killer) is replaced and the call retried, up to ``max_attempts`` (3); then
  the call raises :class:`JobError`, and the executor keeps working
  (``ProcessPoolExecutor`` breaks for good with ``BrokenProcessPool``);
- workers that cannot start (an ImportError, a failing initializer) make
  the calls raise :class:`PoolFailedError` (a ``BrokenProcessPool``) with
  the workers' own error text;
- ``future.cancel()`` also works on a call that is running: its job is
  cancelled and the worker interrupts it.

``mp_context`` is accepted for compatibility and ignored: workers are
always started fresh (like the spawn method).
"""

import atexit
import concurrent.futures as cf
import os
import threading
import time
import weakref
from concurrent.futures.process import _chain_from_iterable_of_lists, _get_chunks, _process_chunk
from functools import partial

from . import _calls, _embedded
from ._engine import CallFuture, Engine, JobError, PoolFailedError, RemoteError, RemoteTraceback
from .client import _options, resolve_socket

__all__ = ["Executor", "JobError", "PoolFailedError", "RemoteError", "RemoteTraceback"]

_LIVE = weakref.WeakSet()


def connect(pool, socket, config, max_workers, initializer, initargs, max_tasks_per_child,
            options):
    """An :class:`Engine` on `pool` of a shared daemon, or on the pool of a
    new private daemon when `pool` is None; and that daemon (or None)."""
    if pool is None:
        if socket is not None or config is not None:
            raise TypeError("name the pool to use on that daemon (pool=...)")
        daemon = _embedded.Daemon(max_workers, initializer=initializer, initargs=initargs,
                                  max_tasks_per_child=max_tasks_per_child)
        try:
            return Engine(_embedded.POOL, daemon.socket, options, sticky_failure=True), daemon
        except BaseException:
            daemon.stop()
            raise
    if initializer is not None or max_tasks_per_child is not None:
        raise ValueError("initializer and max_tasks_per_child set up the workers of a private "
                         "daemon; a shared pool's workers are set up in its configuration")
    return Engine(pool, resolve_socket(socket, config), options), None


class Executor(cf.Executor):
    def __init__(self, max_workers=None, mp_context=None, initializer=None, initargs=(), *,
                 max_tasks_per_child=None, pool=None, socket=None, config=None, timeout=None,
                 max_attempts=None, priority=0, key=None):
        if isinstance(max_workers, str):  # Executor("pool"): the shared pool of that name
            pool, max_workers = max_workers, None
        if pool is None:
            if max_workers is None:
                max_workers = os.cpu_count() or 1
            elif max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
            if max_tasks_per_child is not None:
                if not isinstance(max_tasks_per_child, int):
                    raise TypeError("max_tasks_per_child must be an integer")
                if max_tasks_per_child <= 0:
                    raise ValueError("max_tasks_per_child must be >= 1")
        self._max_workers = max_workers
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        self._closed = False
        self._engine, self._daemon = connect(
            pool, socket, config, max_workers, initializer, initargs, max_tasks_per_child,
            _options(timeout, max_attempts, priority, key))
        _LIVE.add(self)
        # An Executor dropped without shutdown() finishes its calls first
        # (as ProcessPoolExecutor's manager thread does), then stops.
        weakref.finalize(self, _release, self._engine, self._daemon)

    def submit(self, fn, /, *args, **kwargs):
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future = CallFuture(self._engine)
            try:
                payload = _calls.dumps_call(fn, args, kwargs)
            except Exception as e:  # unpicklable: the future says so, as in ProcessPoolExecutor
                future.set_exception(e)
                return future
            return self._engine.submit(payload, future)

    submit.__doc__ = cf.Executor.submit.__doc__

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        """Like ``ProcessPoolExecutor.map``: with ``chunksize`` > 1, each job
        runs that many calls (fewer jobs, less overhead per call). The calls
        are submitted together, in few writes."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if chunksize == 1:
            return self._map(fn, zip(*iterables), timeout)
        results = self._map(partial(_process_chunk, fn), zip(_get_chunks(*iterables, chunksize=chunksize)),
                            timeout)
        return _chain_from_iterable_of_lists(results)

    def _map(self, fn, arg_tuples, timeout):
        end_time = None if timeout is None else timeout + time.monotonic()
        fs = self._submit_each(fn, arg_tuples)

        # As concurrent.futures.Executor.map: yield in order, and cancel
        # what is left if the consumer stops early.
        def result_iterator():
            try:
                fs.reverse()
                while fs:
                    if end_time is None:
                        yield _result(fs.pop())
                    else:
                        yield _result(fs.pop(), end_time - time.monotonic())
            finally:
                for future in fs:
                    future.cancel()
        return result_iterator()

    def _submit_each(self, fn, arg_tuples):
        """The futures of ``fn(*args)`` for each of `arg_tuples`, submitted
        together (few writes)."""
        with self._shutdown_lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            calls = []
            for args in arg_tuples:
                future = CallFuture(self._engine)
                try:
                    calls.append((_calls.dumps_call(fn, args, {}), future))
                except Exception as e:
                    future.set_exception(e)
                    calls.append((None, future))
            self._engine.submit_many([c for c in calls if c[0] is not None])
            return [f for _, f in calls]

    def shutdown(self, wait=True, *, cancel_futures=False):
        """No more calls; with `cancel_futures`, calls no worker has taken
        are cancelled; with `wait`, returns once every call has finished and the
        private daemon (if any) has stopped. Without `wait`, that happens in
        the background (and at the latest at interpreter exit)."""
        with self._shutdown_lock:
            self._shutdown = True
        if cancel_futures:
            # Calls a worker has taken finish, as in ProcessPoolExecutor; the
            # oldest `max_workers` stand for them (which jobs have started
            # is the daemon's to know: a shared pool's calls are all
            # cancelled).
            pending = self._engine.pending()
            for f in pending[self._max_workers if self._daemon is not None else 0:]:
                f.cancel()
        if wait:
            self._finish()
        else:
            threading.Thread(target=self._finish, name="jobvisor-shutdown", daemon=True).start()

    def _finish(self):
        self._engine.wait_idle()
        with self._shutdown_lock:
            if self._closed:
                return
            self._closed = True
        self._engine.close()
        if self._daemon is not None:
            self._daemon.stop()
        _LIVE.discard(self)


def _release(engine, daemon):
    def finish():
        engine.wait_idle()
        engine.close()
        if daemon is not None:
            daemon.stop()
    if engine.closed:
        return
    try:
        threading.Thread(target=finish, name="jobvisor-release", daemon=True).start()
    except RuntimeError:  # at interpreter exit: no new threads
        finish()


def _result(future, timeout=None):
    try:
        try:
            return future.result(timeout)
        finally:
            future.cancel()
    finally:
        del future


@atexit.register
def _at_exit():
    # As ProcessPoolExecutor does: calls made are finished before the
    # interpreter goes.
    for ex in list(_LIVE):
        ex.shutdown(wait=True)
