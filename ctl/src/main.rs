//! `jobvisorctl`: drives a running `jobvisord` over its control socket.
//!
//! - [`args`]: the command line, and parsing of durations and states.
//! - `supervise`: `status`, `scale`, `restart`, `reload`, `shutdown`.
//! - `jobs`: `submit`, `wait`, `result`, `cancel`, `retry`, `jobs`.
//! - `manage`: `prune`, `metrics`.
//! - `map`: one job per stdin line, pipelined on one connection.
//! - `events`: the live event stream.
//! - `logs`: the workers' output the daemon kept, and following it.
//! - [`style`]: colours on a terminal (`NO_COLOR`).
//! - `top`: the live terminal view.
//! - [`render`]: JSON documents and human lines (pure).
//!
//! Every error is one line on stderr, `jobvisorctl: <what>: <why>`, and the
//! exit code is one of the contract's (README.md, "Control"): 0 ok, 1 job failed, 2 usage or
//! invalid input, 3 daemon unreachable, 4 not found, 5 rejected for now.
//!
//! Rust ignores SIGPIPE, so a closed stdout (`jobvisorctl map … | head -1`)
//! shows up as `EPIPE` on a write. Every write to stdout goes through
//! [`Out`] (or [`Failure::stdout`]), which turns that into a quiet exit with
//! status 141, what a shell reports for a process killed by SIGPIPE — the
//! reader went away, so there is no one to tell and nothing left to do.
//! `println!` is not used: it would panic instead.

pub mod args;
mod docs;
mod events;
mod jobs;
mod logs;
mod manage;
mod map;
pub mod render;
pub mod style;
mod supervise;
mod top;

use jobvisor_client::{connection as client, fdpass};

use crate::client::{ClientError, Connection};
use args::{Args, Cmd};
use clap::Parser;
use ipc_proto::control::{ErrorKind, Response};
use jobvisor_client::paths;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit status after stdout was closed by its reader (128 + SIGPIPE).
pub const EXIT_BROKEN_PIPE: u8 = 141;

/// Why a command ended unsuccessfully: an exit code and the one line to
/// print on stderr (`None`: exit quietly).
#[derive(Debug)]
pub struct Failure {
    /// Exit code (see the module docs).
    pub code: u8,
    /// The line after `jobvisorctl: `.
    pub msg: Option<String>,
}

impl Failure {
    /// A failure with its message.
    pub fn new(code: u8, msg: String) -> Failure {
        Failure {
            code,
            msg: Some(msg),
        }
    }

    /// Usage or invalid input (exit 2).
    pub fn usage(msg: String) -> Failure {
        Failure::new(2, msg)
    }

    /// The daemon refused `what`: exit code by kind.
    pub fn daemon(what: &str, kind: ErrorKind, message: &str) -> Failure {
        Failure::new(kind.exit_code(), format!("{what}: {message}"))
    }

    /// A connection failure during `what` (exit 3).
    pub fn client(what: &str, e: ClientError) -> Failure {
        match e {
            // Already says what and why.
            ClientError::Unreachable { .. } => Failure::new(client_exit_code(&e), e.to_string()),
            ClientError::Broken(_) | ClientError::Refused { .. } => {
                Failure::new(client_exit_code(&e), format!("{what}: {e}"))
            }
        }
    }

    /// An answer that does not fit the request: the daemon does not speak
    /// our protocol (exit 3).
    pub fn unexpected(what: &str, r: &Response) -> Failure {
        Failure::new(
            3,
            format!(
                "{what}: unexpected answer from jobvisord ({}); is jobvisorctl the same version as the daemon?",
                response_name(r)
            ),
        )
    }

    /// A failed write to stdout: quiet when the reader went away.
    pub fn stdout(e: io::Error) -> Failure {
        if e.kind() == io::ErrorKind::BrokenPipe {
            Failure {
                code: EXIT_BROKEN_PIPE,
                msg: None,
            }
        } else {
            Failure::new(1, format!("cannot write to stdout: {e}"))
        }
    }
}

/// Exit code of a connection failure: the daemon is unreachable or went
/// away, both 3; a refused connection by the refusal's kind (5 for "too
/// many connections": retry later).
pub fn client_exit_code(e: &ClientError) -> u8 {
    match e {
        ClientError::Unreachable { .. } | ClientError::Broken(_) => 3,
        ClientError::Refused { kind, .. } => kind.exit_code(),
    }
}

