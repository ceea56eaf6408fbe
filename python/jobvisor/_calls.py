"""How calls and their results are pickled for ``--call`` workers.

A call is the pickle of ``(fn, args, kwargs)``; a result is the pickle of the
return value. Both use pickle protocol 5, whose *out-of-band buffers* let
large binary objects (``bytes``, ``bytearray``, ``memoryview``, numpy arrays
and anything else that pickles through ``pickle.PickleBuffer``) travel
beside the pickle stream instead of inside it:

- no out-of-band buffer: the payload is the plain pickle (it starts with the
  ``PROTO`` opcode, byte 0x80);
- otherwise: ``b"JVB1"``, a little-endian ``u32`` count N, ``u64`` length of
  the pickle, N ``u64`` buffer lengths, then the pickle and the N buffers,
  each buffer starting at a multiple of 64 bytes from the payload's start.

The reader unpickles with ``buffers=`` views of the payload itself, so a
numpy array in a call's arguments is a view of the worker's shared-memory
arena (no copy), and a large result is a view of the mapped output
descriptor in the caller (no copy either). Buffers smaller than
:data:`OOB_MIN` stay in the pickle: for them a copy is cheaper than the
bookkeeping.
"""

import io
import os
import pickle
import struct

MAGIC = b"JVB1"
# True while a `--call` worker imports the caller's main module (see
# jobvisor.worker.call_setup).
BOOTSTRAPPING = False
ALIGN = 64
# Buffers below this size are pickled in-band.
OOB_MIN = 64 << 10



def _cloud():
    """cloudpickle, for lambdas, closures and interactively defined
    functions, when it is installed and JOBVISOR_CLOUDPICKLE is not "0"
    (then only plain pickle, exactly as multiprocessing); else None.
    Imported on first need only."""
    global _CLOUD
    if _CLOUD is False:
        _CLOUD = None
        if os.environ.get("JOBVISOR_CLOUDPICKLE", "1") != "0":
            try:
                import cloudpickle
                _CLOUD = cloudpickle
            except ImportError:  # depends on the environment
                pass
    return _CLOUD


_CLOUD = False


class Payload:
    """A pickled payload as a list of parts (the header and pickle first,
    then the buffers) and where each part starts: written out with one
    ``writev`` or copied part by part into shared memory, never joined."""

    __slots__ = ("parts", "offsets", "size")

    def __init__(self, parts, offsets, size):
        self.parts = parts
        self.offsets = offsets
        self.size = size

    def join(self):
        out = bytearray(self.size)
        for part, at in zip(self.parts, self.offsets):
            n = memoryview(part).nbytes
            out[at:at + n] = memoryview(part).cast("B")
        return bytes(out)

    def write_into(self, view):
        """Copies the payload into `view` (a writable memoryview of at least
        ``size`` bytes)."""
        for part, at in zip(self.parts, self.offsets):
            src = memoryview(part).cast("B")
            view[at:at + src.nbytes] = src


class _Big:
    """Wraps a large ``bytes`` or ``bytearray`` argument or result: plain
    pickle never offers those to ``reducer_override``, so this is how one
    travels out of band (it is unpickled as the same type: one copy on the
    reading side, since a ``bytes`` owns its memory)."""

    __slots__ = ("data",)

    def __init__(self, data):
        self.data = data

    def __reduce_ex__(self, protocol):
        return type(self.data), (pickle.PickleBuffer(self.data),)


def _as_view(buf):
    return memoryview(buf)


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        # A memoryview has no reduction of its own: it arrives as a view.
        if type(obj) is memoryview and obj.nbytes >= OOB_MIN:
            return _as_view, (pickle.PickleBuffer(obj),)
        return NotImplemented


def _wrap(obj):
    t = type(obj)
    return _Big(obj) if (t is bytes or t is bytearray) and len(obj) >= OOB_MIN else obj


_BIG_TYPES = (bytes, bytearray)


