# Helpers that the adapted concurrent.futures tests send to workers, in an
# importable module of their own (the Pool helpers stay in test_pool.py, as in
# CPython, so that both ways of pickling by reference are exercised).
#
# Adapted from CPython v3.13.0 Lib/test/test_concurrent_futures/
# (executor.py, test_shutdown.py, test_wait.py, test_process_pool.py,
# test_deadlock.py); see README.md for what changed.
# Copyright (c) 2001-2024 Python Software Foundation; All Rights Reserved
# PSF License, see LICENSE-PSF.txt.

import os
import sys
import time


# executor.py

def mul(x, y):
    return x * y


def capture(*args, **kwargs):
    return args, kwargs


class MyObject(object):
    def my_method(self):
        pass


def make_dummy_object(_):
    return MyObject()


# test_shutdown.py

def sleep_and_print(t, msg):
    time.sleep(t)
    print(msg)
    sys.stdout.flush()


# test_wait.py

def sleep_and_raise(t):
    time.sleep(t)
    raise Exception('this is an exception')


# test_process_pool.py

class EventfulGCObj():
    def __init__(self, mgr):
        self.event = mgr.Event()

    def __del__(self):
        self.event.set()


# test_deadlock.py

def _crash(delay=None):
    """Induces a segfault."""
    if delay:
        time.sleep(delay)
    import faulthandler
    faulthandler.disable()
    faulthandler._sigsegv()


def _crash_with_data(data):
    """Induces a segfault with dummy data in input."""
    _crash()


def _exit():
    """Induces a sys exit with exitcode 1."""
    sys.exit(1)


def _raise_error(Err):
    """Function that raises an Exception in process."""
    raise Err()


def _return_instance(cls):
    """Function that returns a instance of cls."""
    return cls()


class CrashAtPickle(object):
    """Bad object that triggers a segfault at pickling time."""
    def __reduce__(self):
        _crash()


class CrashAtUnpickle(object):
    """Bad object that triggers a segfault at unpickling time."""
    def __reduce__(self):
        return _crash, ()


class ExitAtPickle(object):
    """Bad object that triggers a process exit at pickling time."""
    def __reduce__(self):
        _exit()


class ErrorAtPickle(object):
    """Bad object that triggers an error at pickling time."""
    def __reduce__(self):
        from pickle import PicklingError
        raise PicklingError("Error in pickle")


# Ours (not CPython's): for the jobvisor-only tests of test_jobvisor.py.

def os_exit(code):
    """The worker exits at once, without unwinding (like os._exit in user code)."""
    os._exit(code)


def pid_then_sleep(path, t):
    """Writes the worker's pid to `path`, then sleeps `t` seconds; returns the pid."""
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(t)
    return os.getpid()


def crash_once(marker):
    """Segfaults the first time (`marker` does not exist yet), returns 'ok' after."""
    if not os.path.exists(marker):
        with open(marker, "w"):
            pass
        _crash()
    return "ok"


def crash_on(x, bad):
    """Segfaults for x == bad, returns x*x otherwise."""
    if x == bad:
        _crash()
    return x * x
