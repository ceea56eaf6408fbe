use super::*;
use jobvisor_client::paths::runtime_dir_from;

const FILE: &str = "/etc/jobvisor/cfg.toml";

fn ok(text: &str) -> Config {
    match parse(text, Path::new(FILE)) {
        Ok(c) => c,
        Err(e) => panic!("expected valid config, got: {e}\n---\n{text}"),
    }
}

fn err(text: &str) -> ConfigError {
    match parse(text, Path::new(FILE)) {
        Ok(c) => panic!("expected an error, got {c:?}\n---\n{text}"),
        Err(e) => e,
    }
}

const P: &str = "[pools.echo]\ncommand = [\"w\"]\n";

/// (name, config text, expected "LINE:COL: KEY: " prefix after the file name,
/// a fragment the rest of the message must contain).
const REJECTED: &[(&str, &str, &str, &str)] = &[
    (
        "unknown top-level key",
        "[daemon]\n\n[deamon]\n",
        "3:2: deamon: ",
        "unknown key (did you mean `daemon`?); expected one of daemon, store, semaphores, pools",
    ),
    (
        "unknown key in [daemon]",
        "[daemon]\nstate_dir = \"s\"\ncontrol_sock = \"x\"\n",
        "3:1: daemon.control_sock: ",
        "unknown key (did you mean `control_socket`?); expected one of control_socket",
    ),
    (
        "unknown key in a pool",
        "[pools.echo]\ncommand = [\"w\"]\ntimout = \"3s\"\n",
        "3:1: pools.echo.timout: ",
        "unknown key (did you mean `timeout`?); expected one of command, workers,",
    ),
    (
        "string for workers",
        "[pools.echo]\ncommand = [\"w\"]\nworkers = \"4\"\n",
        "3:11: pools.echo.workers: ",
        "expected an integer, got a string",
    ),
    (
        "integer for command",
        "[pools.echo]\ncommand = 3\n",
        "2:11: pools.echo.command: ",
        "expected an array of strings",
    ),
    (
        "integer inside command",
        "[pools.echo]\ncommand = [\"w\", 3]\n",
        "2:17: pools.echo.command[1]: ",
        "expected a string, got an integer",
    ),
    (
        "bad duration",
        "[pools.echo]\ncommand = [\"w\"]\ntimeout = \"30 parsecs\"\n",
        "3:11: pools.echo.timeout: ",
        "invalid duration \"30 parsecs\": expected a number with a unit such as \"250ms\", \"30s\", \"5m\"",
    ),
    (
        "negative duration",
        "[daemon]\ndrain_timeout = \"-5s\"\n",
        "2:17: daemon.drain_timeout: ",
        "invalid duration \"-5s\"",
    ),
    (
        "duration without unit",
        "[pools.echo]\ncommand = [\"w\"]\nstop_timeout = \"10\"\n",
        "3:16: pools.echo.stop_timeout: ",
        "invalid duration \"10\"",
    ),
    (
        "duration as an integer",
        "[pools.echo]\ncommand = [\"w\"]\nhealthy_after = 5\n",
        "3:17: pools.echo.healthy_after: ",
        "expected a duration string such as \"30s\", got an integer",
    ),
    (
        "bad size",
        "[pools.echo]\ncommand = [\"w\"]\nmax_memory = \"512 parsecs\"\n",
        "3:14: pools.echo.max_memory: ",
        "invalid size \"512 parsecs\": expected a whole number of bytes",
    ),
    (
        "negative size",
        "[pools.echo]\ncommand = [\"w\"]\nshm_size = -1\n",
        "3:12: pools.echo.shm_size: ",
        "must not be negative, got -1",
    ),
    (
        "workers = 0",
        "[pools.echo]\ncommand = [\"w\"]\nworkers = 0\n",
        "3:11: pools.echo.workers: ",
        "must be at least 1, got 0",
    ),
    (
        "workers too many",
        "[pools.echo]\ncommand = [\"w\"]\nworkers = 5000\n",
        "3:11: pools.echo.workers: ",
        "must be at most 4096, got 5000",
    ),
    (
        "empty command",
        "[pools.echo]\ncommand = []\n",
        "2:11: pools.echo.command: ",
        "must not be empty",
    ),
    (
        "empty argv[0]",
        "[pools.echo]\ncommand = [\"\", \"echo\"]\n",
        "2:12: pools.echo.command[0]: ",
        "the program name must not be empty",
    ),
    (
        "missing command",
        "[pools.echo]\nworkers = 2\n",
        "1:1: pools.echo: ",
        "missing required key `command`",
    ),
    (
        "unknown semaphore",
        "[semaphores]\ngpu = 2\n[pools.echo]\ncommand = [\"w\"]\nsemaphores = [\"gpu\", \"tpu\"]\n",
        "5:22: pools.echo.semaphores[1]: ",
        "unknown semaphore \"tpu\"; expected one of the [semaphores] keys: gpu",
    ),
    (
        "semaphore without [semaphores]",
        "[pools.echo]\ncommand = [\"w\"]\nsemaphores = [\"gpu\"]\n",
        "3:15: pools.echo.semaphores[0]: ",
        "no semaphores are defined",
    ),
    (
        "duplicate semaphore",
        "[semaphores]\ngpu = 2\n[pools.echo]\ncommand = [\"w\"]\nsemaphores = [\"gpu\", \"gpu\"]\n",
        "5:22: pools.echo.semaphores[1]: ",
        "semaphore \"gpu\" is listed twice",
    ),
    (
        "semaphore of value 0",
        "[semaphores]\ngpu = 0\n",
        "2:7: semaphores.gpu: ",
        "must be at least 1, got 0",
    ),
    (
        "socket_mode not octal digits",
        "[daemon]\nsocket_mode = \"rw\"\n",
        "2:15: daemon.socket_mode: ",
        "invalid mode \"rw\"; expected octal permission bits such as \"0660\"",
    ),
    (
        "metrics_listen without a port",
        "[daemon]\nmetrics_listen = \"localhost\"\n",
        "2:18: daemon.metrics_listen: ",
        "invalid address \"localhost\"; expected an IP address and port such as \"127.0.0.1:9187\"",
    ),
    (
        "socket_mode with digit 9",
        "[daemon]\nsocket_mode = \"0999\"\n",
        "2:15: daemon.socket_mode: ",
        "invalid mode \"0999\"",
    ),
    (
        "socket_mode with sticky bit",
        "[daemon]\nsocket_mode = \"1777\"\n",
        "2:15: daemon.socket_mode: ",
        "mode 1777 is too large",
    ),
    (
        "socket_mode as decimal integer",
        "[daemon]\nsocket_mode = 660\n",
        "2:15: daemon.socket_mode: ",
        "got the decimal integer 660; write the mode as a string such as \"0660\" (or as 0o660)",
    ),
    (
        "max_attempts = 0",
        "[pools.echo]\ncommand = [\"w\"]\nmax_attempts = 0\n",
        "3:16: pools.echo.max_attempts: ",
        "must be at least 1, got 0",
    ),
    (
        "prefetch = 0",
        "[pools.echo]\ncommand = [\"w\"]\nprefetch = 0\n",
        "3:12: pools.echo.prefetch: ",
        "must be at least 1, got 0",
    ),
    (
        "prefetch too large",
        "[pools.echo]\ncommand = [\"w\"]\nprefetch = 1025\n",
        "3:12: pools.echo.prefetch: ",
        "must be at most 1024, got 1025",
    ),
    (
        "queue_capacity = 0",
        "[pools.echo]\ncommand = [\"w\"]\nqueue_capacity = 0\n",
        "3:18: pools.echo.queue_capacity: ",
        "must be at least 1, got 0",
    ),
    (
        "backoff_max < backoff_initial",
        "[pools.echo]\ncommand = [\"w\"]\nbackoff_initial = \"5s\"\nbackoff_max = \"1s\"\n",
        "4:15: pools.echo.backoff_max: ",
        "must be at least backoff_initial (5s), got 1s",
    ),
    (
        "backoff_initial above the default backoff_max",
        "[pools.echo]\ncommand = [\"w\"]\nbackoff_initial = \"1m\"\n",
        "3:19: pools.echo.backoff_initial: ",
        "must not exceed backoff_max (30s by default), got 1m",
    ),
    (
        "inline_limit > shm_size",
        "[pools.echo]\ncommand = [\"w\"]\nshm_size = \"64KiB\"\ninline_limit = \"1MiB\"\n",
        "4:16: pools.echo.inline_limit: ",
        "must not exceed shm_size (64KiB), got 1MiB",
    ),
    (
        "shm_size below the default inline_limit",
        "[pools.echo]\ncommand = [\"w\"]\nshm_size = 8192\n",
        "3:12: pools.echo.shm_size: ",
        "must be at least inline_limit (64KiB by default), got 8KiB",
    ),
    (
        "inline_limit of 64MiB",
        "[pools.echo]\ncommand = [\"w\"]\ninline_limit = \"64MiB\"\n",
        "3:16: pools.echo.inline_limit: ",
        "must be less than 64MiB",
    ),
    (
        "shm_size under a page",
        "[pools.echo]\ncommand = [\"w\"]\nshm_size = 100\ninline_limit = 10\n",
        "3:12: pools.echo.shm_size: ",
        "must be at least 4096 bytes, got 100 bytes",
    ),
    (
        "zero start_timeout",
        "[pools.echo]\ncommand = [\"w\"]\nstart_timeout = \"0s\"\n",
        "3:17: pools.echo.start_timeout: ",
        "must be greater than 0",
    ),
    (
        "bad stop_signal",
        "[pools.echo]\ncommand = [\"w\"]\nstop_signal = \"SIGFOO\"\n",
        "3:15: pools.echo.stop_signal: ",
        "unknown signal \"SIGFOO\"; expected one of TERM, INT, QUIT, HUP, USR1, USR2, KILL",
    ),
    (
        "bad payloads",
        "[pools.echo]\ncommand = [\"w\"]\npayloads = \"disk\"\n",
        "3:12: pools.echo.payloads: ",
        "unknown mode \"disk\"; expected \"durable\" or \"memory\"",
    ),
    (
        "env value not a string",
        "[pools.echo]\ncommand = [\"w\"]\nenv = { A = \"x\", N = 1 }\n",
        "3:22: pools.echo.env.N: ",
        "expected a string (environment values are strings; quote it), got an integer",
    ),
    (
        "env name with '='",
        "[pools.echo]\ncommand = [\"w\"]\nenv = { \"A=B\" = \"x\" }\n",
        "3:9: pools.echo.env.\"A=B\": ",
        "invalid environment variable name",
    ),
    (
        "env not a table",
        "[pools.echo]\ncommand = [\"w\"]\nenv = [\"A=B\"]\n",
        "3:7: pools.echo.env: ",
        "expected a table, got an array",
    ),
    (
        "invalid pool name",
        "[pools.\"a b\"]\ncommand = [\"w\"]\n",
        "1:8: pools.\"a b\": ",
        "invalid pool name \"a b\"; use 1 to 64 characters from A-Z a-z 0-9 _ . -",
    ),
    (
        "pool name too long",
        "[pools.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa]\ncommand = [\"w\"]\n",
        "1:8: pools.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa: ",
        "invalid pool name",
    ),
    (
        "pools not a table",
        "pools = [\"echo\"]\n",
        "1:9: pools: ",
        "expected a table of pools such as [pools.echo], got an array",
    ),
    (
        "pools as an array of tables",
        "[[pools]]\ncommand = [\"w\"]\n",
        "1:1: pools: ",
        "expected a table of pools",
    ),
    (
        "a pool that is not a table",
        "[pools]\necho = \"w\"\n",
        "2:8: pools.echo: ",
        "expected a table, got a string",
    ),
    (
        "daemon not a table",
        "daemon = 1\n",
        "1:10: daemon: ",
        "expected a table, got an integer",
    ),
    (
        "float for workers",
        "[pools.echo]\ncommand = [\"w\"]\nworkers = 2.5\n",
        "3:11: pools.echo.workers: ",
        "expected an integer, got a float",
    ),
    (
        "empty cwd",
        "[pools.echo]\ncommand = [\"w\"]\ncwd = \"\"\n",
        "3:7: pools.echo.cwd: ",
        "must not be empty",
    ),
    (
        "zero timeout",
        "[pools.echo]\ncommand = [\"w\"]\ntimeout = \"0s\"\n",
        "3:11: pools.echo.timeout: ",
        "must be greater than 0 (omit the key for no timeout)",
    ),
    (
        "column counted in characters",
        "[pools.echo]\ncommand = [\"w\"]\nenv = { \"É\" = \"é\", B = true }\n",
        "3:24: pools.echo.env.B: ",
        "expected a string",
    ),
    (
        "first error in document order",
        "[pools.echo]\ncommand = [\"w\"]\nworkers = 0\nprefetch = 0\n",
        "3:11: pools.echo.workers: ",
        "must be at least 1",
    ),
];

