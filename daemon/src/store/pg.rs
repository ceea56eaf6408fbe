//! The PostgreSQL backend of the store (`[store] url = "postgres://…"`):
//! the same [`Op`]s in, the same [`Completion`]s out, the same invariants as
//! the SQLite store (an op is reported durable only once its transaction has
//! committed; queries see every op submitted before them), on a server the
//! operator runs.
//!
//! Differences from SQLite:
//! - Payloads live in the database (`bytea`), never in payload files: the
//!   daemon keeps large inputs of queued jobs in memory (bounded by the
//!   core's budget) and stores large outputs in the row.
//! - Daemons sharing the database are nodes of one cluster (see
//!   `cluster`); each has two connections, the store thread's and the
//!   claim thread's (`claimer`).
//! - When the server goes away (a restart, a network cut) the thread
//!   reconnects by itself, with backoff; inserts of a batch that cannot
//!   commit are reported lost (their clients get an error), updates are
//!   kept and retried until a commit succeeds, exactly as with SQLite.
//!
//! Schema versions are in `jobvisor_schema`; an older one is migrated on
//! start in one transaction, a newer one refused.

use super::committer::Msg;
use super::{
    Completion, InsertFailure, JobUpdate, NewJob, Op, Query, QueryResult, Recovered, RecoveredJob,
    Retried, StoreError, MAX_BATCH_OPS,
};
use ipc_proto::control::{Attempt, JobDoc, JobState, Outcome};
use ipc_proto::Bytes;
use postgres::{Client, NoTls};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::unix::fs::FileExt;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// The schema version this build writes.
pub(super) const SCHEMA_VERSION: i32 = 9;

/// How long a reconnection may take, and a check that the connection is
/// alive, before the store thread gives up for this round (and retries).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// See [`connect`].
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Base of the keys of the advisory locks jobvisor takes.
const NODE_LOCK: i64 = 0x6a6f_6276_6973_6f72; // "jobvisor"

pub(super) const SCHEMA_V1: &str = "
CREATE TABLE jobvisor_jobs (
    id                bigint   PRIMARY KEY,
    pool              text     NOT NULL,
    state             smallint NOT NULL,
    priority          integer  NOT NULL,
    key               text,
    max_attempts      integer  NOT NULL,
    timeout_ms        bigint,
    created_ms        bigint   NOT NULL,
    finished_ms       bigint,
    error             text,
    attempts          text     NOT NULL,
    owner             bigint   NOT NULL,
    input             bytea    NOT NULL,
    input_memory_len  bigint,
    output            bytea,
    output_memory_len bigint
);
CREATE INDEX jobvisor_jobs_active ON jobvisor_jobs (state, id) WHERE state < 2;
CREATE INDEX jobvisor_jobs_finished ON jobvisor_jobs (pool, finished_ms)
    WHERE finished_ms IS NOT NULL;
CREATE TABLE jobvisor_meta (name text PRIMARY KEY, value bigint NOT NULL);
INSERT INTO jobvisor_meta VALUES ('max_id', 0);
";

/// The view of every job, queued, running or finished (created by
/// version 2, made again by version 8).
macro_rules! jobvisor_all_view {
    () => {
        "
CREATE VIEW jobvisor_all AS
    SELECT id, pool, state, priority, key, max_attempts, timeout_ms, created_ms, finished_ms,
           error, attempts, owner, input, input_memory_len, output, output_memory_len
      FROM jobvisor_jobs
    UNION ALL
    SELECT id, pool, state, priority, key, max_attempts, timeout_ms, created_ms, finished_ms,
           error, attempts, owner, input, input_memory_len, output, output_memory_len
      FROM jobvisor_done;
"
    };
}

