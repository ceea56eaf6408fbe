//! `jobvisorctl`: drives a running `jobvisord` over its control socket.
//!
//! Every error is one line on stderr, `jobvisorctl: <what>: <why>`, and the
//! exit code follows DESIGN.md section 7: 0 ok, 1 job failed, 2 usage or
//! invalid input, 3 daemon unreachable, 4 not found, 5 rejected for now.

use clap::{Parser, Subcommand};
use daemon::client::{ClientError, Connection};
use ipc_proto::control::{PoolStatus, Request, Response, StatusReport};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;

/// Control a running jobvisord.
#[derive(Parser)]
#[command(name = "jobvisorctl", version, about)]
struct Args {
    /// Control socket [default: $JOBVISOR_SOCKET, else the config's
    /// daemon.control_socket, else the default runtime path]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Read the control socket path from this configuration file.
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print one JSON document per answer (one per line for streams).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pools and workers.
    Status {
        /// Only this pool.
        pool: Option<String>,
    },
    /// Set a pool's number of workers (until the next reload).
    Scale {
        /// The pool.
        pool: String,
        /// Number of workers (at least 1).
        workers: u32,
    },
    /// Replace every worker of a pool; clears the `failed` state.
    Restart {
        /// The pool.
        pool: String,
    },
    /// Re-read the daemon's configuration file.
    Reload,
    /// Stop the daemon: let running jobs finish, then stop workers.
    Shutdown {
        /// Stop at once.
        #[arg(long)]
        now: bool,
    },
}

/// An error with its exit code.
struct Failure {
    code: u8,
    msg: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = match e {
            ClientError::Unreachable { .. } => 3,
            ClientError::Broken(_) => 3,
        };
        Failure {
            code,
            msg: e.to_string(),
        }
    }
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("jobvisorctl: {}", f.msg);
            ExitCode::from(f.code)
        }
    }
}

fn socket_path(args: &Args) -> Result<PathBuf, Failure> {
    if let Some(p) = &args.socket {
        return Ok(p.clone());
    }
    if let Some(p) = std::env::var_os("JOBVISOR_SOCKET") {
        return Ok(PathBuf::from(p));
    }
    let cfg_path = args.config.clone().or_else(|| {
        let p = daemon::default_config_path();
        p.exists().then_some(p)
    });
    if let Some(p) = cfg_path {
        return match daemon::config::load(&p) {
            Ok(c) => Ok(c.daemon.control_socket),
            Err(e) => Err(Failure {
                code: 2,
                msg: e.to_string(),
            }),
        };
    }
    Ok(daemon::config::default_runtime_dir().join("jobvisor.sock"))
}

fn run(args: Args) -> Result<u8, Failure> {
    let path = socket_path(&args)?;
    let mut conn = Connection::connect(&path)?;
    let req = match &args.cmd {
        Cmd::Status { pool } => Request::Status { pool: pool.clone() },
        Cmd::Scale { pool, workers } => Request::Scale {
            pool: pool.clone(),
            workers: *workers,
        },
        Cmd::Restart { pool } => Request::Restart { pool: pool.clone() },
        Cmd::Reload => Request::Reload,
        Cmd::Shutdown { now } => Request::Shutdown { now: *now },
    };
    let what = match &args.cmd {
        Cmd::Status { .. } => "status",
        Cmd::Scale { .. } => "scale",
        Cmd::Restart { .. } => "restart",
        Cmd::Reload => "reload",
        Cmd::Shutdown { .. } => "shutdown",
    };
    match conn.call(&req)? {
        Response::Status(report) => {
            if args.json {
                println!("{}", status_json(&report));
            } else {
                print_status(&report);
            }
            Ok(0)
        }
        Response::Ok { message } => {
            if args.json {
                println!("{}", json!({ "ok": true, "message": message }));
            } else {
                println!("{message}");
            }
            Ok(0)
        }
        Response::Error { kind, message } => Err(Failure {
            code: kind.exit_code(),
            msg: format!("{what}: {message}"),
        }),
        other => Err(Failure {
            code: 3,
            msg: format!("{what}: unexpected answer from jobvisord: {other:?}"),
        }),
    }
}

fn status_json(r: &StatusReport) -> serde_json::Value {
    json!({
        "pools": r.pools.iter().map(|p| json!({
            "name": p.name,
            "state": p.state.as_str(),
            "desired_workers": p.desired_workers,
            "queued": p.queued,
            "running": p.running,
            "succeeded": p.succeeded,
            "failed": p.failed,
            "last_error": p.last_error,
            "workers": p.workers.iter().map(|w| json!({
                "id": w.id,
                "pid": w.pid,
                "state": w.state.as_str(),
                "uptime_ms": w.uptime_ms,
                "restarts": w.restarts,
                "jobs_done": w.jobs_done,
                "rss_bytes": w.rss_bytes,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()
    })
}

fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    if s >= 86400 {
        format!("{}d{}h", s / 86400, s % 86400 / 3600)
    } else if s >= 3600 {
        format!("{}h{}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{}.{}s", s, ms % 1000 / 100)
    }
}

fn human_size(b: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if b == 0 {
        "-".into()
    } else if (b as f64) < MIB {
        format!("{:.0}KiB", b as f64 / 1024.0)
    } else {
        format!("{:.1}MiB", b as f64 / MIB)
    }
}

fn print_pool(p: &PoolStatus) {
    let ready = p
        .workers
        .iter()
        .filter(|w| matches!(w.state.as_str(), "ready" | "busy"))
        .count();
    println!(
        "pool {}: {}, {}/{} workers ready, queued {}, running {}, succeeded {}, failed {}",
        p.name,
        p.state.as_str(),
        ready,
        p.desired_workers,
        p.queued,
        p.running,
        p.succeeded,
        p.failed
    );
    if let Some(e) = &p.last_error {
        println!("  last error: {e}");
    }
    println!(
        "  {:>4}  {:>8}  {:<9} {:>9}  {:>8}  {:>9}  {:>9}",
        "ID", "PID", "STATE", "UPTIME", "RESTARTS", "JOBS", "RSS"
    );
    for w in &p.workers {
        println!(
            "  {:>4}  {:>8}  {:<9} {:>9}  {:>8}  {:>9}  {:>9}",
            w.id,
            w.pid.map_or("-".to_string(), |p| p.to_string()),
            w.state.as_str(),
            if w.pid.is_some() {
                human_duration(w.uptime_ms)
            } else {
                "-".into()
            },
            w.restarts,
            w.jobs_done,
            human_size(w.rss_bytes)
        );
    }
}

fn print_status(r: &StatusReport) {
    if r.pools.is_empty() {
        println!("no pools configured");
    }
    for p in &r.pools {
        print_pool(p);
    }
}
