//! The command line (clap) and the parsing of values clap cannot check with
//! a message of ours: durations, job states, job options.

use super::Failure;
use clap::{ArgGroup, Parser, Subcommand};
use ipc_proto::control::{JobOptions, JobState};
use std::path::PathBuf;

/// Jobs listed by `jobs` unless `--limit` says otherwise.
pub const DEFAULT_JOBS_LIMIT: u32 = 1000;

/// Control a running jobvisord.
#[derive(Parser, Debug)]
#[command(
    name = "jobvisorctl",
    version,
    after_help = "Exit codes: 0 ok; 1 a job failed (did not succeed); 2 usage or invalid \
                  input (also: an admin command from a non-admin); 3 the daemon is \
                  unreachable (not running, or its socket directory cannot be trusted); \
                  4 not found (no such pool or job); 5 rejected for now (queue full, pool \
                  failed, shutting down, over a connection cap): retry later."
)]
pub struct Args {
    /// Control socket [default: $JOBVISOR_SOCKET, else the config's
    /// daemon.control_socket, else the default runtime path]
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Read the control socket path from this configuration file.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print JSON: one document per command (`jobs`, `logs`: an array);
    /// the streams `map`, `wait`, `events` and `logs -f` print one object
    /// per line; errors are objects {"error", "exit_code"} on stderr.
    #[arg(long, global = true)]
    pub json: bool,
    /// The command.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// `jobvisorctl`'s commands (documented in README.md).
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Pools and workers.
    Status {
        /// Only this pool.
        pool: Option<String>,
        /// The nodes sharing this daemon's PostgreSQL store instead: host,
        /// pid, heartbeat age, workers, running and held jobs.
        #[arg(long, conflicts_with = "pool")]
        cluster: bool,
    },
    /// Set a pool's number of workers. It holds until a reload changes that
    /// pool's configuration (then its `workers` applies again); a reload
    /// that leaves the pool as it was keeps it.
    Scale {
        /// The pool.
        pool: String,
        /// Number of workers (0: none; queued jobs wait).
        workers: u32,
    },
    /// Replace every worker of a pool; clears the `failed` state. Returns
    /// once every new worker is ready (exit 5 if the pool fails instead).
    Restart {
        /// The pool.
        pool: String,
        /// Return as soon as the daemon has begun.
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop handing jobs to a pool's workers: they stay up, running jobs
    /// finish, queued ones wait (and new ones queue) until `resume`.
    Pause {
        /// The pool.
        pool: String,
    },
    /// Hand a paused pool's queued jobs to its workers again.
    Resume {
        /// The pool.
        pool: String,
    },
    /// Re-read the daemon's configuration file. Returns once every pool's
    /// workers run the new configuration (exit 5 if a pool fails instead).
    Reload {
        /// Return as soon as the daemon has accepted the configuration.
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop the daemon: let running jobs finish, then stop workers.
    /// Returns once the daemon has exited.
    Shutdown {
        /// Stop at once.
        #[arg(long)]
        now: bool,
        /// Return as soon as the daemon has begun.
        #[arg(long)]
        no_wait: bool,
    },
    /// Queue one job and print its id (with --wait: its output).
    Submit(SubmitArgs),
    /// Run one job per line of stdin; print one output line per job.
    Map(MapArgs),
    /// Wait for jobs to finish; exit 0 only if every one succeeded.
    Wait {
        /// Job ids.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<u64>,
    },
    /// Print a finished job's output (raw bytes; the document with --json).
    Result {
        /// Job id.
        id: u64,
    },
    /// Cancel queued or running jobs: by id, or every one of a pool.
    Cancel {
        /// Job ids.
        #[arg(
            value_name = "ID",
            required_unless_present = "pool",
            conflicts_with = "pool"
        )]
        ids: Vec<u64>,
        /// Every queued and running job of this pool (yours, unless you are
        /// an admin).
        #[arg(long, value_name = "POOL")]
        pool: Option<String>,
        /// With --pool: only the jobs in this state (queued or running).
        #[arg(long, value_name = "STATE", requires = "pool")]
        state: Option<String>,
    },
    /// List jobs, newest first, a page at a time.
    ///
    /// A full page ends with the command for the next one on stderr.
    Jobs(JobsArgs),
    /// Queue failed, dead, cancelled or timed-out jobs again.
    ///
    /// Their attempts are kept, and each gets at least one more.
    Retry {
        /// Job ids.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<u64>,
    },
    /// Delete finished jobs from the store, with their outputs.
    ///
    /// Yours; an admin's: everyone's. Without options: every finished job.
    Prune {
        /// Only jobs that finished before this: a time ago (7d, 12h) or a
        /// UTC time (2026-12-03T10:00:00Z).
        #[arg(long, value_name = "WHEN")]
        before: Option<String>,
        /// Only jobs in this state (succeeded, failed, cancelled,
        /// timed_out, dead).
        #[arg(long, value_name = "STATE")]
        state: Option<String>,
        /// Only jobs of this pool.
        #[arg(long, value_name = "POOL")]
        pool: Option<String>,
    },
    /// Stream worker and job events, one line each, until interrupted.
    Events,
    /// Print the recent output of a pool's workers; -f follows it.
    ///
    /// Oldest first. The daemon keeps the last 1,000 lines or 128 KiB of
    /// each worker, across its restarts. Admin only.
    Logs {
        /// POOL, or POOL/N for worker N only.
        #[arg(value_name = "POOL[/N]")]
        target: String,
        /// Keep printing new lines until interrupted (--json: one object
        /// per line).
        #[arg(short, long)]
        follow: bool,
        /// How many of the last lines to print.
        #[arg(short = 'n', long, value_name = "LINES", default_value_t = 50)]
        lines: u32,
        /// Only lines since a time ago (10m, 1h30m) or since a UTC time
        /// (2026-12-03T10:00:00Z, or "2026-12-03 10:00:00").
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
    },
    /// Live view of pools, workers, queues and rates; q quits.
    ///
    /// Redraws every --interval, and sooner when something happens. When
    /// stdout is not a terminal: one snapshot.
    Top {
        /// How often to refresh, e.g. 1s, 500ms.
        #[arg(long, value_name = "DURATION", default_value = "1s")]
        interval: String,
    },
    /// Print the daemon's metrics in the Prometheus text format.
    ///
    /// The same text as the HTTP listener's /metrics (daemon.metrics_listen).
    Metrics,
    /// Print a shell completion script (e.g. `source <(jobvisorctl
    /// completions bash)`, or save it where your shell loads completions).
    Completions {
        /// bash, zsh or fish.
        #[arg(value_name = "SHELL", value_parser = ["bash", "zsh", "fish"])]
        shell: String,
    },
    /// Write the man pages (jobvisorctl.1 and one per command) into DIR,
    /// e.g. ~/.local/share/man/man1 or /usr/local/share/man/man1.
    Man {
        /// The directory (created if missing).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// `jobs`' arguments.
#[derive(clap::Args, Debug)]
pub struct JobsArgs {
    /// Only jobs of this pool.
    #[arg(long, value_name = "POOL")]
    pub pool: Option<String>,
    /// Only jobs in this state (queued, running, succeeded, failed,
    /// cancelled, timed_out, dead).
    #[arg(long, value_name = "STATE")]
    pub state: Option<String>,
    /// Only jobs submitted since: a time ago (10m, 2h) or a UTC time
    /// (2026-12-03T10:00:00Z).
    #[arg(long, value_name = "WHEN")]
    pub since: Option<String>,
    /// Only jobs with an id below this one (the next page).
    #[arg(long, value_name = "ID")]
    pub before: Option<u64>,
    /// At most this many jobs (a page).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_JOBS_LIMIT)]
    pub limit: u32,
}

/// Options every submitted job may carry.
#[derive(clap::Args, Debug, Default)]
pub struct JobOpts {
    /// Hard timeout per attempt, e.g. 30s, 250ms [default: the pool's].
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Attempts before the job is dead [default: the pool's].
    #[arg(long, value_name = "N")]
    pub max_attempts: Option<u32>,
    /// Higher runs first; FIFO within a priority.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub priority: i32,
}

/// `submit`'s arguments.
#[derive(clap::Args, Debug)]
#[command(group(ArgGroup::new("source").args(["stdin", "input", "input_file"])))]
pub struct SubmitArgs {
    /// Target pool.
    pub pool: String,
    /// `-` reads the input from stdin (binary safe). Without any input
    /// option the input is empty.
    #[arg(value_name = "-")]
    pub stdin: Option<String>,
    /// The input, as given.
    #[arg(long, value_name = "TEXT")]
    pub input: Option<String>,
    /// Read the input from this file.
    #[arg(long, value_name = "FILE")]
    pub input_file: Option<PathBuf>,
    /// Job options.
    #[command(flatten)]
    pub opts: JobOpts,
    /// At most one running job per key, daemon-wide.
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// Wait for the job and print its output; exit 1 if it did not succeed.
    #[arg(long)]
    pub wait: bool,
    /// Where this job's large payloads live, instead of the pool's
    /// `payloads`: `memory` (never in payload_dir; lost with the daemon)
    /// or `durable`.
    #[arg(long, value_name = "MODE", value_parser = ["durable", "memory"])]
    pub payloads: Option<String>,
}

/// `map`'s arguments.
#[derive(clap::Args, Debug)]
pub struct MapArgs {
    /// Target pool.
    pub pool: String,
    /// Print outputs in input order rather than as jobs finish.
    #[arg(long)]
    pub ordered: bool,
    /// Job options (the same for every line).
    #[command(flatten)]
    pub opts: JobOpts,
}

/// Parses a `--timeout`-style duration (`30s`, `250ms`, `1m 30s`) into whole
/// milliseconds, rounding up so that `500us` does not become "no time".
pub fn parse_duration_ms(flag: &str, s: &str) -> Result<u64, String> {
    use humantime::DurationError as E;
    let d = humantime::parse_duration(s.trim()).map_err(|e| match e {
        E::UnknownUnit { unit, .. } if unit.is_empty() => {
            format!("invalid {flag} '{s}': a unit is needed, e.g. 30s or 250ms")
        }
        // Its message lists the units.
        E::UnknownUnit { .. } => format!("invalid {flag} '{s}': {e}"),
        _ => format!("invalid {flag} '{s}': {e}; write e.g. 30s, 250ms or 1m30s"),
    })?;
    if d.is_zero() {
        return Err(format!("invalid {flag} '{s}': must be greater than zero"));
    }
    let ms = d.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).map_err(|_| format!("invalid {flag} '{s}': too long"))
}

/// Parses a `--since`: a duration ago (`10m`) or a UTC time
/// (`2026-12-03T10:00:00Z`, `2026-12-03 10:00:00`), into ms since the
/// epoch.
pub fn parse_since(flag: &str, s: &str) -> Result<u64, String> {
    use std::time::{SystemTime, UNIX_EPOCH};
    let s = s.trim();
    let at = if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        t
    } else {
        let ago = humantime::parse_duration(s).map_err(|_| {
            format!(
                "invalid {flag} '{s}': write a time ago (10m, 2h, 1d) or a UTC time (2026-12-03T10:00:00Z)"
            )
        })?;
        SystemTime::now()
            .checked_sub(ago)
            .ok_or_else(|| format!("invalid {flag} '{s}': too long ago"))?
    };
    Ok(at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64))
}

