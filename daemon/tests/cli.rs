//! Command-line contract of `jobvisord` that needs no running daemon:
//! `--check` and usage errors (`jobvisorctl`'s: `ctl/tests/cli.rs`). (Tests with a live
//! daemon are the black-box suite in the repository's `tests/`.)

use std::process::Command;

fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let o = Command::new(bin).args(args).output().expect("run");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("jobvisor-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn check_accepts_the_example_config() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../config.example.toml");
    let (code, out, err) = run(
        env!("CARGO_BIN_EXE_jobvisord"),
        &["--check", "--config", example],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok"), "{out}");
}

#[test]
fn check_refuses_a_bad_config_with_one_located_line() {
    let d = scratch("bad");
    let f = d.join("bad.toml");
    std::fs::write(&f, "[pools.echo]\ncommand = [\"x\"]\nworkers = 0\n").unwrap();
    let (code, out, err) = run(
        env!("CARGO_BIN_EXE_jobvisord"),
        &["--check", "--config", f.to_str().unwrap()],
    );
    assert_eq!(code, 2);
    assert!(out.is_empty());
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("bad.toml:3:"), "{err}");
    assert!(err.contains("pools.echo.workers"), "{err}");
}

#[test]
fn check_reports_a_missing_file() {
    let (code, _, err) = run(
        env!("CARGO_BIN_EXE_jobvisord"),
        &["--check", "--config", "/nonexistent/jobvisor.toml"],
    );
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/jobvisor.toml"), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    let (code, _, _) = run(env!("CARGO_BIN_EXE_jobvisord"), &["--bogus"]);
    assert_eq!(code, 2);
}
