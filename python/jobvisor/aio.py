"""jobvisor for asyncio.

:class:`Client` is :class:`jobvisor.Client` with coroutines, on the event
loop (no thread): submit byte jobs, wait for them, map inputs over a pool.

    from jobvisor import aio
    async with await aio.Client.connect() as c:
        job_id = await c.submit("resize", b"...")
        [job] = await c.wait(job_id)
        async for job in c.map("resize", inputs):   # in completion order
            ...

:class:`Executor` runs Python calls, as :class:`jobvisor.Executor` (embedded
with no ``pool``, else on a shared pool), with awaitable results:

    async with aio.Executor() as ex:
        print(await ex.submit(pow, 2, 10))
        print([r async for r in ex.map(abs, [-1, -2])])

A plain :class:`jobvisor.Executor` also works with
``loop.run_in_executor(executor, fn, *args)``.

Inputs of 1 MiB or more are passed as a sealed memfd (``SubmitFd``);
outputs of that size come back as a descriptor and are read from it.
"""

import array
import asyncio
import os
import socket

from . import _wire as w
from .client import (MAP_WINDOW, Error, _options, decode_with_fd, read_fd, resolve_socket,
                     submit_request, encode_submit_with, take_fds)

__all__ = ["Client", "Executor"]


class _Connection:
    """One control connection on the running loop: non-blocking socket,
    readiness from the loop (``add_reader``/``add_writer``), descriptors
    in and out with ``SCM_RIGHTS``."""

    MAX_FDS = 8

    def __init__(self, sock):
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray()
        self.fds = []
        self.eof = False

    @classmethod
    async def open(cls, path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, path)
        except OSError as e:
            sock.close()
            raise Error("failed", f"cannot connect to jobvisord at {path}: {e.strerror or e}"
                                  " (is it running? see `jobvisorctl status`)") from None
        conn = cls(sock)
        try:
            await conn.send(b"\x00" + w.uvarint(w.PROTOCOL_VERSION))
        except Error:
            pass  # a refusal is still read below
        kind, value = await conn.recv()
        if kind == "error":
            conn.close()
            raise value
        if kind != "hello":
            conn.close()
            raise Error("failed", f"unexpected answer to Hello: {kind}")
        conn.hello = value
        return conn

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        self.sock.close()

    async def _ready(self, add, remove):
        fut = self.loop.create_future()
        fd = self.sock.fileno()
        add(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await fut
        finally:
            remove(fd)

    async def send(self, payload, fd=None):
        data = memoryview(w.frame(payload))
        try:
            if fd is not None:
                # The descriptor goes with the frame's first byte.
                while True:
                    try:
                        sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                           array.array("i", [fd]))])
                        break
                    except BlockingIOError:
                        await self._ready(self.loop.add_writer, self.loop.remove_writer)
                data = data[sent:]
            if data:
                await self.loop.sock_sendall(self.sock, data)
        except OSError as e:
            raise Error("failed", f"connection to jobvisord lost: {e}") from None

    async def _fill(self):
        size = socket.CMSG_SPACE(self.MAX_FDS * array.array("i").itemsize)
        while True:
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(
                    1 << 16, size, getattr(socket, "MSG_CMSG_CLOEXEC", 0))
                break
            except BlockingIOError:
                await self._ready(self.loop.add_reader, self.loop.remove_reader)
            except OSError as e:
                raise Error("failed", f"connection to jobvisord lost: {e}") from None
        take_fds(ancdata, self.fds)
        if not data:
            raise Error("failed", "jobvisord closed the connection")
        self.buf += data

    async def recv(self):
        """The next response, decoded; a ``job_fd`` comes back as ("job",
        Job) with its output read from the descriptor."""
        while len(self.buf) < 4:
            await self._fill()
        n = int.from_bytes(self.buf[:4], "little")
        if n > w.MAX_FRAME_LEN:
            raise Error("failed", f"protocol error: frame of {n} bytes is over the limit")
        while len(self.buf) < 4 + n:
            await self._fill()
        payload = bytes(self.buf[4:4 + n])
        del self.buf[:4 + n]
        return decode_with_fd(payload, self.fds, read_fd)