/// Version 2: finished jobs leave the queue table for `jobvisor_done`,
/// partitioned by day of `finished_ms` (retention drops whole partitions),
/// so the table claims and updates touch holds only queued and running
/// jobs. The rows are moved by [`Pg::migrate`].
const SCHEMA_V2: &str = concat!(
    "
CREATE TABLE jobvisor_done (
    id                bigint   NOT NULL,
    pool              text     NOT NULL,
    state             smallint NOT NULL,
    priority          integer  NOT NULL,
    key               text,
    max_attempts      integer  NOT NULL,
    timeout_ms        bigint,
    created_ms        bigint   NOT NULL,
    finished_ms       bigint   NOT NULL,
    error             text,
    attempts          text     NOT NULL,
    owner             bigint   NOT NULL,
    input             bytea    NOT NULL,
    input_memory_len  bigint,
    output            bytea,
    output_memory_len bigint
) PARTITION BY RANGE (finished_ms);
CREATE INDEX jobvisor_done_id ON jobvisor_done (id);
CREATE INDEX jobvisor_done_pool ON jobvisor_done (pool, finished_ms);
DROP INDEX jobvisor_jobs_finished;
ALTER TABLE jobvisor_jobs SET (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_insert_scale_factor = 0.01, autovacuum_vacuum_cost_delay = 0);
",
    jobvisor_all_view!()
);

/// Version 3: nodes share the queue (see `cluster`): who holds a job and
/// with which claim, the nodes and their heartbeats, blocks of ids.
const SCHEMA_V3: &str = "
ALTER TABLE jobvisor_jobs ADD COLUMN node bigint, ADD COLUMN claim integer NOT NULL DEFAULT 0;
CREATE INDEX jobvisor_jobs_queue ON jobvisor_jobs (pool, priority DESC, id)
    WHERE state = 0 AND node IS NULL;
CREATE INDEX jobvisor_jobs_node ON jobvisor_jobs (node) WHERE node IS NOT NULL;
CREATE TABLE jobvisor_nodes (
    id           bigserial   PRIMARY KEY,
    host         text        NOT NULL,
    pid          integer     NOT NULL,
    started_ms   bigint      NOT NULL,
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    gone         boolean     NOT NULL DEFAULT false
);
CREATE SEQUENCE jobvisor_id_blocks;
";

/// Version 4: each node's worker count, as of its last heartbeat.
const SCHEMA_V4: &str = "ALTER TABLE jobvisor_nodes ADD COLUMN workers integer NOT NULL DEFAULT 0;";

/// Version 5: key mutexes and semaphores cluster-wide (see `cluster`):
/// the key a claimed job holds (one holder per key), the semaphores it
/// holds.
const SCHEMA_V5: &str = "
CREATE TABLE jobvisor_keys (key text PRIMARY KEY, job bigint NOT NULL);
CREATE INDEX jobvisor_keys_job ON jobvisor_keys (job);
CREATE TABLE jobvisor_sem_holds (sem text NOT NULL, job bigint NOT NULL, PRIMARY KEY (sem, job));
CREATE INDEX jobvisor_sem_holds_job ON jobvisor_sem_holds (job);
";

/// Version 6: a node asks the node holding a job to cancel it.
const SCHEMA_V6: &str =
    "ALTER TABLE jobvisor_jobs ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false;";

/// Version 7: every index of the queue table costs each claim (an update
/// that cannot be HOT: `node` is in the queue index's predicate) and each
/// insert. Only the primary key, the queue index and two partial ones
/// that hold no claimed row stay: `jobvisor_jobs_active` (no query used
/// it) and `jobvisor_jobs_node` (used by sweeps and `status --cluster`,
/// which now scan the table: both are rare) go; cancels asked of a node
/// are found by a partial index of the rows that have one.
const SCHEMA_V7: &str = "
DROP INDEX jobvisor_jobs_active;
DROP INDEX jobvisor_jobs_node;
CREATE INDEX jobvisor_jobs_cancel ON jobvisor_jobs (node) WHERE cancel_requested;
";

/// Version 8: names (pools, keys, semaphores) compare as bytes (`COLLATE
/// "C"`), not by the database's locale: every insert, claim and move
/// compares pool names in the indexes, and a locale's comparison costs
/// several times a byte compare. Changing only the collation rewrites no
/// table; the indexes on these columns are rebuilt.
const SCHEMA_V8: &str = concat!(
    "
DROP VIEW jobvisor_all;
ALTER TABLE jobvisor_jobs ALTER COLUMN pool TYPE text COLLATE \"C\",
    ALTER COLUMN key TYPE text COLLATE \"C\";
ALTER TABLE jobvisor_done ALTER COLUMN pool TYPE text COLLATE \"C\",
    ALTER COLUMN key TYPE text COLLATE \"C\";
ALTER TABLE jobvisor_keys ALTER COLUMN key TYPE text COLLATE \"C\";
ALTER TABLE jobvisor_sem_holds ALTER COLUMN sem TYPE text COLLATE \"C\";
",
    jobvisor_all_view!()
);

