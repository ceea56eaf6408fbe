//! Configuration loader: reads the TOML file described in DESIGN section 6 into a
//! fully validated [`Config`].
//!
//! Why the document is walked by hand instead of `#[derive(Deserialize)]`: every
//! rejected config must produce exactly one line,
//! `FILE:LINE:COL: KEY.PATH: what is wrong; what is expected`, pointing at the offending
//! value (or at the key, for unknown keys). serde's errors carry neither the full key
//! path nor a reliable position for semantic checks (`workers = 0`, an unknown
//! semaphore, `backoff_max < backoff_initial`). So the text is parsed into toml's
//! spanned document ([`toml::de::DeTable`]) and each table is walked in document order,
//! which also makes the reported error the first one a reader meets in the file.
//!
//! Invariants of a [`Config`] returned by [`parse`] or [`load`]:
//! - every path in it (`path`, `control_socket`, `state_dir`, `cwd`) is absolute;
//!   relative paths in the file were resolved against the file's directory;
//! - every documented constraint holds (ranges, cross-field rules such as
//!   `inline_limit <= shm_size`, pool semaphores naming keys of `[semaphores]`), so
//!   the rest of the daemon never re-validates.
//!
//! Nothing here touches the system beyond reading the file (and the environment, for
//! the default directories): users, groups and commands are checked when workers are
//! spawned, since a config may be validated on a machine other than the one running it.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use jobvisor_client::paths::{abs_dir, absolute, clean, first_dir, line_col, one_line};
pub use jobvisor_client::paths::{default_runtime_dir, SOCKET_FILE_NAME};

/// Largest accepted `prefetch`.
pub const MAX_PREFETCH: u32 = 1024;
/// Largest accepted `workers`.
pub const MAX_WORKERS: u32 = 4096;
/// `max_attempts` when absent.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// `queue_capacity` when absent.
pub const DEFAULT_QUEUE_CAPACITY: u64 = 100_000;
/// `stop_timeout` when absent.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// `start_timeout` when absent.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(10);
/// `backoff_initial` when absent.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// `backoff_max` when absent.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// `healthy_after` when absent.
pub const DEFAULT_HEALTHY_AFTER: Duration = Duration::from_secs(5);
/// `max_restarts` when absent.
pub const DEFAULT_MAX_RESTARTS: u32 = 10;
/// `restart_window` when absent.
pub const DEFAULT_RESTART_WINDOW: Duration = Duration::from_secs(60);
/// `inline_limit` when absent: payloads above this go through shared memory.
pub const DEFAULT_INLINE_LIMIT: u64 = ipc_proto::DEFAULT_INLINE_LIMIT;
/// `inline_limit` must stay below this (it bounds the size of one pipe frame).
pub const INLINE_LIMIT_CEILING: u64 = 64 * 1024 * 1024;
/// `shm_size` when absent.
pub const DEFAULT_SHM_SIZE: u64 = 256 * 1024 * 1024;
/// Smallest accepted `shm_size` (one page).
pub const MIN_SHM_SIZE: u64 = 4096;
/// `result_retention` when absent.
pub const DEFAULT_RESULT_RETENTION: Duration = Duration::from_secs(24 * 3600);
/// `drain_timeout` when absent.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// `socket_mode` when absent: the group may control the daemon, others may not connect.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// Default `max_connections`: control connections open at once, all users.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 512;
/// Default `max_connections_per_user`: control connections of one uid
/// (root, the daemon's uid and `admin_group` are not limited per user).
pub const DEFAULT_MAX_CONNECTIONS_PER_USER: u32 = 32;
/// Largest `max_connections`.
pub const MAX_CONNECTIONS_LIMIT: u32 = 65_536;
/// Longest socket path `bind(2)` accepts: `sun_path` is 108 bytes including the NUL.
pub const MAX_SOCKET_PATH_LEN: usize = 107;
/// Longest pool or semaphore name.
pub const MAX_NAME_LEN: usize = 64;

const TOP_KEYS: &[&str] = &["daemon", "store", "semaphores", "pools"];
const DAEMON_KEYS: &[&str] = &[
    "control_socket",
    "state_dir",
    "payload_dir",
    "socket_mode",
    "drain_timeout",
    "admin_group",
    "max_connections",
    "max_connections_per_user",
    "metrics_listen",
];
const POOL_KEYS: &[&str] = &[
    "command",
    "workers",
    "max_jobs_per_worker",
    "max_memory",
    "timeout",
    "max_attempts",
    "queue_capacity",
    "semaphores",
    "env",
    "cwd",
    "user",
    "group",
    "stop_signal",
    "stop_timeout",
    "prefetch",
    "start_timeout",
    "backoff_initial",
    "backoff_max",
    "healthy_after",
    "max_restarts",
    "start_retries",
    "restart_window",
    "inline_limit",
    "shm_size",
    "result_retention",
    "payloads",
];

/// Signals accepted for `stop_signal`, by name without the `SIG` prefix.
const STOP_SIGNALS: &[(&str, Signal)] = &[
    ("TERM", Signal::SIGTERM),
    ("INT", Signal::SIGINT),
    ("QUIT", Signal::SIGQUIT),
    ("HUP", Signal::SIGHUP),
    ("USR1", Signal::SIGUSR1),
    ("USR2", Signal::SIGUSR2),
    ("KILL", Signal::SIGKILL),
    ("ABRT", Signal::SIGABRT),
    ("ALRM", Signal::SIGALRM),
    ("WINCH", Signal::SIGWINCH),
];

