"""The Python codec against the byte-exact examples of docs/PROTOCOL.md
(taken from the Rust encoder) and its refusals."""

import os
import threading
import unittest

from jobvisor import _wire as w
from jobvisor.client import decode_response, _options, encode_submit, Error, pool_failed_error


def h(s):
    return bytes.fromhex(s.replace(" ", ""))


class Varints(unittest.TestCase):
    def test_boundaries(self):
        for n, enc in [(0, "00"), (250, "fa"), (251, "fb fb 00"), (65535, "fb ff ff"),
                       (65536, "fc 00 00 01 00"), (2**32 - 1, "fc ff ff ff ff"),
                       (2**32, "fd 00 00 00 00 01 00 00 00"), (2**64 - 1, "fd" + " ff" * 8)]:
            self.assertEqual(w.uvarint(n), h(enc), n)
            self.assertEqual(w.Reader(h(enc)).uvarint(), n)

    def test_zigzag(self):
        for n, z in [(0, 0), (-1, 1), (1, 2), (-2, 3), (2**31 - 1, 2**32 - 2), (-2**31, 2**32 - 1)]:
            self.assertEqual(w.ivarint(n), w.uvarint(z))
            self.assertEqual(w.Reader(w.uvarint(z)).ivarint(32), n)

    def test_refusals(self):
        with self.assertRaises(w.ProtocolError):
            w.Reader(h("ff")).uvarint()
        with self.assertRaises(w.ProtocolError):
            w.Reader(h("fd 00 00 00 00 01 00 00 00")).uvarint(32)  # wider than u32
        with self.assertRaises(w.ProtocolError):
            w.Reader(h("fb 07")).uvarint()  # truncated
        with self.assertRaises(w.ProtocolError):
            w.Reader(h("02")).option(lambda: 0)
        with self.assertRaises(w.ProtocolError):
            w.Reader(h("02 ff fe")).string()
        with self.assertRaises(w.ProtocolError):
            w.Reader(h("02")).boolean()
        # A longer form than needed is accepted, as by the Rust decoder.
        self.assertEqual(w.Reader(h("fb 07 00")).uvarint(), 7)


class Frames(unittest.TestCase):
    def test_examples_of_the_protocol_document(self):
        ready = b"\x00" + w.uvarint(1) + w.uvarint(4242)
        self.assertEqual(w.frame(ready), h("05 00 00 00 00 01 fb 92 10"))
        done = b"\x01" + w.uvarint(7) + b"\x00" + w.bytes_(b"HI")
        self.assertEqual(w.frame(done), h("06 00 00 00 01 07 00 02 48 49"))
        failed = b"\x02" + w.uvarint(7) + w.string("boom")
        self.assertEqual(w.frame(failed), h("07 00 00 00 02 07 04 62 6f 6f 6d"))
        self.assertEqual(w.encode_done(7, b"HI"), done)
        self.assertEqual(w.encode_failed(7, "boom"), failed)

    def test_raised_example_of_the_protocol_document(self):
        # The bytes of the Rust encoder (ipc-proto/tests/codec.rs).
        self.assertEqual(w.frame(w.encode_raised(7, "boom", b"E")),
                         h("0a 00 00 00 03 07 04 62 6f 6f 6d 00 01 45"))
        # A memoryview detail, and one in the arena: Payload::Shm.
        self.assertEqual(w.encode_raised(7, "boom", memoryview(b"E")),
                         w.encode_raised(7, "boom", b"E"))
        self.assertEqual(w.encode_raised(300, "é\nx", (4096, 65536)),
                         h("03 fb 2c 01 04 c3 a9 0a 78 01 fb 00 10 fc 00 00 01 00"))
        self.assertEqual(w.encode_done(8, (4096, 65536)),
                         h("01 08 01 fb 00 10 fc 00 00 01 00"))

    def test_frames_split_and_joined_across_reads(self):
        r, wr = os.pipe()
        try:
            data = w.frame(b"abc") + w.frame(b"") + w.frame(b"x" * 70000)
            reader = w.FrameReader(r)
            # More than a pipe holds, in two writes (the first one cuts the
            # length prefix): written from another thread.
            def rest(fd):
                w.write_all(fd, data[:2])
                w.write_all(fd, data[2:])
                os.close(fd)
            writer = threading.Thread(target=rest, args=(wr,))
            writer.start()
            wr = None
            self.assertEqual(reader.next(), b"abc")
            self.assertEqual(reader.next(), b"")
            self.assertEqual(reader.next(), b"x" * 70000)
            with self.assertRaises(EOFError):
                reader.next()
            writer.join()
        finally:
            os.close(r)
            if wr is not None:
                os.close(wr)

    def test_oversized_and_truncated_frames(self):
        r, wr = os.pipe()
        w.write_all(wr, (w.MAX_FRAME_LEN + 1).to_bytes(4, "little"))
        os.close(wr)
        with self.assertRaises(w.ProtocolError):
            w.FrameReader(r).next()
        os.close(r)
        r, wr = os.pipe()
        w.write_all(wr, h("05 00 00 00 00 01"))
        os.close(wr)
        with self.assertRaises(w.ProtocolError):
            w.FrameReader(r).next()
        os.close(r)
        with self.assertRaises(w.ProtocolError):
            w.frame(b"\x00" * (w.MAX_FRAME_LEN + 1))


