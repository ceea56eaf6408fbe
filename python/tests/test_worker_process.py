"""`python3 -m jobvisor.worker` as a process, driven over its pipes as the
daemon would: Ready, jobs in order, a cancel of a queued job, Shutdown, and
the exit statuses for end of stream and garbage."""

import os
import select
import struct
import subprocess
import sys
import tempfile
import unittest

from jobvisor import _wire as w

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.dirname(HERE)

MODULE = """
import sys, time
def handle(data):
    data = bytes(data)
    if data.startswith(b"sleep "):
        print("started", file=sys.stderr, flush=True)
        time.sleep(float(data[6:]))
    return data.upper()
"""


def job(job_id, data):
    return b"\x00" + w.uvarint(job_id) + w.uvarint(1) + b"\x00" + b"\x00" + w.bytes_(data)


class WorkerProcess(unittest.TestCase):
    def start(self):
        d = tempfile.mkdtemp()
        with open(os.path.join(d, "wmod.py"), "w") as f:
            f.write(MODULE)
        jobs_r, self.jobs_w = os.pipe()
        self.res_r, res_w = os.pipe()
        arena = os.memfd_create("arena")
        os.ftruncate(arena, 1 << 20)
        # The child's fds 3, 4, 5 are these, as jobvisord sets them.
        fds = {3: jobs_r, 4: res_w, 5: arena}
        env = dict(os.environ, PYTHONPATH=f"{PKG}:{d}", JOBVISOR_FDS="3,4,5",
                   JOBVISOR_SHM_SIZE=str(1 << 20), JOBVISOR_INLINE_LIMIT="65536")

        def child_fds():
            for target, fd in fds.items():
                os.dup2(fd, target)

        self.proc = subprocess.Popen([sys.executable, "-m", "jobvisor.worker", "wmod:handle"],
                                     env=env, preexec_fn=child_fds, pass_fds=(3, 4, 5),
                                     stderr=subprocess.PIPE)
        for fd in (jobs_r, res_w, arena):
            os.close(fd)
        self.frames = w.FrameReader(self.res_r)
        self.addCleanup(self.cleanup)
        msg = w.Reader(self.frames.next())
        self.assertEqual((msg.uvarint(), msg.uvarint(), msg.uvarint()), (0, 1, self.proc.pid))

    def cleanup(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stderr.close()
        for fd in (self.jobs_w, self.res_r):
            try:
                os.close(fd)
            except OSError:
                pass

    def send(self, payload):
        w.write_all(self.jobs_w, w.frame(payload))

    def result(self):
        m = w.Reader(self.frames.next())
        kind, job_id = m.uvarint(), m.uvarint()
        if kind == 1:
            self.assertEqual(m.uvarint(), 0, "inline output")
            return job_id, "done", m.bytes_()
        return job_id, "failed", m.string()

    def test_jobs_in_order_a_cancelled_queued_job_and_shutdown(self):
        self.start()
        self.send(job(1, b"sleep 0.3"))
        self.send(job(2, b"two"))
        self.send(b"\x01" + w.uvarint(2))  # Cancel{2}: queued behind job 1
        self.send(job(3, b"three"))
        # Job 2 is answered whether the cancel arrives before job 1 starts
        # or while it runs; 1 and 3 run in order.
        results = [self.result() for _ in range(3)]
        self.assertEqual(sorted(results), [(1, "done", b"SLEEP 0.3"), (2, "failed", "cancelled"),
                                           (3, "done", b"THREE")])
        self.assertLess(results.index((1, "done", b"SLEEP 0.3")), results.index((3, "done", b"THREE")))
        self.send(b"\x02")  # Shutdown
        self.assertEqual(self.proc.wait(10), 0)

    def test_cancel_of_the_running_job(self):
        self.start()
        self.send(job(7, b"sleep 30"))
        # Only once the handler runs: the cancel must interrupt it (had it
        # been ignored, the answer would be "SLEEP 30", after 30 s).
        ready, _, _ = select.select([self.proc.stderr], [], [], 20)
        self.assertTrue(ready, "the job did not start")
        self.assertEqual(self.proc.stderr.readline(), b"started\n")
        self.send(b"\x01" + w.uvarint(7))
        self.assertEqual(self.result(), (7, "failed", "cancelled"))
        self.send(job(8, b"after"))
        self.assertEqual(self.result(), (8, "done", b"AFTER"))

    def test_cancel_of_a_queued_job_is_answered_while_another_runs(self):
        # How the daemon takes a prefetched job back for an idle worker.
        self.start()
        self.send(job(7, b"sleep 30"))
        ready, _, _ = select.select([self.proc.stderr], [], [], 20)
        self.assertTrue(ready, "the job did not start")
        self.assertEqual(self.proc.stderr.readline(), b"started\n")
        self.send(job(8, b"eight"))
        self.send(b"\x01" + w.uvarint(8))
        # Answered by the reader thread while job 7 still sleeps.
        self.assertEqual(self.result(), (8, "failed", "cancelled"))
        self.send(b"\x01" + w.uvarint(7))
        self.assertEqual(self.result(), (7, "failed", "cancelled"))
        # Sent again, the same id runs.
        self.send(job(8, b"eight"))
        self.assertEqual(self.result(), (8, "done", b"EIGHT"))

    def test_end_of_stream_exits_0(self):
        self.start()
        os.close(self.jobs_w)
        self.assertEqual(self.proc.wait(10), 0)

    def test_garbage_exits_2_with_one_line(self):
        self.start()
        self.send(b"\x09\x00")  # unknown message variant
        self.assertEqual(self.proc.wait(10), 2)
        err = self.proc.stderr.read().decode()
        self.assertEqual(err, "jobvisor.worker: protocol error: unknown message variant 9\n")

    def test_oversized_frame_exits_2(self):
        self.start()
        w.write_all(self.jobs_w, struct.pack("<I", w.MAX_FRAME_LEN + 1))
        self.assertEqual(self.proc.wait(10), 2)


if __name__ == "__main__":
    unittest.main()