fn response_name(r: &Response) -> &'static str {
    match r {
        Response::Hello { .. } => "Hello",
        Response::Status(_) => "Status",
        Response::Ok { .. } => "Ok",
        Response::Error { .. } => "Error",
        Response::End => "End",
        Response::Submitted { .. } => "Submitted",
        Response::Job(_) => "Job",
        Response::JobFd { .. } => "JobFd",
        Response::Event(_) => "Event",
        Response::PoolFailed { .. } => "PoolFailed",
        Response::LogLine(_) => "LogLine",
        Response::Pruned { .. } => "Pruned",
        Response::Metrics { .. } => "Metrics",
        Response::Nodes(_) => "Nodes",
        Response::Warnings(_) => "Warnings",
    }
}

/// Buffered stdout whose errors are [`Failure`]s (see the module docs on
/// `EPIPE`).
pub struct Out {
    w: BufWriter<io::StdoutLock<'static>>,
}

impl Out {
    /// Locks stdout for the life of the command.
    pub fn new() -> Out {
        Out {
            w: BufWriter::with_capacity(64 << 10, io::stdout().lock()),
        }
    }

    /// Writes raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> Result<(), Failure> {
        self.w.write_all(b).map_err(Failure::stdout)
    }

    /// Writes `s` and a newline.
    pub fn line(&mut self, s: &str) -> Result<(), Failure> {
        self.w.write_all(s.as_bytes()).map_err(Failure::stdout)?;
        self.w.write_all(b"\n").map_err(Failure::stdout)
    }

    /// Writes everything buffered.
    pub fn flush(&mut self) -> Result<(), Failure> {
        self.w.flush().map_err(Failure::stdout)
    }

    /// Writes the first `len` bytes of `src` (from its start), letting the
    /// kernel move them (`copy_file_range`, `splice` or `sendfile`, as
    /// `std::io::copy` picks) instead of reading them into memory.
    pub fn copy_from(&mut self, src: std::fs::File, len: u64) -> Result<(), Failure> {
        self.flush()?;
        let mut src = src;
        io::Seek::rewind(&mut src)
            .map_err(|e| Failure::new(1, format!("cannot read the job's output: {e}")))?;
        let copied =
            io::copy(&mut io::Read::take(src, len), self.w.get_mut()).map_err(Failure::stdout)?;
        if copied < len {
            return Err(Failure::new(
                1,
                format!("the job's output ended after {copied} of {len} bytes"),
            ));
        }
        Ok(())
    }
}

impl Default for Out {
    fn default() -> Self {
        Out::new()
    }
}

/// `--json` was given: errors go to stderr as JSON objects too.
static JSON_ERRORS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// One line on stderr, prefixed with the program name (with `--json`, one
/// object `{"error": msg}`). A failing stderr is ignored: there is nowhere
/// else to report it.
pub fn warn(msg: &str) {
    error_line(msg, None);
}

/// [`warn`], with the exit code the command ends with (`"exit_code"` in
/// JSON).
fn error_line(msg: &str, code: Option<u8>) {
    let line = if JSON_ERRORS.load(std::sync::atomic::Ordering::Relaxed) {
        let mut v = serde_json::json!({ "error": msg });
        if let Some(c) = code {
            v["exit_code"] = c.into();
        }
        v.to_string()
    } else {
        format!("jobvisorctl: {msg}")
    };
    let _ = writeln!(io::stderr().lock(), "{line}");
}

