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
import os
import queue
import threading
from concurrent.futures.process import BrokenProcessPool

from . import _calls
from . import _wire as w
from .client import FD_PAYLOAD_MIN, Connection, Error, encode_submit, sealed_memfd

# Submits written together by `submit_many`.
SUBMIT_BATCH = 512


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

    def __init__(self, engine):
        super().__init__()
        self._jv_engine = engine
        self._jv_id = None

    def cancel(self):
        if not super().cancel():
            return False
        self._jv_engine.cancel_job(self)
        return True

    # The engine's side (see `Engine`): a target is settled once.

    def _jv_settle(self, job):
        if not self.done():
            success, value = outcome(job)
            if success:
                self.set_result(value)
            elif not (job.state == "cancelled" and self.cancelled()):
                self.set_exception(value)

    def _jv_fail(self, exc):
        if not self.done():
            self.set_exception(exc)

    def _jv_abandon(self):
        self.cancel()

    def _jv_wants_cancel(self):
        return self.cancelled()


class Task:
    """A lighter target than a future, for :class:`jobvisor.Pool`: when its
    job ends, ``on_done(success, value)`` is called once (from the reader
    thread), with the result or the exception."""

    __slots__ = ("_jv_id", "_engine", "_on_done", "_state")

    def __init__(self, engine, on_done):
        self._jv_id = None
        self._engine = engine
        self._on_done = on_done
        self._state = 0  # 1: done, 2: cancelled

    def _finish(self, success, value, state=1):
        with _TASK_LOCK:
            if self._state:
                return False
            self._state = state
        self._on_done(success, value)
        return True

    def _jv_settle(self, job):
        if not self._state:
            self._finish(*outcome(job))

    def _jv_fail(self, exc):
        self._finish(False, exc)

    def _jv_abandon(self):
        self.cancel()

    def _jv_wants_cancel(self):
        return self._state == 2

    def cancel(self):
        """Ends the task as abandoned (the pool was terminated) and cancels
        its job."""
        if self._finish(False, Abandoned("the pool was terminated before this task finished"), 2):
            self._engine.cancel_job(self)
            return True
        return False


class Abandoned(RuntimeError):
    """What a task of a terminated :class:`jobvisor.Pool` ends with."""


_TASK_LOCK = threading.Lock()


class Engine:
    def __init__(self, pool, socket_path, options, *, sticky_failure=False):
        self.pool = pool
        self.options = options
        # Embedded: a failed pool stays failed (nobody else can fix it), so
        # later submits raise at once.
        self.sticky_failure = sticky_failure
        self.socket_path = socket_path
        # A Submit is head + input + tail (docs/PROTOCOL.md, section 13).
        self.submit_head = b"\x06" + w.string(pool)
        self.submit_tail = options + w.boolean(True)
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
        """Submits `payload` (from :func:`jobvisor._calls.dumps`) as one job
        whose outcome settles `future`: a target, which has ``_jv_id`` and
        the ``_jv_*`` methods of :class:`CallFuture`."""
        fd = None
        size = _calls.size(payload)
        if size >= FD_PAYLOAD_MIN:
            fd = sealed_memfd(payload)
            request = encode_submit(self.pool, size, self.options, True, True)
        else:
            request = self.inline_request(_calls.join(payload))
        try:
            self._send([future], lambda: self.conn.send(request, fd))
        finally:
            if fd is not None:
                os.close(fd)
        return future

    def submit_many(self, calls):
        """Submits ``(payload, future)`` pairs with as few writes as
        possible: inline requests are sent together, in batches."""
        batch, futures = [], []
        for payload, future in calls:
            if _calls.size(payload) >= FD_PAYLOAD_MIN:
                self._send_batch(batch, futures)
                batch, futures = [], []
                self.submit(payload, future)
                continue
            batch.append(w.frame(self.inline_request(_calls.join(payload))))
            futures.append(future)
            if len(batch) >= SUBMIT_BATCH:
                self._send_batch(batch, futures)
                batch, futures = [], []
        self._send_batch(batch, futures)

    def _send_batch(self, frames, futures):
        if frames:
            data = b"".join(frames)
            self._send(futures, lambda: self.conn.send_raw(data))

    def _send(self, targets, send):
        """Queues `targets` for their `Submitted` answers and calls `send()`,
        both under the send lock, so that the queue's order is the order of
        the requests on the connection."""
        with self.send_lock:
            if self.broken is not None:
                raise self.broken
            if self.failed is not None:
                raise self.failed
            self.unacked.extend(targets)
            try:
                send()
            except Error:
                # The reader sees the broken connection too and fails what
                # is pending; these are the caller's to fail.
                for t in targets:
                    try:
                        self.unacked.remove(t)
                    except ValueError:
                        pass
                raise

    def inline_request(self, data):
        """A ``Submit`` (with ``wait``) of `data`."""
        return b"".join((self.submit_head, w.uvarint(len(data)), data, self.submit_tail))

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
        frames = self.conn.frames
        try:
            while True:
                # The two answers that come once per call are decoded here,
                # inline; anything else by the general decoder.
                payload = frames.next()
                kind = payload[0] if payload else None
                if kind == 5:  # Submitted { id }
                    value, _ = _uv(payload, 1)
                    kind = "submitted"
                elif kind == 6 and payload[-1] == 0 and (value := _succeeded(payload)) is not None:
                    kind = "job"
                else:
                    kind, value = self.conn.decode(payload)
                if kind == "submitted":
                    target = self.unacked.popleft()
                    with self.lock:
                        target._jv_id = value
                        self.by_id[value] = target
                    if target._jv_wants_cancel():
                        self._queue_cancel(value)
                elif kind == "job":
                    with self.lock:
                        target = self.by_id.pop(value.id, None)
                        if not self.by_id and not self.unacked:
                            self.idle.notify_all()
                    if target is not None:
                        target._jv_settle(value)
                elif kind == "error":
                    # Replies to submits come in request order: an error
                    # here is the oldest unacknowledged submit's.
                    if not self.unacked:
                        raise value
                    target = self.unacked.popleft()
                    with self.lock:
                        if not self.by_id and not self.unacked:
                            self.idle.notify_all()
                    target._jv_fail(value)
                elif kind == "pool_failed":
                    self._pool_failed(*value)
                # Nothing of a finished call may stay referenced from here
                # while the next answer is awaited (its arguments, results).
                payload = value = target = None
        except Exception as e:  # the connection is gone: fail what is left
            broken = e if isinstance(e, Error) else Error("failed", str(e))
            with self.send_lock:
                self.broken = broken
            with self.lock:
                pending = list(self.unacked) + list(self.by_id.values())
                self.unacked.clear()
                self.by_id.clear()
                self.idle.notify_all()
            for target in pending:
                if self.closed:
                    target._jv_abandon()
                else:
                    target._jv_fail(broken)
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
        for job_id, target in pending:
            self._queue_cancel(job_id)
            target._jv_fail(error)

    # -- the end

    def wait_idle(self, timeout=None):
        """Waits until no call is pending."""
        with self.lock:
            return self.idle.wait_for(lambda: not self.by_id and not self.unacked, timeout)

    def pending(self):
        """The calls not finished, oldest first."""
        with self.lock:
            return list(self.by_id.values()) + list(self.unacked)

    def close(self):
        """Closes the connection (pending calls are cancelled: their futures
        say so) and ends the threads."""
        self.closed = True
        self.conn.close()
        if threading.current_thread() is not self.reader:
            self.reader.join()


