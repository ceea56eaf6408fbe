"""The machinery under :class:`jobvisor.Executor` and :class:`jobvisor.Pool`:
one control connection to one pool, calls submitted as durable jobs
(pipelined ``Submit``/``SubmitFd`` with ``wait``), one reader thread that
settles their futures.

Threads: any thread may submit (a lock keeps each submit's frame and its
place in the acknowledgement queue together); the reader thread alone reads
the socket, maps ``Submitted`` replies to futures (replies come in request
order) and settles futures when their ``Job`` documents arrive. Cancels the
reader decides on are sent by a helper thread, so the reader never blocks
writing.
"""

import collections
import concurrent.futures as cf
import fcntl
import os
import queue
import threading
from concurrent.futures.process import BrokenProcessPool

from . import _calls
from . import _wire as w
from .client import FD_PAYLOAD_MIN, Connection, Error, encode_submit

_ZEROS = bytes(_calls.ALIGN)


class JobError(Exception):
    """The job of a call did not run to completion: ``state`` is "dead"
    (its worker died ``max_attempts`` times while running it), "timed_out"
    or "cancelled"; ``job`` is its document."""

    def __init__(self, job):
        super().__init__(f"job {job.id} ended {job.state}" + (f": {job.error}" if job.error else ""))
        self.job = job
        self.state = job.state


class RemoteError(Exception):
    """A call failed on the worker and its exception could not be rebuilt
    here; the message is the worker's traceback."""


class PoolFailedError(Error, BrokenProcessPool):
    """The pool's workers cannot run (they exit before they are ready: an
    ImportError, a failing initializer, a wrong interpreter; or they crash
    over and over): the message is the daemon's account, with the workers'
    own last lines. Also a ``BrokenProcessPool``, for code written for
    ``ProcessPoolExecutor``."""

    def __init__(self, pool, message):
        Error.__init__(self, "failed", f"pool {pool} failed: {message}")
        self.pool = pool


class RemoteTraceback(Exception):
    """The ``__cause__`` of an exception re-raised from a worker: the
    traceback it had there (as ``ProcessPoolExecutor`` attaches it)."""

    def __init__(self, tb):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return self.tb


class CallFuture(cf.Future):
    """A call's future. Cancelling it (while it is not done) also cancels
    its job: a queued job never runs, a running one is interrupted."""

    __slots__ = ()

    def __init__(self, engine):
        super().__init__()
        self._jv_engine = engine
        self._jv_id = None

    def cancel(self):
        if not super().cancel():
            return False
        self._jv_engine.cancel_job(self)
        return True


