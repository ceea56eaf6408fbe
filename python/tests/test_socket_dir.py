"""The default control socket's directory is checked before any connection
(a fake daemon in a directory someone else controls would get the
descriptors of the files we submit): it must be the user's own and 0700
(root: root's, not writable by others)."""

import os
import shutil
import tempfile
import unittest
from unittest import mock

from jobvisor import client


class DefaultSocketDir(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.run_dir = os.path.join(self.tmp, "run")
        patcher = mock.patch.dict(os.environ, {"XDG_RUNTIME_DIR": self.tmp})
        patcher.start()
        self.addCleanup(patcher.stop)
        os.environ.pop("RUNTIME_DIRECTORY", None)

    def default(self):
        with mock.patch.object(client, "_runtime_dir", return_value=self.run_dir):
            return client.default_socket()

    def test_missing_directory_is_just_the_path(self):
        self.assertEqual(self.default(), os.path.join(self.run_dir, "jobvisor.sock"))

    def test_own_0700_directory_is_accepted(self):
        os.mkdir(self.run_dir, 0o700)
        os.chmod(self.run_dir, 0o700)
        self.assertEqual(self.default(), os.path.join(self.run_dir, "jobvisor.sock"))

    def test_a_directory_others_may_enter_or_write_is_refused(self):
        os.mkdir(self.run_dir)
        os.chmod(self.run_dir, 0o777)
        with self.assertRaises(client.Error) as e:
            self.default()
        self.assertIn("refusing to use the default socket directory", str(e.exception))
        self.assertIn("0777", str(e.exception))

    def test_a_symbolic_link_is_refused(self):
        real = os.path.join(self.tmp, "real")
        os.mkdir(real, 0o700)
        os.symlink(real, self.run_dir)
        with self.assertRaises(client.Error) as e:
            self.default()
        self.assertIn("symbolic link", str(e.exception))


if __name__ == "__main__":
    unittest.main()
