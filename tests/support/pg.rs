//! A throwaway PostgreSQL server for tests: `initdb` into a temporary
//! directory, `pg_ctl start` on a free loopback port, trust authentication,
//! superuser `jobvisor`; stopped (`-m immediate`) and removed on drop.
//!
//! The binaries come from `$JOBVISOR_PG_BIN`, else the newest
//! `/usr/lib/postgresql/*/bin` (Debian's `postgresql` package, which
//! `.ci/run` installs), else `PATH`. PostgreSQL refuses to run as root: as
//! root the server runs as the `postgres` user (or `nobody`), which gets the
//! directory. Without PostgreSQL, [`TestPg::start`] returns `None` after
//! printing why, and the caller skips, except under CI (`$CI` set), where
//! that is a failure.
//!
//! Shared by the daemon's unit tests and the black-box tests (`#[path]`).

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A running server.
pub struct TestPg {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    uid: Option<(u32, u32)>,
}

fn find_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("JOBVISOR_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p).find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
    })
}

/// The uid and gid the server runs as when the tests run as root.
fn server_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for name in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() > 3 && f[0] == name {
                if let (Ok(u), Ok(g)) = (f[2].parse(), f[3].parse()) {
                    return Some((u, g));
                }
            }
        }
    }
    Some((65534, 65534))
}

fn chown_tree(path: &Path, (uid, gid): (u32, u32)) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown for the test server");
}

impl TestPg {
    /// [`Self::start`], with an empty database `jv` created: the server and
    /// that database's URL.
    pub fn with_db(tag: &str) -> Option<(TestPg, String)> {
        let pg = TestPg::start(tag)?;
        pg.create_db("jv");
        let url = pg.url("jv");
        Some((pg, url))
    }

