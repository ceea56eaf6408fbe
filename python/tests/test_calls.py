"""jobvisor._calls: calls and results pickled with out-of-band buffers, and
the sealed memfd a large one travels in."""

import os
import pickle
import unittest

from jobvisor import _calls
from jobvisor.client import read_fd, sealed_memfd


class Calls(unittest.TestCase):
    def round_trip(self, obj):
        payload = _calls.dumps_result(obj)
        data = _calls.join(payload)
        self.assertEqual(len(data), _calls.size(payload))
        return payload, _calls.loads(data)

    def test_small_values_are_plain_pickles(self):
        payload, back = self.round_trip({"a": [1, 2.5, "x", b"y" * 100]})
        self.assertIs(type(payload), bytes)
        self.assertEqual(payload[:1], b"\x80")
        self.assertEqual(back, {"a": [1, 2.5, "x", b"y" * 100]})

    def test_large_binary_values_travel_out_of_band(self):
        for obj in (b"b" * (1 << 20), bytearray(b"c" * _calls.OOB_MIN)):
            payload, back = self.round_trip(obj)
            self.assertIsInstance(payload, _calls.Payload)
            self.assertEqual(len(payload.parts), 3)  # header, pickle, the buffer
            self.assertEqual(payload.offsets[2] % _calls.ALIGN, 0)
            self.assertEqual(back, obj)
            self.assertIs(type(back), type(obj))
        # Just under the threshold: in-band.
        payload, back = self.round_trip(b"d" * (_calls.OOB_MIN - 1))
        self.assertIs(type(payload), bytes)

    def test_a_memoryview_arrives_as_a_view_of_the_payload(self):
        view = memoryview(b"m" * (_calls.OOB_MIN * 2))
        payload, back = self.round_trip([view, "tail"])
        self.assertIsInstance(back[0], memoryview)
        self.assertEqual(bytes(back[0]), bytes(view))
        self.assertEqual(back[1], "tail")

    def test_a_call_puts_large_bytes_arguments_out_of_band(self):
        big = b"a" * (1 << 20)
        payload = _calls.dumps_call(len, (big,), {"k": big})
        self.assertIsInstance(payload, _calls.Payload)
        fn, args, kwargs = _calls.loads(_calls.join(payload))
        self.assertEqual((fn(*args), kwargs["k"] == big), (1 << 20, True))

    def test_a_truncated_payload_is_an_error_not_a_crash(self):
        data = _calls.join(_calls.dumps_result(b"z" * (1 << 20)))
        for cut in (5, 20, len(data) - 1):
            with self.assertRaises((ValueError, pickle.UnpicklingError)):
                _calls.loads(data[:cut])

    def test_an_unpicklable_result_is_a_pickling_error_with_the_value(self):
        e = _calls.UnpicklableResult("PicklingError: no", "<lambda>")
        self.assertIsInstance(e, pickle.PicklingError)
        self.assertIn("<lambda>", str(e))

    def test_a_payload_fills_a_sealed_memfd_with_its_holes_zeroed(self):
        payload = _calls.dumps_result([memoryview(b"q" * 70000), b"r" * 65536,
                                       bytearray(b"s" * 65537)])
        self.assertIsInstance(payload, _calls.Payload)
        fd = sealed_memfd(payload)
        try:
            self.assertEqual(read_fd(fd, payload.size), payload.join())
            with self.assertRaises(OSError):  # sealed
                os.pwrite(fd, b"x", 0)
        finally:
            os.close(fd)


if __name__ == "__main__":
    unittest.main()
