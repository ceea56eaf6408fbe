//! `jobvisorctl` without a daemon: `completions SHELL` and `man DIR`,
//! generated from the parser's own definitions; usage errors; an
//! unreachable daemon.

use jobvisor::*;
use std::process::Command;

fn ctl(args: &[&str]) -> Ctl {
    let mut c = Command::new(bin("jobvisorctl"));
    // No daemon anywhere: these commands must not try to reach one.
    c.arg("--socket")
        .arg("/nonexistent/jobvisor.sock")
        .args(args);
    run_with_stdin(c, None)
}

#[test]
fn completions_load_in_bash_and_name_the_commands() {
    let r = ctl(&["completions", "bash"]);
    assert_eq!(r.code, 0, "{r:?}");
    for sub in ["status", "submit", "map", "cancel", "jobs", "completions"] {
        assert!(r.stdout.contains(sub), "{sub} missing from the bash script");
    }
    let dir = TempDir::new("completions");
    let script = dir.path().join("jobvisorctl.bash");
    std::fs::write(&script, &r.raw).unwrap();
    // bash loads it and completes a command name from a prefix.
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {}; COMP_WORDS=(jobvisorctl sta); COMP_CWORD=1; _jobvisorctl jobvisorctl sta jobvisorctl; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display()
        ))
        .output()
        .expect("bash");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(out.trim(), "status", "{out}");

    let r = ctl(&["completions", "zsh"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        r.stdout.starts_with("#compdef jobvisorctl"),
        "{}",
        &r.stdout[..40]
    );
    let r = ctl(&["completions", "fish"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("complete -c jobvisorctl"));
    let r = ctl(&["completions", "powershell"]);
    assert_eq!(r.code, 2, "{r:?}");
}

#[test]
fn man_writes_a_page_per_command() {
    let dir = TempDir::new("man");
    let out = dir.path().join("man1");
    let r = ctl(&["man", out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    let main = std::fs::read_to_string(out.join("jobvisorctl.1")).expect("jobvisorctl.1");
    assert!(main.contains(".TH jobvisorctl 1"), "{main}");
    for sub in [
        "status", "submit", "map", "wait", "result", "cancel", "jobs", "events",
    ] {
        let page = out.join(format!("jobvisorctl-{sub}.1"));
        let text =
            std::fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(text.contains(".SH NAME"), "{}", page.display());
    }
}

/// `--help` lists the exit codes (the man page too: it is made from it).
#[test]
fn help_lists_the_exit_codes() {
    let r = ctl(&["--help"]);
    assert_eq!(r.code, 0, "{r:?}");
    for code in [
        "0 ok",
        "1 a job failed",
        "2 usage",
        "3 the daemon is unreachable",
        "4 not found",
        "5 rejected",
    ] {
        assert!(r.stdout.contains(code), "{code}: {}", r.stdout);
    }
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(ctl(&["frobnicate"]).code, 2);
    assert_eq!(ctl(&["scale", "echo", "many"]).code, 2);
    let r = ctl(&["--help"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("status"), "{r:?}");
}

#[test]
fn an_unreachable_daemon_exits_3_with_one_line() {
    let dir = TempDir::new("unreachable");
    let sock = dir.path().join("nobody.sock");
    let mut c = Command::new(bin("jobvisorctl"));
    c.arg("--socket").arg(&sock).arg("status");
    let r = run_with_stdin(c, None);
    assert_eq!(r.code, 3, "{r:?}");
    assert_eq!(r.stderr.trim().lines().count(), 1, "{r:?}");
    // JOBVISOR_SOCKET is honoured too.
    let mut c = Command::new(bin("jobvisorctl"));
    c.arg("status").env("JOBVISOR_SOCKET", &sock);
    let r = run_with_stdin(c, None);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("nobody.sock"), "{r:?}");
    // With --json the error is a JSON object on stderr, exit code included;
    // a usage error too.
    for (args, code) in [(&["--json", "status"][..], 3), (&["--json", "stauts"], 2)] {
        let mut c = Command::new(bin("jobvisorctl"));
        c.arg("--socket").arg(&sock).args(args);
        let r = run_with_stdin(c, None);
        assert_eq!(r.code, code, "{r:?}");
        let v: serde_json::Value = serde_json::from_str(r.stderr.trim()).expect("JSON error");
        assert_eq!(v["exit_code"], code, "{r:?}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{r:?}");
    }
}
