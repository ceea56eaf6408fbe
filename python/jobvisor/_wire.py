"""The wire format shared with jobvisord: frames (u32 little-endian length +
payload) whose payload is one message in bincode 2's standard encoding
(varint integers). See docs/PROTOCOL.md, sections 3 to 5."""

import os
import struct

MAX_FRAME_LEN = 64 << 20
PROTOCOL_VERSION = 1


class ProtocolError(Exception):
    """A frame or message that breaks the protocol."""


def uvarint(n):
    """Encodes an unsigned integer as a bincode 2 varint."""
    if n < 0:
        raise ValueError("negative varint")
    if n < 251:
        return bytes((n,))
    if n < 1 << 16:
        return b"\xfb" + struct.pack("<H", n)
    if n < 1 << 32:
        return b"\xfc" + struct.pack("<I", n)
    if n < 1 << 64:
        return b"\xfd" + struct.pack("<Q", n)
    raise ValueError("varint too large")


def ivarint(n):
    """Encodes a signed integer: zigzag, then varint."""
    return uvarint(n * 2 if n >= 0 else -n * 2 - 1)


def bytes_(b):
    """A byte string: varint length, then the bytes."""
    return uvarint(len(b)) + bytes(b)


def string(s):
    return bytes_(s.encode("utf-8"))


def option(value, encode):
    return b"\x00" if value is None else b"\x01" + encode(value)


def boolean(b):
    return b"\x01" if b else b"\x00"


def payload(output):
    """A `Payload`: bytes-like travel `Inline`; an ``(offset, length)`` pair
    names a range of the worker's output half of the arena (`Shm`), filled
    before the message is sent and left alone until the daemon's `Release`."""
    if isinstance(output, tuple):
        offset, length = output
        return b"\x01" + uvarint(offset) + uvarint(length)
    return b"\x00" + bytes_(output)


def encode_done(job_id, output):
    """`FromWorker::Done { id, output }` (variant 1); `output` as for
    `payload`."""
    return b"\x01" + uvarint(job_id) + payload(output)


def encode_failed(job_id, error):
    """`FromWorker::Failed { id, error }` (variant 2)."""
    return b"\x02" + uvarint(job_id) + string(error)


def encode_raised(job_id, error, output):
    """`FromWorker::Raised { id, error, output }` (variant 3): the job failed
    (not retried, like `Failed`) with `error` for humans (a traceback) and
    `output` kept as the failed job's output (e.g. the pickled exception),
    inline or in the arena as for `payload`. Needs a daemon that knows the
    message (docs/PROTOCOL.md section 5); older ones kill the worker."""
    return b"\x03" + uvarint(job_id) + string(error) + payload(output)


_WIDE = {251: ("<H", 2, 16), 252: ("<I", 4, 32), 253: ("<Q", 8, 64)}


class Reader:
    """A cursor over one message (a frame's payload)."""

    def __init__(self, buf):
        self.buf = memoryview(buf)
        self.pos = 0

    def take(self, n):
        if n < 0 or self.pos + n > len(self.buf):
            raise ProtocolError("truncated message")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def u8(self):
        return self.take(1)[0]

    def uvarint(self, bits=64):
        tag = self.u8()
        if tag < 251:
            return tag
        if tag not in _WIDE:
            raise ProtocolError(f"bad varint tag {tag:#x}")
        fmt, size, width = _WIDE[tag]
        if width > bits:
            raise ProtocolError(f"varint wider than u{bits}")
        return struct.unpack(fmt, self.take(size))[0]

    def ivarint(self, bits=64):
        z = self.uvarint(bits)
        return (z >> 1) if z & 1 == 0 else -((z + 1) >> 1)

    def boolean(self):
        b = self.u8()
        if b > 1:
            raise ProtocolError(f"bad bool {b}")
        return b == 1

    def option(self, decode):
        tag = self.u8()
        if tag == 0:
            return None
        if tag == 1:
            return decode()
        raise ProtocolError(f"bad Option tag {tag}")

    def bytes_(self):
        return bytes(self.take(self.uvarint()))

    def string(self):
        try:
            return bytes(self.take(self.uvarint())).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"invalid UTF-8: {e}") from None

    def vec(self, decode):
        return [decode() for _ in range(self.uvarint())]

    def end(self):
        if self.pos != len(self.buf):
            raise ProtocolError("trailing bytes after the message")


def frame(payload):
    """One frame around `payload`."""
    if len(payload) > MAX_FRAME_LEN:
        raise ProtocolError(f"frame of {len(payload)} bytes is over the {MAX_FRAME_LEN}-byte limit")
    return struct.pack("<I", len(payload)) + payload


class FrameReader:
    """Reads whole frames from a byte stream, buffering partial reads.
    `read(n)` returns up to n bytes, b"" at the end of the stream: a file
    descriptor's by default (``FrameReader(fd)``). Frames are taken from
    the buffer by position; what was consumed is dropped only when the
    buffer is refilled (not once per frame: a 64 KiB read of small frames
    would be moved hundreds of times)."""

    def __init__(self, fd=None, read=None):
        self.read = read or (lambda n: os.read(fd, n))
        self.buf = bytearray()
        self.pos = 0

    def _fill(self, want):
        while len(self.buf) - self.pos < want:
            if self.pos:
                del self.buf[:self.pos]
                self.pos = 0
            chunk = self.read(max(1 << 16, want - len(self.buf)))
            if not chunk:
                if self.buf:
                    raise ProtocolError("end of stream inside a frame")
                raise EOFError
            self.buf += chunk

    def next(self):
        """The next frame's payload; EOFError at a clean end of stream."""
        if len(self.buf) - self.pos < 4:
            self._fill(4)
        (n,) = _U32.unpack_from(self.buf, self.pos)
        if n > MAX_FRAME_LEN:
            raise ProtocolError(f"frame of {n} bytes is over the {MAX_FRAME_LEN}-byte limit")
        if len(self.buf) - self.pos < 4 + n:
            self._fill(4 + n)
        start = self.pos + 4
        self.pos = start + n
        return bytes(self.buf[start:self.pos])


_U32 = struct.Struct("<I")


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
