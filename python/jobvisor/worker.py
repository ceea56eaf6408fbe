"""A jobvisor worker in Python.

    python3 -m jobvisor.worker MODULE:FUNC   serve FUNC(input) -> bytes
    python3 -m jobvisor.worker --call        serve pickled calls (jobvisor.Executor)

MODULE is imported once; if it has a ``setup()`` function, that runs once before
the worker reports ``Ready`` (load a model, open connections). FUNC gets each
job's input as a bytes-like object and returns the output (``bytes``,
``bytearray``, ``memoryview`` or ``str``, which is UTF-8 encoded); an exception
fails the job with ``"ExceptionType: message"`` (not retried). A large input
(over the pool's ``inline_limit``) is a read-only ``memoryview`` of the shared
memory arena, not a copy: it is valid only until FUNC returns, so copy it
(``bytes(view)``) to keep it. A large output is copied once, into the arena.

The worker runs one job at a time, in the order received (docs/PROTOCOL.md,
section 8). A thread reads fd 3 all the time: a ``Cancel`` for a job that has
not started yet is answered failed ("cancelled") at once, even while another job
runs (the daemon takes prefetched jobs back so for an idle worker), and a
``Cancel`` also reaches a running job: the main thread gets signal ``SIGRTMIN+3`` (leave it alone), whose
handler raises an exception inside FUNC at the next Python bytecode (a blocking
``time.sleep`` or read is cut short; C code that holds the GIL finishes first);
the job is answered "cancelled" and the worker keeps its warm state. ``Shutdown``
or the end of fd 3 exits 0; SIGTERM (the pool's default ``stop_signal``) ends the
process at once, which the daemon expects.

Exit statuses: 0 after Shutdown or end of stream; 1 when the daemon is gone
(writing fd 4 fails); 2 for a protocol error or a bad command line / environment.
"""

import collections
import importlib
import mmap
import os
import pickle
import queue
import signal
import sys
import threading
import traceback

from . import _calls
from . import _wire as w

PAGE = 4096
ALIGN = 64
# Sent by the reader thread to the main thread to stop a cancelled job.
CANCEL_SIGNAL = signal.SIGRTMIN + 3


