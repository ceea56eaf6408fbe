//! The default socket directory of a non-root user (`/tmp/jobvisor-$UID`
//! without `XDG_RUNTIME_DIR`) under a hostile local user, who creates it
//! first, world-writable, with a fake daemon in it: `jobvisorctl`, the Python
//! client and `jobvisord` all refuse it (as tmux and ssh-agent do), and the
//! fake daemon never gets a connection, let alone a descriptor of the
//! victim's file. Run as throwaway users; root only.

use jobvisor::users::{need_root, TestUser};
use jobvisor::*;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

/// `/tmp/jobvisor-<uid>`, the default socket directory of `user` (removed
/// on drop).
struct DefaultDir(PathBuf);

impl DefaultDir {
    fn of(user: &TestUser) -> DefaultDir {
        let d = PathBuf::from(format!("/tmp/jobvisor-{}", user.uid));
        let _ = std::fs::remove_dir_all(&d);
        DefaultDir(d)
    }
}

impl Drop for DefaultDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The attacker's fake daemon at `sock`: prints `listening`, then one line
/// per connection it accepts.
fn fake_daemon(attacker: &TestUser, sock: &Path) -> (Child, BufReader<std::process::ChildStdout>) {
    let script = format!(
        r#"
import os, socket, sys
d = os.path.dirname({sock:?})
os.makedirs(d, exist_ok=True)
os.chmod(d, 0o777)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind({sock:?})
os.chmod({sock:?}, 0o777)
s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    print("connected", flush=True)
    c.close()
"#,
        sock = sock.to_str().unwrap()
    );
    let mut child = attacker
        .command("python3")
        .arg("-c")
        .arg(script)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    (child, out)
}

/// `user`'s `jobvisorctl status` on the default socket answers.
fn ctl_works(user: &TestUser) -> bool {
    let mut cmd = user.command(bin("jobvisorctl"));
    cmd.env_remove("JOBVISOR_CONFIG").arg("status");
    run_with_stdin(cmd, None).code == 0
}

/// A config without `control_socket` (the default socket), readable by
/// `user`.
fn default_config(dir: &Path, user: &TestUser) -> PathBuf {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    user.chown(dir);
    user.chown(&state);
    let cfg = dir.join("jobvisor.toml");
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\nstate_dir = \"state\"\n[pools.echo]\ncommand = [{}, \"echo\"]\nworkers = 1\n",
            worker_bin()
        ),
    )
    .unwrap();
    user.chown(&cfg);
    cfg
}

/// The victim's `jobvisorctl submit --input-file SECRET` and the Python
/// client refuse the default directory another user made; the fake daemon
/// in it is never contacted.
#[test]
fn clients_refuse_a_default_socket_directory_someone_else_made() {
    if !need_root("clients_refuse_a_default_socket_directory_someone_else_made") {
        return;
    }
    let victim = TestUser::create();
    let attacker = TestUser::create();
    let dd = DefaultDir::of(&victim);
    let (mut fake, mut out) = fake_daemon(&attacker, &dd.0.join("jobvisor.sock"));
    let work = TempDir::new("sec-sock-victim");
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = default_config(work.path(), &victim);
    let secret = work.path().join("secret");
    std::fs::write(&secret, vec![b's'; 2 << 20]).unwrap();
    victim.chown(&secret);
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();

    // jobvisorctl, with no config at all and with one that names no socket.
    for with_config in [false, true] {
        let mut cmd = victim.command(bin("jobvisorctl"));
        if with_config {
            cmd.env("JOBVISOR_CONFIG", &cfg);
        } else {
            cmd.env_remove("JOBVISOR_CONFIG");
        }
        cmd.args(["submit", "echo", "--input-file", secret.to_str().unwrap()]);
        let r = run_with_stdin(cmd, None);
        assert_eq!(r.code, 3, "config {with_config}: {r:?}");
        let line = r.stderr.trim();
        assert_eq!(line.lines().count(), 1, "{line}");
        assert!(
            line.contains(dd.0.to_str().unwrap())
                && line.contains(&format!("owner uid {} ({})", attacker.uid, attacker.name))
                && line.contains("0777"),
            "{line}"
        );
    }
    // The Python client.
    let mut py = victim.command("python3");
    py.env("PYTHONPATH", Path::new(env!("CARGO_MANIFEST_DIR")).join("python"))
        .env("JOBVISOR_CONFIG", &cfg)
        .args([
            "-c",
            "import jobvisor, sys\ntry:\n    jobvisor.Client()\nexcept jobvisor.Error as e:\n    print('refused:', e)\n    sys.exit(3)\nprint('connected')",
        ]);
    let r = run_with_stdin(py, None);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        r.stdout
            .contains("refusing to use the default socket directory"),
        "{r:?}"
    );
    // Nobody knocked at the fake daemon's door.
    fake.kill().unwrap();
    fake.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(
        !rest.contains("connected"),
        "the fake daemon was reached: {rest}"
    );
}

/// A non-root daemon refuses a default socket directory someone else made;
/// once it is gone, the daemon creates it 0700 (whatever the umask) and its
/// user's `jobvisorctl` works with no flag at all.
#[test]
fn the_daemon_refuses_a_default_socket_directory_someone_else_made() {
    if !need_root("the_daemon_refuses_a_default_socket_directory_someone_else_made") {
        return;
    }
    let victim = TestUser::create();
    let attacker = TestUser::create();
    let dd = DefaultDir::of(&victim);
    let (mut fake, _out) = fake_daemon(&attacker, &dd.0.join("jobvisor.sock"));
    fake.kill().unwrap();
    fake.wait().unwrap();
    let work = TempDir::new("sec-sock-daemon");
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = default_config(work.path(), &victim);
    let daemon = |umask: u32| {
        let mut cmd = victim.command(bin("jobvisord"));
        cmd.arg("--config").arg(&cfg).env("JOBVISOR_LOG", "debug");
        with_umask(&mut cmd, umask);
        cmd
    };
    let mut first = daemon(0o022)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("jobvisord");
    let exited = wait_for("the daemon to refuse and exit", DEADLINE, || {
        match first.try_wait().unwrap() {
            Some(st) => Some(Some(st)),
            None if dd.0.join("jobvisor.sock").exists() && ctl_works(&victim) => {
                Some(None) // it started in the attacker's directory
            }
            None => None,
        }
    });
    let Some(status) = exited else {
        let _ = first.kill();
        let _ = first.wait();
        panic!("jobvisord started in the attacker's directory");
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut first.stderr.take().unwrap(), &mut err).unwrap();
    assert!(
        err.contains(dd.0.to_str().unwrap()) && err.contains(&attacker.name),
        "{err}"
    );
    // The attacker's directory goes; the daemon makes its own.
    std::fs::remove_dir_all(&dd.0).unwrap();
    let mut child = daemon(0o000)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("jobvisord");
    wait_for("the daemon on the default socket", DEADLINE, || {
        ctl_works(&victim).then_some(())
    });
    let meta = std::fs::symlink_metadata(&dd.0).unwrap();
    assert_eq!(meta.uid(), victim.uid);
    assert_eq!(meta.permissions().mode() & 0o7777, 0o700);
    let _ = child.kill();
    let _ = child.wait();
}
