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
    daemon::spawn::cloexec_inherited_fds();
    match daemon::reactor::Reactor::new(cfg).and_then(|r| r.run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jobvisord: {e:#}");
            ExitCode::from(1)
        }
    }
}