/// Version 9: the leader's lease (see `cluster`), one row: the node that
/// holds it declares the dead nodes dead.
const SCHEMA_V9: &str = "
CREATE TABLE jobvisor_leader (
    id    integer     PRIMARY KEY CHECK (id = 1),
    node  bigint,
    until timestamptz NOT NULL
);
INSERT INTO jobvisor_leader VALUES (1, NULL, '-infinity');
";

/// The columns [`queued_job`] reads, in its order (a claim's `RETURNING`
/// lists them too, prefixed).
const JOB_COLUMNS: &str =
    "id, pool, priority, key, max_attempts, timeout_ms, created_ms, attempts, owner, input";

/// The job of a row whose first columns are [`JOB_COLUMNS`], queued again
/// (claimed, or retried) with `max_attempts`.
fn queued_job(row: &postgres::Row, max_attempts: u32) -> NewJob {
    let input: Vec<u8> = row.get(9);
    NewJob {
        id: to_u64(row.get(0)),
        pool: row.get(1),
        priority: row.get(2),
        key: row.get(3),
        max_attempts,
        timeout_ms: row.get::<_, Option<i64>>(5).map(to_u64),
        input: input.into(),
        input_source: None,
        created_ms: to_u64(row.get(6)),
        owner: u32::try_from(row.get::<_, i64>(8)).unwrap_or(0),
        spill: false,
        memory: false,
    }
}

/// Columns of a finished row, in `jobvisor_done`'s order.
const DONE_COLUMNS: &str = "id, pool, state, priority, key, max_attempts, timeout_ms, \
     created_ms, finished_ms, error, attempts, owner, input, input_memory_len, output, \
     output_memory_len";

/// One day of `finished_ms`, the span of a `jobvisor_done` partition.
const DAY_MS: i64 = 86_400_000;

/// A connection string without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

fn pg_error(url: &str, what: &'static str, e: postgres::Error) -> StoreError {
    connect_error(url, what, one_line(&e))
}

fn connect_error(url: &str, what: &'static str, detail: String) -> StoreError {
    StoreError::Postgres {
        url: redact(url),
        what,
        detail,
    }
}

/// A PostgreSQL error as one line (the server's message when there is one).
fn one_line(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s = format!("{s}: {inner}");
                src = inner.source();
            }
            s
        }
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Creates the `jobvisor_done` partition of `day` (if another session has
/// not). `IF NOT EXISTS` alone is not safe against a concurrent creation
/// (the second fails, "already exists"): creations take a lock first, held
/// until their transaction ends.
fn create_partition(tx: &mut postgres::Transaction<'_>, day: i64) -> Result<(), postgres::Error> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&(NODE_LOCK + 3)])?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS jobvisor_done_d{day} PARTITION OF jobvisor_done \
         FOR VALUES FROM ({}) TO ({})",
        day * DAY_MS,
        (day + 1) * DAY_MS
    ))
}

fn state_from(code: i16) -> Option<JobState> {
    JobState::ALL
        .into_iter()
        .find(|s| super::db::state_code(*s) == i64::from(code))
}

fn code(state: JobState) -> i16 {
    super::db::state_code(state) as i16
}

fn attempts_from(text: &str) -> Result<Vec<Attempt>, String> {
    serde_json::from_str(text).map_err(|e| format!("unreadable attempts ({e})"))
}

fn attempts_text(attempts: &[Attempt]) -> String {
    serde_json::to_string(attempts).expect("attempts serialize")
}

