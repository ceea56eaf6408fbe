//! Harness for the black-box tests in `tests/`: starts the real `jobvisord`
//! on a temporary directory, drives it with the real `jobvisorctl`, and
//! waits on conditions with deadlines (never bare sleeps).
//!
//! The binaries are found next to the test executable's `deps/` directory
//! (`target/<profile>/`); `cargo test --workspace` builds them because the
//! `daemon` and `worker` crates have integration tests of their own.

use serde_json::Value;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod pg;
pub mod users;
pub mod venv;

/// Default deadline for conditions in tests. Generous: CI machines are slow
/// and shared; a passing test never waits this long.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Directory holding the built binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a built binary, checked to exist.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not built; run the suite with `cargo test --workspace`",
        p.display()
    );
    p
}

/// Polls `f` until it returns `Some`, or panics with `what` at the deadline.
pub fn wait_for<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A process's resident set size in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// True if `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // State is the field after the parenthesised command name.
            let state = s
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Parent pid of `pid`, if it exists.
pub fn ppid(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// State letter of `pid` from /proc (R, S, Z, …).
pub fn proc_state(pid: u32) -> Option<String> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(s.rsplit(')').next()?.split_whitespace().next()?.to_string())
}

/// Every pid whose process group is `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                let fields: Vec<&str> = s
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect();
                // fields[0]=state, [1]=ppid, [2]=pgrp
                if fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid)
                    && fields.first() != Some(&"Z")
                {
                    out.push(pid);
                }
            }
        }
    }
    out
}

/// Children of `pid` (from /proc), zombies included.
pub fn children(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(c) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if ppid(c) == Some(pid) {
                out.push((c, proc_state(c).unwrap_or_default()));
            }
        }
    }
    out
}

/// Sends `sig` to `pid`.
pub fn kill(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p =
            std::env::temp_dir().join(format!("jobvisor-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Result of one `jobvisorctl` run.
pub struct Ctl {
    /// Exit code (-1 if killed).
    pub code: i32,
    /// Standard output (lossily decoded as UTF-8; see `raw`).
    pub stdout: String,
    /// Standard output, the bytes as written.
    pub raw: Vec<u8>,
    /// Standard error.
    pub stderr: String,
}

/// Like a derived `Debug`, but `raw` (the bytes `stdout` shows already)
/// only by its length.
impl std::fmt::Debug for Ctl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctl")
            .field("code", &self.code)
            .field("stdout", &self.stdout)
            .field("raw", &format_args!("{} bytes", self.raw.len()))
            .field("stderr", &self.stderr)
            .finish()
    }
}

impl Ctl {
    fn from_output(o: Output) -> Ctl {
        Ctl {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            raw: o.stdout,
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    /// Parses stdout as one JSON document.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {:?} (stderr {:?})",
                self.stdout, self.stderr
            )
        })
    }

    /// Stdout as one JSON array (a `--json` listing such as `jobs`).
    pub fn json_list(&self) -> Vec<Value> {
        match self.json() {
            Value::Array(items) => items,
            other => panic!("not a JSON array: {other}"),
        }
    }
}

/// A running `jobvisord` on a temp dir.
pub struct Daemon {
    /// The scratch directory (config, socket, state).
    pub dir: TempDir,
    /// The daemon process.
    pub child: Option<Child>,
    /// Everything the daemon wrote to stderr so far.
    pub log: Arc<Mutex<String>>,
}

/// The `[daemon]` section every test config starts with.
pub fn daemon_section() -> String {
    "[daemon]\ncontrol_socket = \"ctl.sock\"\nstate_dir = \"state\"\n".to_string()
}

impl Daemon {
    /// Writes `config` (a whole TOML document) and starts the daemon on it;
    /// waits until the control socket answers.
    pub fn start(tag: &str, config: &str) -> Daemon {
        let mut d = Daemon::prepare(tag, config);
        d.spawn();
        d
    }

    /// `jobvisorctl --json result ID`: the job's document (exit 0 or 1).
    pub fn job_doc(&self, id: u64) -> Value {
        let r = self.ctl(&["--json", "result", &id.to_string()]);
        assert!(r.code == 0 || r.code == 1, "{r:?}");
        r.json()
    }

