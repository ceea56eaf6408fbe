"""``jobvisor.Client``: talks to jobvisord over its control socket, like
``jobvisorctl`` (docs/PROTOCOL.md, section 13).

    from jobvisor import Client
    with Client() as c:                       # the socket of the default config
        job_id = c.submit("resize", b"...")   # durable once this returns
        job = c.submit("resize", data, wait=True)
        job.state, job.output                 # "succeeded", b"..."

Inputs of 1 MiB or more are passed as a sealed memfd (``SubmitFd``), not
through the socket; outputs of 1 MiB or more come back the same way and are
read from that descriptor. Errors from the daemon raise :class:`Error` (with
the ``exit_code`` jobvisorctl would use: 2 invalid, 4 not found, 5 rejected,
1 failed).

A Client is one connection; it is not thread-safe (use one per thread, or
:class:`jobvisor.Executor`, which multiplexes one connection itself).
"""

import array
import contextlib
import errno
import os
import socket

from . import _wire as w

FD_PAYLOAD_MIN = 1 << 20
# Client.map: jobs submitted and not yet finished, at most.
MAP_WINDOW = 256
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled", "timed_out", "dead")
OUTCOMES = ("succeeded", "failed", "lost", "timed_out", "cancelled")
POOL_STATES = ("running", "failed", "stopping", "paused")
WORKER_STATES = ("starting", "ready", "busy", "stopping", "backoff")
ERROR_KINDS = ("invalid", "not_found", "rejected", "failed")
EXIT_CODES = {"invalid": 2, "not_found": 4, "rejected": 5, "failed": 1}
SOCKET_FILE_NAME = "jobvisor.sock"