class Control(unittest.TestCase):
    def test_submit_example(self):
        payload = encode_submit("py", b"hello", _options(None, None, 0, None), True, False)
        self.assertEqual(w.frame(payload), h("0f 00 00 00 06 02 70 79 05 68 65 6c 6c 6f 00 00 00 00 01"))
        self.assertEqual(_options(None, None, -1, None), h("00 00 01 00"))

    def test_responses(self):
        self.assertEqual(decode_response(h("05 2a")), ("submitted", 42))
        self.assertEqual(decode_response(h("04")), ("end", None))
        kind, err = decode_response(b"\x03\x01" + w.string("no such job"))
        self.assertEqual((kind, err.kind, err.exit_code, str(err)), ("error", "not_found", 4, "no such job"))
        # PoolFailed, the bytes of the Rust encoder (ipc-proto/tests/codec.rs).
        self.assertEqual(decode_response(h("09 02 70 79 01 78")), ("pool_failed", ("py", "x")))
        err = pool_failed_error(("py", "worker 0: exit status 1"), 42)
        self.assertEqual((err.kind, err.exit_code), ("failed", 1))
        self.assertEqual(str(err), "pool py failed: worker 0: exit status 1; fix its command, "
                                   "then `jobvisorctl reload` (job 42 stays queued)")
        with self.assertRaises(w.ProtocolError):
            decode_response(h("09"))  # truncated
        with self.assertRaises(w.ProtocolError):
            decode_response(h("0a"))  # unknown variant
        with self.assertRaises(w.ProtocolError):
            decode_response(h("05 2a 00"))  # trailing byte

    def test_job_document(self):
        attempt = (w.uvarint(1) + w.uvarint(0) + w.uvarint(99) + w.uvarint(5)
                   + b"\x01" + w.uvarint(6) + b"\x01" + w.uvarint(0) + b"\x00")
        doc = (w.uvarint(7) + w.string("py") + w.uvarint(2) + w.ivarint(-3) + b"\x00"
               + w.uvarint(5) + b"\x01" + w.uvarint(6) + w.uvarint(1) + attempt
               + b"\x01" + w.bytes_(b"out") + b"\x00")
        kind, job = decode_response(b"\x06" + doc)
        self.assertEqual(kind, "job")
        self.assertEqual((job.id, job.pool, job.state, job.priority, job.output), (7, "py", "succeeded", -3, b"out"))
        self.assertEqual(job.attempts[0]["outcome"], "succeeded")
        self.assertEqual(job.attempts[0]["pid"], 99)
        self.assertTrue(issubclass(Error, Exception))


if __name__ == "__main__":
    unittest.main()
