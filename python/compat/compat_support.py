# Part of the adaptation of CPython's multiprocessing.Pool and
# concurrent.futures tests (see README.md).
#
# The few helpers of CPython's Lib/test/support that the adapted tests use,
# rewritten here so that the adaptation does not depend on the `test` package
# (Debian and other distributions ship Python without it).
#
# Adapted from CPython v3.11.7 Lib/test/support/__init__.py and
# Lib/test/support/script_helper.py.
# Copyright (c) 2001, 2002, 2003, 2004, 2005, 2006, 2007, 2008, 2009, 2010,
# 2011, 2012, 2013, 2014, 2015, 2016, 2017, 2018, 2019, 2020, 2021, 2022, 2023
# Python Software Foundation; All Rights Reserved
# PSF License, see LICENSE-PSF.txt.

import contextlib
import gc
import io
import os
import subprocess
import sys
import time

# Lib/test/support/__init__.py
SHORT_TIMEOUT = 30.0
LONG_TIMEOUT = 5 * 60.0
PIPE_MAX_SIZE = 4 * 1024 * 1024 + 1


@contextlib.contextmanager
def captured_stderr():
    orig = sys.stderr
    sys.stderr = io.StringIO()
    try:
        yield sys.stderr
    finally:
        sys.stderr = orig


def gc_collect():
    gc.collect()
    gc.collect()
    gc.collect()


def busy_retry(timeout, err_msg=None, /, *, error=True):
    start_time = time.monotonic()
    deadline = start_time + timeout
    while True:
        yield
        if time.monotonic() >= deadline:
            break
    if error:
        dt = time.monotonic() - start_time
        msg = f"timeout ({dt:.1f} seconds)"
        if err_msg:
            msg = f"{msg}: {err_msg}"
        raise AssertionError(msg)


def sleeping_retry(timeout, err_msg=None, /, *, init_delay=0.010, max_delay=1.0, error=True):
    delay = init_delay
    for _ in busy_retry(timeout, err_msg, error=error):
        yield
        time.sleep(delay)
        delay = min(delay * 2, max_delay)


@contextlib.contextmanager
def swap_attr(obj, attr, new_val):
    if hasattr(obj, attr):
        real_val = getattr(obj, attr)
        setattr(obj, attr, new_val)
        try:
            yield real_val
        finally:
            setattr(obj, attr, real_val)
    else:
        setattr(obj, attr, new_val)
        try:
            yield
        finally:
            if hasattr(obj, attr):
                delattr(obj, attr)


# Lib/test/support/script_helper.py's assert_python_ok, reduced. CPython's
# runs the child isolated (-I, no environment); this one cannot (the child
# must import this directory and the jobvisor package): it gets the caller's
# environment and sys.path (as PYTHONPATH). Bounded: a child that does not exit within
# SCRIPT_TIMEOUT seconds is killed and the test fails.
SCRIPT_TIMEOUT = 120.0


def assert_python_ok(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    cmd = [sys.executable, "-X", "faulthandler", *args]
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, env=env,
                           timeout=SCRIPT_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"the child did not exit within {SCRIPT_TIMEOUT} s:\n"
                             f"stdout: {e.stdout!r}\nstderr: {e.stderr!r}")
    # script_helper strips the "[NNN refs]" lines of debug builds; we have none.
    if p.returncode:
        raise AssertionError(
            f"Process return code is {p.returncode}\ncommand line: {cmd!r}\n\n"
            f"stdout:\n---\n{p.stdout.decode(errors='replace')}\n---\n\n"
            f"stderr:\n---\n{p.stderr.decode(errors='replace')}\n---")
    return p.returncode, p.stdout, p.stderr