const DURATION_HINT: &str = "expected a number with a unit such as \"250ms\", \"30s\", \"5m\"";
const SIZE_HINT: &str =
    "expected a whole number of bytes with an optional unit such as \"4096\", \"64KiB\", \"512MiB\", \"1GiB\", \"100MB\"";
const NAME_RULE: &str = "use 1 to 64 characters from A-Z a-z 0-9 _ . -";

/// A loaded and validated configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Absolute path of the file this was read from.
    pub path: PathBuf,
    /// The `[daemon]` section (defaults when absent).
    pub daemon: DaemonConfig,
    /// The `[store]` section (SQLite when absent).
    pub store: StoreConfig,
    /// `[semaphores]`: name → number of holders allowed at once (each >= 1).
    pub semaphores: BTreeMap<String, u32>,
    /// `[pools.NAME]` sections, by name.
    pub pools: BTreeMap<String, PoolConfig>,
}

/// The `[daemon]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// Absolute path of the control socket.
    pub control_socket: PathBuf,
    /// Absolute path of the directory holding the durable job store.
    pub state_dir: PathBuf,
    /// Absolute path of the directory holding large payloads (files of
    /// inputs and outputs of 1 MiB or more); `None`: `state_dir/payloads`.
    pub payload_dir: Option<PathBuf>,
    /// Permission bits of the control socket (<= 0o777).
    pub socket_mode: u32,
    /// How long running jobs may finish on shutdown.
    pub drain_timeout: Duration,
    /// Group whose members may run admin commands and see every user's
    /// jobs (besides root and the daemon's own uid): its name and gid.
    pub admin_group: Option<(String, u32)>,
    /// Control connections open at once, all users together.
    pub max_connections: u32,
    /// Control connections open at once per uid (admins excepted).
    pub max_connections_per_user: u32,
    /// Where to serve metrics and the status page over HTTP (opt-in).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// One `[pools.NAME]` section. See DESIGN section 6 and `config.example.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// The pool name (`[A-Za-z0-9_.-]{1,64}`).
    pub name: String,
    /// argv of a worker; non-empty, `command[0]` non-empty.
    pub command: Vec<String>,
    /// Number of worker processes, 1..=4096.
    pub workers: u32,
    /// Replace a worker after this many jobs; 0 = never.
    pub max_jobs_per_worker: u64,
    /// Memory limit of one worker, in bytes.
    pub max_memory: Option<u64>,
    /// Default per-job timeout.
    pub timeout: Option<Duration>,
    /// Default number of attempts per job, >= 1.
    pub max_attempts: u32,
    /// Most queued jobs before submissions are refused, >= 1.
    pub queue_capacity: u64,
    /// Semaphores a job of this pool holds while running (keys of `[semaphores]`).
    pub semaphores: Vec<String>,
    /// Extra environment of the workers.
    pub env: BTreeMap<String, String>,
    /// Absolute working directory of the workers.
    pub cwd: PathBuf,
    /// User to run workers as (only honoured when the daemon runs as root).
    pub user: Option<String>,
    /// Group to run workers as (only honoured when the daemon runs as root).
    pub group: Option<String>,
    /// First signal sent to stop a worker.
    pub stop_signal: Signal,
    /// Wait after `stop_signal` before SIGKILL of the process group.
    pub stop_timeout: Duration,
    /// Jobs in flight per worker, 1..=1024, when set; `None` (the key is
    /// absent): adaptive, see [`crate::supervisor::ADAPTIVE_PREFETCH_MAX`].
    pub prefetch: Option<u32>,
    /// Time a new worker has to send `Ready`, > 0.
    pub start_timeout: Duration,
    /// First restart backoff.
    pub backoff_initial: Duration,
    /// Largest restart backoff, >= `backoff_initial`.
    pub backoff_max: Duration,
    /// Uptime after which a worker's death is not counted as a crash loop.
    pub healthy_after: Duration,
    /// Restarts allowed within `restart_window` before the pool is `failed`.
    pub max_restarts: u32,
    /// Window for `max_restarts`, > 0.
    pub restart_window: Duration,
    /// While no worker of the pool has become ready since it (re)started:
    /// workers that exit before `Ready` this many times in a row, plus
    /// one, fail the pool at once. `None` (the default): only
    /// `max_restarts` applies.
    pub start_retries: Option<u32>,
    /// Payloads up to this size go inline in frames; <= `shm_size`, < 64 MiB.
    pub inline_limit: u64,
    /// Size of a worker's shared-memory arena, >= 4096.
    pub shm_size: u64,
    /// How long finished jobs' results are kept.
    pub result_retention: Duration,
    /// Where large payloads live (`payloads = "durable" | "memory"`).
    pub payloads: PayloadMode,
}

/// Where a pool's large payloads (those that would be payload files) live:
/// the protocol's type (a submit may override the pool's choice).
pub use ipc_proto::control::PayloadMode;