def _uv(p, i):
    """A bincode varint in `p` at `i`: (value, next index)."""
    b = p[i]
    if b < 251:
        return b, i + 1
    width = _WIDTHS.get(b)
    if width is None or i + 1 + width > len(p):
        raise w.ProtocolError("bad varint")
    return int.from_bytes(p[i + 1:i + 1 + width], "little"), i + 1 + width


_WIDTHS = {251: 2, 252: 4, 253: 8}


class _Done:
    """The part of a succeeded job's document that settling needs."""

    __slots__ = ("id", "state", "output", "error")

    def __init__(self, job_id, output):
        self.id = job_id
        self.state = "succeeded"
        self.output = output
        self.error = None


def _succeeded(p):
    """A ``Job`` response (variant 6) of a succeeded job with no error
    text, as a :class:`_Done`; None for anything else (decoded in full by
    the general decoder). Skips what settling does not use."""
    job_id, i = _uv(p, 1)
    n, i = _uv(p, i)  # pool
    i += n
    if p[i] != 2:  # state: not succeeded
        return None
    _, i = _uv(p, i + 1)  # priority
    if p[i]:  # key
        n, i = _uv(p, i + 1)
        i += n
    else:
        i += 1
    _, i = _uv(p, i)  # created_ms
    i = _uv(p, i + 1)[1] if p[i] else i + 1  # finished_ms
    count, i = _uv(p, i)  # attempts
    for _ in range(count):
        _, i = _uv(p, i)  # n
        _, i = _uv(p, i)  # worker
        _, i = _uv(p, i)  # pid
        _, i = _uv(p, i)  # started_ms
        i = _uv(p, i + 1)[1] if p[i] else i + 1  # ended_ms
        i = _uv(p, i + 1)[1] if p[i] else i + 1  # outcome
        if p[i]:  # error
            n, i = _uv(p, i + 1)
            i += n
        else:
            i += 1
    if not p[i]:
        return _Done(job_id, None)
    n, i = _uv(p, i + 1)
    if i + n + 1 != len(p):  # the output, then error = None and nothing else
        return None
    return _Done(job_id, p[i:i + n])


def outcome(job):
    """What a finished call's job document means: ``(True, value)`` or
    ``(False, exception)``."""
    if job.state == "succeeded":
        try:
            return True, _calls.loads(job.output or b"")
        except Exception as e:
            return False, RemoteError(f"job {job.id}: cannot unpickle the result: {e}")
    if job.state == "failed":
        return False, remote_exception(job, job.error or "")
    return False, JobError(job)


def remote_exception(job, error):
    """The exception a failed call raised, rebuilt from the job's output
    (the worker pickled it there), with the worker's traceback (the job's
    error) as its ``__cause__``; a :class:`RemoteError` carrying that
    traceback when it cannot be rebuilt."""
    exc = None
    if job.output:
        try:
            exc = _calls.loads(job.output)
        except Exception:
            exc = None
    if isinstance(exc, BaseException):
        exc.__cause__ = RemoteTraceback('\n"""\n' + error.rstrip() + '\n"""')
        return exc
    return RemoteError(error)
