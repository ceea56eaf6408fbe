//! `pip install ./python` in a fresh virtual environment installs the
//! Python package and the three binaries, which the package finds by itself
//! (tests/support/venv.rs makes the environment).

use jobvisor::venv::{installed, Venv};
use jobvisor::TempDir;
use std::path::{Path, PathBuf};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const BINARIES: [&str; 3] = ["jobvisord", "jobvisorctl", "jobvisor-worker"];

/// Runs `program args…` in `venv`'s clean environment; asserts exit 0 and
/// returns stdout.
fn run_ok(venv: &Venv, program: &Path, args: &[&str]) -> String {
    let cwd = TempDir::new("pip-cwd");
    let o = venv
        .command(program, cwd.path())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{} {args:?}: {:?}\nstdout: {stdout}\nstderr: {}",
        program.display(),
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

fn canonical(p: impl AsRef<Path>) -> PathBuf {
    let p = p.as_ref();
    p.canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn the_three_binaries_are_installed_in_the_venv_and_answer_version() {
    let venv = installed();
    eprintln!(
        "venv {:.1?}, pip install {:.1?}",
        venv.create_time, venv.install_time
    );
    for name in BINARIES {
        let path = venv.bin_dir().join(name);
        assert!(path.is_file(), "{} not installed", path.display());
        assert_eq!(
            run_ok(venv, &path, &["--version"]),
            format!("{name} {VERSION}\n")
        );
    }
}

#[test]
fn python_m_jobvisor_version_names_the_package_and_the_venvs_daemon() {
    let venv = installed();
    let out = run_ok(venv, &venv.python(), &["-m", "jobvisor", "--version"]);
    let prefix = format!("jobvisor {VERSION} (jobvisord {VERSION}: ");
    let path = out
        .strip_prefix(&prefix)
        .and_then(|rest| rest.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("{out:?} is not {prefix:?}PATH)"));
    assert_eq!(canonical(path), canonical(venv.bin_dir().join("jobvisord")));

    // `ctl` runs the venv's jobvisorctl.
    let out = run_ok(
        venv,
        &venv.python(),
        &["-m", "jobvisor", "ctl", "--version"],
    );
    assert_eq!(out, format!("jobvisorctl {VERSION}\n"));
}

#[test]
fn the_installed_package_finds_its_own_binaries() {
    let venv = installed();
    let script = "import jobvisor, jobvisor._bin as b\n\
                  print(jobvisor.__file__)\n\
                  for n in ('jobvisord', 'jobvisorctl', 'jobvisor-worker'):\n    \
                      print(b.find(n))\n";
    let out = run_ok(venv, &venv.python(), &["-c", script]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");

    // The package imported is the installed copy, with the same modules as
    // the source tree's.
    let init = canonical(lines[0]);
    assert!(init.starts_with(canonical(&venv.root)), "{out}");
    let modules = |dir: &Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".py"))
            .collect();
        names.sort();
        names
    };
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/jobvisor");
    assert_eq!(modules(init.parent().unwrap()), modules(&source));

    for (name, found) in BINARIES.iter().zip(&lines[1..]) {
        assert_eq!(canonical(found), canonical(venv.bin_dir().join(name)));
    }
}

/// The issue's first test: a new user's script, with `square` defined in
/// it, run by the venv's python after `pip install ./python` and nothing
/// else (no config, no JOBVISOR_BIN_DIR, no PYTHONPATH): Executor and Pool.
#[test]
fn a_script_in_the_venv_uses_executor_and_pool_with_nothing_to_configure() {
    let venv = installed();
    let dir = TempDir::new("pip-script");
    let script = dir.path().join("script.py");
    std::fs::write(
        &script,
        r#"
import jobvisor

def square(x):
    return x * x

if __name__ == "__main__":
    with jobvisor.Executor() as ex:
        a = list(ex.map(square, range(1000)))
    with jobvisor.Pool() as p:
        b = p.map(square, range(1000))
    assert a == b == [x * x for x in range(1000)], (a[:5], b[:5])
    print("ok", sum(a))
"#,
    )
    .expect("write the script");
    let out = run_ok(
        venv,
        &venv.python(),
        &[script.to_str().expect("utf-8 path")],
    );
    assert_eq!(
        out.trim(),
        format!("ok {}", (0..1000u64).map(|x| x * x).sum::<u64>())
    );
}
