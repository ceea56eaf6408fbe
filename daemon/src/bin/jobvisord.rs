//! `jobvisord`: the supervisor daemon. Always runs in the foreground.

use clap::Parser;
use daemon::config;
use std::path::PathBuf;
use std::process::ExitCode;

/// jobvisor's supervisor daemon: runs pools of worker processes.
#[derive(Parser)]
#[command(name = "jobvisord", version, about)]
struct Args {
    /// Configuration file [default: $JOBVISOR_CONFIG, else
    /// /etc/jobvisor/jobvisor.toml as root, else
    /// $XDG_CONFIG_HOME/jobvisor/jobvisor.toml]
    #[arg(long, short = 'c', value_name = "PATH")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit: 0 if valid, 2 if not.
    #[arg(long)]
    check: bool,
    /// Run for one process: FD is one end of a Unix socketpair whose other
    /// end that process holds. The daemon writes "listening" on it when
    /// its control socket is up; when the other end closes, the daemon
    /// stops at once and removes its state_dir (how `jobvisor.Executor()`
    /// runs a private daemon).
    #[arg(long, value_name = "FD")]
    lifeline: Option<i32>,
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
    let path = args.config.unwrap_or_else(daemon::default_config_path);
    let cfg = match config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("jobvisord: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!(
            "{}: ok ({} pools, {} workers)",
            cfg.path.display(),
            cfg.pools.len(),
            cfg.pools.values().map(|p| p.workers as u64).sum::<u64>()
        );
        return ExitCode::SUCCESS;
    }
    // Taken before anything else opens descriptors, so that FD is the one
    // inherited.
    let lifeline = match args.lifeline.map(daemon::spawn::inherited_fd).transpose() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("jobvisord: --lifeline: {e}");
            return ExitCode::from(2);
        }
    };
    daemon::spawn::cloexec_inherited_fds();
    let run = daemon::reactor::Reactor::new(cfg).and_then(|mut r| {
        if let Some(fd) = lifeline {
            r.set_lifeline(fd)?;
        }
        r.run()
    });
    match run {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jobvisord: {e:#}");
            ExitCode::from(1)
        }
    }
}