impl DaemonConfig {
    /// Where large payloads are stored: `payload_dir`, else
    /// `state_dir/payloads`.
    pub fn payload_dir(&self) -> PathBuf {
        self.payload_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("payloads"))
    }

    /// The `[daemon]` section when the file has none: default directories from the
    /// environment (see [`default_runtime_dir`]), mode 0660, 30s drain.
    pub fn defaults() -> DaemonConfig {
        DaemonConfig {
            control_socket: default_runtime_dir().join(SOCKET_FILE_NAME),
            state_dir: default_state_dir(),
            payload_dir: None,
            socket_mode: DEFAULT_SOCKET_MODE,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            admin_group: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_user: DEFAULT_MAX_CONNECTIONS_PER_USER,
            metrics_listen: None,
        }
    }
}

impl PoolConfig {
    /// A pool with every optional key at its default, as if the file only said
    /// `command = ...`. `dir` is the config file's directory (the default `cwd`).
    pub fn with_defaults(name: &str, command: Vec<String>, dir: &Path) -> PoolConfig {
        PoolConfig {
            name: name.to_owned(),
            command,
            workers: default_workers(),
            max_jobs_per_worker: 0,
            max_memory: None,
            timeout: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            semaphores: Vec::new(),
            env: BTreeMap::new(),
            cwd: dir.to_path_buf(),
            user: None,
            group: None,
            stop_signal: Signal::SIGTERM,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            prefetch: None,
            start_timeout: DEFAULT_START_TIMEOUT,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            healthy_after: DEFAULT_HEALTHY_AFTER,
            max_restarts: DEFAULT_MAX_RESTARTS,
            start_retries: None,
            restart_window: DEFAULT_RESTART_WINDOW,
            inline_limit: DEFAULT_INLINE_LIMIT,
            shm_size: DEFAULT_SHM_SIZE,
            result_retention: DEFAULT_RESULT_RETENTION,
            payloads: PayloadMode::Durable,
        }
    }

    /// True when running workers started from `self` can be kept under `other` on
    /// reload: everything that shapes a worker process or its channel is equal
    /// (command, env, cwd, user, group, inline_limit, shm_size, start_timeout).
    /// The other keys are supervision or scheduling policy and apply live.
    pub fn same_worker_spec(&self, other: &PoolConfig) -> bool {
        self.command == other.command
            && self.env == other.env
            && self.cwd == other.cwd
            && self.user == other.user
            && self.group == other.group
            && self.inline_limit == other.inline_limit
            && self.shm_size == other.shm_size
            && self.start_timeout == other.start_timeout
    }
}

/// Why a config was refused. `Display` is always one line and starts with the file
/// name (and `LINE:COL` when the problem is inside the file).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {}: {reason}", path.display())]
    Read {
        /// The path as given.
        path: PathBuf,
        /// What the OS said (not exposed as `source()`: it is already in the message).
        reason: std::io::Error,
    },
    /// The text is not valid TOML.
    #[error("{}:{line}:{column}: invalid TOML: {message}", path.display())]
    Syntax {
        /// The path as given.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column, in characters.
        column: usize,
        /// One-line description.
        message: String,
    },
    /// Valid TOML, but a key or value is not acceptable.
    #[error("{}:{line}:{column}: {key}: {message}", path.display())]
    Invalid {
        /// The path as given.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column, in characters.
        column: usize,
        /// Dotted key path, e.g. `pools.echo.workers` or `pools.echo.command[0]`.
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
}

impl ConfigError {
    /// `(line, column)` of the problem, when it lies inside the file.
    pub fn position(&self) -> Option<(usize, usize)> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Syntax { line, column, .. }
            | ConfigError::Invalid { line, column, .. } => Some((*line, *column)),
        }
    }

    /// The key path of an invalid key or value.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|reason| ConfigError::Read {
        path: path.to_path_buf(),
        reason,
    })?;
    parse(&text, path)
}

fn parse_toml<'t>(
    text: &'t str,
    path: &Path,
) -> Result<(toml::Spanned<DeTable<'t>>, PathBuf), ConfigError> {
    let dir = absolute(path)
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf);
    let doc = DeTable::parse(text).map_err(|e| {
        let (line, column) = line_col(text, e.span().map_or(0, |s| s.start));
        let mut message = one_line(e.message());
        if message == "duplicate key" {
            if let Some(key) = e.span().and_then(|s| text.get(s)) {
                message = format!("duplicate key `{}`", key.trim());
            }
        }
        ConfigError::Syntax {
            path: path.to_path_buf(),
            line,
            column,
            message,
        }
    })?;
    Ok((doc, dir))
}

/// Validates config `text`. `path` is used in messages (as given) and, made absolute,
/// for [`Config::path`] and for resolving relative paths against its directory.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let (doc, dir) = parse_toml(text, path)?;
    let walker = Walker {
        text,
        path,
        dir: &dir,
    };
    walker.document(doc.get_ref(), absolute(path))
}

/// Parses a duration such as `"250ms"`, `"30s"`, `"5m"`, `"1h30m"`, `"0s"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    // humantime's own messages ("time unit needed", "unknown time unit") are terse;
    // one message with examples covers every case, a bare "30" and "-5s" included.
    humantime::parse_duration(s.trim())
        .map_err(|_| format!("invalid duration {s:?}: {DURATION_HINT}"))
}

