"""The worker of jobvisor's latency pool in bench/pg_peers/jobvisor_bench.py:
answers the time at which the job started (time.time(), as text)."""
import time


def started(data):
    return repr(time.time())


def sleep(data):
    """Sleeps for the input's number of seconds (the requeue measurement of
    bench/pg_burndown.py)."""
    time.sleep(float(bytes(data)))
    return b"slept"
