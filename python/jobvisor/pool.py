"""``jobvisor.Pool``: a drop-in ``multiprocessing.Pool`` whose tasks are
durable jobs on supervised workers.

    from jobvisor import Pool              # was: from multiprocessing import Pool
    with Pool(4) as p:
        print(p.map(abs, [-1, -2, 3]))     # [1, 2, 3]

Without ``pool=``, a private daemon runs ``processes`` workers (default
``os.cpu_count()``) for this process, as :class:`jobvisor.Executor` does
(same rules: functions by reference, ``__main__`` as with the spawn start
method, everything stops with the pool or the process). With ``pool="name"``
(and ``socket=``/``config=``), tasks run on that pool of a shared daemon.

``apply``, ``apply_async``, ``map``, ``map_async``, ``imap``,
``imap_unordered``, ``starmap``, ``starmap_async`` take the same arguments
as multiprocessing's (``chunksize`` too: that many calls per job), and the
``AsyncResult`` objects have ``get``, ``wait``, ``ready``, ``successful``.
Callbacks run in the thread that receives results; keep them short.

Where jobvisor differs, on purpose: a worker that dies during a task is
replaced and the task retried (up to 3 attempts), then it fails with
:class:`jobvisor.JobError` (multiprocessing's pool hangs on it); workers
that cannot start fail the tasks with :class:`jobvisor.PoolFailedError`
carrying their error text (multiprocessing restarts them forever).
"""

import itertools
import os
import queue
import threading
import time
import types
from multiprocessing import TimeoutError

from . import _calls
from ._engine import SUBMIT_BATCH, Task
from .client import _options
from .executor import connect

__all__ = ["Pool", "AsyncResult", "MapResult", "IMapIterator"]

_RUN, _CLOSE, _TERMINATE = "RUN", "CLOSE", "TERMINATE"


class AsyncResult:
    """The result of ``apply_async`` (and the base of ``map_async``'s)."""

    def __init__(self, pool, callback, error_callback):
        self._pool = pool
        self._event = threading.Event()
        self._callback = callback
        self._error_callback = error_callback
        self._success = None
        self._value = None

    def ready(self):
        return self._event.is_set()

    def successful(self):
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout=None):
        self._event.wait(timeout)

    def get(self, timeout=None):
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _set(self, success, value):
        self._success, self._value = success, value
        try:
            if success and self._callback is not None:
                self._callback(value)
            elif not success and self._error_callback is not None:
                self._error_callback(value)
        finally:
            self._event.set()
            self._pool._task_done(self)

    def _on_done(self, success, value):
        self._set(success, value if success else _encoding_error(value))

    __class_getitem__ = classmethod(types.GenericAlias)


ApplyResult = AsyncResult


class MapResult(AsyncResult):
    """The result of ``map_async``/``starmap_async``: the list, in order, or
    the first error (of the chunk that failed first)."""

    def __init__(self, pool, n_chunks, callback, error_callback):
        super().__init__(pool, callback, error_callback)
        self._chunks = [None] * n_chunks
        self._left = n_chunks
        self._lock = threading.Lock()
        if n_chunks == 0:
            self._set(True, [])

    def _on_chunk(self, i, success, value):
        with self._lock:
            if self._event.is_set() or self._success is False:
                return
            if not success:
                self._success = False
                last = True
            else:
                self._chunks[i] = value
                self._left -= 1
                last = self._left == 0
        if not success:
            self._set(False, _encoding_error(value))
        elif last:
            self._set(True, list(itertools.chain.from_iterable(self._chunks)))


