//! jobvisor's daemon crate: the supervisor, `jobvisord` (its control
//! client, `jobvisorctl`, is the `jobvisorctl` crate).
//!
//! - [`config`]: the TOML configuration, validated with `file:line:col`.
//! - [`supervisor`]: the sans-IO supervision core (state machine).
//! - [`reactor`]: the epoll event loop that executes the core's actions.
//! - [`spawn`]: clone+exec of workers with exactly the right descriptors.
//! - [`orphans`]: no worker descendant outlives its worker or the daemon.
//! - [`shm`]: the daemon's mapping of each worker's shared-memory arena.
//! - [`control`]: the control socket (binding, client connections).
//! - [`fdpass`]: descriptors on the control socket (from `jobvisor-client`).
//! - [`notify`], [`log`]: systemd notification and logging.
//! - [`metrics`]: the Prometheus text of the daemon's figures; [`http`]:
//!   the opt-in HTTP listener serving it and a status page.
//! - [`private_dir`]: directories the daemon trusts (owner and mode checked, used by descriptor).

pub mod cgroup;
pub mod config;
pub mod control;
pub mod copier;
pub mod http;
pub mod log;
pub mod metrics;
pub mod notify;
pub mod orphans;
pub mod private_dir;
pub mod reactor;
pub mod shm;
pub mod spawn;
pub mod store;
pub mod supervisor;

pub use jobvisor_client::fdpass;
pub use jobvisor_client::paths::default_config_path;