class Error(Exception):
    """An error the daemon answered (or a broken connection: kind "failed")."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.exit_code = EXIT_CODES.get(kind, 1)


class Job:
    """A job document: ``id``, ``pool``, ``state`` (a name from JOB_STATES),
    ``priority``, ``key``, ``created_ms``, ``finished_ms``, ``attempts`` (dicts
    like jobvisorctl's JSON), ``output`` (bytes or None), ``error``."""

    __slots__ = ("id", "pool", "state", "priority", "key", "created_ms", "finished_ms",
                 "attempts", "output", "error")

    def __init__(self, **fields):
        for k in self.__slots__:
            setattr(self, k, fields.get(k))

    def __repr__(self):
        out = None if self.output is None else f"<{len(self.output)} bytes>"
        return (f"Job(id={self.id}, pool={self.pool!r}, state={self.state!r}, "
                f"attempts={len(self.attempts or [])}, output={out}, error={self.error!r})")


# -- decoding -----------------------------------------------------------------

def _enum(m, names, what):
    i = m.uvarint(32)
    if i >= len(names):
        raise w.ProtocolError(f"unknown {what} {i}")
    return names[i]


def _attempt(m):
    return {
        "n": m.uvarint(32),
        "worker": m.uvarint(32),
        "pid": m.uvarint(32),
        "started_ms": m.uvarint(),
        "ended_ms": m.option(m.uvarint),
        "outcome": m.option(lambda: _enum(m, OUTCOMES, "outcome")),
        "error": m.option(m.string),
    }


def _job(m):
    return Job(
        id=m.uvarint(),
        pool=m.string(),
        state=_enum(m, JOB_STATES, "job state"),
        priority=m.ivarint(32),
        key=m.option(m.string),
        created_ms=m.uvarint(),
        finished_ms=m.option(m.uvarint),
        attempts=m.vec(lambda: _attempt(m)),
        output=m.option(m.bytes_),
        error=m.option(m.string),
    )


def _worker_status(m):
    return {
        "id": m.uvarint(32),
        "pid": m.option(lambda: m.uvarint(32)),
        "state": _enum(m, WORKER_STATES, "worker state"),
        "uptime_ms": m.uvarint(),
        "restarts": m.uvarint(32),
        "jobs_done": m.uvarint(),
        "rss_bytes": m.uvarint(),
    }


def _pool_status(m):
    return {
        "name": m.string(),
        "state": _enum(m, POOL_STATES, "pool state"),
        "desired_workers": m.uvarint(32),
        "queued": m.uvarint(),
        "running": m.uvarint(),
        "succeeded": m.uvarint(),
        "failed": m.uvarint(),
        "last_error": m.option(m.string),
        "workers": m.vec(lambda: _worker_status(m)),
    }


def _event(m):
    return {
        "ts_ms": m.uvarint(),
        "event": m.string(),
        "pool": m.option(m.string),
        "worker": m.option(lambda: m.uvarint(32)),
        "pid": m.option(lambda: m.uvarint(32)),
        "job": m.option(m.uvarint),
        "state": m.option(lambda: _enum(m, JOB_STATES, "job state")),
        "detail": m.option(m.string),
    }


def decode_response(payload):
    """One Response as ``(kind, value)``: ("hello", dict), ("status", [pools]),
    ("ok", message), ("error", Error), ("end", None), ("submitted", id),
    ("job", Job), ("event", dict), ("job_fd", (Job, output_len)),
    ("pool_failed", (pool, error)): not an answer to one request, the pool of
    jobs this connection waits for has failed (they stay queued)."""
    m = w.Reader(payload)
    kind = m.uvarint(32)
    if kind == 0:
        value = ("hello", {"protocol_version": m.uvarint(32), "pid": m.uvarint(32), "version": m.string()})
    elif kind == 1:
        value = ("status", m.vec(lambda: _pool_status(m)))
    elif kind == 2:
        value = ("ok", m.string())
    elif kind == 3:
        ek = _enum(m, ERROR_KINDS, "error kind")
        value = ("error", Error(ek, m.string()))
    elif kind == 4:
        value = ("end", None)
    elif kind == 5:
        value = ("submitted", m.uvarint())
    elif kind == 6:
        value = ("job", _job(m))
    elif kind == 7:
        value = ("event", _event(m))
    elif kind == 8:
        doc = _job(m)
        value = ("job_fd", (doc, m.uvarint()))
    elif kind == 9:
        value = ("pool_failed", (m.string(), m.string()))
    else:
        raise w.ProtocolError(f"unknown response variant {kind}")
    m.end()
    return value


def pool_failed_error(value, job_id=None):
    """The :class:`Error` (kind "failed") for a ``pool_failed`` response."""
    pool, error = value
    stays = "" if job_id is None else f" (job {job_id} stays queued)"
    return Error("failed", f"pool {pool} failed: {error}; fix its command, then "
                           f"`jobvisorctl reload`{stays}")


# -- encoding -----------------------------------------------------------------

def _options(timeout, max_attempts, priority, key):
    timeout_ms = None if timeout is None else int(round(timeout * 1000))
    return (w.option(timeout_ms, w.uvarint) + w.option(max_attempts, w.uvarint)
            + w.ivarint(int(priority)) + w.option(key, w.string))


def encode_submit(pool, length_or_data, options, wait, fd):
    if fd:
        return b"\x0c" + w.string(pool) + w.uvarint(length_or_data) + options + w.boolean(wait)
    return b"\x06" + w.string(pool) + w.bytes_(length_or_data) + options + w.boolean(wait)


PAYLOAD_MODES = ("durable", "memory")


def encode_submit_with(pool, length_or_data, options, wait, fd, payloads, output_buffer):
    """``SubmitWith``: the input inline or (`fd`) as the first descriptor,
    a per-job ``payloads`` mode ("durable", "memory" or None for the pool's),
    and with `output_buffer` an output buffer as the next descriptor."""
    if payloads is not None and payloads not in PAYLOAD_MODES:
        raise ValueError(f"payloads must be one of {PAYLOAD_MODES} or None, not {payloads!r}")
    if fd:
        given = b"\x01" + w.uvarint(length_or_data)
    else:
        given = b"\x00" + w.bytes_(length_or_data)
    mode = w.option(None if payloads is None else PAYLOAD_MODES.index(payloads), w.uvarint)
    return (b"\x13" + w.string(pool) + given + options + w.boolean(wait) + mode
            + w.boolean(output_buffer))


@contextlib.contextmanager
def submit_request(pool, data, options, wait):
    """The request submitting `data`: yields ``(payload, fd)``, a ``Submit``
    with the bytes inline and ``fd`` None, or for 1 MiB or more a
    ``SubmitFd`` and a sealed memfd holding them (closed afterwards)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if len(data) < FD_PAYLOAD_MIN:
        yield encode_submit(pool, data, options, wait, False), None
        return
    fd = sealed_memfd(data)
    try:
        yield encode_submit(pool, len(data), options, wait, True), fd
    finally:
        os.close(fd)


# F_SEAL_FUTURE_WRITE (Linux 5.1; not in the fcntl module): no new writes,
# except through mappings made before.
F_SEAL_FUTURE_WRITE = 0x0010


def _round_up(n, to=1 << 20):
    return max(to, (n + to - 1) // to * to)


class InputBuffer:
    """A memfd that a connection reuses for the large inputs of
    ``submit(..., wait=True)`` to one pool. Once a job's result is in,
    nothing reads its input any more (see PROTOCOL.md, "Control protocol":
    the attempt that produced the result read it before its worker
    answered, and a durable store copied it before ``Submitted``), so the
    next input overwrites the same pages instead of faulting in fresh ones:
    a new 64 MiB memfd costs ~35 ms here, a rewrite ~10 ms.

    It is sealed against shrinking, growing and writing through any new
    descriptor or mapping (``F_SEAL_FUTURE_WRITE``), and written through the
    one mapping made before the seals: the daemon may then hand the
    descriptor itself to a worker of a ``payloads = "memory"`` pool, which
    maps it with no copy and cannot change it (a worker may keep the
    descriptor, so a buffer serves one pool only). It has a capacity (whole
    MiB); a larger input replaces it. A buffer whose job did not end
    normally (an error or an interruption before the result) is dropped,
    never reused: the daemon or a worker may still read it."""

    def __init__(self):
        self.fd = None
        self.map = None
        self.capacity = 0

    def fill(self, data):
        import mmap
        view = memoryview(data).cast("B")
        n = view.nbytes
        try:
            if self.fd is None or n > self.capacity:
                self.drop()
                self._create(_round_up(n))
            self.map[:n] = view
        except BaseException:
            self.drop()
            raise
        return self.fd

    def _create(self, capacity):
        import fcntl
        import mmap
        self.fd = os.memfd_create("jobvisor-input", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.capacity = capacity
        os.ftruncate(self.fd, capacity)
        self.map = mmap.mmap(self.fd, capacity, flags=mmap.MAP_SHARED,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE)
        except OSError:
            pass  # a kernel before 5.1: unsealed, the daemon copies it

    def drop(self):
        if self.map is not None:
            self.map.close()
            self.map = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.capacity = 0


class OutputBuffer:
    """A memfd a connection passes with ``submit(..., wait=True)`` to one
    pool, for the job's large output: where the job's outputs stay in
    memory (``payloads = "memory"``), the worker writes its output straight
    into it (the daemon does, for a worker of the older protocol), and the
    result's output is read or mapped from it. Sealed against shrinking
    only, so that the writer may grow it. Reused while the caller holds no
    view of the last output mapped from it (``map_outputs=True``); otherwise
    replaced by a new one, the old pages living on in the caller's view."""

    def __init__(self):
        self.fd = None
        # The mapping behind the last output handed out (map_outputs).
        self.last = None

    def get(self):
        import fcntl
        if self.fd is not None and self.last is not None:
            try:
                self.last.close()  # refused while the caller holds a view
                self.last = None
            except BufferError:
                self.drop()
        if self.fd is None:
            self.fd = os.memfd_create("jobvisor-output", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        return self.fd

    def handed_out(self, output):
        """Notes the output of the job that used this buffer."""
        import mmap
        obj = getattr(output, "obj", None)
        self.last = obj if isinstance(obj, mmap.mmap) else None

    def drop(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.last = None


class PoolBuffers:
    """The input and output buffers a connection reuses for one pool."""

    def __init__(self):
        self.input = InputBuffer()
        self.output = OutputBuffer()

    def drop(self):
        self.input.drop()
        self.output.drop()


def sealed_memfd(data):
    """A memfd holding `data`, sealed against any change. `data` is
    bytes-like, or a :class:`jobvisor._calls.Payload` (its parts are written
    where they belong, with one ``pwritev`` per 512 parts: the kernel copies
    each buffer once)."""
    import fcntl
    parts = getattr(data, "parts", None)
    if parts is None:
        parts, offsets, size = [data], [0], memoryview(data).nbytes
    else:
        offsets, size = data.offsets, data.size
    fd = os.memfd_create("jobvisor-input", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        # Holes (alignment padding) read as zeros: only the parts are written.
        iov, at = [], 0
        for part, offset in zip(parts, offsets):
            view = memoryview(part).cast("B")
            if offset != at or len(iov) == 512:
                _pwrite_all(fd, iov, at - sum(v.nbytes for v in iov))
                iov = []
            iov.append(view)
            at = offset + view.nbytes
        _pwrite_all(fd, iov, at - sum(v.nbytes for v in iov))
        seals = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _pwrite_all(fd, iov, offset):
    """Writes the views of `iov`, back to back, at `offset`."""
    while iov:
        n = os.pwritev(fd, iov, offset)
        offset += n
        while iov and n >= iov[0].nbytes:
            n -= iov[0].nbytes
            iov = iov[1:]
        if n:
            iov = [iov[0][n:]] + iov[1:]


def take_fds(ancdata, fds):
    """Appends the descriptors of a `recvmsg`'s ancillary data to `fds`."""
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(cdata[:len(cdata) - (len(cdata) % got.itemsize)])
            fds.extend(got)


def decode_with_fd(payload, fds, fetch):
    """Response `payload` decoded as :func:`decode_response`; a ``job_fd``
    becomes ("job", Job) with its output taken from the first descriptor of
    the FIFO `fds` by ``fetch(fd, length)`` (the descriptor is closed)."""
    try:
        kind, value = decode_response(payload)
    except w.ProtocolError as e:
        raise Error("failed", f"protocol error: {e}") from None
    if kind != "job_fd":
        return kind, value
    doc, length = value
    if not fds:
        raise Error("failed", "protocol error: JobFd without a descriptor")
    fd = fds.pop(0)
    try:
        doc.output = fetch(fd, length)
    finally:
        os.close(fd)
    return "job", doc


def map_fd(fd, length):
    """`length` bytes from offset 0 of a payload descriptor, mapped (no
    copy): a writable copy-on-write ``memoryview`` (writes stay private)."""
    import mmap
    if length == 0:
        return memoryview(bytearray())
    if os.fstat(fd).st_size < length:  # mapped past its end, it would SIGBUS
        raise Error("failed", f"the output descriptor holds fewer than {length} bytes")
    try:
        m = mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError) as e:
        raise Error("failed", f"cannot map the output descriptor ({length} bytes): {e}") from None
    return memoryview(m)


def read_fd(fd, length):
    """`length` bytes from offset 0 of a payload descriptor."""
    out = bytearray(length)
    view = memoryview(out)
    done = 0
    while done < length:
        n = os.preadv(fd, [view[done:]], done)
        if n == 0:
            raise Error("failed", f"the output descriptor ended after {done} of {length} bytes")
        done += n
    return bytes(out)


# -- configuration ------------------------------------------------------------

def default_config_path():
    """As jobvisorctl: $JOBVISOR_CONFIG, /etc/jobvisor/jobvisor.toml for root,
    else $XDG_CONFIG_HOME (or ~/.config)/jobvisor/jobvisor.toml."""
    if os.environ.get("JOBVISOR_CONFIG"):
        return os.environ["JOBVISOR_CONFIG"]
    if os.geteuid() == 0:
        return "/etc/jobvisor/jobvisor.toml"
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "jobvisor", "jobvisor.toml")


def _runtime_dir():
    for d in (os.environ.get("RUNTIME_DIRECTORY") or "").split(":"):
        if d.startswith("/"):
            return d
    if os.geteuid() == 0:
        return "/run/jobvisor"
    x = os.environ.get("XDG_RUNTIME_DIR", "")
    return os.path.join(x, "jobvisor") if x.startswith("/") else f"/tmp/jobvisor-{os.geteuid()}"


def default_socket():
    """The default control socket, once its directory is checked: a fake
    daemon in a directory someone else controls would get the descriptors of
    the files we submit. As tmux and ssh-agent do, a non-root user's default
    directory must be its own and mode 0700; root's must be root's and not
    writable by others (as jobvisorctl checks)."""
    d = _runtime_dir()
    euid = os.geteuid()
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return os.path.join(d, SOCKET_FILE_NAME)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Error("failed", f"refusing to use the default socket directory {d}: it is a "
                                  "symbolic link; another user could have made it") from None
        raise Error("failed", f"cannot open the default socket directory {d}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    mode = st.st_mode & 0o7777
    forbidden = 0o022 if euid == 0 else 0o077
    if st.st_uid != euid or mode & forbidden:
        need = "not writable by group or others" if euid == 0 else "closed to group and others (0700)"
        fix = "chmod go-w" if euid == 0 else "chmod 0700"
        raise Error("failed", f"refusing to use the default socket directory {d}: owner uid {st.st_uid}, "
                              f"mode {mode:04o}; it must be yours and {need} (another user could have put a "
                              f"fake jobvisord there). Remove it and start jobvisord again, or fix it: "
                              f"`{fix} {d}`")
    return os.path.join(d, SOCKET_FILE_NAME)


def resolve_socket(socket=None, config=None):
    """The control socket: `socket`, else $JOBVISOR_SOCKET, else the one the
    config file names (see :func:`socket_from_config`)."""
    return socket or os.environ.get("JOBVISOR_SOCKET") or socket_from_config(config)


def socket_from_config(path=None):
    """The control socket a config file names (``daemon.control_socket``,
    relative to the file's directory), else the default one."""
    path = path or default_config_path()
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        raise Error("invalid", f"reading {path} needs Python 3.11 (tomllib); pass socket= instead")
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise Error("invalid", f"{path}: no such config file; pass socket= or config=")
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise Error("invalid", f"{path}: {e}")
    sock = (doc.get("daemon") or {}).get("control_socket")
    if sock is None:
        return default_socket()
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), sock))


