"""jobvisor for Python.

- :class:`Executor` and :class:`Pool`: drop-in replacements for
  ``concurrent.futures.ProcessPoolExecutor`` and ``multiprocessing.Pool``;
  with no pool named, they start a private daemon for this process;
- :class:`Client` talks to jobvisord like ``jobvisorctl``;
- ``python3 -m jobvisor.worker MODULE:FUNC`` serves a bytes handler in a
  jobvisord pool, ``python3 -m jobvisor.worker --call`` serves pickled calls
  (see :mod:`jobvisor.worker`).
"""

from .client import Client, Error, Job
from .executor import Executor, JobError, PoolFailedError, RemoteError, RemoteTraceback
from .pool import Pool

__all__ = ["Client", "Error", "Executor", "Job", "JobError", "Pool", "PoolFailedError",
           "RemoteError", "RemoteTraceback"]
__version__ = "0.1.0"
