//! A table of bad configurations: each is refused by `jobvisord --check`
//! (exit 2) and by `jobvisorctl reload` (exit 2, old config kept), with one
//! line naming `file:line:col` and the key.

use jobvisor::*;

/// (name, config text, expected line, expected key path in the message)
fn cases() -> Vec<(&'static str, String, u32, &'static str)> {
    let head = "[daemon]\ncontrol_socket = \"ctl.sock\"\nstate_dir = \"state\"\n";
    let pool = |body: &str| {
        format!("{head}[pools.echo]\ncommand = [\"jobvisor-worker\", \"echo\"]\n{body}\n")
    };
    vec![
        ("unknown top-level key", format!("{head}colour = \"blue\"\n"), 4, "colour"),
        ("unknown daemon key", "[daemon]\ncontrol_socket = \"ctl.sock\"\nstate_dir = \"state\"\nsocket_mod = \"0600\"\n".into(), 4, "daemon.socket_mod"),
        ("unknown pool key", pool("timout = \"5s\""), 6, "pools.echo.timout"),
        ("store.notify not a boolean", format!("{head}[store]\nnotify = \"off\"\n"), 5, "store.notify"),
        ("store.node_timeout too short", format!("{head}[store]\nnode_timeout = \"1s\"\n"), 5, "store.node_timeout"),
        ("store.xmin_warning of zero", format!("{head}[store]\nxmin_warning = \"0s\"\n"), 5, "store.xmin_warning"),
        ("workers = 0", pool("workers = 0"), 6, "pools.echo.workers"),
        ("workers as string", pool("workers = \"two\""), 6, "pools.echo.workers"),
        ("negative workers", pool("workers = -1"), 6, "pools.echo.workers"),
        ("bad duration", pool("timeout = \"30 parsecs\""), 6, "pools.echo.timeout"),
        ("duration as number", pool("stop_timeout = 30"), 6, "pools.echo.stop_timeout"),
        ("bad size", pool("max_memory = \"512 potatoes\""), 6, "pools.echo.max_memory"),
        ("bad shm size", pool("shm_size = \"-5MiB\""), 6, "pools.echo.shm_size"),
        ("empty command", format!("{head}[pools.echo]\ncommand = []\n"), 5, "pools.echo.command"),
        ("command with empty program", format!("{head}[pools.echo]\ncommand = [\"\"]\n"), 5, "pools.echo.command"),
        ("command as string", format!("{head}[pools.echo]\ncommand = \"jobvisor-worker echo\"\n"), 5, "pools.echo.command"),
        ("missing command", format!("{head}[pools.echo]\nworkers = 2\n"), 4, "pools.echo: missing required key `command`"),
        ("unknown semaphore", pool("semaphores = [\"gpu\"]"), 6, "pools.echo.semaphores"),
        ("duplicate semaphore in a pool", format!("{head}[semaphores]\ngpu = 2\n[pools.echo]\ncommand = [\"w\"]\nsemaphores = [\"gpu\", \"gpu\"]\n"), 8, "pools.echo.semaphores"),
        ("semaphore of zero", format!("{head}[semaphores]\ngpu = 0\n"), 5, "semaphores.gpu"),
        ("socket_mode not octal", "[daemon]\ncontrol_socket = \"ctl.sock\"\nstate_dir = \"state\"\nsocket_mode = \"rw\"\n".into(), 4, "daemon.socket_mode"),
        ("socket_mode too big", "[daemon]\ncontrol_socket = \"ctl.sock\"\nstate_dir = \"state\"\nsocket_mode = \"1777\"\n".into(), 4, "daemon.socket_mode"),
        ("payload_dir not a string", "[daemon]\ncontrol_socket = \"ctl.sock\"\nstate_dir = \"state\"\npayload_dir = 5\n".into(), 4, "daemon.payload_dir"),
        ("max_attempts = 0", pool("max_attempts = 0"), 6, "pools.echo.max_attempts"),
        ("prefetch = 0", pool("prefetch = 0"), 6, "pools.echo.prefetch"),
        ("backoff_max below backoff_initial", pool("backoff_initial = \"10s\"\nbackoff_max = \"1s\""), 7, "pools.echo.backoff_max"),
        ("inline_limit above shm_size", pool("shm_size = \"1MiB\"\ninline_limit = \"2MiB\""), 7, "pools.echo.inline_limit"),
        ("bad stop_signal", pool("stop_signal = \"SIGFOO\""), 6, "pools.echo.stop_signal"),
        ("env value not a string", pool("env = { DEBUG = 1 }"), 6, "pools.echo.env.DEBUG"),
        ("bad pool name", format!("{head}[pools.\"my pool\"]\ncommand = [\"w\"]\n"), 4, "pools"),
        ("TOML syntax error", format!("{head}[pools.echo\ncommand = [\"w\"]\n"), 4, ""),
        ("pools not a table", format!("{head}pools = 3\n"), 4, "pools"),
    ]
}

