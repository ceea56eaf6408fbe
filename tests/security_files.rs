//! The daemon's files under a hostile local user: directories someone else
//! made first are refused at start; links planted among the payload files
//! (and the spares) are never followed, for writing or reading; the store's
//! files are owner-only whatever the umask; a submit whose input cannot be
//! stored fails alone.

use jobvisor::users::{need_root, TestUser};
use jobvisor::*;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

fn cfg(daemon_extra: &str) -> String {
    format!(
        "{}{daemon_extra}\n[pools.echo]\ncommand = [{}, \"echo\"]\nworkers = 1\nshm_size = \"64MiB\"\n",
        daemon_section(),
        worker_bin()
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Starts the daemon on `config` and expects it to refuse: its one-line
/// error.
fn refused(tag: &str, config: &str) -> String {
    let mut d = Daemon::prepare(tag, config);
    d.launch(d.command());
    let st = d.wait_exit(DEADLINE);
    assert!(!st.success(), "started: {}", d.log_text());
    // The exit can come before the log reader has the last line.
    let line = wait_for("the refusal line", DEADLINE, || {
        d.log_text()
            .lines()
            .find(|l| l.contains("refusing") || l.contains("cannot use"))
            .map(str::to_string)
    });
    assert!(!d.socket().exists(), "socket left behind: {}", d.log_text());
    line
}

/// A `payload_dir` another user created first (as in a shared `/dev/shm`)
/// is refused at start, with one line naming it, its owner and mode, and
/// the fix; so is one the daemon's user owns but others may write to.
#[test]
fn a_payload_dir_someone_else_made_is_refused() {
    let dir = TempDir::new("sec-foreign-dir");
    let planted = dir.path().join("payloads");
    std::fs::create_dir(&planted).unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o777)).unwrap();
    let key = format!("payload_dir = \"{}\"", planted.display());
    let line = refused("sec-foreign-777", &cfg(&key));
    assert!(
        line.contains(planted.to_str().unwrap()) && line.contains("mode 0777"),
        "{line}"
    );
    assert!(line.contains("chmod go-w"), "says how to fix it: {line}");
    if !need_root("a_payload_dir_someone_else_made_is_refused (other owner)") {
        return;
    }
    let mallory = TestUser::create();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o700)).unwrap();
    mallory.chown(&planted);
    let line = refused("sec-foreign-owner", &cfg(&key));
    assert!(
        line.contains(planted.to_str().unwrap())
            && line.contains(&format!("owned by uid {} ({})", mallory.uid, mallory.name))
            && line.contains("chown"),
        "{line}"
    );
    // The same for state_dir.
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    mallory.chown(&state);
    let config = cfg("").replace(
        "state_dir = \"state\"",
        &format!("state_dir = \"{}\"", state.display()),
    );
    let line = refused("sec-foreign-state", &config);
    assert!(
        line.contains("state_dir") && line.contains(&mallory.name),
        "{line}"
    );
}

/// A file outside the daemon's directories that a planted link points to.
struct Victim {
    path: std::path::PathBuf,
    content: Vec<u8>,
}

