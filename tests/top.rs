//! `jobvisorctl top` in a real terminal (tmux): its first screen shows the
//! pools and their workers, it follows changes, `q` quits and gives the
//! terminal back; piped, it prints one snapshot.

use jobvisor::*;
use std::process::Command;

/// A tmux server of its own (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(tag: &str) -> Tmux {
        let t = Tmux {
            socket: format!("jobvisor-test-{tag}-{}", std::process::id()),
        };
        let probe = Command::new("tmux").arg("-V").output();
        assert!(
            probe.is_ok_and(|o| o.status.success()),
            "tmux is needed for this test (apt-get install tmux; .ci/run installs it)"
        );
        t
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket]);
        c
    }

    fn run(&self, args: &[&str]) -> String {
        let o = self.cmd().args(args).output().expect("tmux");
        assert!(o.status.success(), "tmux {args:?}: {o:?}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// A 120×40 session `top` running `shell`.
    fn session(&self, shell: &str) {
        let size = ["-x", "120", "-y", "40", "-e", "TERM=xterm"];
        let mut args = vec!["new-session", "-d", "-s", "top"];
        args.extend(size);
        args.push(shell);
        self.run(&args);
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "top"])
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").output();
    }
}

#[test]
fn top_shows_the_pools_follows_them_and_quits_on_q() {
    let d = Daemon::start("top", &echo_fail_pools(2, ""));
    d.wait_ready("echo", 2);
    d.wait_ready("fail", 1);
    let tmux = Tmux::new("top");
    let shell = format!(
        "{} --socket {} top --interval 300ms; echo TOP-EXITED $?; sleep 60",
        bin("jobvisorctl").display(),
        d.socket().display()
    );
    tmux.session(&shell);
    let pids: Vec<String> = d.pool("echo")["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].to_string())
        .collect();
    let first = wait_for("top's first screen", DEADLINE, || {
        let s = tmux.screen();
        (s.contains("echo  running  workers 2/2") && s.contains("fail  running  workers 1/1"))
            .then_some(s)
    });
    assert!(first.starts_with("jobvisord pid "), "{first}");
    for pid in &pids {
        assert!(
            first.contains(pid.as_str()),
            "worker pid {pid} not shown: {first}"
        );
    }
    // It follows: a finished job shows up.
    assert_eq!(d.ctl(&["submit", "echo", "--input", "x", "--wait"]).code, 0);
    wait_for("top to show the job", DEADLINE, || {
        tmux.screen().contains("succeeded 1").then_some(())
    });
    // A paused pool shows as such.
    assert_eq!(d.ctl(&["pause", "fail"]).code, 0);
    wait_for("top to show the pause", DEADLINE, || {
        tmux.screen().contains("fail  paused").then_some(())
    });
    tmux.run(&["send-keys", "-t", "top", "q"]);
    let after = wait_for("top to quit", DEADLINE, || {
        let s = tmux.screen();
        s.contains("TOP-EXITED 0").then_some(s)
    });
    // The alternate screen is gone: the shell's screen is back.
    assert!(!after.contains("echo  running"), "{after}");

    // The daemon going away ends it too: the terminal back, one line, exit 3.
    tmux.run(&["kill-session", "-t", "top"]);
    tmux.session(&shell);
    wait_for("top's screen again", DEADLINE, || {
        tmux.screen().contains("echo  running").then_some(())
    });
    assert_eq!(d.ctl(&["shutdown"]).code, 0);
    let after = wait_for("top to end with the daemon", DEADLINE, || {
        let s = tmux.screen();
        s.contains("TOP-EXITED 3").then_some(s)
    });
    assert!(after.contains("jobvisorctl: top: "), "{after}");
    assert!(!after.contains("echo  running"), "{after}");
}

#[test]
fn top_piped_prints_one_snapshot() {
    let d = Daemon::start("top-piped", &echo_fail_pools(1, ""));
    d.wait_ready("echo", 1);
    let r = d.ctl(&["top", "--interval", "100ms"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("echo  running  workers 1/1"), "{r:?}");
    assert!(!r.stdout.contains('\x1b'), "no escapes when piped: {r:?}");
    let r = d.ctl(&["top", "--interval", "soon"]);
    assert_eq!(r.code, 2, "{r:?}");
    // The daemon gone: exit 3.
    assert_eq!(d.ctl(&["shutdown"]).code, 0);
    let r = d.ctl(&["top"]);
    assert_eq!(r.code, 3, "{r:?}");
}