class _Arena:
    """The worker's view of fd 5: the daemon-owned input region is read in
    place; outputs are placed in the worker-owned output region, in slots the
    daemon releases after copying them out."""

    def __init__(self, fd, size):
        self.map = None
        self.live = {}  # offset -> reserved length, in the output region
        if size <= 0:
            self.input = self.output = (0, 0)
            return
        pages = size // PAGE
        in_pages = (pages + 1) // 2
        self.input = (0, in_pages * PAGE)
        self.output = (in_pages * PAGE, pages * PAGE)
        if pages:
            self.map = mmap.mmap(fd, pages * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.view = memoryview(self.map)

    def input_view(self, offset, length, writable=False):
        start, end = self.input
        if self.map is None or offset < start or length > end - offset or offset > end:
            raise w.ProtocolError(
                f"shared-memory input [{offset}, +{length}) is outside the input region [{start}, {end})")
        view = self.view[offset:offset + length]
        return view if writable else view.toreadonly()

    def alloc(self, length):
        """The offset of a free output slot of `length` bytes, or None."""
        if self.map is None:
            return None
        start, end = self.output
        need = max(ALIGN, -(-length // ALIGN) * ALIGN)
        at = start
        for off in sorted(self.live):
            if off - at >= need:
                break
            at = max(at, off + self.live[off])
        if end - at < need:
            return None
        self.live[at] = need
        return at

    def release(self, offset):
        self.live.pop(offset, None)


class Worker:
    def __init__(self, handler, writable_input=False):
        fds = os.environ.get("JOBVISOR_FDS", "")
        try:
            self.jobs_fd, self.results_fd, arena_fd = (int(x) for x in fds.split(","))
        except ValueError:
            raise SystemExit(_fatal(f"JOBVISOR_FDS={fds!r}: expected three descriptors like 3,4,5; "
                                    "this program is meant to be started by jobvisord"))
        self.inline_limit = int(os.environ.get("JOBVISOR_INLINE_LIMIT", str(64 << 10)))
        shm_size = int(os.environ.get("JOBVISOR_SHM_SIZE", "0"))
        try:
            self.arena = _Arena(arena_fd, shm_size)
        except OSError as e:
            raise SystemExit(_fatal(f"cannot map the shared-memory arena (fd {arena_fd}): {e}"))
        self.handler = handler
        # `--call`: an argument unpickled from the arena (a numpy array) is
        # writable, as it is under multiprocessing; the region is the
        # worker's own input, which the daemon never reads back.
        self.writable_input = writable_input
        self.frames = w.FrameReader(self.jobs_fd)
        self.inbox = queue.SimpleQueue()  # what the reader thread decoded, in order
        self.jobs = collections.deque()  # (id, attempt, deadline_ms, payload)
        self.shutdown = False
        # The job the handler is running (None between jobs), and the one a
        # Cancel asked to stop: read by the signal handler in the main thread.
        self.running = None
        self.cancelled = None
        # Ids of jobs received and neither started nor answered. Under
        # `self.lock`, with `self.running`: whoever takes an id out of it
        # owns that job (the main thread runs it; the reader thread answers
        # a Cancel of it).
        self.pending = set()
        self.lock = threading.Lock()
        # Results are written by the main thread, and cancelled queued jobs
        # by the reader thread: one frame at a time.
        self.send_lock = threading.Lock()

    # -- sending (main thread; the reader thread for cancelled queued jobs)

    def send(self, payload):
        try:
            with self.send_lock:
                w.write_all(self.results_fd, w.frame(payload))
        except BrokenPipeError:
            raise SystemExit(1)

    def ready(self):
        self.send(b"\x00" + w.uvarint(w.PROTOCOL_VERSION) + w.uvarint(os.getpid()))

    def done(self, job_id, output, raised=None):
        """Answers `Done`; `output` is bytes-like, or a
        :class:`jobvisor._calls.Payload` copied part by part. With `raised`
        (the error text), answers `Raised`: the job failed, and `output`
        (a pickled exception) is kept as its output."""
        size = _calls.size(output)
        placed = None
        if size > self.inline_limit:
            at = self.arena.alloc(size)
            while at is None and self.arena.live and not self.shutdown:
                # Wait for the daemon to release earlier outputs.
                self.handle(self.inbox.get())
                at = self.arena.alloc(size)
            if at is not None:
                if isinstance(output, _calls.Payload):
                    output.write_into(self.arena.view[at:at + size])
                else:
                    self.arena.view[at:at + size] = output
                placed = (at, size)
        if placed is None:
            if size > w.MAX_FRAME_LEN - (1 << 20):
                what = "exception" if raised is not None else "output"
                self.failed(job_id, (raised + "\n" if raised else "")
                            + f"the {what} of {size} bytes fits neither the shared-memory arena "
                            "nor a frame; raise the pool's shm_size")
                return
            placed = _calls.join(output)
        if raised is None:
            self.send(w.encode_done(job_id, placed))
        else:
            self.send(w.encode_raised(job_id, raised, placed))

    def failed(self, job_id, error):
        self.send(w.encode_failed(job_id, error))

    # -- receiving: a thread reads fd 3 all the time, so that a Cancel
    # reaches a running job

    def read_frames(self):
        """The reader thread: decodes frames into the inbox; answers a Cancel
        of a job not started yet at once, and signals the main thread for a
        Cancel of the running one (see `on_cancel_signal`)."""
        shutdown = False
        try:
            while True:
                try:
                    payload = self.frames.next()
                except EOFError:
                    self.inbox.put(("shutdown",))
                    return
                item = decode_to_worker(payload)
                if item[0] == "job" and not shutdown:
                    with self.lock:
                        self.pending.add(item[1])
                elif item[0] == "shutdown":
                    shutdown = True
                elif item[0] == "cancel":
                    with self.lock:
                        queued = item[1] in self.pending
                        self.pending.discard(item[1])
                        if not queued and item[1] == self.running:
                            self.cancelled = item[1]
                            signal.pthread_kill(threading.main_thread().ident, CANCEL_SIGNAL)
                    if queued:
                        try:
                            self.failed(item[1], "cancelled")
                        except SystemExit:
                            return  # the daemon is gone; the main thread sees it too
                self.inbox.put(item)
        except w.ProtocolError as e:
            self.inbox.put(("error", f"protocol error: {e}", 2))
        except OSError as e:
            self.inbox.put(("error", f"reading fd 3 failed: {e}", 1))

    def on_cancel_signal(self, _signum, _frame):
        # Runs in the main thread between two bytecodes: stop the handler
        # only if the cancelled job is still the one running.
        if self.running is not None and self.running == self.cancelled:
            raise _Cancelled()

    def handle(self, item):
        kind = item[0]
        if kind == "job":
            if not self.shutdown:
                self.jobs.append(item[1:])
        elif kind == "cancel":
            # A job not started yet was answered by the reader thread.
            for job in list(self.jobs):
                if job[0] == item[1]:
                    self.jobs.remove(job)
                    break
        elif kind == "release":
            self.arena.release(item[1])
        elif kind == "shutdown":
            self.shutdown = True
        elif kind == "error":
            _fatal(item[1])
            raise SystemExit(item[2])

    # -- the loop

    def run(self):
        signal.signal(CANCEL_SIGNAL, self.on_cancel_signal)
        threading.Thread(target=self.read_frames, name="jobvisor-reader", daemon=True).start()
        self.ready()
        while True:
            # Whatever arrived meanwhile first (cancels of queued jobs, releases).
            while True:
                try:
                    self.handle(self.inbox.get_nowait())
                except queue.Empty:
                    break
            if self.shutdown:
                return 0
            if not self.jobs:
                self.handle(self.inbox.get())
                continue
            job_id, _attempt, _deadline, data = self.jobs.popleft()
            self.run_job(job_id, data)

    def run_job(self, job_id, data):
        if data[0] == "inline":
            job_input = data[1]
        else:
            job_input = self.arena.input_view(data[1], data[2], self.writable_input)
        try:
            try:
                # Inside the `try`: once `running` is set, a Cancel may raise
                # _Cancelled at any bytecode.
                with self.lock:
                    if job_id not in self.pending:
                        return  # cancelled before it started: answered by the reader thread
                    self.pending.discard(job_id)
                    self.running = job_id
                output = self.handler(job_input)
            finally:
                self.running = None
            if isinstance(output, str):
                output = output.encode("utf-8")
            elif output is None:
                output = b""
            if not isinstance(output, _calls.Payload):
                try:
                    output = memoryview(output).cast("B")
                except TypeError:
                    raise TypeError(f"the handler returned {type(output).__name__}; return bytes, "
                                    "bytearray, memoryview, str or None") from None
        except _Cancelled:
            self.failed(job_id, "cancelled")
            return
        except _CallFailed as e:
            if e.pickled is None:
                self.failed(job_id, e.text)
            else:
                self.done(job_id, e.pickled, raised=e.text)
            return
        except Exception as e:  # the job fails; the worker lives on
            self.failed(job_id, _describe(e))
            return
        finally:
            if isinstance(job_input, memoryview):
                try:
                    job_input.release()
                except BufferError:
                    # A view of it outlives the call (an argument the call
                    # kept): the memory is reused by the next job.
                    pass
        self.done(job_id, output)


class _Cancelled(BaseException):
    """Raised in the handler when its job is cancelled (a BaseException, so
    that a handler's `except Exception` does not swallow it)."""


def decode_to_worker(payload):
    """One ToWorker message as a tuple: ("job", id, attempt, deadline_ms,
    ("inline", bytes) | ("shm", offset, len)), ("cancel", id),
    ("shutdown",) or ("release", offset)."""
    m = w.Reader(payload)
    kind = m.uvarint(32)
    if kind == 0:  # Job
        job_id, attempt = m.uvarint(), m.uvarint(32)
        deadline = m.option(m.uvarint)
        tag = m.uvarint(32)
        if tag == 0:
            data = ("inline", m.bytes_())
        elif tag == 1:
            data = ("shm", m.uvarint(), m.uvarint())
        else:
            raise w.ProtocolError(f"unknown Payload variant {tag}")
        item = ("job", job_id, attempt, deadline, data)
    elif kind == 1:  # Cancel
        item = ("cancel", m.uvarint())
    elif kind == 2:  # Shutdown
        item = ("shutdown",)
    elif kind == 3:  # Release
        item = ("release", m.uvarint())
        m.uvarint()  # the length: the worker knows its slots
    else:
        raise w.ProtocolError(f"unknown message variant {kind}")
    m.end()
    return item


def _describe(e):
    text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return text


def _fatal(message):
    print(f"jobvisor.worker: {message}", file=sys.stderr, flush=True)
    return 2


def _call(job_input):
    """Runs one pickled call, ``(fn, args, kwargs)``, and pickles its result
    (:mod:`jobvisor._calls`); an exception is re-raised as
    :class:`_CallFailed`."""
    fn, args, kwargs = _calls.loads(job_input)
    try:
        result = fn(*args, **kwargs)
    except _Cancelled:
        raise
    except BaseException as e:
        # SystemExit and KeyboardInterrupt too: the call's exception, not
        # the worker's end (as in ProcessPoolExecutor).
        raise _CallFailed(e) from None
    finally:
        del args, kwargs  # views of the arena, if any: not kept past the call
    try:
        return _calls.dumps_result(result)
    except _Cancelled:
        raise
    except BaseException as e:
        if not isinstance(e, Exception):  # SystemExit while pickling: itself
            raise _CallFailed(e) from None
        text = f"{type(e).__name__}: {e}"
        try:
            shown = repr(result)
        except Exception:
            shown = f"<{type(result).__name__} object>"
        raise _CallFailed(_calls.UnpicklableResult(text, shown[:1000])) from None


class _CallFailed(Exception):
    """A call raised: its traceback as text (the job's error: its last line
    is the exception's), and the exception pickled (the job's output, from
    which the caller re-raises it; None when it cannot be pickled)."""

    def __init__(self, original):
        tb = "".join(traceback.format_exception(type(original), original, original.__traceback__))
        try:
            pickled = _calls.dumps(original)
        except Exception:
            pickled = None
        super().__init__(tb.rstrip())
        self.text = tb.rstrip()
        self.pickled = pickled


def call_setup():
    """What a ``--call`` worker of an embedded Executor or Pool does before
    ``Ready``, from the file named by ``$JOBVISOR_CALL_SETUP``: the caller's
    ``sys.path``, working directory and main module, as multiprocessing's
    spawn start method prepares a child (``multiprocessing.spawn.prepare``),
    then the initializer. An exception here ends the worker with its
    traceback on stderr, which the daemon reports as the pool's error."""
    path = os.environ.get("JOBVISOR_CALL_SETUP")
    if not path:
        return
    with open(path, "rb") as f:
        setup = pickle.load(f)
    prepare = setup.get("prepare")
    if prepare:
        from multiprocessing import spawn
        # A `jobvisor.Executor()` or `Pool()` at the top level of that module
        # (not under `if __name__ == "__main__":`) must not start another
        # daemon: jobvisor._embedded refuses while this is set. (The flag
        # lives in _calls: this module runs as __main__, not as
        # jobvisor.worker.)
        _calls.BOOTSTRAPPING = True
        try:
            spawn.prepare(prepare)
        finally:
            _calls.BOOTSTRAPPING = False
    init = setup.get("initializer")
    if init is not None:
        fn, args = _calls.loads(init)
        fn(*args)


def _load(spec):
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise SystemExit(_fatal(f"{spec!r}: expected MODULE:FUNC (e.g. mypkg.jobs:resize)"))
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise SystemExit(_fatal(f"cannot import {module_name}: {_describe(e)}"))
    func = getattr(module, func_name, None)
    if not callable(func):
        raise SystemExit(_fatal(f"{module_name} has no function {func_name}"))
    setup = getattr(module, "setup", None)
    if callable(setup):
        try:
            setup()
        except Exception as e:
            raise SystemExit(_fatal(f"{module_name}.setup() failed: {_describe(e)}"))
    return func


USAGE = """usage: python3 -m jobvisor.worker MODULE:FUNC
       python3 -m jobvisor.worker --call

MODULE:FUNC  serve FUNC(input: bytes-like) -> bytes; MODULE.setup() runs once first
--call       serve pickled calls submitted by jobvisor.Executor
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        sys.stderr.write(USAGE)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "--call":
        call_setup()

        def handler(job_input):
            try:
                return _call(job_input)
            except _CallFailed:
                raise
            except Exception as e:
                raise RuntimeError(f"cannot run the pickled call: {_describe(e)}") from None
    else:
        handler = _load(argv[0])
    try:
        return Worker(handler, writable_input=argv[0] == "--call").run()
    except w.ProtocolError as e:
        return _fatal(f"protocol error: {e}")
    except OSError as e:
        print(f"jobvisor.worker: talking to the daemon failed: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