impl Victim {
    fn new(dir: &Path, name: &str) -> Victim {
        let path = dir.join(name);
        let content = format!("{name}: precious, not to be touched\n").into_bytes();
        std::fs::write(&path, &content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Victim { path, content }
    }

    fn untouched(&self) {
        let now = std::fs::read(&self.path).unwrap();
        assert!(
            now == self.content,
            "{} was written through a link",
            self.path.display()
        );
    }
}

/// Links planted where the next payload files go (`<id>.in`, `<id>.out`)
/// and among the spares are never written through: the jobs run with their
/// own bytes, the link targets stay as they were.
#[test]
fn planted_links_are_never_written_through() {
    let d = Daemon::start("sec-links-write", &cfg(""));
    d.wait_ready("echo", 1);
    let outside = TempDir::new("sec-links-outside");
    let payloads = d.dir.path().join("state/payloads");
    let input = d.dir.path().join("input");
    let data = pattern(3 << 20);
    std::fs::write(&input, &data).unwrap();
    // Learn the next id, then plant links for the next few jobs.
    let first = d.submit_id(&["echo", "--input", "x"]);
    let victims: Vec<Victim> = (1..=4)
        .flat_map(|k| {
            let id = first + k;
            [
                (
                    format!("{id}.in"),
                    Victim::new(outside.path(), &format!("in{k}")),
                ),
                (
                    format!("{id}.out"),
                    Victim::new(outside.path(), &format!("out{k}")),
                ),
            ]
        })
        .map(|(name, v)| {
            symlink(&v.path, payloads.join(name)).unwrap();
            v
        })
        .collect();
    // And spares that are links.
    let spare_victim = Victim::new(outside.path(), "spare");
    for n in ["90", "91"] {
        symlink(&spare_victim.path, payloads.join(".spare").join(n)).unwrap();
    }
    for k in 1..=4 {
        let r = d.submit_file_wait("echo", &input);
        assert_eq!(r.code, 0, "job {k}: {r:?}");
        assert!(r.raw == data, "job {k}'s output is not its input");
    }
    for v in &victims {
        v.untouched();
    }
    spare_victim.untouched();
}

/// A link planted in place of a finished job's output file is never read:
/// `result` says the output is gone, and nothing of the link's target (not
/// even its size) shows.
#[test]
fn a_planted_output_link_is_never_read() {
    let d = Daemon::start("sec-links-read", &cfg(""));
    d.wait_ready("echo", 1);
    let input = d.dir.path().join("input");
    std::fs::write(&input, pattern(2 << 20)).unwrap();
    let id = d.submit_id(&["echo", "--input-file", input.to_str().unwrap()]);
    assert_eq!(d.ctl(&["wait", &id.to_string()]).code, 0);
    let out = d.dir.path().join(format!("state/payloads/{id}.out"));
    assert!(out.exists());
    let outside = TempDir::new("sec-secret");
    let secret = outside.path().join("secret");
    let text = "root-only secret\n".repeat(131_072); // 2 MiB + a bit
    std::fs::write(&secret, &text).unwrap();
    std::fs::remove_file(&out).unwrap();
    symlink(&secret, &out).unwrap();
    for args in [
        &["result", &id.to_string()][..],
        &["--json", "result", &id.to_string()],
    ] {
        let r = d.ctl(args);
        assert!(
            !r.stdout.contains("root-only") && !r.stderr.contains("root-only"),
            "{args:?} printed the secret"
        );
        let size = text.len().to_string();
        assert!(
            !r.stdout.contains(&size) && !r.stderr.contains(&size),
            "{args:?} disclosed the secret's size: {r:?}"
        );
    }
    assert!(alive(d.pid()));
}

/// Outside systemd, with a umask that would make files world-readable, the
/// store is owner-only: state_dir 0700, the database and its WAL 0600, the
/// payload directory 0700 and its files 0600.
#[test]
fn the_store_is_owner_only_whatever_the_umask() {
    let mut d = Daemon::prepare("sec-umask", &cfg(""));
    let mut cmd = d.command();
    with_umask(&mut cmd, 0o022);
    d.launch(cmd);
    let pid = d.pid();
    wait_for("the daemon to answer", DEADLINE, || {
        assert!(alive(pid), "{}", d.log_text());
        (d.ctl(&["status"]).code == 0).then_some(())
    });
    d.wait_ready("echo", 1);
    let input = d.dir.path().join("input");
    std::fs::write(&input, pattern(2 << 20)).unwrap();
    let r = d.submit_file_wait("echo", &input);
    assert_eq!(r.code, 0, "{r:?}");
    let state = d.dir.path().join("state");
    assert_eq!(mode(&state), 0o700, "state_dir");
    for f in ["jobs.db", "jobs.db-wal", "jobs.lock"] {
        assert_eq!(mode(&state.join(f)), 0o600, "{f}");
    }
    let payloads = state.join("payloads");
    assert_eq!(mode(&payloads), 0o700, "payload_dir");
    let mut files = 0;
    for e in std::fs::read_dir(&payloads).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
            files += 1;
        }
    }
    assert!(files >= 1, "no payload file was written");
}

/// A submit whose input cannot be stored fails alone, with a clear error:
/// submits of other clients committed in the same batch are stored and run.
#[test]
fn a_submit_whose_input_cannot_be_stored_fails_alone() {
    let d = Daemon::start("sec-alone", &cfg(""));
    d.wait_ready("echo", 1);
    let first = d.submit_id(&["echo", "--input", "x"]);
    // Something the store cannot replace has the next input file's name.
    let obstacle = d
        .dir
        .path()
        .join(format!("state/payloads/{}.in", first + 1));
    std::fs::create_dir(&obstacle).unwrap();
    let input = d.dir.path().join("input");
    std::fs::write(&input, pattern(2 << 20)).unwrap();
    // Ten clients at once: their inserts share batches.
    let results: Vec<Ctl> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|_| {
                s.spawn(|| d.ctl(&["submit", "echo", "--input-file", input.to_str().unwrap()]))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let failed: Vec<&Ctl> = results.iter().filter(|r| r.code != 0).collect();
    assert_eq!(failed.len(), 1, "exactly the one submit fails: {results:?}");
    assert_eq!(failed[0].code, 5, "{:?}", failed[0]);
    assert!(
        failed[0].stderr.contains("could not be stored"),
        "{:?}",
        failed[0]
    );
    for r in results.iter().filter(|r| r.code == 0) {
        let id = r.stdout.trim();
        assert_eq!(d.ctl(&["wait", id]).code, 0);
        assert!(d.ctl(&["result", id]).raw == pattern(2 << 20));
    }
    assert_eq!(d.pool("echo")["state"], "running");
}
