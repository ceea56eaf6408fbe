"""``python -m jobvisor``: which jobvisor this is, and ``jobvisorctl``."""

import os
import subprocess
import sys

from . import __version__, _bin

USAGE = """\
usage: python -m jobvisor [--version | --help]
       python -m jobvisor ctl [JOBVISORCTL-ARGS...]

jobvisor for Python: the `jobvisor` package (workers, Client, Executor) and the
jobvisord job supervisor's binaries (jobvisord, jobvisorctl, jobvisor-worker),
which `pip install ./python` installs next to this interpreter.

  --version   the package's version and the jobvisord it finds (and where)
  --help      this text
  ctl ARGS    runs jobvisorctl ARGS (e.g. `python -m jobvisor ctl status`)

Binaries are looked up in $JOBVISOR_BIN_DIR if set, else this interpreter's
scripts directory, else next to sys.executable, else on PATH.
"""


def daemon_version():
    """``(version line, path)`` of the jobvisord :func:`_bin.find` finds."""
    path = _bin.find("jobvisord")
    out = subprocess.run(
        [path, "--version"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30
    )
    if out.returncode != 0:
        raise OSError(
            f"{path} --version exited with {out.returncode}: {out.stderr.decode(errors='replace')}"
        )
    return out.stdout.decode(errors="replace").strip(), path


def main(argv):
    if argv[:1] == ["ctl"]:
        path = _bin.find("jobvisorctl")
        os.execv(path, ["jobvisorctl", *argv[1:]])
    if argv in (["--help"], ["-h"]):
        sys.stdout.write(USAGE)
        return 0
    if argv == ["--version"]:
        try:
            version, path = daemon_version()
        except (OSError, subprocess.SubprocessError) as e:
            print(f"jobvisor {__version__}")
            print(f"python -m jobvisor: jobvisord: {e}", file=sys.stderr)
            return 1
        print(f"jobvisor {__version__} ({version}: {path})")
        return 0
    sys.stderr.write(USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