/// Parses a size such as `"512MiB"`, `"64KiB"`, `"1GiB"`, `"100MB"`, `"4096"`,
/// `"4096B"` into bytes. Units are case-insensitive; `K/M/G/T` alone mean KiB/MiB/...
pub fn parse_size(s: &str) -> Result<u64, String> {
    let err = || format!("invalid size {s:?}: {SIZE_HINT}");
    let t = s.trim();
    let digits_end = t
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let num: String = num.chars().filter(|&c| c != '_').collect();
    if num.is_empty() {
        return Err(err());
    }
    let n: u64 = num.parse().map_err(|_| err())?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(err()),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("invalid size {s:?}: too large (at most {} bytes)", u64::MAX))
}

/// Default worker count: the number of CPUs available to this process (1..=4096).
pub fn default_workers() -> u32 {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    u32::try_from(n)
        .unwrap_or(MAX_WORKERS)
        .clamp(1, MAX_WORKERS)
}

/// The gid of group `name` (a name, or a numeric id that exists).
fn resolve_group(name: &str) -> Option<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw());
    }
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// Directory for the job store when the config does not say: `$STATE_DIRECTORY`
/// (systemd), else `/var/lib/jobvisor` for root, else `$XDG_STATE_HOME/jobvisor`, else
/// `$HOME/.local/state/jobvisor`.
pub fn default_state_dir() -> PathBuf {
    let euid = nix::unistd::geteuid();
    state_dir_from(|k| std::env::var_os(k), euid.as_raw())
}

fn state_dir_from(env: impl Fn(&str) -> Option<OsString>, euid: u32) -> PathBuf {
    if let Some(d) = first_dir(env("STATE_DIRECTORY")) {
        return d;
    }
    if euid == 0 {
        return PathBuf::from("/var/lib/jobvisor");
    }
    if let Some(d) = abs_dir(env("XDG_STATE_HOME")) {
        return d.join("jobvisor");
    }
    match abs_dir(env("HOME")) {
        Some(h) => h.join(".local/state/jobvisor"),
        None => PathBuf::from(format!("/tmp/jobvisor-{euid}/state")),
    }
}

// ---------------------------------------------------------------------------------
// The document walk.

type Value<'i> = Spanned<DeValue<'i>>;

/// Carries what every error needs: the text (for LINE:COL) and the path (for FILE).
struct Walker<'a> {
    text: &'a str,
    path: &'a Path,
    /// Absolute directory of the config file.
    dir: &'a Path,
}

/// Spans of pool keys that take part in cross-field checks.
#[derive(Default)]
struct PoolSpans {
    backoff_initial: Option<Range<usize>>,
    backoff_max: Option<Range<usize>>,
    inline_limit: Option<Range<usize>>,
    shm_size: Option<Range<usize>>,
}