def _dumps(obj, cloud=False):
    buffers = []

    def keep(buf):
        # Returning True puts the buffer in-band (small ones); False keeps it
        # out of band.
        raw = buf.raw()
        if raw.nbytes < OOB_MIN:
            return True
        buffers.append(raw)
        return False

    if cloud:
        data = _cloud().dumps(obj, protocol=5, buffer_callback=keep)
    else:
        try:
            data = pickle.dumps(obj, protocol=5, buffer_callback=keep)
        except TypeError:
            # A memoryview (which only our pickler reduces), or truly
            # unpicklable (raised again below).
            buffers.clear()
            f = io.BytesIO()
            _Pickler(f, protocol=5, buffer_callback=keep).dump(obj)
            data = f.getvalue()
    if not buffers:
        return data
    header_len = 4 + 4 + 8 + 8 * len(buffers)
    header = MAGIC + struct.pack(f"<IQ{len(buffers)}Q", len(buffers), len(data),
                                 *(b.nbytes for b in buffers))
    parts = [header, data]
    offsets = [0, header_len]
    at = header_len + len(data)
    for b in buffers:
        at = -(-at // ALIGN) * ALIGN
        parts.append(b)
        offsets.append(at)
        at += b.nbytes
    return Payload(parts, offsets, at)


def dumps(obj):
    """`obj` pickled (see the module docs): ``bytes``, or a
    :class:`Payload` when there are out-of-band buffers. With cloudpickle
    installed, what plain pickle refuses (a lambda, a closure) is tried
    with it."""
    try:
        return _dumps(obj)
    except (pickle.PicklingError, AttributeError, TypeError):
        if _cloud() is None:
            raise
        return _dumps(obj, cloud=True)


def dumps_call(fn, args, kwargs):
    """A call: large ``bytes`` among the arguments go out of band too."""
    for a in args:
        if type(a) in _BIG_TYPES and len(a) >= OOB_MIN:
            args = tuple(_wrap(a) for a in args)
            break
    if kwargs:
        kwargs = {k: _wrap(v) for k, v in kwargs.items()}
    return dumps((fn, args, kwargs))


def dumps_result(value):
    if type(value) in _BIG_TYPES and len(value) >= OOB_MIN:
        value = _Big(value)
    return dumps(value)


def size(payload):
    """The length of a payload (bytes or :class:`Payload`)."""
    return payload.size if type(payload) is Payload else len(payload)


def join(payload):
    return payload.join() if type(payload) is Payload else payload


def loads(data):
    """The object in payload `data` (bytes, or a memoryview, whose
    out-of-band buffers become views of it)."""
    view = memoryview(data)
    if view.nbytes >= 4 and view[:4] == MAGIC:
        if view.nbytes < 16:
            raise ValueError("truncated jobvisor payload header")
        count, pickle_len = struct.unpack_from("<IQ", view, 4)
        header_len = 16 + 8 * count
        if view.nbytes < header_len:
            raise ValueError("truncated jobvisor payload header")
        lengths = struct.unpack_from(f"<{count}Q", view, 16)
        at = header_len + pickle_len
        stream = view[header_len:at]
        buffers = []
        for n in lengths:
            at = -(-at // ALIGN) * ALIGN
            if at + n > view.nbytes:
                raise ValueError("truncated jobvisor payload")
            buffers.append(view[at:at + n])
            at += n
        return pickle.loads(stream, buffers=buffers)
    return pickle.loads(view)


class UnpicklableResult(pickle.PicklingError):
    """A call returned, but its result could not be pickled: ``args`` are
    the pickling error's text and the result's ``repr``.
    (:class:`jobvisor.Pool` raises it as multiprocessing's
    ``MaybeEncodingError``.)"""

    def __str__(self):
        return f"the result {self.args[1]} could not be pickled: {self.args[0]}"


def run_chunk(fn, items, star):
    """Runs a chunk of calls in one job (``Pool.map`` with ``chunksize``)."""
    if star:
        return [fn(*args) for args in items]
    return [fn(x) for x in items]