# -- the connection -----------------------------------------------------------

class Connection:
    """One control connection: frames in and out, descriptors in a FIFO."""

    MAX_FDS = 8

    def __init__(self, path, map_outputs=False):
        self.path = path
        # Large outputs (``JobFd``) as mapped views instead of bytes.
        self.map_outputs = map_outputs
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise Error("failed", f"cannot connect to jobvisord at {path}: {e.strerror or e}"
                                  " (is it running? see `jobvisorctl status`)") from None
        self.frames = w.FrameReader(read=self._read)
        self.fds = []
        # A daemon over its connection caps answers a refusal and closes
        # before reading anything: our Hello may meet a closed socket, and
        # the refusal is read all the same.
        try:
            self.send(b"\x00" + w.uvarint(w.PROTOCOL_VERSION))
        except Error:
            pass
        kind, value = self.recv()
        if kind == "error":
            raise value
        if kind != "hello":
            raise Error("failed", f"unexpected answer to Hello: {kind}")
        self.hello = value

    def close(self):
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        try:
            # Wakes a thread blocked reading this socket (close alone does not).
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def send(self, payload, fd=None):
        """Sends one frame; `fd` (a descriptor or a list of them) goes
        with its first byte."""
        data = w.frame(payload)
        fds = [] if fd is None else fd if isinstance(fd, (list, tuple)) else [fd]
        try:
            if not fds:
                self.sock.sendall(data)
            else:
                sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                   array.array("i", fds))])
                self.sock.sendall(data[sent:])
        except OSError as e:
            raise Error("failed", f"connection to jobvisord lost: {e}") from None

    def send_raw(self, data):
        """Writes already framed requests."""
        try:
            self.sock.sendall(data)
        except OSError as e:
            raise Error("failed", f"connection to jobvisord lost: {e}") from None

    def _read(self, _want):
        """One `recvmsg`: its bytes, its descriptors onto the FIFO."""
        size = socket.CMSG_SPACE(self.MAX_FDS * array.array("i").itemsize)
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(1 << 16, size, getattr(socket, "MSG_CMSG_CLOEXEC", 0))
        except OSError as e:
            raise Error("failed", f"connection to jobvisord lost: {e}") from None
        take_fds(ancdata, self.fds)
        if not data:
            raise Error("failed", "jobvisord closed the connection")
        return data

    def recv(self):
        """The next response, decoded; a ``job_fd`` comes back as ("job", Job)
        with its output read from the descriptor."""
        try:
            payload = self.frames.next()
        except w.ProtocolError as e:
            raise Error("failed", f"protocol error: {e}") from None
        return self.decode(payload)

    def decode(self, payload):
        """Response `payload` (a frame read from this connection), decoded
        as :meth:`recv` does."""
        return decode_with_fd(payload, self.fds, map_fd if self.map_outputs else read_fd)