    /// Waits until job `id` is in `state`; returns its document.
    pub fn wait_state(&self, id: u64, state: &str) -> Value {
        wait_for(&format!("job {id} to be {state}"), DEADLINE, || {
            let j = self.job_doc(id);
            (j["state"] == state).then_some(j)
        })
    }

    /// Path of the config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("jobvisor.toml")
    }

    /// Path of the control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("ctl.sock")
    }

    /// Starts (or restarts) the daemon process and waits for its socket.
    pub fn spawn(&mut self) {
        self.launch(self.command());
        let sock = self.socket();
        let pid = self.pid();
        wait_for("the control socket to answer", DEADLINE, || {
            if !alive(pid) {
                panic!("jobvisord exited early; log:\n{}", self.log_text());
            }
            let r = self.ctl(&["status"]);
            (r.code == 0 && sock.exists()).then_some(())
        });
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The daemon's log so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Runs `jobvisorctl --socket … ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Ctl {
        self.ctl_stdin(args, None)
    }

    /// Runs `jobvisorctl` with `stdin` as its standard input.
    pub fn ctl_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Ctl {
        let mut cmd = Command::new(bin("jobvisorctl"));
        cmd.arg("--socket").arg(self.socket()).args(args);
        run_with_stdin(cmd, stdin)
    }

    /// `jobvisorctl submit ARGS…`, which must succeed: the job id.
    pub fn submit_id(&self, args: &[&str]) -> u64 {
        let mut full = vec!["submit"];
        full.extend_from_slice(args);
        let r = self.ctl(&full);
        assert_eq!(r.code, 0, "{r:?}");
        r.stdout
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("not an id: {r:?}"))
    }

    /// `jobvisorctl submit POOL --input-file FILE --wait`: the job's output
    /// in `raw`.
    pub fn submit_file_wait(&self, pool: &str, file: &Path) -> Ctl {
        let file = file.to_str().expect("a UTF-8 path");
        self.ctl(&["submit", pool, "--input-file", file, "--wait"])
    }

    /// Starts a long job in pool `slow` (a `sleep` test worker) that holds
    /// key `k` and waits until it runs: jobs submitted with `--key k` then
    /// stay queued. Returns its id.
    pub fn hold_key_k(&self) -> u64 {
        let blocker = self.submit_id(&["slow", "--key", "k", "--input", "600000"]);
        wait_for("the blocker to run", DEADLINE, || {
            (self.pool("slow")["running"] == 1).then_some(())
        });
        blocker
    }

    /// Writes `data` to a file in the daemon's directory, submits it to
    /// `pool` with `--input-file … --wait` and asserts that the job
    /// succeeded with `data` back, bit-exact.
    pub fn assert_echo_round_trip(&self, pool: &str, data: &[u8]) {
        let f = self.dir.path().join(format!("round-trip-{}", data.len()));
        std::fs::write(&f, data).expect("write the input file");
        let r = self.submit_file_wait(pool, &f);
        assert_eq!(r.code, 0, "{} bytes to {pool}: {}", data.len(), r.stderr);
        assert!(
            r.raw == data,
            "{} bytes to {pool}: output differs ({} bytes)",
            data.len(),
            r.raw.len()
        );
        let _ = std::fs::remove_file(&f);
    }

    /// `status --json` as JSON.
    pub fn status(&self) -> Value {
        let r = self.ctl(&["--json", "status"]);
        assert_eq!(r.code, 0, "status failed: {r:?}");
        r.json()
    }

    /// The pool named `name` from `status --json`.
    pub fn pool(&self, name: &str) -> Value {
        self.status()["pools"]
            .as_array()
            .expect("pools")
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no pool {name} in status"))
    }

    /// Waits until every worker of `pool` is `ready`; returns their pids
    /// in slot order.
    pub fn wait_ready(&self, pool: &str, n: usize) -> Vec<u32> {
        wait_for(
            &format!("{n} ready workers in pool {pool}"),
            DEADLINE,
            || {
                let p = self.pool(pool);
                let ws = p["workers"].as_array()?.clone();
                (ws.len() == n && ws.iter().all(|w| w["state"] == "ready")).then(|| {
                    ws.iter()
                        .map(|w| w["pid"].as_u64().unwrap() as u32)
                        .collect()
                })
            },
        )
    }

    /// Rewrites the config file.
    pub fn write_config(&self, config: &str) {
        std::fs::write(self.config_path(), config).expect("write config");
    }

    /// Waits for the daemon to exit and returns its status.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        wait_for("jobvisord to exit", deadline, || {
            child.try_wait().ok().flatten()
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!("---- jobvisord log ----\n{}", self.log_text());
        }
    }
}

