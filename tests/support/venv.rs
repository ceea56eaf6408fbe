//! A Python virtual environment with `pip install ./python` done in it, as a
//! user would: the `jobvisor` package and the three binaries built by the
//! package's build backend (setuptools-rust), not by this test run's cargo.
//!
//! Made once per test binary ([`installed`]): `python3 -m venv --clear` at
//! `<target>/pip-venv`, then `pip install ./python` from the repository root
//! with `CARGO_TARGET_DIR=<target>/pip` (its own build directory, so later
//! runs are incremental) and `SETUPTOOLS_RUST_CARGO_PROFILE=dev` (a debug
//! build, faster than the release build users get). pip fetches the build
//! requirements (setuptools, setuptools-rust) from PyPI: without it the
//! install fails, and so does every test that uses it.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

/// The installed environment.
pub struct Venv {
    /// Its root (`python3 -m venv ROOT`).
    pub root: PathBuf,
    /// How long `python3 -m venv` took.
    pub create_time: Duration,
    /// How long `pip install ./python` took (cargo included).
    pub install_time: Duration,
    /// Held while this process lives: another test process of the same
    /// checkout waits instead of clearing the environment under us.
    _lock: Flock<File>,
}

impl Venv {
    /// Its `bin/` (the scripts directory, where the binaries are installed).
    pub fn bin_dir(&self) -> PathBuf {
        self.root.join("bin")
    }

    /// Its interpreter.
    pub fn python(&self) -> PathBuf {
        self.bin_dir().join("python")
    }

    /// A command running `program` (a path) with an environment that finds
    /// nothing of the checkout by accident: no `PYTHONPATH`,
    /// `JOBVISOR_BIN_DIR`, `JOBVISOR_SOCKET`; `PATH` only the system's; the
    /// current directory a fresh one outside the repository, so that
    /// `import jobvisor` is the installed package.
    pub fn command(&self, program: &Path, cwd: &Path) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(cwd)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env_remove("PYTHONPATH")
            .env_remove("PYTHONHOME")
            .env_remove("JOBVISOR_BIN_DIR")
            .env_remove("JOBVISOR_SOCKET")
            .env_remove("VIRTUAL_ENV");
        cmd
    }
}

/// The environment, made on first use in this process.
pub fn installed() -> &'static Venv {
    static VENV: OnceLock<Venv> = OnceLock::new();
    VENV.get_or_init(install)
}

/// The workspace's target directory (the parent of `target/<profile>`).
fn target_dir() -> PathBuf {
    crate::bin_dir()
        .parent()
        .expect("target/<profile> has a parent")
        .to_path_buf()
}

fn install() -> Venv {
    let target = target_dir();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = target.join("pip-venv");
    let cargo_target = target.join("pip");
    std::fs::create_dir_all(&cargo_target).expect("create target/pip");
    let lock_file = File::create(target.join("pip-venv.lock")).expect("create pip-venv.lock");
    let lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("flock pip-venv.lock: {e}"));

    let start = Instant::now();
    let o = Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&root)
        .output()
        .expect("python3 (the CI script installs it)");
    assert!(
        o.status.success(),
        "python3 -m venv failed (on Debian's python3 it needs the python3-venv package, \
         which .ci/run installs): {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let create_time = start.elapsed();

    let start = Instant::now();
    let o = Command::new(root.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "./python",
        ])
        .current_dir(repo)
        .env("CARGO_TARGET_DIR", &cargo_target)
        .env("SETUPTOOLS_RUST_CARGO_PROFILE", "dev")
        .env_remove("PYTHONPATH")
        .env_remove("JOBVISOR_BIN_DIR")
        .output()
        .expect("run the venv's pip");
    let install_time = start.elapsed();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    if !o.status.success() {
        let offline = [
            "Could not find a version that satisfies the requirement",
            "NewConnectionError",
            "Temporary failure in name resolution",
            "Network is unreachable",
            "ProxyError",
        ]
        .iter()
        .any(|s| out.contains(s));
        if offline {
            panic!(
                "pip install ./python could not fetch its build requirements \
                 (setuptools, setuptools-rust) from PyPI; this test needs PyPI:\n{out}"
            );
        }
        panic!("pip install ./python failed:\n{out}");
    }
    eprintln!(
        "support::venv: python3 -m venv {:.1?}, pip install ./python {:.1?} \
         (CARGO_TARGET_DIR={})",
        create_time,
        install_time,
        cargo_target.display()
    );
    Venv {
        root,
        create_time,
        install_time,
        _lock: lock,
    }
}