impl Walker<'_> {
    fn err(&self, span: Range<usize>, key: &str, message: impl Into<String>) -> ConfigError {
        let (line, column) = line_col(self.text, span.start);
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line,
            column,
            key: key.to_owned(),
            message: message.into(),
        }
    }

    fn document(&self, doc: &DeTable<'_>, path: PathBuf) -> Result<Config, ConfigError> {
        let mut daemon = None;
        let mut store = StoreConfig::default();
        let mut semaphores = BTreeMap::new();
        let mut pools_value = None;
        for (k, v) in in_order(doc) {
            match key_str(k) {
                "daemon" => daemon = Some(self.daemon(self.table(v, "daemon")?)?),
                "store" => store = self.store(self.table(v, "store")?)?,
                "semaphores" => semaphores = self.semaphores(self.table(v, "semaphores")?)?,
                "pools" => pools_value = Some(v),
                other => return Err(self.unknown_key(k, "", other, TOP_KEYS)),
            }
        }
        // Pools are read last: their `semaphores` lists refer to `[semaphores]`,
        // which may come later in the file.
        let mut pools = BTreeMap::new();
        if let Some(v) = pools_value {
            let DeValue::Table(t) = v.get_ref() else {
                return Err(self.err(
                    v.span(),
                    "pools",
                    format!(
                        "expected a table of pools such as [pools.echo], got {}",
                        type_name(v.get_ref())
                    ),
                ));
            };
            for (k, v) in in_order(t) {
                let name = key_str(k);
                let key = join("pools", name);
                if !valid_name(name) {
                    return Err(self.err(
                        k.span(),
                        &key,
                        format!("invalid pool name {name:?}; {NAME_RULE}"),
                    ));
                }
                let pool = self.pool(name, &key, v, &semaphores)?;
                pools.insert(name.to_owned(), pool);
            }
        }
        let daemon = daemon.unwrap_or_else(DaemonConfig::defaults);
        Ok(Config {
            path,
            daemon,
            store,
            semaphores,
            pools,
        })
    }

    fn daemon(&self, t: &DeTable<'_>) -> Result<DaemonConfig, ConfigError> {
        let mut d = DaemonConfig::defaults();
        for (k, v) in in_order(t) {
            let name = key_str(k);
            let key = join("daemon", name);
            match name {
                "control_socket" => {
                    let p = self.path_value(v, &key)?;
                    let len = p.as_os_str().len();
                    if len > MAX_SOCKET_PATH_LEN {
                        return Err(self.err(
                            v.span(),
                            &key,
                            format!(
                                "socket path {} is {len} bytes; a Unix socket path must be at most {MAX_SOCKET_PATH_LEN} bytes",
                                p.display()
                            ),
                        ));
                    }
                    d.control_socket = p;
                }
                "state_dir" => d.state_dir = self.path_value(v, &key)?,
                "payload_dir" => d.payload_dir = Some(self.path_value(v, &key)?),
                "socket_mode" => d.socket_mode = self.socket_mode(v, &key)?,
                "drain_timeout" => d.drain_timeout = self.duration(v, &key)?,
                "admin_group" => {
                    let name = self.name_value(v, &key, "group")?;
                    let gid = resolve_group(&name).ok_or_else(|| {
                        self.err(
                            v.span(),
                            &key,
                            format!("no group named {name:?} on this system; create it (groupadd {name}) or remove admin_group"),
                        )
                    })?;
                    d.admin_group = Some((name, gid));
                }
                "max_connections" => {
                    d.max_connections =
                        to_u32(self.int_in(v, &key, 1, i64::from(MAX_CONNECTIONS_LIMIT))?)
                }
                "max_connections_per_user" => {
                    d.max_connections_per_user =
                        to_u32(self.int_in(v, &key, 1, i64::from(MAX_CONNECTIONS_LIMIT))?)
                }
                "metrics_listen" => {
                    let s = self.string(v, &key)?;
                    d.metrics_listen = Some(s.parse().map_err(|_| {
                        self.err(
                            v.span(),
                            &key,
                            format!("invalid address {s:?}; expected an IP address and port such as \"127.0.0.1:9187\" or \"[::1]:9187\""),
                        )
                    })?);
                }
                other => return Err(self.unknown_key(k, "daemon", other, DAEMON_KEYS)),
            }
        }
        Ok(d)
    }

    fn semaphores(&self, t: &DeTable<'_>) -> Result<BTreeMap<String, u32>, ConfigError> {
        let mut out = BTreeMap::new();
        for (k, v) in in_order(t) {
            let name = key_str(k);
            let key = join("semaphores", name);
            if !valid_name(name) {
                return Err(self.err(
                    k.span(),
                    &key,
                    format!("invalid semaphore name {name:?}; {NAME_RULE}"),
                ));
            }
            let n = self.int_in(v, &key, 1, i64::from(u32::MAX))?;
            out.insert(name.to_owned(), to_u32(n));
        }
        Ok(out)
    }

    fn pool(
        &self,
        name: &str,
        pkey: &str,
        v: &Value<'_>,
        semaphores: &BTreeMap<String, u32>,
    ) -> Result<PoolConfig, ConfigError> {
        let t = self.table(v, pkey)?;
        let mut p = PoolConfig::with_defaults(name, Vec::new(), self.dir);
        let mut has_command = false;
        let mut spans = PoolSpans::default();
        for (k, v) in in_order(t) {
            let field = key_str(k);
            let key = join(pkey, field);
            let key = key.as_str();
            match field {
                "command" => {
                    p.command = self.command(v, key)?;
                    has_command = true;
                }
                "workers" => p.workers = to_u32(self.int_in(v, key, 1, i64::from(MAX_WORKERS))?),
                "max_jobs_per_worker" => p.max_jobs_per_worker = self.u64_value(v, key, 0)?,
                "max_memory" => {
                    let n = self.size(v, key)?;
                    if n == 0 {
                        return Err(self.err(
                            v.span(),
                            key,
                            "must be greater than 0 (omit the key for no limit)",
                        ));
                    }
                    p.max_memory = Some(n);
                }
                "timeout" => {
                    let d = self.duration(v, key)?;
                    if d.is_zero() {
                        return Err(self.err(
                            v.span(),
                            key,
                            "must be greater than 0 (omit the key for no timeout)",
                        ));
                    }
                    p.timeout = Some(d);
                }
                "max_attempts" => {
                    p.max_attempts = to_u32(self.int_in(v, key, 1, i64::from(u32::MAX))?)
                }
                "queue_capacity" => p.queue_capacity = self.u64_value(v, key, 1)?,
                "semaphores" => p.semaphores = self.pool_semaphores(v, key, semaphores)?,
                "env" => p.env = self.env(v, key)?,
                "cwd" => p.cwd = self.path_value(v, key)?,
                "user" => p.user = Some(self.name_value(v, key, "user")?),
                "group" => p.group = Some(self.name_value(v, key, "group")?),
                "payloads" => {
                    p.payloads = match self.string(v, key)? {
                        "durable" => PayloadMode::Durable,
                        "memory" => PayloadMode::Memory,
                        other => {
                            return Err(self.err(
                                v.span(),
                                key,
                                format!(
                                    "unknown mode {other:?}; expected \"durable\" or \"memory\""
                                ),
                            ))
                        }
                    }
                }
                "stop_signal" => {
                    let s = self.string(v, key)?;
                    p.stop_signal = parse_signal(s).ok_or_else(|| {
                        let names: Vec<&str> = STOP_SIGNALS.iter().map(|(n, _)| *n).collect();
                        self.err(
                            v.span(),
                            key,
                            format!(
                                "unknown signal {s:?}; expected one of {} (optionally with a SIG prefix)",
                                names.join(", ")
                            ),
                        )
                    })?;
                }
                "stop_timeout" => p.stop_timeout = self.duration(v, key)?,
                "prefetch" => {
                    p.prefetch = Some(to_u32(self.int_in(v, key, 1, i64::from(MAX_PREFETCH))?))
                }
                "start_timeout" => p.start_timeout = self.positive_duration(v, key)?,
                "backoff_initial" => {
                    p.backoff_initial = self.duration(v, key)?;
                    spans.backoff_initial = Some(v.span());
                }
                "backoff_max" => {
                    p.backoff_max = self.duration(v, key)?;
                    spans.backoff_max = Some(v.span());
                }
                "healthy_after" => p.healthy_after = self.duration(v, key)?,
                "start_retries" => {
                    p.start_retries = Some(to_u32(self.int_in(v, key, 0, i64::from(u32::MAX))?))
                }
                "max_restarts" => {
                    p.max_restarts = to_u32(self.int_in(v, key, 0, i64::from(u32::MAX))?)
                }
                "restart_window" => p.restart_window = self.positive_duration(v, key)?,
                "inline_limit" => {
                    let n = self.size(v, key)?;
                    if n >= INLINE_LIMIT_CEILING {
                        return Err(self.err(
                            v.span(),
                            key,
                            format!("must be less than 64MiB, got {}", show_size(n)),
                        ));
                    }
                    p.inline_limit = n;
                    spans.inline_limit = Some(v.span());
                }
                "shm_size" => {
                    let n = self.size(v, key)?;
                    if n < MIN_SHM_SIZE {
                        return Err(self.err(
                            v.span(),
                            key,
                            format!(
                                "must be at least {MIN_SHM_SIZE} bytes, got {}",
                                show_size(n)
                            ),
                        ));
                    }
                    p.shm_size = n;
                    spans.shm_size = Some(v.span());
                }
                "result_retention" => p.result_retention = self.duration(v, key)?,
                other => return Err(self.unknown_key(k, pkey, other, POOL_KEYS)),
            }
        }
        if !has_command {
            return Err(self.err(
                v.span(),
                pkey,
                "missing required key `command`; expected e.g. command = [\"jobvisor-worker\", \"echo\"]",
            ));
        }
        self.cross_checks(&p, pkey, &spans)?;
        Ok(p)
    }

    /// Rules between keys. The error points at the key the user most likely got
    /// wrong: the one written in the file (the other being a default), or else the
    /// second of the pair.
    fn cross_checks(
        &self,
        p: &PoolConfig,
        pkey: &str,
        spans: &PoolSpans,
    ) -> Result<(), ConfigError> {
        if p.backoff_max < p.backoff_initial {
            let fmt = |d: Duration| humantime::format_duration(d).to_string();
            return Err(match (&spans.backoff_max, &spans.backoff_initial) {
                (Some(s), _) => self.err(
                    s.clone(),
                    &join(pkey, "backoff_max"),
                    format!(
                        "must be at least backoff_initial ({}), got {}",
                        fmt(p.backoff_initial),
                        fmt(p.backoff_max)
                    ),
                ),
                (None, s) => self.err(
                    s.clone().unwrap_or(0..0),
                    &join(pkey, "backoff_initial"),
                    format!(
                        "must not exceed backoff_max ({} by default), got {}",
                        fmt(p.backoff_max),
                        fmt(p.backoff_initial)
                    ),
                ),
            });
        }
        if p.inline_limit > p.shm_size {
            return Err(match (&spans.inline_limit, &spans.shm_size) {
                (Some(s), _) => self.err(
                    s.clone(),
                    &join(pkey, "inline_limit"),
                    format!(
                        "must not exceed shm_size ({}), got {}",
                        show_size(p.shm_size),
                        show_size(p.inline_limit)
                    ),
                ),
                (None, s) => self.err(
                    s.clone().unwrap_or(0..0),
                    &join(pkey, "shm_size"),
                    format!(
                        "must be at least inline_limit ({} by default), got {}",
                        show_size(p.inline_limit),
                        show_size(p.shm_size)
                    ),
                ),
            });
        }
        Ok(())
    }

    fn command(&self, v: &Value<'_>, key: &str) -> Result<Vec<String>, ConfigError> {
        let DeValue::Array(items) = v.get_ref() else {
            return Err(self.err(
                v.span(),
                key,
                format!(
                    "expected an array of strings such as [\"jobvisor-worker\", \"echo\"], got {}",
                    type_name(v.get_ref())
                ),
            ));
        };
        if items.is_empty() {
            return Err(self.err(
                v.span(),
                key,
                "must not be empty; expected the program and its arguments, e.g. [\"jobvisor-worker\", \"echo\"]",
            ));
        }
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let ikey = format!("{key}[{i}]");
            let s = self.string(item, &ikey)?;
            if i == 0 && s.is_empty() {
                return Err(self.err(item.span(), &ikey, "the program name must not be empty"));
            }
            if s.contains('\0') {
                return Err(self.err(item.span(), &ikey, "must not contain a NUL character"));
            }
            out.push(s.to_owned());
        }
        Ok(out)
    }

    fn pool_semaphores(
        &self,
        v: &Value<'_>,
        key: &str,
        defined: &BTreeMap<String, u32>,
    ) -> Result<Vec<String>, ConfigError> {
        let DeValue::Array(items) = v.get_ref() else {
            return Err(self.err(
                v.span(),
                key,
                format!(
                    "expected an array of semaphore names such as [\"gpu\"], got {}",
                    type_name(v.get_ref())
                ),
            ));
        };
        let mut out: Vec<String> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let ikey = format!("{key}[{i}]");
            let s = self.string(item, &ikey)?;
            if !defined.contains_key(s) {
                let msg = if defined.is_empty() {
                    format!("unknown semaphore {s:?}; no semaphores are defined (add it to [semaphores])")
                } else {
                    let names: Vec<&str> = defined.keys().map(String::as_str).collect();
                    format!(
                        "unknown semaphore {s:?}; expected one of the [semaphores] keys: {}",
                        names.join(", ")
                    )
                };
                return Err(self.err(item.span(), &ikey, msg));
            }
            if out.iter().any(|x| x == s) {
                return Err(self.err(
                    item.span(),
                    &ikey,
                    format!("semaphore {s:?} is listed twice; list each semaphore once"),
                ));
            }
            out.push(s.to_owned());
        }
        Ok(out)
    }

    fn env(&self, v: &Value<'_>, key: &str) -> Result<BTreeMap<String, String>, ConfigError> {
        let t = self.table(v, key)?;
        let mut out = BTreeMap::new();
        for (k, v) in in_order(t) {
            let name = key_str(k);
            let vkey = join(key, name);
            if name.is_empty() || name.contains(['=', '\0']) {
                return Err(self.err(
                    k.span(),
                    &vkey,
                    "invalid environment variable name; it must be non-empty and contain no '=' or NUL",
                ));
            }
            let DeValue::String(s) = v.get_ref() else {
                return Err(self.err(
                    v.span(),
                    &vkey,
                    format!(
                        "expected a string (environment values are strings; quote it), got {}",
                        type_name(v.get_ref())
                    ),
                ));
            };
            if s.contains('\0') {
                return Err(self.err(v.span(), &vkey, "must not contain a NUL character"));
            }
            out.insert(name.to_owned(), s.to_string());
        }
        Ok(out)
    }

    fn socket_mode(&self, v: &Value<'_>, key: &str) -> Result<u32, ConfigError> {
        const EXPECTED: &str = "expected octal permission bits such as \"0660\" (at most \"0777\")";
        let mode = match v.get_ref() {
            DeValue::String(s) => {
                if s.is_empty() || s.len() > 6 || !s.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
                    return Err(self.err(v.span(), key, format!("invalid mode {s:?}; {EXPECTED}")));
                }
                u32::from_str_radix(s, 8).map_err(|_| {
                    self.err(v.span(), key, format!("invalid mode {s:?}; {EXPECTED}"))
                })?
            }
            // `0o660` is unambiguous; a decimal integer such as 660 is almost surely a
            // mistake (it would mean 0o1224), so it is refused rather than guessed at.
            DeValue::Integer(i) if i.radix() == 8 => u32::from_str_radix(i.as_str(), 8)
                .map_err(|_| self.err(v.span(), key, format!("invalid mode; {EXPECTED}")))?,
            DeValue::Integer(i) => {
                return Err(self.err(
                    v.span(),
                    key,
                    format!(
                        "got the decimal integer {i}; write the mode as a string such as \"0660\" (or as 0o660)"
                    ),
                ))
            }
            other => {
                return Err(self.err(v.span(), key, format!("{EXPECTED}, got {}", type_name(other))))
            }
        };
        if mode > 0o777 {
            return Err(self.err(
                v.span(),
                key,
                format!("mode {mode:04o} is too large: setuid, setgid and sticky bits are not allowed; {EXPECTED}"),
            ));
        }
        Ok(mode)
    }

    // --- typed accessors -----------------------------------------------------

    fn table<'v, 'i>(&self, v: &'v Value<'i>, key: &str) -> Result<&'v DeTable<'i>, ConfigError> {
        match v.get_ref() {
            DeValue::Table(t) => Ok(t),
            other => Err(self.err(
                v.span(),
                key,
                format!("expected a table, got {}", type_name(other)),
            )),
        }
    }

    fn string<'v>(&self, v: &'v Value<'_>, key: &str) -> Result<&'v str, ConfigError> {
        match v.get_ref() {
            DeValue::String(s) => Ok(s.as_ref()),
            other => Err(self.err(
                v.span(),
                key,
                format!("expected a string, got {}", type_name(other)),
            )),
        }
    }

    fn int(&self, v: &Value<'_>, key: &str) -> Result<i64, ConfigError> {
        match v.get_ref() {
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                .map_err(|_| self.err(v.span(), key, format!("integer {i} is out of range"))),
            other => Err(self.err(
                v.span(),
                key,
                format!("expected an integer, got {}", type_name(other)),
            )),
        }
    }

    fn int_in(&self, v: &Value<'_>, key: &str, min: i64, max: i64) -> Result<i64, ConfigError> {
        let n = self.int(v, key)?;
        if n < min {
            return Err(self.err(v.span(), key, format!("must be at least {min}, got {n}")));
        }
        if n > max {
            return Err(self.err(v.span(), key, format!("must be at most {max}, got {n}")));
        }
        Ok(n)
    }

    fn u64_value(&self, v: &Value<'_>, key: &str, min: u64) -> Result<u64, ConfigError> {
        let n = self.int(v, key)?;
        match u64::try_from(n) {
            Ok(u) if u >= min => Ok(u),
            _ => Err(self.err(v.span(), key, format!("must be at least {min}, got {n}"))),
        }
    }

    fn duration(&self, v: &Value<'_>, key: &str) -> Result<Duration, ConfigError> {
        match v.get_ref() {
            DeValue::String(s) => parse_duration(s).map_err(|m| self.err(v.span(), key, m)),
            other => Err(self.err(
                v.span(),
                key,
                format!(
                    "expected a duration string such as \"30s\", got {}",
                    type_name(other)
                ),
            )),
        }
    }

    fn positive_duration(&self, v: &Value<'_>, key: &str) -> Result<Duration, ConfigError> {
        let d = self.duration(v, key)?;
        if d.is_zero() {
            return Err(self.err(v.span(), key, "must be greater than 0"));
        }
        Ok(d)
    }

    fn size(&self, v: &Value<'_>, key: &str) -> Result<u64, ConfigError> {
        match v.get_ref() {
            DeValue::String(s) => parse_size(s).map_err(|m| self.err(v.span(), key, m)),
            DeValue::Integer(_) => {
                let n = self.int(v, key)?;
                u64::try_from(n)
                    .map_err(|_| self.err(v.span(), key, format!("must not be negative, got {n}")))
            }
            other => Err(self.err(
                v.span(),
                key,
                format!(
                    "expected a size such as \"512MiB\" or a number of bytes, got {}",
                    type_name(other)
                ),
            )),
        }
    }

    /// A path, resolved against the config file's directory when relative.
    fn path_value(&self, v: &Value<'_>, key: &str) -> Result<PathBuf, ConfigError> {
        let s = self.string(v, key)?;
        if s.is_empty() {
            return Err(self.err(v.span(), key, "must not be empty; expected a path"));
        }
        if s.contains('\0') {
            return Err(self.err(v.span(), key, "must not contain a NUL character"));
        }
        Ok(clean(&self.dir.join(s)))
    }

    /// A user or group name (or numeric id as a string); existence is checked at spawn.
    fn name_value(&self, v: &Value<'_>, key: &str, what: &str) -> Result<String, ConfigError> {
        let s = self.string(v, key)?;
        if s.is_empty() || s.contains('\0') {
            return Err(self.err(
                v.span(),
                key,
                format!("expected a {what} name or numeric id, got {s:?}"),
            ));
        }
        Ok(s.to_owned())
    }

    fn unknown_key(
        &self,
        k: &Spanned<toml::de::DeString<'_>>,
        prefix: &str,
        name: &str,
        allowed: &[&str],
    ) -> ConfigError {
        let key = if prefix.is_empty() {
            quote_segment(name)
        } else {
            join(prefix, name)
        };
        let mut msg = String::from("unknown key");
        if let Some(s) = suggest(name, allowed) {
            let _ = write!(msg, " (did you mean `{s}`?)");
        }
        let _ = write!(msg, "; expected one of {}", allowed.join(", "));
        self.err(k.span(), &key, msg)
    }
}

