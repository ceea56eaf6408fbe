"""The worker's view of its arena: the split both sides compute, bounds
checks of input references, and the output slot allocator."""

import os
import unittest

from jobvisor import _wire as w
from jobvisor.worker import _Arena


class Arena(unittest.TestCase):
    def arena(self, size):
        fd = os.memfd_create("test-arena")
        os.ftruncate(fd, size)
        self.addCleanup(os.close, fd)
        return _Arena(fd, size)

    def test_split_matches_the_protocol(self):
        a = self.arena(256 << 20)
        self.assertEqual(a.input, (0, 128 << 20))
        self.assertEqual(a.output, (128 << 20, 256 << 20))
        # An odd page count: the extra page is the input region's; bytes
        # after the last whole page belong to neither.
        b = self.arena(3 * 4096 + 100)
        self.assertEqual(b.input, (0, 2 * 4096))
        self.assertEqual(b.output, (2 * 4096, 3 * 4096))

    def test_input_references_are_bounds_checked(self):
        a = self.arena(4 * 4096)
        view = a.input_view(4096, 4096)
        self.assertTrue(view.readonly)
        self.assertEqual(len(view), 4096)
        for offset, length in [(0, 2 * 4096 + 1), (2 * 4096, 1), (2**63, 10), (8191, 2)]:
            with self.assertRaises(w.ProtocolError, msg=(offset, length)):
                a.input_view(offset, length)

    def test_output_slots_first_fit_and_reuse(self):
        a = self.arena(8 * 4096)  # output region: 4 pages
        start, end = a.output
        x = a.alloc(4096)
        y = a.alloc(100)
        self.assertEqual((x, y), (start, start + 4096))
        self.assertIsNone(a.alloc(3 * 4096), "does not fit beside the two")
        a.release(x)
        self.assertEqual(a.alloc(64), start, "the freed slot is reused")
        a.release(start)
        a.release(y)
        self.assertEqual(a.alloc(end - start), start, "all free again")

    def test_no_arena(self):
        a = _Arena(-1, 0)
        self.assertIsNone(a.alloc(10))
        a.release(0)
        with self.assertRaises(w.ProtocolError):
            a.input_view(0, 1)


if __name__ == "__main__":
    unittest.main()