/// Parses a job state name (`JobState::as_str`); the error lists the valid
/// ones.
pub fn parse_state(s: &str) -> Result<JobState, String> {
    JobState::parse(s).ok_or_else(|| {
        let valid: Vec<&str> = JobState::ALL.iter().map(|st| st.as_str()).collect();
        format!(
            "unknown job state '{s}'; valid states: {}",
            valid.join(", ")
        )
    })
}

/// The protocol's options from the command line's.
pub fn job_options(opts: &JobOpts, key: Option<String>) -> Result<JobOptions, Failure> {
    let timeout_ms = match &opts.timeout {
        Some(t) => Some(parse_duration_ms("--timeout", t).map_err(Failure::usage)?),
        None => None,
    };
    if opts.max_attempts == Some(0) {
        return Err(Failure::usage(
            "invalid --max-attempts 0: a job needs at least one attempt".into(),
        ));
    }
    Ok(JobOptions {
        timeout_ms,
        max_attempts: opts.max_attempts,
        priority: opts.priority,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_to_milliseconds() {
        assert_eq!(parse_duration_ms("--timeout", "30s"), Ok(30_000));
        assert_eq!(parse_duration_ms("--timeout", "250ms"), Ok(250));
        assert_eq!(parse_duration_ms("--timeout", "1m 30s"), Ok(90_000));
        assert_eq!(parse_duration_ms("--timeout", "2h"), Ok(7_200_000));
        // Below a millisecond rounds up rather than to zero.
        assert_eq!(parse_duration_ms("--timeout", "500us"), Ok(1));
    }

    #[test]
    fn bad_durations_say_what_to_write() {
        let e = parse_duration_ms("--timeout", "30").unwrap_err();
        assert!(e.starts_with("invalid --timeout '30': "), "{e}");
        assert!(e.ends_with("a unit is needed, e.g. 30s or 250ms"), "{e}");
        let e = parse_duration_ms("--timeout", "3 parsecs").unwrap_err();
        assert!(e.contains("supported units"), "{e}");
        assert!(parse_duration_ms("--timeout", "soon").is_err());
        assert!(parse_duration_ms("--timeout", "").is_err());
        let e = parse_duration_ms("--timeout", "0s").unwrap_err();
        assert!(e.contains("greater than zero"), "{e}");
    }

    #[test]
    fn since_takes_an_age_or_a_time() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let t = parse_since("--since", "10m").unwrap();
        assert!(t <= now - 600_000 && t > now - 610_000, "{t} {now}");
        assert_eq!(parse_since("--since", "1970-01-01T00:00:01Z"), Ok(1000));
        assert_eq!(parse_since("--since", "1970-01-01 00:01:00"), Ok(60_000));
        let e = parse_since("--since", "yesterday").unwrap_err();
        assert!(e.contains("write a time ago"), "{e}");
    }

    #[test]
    fn states_parse_by_name_and_errors_list_them() {
        for st in JobState::ALL {
            assert_eq!(parse_state(st.as_str()), Ok(st));
        }
        assert_eq!(parse_state("timed_out"), Ok(JobState::TimedOut));
        let e = parse_state("done").unwrap_err();
        assert_eq!(
            e,
            "unknown job state 'done'; valid states: queued, running, succeeded, failed, \
             cancelled, timed_out, dead"
        );
        assert!(parse_state("Succeeded").is_err());
    }

    #[test]
    fn job_options_carry_the_flags() {
        let o = JobOpts {
            timeout: Some("2s".into()),
            max_attempts: Some(5),
            priority: -3,
        };
        let j = job_options(&o, Some("k".into())).unwrap();
        assert_eq!(
            j,
            JobOptions {
                timeout_ms: Some(2000),
                max_attempts: Some(5),
                priority: -3,
                key: Some("k".into()),
            }
        );
        assert_eq!(
            job_options(&JobOpts::default(), None).unwrap(),
            JobOptions::default()
        );
        let bad = JobOpts {
            max_attempts: Some(0),
            ..JobOpts::default()
        };
        assert_eq!(job_options(&bad, None).unwrap_err().code, 2);
    }

    #[test]
    fn command_line_shapes() {
        let a = Args::try_parse_from(["jobvisorctl", "submit", "echo", "--priority", "-5", "-"])
            .unwrap();
        match a.cmd {
            Cmd::Submit(s) => {
                assert_eq!(s.opts.priority, -5);
                assert_eq!(s.stdin.as_deref(), Some("-"));
            }
            other => panic!("{other:?}"),
        }
        // Input sources are exclusive.
        assert!(Args::try_parse_from([
            "jobvisorctl",
            "submit",
            "echo",
            "--input",
            "a",
            "--input-file",
            "f"
        ])
        .is_err());
        assert!(Args::try_parse_from(["jobvisorctl", "wait"]).is_err());
        let a = Args::try_parse_from(["jobvisorctl", "--json", "wait", "1", "2"]).unwrap();
        assert!(a.json);
        assert!(matches!(a.cmd, Cmd::Wait { ids } if ids == [1, 2]));
        let a = Args::try_parse_from(["jobvisorctl", "jobs"]).unwrap();
        assert!(matches!(
            a.cmd,
            Cmd::Jobs(JobsArgs {
                limit: DEFAULT_JOBS_LIMIT,
                ..
            })
        ));
        let a =
            Args::try_parse_from(["jobvisorctl", "map", "echo", "--ordered", "--json"]).unwrap();
        assert!(a.json);
        assert!(matches!(a.cmd, Cmd::Map(MapArgs { ordered: true, .. })));
    }
}
