"""Where jobvisor's binaries are: ``pip install ./python`` puts them in the
environment's scripts directory."""

import os
import shutil
import sys
import sysconfig

from .client import Error


def find(name):
    """The absolute path of binary `name` (``jobvisord``, ``jobvisorctl``,
    ``jobvisor-worker``): ``$JOBVISOR_BIN_DIR``, else the running
    interpreter's scripts directory, else next to ``sys.executable``, else
    ``PATH``."""
    override = os.environ.get("JOBVISOR_BIN_DIR")
    if override:
        path = os.path.join(override, name)
        if os.access(path, os.X_OK):
            return os.path.abspath(path)
        raise Error("failed", f"{path} is not an executable (JOBVISOR_BIN_DIR={override})")
    for d in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        path = os.path.join(d, name) if d else None
        if path and os.access(path, os.X_OK):
            return os.path.abspath(path)
    found = shutil.which(name)
    if found:
        return os.path.abspath(found)
    raise Error("failed", f"{name} not found: `pip install ./python` (from the jobvisor repository) "
                          "installs it, or put it on PATH, or set JOBVISOR_BIN_DIR")
