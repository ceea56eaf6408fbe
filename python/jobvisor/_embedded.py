"""A private ``jobvisord`` for the calling process: what
``jobvisor.Executor()`` and ``jobvisor.Pool()`` start when given no pool.

The daemon lives in a new private directory (mode 0700, on a memory file
system when there is one: ``$XDG_RUNTIME_DIR``, else ``/dev/shm``, else the
temporary directory), which is its ``state_dir`` and holds its control
socket, its configuration and the workers' setup file. It is started with
``--lifeline FD``, one end of a socket pair whose other end only this
process holds: the daemon says ``listening`` on it once its control socket
is up, and when this process closes its end (``stop()``, interpreter exit,
or ``kill -9``: the kernel closes it), the daemon stops its workers at once
and removes the directory. Nothing is left behind.

The pool runs ``sys.executable -m jobvisor.worker --call``. Its workers
inherit this process's environment (through the daemon), and before
``Ready`` they take this process's ``sys.path``, working directory and main
module the way multiprocessing's spawn start method does
(``multiprocessing.spawn.get_preparation_data`` here, ``prepare`` there),
then run the initializer.
"""

import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import weakref

from . import _bin, _calls
from .client import Error

POOL = "calls"
# Daemons of this process, for the fork handler below.
_LIVE = weakref.WeakSet()
# How long the daemon may take to bind its socket (it opens its store
# first; a cold disk can be slow).
START_TIMEOUT = 30.0