/// Whether `--json` is among the global options of `args` (looked at
/// before parsing, so that a usage error is JSON too).
fn wants_json(args: impl Iterator<Item = std::ffi::OsString>) -> bool {
    args.skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// What every command needs: where the daemon is and how to print.
pub struct Ctx {
    /// The control socket.
    pub socket: PathBuf,
    /// `--json`.
    pub json: bool,
}

impl Ctx {
    /// Connects and greets the daemon.
    pub fn connect(&self, what: &str) -> Result<Connection, Failure> {
        Connection::connect(&self.socket).map_err(|e| Failure::client(what, e))
    }
}

/// Entry point of the `jobvisorctl` binary.
fn main() -> ExitCode {
    if wants_json(std::env::args_os()) {
        JSON_ERRORS.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => return clap_exit(e),
    };
    let code = match run(args) {
        Ok(code) => code,
        Err(f) => {
            if let Some(msg) = &f.msg {
                error_line(msg, Some(f.code));
            }
            f.code
        }
    };
    ExitCode::from(code)
}

/// Help and version go to stdout (exit 0); a usage error becomes one line
/// (exit 2), except a bare `jobvisorctl`, which shows the help.
fn clap_exit(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind as K;
    if !e.use_stderr() {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    if e.kind() == K::DisplayHelpOnMissingArgumentOrSubcommand {
        let _ = e.print();
        return ExitCode::from(2);
    }
    error_line(&clap_one_line(&e.to_string()), Some(2));
    ExitCode::from(2)
}

/// clap's error on one line, without its `error: ` prefix and its usage
/// block, but with what it lists (the missing arguments) and its tip (the
/// subcommand meant by a typo), plus where to look.
fn clap_one_line(rendered: &str) -> String {
    let mut text = String::new();
    for line in rendered.lines().map(str::trim) {
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if line.is_empty() {
            continue;
        }
        let line = line.strip_prefix("error: ").unwrap_or(line);
        if !text.is_empty() {
            text.push_str(if text.ends_with(':') { " " } else { "; " });
        }
        text.push_str(line);
    }
    if text.is_empty() {
        text.push_str("invalid arguments");
    }
    format!("usage: {text}; see 'jobvisorctl --help'")
}

fn socket_path(args: &Args) -> Result<PathBuf, Failure> {
    if let Some(p) = &args.socket {
        return Ok(p.clone());
    }
    if let Some(p) = std::env::var_os("JOBVISOR_SOCKET") {
        return Ok(PathBuf::from(p));
    }
    let cfg_path = args.config.clone().or_else(|| {
        let p = paths::default_config_path();
        p.exists().then_some(p)
    });
    if let Some(p) = cfg_path {
        // Only the socket's path is read from the config: an error in the
        // rest of it (a refused reload's) is the daemon's business.
        return match paths::control_socket(&p) {
            // A config without `control_socket` means the default socket.
            Ok(None) => default_socket(),
            Ok(Some(sock))
                if sock == paths::default_runtime_dir().join(paths::SOCKET_FILE_NAME) =>
            {
                default_socket()
            }
            Ok(Some(sock)) => Ok(sock),
            Err(e) => Err(Failure::usage(e)),
        };
    }
    default_socket()
}

/// The default socket, once its directory is checked: a fake daemon in a
/// directory someone else controls would receive the descriptors of the
/// files we submit. As tmux and ssh-agent do, a non-root user's default
/// directory must be its own and mode 0700; root's must be root's and not
/// writable by others. (An explicit `--socket`, `$JOBVISOR_SOCKET` or a
/// config's `control_socket` is the user's own choice and is not checked.)
fn default_socket() -> Result<PathBuf, Failure> {
    use jobvisor_client::trust::{check_existing, Strictness};
    let dir = paths::default_runtime_dir();
    let euid = nix::unistd::geteuid().as_raw();
    let strictness = if euid == 0 {
        Strictness::NoForeignWrite
    } else {
        Strictness::OwnerOnly
    };
    check_existing(&dir, "the default socket directory", strictness, &[euid])
        .map_err(|e| Failure::new(3, e.0))?;
    Ok(dir.join(paths::SOCKET_FILE_NAME))
}

fn run(args: Args) -> Result<u8, Failure> {
    // These two need no daemon (nor a socket path).
    match &args.cmd {
        Cmd::Completions { shell } => return docs::completions(shell),
        Cmd::Man { dir } => return docs::man_pages(dir),
        _ => {}
    }
    let ctx = Ctx {
        socket: socket_path(&args)?,
        json: args.json,
    };
    match args.cmd {
        Cmd::Status { cluster: true, .. } => supervise::nodes(&ctx),
        Cmd::Status { pool, .. } => supervise::status(&ctx, pool),
        Cmd::Scale { pool, workers } => supervise::simple(
            &ctx,
            "scale",
            ipc_proto::control::Request::Scale { pool, workers },
        ),
        Cmd::Restart { pool, no_wait } => supervise::restart(&ctx, pool, !no_wait),
        Cmd::Reload { no_wait } => supervise::reload(&ctx, !no_wait),
        Cmd::Pause { pool } => {
            supervise::simple(&ctx, "pause", ipc_proto::control::Request::Pause { pool })
        }
        Cmd::Resume { pool } => {
            supervise::simple(&ctx, "resume", ipc_proto::control::Request::Resume { pool })
        }
        Cmd::Shutdown { now, no_wait } => supervise::shutdown(&ctx, now, !no_wait),
        Cmd::Submit(a) => jobs::submit(&ctx, a),
        Cmd::Map(a) => map::run(&ctx, a),
        Cmd::Wait { ids } => jobs::wait(&ctx, ids),
        Cmd::Result { id } => jobs::result(&ctx, id),
        Cmd::Cancel { ids, pool, state } => jobs::cancel(&ctx, ids, pool, state),
        Cmd::Jobs(a) => jobs::list(&ctx, a),
        Cmd::Retry { ids } => jobs::per_id(&ctx, "retry", ids, |id| {
            ipc_proto::control::Request::Retry { id }
        }),
        Cmd::Prune {
            before,
            state,
            pool,
        } => manage::prune(&ctx, before, state, pool),
        Cmd::Events => events::run(&ctx),
        Cmd::Metrics => manage::metrics(&ctx),
        Cmd::Top { interval } => {
            let ms = args::parse_duration_ms("--interval", &interval).map_err(Failure::usage)?;
            top::run(&ctx, ms)
        }
        Cmd::Logs {
            target,
            follow,
            lines,
            since,
        } => {
            let since_ms = since
                .map(|s| args::parse_since("--since", &s))
                .transpose()
                .map_err(Failure::usage)?;
            logs::run(&ctx, &target, follow, lines, since_ms)
        }
        Cmd::Completions { .. } | Cmd::Man { .. } => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_contract() {
        assert_eq!(Failure::daemon("x", ErrorKind::Invalid, "m").code, 2);
        assert_eq!(Failure::daemon("x", ErrorKind::NotFound, "m").code, 4);
        assert_eq!(Failure::daemon("x", ErrorKind::Rejected, "m").code, 5);
        assert_eq!(Failure::daemon("x", ErrorKind::Failed, "m").code, 1);
        let unreachable = ClientError::Unreachable {
            path: "/nowhere".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        let f = Failure::client("submit", unreachable);
        assert_eq!(f.code, 3);
        assert!(f.msg.unwrap().starts_with("cannot connect to /nowhere"));
        let f = Failure::client("submit", ClientError::Broken("gone".into()));
        assert_eq!(f.code, 3);
        assert_eq!(
            f.msg.unwrap(),
            "submit: lost the connection to jobvisord: gone"
        );
        assert_eq!(Failure::unexpected("wait", &Response::End).code, 3);
    }

    #[test]
    fn broken_pipe_is_quiet() {
        let f = Failure::stdout(io::Error::from(io::ErrorKind::BrokenPipe));
        assert_eq!(f.code, EXIT_BROKEN_PIPE);
        assert!(f.msg.is_none());
        let f = Failure::stdout(io::Error::other("disk full"));
        assert_eq!(f.code, 1);
        assert!(f.msg.is_some());
    }

    #[test]
    fn clap_errors_fit_one_line() {
        let e =
            Args::try_parse_from(["jobvisorctl", "submit", "p", "--input", "a", "-"]).unwrap_err();
        let line = clap_one_line(&e.to_string());
        assert!(!line.contains('\n'), "{line}");
        assert!(line.starts_with("usage: the argument"), "{line}");
        assert!(line.ends_with("see 'jobvisorctl --help'"), "{line}");
        // A typo gets clap's suggestion; a missing argument is named.
        let e = Args::try_parse_from(["jobvisorctl", "stauts"]).unwrap_err();
        let line = clap_one_line(&e.to_string());
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.contains("'stauts'") && line.contains("'status'"),
            "{line}"
        );
        let e = Args::try_parse_from(["jobvisorctl", "scale", "p"]).unwrap_err();
        let line = clap_one_line(&e.to_string());
        assert!(line.contains("were not provided: <WORKERS>"), "{line}");
    }
}
