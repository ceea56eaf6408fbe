//! CPython's own tests of `multiprocessing.Pool` and
//! `concurrent.futures.ProcessPoolExecutor`, adapted in `python/compat/`
//! (its README lists what was adapted, changed and left out), run by
//! `python3 python/compat/run.py --impl stdlib|jobvisor`:
//!
//! - `stdlib` runs them against the standard library itself (the spawn
//!   context): it validates the adaptation, and must always pass;
//! - `jobvisor` runs them against `jobvisor.Pool` / `jobvisor.Executor`,
//!   which start a private daemon from the `jobvisord` built next to the
//!   tests (`JOBVISOR_BIN_DIR`), plus the jobvisor-only tests of its
//!   deliberate differences (a crashed worker's call is retried, then raises
//!   `JobError`; the pool keeps working).
//!
//! run.py bounds itself (a test over 120 s or a run over 20 min fails it,
//! exit 3); this harness kills it anyway past `RUN_DEADLINE`.

use jobvisor::*;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Longer than run.py's own limits (--total-timeout 1200 s, plus its
/// 60 s faulthandler backstop).
const RUN_DEADLINE: Duration = Duration::from_secs(1320);

/// `<repo>/python`.
fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// Runs `run.py --impl <which>` in a scratch directory, its output in files
/// (no pipe to fill), and asserts it passed.
fn run_compat(which: &str, envs: &[(&str, String)]) {
    let dir = TempDir::new(&format!("py-compat-{which}"));
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut cmd = Command::new("python3");
    cmd.arg(python_dir().join("compat").join("run.py"))
        .args(["--impl", which, "-v"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("python3 (the CI script installs it)");
    let start = Instant::now();
    let status: Option<ExitStatus> = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > RUN_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::fs::read_to_string(&out_path).unwrap_or_default();
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    let Some(status) = status else {
        panic!("run.py --impl {which} still running after {RUN_DEADLINE:?}; killed\n{out}\n{err}");
    };
    let summary = format!("compat --impl {which}: ran ");
    assert!(
        status.success() && out.contains(&summary) && out.trim_end().ends_with(": OK"),
        "run.py --impl {which}: {status}\n{out}\n{err}"
    );
}

#[test]
fn cpythons_pool_and_executor_tests_pass_against_the_standard_library() {
    run_compat("stdlib", &[]);
}

#[test]
fn cpythons_pool_and_executor_tests_pass_against_jobvisor() {
    let jobvisord = bin("jobvisord");
    let bin_dir = jobvisord.parent().unwrap().display().to_string();
    let pythonpath = match std::env::var("PYTHONPATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", python_dir().display()),
        _ => python_dir().display().to_string(),
    };
    run_compat(
        "jobvisor",
        &[("JOBVISOR_BIN_DIR", bin_dir), ("PYTHONPATH", pythonpath)],
    );
}