def _toml(value):
    """A TOML value: strings as basic strings (JSON's escapes are TOML's,
    minus surrogates, which ``ensure_ascii=False`` avoids), lists, ints."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Error("invalid", f"{value!r} is not valid UTF-8: jobvisor cannot pass it to its workers") from None
    return json.dumps(value, ensure_ascii=False)


def _base_dir():
    """Where the private directory goes: a memory file system if there is
    one (the job store and large payloads then cost no disk I/O)."""
    for d in (os.environ.get("XDG_RUNTIME_DIR"), "/dev/shm"):
        if d and os.path.isdir(d) and os.access(d, os.W_OK | os.X_OK):
            return d
    return None


def _check_not_bootstrapping():
    if _calls.BOOTSTRAPPING:
        raise RuntimeError(
            "a jobvisor worker, while importing your main module, was asked to start a "
            "jobvisor.Executor or Pool: put that code under `if __name__ == \"__main__\":` "
            "(the main module is imported by every worker, as with multiprocessing's "
            "spawn start method)")


class Daemon:
    """One private daemon with one pool of ``--call`` workers."""

    def __init__(self, workers, *, initializer=None, initargs=(), max_tasks_per_child=None):
        _check_not_bootstrapping()
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        daemon = _bin.find("jobvisord")
        # Pickled here, so that an unpicklable initializer fails in the caller.
        init = None if initializer is None else _calls.join(_calls.dumps((initializer, tuple(initargs))))
        from multiprocessing import spawn
        prepare = spawn.get_preparation_data("jobvisor-worker")
        # An AuthenticationString refuses pickling outside multiprocessing's
        # own spawning; prepare() takes bytes.
        if "authkey" in prepare:
            prepare["authkey"] = bytes(prepare["authkey"])
        # The worker must find this very package before it applies sys.path.
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        pythonpath = os.pathsep.join(
            p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)

        self.dir = tempfile.mkdtemp(prefix="jobvisor-", dir=_base_dir())
        self.proc = None
        self._lifeline = None
        try:
            setup_path = os.path.join(self.dir, "call-setup.pickle")
            with open(setup_path, "xb") as f:
                pickle.dump({"prepare": prepare, "initializer": init}, f,
                            protocol=pickle.HIGHEST_PROTOCOL)
            pool = {
                "command": [sys.executable, "-m", "jobvisor.worker", "--call"],
                "workers": int(workers),
                "cwd": os.getcwd(),
                "env": {"JOBVISOR_CALL_SETUP": setup_path, "PYTHONPATH": pythonpath},
                # A whole map is submitted at once, like ProcessPoolExecutor.
                "queue_capacity": 1 << 40,
                # Workers that cannot start (ImportError, failing initializer)
                # fail the calls on the third try; crashes during calls, once
                # a worker has started, do not fail the pool (their calls are
                # retried, then end `dead`).
                "start_retries": 2,
                "max_restarts": 1000000,
                # A call that kills its worker is retried on a fresh one within
                # a second, not after a backoff grown to 30 s.
                "backoff_max": "1s",
                "healthy_after": "1s",
            }
            if max_tasks_per_child:
                pool["max_jobs_per_worker"] = int(max_tasks_per_child)
            lines = [
                "# Written by jobvisor (Python) for a private daemon; removed with it.",
                "[daemon]",
                'control_socket = "jobvisor.sock"',
                'state_dir = "."',
                f"[pools.{POOL}]",
            ] + [f"{k} = {_toml(v)}" for k, v in pool.items()]
            config = os.path.join(self.dir, "jobvisor.toml")
            with open(config, "x", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            self.socket = os.path.join(self.dir, "jobvisor.sock")

            ours, theirs = socket.socketpair()
            self._lifeline = ours
            env = dict(os.environ)
            # The daemon's own progress lines are not the caller's business,
            # nor its warnings about workers (their own output shows, and
            # the calls raise). JOBVISOR_LOG=info shows all.
            env.setdefault("JOBVISOR_LOG", "error")
            # A worker's print reaches this process's stdout (or stderr) as
            # under multiprocessing, not as a daemon log record.
            env.setdefault("JOBVISOR_WORKER_OUTPUT", "plain")
            for k in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "WATCHDOG_USEC", "JOBVISOR_SOCKET"):
                env.pop(k, None)
            try:
                self.proc = subprocess.Popen(
                    [daemon, "--config", config, "--lifeline", str(theirs.fileno())],
                    pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env,
                    start_new_session=True)
            finally:
                theirs.close()
            self._said = b""
            said = self._wait_for(b"listening", START_TIMEOUT)
            if said is not True:
                self.stop()
                status = self.proc.returncode
                why = (f"did not start within {START_TIMEOUT:.0f}s" if said is None
                       else f"exited with status {status}" if status is not None
                       else f"said {said!r}")
                raise Error("failed", f"the private jobvisord ({daemon}) {why}; its error is above")
            _LIVE.add(self)
        except BaseException:
            self.stop()
            raise

    def _wait_for(self, line, timeout):
        """Reads the lifeline until the daemon has said `line`: True; None
        on timeout; what it said instead, if it closed."""
        end = time.monotonic() + timeout
        # Whole lines are all but the last piece of the split.
        while line not in self._said.split(b"\n")[:-1]:
            left = end - time.monotonic()
            if left <= 0 or self._lifeline is None:
                return None
            self._lifeline.settimeout(left)
            try:
                chunk = self._lifeline.recv(64)
            except (socket.timeout, OSError):
                return None
            finally:
                if self._lifeline is not None:
                    self._lifeline.settimeout(None)
            if not chunk:
                return self._said
            self._said += chunk
        return True

    def wait_started(self, timeout=START_TIMEOUT):
        """Waits until every worker has started (or the pool has failed)."""
        self._wait_for(b"ready", timeout)

    def _forget(self):
        # A fork of this process must not keep the daemon alive.
        if self._lifeline is not None:
            self._lifeline.close()
            self._lifeline = None
        self.proc = None

    def stop(self, timeout=None):
        """Closes the lifeline: the daemon stops its workers at once and
        removes its directory. Waits for it to exit (up to `timeout`)."""
        if self._lifeline is not None:
            self._lifeline.close()
            self._lifeline = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # The daemon removed it; this covers a daemon that never started.
        import shutil
        shutil.rmtree(self.dir, ignore_errors=True)


def _after_fork_in_child():
    for d in list(_LIVE):
        d._forget()
    _LIVE.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
