"""``jobvisor.Executor``: a ``concurrent.futures.Executor`` whose calls run on
a jobvisord pool of ``python3 -m jobvisor.worker --call`` workers.

    from jobvisor import Executor
    with Executor("py") as ex:
        print(list(ex.map(pow, [2, 3], [10, 10])))   # [1024, 59049]

Each ``submit(fn, *args, **kwargs)`` becomes one durable job whose input is
the pickled call; the future gets the unpickled return value, or the
exception the call raised (unpickled too, when it can be; otherwise a
:class:`RemoteError` carrying the worker's traceback). A job that ends
another way (dead after its worker crashed ``max_attempts`` times, timed out,
cancelled) raises :class:`JobError` with its state. ``fn`` must be picklable
by reference: a module-level function the workers can import.

One connection serves all calls: submits are pipelined (they do not wait for
each other), and one thread reads the answers. A call is submitted at once, so
its future is running from the start and ``future.cancel()`` returns False;
cancel the job itself with ``jobvisorctl cancel`` (or ``Client.cancel``). Options given to the constructor (``timeout`` in seconds,
``max_attempts``, ``priority``, ``key``) apply to every call.
"""

import collections
import concurrent.futures as cf
import pickle
import threading

from . import _wire as w
from .client import Connection, Error, _options, resolve_socket, submit_request


class RemoteError(Exception):
    """A call failed on the worker and its exception could not be rebuilt
    here; the message is the worker's traceback."""


class JobError(Exception):
    """The job of a call did not run to completion (``state``: "dead",
    "timed_out", "cancelled", ...); ``job`` is its document."""

    def __init__(self, job):
        super().__init__(f"job {job.id} ended {job.state}" + (f": {job.error}" if job.error else ""))
        self.job = job
        self.state = job.state


class Executor(cf.Executor):
    def __init__(self, pool, *, socket=None, config=None, timeout=None, max_attempts=None,
                 priority=0, key=None):
        self._pool = pool
        self._options = _options(timeout, max_attempts, priority, key)
        self._conn = Connection(resolve_socket(socket, config))
        self._lock = threading.Lock()
        self._unacked = collections.deque()  # futures whose submit awaits `Submitted`
        self._by_id = {}  # job id -> future
        self._closed = False
        self._broken = None
        self._reader = threading.Thread(target=self._read, name="jobvisor-executor", daemon=True)
        self._reader.start()

    def submit(self, fn, /, *args, **kwargs):
        data = pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
        future = cf.Future()
        with submit_request(self._pool, data, self._options, True) as (payload, fd):
            with self._lock:
                if self._closed:
                    raise RuntimeError("cannot schedule new calls after shutdown")
                if self._broken:
                    raise self._broken
                future.set_running_or_notify_cancel()
                self._unacked.append(future)
                try:
                    self._conn.send(payload, fd)
                except Error as e:
                    self._unacked.remove(future)
                    raise e
        return future

    def _read(self):
        try:
            while True:
                with self._lock:
                    if self._closed and not self._unacked and not self._by_id:
                        self._conn.close()
                        return
                kind, value = self._conn.recv()
                # Only the bookkeeping under the lock; futures are settled
                # (unpickling, waking waiters) outside it.
                future = None
                with self._lock:
                    if kind == "submitted":
                        self._by_id[value] = self._unacked.popleft()
                    elif kind == "error":
                        # Replies to submits come in request order: an error
                        # here is the oldest unacknowledged submit's.
                        if not self._unacked:
                            raise value
                        future = self._unacked.popleft()
                    elif kind == "job":
                        future = self._by_id.pop(value.id, None)
                if future is None:
                    continue
                if kind == "error":
                    future.set_exception(value)
                else:
                    _settle(future, value)
        except Exception as e:  # the connection is gone: fail what is left
            with self._lock:
                self._broken = e if isinstance(e, Error) else Error("failed", str(e))
                for future in list(self._unacked) + list(self._by_id.values()):
                    if not future.done():
                        future.set_exception(self._broken)
                self._unacked.clear()
                self._by_id.clear()

    def shutdown(self, wait=True, *, cancel_futures=False):
        """Stops accepting calls; with `wait`, waits for every call made.
        (`cancel_futures` has nothing to cancel: calls are submitted at once.)
        The connection closes once no call is pending."""
        with self._lock:
            self._closed = True
            pending = list(self._unacked) + list(self._by_id.values())
            if not pending:
                self._conn.close()  # wakes the reader, which then ends
        if wait:
            cf.wait(pending)
            self._conn.close()
            self._reader.join()


def _settle(future, job):
    if job.state == "succeeded":
        try:
            future.set_result(pickle.loads(job.output or b""))
        except Exception as e:
            future.set_exception(RemoteError(f"job {job.id}: cannot unpickle the result: {e}"))
        return
    error = job.error or ""
    if job.state == "failed" and w.PICKLED_EXCEPTION in error:
        text, _, hexed = error.partition(w.PICKLED_EXCEPTION)
        try:
            exc = pickle.loads(bytes.fromhex(hexed.strip()))
            if isinstance(exc, BaseException):
                future.set_exception(exc)
                return
        except Exception:
            pass
        future.set_exception(RemoteError(text))
        return
    if job.state == "failed":
        future.set_exception(RemoteError(error))
        return
    future.set_exception(JobError(job))