class IMapIterator:
    """What ``imap`` returns: results in order (``imap_unordered``: as they
    come); ``next(timeout)`` raises ``multiprocessing.TimeoutError`` when
    none is ready in time. Results arrive through a SimpleQueue, then an
    end mark once the input is exhausted and every task has ended."""

    def __init__(self, pool, ordered):
        self._pool = pool
        self._ordered = ordered
        self._queue = queue.SimpleQueue()  # (index, success, value) or _END
        self._early = {}  # ordered: results that came before their turn
        self._next = 0  # ordered: index of the next result to give
        self._ended = False

    def __iter__(self):
        return self

    def _put(self, i, success, value):
        self._queue.put((i, success, value))

    def _end(self):
        self._queue.put(_END)

    def next(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._ordered and self._next in self._early:
                _, success, value = self._early.pop(self._next)
                self._next += 1
                break
            if self._ended:
                raise StopIteration
            try:
                if deadline is None:
                    item = self._queue.get()
                else:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError from None
            if item is _END:
                self._ended = True
                continue
            if not self._ordered:
                _, success, value = item
                break
            self._early[item[0]] = item
        if success:
            return value
        raise value

    __next__ = next


_END = object()


class _Feed:
    """The chunks of one ``imap``: counts them, delivers their results to
    the iterator, and ends it once the input is exhausted and every chunk
    has ended."""

    __slots__ = ("pool", "it", "chunksize", "lock", "left", "known", "n")

    def __init__(self, pool, it, chunksize):
        self.pool, self.it, self.chunksize = pool, it, chunksize
        self.lock = threading.Lock()
        self.left = 0  # chunks not ended
        self.known = False  # the input is exhausted
        self.n = 0  # items read

    def add(self, size):
        with self.lock:
            self.left += 1
        self.n += size

    def finished(self):
        with self.lock:
            self.left -= 1
            last = self.left == 0 and self.known
        if last:
            self.end()

    def exhausted(self):
        with self.lock:
            self.known = True
            last = self.left == 0
        if last:
            self.end()

    def end(self):
        self.it._end()
        self.pool._task_done(self.it)


class _ChunkDone:
    """``on_done`` of one chunk of an ``imap``."""

    __slots__ = ("feed", "base", "size")

    def __init__(self, feed, base, size):
        self.feed, self.base, self.size = feed, base, size

    def __call__(self, success, value):
        put = self.feed.it._put
        if success:
            for k, v in enumerate(value):
                put(self.base + k, True, v)
        else:
            value = _encoding_error(value)
            for k in range(self.size):
                put(self.base + k, False, value)
        self.feed.finished()


class _OneDone(_ChunkDone):
    """``on_done`` of a one-call chunk (``chunksize=1``): the value is not
    in a list."""

    __slots__ = ()

    def __call__(self, success, value):
        self.feed.it._put(self.base, success, value if success else _encoding_error(value))
        self.feed.finished()


class Pool:
    def __init__(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None,
                 context=None, *, pool=None, socket=None, config=None, timeout=None,
                 max_attempts=None, priority=0, key=None):
        if pool is None:
            if processes is None:
                processes = os.cpu_count() or 1
            if processes < 1:
                raise ValueError("Number of processes must be at least 1")
            if maxtasksperchild is not None:
                if not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
                    raise ValueError("maxtasksperchild must be a positive int or None")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._processes = processes
        self._state = _RUN
        self._lock = threading.Lock()
        self._outstanding = set()  # results not yet ready
        self._idle = threading.Condition(self._lock)
        self._engine, self._daemon = connect(
            pool, socket, config, processes, initializer, initargs, maxtasksperchild,
            _options(timeout, max_attempts, priority, key))
        self._stopped = False

    def __repr__(self):
        return f"<{type(self).__name__} state={self._state} pool_size={self._processes}>"

    # -- bookkeeping

    def _check_running(self):
        if self._state != _RUN:
            raise ValueError("Pool not running")

    def _track(self, result):
        with self._lock:
            self._outstanding.add(result)

    def _task_done(self, result):
        with self._lock:
            self._outstanding.discard(result)
            if not self._outstanding:
                self._idle.notify_all()

    def _task(self, fn, args, on_done):
        """``(payload, Task)`` for ``fn(*args)``, or None when the call
        cannot be pickled (then `on_done` has been told, at once)."""
        try:
            payload = _calls.dumps_call(fn, args, {})
        except Exception as e:
            on_done(False, e)
            return None
        return payload, Task(self._engine, on_done)

    def _submit_all(self, tasks):
        tasks = [t for t in tasks if t is not None]
        try:
            self._engine.submit_many(tasks)
        except Exception as e:
            for _, task in tasks:
                task._jv_fail(e)

    # -- the API

    def apply(self, func, args=(), kwds={}):
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None):
        self._check_running()
        result = AsyncResult(self, callback, error_callback)
        self._track(result)
        try:
            payload = _calls.dumps_call(func, tuple(args), dict(kwds))
        except Exception as e:
            result._on_done(False, e)
            return result
        task = Task(self._engine, result._on_done)
        try:
            self._engine.submit(payload, task)
        except Exception as e:
            task._jv_fail(e)
        return result

    def map(self, func, iterable, chunksize=None):
        return self._map_async(func, iterable, chunksize, False).get()

    def starmap(self, func, iterable, chunksize=None):
        return self._map_async(func, iterable, chunksize, True).get()

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        return self._map_async(func, iterable, chunksize, False, callback, error_callback)

    def starmap_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        return self._map_async(func, iterable, chunksize, True, callback, error_callback)

    def _map_async(self, func, iterable, chunksize, star, callback=None, error_callback=None):
        self._check_running()
        if not isinstance(iterable, (list, tuple)):
            iterable = list(iterable)
        if chunksize is None:
            # multiprocessing's rule: about four chunks per worker.
            chunksize, extra = divmod(len(iterable), (self._processes or 1) * 4)
            if extra:
                chunksize += 1
        if len(iterable) == 0:
            chunksize = 0
        chunks = _chunks(iterable, chunksize) if chunksize else []
        result = MapResult(self, len(chunks), callback, error_callback)
        if chunks:
            self._track(result)
        self._submit_all(self._chunk_task(func, chunk, star, partial_chunk(result, i))
                         for i, chunk in enumerate(chunks))
        return result

    def _chunk_task(self, func, chunk, star, on_done):
        """The task of one chunk; `on_done` gets the list of its results."""
        if len(chunk) == 1:
            # One call: no list around it (the worker returns the value).
            return self._task(func, tuple(chunk[0]) if star else (chunk[0],),
                              lambda ok, value: on_done(ok, [value] if ok else value))
        return self._task(_calls.run_chunk, (func, chunk, star), on_done)

    def imap(self, func, iterable, chunksize=1):
        return self._imap(func, iterable, chunksize, True)

    def imap_unordered(self, func, iterable, chunksize=1):
        return self._imap(func, iterable, chunksize, False)

    def _imap(self, func, iterable, chunksize, ordered):
        self._check_running()
        if chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize:n}")
        it = IMapIterator(self, ordered)
        self._track(it)
        # Tasks are submitted from a thread, as multiprocessing's task
        # handler does: results come while a long (or endless) input is
        # still being read.
        threading.Thread(target=self._feed, args=(func, iterable, chunksize, it),
                         name="jobvisor-imap", daemon=True).start()
        return it

    def _feed(self, func, iterable, chunksize, it):
        feed = _Feed(self, it, chunksize)
        # An input with a length is submitted in batches (few writes); one
        # without, a chunk at a time, as it comes (it may be slow to come).
        batch = SUBMIT_BATCH if hasattr(iterable, "__len__") else 1
        engine = self._engine
        try:
            if chunksize == 1:
                items = iter(iterable)
                while True:
                    tasks = []
                    start = feed.n
                    try:
                        for x in itertools.islice(items, batch):
                            done = _OneDone(feed, feed.n, 1)
                            feed.add(1)
                            try:
                                tasks.append((_calls.dumps_call(func, (x,), {}), Task(engine, done)))
                            except Exception as e:  # unpicklable
                                done(False, e)
                    finally:
                        self._submit_all(tasks)
                    if feed.n == start:
                        break
            else:
                chunks = _ichunks(iterable, chunksize)
                while True:
                    tasks = []
                    try:
                        for chunk in itertools.islice(chunks, batch):
                            done = _ChunkDone(feed, feed.n, len(chunk))
                            feed.add(len(chunk))
                            tasks.append(self._chunk_task(func, chunk, False, done))
                    finally:
                        self._submit_all(tasks)
                    if not tasks:
                        break
        except Exception as e:
            # The input itself raised: like multiprocessing, the next result
            # is that error.
            it._put(feed.n, False, e)
            feed.n += 1
        feed.exhausted()

    # -- the end

    def close(self):
        """No more tasks; the workers stop once those given are done
        (``join`` waits for that)."""
        if self._state == _RUN:
            self._state = _CLOSE

    def terminate(self):
        """Stops the workers at once; tasks not finished are abandoned."""
        self._state = _TERMINATE
        self._stop(wait_for_tasks=False)

    def join(self):
        if self._state == _RUN:
            raise ValueError("Pool is still running")
        if self._state == _CLOSE:
            self._stop(wait_for_tasks=True)

    def _stop(self, wait_for_tasks):
        if wait_for_tasks:
            with self._lock:
                self._idle.wait_for(lambda: not self._outstanding)
            # Also the tasks of a result already settled (a map that failed
            # fast still has other chunks running): join waits for all.
            self._engine.wait_idle()
            if self._daemon is not None:
                # As multiprocessing's workers do, each has run its
                # initializer before the pool is gone, even with no task.
                self._daemon.wait_started()
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        for f in self._engine.pending():
            f.cancel()
        self._engine.close()
        if self._daemon is not None:
            self._daemon.stop()

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, *exc):
        self.terminate()

    def __del__(self):
        if getattr(self, "_state", _TERMINATE) == _RUN and not getattr(self, "_stopped", True):
            import warnings
            warnings.warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning,
                          source=self)


def _encoding_error(exc):
    """A result the worker could not pickle: multiprocessing says so with
    a MaybeEncodingError."""
    if isinstance(exc, _calls.UnpicklableResult):
        from multiprocessing.pool import MaybeEncodingError
        return MaybeEncodingError(exc.args[0], exc.args[1])
    return exc


def partial_chunk(result, i):
    return lambda success, value: result._on_chunk(i, success, value)


def _chunks(seq, size):
    return [list(seq[i:i + size]) for i in range(0, len(seq), size)]


def _ichunks(iterable, size):
    it = iter(iterable)
    while True:
        chunk = list(itertools.islice(it, size))
        if not chunk:
            return
        yield chunk


