"""Where the jobvisor binaries (``jobvisord``, ``jobvisorctl``,
``jobvisor-worker``) are.

``pip install ./python`` builds them and puts them in the environment's
scripts directory, next to its ``python``; :func:`find` looks there, so a
package installed that way finds its own binaries whatever ``PATH`` says.
"""

import os
import shutil
import sys
import sysconfig

ENV_VAR = "JOBVISOR_BIN_DIR"


class BinaryNotFoundError(FileNotFoundError):
    """A jobvisor binary is in none of the places :func:`find` looks."""


def _executable(path):
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _candidate_dirs():
    """The directories searched before ``PATH``, in order."""
    dirs = []
    scripts = sysconfig.get_path("scripts")
    if scripts:
        dirs.append(scripts)
    if sys.executable:
        dirs.append(os.path.dirname(sys.executable))
    return dirs


def find(name):
    """Absolute path of the binary ``name``: ``$JOBVISOR_BIN_DIR/name`` if
    that variable is set (and nowhere else then), else the running
    interpreter's scripts directory, else the directory of
    ``sys.executable``, else ``PATH``. Raises :class:`BinaryNotFoundError`."""
    bin_dir = os.environ.get(ENV_VAR)
    if bin_dir:
        path = os.path.join(bin_dir, name)
        if _executable(path):
            return os.path.abspath(path)
        raise BinaryNotFoundError(
            f"{name}: no executable {path} (${ENV_VAR} is set to {bin_dir!r}; "
            f"unset it to use the one `pip install ./python` installed)"
        )
    for d in _candidate_dirs():
        path = os.path.join(d, name)
        if _executable(path):
            return os.path.abspath(path)
    path = shutil.which(name)
    if path:
        return os.path.abspath(path)
    raise BinaryNotFoundError(
        f"{name} not found in {', '.join(_candidate_dirs()) or 'no scripts directory'} "
        f"nor on PATH: `pip install ./python` (from a jobvisor checkout) installs it "
        f"into this environment; or put it on PATH, or set {ENV_VAR} to its directory"
    )