    /// Starts a server, or says why it cannot and returns `None` (a panic
    /// under CI).
    pub fn start(tag: &str) -> Option<TestPg> {
        let Some(bin) = find_bin() else {
            let why = "no PostgreSQL binaries (install Debian's postgresql package, or set JOBVISOR_PG_BIN)";
            if std::env::var_os("CI").is_some() {
                panic!("{why}");
            }
            eprintln!("SKIPPED ({tag}): {why}");
            return None;
        };
        let base = std::env::temp_dir().join(format!(
            "jvpg-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&base).unwrap();
        let uid = server_user();
        if let Some(u) = uid {
            chown_tree(&base, u);
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let pg = TestPg {
            dir: base,
            bin,
            port,
            uid,
        };
        let data = pg.dir.join("data");
        pg.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "jobvisor",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        pg.pg_ctl("start", &["-o", &pg.options("127.0.0.1")]);
        Some(pg)
    }

    fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(self.bin.join(tool));
        if let Some((uid, gid)) = self.uid {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        cmd
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self
            .command(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}\n{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL of database `db` (created by [`Self::create_db`], or the
    /// `postgres` database).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://jobvisor@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `name` (empty).
    pub fn create_db(&self, name: &str) {
        let port = self.port.to_string();
        self.run(
            "createdb",
            &["-h", "127.0.0.1", "-p", &port, "-U", "jobvisor", name],
        );
    }

    /// A `psql` session on database `db` that has run `sql` and stays
    /// open (its transaction too, if `sql` began one) until it is killed.
    pub fn psql_session(&self, db: &str, sql: &str) -> std::process::Child {
        use std::io::Write;
        let mut child = self
            .psql_command(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("psql");
        let stdin = child.stdin.as_mut().expect("piped");
        stdin.write_all(sql.as_bytes()).expect("write to psql");
        stdin.flush().expect("flush psql");
        child
    }

    /// `psql` on database `db` as `jobvisor`, unaligned, tuples only.
    fn psql_command(&self, db: &str) -> Command {
        let mut cmd = self.command("psql");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "jobvisor", "-d", db, "-At"]);
        cmd
    }

    /// `psql -c SQL` on database `db`; its output (unaligned, tuples only).
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = self
            .psql_command(db)
            .args(["-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The server's options, listening on `addresses`.
    fn options(&self, addresses: &str) -> String {
        format!(
            "-p {} -k {} -c listen_addresses={addresses} -c fsync=on -c max_connections=100",
            self.port,
            self.dir.display()
        )
    }

    /// Restarts the server listening on `addr` too (an address of this
    /// host, such as a veth's), trusting clients from `net` (CIDR).
    pub fn listen_also(&self, addr: &str, net: &str) {
        let data = self.dir.join("data");
        let hba = data.join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba).expect("pg_hba.conf");
        text.push_str(&format!("host all all {net} trust\n"));
        std::fs::write(&hba, text).expect("write pg_hba.conf");
        self.pg_ctl(
            "restart",
            &[
                "-o",
                &self.options(&format!("'127.0.0.1,{addr}'")),
                "-m",
                "fast",
            ],
        );
    }

    /// Restarts the server with TLS on (`ssl = on`): a throwaway CA (made
    /// with the `openssl` command) signs its certificate, which names
    /// `localhost` only (not 127.0.0.1), and a client certificate for role
    /// `certuser`, which may log in over TLS with that certificate only
    /// (`hostssl … cert`; the role is created). Returns the directory of
    /// `ca.crt`, `client.crt` and `client.key`; `other-ca.crt` there is a CA
    /// that signed nothing of this server.
    pub fn enable_tls(&self) -> PathBuf {
        let tls = self.dir.join("tls");
        std::fs::create_dir_all(&tls).unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&tls)
                .stdin(Stdio::null())
                .output()
                .expect("run openssl (Debian's openssl package)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let (key, crt, subj) = (
                format!("{ca}.key"),
                format!("{ca}.crt"),
                format!("/CN=jobvisor test {ca}"),
            );
            let mut args = vec!["req", "-x509", "-days", "2", "-subj", &subj];
            args.extend_from_slice(&ec);
            args.extend_from_slice(&["-keyout", &key, "-out", &crt]);
            args.extend_from_slice(&["-addext", "basicConstraints=critical,CA:TRUE"]);
            args.extend_from_slice(&["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
            openssl(&args);
        }
        for (name, cn, ext) in [
            ("server", "localhost", "subjectAltName=DNS:localhost"),
            ("client", "certuser", "extendedKeyUsage=clientAuth"),
        ] {
            let (key, csr, crt) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
            );
            let subj = format!("/CN={cn}");
            let mut args = vec!["req", "-subj", &subj];
            args.extend_from_slice(&ec);
            args.extend_from_slice(&["-keyout", &key, "-out", &csr]);
            openssl(&args);
            let extfile = format!("{name}.ext");
            std::fs::write(tls.join(&extfile), format!("{ext}\n")).unwrap();
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &crt,
                "-extfile",
                &extfile,
            ]);
        }
        // The server reads its key only if no one else may.
        let key = tls.join("server.key");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        if let Some(u) = self.uid {
            chown_tree(&tls, u);
            for f in std::fs::read_dir(&tls).unwrap() {
                chown_tree(&f.unwrap().path(), u);
            }
        }
        self.psql("postgres", "CREATE ROLE certuser LOGIN SUPERUSER");
        let data = self.dir.join("data");
        let hba = data.join("pg_hba.conf");
        let text = std::fs::read_to_string(&hba).expect("pg_hba.conf");
        std::fs::write(
            &hba,
            format!("hostssl all certuser 127.0.0.1/32 cert\nhost all certuser 127.0.0.1/32 reject\n{text}"),
        )
        .expect("write pg_hba.conf");
        let options = format!(
            "{} -c ssl=on -c ssl_cert_file={t}/server.crt -c ssl_key_file={t}/server.key \
             -c ssl_ca_file={t}/ca.crt",
            self.options("127.0.0.1"),
            t = tls.display()
        );
        self.pg_ctl("restart", &["-o", &options, "-m", "fast"]);
        tls
    }

    /// Restarts the server with `pg_ctl restart -m immediate` (a crash for
    /// it: recovery from its WAL on start).
    pub fn restart_immediate(&self) {
        self.pg_ctl("restart", &["-m", "immediate"]);
    }

    /// `pg_ctl ACTION` on the data directory, its output to the server's
    /// log (else `output()` would wait for the server to end), waiting up
    /// to 60 s.
    fn pg_ctl(&self, action: &str, extra: &[&str]) {
        let data = self.dir.join("data");
        let log = self.dir.join("server.log");
        let mut args = vec!["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-w", "-t", "60", action]);
        self.run("pg_ctl", &args);
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self
            .command("pg_ctl")
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