// ---------------------------------------------------------------------------------
// Helpers.

fn key_str<'a>(k: &'a Spanned<toml::de::DeString<'_>>) -> &'a str {
    k.get_ref()
}

/// Entries of a table in document order (the map itself is sorted by key).
fn in_order<'t, 'i>(
    t: &'t DeTable<'i>,
) -> Vec<(&'t Spanned<toml::de::DeString<'i>>, &'t Value<'i>)> {
    let mut v: Vec<_> = t.iter().collect();
    v.sort_by_key(|(k, _)| k.span().start);
    v
}

/// Accepts "TERM", "SIGTERM", "term", "sigterm".
fn parse_signal(s: &str) -> Option<Signal> {
    let up = s.trim().to_ascii_uppercase();
    let bare = up.strip_prefix("SIG").unwrap_or(&up);
    STOP_SIGNALS
        .iter()
        .find(|(n, _)| *n == bare)
        .map(|(_, sig)| *sig)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `parent.seg`, quoting `seg` as TOML would need it (`pools."a.b".workers`).
fn join(parent: &str, seg: &str) -> String {
    format!("{parent}.{}", quote_segment(seg))
}

fn quote_segment(seg: &str) -> String {
    if !seg.is_empty()
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
    {
        seg.to_owned()
    } else {
        format!("{seg:?}")
    }
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// Ranges already checked by the caller.
fn to_u32(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// `12345` → "12345 bytes", `65536` → "64KiB".
pub(crate) fn show_size(n: u64) -> String {
    const UNITS: &[(u64, &str)] = &[
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for &(m, unit) in UNITS {
        if n >= m && n & (m - 1) == 0 {
            return format!("{}{unit}", n / m);
        }
    }
    format!("{n} bytes")
}

/// The closest allowed key within a small edit distance, for "did you mean".
fn suggest<'a>(name: &str, allowed: &[&'a str]) -> Option<&'a str> {
    allowed
        .iter()
        .map(|a| (edit_distance(name, a), *a))
        .filter(|(d, a)| *d <= 2.max(a.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

mod store;
pub use store::{StoreConfig, DEFAULT_NODE_TIMEOUT, DEFAULT_XMIN_WARNING};

#[cfg(test)]
mod tests;
