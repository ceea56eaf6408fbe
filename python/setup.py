"""Build hook; the project's metadata and the Rust binaries are configured in
pyproject.toml.

pip builds a local directory in place, in ``build/`` here, and setuptools
never removes from ``build/lib*/`` a module deleted from the source: the next
wheel would still ship it. So ``build_py`` empties the package's build copy
before copying it.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class fresh_build_py(build_py):
    def run(self):
        shutil.rmtree(os.path.join(self.build_lib, "jobvisor"), ignore_errors=True)
        super().run()


setup(cmdclass={"build_py": fresh_build_py})