class Client:
    """A connection to jobvisord (see the module docs)."""

    def __init__(self, socket=None, config=None, *, map_outputs=False):
        """``map_outputs=True``: large outputs (those the daemon hands over
        as a descriptor, 1 MiB and up) come as a read-only-backed, writable
        copy-on-write ``memoryview`` of the mapped descriptor rather than as
        ``bytes``: no copy, whatever the size. Smaller outputs are ``bytes``
        either way."""
        self.conn = Connection(resolve_socket(socket, config), map_outputs=map_outputs)
        self.daemon = self.conn.hello
        # Per pool: the buffers of large submits that wait (see PoolBuffers).
        self._buffers = {}

    def close(self):
        for b in self._buffers.values():
            b.drop()
        self._buffers = {}
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, payload, fd=None):
        self.conn.send(payload, fd)
        kind, value = self.conn.recv()
        if kind == "error":
            raise value
        return kind, value

    def _expect(self, want, payload):
        kind, value = self._call(payload)
        if kind != want:
            raise Error("failed", f"unexpected answer from jobvisord: {kind}")
        return value

    def status(self, pool=None):
        """The pools (dicts with their workers), or just `pool`."""
        return self._expect("status", b"\x01" + w.option(pool, w.string))

    def scale(self, pool, workers):
        return self._expect("ok", b"\x02" + w.string(pool) + w.uvarint(workers))

    def restart(self, pool):
        return self._expect("ok", b"\x03" + w.string(pool))

    def reload(self):
        return self._expect("ok", b"\x04")

    def shutdown(self, now=False):
        return self._expect("ok", b"\x05" + w.boolean(now))

    def submit(self, pool, data, *, timeout=None, max_attempts=None, priority=0, key=None,
               wait=False, payloads=None):
        """Submits one job; returns its id once it is durable, or with
        ``wait=True`` its final :class:`Job` (with the output). If the pool
        has failed (or fails while waiting), raises :class:`Error` (kind
        "failed") at once; the job stays queued and runs once the pool is
        fixed. ``payloads`` ("durable" or "memory") overrides the pool's
        ``payloads`` for this job.

        A large input (1 MiB or more) submitted with ``wait=True`` goes
        through this connection's input buffer for the pool, and comes with
        its output buffer (see :class:`InputBuffer`, :class:`OutputBuffer`):
        in a ``payloads = "memory"`` pool the bytes are then copied about
        once each way."""
        options = _options(timeout, max_attempts, priority, key)
        if isinstance(data, str):
            data = data.encode("utf-8")
        buffers = None
        if wait and getattr(data, "parts", None) is None \
                and memoryview(data).nbytes >= FD_PAYLOAD_MIN:
            buffers = self._buffers.get(pool)
            if buffers is None:
                buffers = self._buffers[pool] = PoolBuffers()
        # Waiting, the job has ended when this returns normally: its
        # buffers can take the next job (see InputBuffer).
        ended = False
        try:
            if buffers is not None:
                fds = [buffers.input.fill(data), buffers.output.get()]
                payload = encode_submit_with(pool, memoryview(data).nbytes, options, wait, True,
                                             payloads, True)
                kind, value = self._call(payload, fds)
            elif payloads is not None:
                with submit_request(pool, data, options, wait) as (_, fd):
                    length = len(data) if fd is not None else data
                    payload = encode_submit_with(pool, length, options, wait, fd is not None,
                                                 payloads, False)
                    kind, value = self._call(payload, fd)
            else:
                with submit_request(pool, data, options, wait) as (payload, fd):
                    kind, value = self._call(payload, fd)
            if kind != "submitted":
                raise Error("failed", f"unexpected answer to a submit: {kind}")
            if not wait:
                return value
            kind, job = self.conn.recv()
            if kind == "error":
                raise job
            if kind == "pool_failed":
                raise pool_failed_error(job, value)
            ended = True
            if buffers is not None:
                buffers.output.handed_out(job.output)
            return job
        finally:
            if buffers is not None and not ended:
                buffers.drop()
                del self._buffers[pool]

    def map(self, pool, inputs, *, timeout=None, max_attempts=None, priority=0, key=None):
        """Submits one job per input, pipelined (like ``jobvisorctl map``),
        and returns their final :class:`Job` documents (with outputs) in
        input order. Options as for :meth:`submit`. A submit the daemon
        refuses (a full queue, an unknown pool) raises :class:`Error` once
        the answers of the earlier ones are read; a failed pool raises
        :class:`Error` (kind "failed") at once."""
        opts = _options(timeout, max_attempts, priority, key)
        # `Submitted` (or `Error`) replies come in request order, documents
        # as jobs finish. At most MAP_WINDOW jobs are unfinished at a time,
        # so neither side's buffers grow without bound.
        order, docs, errors = [], {}, []
        sent = 0

        def read_one():
            kind, value = self.conn.recv()
            if kind == "submitted":
                order.append(value)
            elif kind == "error":
                errors.append(value)
            elif kind == "job":
                docs[value.id] = value
            elif kind == "pool_failed":
                raise pool_failed_error(value)

        for data in inputs:
            with submit_request(pool, data, opts, True) as (payload, fd):
                self.conn.send(payload, fd)
            sent += 1
            while sent - len(errors) - len(docs) >= MAP_WINDOW:
                read_one()
        while len(order) + len(errors) < sent or len(docs) < len(order):
            read_one()
        if errors:
            raise errors[0]
        return [docs[i] for i in order]

    def _stream(self, payload):
        """Sends a request answered by a stream that ends with `End`, and
        yields its items; an `Error` in the stream is raised once the stream
        has ended, so the connection stays usable."""
        self.conn.send(payload)
        error = None
        while True:
            kind, value = self.conn.recv()
            if kind == "end":
                break
            if kind == "error":
                error = error or value
            elif kind == "pool_failed":
                # Only waits hear it: the rest of the stream may never come.
                raise pool_failed_error(value)
            else:
                yield value
        if error is not None:
            raise error

    def wait(self, *ids):
        """The final documents of `ids` (without outputs), in the order they
        finish. If the pool of a queued one has failed (or fails meanwhile),
        raises :class:`Error` (kind "failed") at once; the wait is then still
        open on this connection (close it)."""
        return list(self._stream(b"\x07" + w.uvarint(len(ids)) + b"".join(w.uvarint(i) for i in ids)))

    def result(self, job_id):
        return self._expect("job", b"\x08" + w.uvarint(job_id))

    def cancel(self, job_id):
        return self._expect("ok", b"\x09" + w.uvarint(job_id))

    def jobs(self, pool=None, state=None, limit=None, before=None, since_ms=None):
        """Job documents (without outputs), newest first: at most ``limit``,
        with an id below ``before``, created at or after ``since_ms`` (ms
        since the epoch)."""
        st = None if state is None else JOB_STATES.index(state)
        return list(self._stream(b"\x0a" + w.option(pool, w.string) + w.option(st, w.uvarint)
                                 + w.option(limit, w.uvarint) + w.option(before, w.uvarint)
                                 + w.option(since_ms, w.uvarint)))

    def retry(self, job_id):
        """Queues a failed, dead, cancelled or timed-out job again (its
        attempts kept); returns the daemon's message."""
        return self._expect("ok", b"\x10" + w.uvarint(job_id))

    def events(self):
        """Yields event dicts until the daemon shuts down (or you stop)."""
        return self._stream(b"\x0b")