#[test]
fn rejected_configs_point_at_line_col_and_key() {
    assert!(REJECTED.len() >= 20);
    let mut failures = Vec::new();
    for (name, text, prefix, fragment) in REJECTED {
        let e = err(text);
        let msg = e.to_string();
        let want_prefix = format!("{FILE}:{prefix}");
        if !msg.starts_with(&want_prefix) || !msg.contains(fragment) || msg.contains('\n') {
            failures.push(format!(
                "{name}:\n  got  {msg}\n  want {want_prefix}...{fragment}"
            ));
        }
        assert!(matches!(e, ConfigError::Invalid { .. }), "{name}: {e:?}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn error_accessors() {
    let e = err("[pools.echo]\ncommand = [\"w\"]\nworkers = 0\n");
    assert_eq!(e.position(), Some((3, 11)));
    assert_eq!(e.key(), Some("pools.echo.workers"));
}

#[test]
fn toml_syntax_errors_are_one_line_with_position() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[daemon]\ndrain_timeout = = \"3s\"\n",
            "2:17: invalid TOML: ",
            "extra `=`",
        ),
        ("a = \"x\n", "1:7: invalid TOML: ", "invalid basic string"),
        (
            "[daemon]\nstate_dir = \"a\"\nstate_dir = \"b\"\n",
            "3:1: invalid TOML: ",
            "duplicate key `state_dir`",
        ),
        ("[pools.echo\n", "1:", "invalid TOML"),
        ("x = [1,\n2\n", "2:2: invalid TOML: ", "unclosed array"),
        (
            "[a]\nb = 1\n[a]\n",
            "3:2: invalid TOML: ",
            "duplicate key `a`",
        ),
        ("s = 'a\nb'\n", "2:3: invalid TOML: ", "key with no value"),
    ];
    for (text, prefix, fragment) in cases {
        let e = err(text);
        let msg = e.to_string();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{msg}");
        assert!(msg.starts_with(&format!("{FILE}:{prefix}")), "{msg}");
        assert!(msg.contains(fragment), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
}

#[test]
fn unreadable_file_is_one_line() {
    let e = match load(Path::new("/nonexistent/jobvisor.toml")) {
        Ok(_) => panic!("loaded a missing file"),
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(
        msg.starts_with("cannot read config /nonexistent/jobvisor.toml: "),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
    assert!(
        std::error::Error::source(&e).is_none(),
        "cause is in the message, not repeated"
    );
}

#[test]
fn every_key_parses_to_its_value() {
    let c = ok(r#"
[daemon]
control_socket = "/run/jv/ctl.sock"
state_dir = "/var/lib/jv"
payload_dir = "/dev/shm/jv"
socket_mode = "0600"
drain_timeout = "1m"
admin_group = "root"
max_connections = 100
max_connections_per_user = 8
metrics_listen = "[::1]:9187"

[semaphores]
gpu = 2
disk = 1

[pools.echo]
command = ["jobvisor-worker", "echo", ""]
workers = 3
max_jobs_per_worker = 10000
max_memory = "512MiB"
timeout = "1h30m"
max_attempts = 5
queue_capacity = 7
semaphores = ["gpu", "disk"]
env = { RUST_LOG = "info", EMPTY = "" }
cwd = "/srv/work"
user = "nobody"
group = "nogroup"
stop_signal = "SIGINT"
stop_timeout = "3s"
prefetch = 4
start_timeout = "2s"
backoff_initial = "0s"
backoff_max = "2m"
healthy_after = "250ms"
max_restarts = 0
restart_window = "10m"
inline_limit = 4096
shm_size = "1GiB"
result_retention = "7days"
payloads = "memory"
"#);
    assert_eq!(c.path, PathBuf::from(FILE));
    assert_eq!(
        c.daemon,
        DaemonConfig {
            control_socket: "/run/jv/ctl.sock".into(),
            state_dir: "/var/lib/jv".into(),
            payload_dir: Some("/dev/shm/jv".into()),
            socket_mode: 0o600,
            drain_timeout: Duration::from_secs(60),
            admin_group: Some(("root".into(), 0)),
            max_connections: 100,
            max_connections_per_user: 8,
            metrics_listen: Some("[::1]:9187".parse().unwrap()),
        }
    );
    assert_eq!(
        c.semaphores,
        BTreeMap::from([("gpu".into(), 2), ("disk".into(), 1)])
    );
    let want = PoolConfig {
        name: "echo".into(),
        command: vec!["jobvisor-worker".into(), "echo".into(), String::new()],
        workers: 3,
        max_jobs_per_worker: 10_000,
        max_memory: Some(512 << 20),
        timeout: Some(Duration::from_secs(5400)),
        max_attempts: 5,
        queue_capacity: 7,
        semaphores: vec!["gpu".into(), "disk".into()],
        env: BTreeMap::from([
            ("RUST_LOG".into(), "info".into()),
            ("EMPTY".into(), String::new()),
        ]),
        cwd: "/srv/work".into(),
        user: Some("nobody".into()),
        group: Some("nogroup".into()),
        stop_signal: Signal::SIGINT,
        stop_timeout: Duration::from_secs(3),
        prefetch: Some(4),
        start_timeout: Duration::from_secs(2),
        backoff_initial: Duration::ZERO,
        backoff_max: Duration::from_secs(120),
        healthy_after: Duration::from_millis(250),
        max_restarts: 0,
        start_retries: None,
        restart_window: Duration::from_secs(600),
        inline_limit: 4096,
        shm_size: 1 << 30,
        result_retention: Duration::from_secs(7 * 86_400),
        payloads: PayloadMode::Memory,
    };
    assert_eq!(c.pools.len(), 1);
    assert_eq!(c.pools["echo"], want);
}

#[test]
fn defaults_apply_when_keys_are_absent() {
    let c = ok(P);
    let p = &c.pools["echo"];
    assert_eq!(
        *p,
        PoolConfig::with_defaults("echo", vec!["w".into()], Path::new("/etc/jobvisor"))
    );
    assert_eq!(p.workers, default_workers());
    assert!(p.workers >= 1);
    assert_eq!(p.max_jobs_per_worker, 0);
    assert_eq!(p.max_memory, None);
    assert_eq!(p.timeout, None);
    assert_eq!(p.max_attempts, 3);
    assert_eq!(p.queue_capacity, 100_000);
    assert_eq!(p.stop_signal, Signal::SIGTERM);
    assert_eq!(p.stop_timeout, Duration::from_secs(10));
    assert_eq!(p.prefetch, None, "absent: adaptive");
    assert_eq!(p.start_timeout, Duration::from_secs(10));
    assert_eq!(p.backoff_initial, Duration::from_millis(100));
    assert_eq!(p.backoff_max, Duration::from_secs(30));
    assert_eq!(p.healthy_after, Duration::from_secs(5));
    assert_eq!(p.max_restarts, 10);
    assert_eq!(p.restart_window, Duration::from_secs(60));
    assert_eq!(p.inline_limit, 64 * 1024);
    assert_eq!(p.shm_size, 256 * 1024 * 1024);
    assert_eq!(p.result_retention, Duration::from_secs(86_400));
    assert_eq!(p.cwd, PathBuf::from("/etc/jobvisor"));

    assert_eq!(c.daemon.socket_mode, 0o660);
    assert_eq!(c.daemon.drain_timeout, Duration::from_secs(30));
    assert_eq!(
        c.daemon.control_socket,
        default_runtime_dir().join("jobvisor.sock")
    );
    assert_eq!(c.daemon.state_dir, default_state_dir());
    assert!(c.semaphores.is_empty());

    // An empty file is a valid config with no pools.
    let empty = ok("");
    assert!(empty.pools.is_empty());
    assert_eq!(empty.daemon, c.daemon);
    // So is an empty [daemon] section.
    assert_eq!(ok("[daemon]\n").daemon, c.daemon);
}

#[test]
fn relative_paths_resolve_against_the_config_directory() {
    let c = ok(r#"
[daemon]
control_socket = "jobvisor.sock"
state_dir = "./state"
[pools.a]
command = ["w"]
cwd = "."
[pools.b]
command = ["w"]
cwd = "sub/dir"
[pools.c]
command = ["w"]
cwd = "../other"
"#);
    assert_eq!(
        c.daemon.control_socket,
        PathBuf::from("/etc/jobvisor/jobvisor.sock")
    );
    assert_eq!(c.daemon.state_dir, PathBuf::from("/etc/jobvisor/state"));
    assert_eq!(
        c.daemon.payload_dir(),
        PathBuf::from("/etc/jobvisor/state/payloads"),
        "by default inside state_dir"
    );
    assert_eq!(c.pools["a"].cwd, PathBuf::from("/etc/jobvisor"));
    assert_eq!(c.pools["b"].cwd, PathBuf::from("/etc/jobvisor/sub/dir"));
    assert_eq!(c.pools["c"].cwd, PathBuf::from("/etc/jobvisor/../other"));

    // A relative config path is made absolute against the current directory.
    let cwd = std::env::current_dir().expect("cwd");
    let c = match parse("[daemon]\nstate_dir = \"s\"\n", Path::new("rel/cfg.toml")) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(c.path, cwd.join("rel/cfg.toml"));
    assert_eq!(c.daemon.state_dir, cwd.join("rel/s"));
}

#[test]
fn socket_path_too_long_is_refused() {
    let long = format!("[daemon]\ncontrol_socket = \"/{}\"\n", "x".repeat(120));
    let msg = err(&long).to_string();
    assert!(
        msg.starts_with(&format!("{FILE}:2:18: daemon.control_socket: ")),
        "{msg}"
    );
    assert!(msg.contains("at most 107 bytes"), "{msg}");
}

#[test]
fn alternative_spellings_are_accepted() {
    let c = ok(r#"
[daemon]
socket_mode = 0o640
[pools.a]
command = ["w"]
stop_signal = "hup"
max_memory = 1048576
[pools."b.c-d_1"]
command = ["w"]
stop_signal = "KILL"
[pools.d]
command = ["w"]
[pools.d.env]
A = "1"
"#);
    assert_eq!(c.daemon.socket_mode, 0o640);
    assert_eq!(c.pools["a"].stop_signal, Signal::SIGHUP);
    assert_eq!(c.pools["a"].max_memory, Some(1 << 20));
    assert_eq!(c.pools["b.c-d_1"].stop_signal, Signal::SIGKILL);
    assert_eq!(c.pools["d"].env["A"], "1");
    // Key paths quote segments TOML would need quoted.
    let e = err("[pools.\"b.c\"]\ncommand = [\"w\"]\nworkers = 0\n");
    assert_eq!(e.key(), Some("pools.\"b.c\".workers"));
}

#[test]
fn durations() {
    let cases: &[(&str, Duration)] = &[
        ("250ms", Duration::from_millis(250)),
        ("30s", Duration::from_secs(30)),
        ("5m", Duration::from_secs(300)),
        ("1h30m", Duration::from_secs(5400)),
        ("0s", Duration::ZERO),
        (" 2s ", Duration::from_secs(2)),
    ];
    for (s, d) in cases {
        assert_eq!(parse_duration(s), Ok(*d), "{s}");
    }
    for s in ["", "30", "-5s", "5 parsecs", "s", "1.5.3s"] {
        let e = parse_duration(s).expect_err(s);
        assert!(
            e.starts_with(&format!("invalid duration {s:?}: expected")),
            "{e}"
        );
    }
}

#[test]
fn sizes() {
    let cases: &[(&str, u64)] = &[
        ("512MiB", 512 << 20),
        ("64KiB", 64 << 10),
        ("1GiB", 1 << 30),
        ("100MB", 100_000_000),
        ("4096", 4096),
        ("4096B", 4096),
        ("2 kib", 2048),
        ("1_000kB", 1_000_000),
        ("1T", 1 << 40),
    ];
    for (s, n) in cases {
        assert_eq!(parse_size(s), Ok(*n), "{s}");
    }
    for s in [
        "",
        "MiB",
        "-1",
        "1.5GiB",
        "12 parsecs",
        "0x10",
        "99999999999TiB",
    ] {
        let e = parse_size(s).expect_err(s);
        assert!(e.starts_with(&format!("invalid size {s:?}: ")), "{e}");
    }
}

#[test]
fn same_worker_spec_tracks_only_process_shaping_keys() {
    let base = PoolConfig::with_defaults("p", vec!["w".into()], Path::new("/"));
    let mut policy = base.clone();
    policy.workers = 7;
    policy.timeout = Some(Duration::from_secs(1));
    policy.max_attempts = 9;
    policy.prefetch = Some(8);
    policy.backoff_max = Duration::from_secs(99);
    policy.stop_signal = Signal::SIGINT;
    assert!(base.same_worker_spec(&policy));

    type Change = fn(&mut PoolConfig);
    let changes: &[Change] = &[
        |p| p.command.push("x".into()),
        |p| {
            p.env.insert("A".into(), "b".into());
        },
        |p| p.cwd = "/tmp".into(),
        |p| p.user = Some("u".into()),
        |p| p.group = Some("g".into()),
        |p| p.inline_limit += 1,
        |p| p.shm_size += 4096,
        |p| p.start_timeout += Duration::from_secs(1),
    ];
    for change in changes {
        let mut other = base.clone();
        change(&mut other);
        assert!(!base.same_worker_spec(&other), "{other:?}");
    }
}

#[test]
fn default_dirs_follow_design_section_6() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    };
    // systemd wins, first entry of a colon-separated list.
    let sd = env(&[
        ("RUNTIME_DIRECTORY", "/run/jv:/run/other"),
        ("STATE_DIRECTORY", "/var/lib/jv"),
        ("XDG_RUNTIME_DIR", "/run/user/1000"),
    ]);
    assert_eq!(runtime_dir_from(sd, 1000), PathBuf::from("/run/jv"));
    assert_eq!(state_dir_from(sd, 0), PathBuf::from("/var/lib/jv"));
    // root.
    let xdg = env(&[
        ("XDG_RUNTIME_DIR", "/run/user/1000"),
        ("XDG_STATE_HOME", "/home/u/.st"),
        ("HOME", "/home/u"),
    ]);
    assert_eq!(runtime_dir_from(xdg, 0), PathBuf::from("/run/jobvisor"));
    assert_eq!(state_dir_from(xdg, 0), PathBuf::from("/var/lib/jobvisor"));
    // a user with XDG variables.
    assert_eq!(
        runtime_dir_from(xdg, 1000),
        PathBuf::from("/run/user/1000/jobvisor")
    );
    assert_eq!(
        state_dir_from(xdg, 1000),
        PathBuf::from("/home/u/.st/jobvisor")
    );
    // a user without them (relative XDG values are ignored, as the XDG spec says).
    let bare = env(&[("HOME", "/home/u"), ("XDG_STATE_HOME", "rel")]);
    assert_eq!(
        runtime_dir_from(bare, 1000),
        PathBuf::from("/tmp/jobvisor-1000")
    );
    assert_eq!(
        state_dir_from(bare, 1000),
        PathBuf::from("/home/u/.local/state/jobvisor")
    );
    let nothing = env(&[]);
    assert_eq!(
        state_dir_from(nothing, 1000),
        PathBuf::from("/tmp/jobvisor-1000/state")
    );
}

#[test]
fn line_col_counts_characters() {
    assert_eq!(line_col("abc", 0), (1, 1));
    assert_eq!(line_col("ab\ncd", 3), (2, 1));
    assert_eq!(line_col("ab\ncd", 4), (2, 2));
    assert_eq!(line_col("é = 1", 3), (1, 3));
    assert_eq!(line_col("é", 1), (1, 1), "inside a character: its start");
    assert_eq!(line_col("ab", 99), (1, 3));
}

#[test]
fn example_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.example.toml");
    let text = include_str!("../../../config.example.toml");
    let c = match parse(text, &path) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let root = clean(&absolute(&path))
        .parent()
        .map(Path::to_path_buf)
        .expect("parent");
    assert_eq!(c.daemon.control_socket, root.join("jobvisor.sock"));
    assert_eq!(c.daemon.state_dir, root.join("state"));
    assert_eq!(c.pools["echo"].command, ["jobvisor-worker", "echo"]);
    assert_eq!(c.pools["echo"].workers, 2);
    assert_eq!(c.pools["sha256"].command, ["jobvisor-worker", "sha256"]);
    assert_eq!(c.pools["sha256"].workers, 1);
    assert!(c.semaphores.contains_key("gpu"));
    assert_eq!(c.pools["echo"].cwd, root);
}

#[test]
fn crlf_and_bom() {
    let c = ok("\u{feff}[pools.echo]\r\ncommand = [\"w\"]\r\nworkers = 2\r\n");
    assert_eq!(c.pools["echo"].workers, 2);
    let e = err("[pools.echo]\r\ncommand = [\"w\"]\r\nworkers = 0\r\n");
    assert_eq!(e.position(), Some((3, 11)));
}

#[test]
fn admin_group_must_exist_and_caps_be_positive() {
    let e = err("[daemon]\nadmin_group = \"no-such-group-jv\"\n").to_string();
    assert!(
        e.contains("daemon.admin_group") && e.contains("no group named"),
        "{e}"
    );
    let e = err("[daemon]\nmax_connections = 0\n").to_string();
    assert!(e.contains("daemon.max_connections"), "{e}");
    let e = err("[daemon]\nmax_connections_per_user = -1\n").to_string();
    assert!(e.contains("daemon.max_connections_per_user"), "{e}");
}

#[test]
fn store_url_is_sqlite_by_default_or_a_postgres_url() {
    assert_eq!(ok(P).store.url, None);
    assert_eq!(
        ok(&format!("[store]\nurl = \"sqlite\"\n{P}")).store.url,
        None
    );
    for url in [
        "postgres://jobvisor@db.example:5433/jobs?connect_timeout=5",
        "postgresql://u:secret@127.0.0.1/db",
        "postgres://u@%2Frun%2Fpostgresql/db",
        "postgres://u@db.example/jobs?sslmode=verify-full&sslrootcert=system",
        "postgres://u@db.example/jobs?sslmode=require&sslcert=/etc/c.pem&sslkey=/etc/k.pem",
    ] {
        let c = ok(&format!("[store]\nurl = \"{url}\"\n{P}"));
        assert_eq!(c.store.url.as_deref(), Some(url));
    }
    // A Unix socket directory, percent-encoded, is one.
    let unix: postgres::Config = "postgres://u@%2Frun%2Fpostgresql/db".parse().unwrap();
    assert!(matches!(
        unix.get_hosts(),
        [postgres::config::Host::Unix(p)] if p == Path::new("/run/postgresql")
    ));
    // The password never shows in messages.
    let c = ok(&format!(
        "[store]\nurl = \"postgresql://u:secret@127.0.0.1/db\"\n{P}"
    ));
    assert_eq!(
        c.store.display_url().as_deref(),
        Some("postgresql://u:***@127.0.0.1/db")
    );
    for (text, fragment) in [
        (
            "[store]\nurl = \"mysql://x/y\"\n",
            "2:7: store.url: expected \"sqlite\"",
        ),
        (
            "[store]\nurl = \"postgres://u@h:notaport/db\"\n",
            "store.url: not a valid PostgreSQL URL",
        ),
        (
            "[store]\nurl = \"postgres://u@h/db?sslmode=verify-full\"\n",
            "store.url: not a valid PostgreSQL URL (sslmode=verify-full: give sslrootcert",
        ),
        (
            "[store]\nurl = \"postgres://u@h/db?sslcrl=/x\"\n",
            "store.url: not a valid PostgreSQL URL",
        ),
        ("[store]\nurl = 5\n", "store.url: "),
        (
            "[store]\nuri = \"sqlite\"\n",
            "store.uri: unknown key (did you mean `url`?)",
        ),
    ] {
        let e = err(&format!("{text}{P}")).to_string();
        assert!(e.contains(fragment), "{e}");
    }
}
