"""jobvisor for Python.

- :class:`Executor` and :class:`Pool`: drop-in replacements for
  ``concurrent.futures.ProcessPoolExecutor`` and ``multiprocessing.Pool``;
  with no pool named, they start a private daemon for this process;
- :class:`Client` talks to jobvisord like ``jobvisorctl``;
- ``python3 -m jobvisor.worker MODULE:FUNC`` serves a bytes handler in a
  jobvisord pool, ``python3 -m jobvisor.worker --call`` serves pickled calls
  (see :mod:`jobvisor.worker`).
"""

import importlib

# Imported when first used (PEP 562): a worker (`python -m jobvisor.worker`)
# needs none of them, and starts faster without concurrent.futures.
_LAZY = {
    "Client": "client", "Error": "client", "Job": "client",
    "Executor": "executor", "JobError": "executor", "PoolFailedError": "executor",
    "RemoteError": "executor", "RemoteTraceback": "executor",
    "Pool": "pool",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jobvisor' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"jobvisor.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["Client", "Error", "Executor", "Job", "JobError", "Pool", "PoolFailedError",
           "RemoteError", "RemoteTraceback"]
__version__ = "0.1.0"
