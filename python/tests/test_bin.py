"""Finding the binaries (jobvisor._bin.find) and ``python -m jobvisor``,
with stand-in executables in temporary directories."""

import os
import shutil
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import jobvisor
from jobvisor import _bin

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(jobvisor.__file__)))


def make_dir(root, name):
    path = os.path.join(root, name)
    os.mkdir(path)
    return path


def make_exe(directory, name, body="exit 0\n", mode=0o755):
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, mode)
    return path


class Find(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.scripts = make_dir(self.tmp, "scripts")
        self.exe_dir = make_dir(self.tmp, "exe")
        self.path_dir = make_dir(self.tmp, "path")
        self.pinned = make_dir(self.tmp, "pinned")
        env = mock.patch.dict(os.environ, {"PATH": self.path_dir})
        env.start()
        self.addCleanup(env.stop)
        os.environ.pop(_bin.ENV_VAR, None)
        for p in (
            mock.patch.object(_bin.sysconfig, "get_path", return_value=self.scripts),
            mock.patch.object(_bin.sys, "executable", os.path.join(self.exe_dir, "python3")),
        ):
            p.start()
            self.addCleanup(p.stop)

    def test_the_scripts_dir_comes_first_then_the_interpreter_dir_then_path(self):
        in_path = make_exe(self.path_dir, "jobvisord")
        self.assertEqual(_bin.find("jobvisord"), in_path)
        next_to_python = make_exe(self.exe_dir, "jobvisord")
        self.assertEqual(_bin.find("jobvisord"), next_to_python)
        in_scripts = make_exe(self.scripts, "jobvisord")
        self.assertEqual(_bin.find("jobvisord"), in_scripts)

    def test_the_variable_wins_and_is_made_absolute(self):
        make_exe(self.scripts, "jobvisorctl")
        pinned = make_exe(self.pinned, "jobvisorctl")
        os.environ[_bin.ENV_VAR] = os.path.relpath(self.pinned)
        self.assertEqual(_bin.find("jobvisorctl"), pinned)
        self.assertTrue(os.path.isabs(_bin.find("jobvisorctl")))

    def test_a_set_variable_without_the_binary_is_an_error_not_a_fallback(self):
        make_exe(self.scripts, "jobvisor-worker")
        os.environ[_bin.ENV_VAR] = self.pinned
        with self.assertRaises(_bin.BinaryNotFoundError) as e:
            _bin.find("jobvisor-worker")
        self.assertIn(_bin.ENV_VAR, str(e.exception))
        self.assertIn(self.pinned, str(e.exception))

    def test_non_executables_and_directories_are_skipped(self):
        make_exe(self.scripts, "jobvisord", mode=0o644)
        os.mkdir(os.path.join(self.exe_dir, "jobvisord"))
        in_path = make_exe(self.path_dir, "jobvisord")
        self.assertEqual(_bin.find("jobvisord"), in_path)

    def test_nowhere_says_how_to_get_it(self):
        make_exe(self.scripts, "jobvisorctl")  # another binary does not count
        with self.assertRaises(FileNotFoundError) as e:
            _bin.find("jobvisord")
        self.assertIsInstance(e.exception, _bin.BinaryNotFoundError)
        text = str(e.exception)
        for part in ("jobvisord", "pip install ./python", "PATH", _bin.ENV_VAR, self.scripts):
            self.assertIn(part, text)


class Main(unittest.TestCase):
    """``python -m jobvisor`` run from the source tree, its binaries pinned
    with JOBVISOR_BIN_DIR."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def run_main(self, *args):
        env = dict(os.environ, PYTHONPATH=PACKAGE_PARENT, **{_bin.ENV_VAR: self.tmp})
        return subprocess.run(
            [sys.executable, "-m", "jobvisor", *args],
            env=env,
            cwd=self.tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def test_version_names_the_package_and_the_daemon_it_found(self):
        daemon = make_exe(self.tmp, "jobvisord", 'echo "jobvisord 9.8.7"\n')
        r = self.run_main("--version")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout, f"jobvisor {jobvisor.__version__} (jobvisord 9.8.7: {daemon})\n")

    def test_version_without_a_daemon_fails_and_says_why(self):
        r = self.run_main("--version")
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stdout, f"jobvisor {jobvisor.__version__}\n")
        self.assertIn("jobvisord", r.stderr)
        self.assertIn(_bin.ENV_VAR, r.stderr)

    def test_version_with_a_failing_daemon_fails(self):
        make_exe(self.tmp, "jobvisord", 'echo broken >&2\nexit 3\n')
        r = self.run_main("--version")
        self.assertEqual(r.returncode, 1)
        self.assertIn("exited with 3", r.stderr)
        self.assertIn("broken", r.stderr)

    def test_help_says_what_it_is(self):
        r = self.run_main("--help")
        self.assertEqual(r.returncode, 0, r.stderr)
        for part in ("jobvisord", "jobvisorctl", "jobvisor-worker", "pip install ./python"):
            self.assertIn(part, r.stdout)

    def test_unknown_arguments_are_a_usage_error(self):
        r = self.run_main("--frobnicate")
        self.assertEqual(r.returncode, 2)
        self.assertIn("usage:", r.stderr)

    def test_ctl_execs_jobvisorctl_with_the_arguments(self):
        make_exe(self.tmp, "jobvisorctl", 'echo "$0|$*"\nexit 7\n')
        r = self.run_main("ctl", "--json", "status", "--help")
        self.assertEqual(r.returncode, 7, r.stderr)
        self.assertEqual(r.stdout, f"{os.path.join(self.tmp, 'jobvisorctl')}|--json status --help\n")


if __name__ == "__main__":
    unittest.main()