/// Runs a command with optional stdin bytes, returning its output.
pub fn run_with_stdin(mut cmd: Command, stdin: Option<&[u8]>) -> Ctl {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    if let Some(data) = stdin {
        let mut w = child.stdin.take().expect("stdin");
        let data = data.to_vec();
        std::thread::spawn(move || {
            use std::io::Write;
            let _ = w.write_all(&data);
        });
    }
    // Bounded: a command that never returns (say, a `restart` waiting for
    // a pool that never gets ready) fails the test instead of hanging it.
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(CTL_DEADLINE)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            return true;
        }
        false
    });
    let output = child.wait_with_output().expect("wait");
    let _ = done_tx.send(());
    if watchdog.join().unwrap_or(false) {
        panic!(
            "the command did not finish within {CTL_DEADLINE:?} (killed); stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ctl::from_output(output)
}

/// How long one command run by [`run_with_stdin`] may take.
pub const CTL_DEADLINE: Duration = Duration::from_secs(300);

/// `n` pseudo-random bytes (xorshift seeded by `n`, so the same `n` always
/// gives the same bytes); binary, not UTF-8.
pub fn pattern(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678 ^ n as u32;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// `sha256sum`'s hex digest of `file`.
pub fn sha256sum(file: &Path) -> String {
    let sum = Command::new("sha256sum").arg(file).output().unwrap();
    String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Writes an executable shell script `name` into `dir`; returns its path.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

/// The `jobvisor-worker` binary as a TOML string literal.
pub fn worker_bin() -> String {
    format!("{:?}", bin("jobvisor-worker").display().to_string())
}

/// The `jobvisor-test-worker` binary (tests/support/bin) as a TOML string
/// literal.
pub fn test_worker() -> String {
    format!("{:?}", bin("jobvisor-test-worker").display().to_string())
}

/// A whole config with one pool `s` of `workers` test workers in `sleep`
/// mode (each job's input is a number of ms to sleep), plus `extra` keys.
pub fn sleep_pool(workers: u32, extra: &str) -> String {
    format!(
        "{}[pools.s]\ncommand = [{}, \"sleep\"]\nworkers = {workers}\n{extra}\n",
        daemon_section(),
        test_worker()
    )
}

/// A whole config with a pool `echo` of `echo_workers` test workers in
/// `echo` mode and a pool `fail` of one in `fail` mode (each job fails
/// with its input as error), plus `fail_extra` keys for `fail`.
pub fn echo_fail_pools(echo_workers: u32, fail_extra: &str) -> String {
    format!(
        "{}[pools.echo]\ncommand = [{w}, \"echo\"]\nworkers = {echo_workers}\n\
         [pools.fail]\ncommand = [{w}, \"fail\"]\nworkers = 1\n{fail_extra}",
        daemon_section(),
        w = test_worker()
    )
}

// ---- systemd integration (tests/systemd.rs) ----

/// A fake systemd notification socket: a datagram socket bound in a test
/// directory, to pass to `jobvisord` as `NOTIFY_SOCKET`.
pub struct NotifySocket {
    sock: std::os::unix::net::UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    /// Binds `notify.sock` in `dir`.
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).expect("bind notify socket");
        NotifySocket { sock, path }
    }

    /// The socket's path (the value for `NOTIFY_SOCKET`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next datagram, if one arrives within `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<String> {
        let timeout = timeout.max(Duration::from_millis(1));
        self.sock.set_read_timeout(Some(timeout)).expect("timeout");
        let mut buf = vec![0u8; 64 * 1024];
        match self.sock.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                None
            }
            Err(e) => panic!("recv on the notify socket: {e}"),
        }
    }

    /// Reads datagrams until one satisfies `pred`; returns every datagram
    /// read, the matching one last. Panics with `what` at the deadline.
    pub fn until(
        &self,
        what: &str,
        deadline: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let end = Instant::now() + deadline;
        let mut seen = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("timed out after {deadline:?} waiting for {what}; got {seen:?}");
            }
            if let Some(m) = self.recv(left) {
                let done = pred(&m);
                seen.push(m);
                if done {
                    return seen;
                }
            }
        }
    }

    /// Every datagram arriving within `window` (stops reading at its end).
    pub fn collect(&self, window: Duration) -> Vec<(Instant, String)> {
        let end = Instant::now() + window;
        let mut out = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return out;
            }
            if let Some(m) = self.recv(left) {
                out.push((Instant::now(), m));
            }
        }
    }
}