#[test]
fn check_refuses_every_bad_config_with_location_and_key() {
    let dir = TempDir::new("badcfg");
    let cases = cases();
    assert!(cases.len() >= 15);
    for (name, text, line, key) in cases {
        let f = dir.path().join("jobvisor.toml");
        std::fs::write(&f, &text).unwrap();
        let mut c = std::process::Command::new(bin("jobvisord"));
        c.arg("--check").arg("--config").arg(&f);
        let r = run_with_stdin(c, None);
        assert_eq!(r.code, 2, "{name}: {r:?}");
        let err = r.stderr.trim();
        assert_eq!(err.lines().count(), 1, "{name}: not one line: {err}");
        let loc = format!("jobvisor.toml:{line}:");
        assert!(err.contains(&loc), "{name}: expected {loc} in: {err}");
        // line:col:, both numbers.
        let after = &err[err.find(&loc).unwrap() + loc.len()..];
        let col: String = after.chars().take_while(|c| c.is_ascii_digit()).collect();
        assert!(
            !col.is_empty() && after[col.len()..].starts_with(':'),
            "{name}: no column in {err}"
        );
        assert!(err.contains(key), "{name}: expected key {key} in: {err}");
    }
}

#[test]
fn reload_refuses_every_bad_config_and_keeps_running() {
    let good = format!(
        "{}[pools.echo]\ncommand = [{}, \"echo\"]\nworkers = 1\n",
        daemon_section(),
        worker_bin()
    );
    let d = Daemon::start("badreload-table", &good);
    let pid = d.wait_ready("echo", 1)[0];
    for (name, text, line, key) in cases() {
        d.write_config(&text);
        let r = d.ctl(&["reload"]);
        assert_eq!(r.code, 2, "{name}: {r:?}");
        let err = r.stderr.trim();
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        assert!(
            err.contains(&format!("jobvisor.toml:{line}:")),
            "{name}: {err}"
        );
        assert!(err.contains(key), "{name}: {err}");
        assert!(err.contains("old configuration kept"), "{name}: {err}");
    }
    assert_eq!(d.wait_ready("echo", 1), vec![pid]);
}

/// After a refused reload the file on disk is invalid, but the daemon runs
/// on: `jobvisorctl --config FILE` reads only the socket's path from it and
/// still reaches the daemon. A syntax error (the socket's path cannot be
/// read at all) is still a usage error.
#[test]
fn the_cli_reads_only_the_socket_path_from_a_config_the_daemon_refused() {
    let good = format!(
        "{}[pools.echo]\ncommand = [{}, \"echo\"]\nworkers = 1\n",
        daemon_section(),
        worker_bin()
    );
    let d = Daemon::start("cli-socket-only", &good);
    d.wait_ready("echo", 1);
    let ctl = |args: &[&str]| {
        let mut c = std::process::Command::new(bin("jobvisorctl"));
        c.arg("--config").arg(d.config_path()).args(args);
        c.env_remove("JOBVISOR_SOCKET");
        run_with_stdin(c, None)
    };
    d.write_config(&good.replace("workers = 1", "workers = 0"));
    let r = ctl(&["reload"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("workers"), "{r:?}");
    let r = ctl(&["status"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("pool echo: running"), "{r:?}");
    let r = ctl(&["submit", "echo", "--input", "still here", "--wait"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "still here"), "{r:?}");

    d.write_config("[daemon\ncontrol_socket = \"ctl.sock\"\n");
    let r = ctl(&["status"]);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("jobvisor.toml:1:"), "{r:?}");
}

/// SIGHUP: a refused reload is logged once, at warn (so that
/// `journalctl -p warning` shows it); a successful one once, at info.
#[test]
fn a_sighup_reload_is_logged_once_and_a_refused_one_at_warn() {
    let good = format!(
        "{}[pools.echo]\ncommand = [{}, \"echo\"]\nworkers = 1\n",
        daemon_section(),
        worker_bin()
    );
    let d = Daemon::start("sighup-log", &good);
    d.wait_ready("echo", 1);
    let hup = || {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(d.pid() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("SIGHUP")
    };
    d.write_config(&good.replace("workers = 1", "workers = 0"));
    hup();
    wait_for("the refused reload's log line", DEADLINE, || {
        d.log_text()
            .contains("old configuration kept")
            .then_some(())
    });
    let log = d.log_text();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("old configuration kept"))
        .collect();
    assert_eq!(refused.len(), 1, "{log}");
    assert!(
        refused[0].starts_with("jobvisord: warn: reload: new configuration rejected"),
        "{log}"
    );

    d.write_config(&good.replace("workers = 1", "workers = 2"));
    hup();
    d.wait_ready("echo", 2);
    let log = d.log_text();
    assert_eq!(log.matches("reloaded: ").count(), 1, "{log}");
}