class Engine:
    def __init__(self, pool, socket_path, options, *, sticky_failure=False):
        self.pool = pool
        self.options = options
        # Embedded: a failed pool stays failed (nobody else can fix it), so
        # later submits raise at once.
        self.sticky_failure = sticky_failure
        self.socket_path = socket_path
        self.conn = Connection(socket_path, map_outputs=True)
        self.send_lock = threading.Lock()
        self.lock = threading.Lock()
        self.unacked = collections.deque()  # futures whose submit awaits `Submitted`
        self.by_id = {}  # job id -> future
        self.broken = None  # an exception: the connection is gone
        self.failed = None  # PoolFailedError, with sticky_failure
        self.closed = False
        self.idle = threading.Condition(self.lock)
        self.cancels = queue.SimpleQueue()
        self.reader = threading.Thread(target=self._read, name="jobvisor-results", daemon=True)
        self.reader.start()
        self.canceller = None

    # -- submitting

    def submit(self, payload, future):
        """Submits `payload` (a :class:`jobvisor._calls.Payload`) as one job
        whose outcome settles `future`."""
        fd = None
        if payload.size >= FD_PAYLOAD_MIN:
            fd = _memfd(payload)
            request = encode_submit(self.pool, payload.size, self.options, True, True)
        else:
            request = encode_submit(self.pool, payload.join(), self.options, True, False)
        try:
            with self.send_lock:
                if self.broken is not None:
                    raise self.broken
                if self.failed is not None:
                    raise self.failed
                self.unacked.append(future)
                try:
                    self.conn.send(request, fd)
                except Error:
                    # The reader sees the broken connection too and fails
                    # what is pending; this future is the caller's to fail.
                    try:
                        self.unacked.remove(future)
                    except ValueError:
                        pass
                    raise
        finally:
            if fd is not None:
                os.close(fd)
        return future

    def cancel_job(self, future):
        with self.lock:
            job_id = future._jv_id
        if job_id is not None:
            self._queue_cancel(job_id)
        # Else its `Submitted` has not come yet: the reader cancels it then.

    def _queue_cancel(self, job_id):
        self.cancels.put(job_id)
        if self.canceller is None:
            self.canceller = threading.Thread(target=self._send_cancels, name="jobvisor-cancel",
                                              daemon=True)
            self.canceller.start()

    def _send_cancels(self):
        conn = None
        try:
            while True:
                job_id = self.cancels.get()
                if job_id is None:
                    return
                try:
                    if conn is None:
                        conn = Connection(self.socket_path)
                    conn.send(b"\x09" + w.uvarint(job_id))
                    conn.recv()  # ok, or: it had ended already
                except Error:
                    if conn is not None:
                        conn.close()
                    conn = None
                    if self.broken is not None:
                        return
        finally:
            if conn is not None:
                conn.close()

    # -- the reader thread

    def _read(self):
        try:
            while True:
                kind, value = self.conn.recv()
                if kind == "submitted":
                    future = self.unacked.popleft()
                    with self.lock:
                        future._jv_id = value
                        self.by_id[value] = future
                    if future.cancelled():
                        self._queue_cancel(value)
                elif kind == "job":
                    with self.lock:
                        future = self.by_id.pop(value.id, None)
                        if not self.by_id and not self.unacked:
                            self.idle.notify_all()
                    if future is not None and not future.done():
                        settle(future, value)
                elif kind == "error":
                    # Replies to submits come in request order: an error
                    # here is the oldest unacknowledged submit's.
                    if not self.unacked:
                        raise value
                    future = self.unacked.popleft()
                    with self.lock:
                        if not self.by_id and not self.unacked:
                            self.idle.notify_all()
                    if not future.done():
                        future.set_exception(value)
                elif kind == "pool_failed":
                    self._pool_failed(*value)
        except Exception as e:  # the connection is gone: fail what is left
            broken = e if isinstance(e, Error) else Error("failed", str(e))
            with self.send_lock:
                self.broken = broken
            with self.lock:
                pending = list(self.unacked) + list(self.by_id.values())
                self.unacked.clear()
                self.by_id.clear()
                self.idle.notify_all()
            if not self.closed:
                for future in pending:
                    if not future.done():
                        future.set_exception(broken)
            else:
                for future in pending:
                    future.cancel()
        finally:
            self.cancels.put(None)

    def _pool_failed(self, pool, message):
        """Every call still waiting fails with the pool's error, and its job
        is cancelled (a future that raised must not run later)."""
        error = PoolFailedError(pool, message)
        if self.sticky_failure:
            with self.send_lock:
                self.failed = error
        with self.lock:
            pending = [(job_id, f) for job_id, f in self.by_id.items()]
        for job_id, future in pending:
            self._queue_cancel(job_id)
            if not future.done():
                future.set_exception(error)

    # -- the end

    def wait_idle(self, timeout=None):
        """Waits until no call is pending."""
        with self.lock:
            return self.idle.wait_for(lambda: not self.by_id and not self.unacked, timeout)

    def pending(self):
        with self.lock:
            return list(self.unacked) + list(self.by_id.values())

    def close(self):
        """Closes the connection (pending calls are cancelled: their futures
        say so) and ends the threads."""
        self.closed = True
        self.conn.close()
        if threading.current_thread() is not self.reader:
            self.reader.join()


def settle(future, job):
    """Sets `future` from the finished job document `job`."""
    if job.state == "succeeded":
        try:
            value = _calls.loads(job.output or b"")
        except Exception as e:
            future.set_exception(RemoteError(f"job {job.id}: cannot unpickle the result: {e}"))
            return
        future.set_result(value)
        return
    error = job.error or ""
    if job.state == "failed":
        future.set_exception(remote_exception(job, error))
        return
    if job.state == "cancelled" and future.cancelled():
        return
    future.set_exception(JobError(job))


def remote_exception(job, error):
    """The exception a failed call raised, rebuilt, with the worker's
    traceback as its ``__cause__``; a :class:`RemoteError` when it cannot
    be rebuilt."""
    text, pickled = error, None
    if w.PICKLED_EXCEPTION in error:
        text, _, hexed = error.partition(w.PICKLED_EXCEPTION)
        try:
            pickled = bytes.fromhex(hexed.strip())
        except ValueError:
            pickled = None
    if pickled is not None:
        try:
            exc = _calls.loads(pickled)
        except Exception:
            exc = None
        if isinstance(exc, BaseException):
            exc.__cause__ = RemoteTraceback('\n"""\n' + text.rstrip() + '\n"""')
            return exc
    return RemoteError(text)


def _memfd(payload):
    """A sealed memfd holding `payload`, written with one ``writev`` per
    batch of parts (the kernel copies each buffer once)."""
    fd = os.memfd_create("jobvisor-call", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        iov = []
        at = 0
        for part, offset in zip(payload.parts, payload.offsets):
            if offset > at:
                iov.append(_ZEROS[:offset - at])
            view = memoryview(part).cast("B")
            iov.append(view)
            at = offset + view.nbytes
        os.ftruncate(fd, payload.size)
        done = 0
        while iov:
            n = os.pwritev(fd, iov[:512], done)
            done += n
            while iov and n >= memoryview(iov[0]).nbytes:
                n -= memoryview(iov[0]).nbytes
                iov.pop(0)
            if n and iov:
                iov[0] = memoryview(iov[0])[n:]
        seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        return fd
    except BaseException:
        os.close(fd)
        raise
