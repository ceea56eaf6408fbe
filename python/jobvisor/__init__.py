"""jobvisor for Python.

- ``python3 -m jobvisor.worker MODULE:FUNC`` serves a bytes handler in a
  jobvisord pool, ``python3 -m jobvisor.worker --call`` serves pickled calls
  (see :mod:`jobvisor.worker`);
- :class:`Client` talks to jobvisord like ``jobvisorctl``;
- :class:`Executor` is a ``concurrent.futures.Executor`` running calls on a
  pool of ``--call`` workers.
"""

from .client import Client, Error, Job
from .executor import Executor, JobError, RemoteError

__all__ = ["Client", "Error", "Executor", "Job", "JobError", "RemoteError"]
__version__ = "0.1.0"