class Client:
    """A connection to jobvisord for coroutines (see the module docs). One
    request at a time: concurrent calls on one Client wait their turn (use
    several Clients for parallel requests)."""

    def __init__(self, conn):
        self._conn = conn
        self._lock = asyncio.Lock()
        self.daemon = conn.hello

    @classmethod
    async def connect(cls, socket=None, config=None):
        return cls(await _Connection.open(resolve_socket(socket, config)))

    async def close(self):
        self._conn.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def _call(self, payload, fd=None):
        await self._conn.send(payload, fd)
        kind, value = await self._conn.recv()
        if kind == "error":
            raise value
        return kind, value

    async def status(self, pool=None):
        async with self._lock:
            kind, value = await self._call(b"\x01" + w.option(pool, w.string))
        return value

    async def submit(self, pool, data, *, timeout=None, max_attempts=None, priority=0, key=None,
                     wait=False, payloads=None):
        """Submits one job; returns its id once it is durable, or with
        ``wait=True`` its final :class:`jobvisor.Job` (with the output).
        ``payloads`` ("durable" or "memory") overrides the pool's for this
        job."""
        options = _options(timeout, max_attempts, priority, key)
        if isinstance(data, str):
            data = data.encode("utf-8")
        async with self._lock:
            with submit_request(pool, data, options, wait) as (payload, fd):
                if payloads is not None:
                    length = len(data) if fd is not None else data
                    payload = encode_submit_with(pool, length, options, wait, fd is not None,
                                                 payloads, False)
                kind, value = await self._call(payload, fd)
            if kind != "submitted":
                raise Error("failed", f"unexpected answer to a submit: {kind}")
            if not wait:
                return value
            while True:
                kind, job = await self._conn.recv()
                if kind == "error":
                    raise job
                if kind == "pool_failed":
                    raise Error("failed", f"pool {job[0]} failed: {job[1]}")
                return job

    async def wait(self, *ids):
        """The final documents of `ids` (without outputs), in the order
        they finish."""
        out, error = [], None
        async with self._lock:
            await self._conn.send(b"\x07" + w.uvarint(len(ids)) + b"".join(w.uvarint(i) for i in ids))
            while True:
                kind, value = await self._conn.recv()
                if kind == "end":
                    break
                if kind == "error":
                    error = error or value
                elif kind == "pool_failed":
                    error = error or Error("failed", f"pool {value[0]} failed: {value[1]}")
                    break
                else:
                    out.append(value)
        if error is not None:
            raise error
        return out

    async def result(self, job_id):
        async with self._lock:
            return (await self._call(b"\x08" + w.uvarint(job_id)))[1]

    async def cancel(self, job_id):
        async with self._lock:
            return (await self._call(b"\x09" + w.uvarint(job_id)))[1]

    async def map(self, pool, inputs, *, timeout=None, max_attempts=None, priority=0, key=None):
        """Submits one job per input (an iterable or async iterable),
        pipelined, at most MAP_WINDOW unfinished at a time; yields each
        final :class:`jobvisor.Job` (with its output) as it finishes. A
        submit the daemon refuses raises :class:`jobvisor.Error`."""
        opts = _options(timeout, max_attempts, priority, key)
        async with self._lock:
            acked = finished = sent = 0

            async def read_one():
                nonlocal acked, finished
                kind, value = await self._conn.recv()
                if kind == "submitted":
                    acked += 1
                elif kind == "error":
                    raise value
                elif kind == "pool_failed":
                    raise Error("failed", f"pool {value[0]} failed: {value[1]}")
                elif kind == "job":
                    finished += 1
                    return value
                return None

            async def each():
                if hasattr(inputs, "__aiter__"):
                    async for x in inputs:
                        yield x
                else:
                    for x in inputs:
                        yield x

            async for data in each():
                with submit_request(pool, data, opts, True) as (payload, fd):
                    await self._conn.send(payload, fd)
                sent += 1
                while sent - finished >= MAP_WINDOW:
                    job = await read_one()
                    if job is not None:
                        yield job
            while finished < sent:
                job = await read_one()
                if job is not None:
                    yield job


class Executor:
    """:class:`jobvisor.Executor` with awaitable results (see the module
    docs); the same arguments."""

    def __init__(self, *args, **kwargs):
        from .executor import Executor as _Executor
        self._ex = _Executor(*args, **kwargs)

    async def submit(self, fn, /, *args, **kwargs):
        """Runs ``fn(*args, **kwargs)`` on a worker; returns its result."""
        return await asyncio.wrap_future(self._ex.submit(fn, *args, **kwargs))

    async def map(self, fn, *iterables):
        """Yields ``fn`` over the iterables, in order; the calls are all
        submitted at once, as ``Executor.map`` does."""
        fs = self._ex._submit_each(fn, zip(*iterables))
        try:
            for i, f in enumerate(fs):
                yield await asyncio.wrap_future(f)
        finally:
            for f in fs:
                f.cancel()

    async def shutdown(self, wait=True, *, cancel_futures=False):
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self._ex.shutdown(wait, cancel_futures=cancel_futures))

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.shutdown()