/// The value of `KEY=` in a notification datagram, if present.
pub fn notify_field<'a>(msg: &'a str, key: &str) -> Option<&'a str> {
    msg.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

impl Daemon {
    /// Writes `config` into a fresh directory without starting the daemon
    /// (see [`Daemon::launch`]).
    pub fn prepare(tag: &str, config: &str) -> Daemon {
        let dir = TempDir::new(tag);
        std::fs::write(dir.path().join("jobvisor.toml"), config).expect("write config");
        Daemon {
            dir,
            child: None,
            log: Arc::new(Mutex::new(String::new())),
        }
    }

    /// `jobvisord --config …` with debug logging and no inherited systemd
    /// variables, for a test to adjust and pass to [`Daemon::launch`].
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(bin("jobvisord"));
        cmd.arg("--config").arg(self.config_path());
        for k in [
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "JOURNAL_STREAM",
        ] {
            cmd.env_remove(k);
        }
        cmd.env("JOBVISOR_LOG", "debug");
        cmd
    }

    /// Starts `cmd` as this test's daemon, capturing its stderr into the
    /// log; waits for nothing.
    pub fn launch(&mut self, mut cmd: Command) {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn jobvisord");
        let mut err = child.stderr.take().expect("stderr");
        let log = self.log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match err.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => log
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
        });
        self.child = Some(child);
    }
}

/// Runs `jobvisorctl --socket SOCKET ARGS`.
pub fn ctl_at(socket: &Path, args: &[&str]) -> Ctl {
    let mut cmd = Command::new(bin("jobvisorctl"));
    cmd.arg("--socket").arg(socket).args(args);
    run_with_stdin(cmd, None)
}

/// Sets the descriptor limit (soft and hard) of `cmd`'s process before it
/// execs.
pub fn limit_nofile(cmd: &mut Command, n: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: runs in the forked child before exec; setrlimit is
    // async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sets the umask of `cmd`'s process before it execs.
pub fn with_umask(cmd: &mut Command, mask: u32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: runs in the forked child before exec; umask is
    // async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(mask);
            Ok(())
        });
    }
}

/// Starts jobvisord the way systemd does for a socket unit: `fd` as fd 3,
/// `LISTEN_FDS=1`, `LISTEN_FDNAMES=name`, and `LISTEN_PID` = the daemon's
/// own pid. That pid is unknown before the fork, and the environment cannot
/// be changed between fork and exec (`setenv` is not async-signal-safe, and
/// std has built `envp` already), so `sh` sets it: `$$` is the shell's pid,
/// which `exec` hands on to jobvisord. `fd` must stay open until spawned.
pub fn socket_activated(config: &Path, fd: std::os::fd::RawFd, name: &str) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#)
        .arg(bin("jobvisord"))
        .arg("--config")
        .arg(config)
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", name)
        .env("JOBVISOR_LOG", "debug")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_PID");
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls dup2/fcntl (async-signal-safe) on integers; the caller keeps
    // `fd` open in the parent for the whole spawn, so it is valid in the
    // child.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 clears close-on-exec on the copy; a descriptor that is
            // already fd 3 needs the flag cleared by hand.
            let rc = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}
