//! Throwaway users and groups for the security tests, which play a hostile
//! local user, a user in the socket's group, and a worker's own user.
//!
//! They need root (`useradd`); CI runs as root. A test that cannot create
//! them says so on stderr ("SKIPPED: …") and returns, see [`need_root`].
//! Users are system users without a home or a login shell, named
//! `jvt<pid><n>`, and are removed on drop (also after a panic).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

/// `useradd`/`groupadd` lock /etc/passwd and /etc/group; the tests of one
/// binary run in parallel threads, so they take turns here (and retry when
/// another process holds the lock).
static ACCOUNTS: Mutex<()> = Mutex::new(());

/// True when the test runs as root; otherwise prints a clear SKIPPED line
/// naming `test` and returns false.
pub fn need_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("SKIPPED: {test}: needs root to create throwaway users (CI runs as root)");
    false
}

fn fresh_name(prefix: &str) -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    format!("{prefix}{}x{n}", std::process::id())
}

/// Runs an account command, retrying while another process holds the lock.
fn account_cmd(program: &str, args: &[&str]) {
    let _turn = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
    let mut last = String::new();
    for attempt in 0..50 {
        let out = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        if out.status.success() {
            return;
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        // Exit 10 (useradd/groupadd): "cannot lock /etc/passwd; try again later".
        if out.status.code() != Some(10) && !last.contains("lock") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20 * (attempt + 1)));
    }
    panic!("{program} {args:?} failed: {last}");
}

fn id_of(flag: &str, name: &str) -> u32 {
    let out = Command::new("id").arg(flag).arg(name).output().expect("id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("id {flag} {name}: {out:?}"))
}

/// A throwaway group, deleted on drop.
pub struct TestGroup {
    /// Its name.
    pub name: String,
    /// Its gid.
    pub gid: u32,
}

impl TestGroup {
    /// Creates a new system group.
    pub fn create() -> TestGroup {
        let name = fresh_name("jvg");
        account_cmd("groupadd", &["--system", &name]);
        let line = std::fs::read_to_string("/etc/group").expect("/etc/group");
        let gid = line
            .lines()
            .find_map(|l| {
                let mut f = l.split(':');
                (f.next() == Some(name.as_str()))
                    .then(|| f.nth(1).and_then(|g| g.parse().ok()))
                    .flatten()
            })
            .unwrap_or_else(|| panic!("group {name} not in /etc/group"));
        TestGroup { name, gid }
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        let _turn = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
        let _ = Command::new("groupdel").arg(&self.name).output();
    }
}

/// A throwaway user (its own primary group, no home, no shell), deleted on
/// drop.
pub struct TestUser {
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: u32,
    /// Its primary gid.
    pub gid: u32,
    /// Supplementary groups it was created in.
    pub groups: Vec<u32>,
}

impl TestUser {
    /// Creates a user with no supplementary group.
    pub fn create() -> TestUser {
        TestUser::create_in(&[])
    }

    /// Creates a user that is also a member of `groups`.
    pub fn create_in(groups: &[&TestGroup]) -> TestUser {
        let name = fresh_name("jvt");
        let list = groups
            .iter()
            .map(|g| g.name.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let mut args = vec![
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
        ];
        if !list.is_empty() {
            args.extend(["--groups", list.as_str()]);
        }
        args.push(&name);
        account_cmd("useradd", &args);
        TestUser {
            uid: id_of("-u", &name),
            gid: id_of("-g", &name),
            groups: groups.iter().map(|g| g.gid).collect(),
            name,
        }
    }

    /// `program` set up to run as this user (uid, gid and supplementary
    /// groups), with `HOME=/` and no `XDG_RUNTIME_DIR`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let (uid, gid, groups) = (self.uid, self.gid, self.groups.clone());
        // SAFETY: the closure runs in the forked child before exec and makes
        // only async-signal-safe system calls on data captured beforehand.
        // (`Command::groups` is unstable, and `Command::uid` would change the
        // uid before a closure could set the groups.)
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.env("HOME", "/")
            .env("USER", &self.name)
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("XDG_STATE_HOME")
            .env_remove("JOBVISOR_SOCKET");
        cmd
    }

    /// Runs `jobvisorctl --socket SOCKET ARGS` as this user.
    pub fn ctl(&self, socket: &Path, args: &[&str]) -> crate::Ctl {
        let mut cmd = self.command(crate::bin("jobvisorctl"));
        cmd.arg("--socket").arg(socket).args(args);
        crate::run_with_stdin(cmd, None)
    }

    /// Makes `path` (a file or directory) owned by this user.
    pub fn chown(&self, path: &Path) {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // Any process the test left running as this user goes first:
        // userdel refuses to remove a logged-in user.
        let _ = Command::new("pkill")
            .args(["-KILL", "-u", &self.uid.to_string()])
            .output();
        let _turn = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}