/// The connection's prepared statements, by text: a statement sent as
/// text is parsed and planned on each call, and costs a round trip more.
/// Emptied when the connection is replaced. (Prepared statements outlive
/// the transactions that prepare them.)
#[derive(Default)]
pub(super) struct Stmts(HashMap<&'static str, postgres::Statement>);

impl Stmts {
    /// `sql` prepared on the connection of `tx`.
    pub(super) fn get(
        &mut self,
        tx: &mut postgres::Transaction<'_>,
        sql: &'static str,
    ) -> Result<postgres::Statement, postgres::Error> {
        if let Some(s) = self.0.get(sql) {
            return Ok(s.clone());
        }
        let s = tx.prepare(sql)?;
        self.0.insert(sql, s.clone());
        Ok(s)
    }
}

/// What a node's two connections share: the store thread's (writes,
/// heartbeats, queries) and the claim thread's (claims).
#[derive(Default)]
pub(super) struct Shared {
    /// This daemon's row in `jobvisor_nodes` (a new one when it registers
    /// again, by the store thread).
    node: std::sync::atomic::AtomicI64,
    held: std::sync::Mutex<Held>,
}

/// Jobs this node claimed and has not finished. A claim is recorded before
/// its jobs are sent to the loop, so before any update of them reaches the
/// store thread.
#[derive(Default)]
pub(super) struct Held {
    /// Their claim numbers, which fence their updates.
    claims: HashMap<u64, i32>,
    /// Those that hold a key or semaphores in the store (released when
    /// they leave this node).
    holds: std::collections::HashSet<u64>,
}

/// One of a node's connections and what it knows.
pub(super) struct Pg {
    url: String,
    client: Client,
    max_id: u64,
    /// A statement failed: the connection may be gone; reconnect before
    /// the next one.
    suspect: bool,
    /// Days (`finished_ms / DAY_MS`) that have a `jobvisor_done` partition.
    days: std::collections::BTreeSet<i64>,
    /// What this connection shares with the node's other one (see
    /// [`Shared`]).
    shared: Arc<Shared>,
    /// Prepared statements of `client`.
    stmts: Stmts,
    /// Wake-ups through LISTEN/NOTIFY (`[store] notify`); without them,
    /// held demands are polled every [`crate::store::POLL_WITHOUT_NOTIFY`].
    pub(super) notify: bool,
    /// `[store] xmin_warning`.
    pub(super) xmin_warning: Duration,
    /// `[store] node_timeout`: a node whose heartbeat is older is dead.
    pub(super) node_timeout: Duration,
    /// The daemon's worker processes (set by the loop, see
    /// `Store::set_workers`), told with each heartbeat.
    pub(super) workers: Arc<std::sync::atomic::AtomicU32>,
}

impl Pg {
    /// Connects, creates or migrates the schema, registers this node.
    pub(super) fn open(url: &str) -> Result<Pg, StoreError> {
        let client = connect(url).map_err(|e| connect_error(url, "cannot connect", e))?;
        let mut pg = Pg {
            url: url.to_string(),
            client,
            max_id: 0,
            suspect: false,
            days: Default::default(),
            shared: Default::default(),
            stmts: Stmts::default(),
            notify: true,
            xmin_warning: crate::config::DEFAULT_XMIN_WARNING,
            node_timeout: crate::config::DEFAULT_NODE_TIMEOUT,
            workers: Default::default(),
        };
        pg.migrate()?;
        pg.register()
            .map_err(|e| pg_error(url, "cannot register this node", e))?;
        Ok(pg)
    }

    /// A second connection for this node, sharing its node id, claims and
    /// holds: the claim thread's (see `claimer`).
    pub(super) fn second(&self) -> Result<Pg, StoreError> {
        let client = connect(&self.url)
            .map_err(|e| connect_error(&self.url, "cannot open the claim connection", e))?;
        Ok(Pg {
            url: self.url.clone(),
            client,
            max_id: self.max_id,
            suspect: false,
            days: self.days.clone(),
            shared: Arc::clone(&self.shared),
            stmts: Stmts::default(),
            notify: self.notify,
            xmin_warning: self.xmin_warning,
            node_timeout: self.node_timeout,
            workers: Arc::clone(&self.workers),
        })
    }

    /// This node's id.
    pub(super) fn node(&self) -> i64 {
        self.shared.node.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The claims and holds of this node (the lock is held for a few map
    /// operations at a time, never across a statement).
    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.shared
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The URL, password hidden.
    pub(super) fn display(&self) -> String {
        redact(&self.url)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let url = self.url.as_str();
        let fail = |what: &'static str| move |e| pg_error(url, what, e);
        let mut tx = self
            .client
            .transaction()
            .map_err(fail("cannot start the schema transaction"))?;
        // Serialises concurrent first starts.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&(NODE_LOCK + 1)])
            .map_err(fail("cannot lock the schema"))?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS jobvisor_schema (version integer NOT NULL)")
            .map_err(fail("cannot create jobvisor_schema"))?;
        let found: Option<i32> = tx
            .query_opt("SELECT max(version) FROM jobvisor_schema", &[])
            .map_err(fail("cannot read the schema version"))?
            .and_then(|r| r.get(0));
        let version = match found {
            Some(v) if v > SCHEMA_VERSION => {
                return Err(StoreError::TooNew {
                    path: redact(&self.url).into(),
                    found: i64::from(v),
                    supported: i64::from(SCHEMA_VERSION),
                })
            }
            Some(v) => v,
            None => {
                tx.batch_execute(SCHEMA_V1)
                    .map_err(fail("cannot create the tables"))?;
                1
            }
        };
        if version < 2 {
            tx.batch_execute(SCHEMA_V2)
                .map_err(fail("cannot migrate the schema to version 2"))?;
            let days: Vec<i64> = tx
                .query(
                    "SELECT DISTINCT finished_ms / $1 FROM jobvisor_jobs \
                     WHERE finished_ms IS NOT NULL",
                    &[&DAY_MS],
                )
                .map_err(fail("cannot migrate the schema to version 2"))?
                .iter()
                .map(|r| r.get(0))
                .collect();
            for day in days {
                create_partition(&mut tx, day)
                    .map_err(fail("cannot migrate the schema to version 2"))?;
            }
            tx.batch_execute(&format!(
                "WITH m AS (DELETE FROM jobvisor_jobs WHERE finished_ms IS NOT NULL RETURNING *) \
                 INSERT INTO jobvisor_done SELECT {DONE_COLUMNS} FROM m"
            ))
            .map_err(fail("cannot move the finished jobs to jobvisor_done"))?;
        }
        if version < 3 {
            tx.batch_execute(SCHEMA_V3)
                .map_err(fail("cannot migrate the schema to version 3"))?;
            // Ids handed out from now on come after every id so far.
            tx.execute(
                "SELECT setval('jobvisor_id_blocks', GREATEST((SELECT value FROM jobvisor_meta \
                 WHERE name = 'max_id'), (SELECT COALESCE(max(id), 0) FROM jobvisor_all)) / $1 + 1)",
                &[&to_i64(cluster::ID_BLOCK)],
            )
            .map_err(fail("cannot migrate the schema to version 3"))?;
        }
        // The migrations that are plain DDL.
        for (to, ddl, what) in [
            (4, SCHEMA_V4, "cannot migrate the schema to version 4"),
            (5, SCHEMA_V5, "cannot migrate the schema to version 5"),
            (6, SCHEMA_V6, "cannot migrate the schema to version 6"),
            (7, SCHEMA_V7, "cannot migrate the schema to version 7"),
            (8, SCHEMA_V8, "cannot migrate the schema to version 8"),
            (9, SCHEMA_V9, "cannot migrate the schema to version 9"),
        ] {
            if version < to {
                tx.batch_execute(ddl).map_err(fail(what))?;
            }
        }
        if version < SCHEMA_VERSION {
            tx.execute(
                "INSERT INTO jobvisor_schema VALUES ($1)",
                &[&SCHEMA_VERSION],
            )
            .map_err(fail("cannot record the schema version"))?;
        }
        tx.commit().map_err(fail("cannot commit the schema"))?;
        self.load_days()
            .map_err(|e| pg_error(&self.url, "cannot list the partitions", e))?;
        let row = self
            .client
            .query_one(
                "SELECT GREATEST((SELECT value FROM jobvisor_meta WHERE name = 'max_id'), \
                 (SELECT COALESCE(max(id), 0) FROM jobvisor_all))",
                &[],
            )
            .map_err(|e| pg_error(&self.url, "cannot read the highest job id", e))?;
        self.max_id = to_u64(row.get(0));
        Ok(())
    }

    /// Reads which days have a partition.
    fn load_days(&mut self) -> Result<(), postgres::Error> {
        self.days = self
            .client
            .query(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                 WHERE i.inhparent = 'jobvisor_done'::regclass",
                &[],
            )?
            .iter()
            .filter_map(|r| {
                r.get::<_, String>(0)
                    .strip_prefix("jobvisor_done_d")?
                    .parse()
                    .ok()
            })
            .collect();
        // Today's and tomorrow's partitions made ahead, so that finishing
        // jobs seldom has to (one transaction at a time makes them).
        let today = to_i64(crate::store::db::now_ms()) / DAY_MS;
        let missing: Vec<i64> = [today, today + 1]
            .into_iter()
            .filter(|d| !self.days.contains(d))
            .collect();
        if !missing.is_empty() {
            let mut tx = self.client.transaction()?;
            for &day in &missing {
                create_partition(&mut tx, day)?;
            }
            tx.commit()?;
            self.days.extend(missing);
        }
        Ok(())
    }

    /// What the daemon needs at start. Nodes share the queue: nothing is
    /// requeued here (a node that died, this daemon's earlier run included,
    /// has its jobs requeued by the sweep once its heartbeat is old, see
    /// `cluster`), and jobs reach this node by claims, so `jobs` is empty.
    /// `next_id..id_end` is a fresh block of ids.
    pub(super) fn recover(&mut self, _now_ms: u64) -> Result<Recovered, StoreError> {
        let url = self.url.clone();
        let fail = |e| pg_error(&url, "recovery failed", e);
        let mut counts: BTreeMap<String, HashMap<JobState, u64>> = BTreeMap::new();
        for row in self
            .client
            .query(
                "SELECT pool, state, count(*) FROM jobvisor_all GROUP BY pool, state",
                &[],
            )
            .map_err(fail)?
        {
            if let Some(state) = state_from(row.get(1)) {
                counts
                    .entry(row.get(0))
                    .or_default()
                    .insert(state, to_u64(row.get(2)));
            }
        }
        let (next_id, id_end) = self.reserve_ids().map_err(fail)?;
        Ok(Recovered {
            jobs: Vec::new(),
            next_id,
            id_end,
            counts,
        })
    }

    /// Reconnects if the connection is gone (see [`connect`]).
    fn ensure_connected(&mut self) -> Result<(), String> {
        if self.suspect && !self.client.is_closed() && self.client.is_valid(PING_TIMEOUT).is_ok() {
            self.suspect = false;
        }
        if !self.suspect && !self.client.is_closed() {
            return Ok(());
        }
        self.client = connect(&self.url)?;
        self.stmts = Stmts::default();
        self.suspect = false;
        Ok(())
    }
}

/// A connection to `url`. Unless the URL sets them: at most
/// [`CONNECT_TIMEOUT`] to connect; data unacknowledged for
/// [`TCP_USER_TIMEOUT`] (a partition, a server host gone) breaks the
/// connection rather than blocking the store thread for the kernel's ~15
/// minutes; an idle connection (the listener's) is probed after 5 s of
/// silence, so a lost link is noticed within ~10 s.
pub(super) fn connect(url: &str) -> Result<Client, String> {
    let (url, tls) = tls::split(url)?;
    let mut config: postgres::Config = url.parse().map_err(|e| one_line(&e))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        config.keepalives_idle(Duration::from_secs(5));
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(Duration::from_secs(1));
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(5);
    }
    let mut client = match tls.connector()? {
        None => config.connect(NoTls),
        Some(tls) => config.connect(tls),
    }
    .map_err(|e| one_line(&e))?;
    // Statements are prepared once (see `Stmts`) but planned on each call:
    // a generic plan knows neither how many rows an array holds nor which
    // pool is asked for.
    client
        .batch_execute("SET plan_cache_mode = force_custom_plan")
        .map_err(|e| one_line(&e))?;
    Ok(client)
}

mod claimer;
mod cluster;
mod read;
mod thread;
pub(super) mod tls;
mod write;

pub(in crate::store) use claimer::{ClaimMsg, Claims};
pub(super) use cluster::Notice;
pub(super) use thread::run;
