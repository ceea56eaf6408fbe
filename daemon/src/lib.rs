//! jobvisor's daemon crate: the supervisor (`jobvisord`) and its control
//! client (`jobvisorctl`).
//!
//! - [`config`]: the TOML configuration, validated with `file:line:col`.
//! - [`supervisor`]: the sans-IO supervision core (state machine).
//! - [`reactor`]: the epoll event loop that executes the core's actions.
//! - [`spawn`]: fork+exec of workers with exactly the right descriptors.
//! - [`orphans`]: no worker descendant outlives its worker or the daemon.
//! - [`shm`]: the daemon's mapping of each worker's shared-memory arena.
//! - [`control`]: the control socket (binding, client connections).
//! - [`client`]: the client side of the control protocol (`jobvisorctl`).
//! - [`notify`], [`log`]: systemd notification and logging.
//! - [`private_dir`]: directories the daemon trusts (owner and mode checked, used by descriptor).

pub mod cgroup;
pub mod client;
pub mod config;
pub mod control;
pub mod copier;
pub mod ctl;
pub mod fdpass;
pub mod log;
pub mod notify;
pub mod orphans;
pub mod private_dir;
pub mod reactor;
pub mod shm;
pub mod spawn;
pub mod store;
pub mod supervisor;

use std::path::PathBuf;

/// The configuration file used when `--config` is not given:
/// `$JOBVISOR_CONFIG`, else `/etc/jobvisor/jobvisor.toml` for root, else
/// `$XDG_CONFIG_HOME/jobvisor/jobvisor.toml` (`~/.config/…`).
pub fn default_config_path() -> PathBuf {
    if let Some(p) = std::env::var_os("JOBVISOR_CONFIG") {
        return PathBuf::from(p);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/etc/jobvisor/jobvisor.toml");
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("jobvisor/jobvisor.toml")
}
