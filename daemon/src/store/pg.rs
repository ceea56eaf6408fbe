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
//! - The store thread's connection holds a session advisory lock: one daemon
//!   per database for now (nodes sharing queues come with claiming).
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
pub(super) const SCHEMA_VERSION: i32 = 2;

/// How long a reconnection may take, and a check that the connection is
/// alive, before the store thread gives up for this round (and retries).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Key of the session advisory lock a daemon holds on its database.
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

/// Version 2: finished jobs leave the queue table for `jobvisor_done`,
/// partitioned by day of `finished_ms` (retention drops whole partitions),
/// so the table claims and updates touch holds only queued and running
/// jobs. The rows are moved by [`Pg::migrate`].
const SCHEMA_V2: &str = "
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
CREATE VIEW jobvisor_all AS
    SELECT id, pool, state, priority, key, max_attempts, timeout_ms, created_ms, finished_ms,
           error, attempts, owner, input, input_memory_len, output, output_memory_len
      FROM jobvisor_jobs
    UNION ALL
    SELECT id, pool, state, priority, key, max_attempts, timeout_ms, created_ms, finished_ms,
           error, attempts, owner, input, input_memory_len, output, output_memory_len
      FROM jobvisor_done;
";

/// Columns of a finished row, in `jobvisor_done`'s order.
const DONE_COLUMNS: &str = "id, pool, state, priority, key, max_attempts, timeout_ms, \
     created_ms, finished_ms, error, attempts, owner, input, input_memory_len, output, \
     output_memory_len";

/// One day of `finished_ms`, the span of a `jobvisor_done` partition.
const DAY_MS: i64 = 86_400_000;

/// A batch's inserts, one array per column (`UNNEST`).
const INSERT_MANY: &str = "INSERT INTO jobvisor_jobs (id, pool, state, priority, key, \
     max_attempts, timeout_ms, created_ms, attempts, owner, input, input_memory_len) \
     SELECT id, pool, 0, priority, key, max_attempts, timeout_ms, created_ms, '[]', owner, \
     input, memory_len FROM UNNEST($1::bigint[], $2::text[], $3::integer[], $4::text[], \
     $5::integer[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bytea[], $10::bigint[]) \
     AS t(id, pool, priority, key, max_attempts, timeout_ms, created_ms, owner, input, \
     memory_len)";
/// A batch's updates (one per job), one array per column.
const UPDATE_MANY: &str = "UPDATE jobvisor_jobs AS j SET state = t.state, \
     attempts = t.attempts, output = t.output, error = t.error, finished_ms = t.finished_ms, \
     output_memory_len = t.memory_len FROM UNNEST($1::bigint[], $2::smallint[], $3::text[], \
     $4::bytea[], $5::text[], $6::bigint[], $7::bigint[]) \
     AS t(id, state, attempts, output, error, finished_ms, memory_len) WHERE j.id = t.id";
/// A batch's final updates of jobs in the queue table: each row moves to
/// `jobvisor_done` with its new values; the ids moved come back.
const MOVE_MANY: &str = "WITH t AS (SELECT * FROM UNNEST($1::bigint[], $2::smallint[], \
     $3::text[], $4::bytea[], $5::text[], $6::bigint[], $7::bigint[]) \
     AS t(id, state, attempts, output, error, finished_ms, memory_len)), \
     m AS (DELETE FROM jobvisor_jobs j USING t WHERE j.id = t.id RETURNING j.*) \
     INSERT INTO jobvisor_done SELECT m.id, m.pool, t.state, m.priority, m.key, \
     m.max_attempts, m.timeout_ms, m.created_ms, t.finished_ms, t.error, t.attempts, m.owner, \
     m.input, m.input_memory_len, t.output, t.memory_len FROM m JOIN t ON t.id = m.id \
     RETURNING id";
/// Final updates of jobs already finished (a later replacement).
const DONE_UPDATE_MANY: &str = "UPDATE jobvisor_done AS j SET state = t.state, \
     attempts = t.attempts, output = t.output, error = t.error, finished_ms = t.finished_ms, \
     output_memory_len = t.memory_len FROM UNNEST($1::bigint[], $2::smallint[], $3::text[], \
     $4::bytea[], $5::text[], $6::bigint[], $7::bigint[]) \
     AS t(id, state, attempts, output, error, finished_ms, memory_len) WHERE j.id = t.id";
/// Jobs inserted and finished in one batch go straight to `jobvisor_done`.
const DONE_INSERT_MANY: &str = "INSERT INTO jobvisor_done (id, pool, state, priority, key, \
     max_attempts, timeout_ms, created_ms, finished_ms, error, attempts, owner, input, \
     input_memory_len, output, output_memory_len) \
     SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::smallint[], $4::integer[], $5::text[], \
     $6::integer[], $7::bigint[], $8::bigint[], $9::bigint[], $10::text[], $11::text[], \
     $12::bigint[], $13::bytea[], $14::bigint[], $15::bytea[], $16::bigint[])";
const SELECT_DOC: &str = "SELECT id, pool, state, priority, key, created_ms, finished_ms, error, \
     attempts, output, output_memory_len FROM jobvisor_all";

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
    StoreError::Postgres {
        url: redact(url),
        what,
        detail: one_line(&e),
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
/// not).
fn create_partition(tx: &mut postgres::Transaction<'_>, day: i64) -> Result<(), postgres::Error> {
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

/// The store's connection and what it knows.
pub(super) struct Pg {
    url: String,
    client: Client,
    max_id: u64,
    /// A statement failed: the connection may be gone; reconnect before
    /// the next one.
    suspect: bool,
    /// Days (`finished_ms / DAY_MS`) that have a `jobvisor_done` partition.
    days: std::collections::BTreeSet<i64>,
}

impl Pg {
    /// Connects, takes the node lock, creates or migrates the schema.
    pub(super) fn open(url: &str) -> Result<Pg, StoreError> {
        let client = Client::connect(url, NoTls).map_err(|e| pg_error(url, "cannot connect", e))?;
        let mut pg = Pg {
            url: url.to_string(),
            client,
            max_id: 0,
            suspect: false,
            days: Default::default(),
        };
        pg.lock()?;
        pg.migrate()?;
        Ok(pg)
    }

    /// The URL, password hidden.
    pub(super) fn display(&self) -> String {
        redact(&self.url)
    }

    fn lock(&mut self) -> Result<(), StoreError> {
        let got: bool = self
            .client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&NODE_LOCK])
            .map_err(|e| pg_error(&self.url, "cannot take the node lock", e))?
            .get(0);
        if !got {
            return Err(StoreError::PostgresInUse {
                url: self.display(),
            });
        }
        Ok(())
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
        Ok(())
    }

    /// Requeues (or declares dead) the jobs that were running when the
    /// daemon died, in one transaction, and returns what the daemon needs
    /// (see the SQLite store's `recover`).
    pub(super) fn recover(&mut self, now_ms: u64) -> Result<Recovered, StoreError> {
        let url = self.url.clone();
        let fail = |e| pg_error(&url, "recovery failed", e);
        let mut tx = self.client.transaction().map_err(fail)?;
        let rows = tx
            .query(
                "SELECT id, pool, state, priority, key, max_attempts, timeout_ms, created_ms, \
                 attempts, owner, input, input_memory_len FROM jobvisor_jobs \
                 WHERE state < 2 ORDER BY id",
                &[],
            )
            .map_err(fail)?;
        let mut jobs = Vec::new();
        for row in rows {
            let id = to_u64(row.get(0));
            let state = state_from(row.get(2)).unwrap_or(JobState::Dead);
            let mut attempts = attempts_from(row.get(8)).unwrap_or_default();
            let max_attempts: i32 = row.get(5);
            let in_memory: Option<i64> = row.get(11);
            if state == JobState::Running {
                if let Some(last) = attempts.last_mut().filter(|a| a.outcome.is_none()) {
                    last.ended_ms = Some(now_ms);
                    last.outcome = Some(Outcome::Lost);
                    last.error = Some(super::db::LOST_ON_RESTART.to_string());
                }
            }
            let dead = if in_memory.is_some() {
                Some(super::db::MEMORY_INPUT_LOST)
            } else if state == JobState::Running && attempts.len() >= max_attempts.max(1) as usize {
                Some(super::db::LOST_ON_RESTART)
            } else {
                None
            };
            if let Some(error) = dead {
                let day = to_i64(now_ms) / DAY_MS;
                if !self.days.contains(&day) {
                    create_partition(&mut tx, day).map_err(fail)?;
                    self.days.insert(day);
                }
                let attempts = attempts_text(&attempts);
                let output: Option<&[u8]> = None;
                tx.execute(
                    MOVE_MANY,
                    &[
                        &vec![to_i64(id)],
                        &vec![code(JobState::Dead)],
                        &vec![attempts.as_str()],
                        &vec![output],
                        &vec![Some(error)],
                        &vec![to_i64(now_ms)],
                        &vec![None::<i64>],
                    ],
                )
                .map_err(fail)?;
                continue;
            }
            if state == JobState::Running {
                tx.execute(
                    "UPDATE jobvisor_jobs SET state = $2, attempts = $3 WHERE id = $1",
                    &[
                        &to_i64(id),
                        &code(JobState::Queued),
                        &attempts_text(&attempts),
                    ],
                )
                .map_err(fail)?;
            }
            let input: Vec<u8> = row.get(10);
            jobs.push(RecoveredJob {
                job: NewJob {
                    id,
                    pool: row.get(1),
                    priority: row.get(3),
                    key: row.get(4),
                    max_attempts: max_attempts.max(1) as u32,
                    timeout_ms: row.get::<_, Option<i64>>(6).map(to_u64),
                    input: input.into(),
                    input_source: None,
                    created_ms: to_u64(row.get(7)),
                    owner: u32::try_from(row.get::<_, i64>(9)).unwrap_or(0),
                    spill: false,
                    memory: false,
                },
                attempts,
                input_file: None,
            });
        }
        let mut counts: BTreeMap<String, HashMap<JobState, u64>> = BTreeMap::new();
        for row in tx
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
        tx.commit().map_err(fail)?;
        Ok(Recovered {
            jobs,
            next_id: self.max_id + 1,
            counts,
        })
    }

    /// Reconnects (and takes the node lock again) if the connection is
    /// gone.
    fn ensure_connected(&mut self) -> Result<(), String> {
        if self.suspect && !self.client.is_closed() && self.client.is_valid(PING_TIMEOUT).is_ok() {
            self.suspect = false;
        }
        if !self.suspect && !self.client.is_closed() {
            return Ok(());
        }
        let mut config: postgres::Config = self.url.parse().map_err(|e| one_line(&e))?;
        config.connect_timeout(CONNECT_TIMEOUT);
        self.client = config.connect(NoTls).map_err(|e| one_line(&e))?;
        self.suspect = false;
        self.lock().map_err(|e| e.to_string())
    }

    /// Applies one batch in one transaction: inserts (`Err` per insert
    /// whose input file cannot be read: left out), then updates, in order.
    fn apply(
        &mut self,
        ops: &[(u64, Op)],
        failed: &mut Vec<(u64, InsertFailure)>,
    ) -> Result<(), String> {
        self.ensure_connected()?;
        let err = |e: postgres::Error| one_line(&e);
        // The last update of each job only (each is a full replacement).
        let mut last_update: HashMap<u64, &JobUpdate> = HashMap::new();
        let mut update_order = Vec::new();
        for (_, op) in ops {
            if let Op::Update(u) = op {
                if u.output_file_len.is_some() {
                    return Err("an output in a payload file, which a PostgreSQL store \
                                does not use (a daemon bug)"
                        .into());
                }
                if last_update.insert(u.id, u).is_none() {
                    update_order.push(u.id);
                }
            }
        }
        // Each kind of write is one statement for the whole batch, its
        // columns sent as arrays: inserts of jobs still active, inserts of
        // jobs that also finished in the batch (straight to
        // `jobvisor_done`), updates of active jobs, moves of jobs that
        // finished.
        let mut ins = Inserts::default();
        let mut done = Inserts::default();
        let mut done_upd = Updates::default();
        let mut inserted = std::collections::HashSet::new();
        for (_, op) in ops {
            if let Op::Insert(job) = op {
                let input = match input_bytes(job) {
                    Ok(input) => input,
                    Err(e) => {
                        failed.push((job.id, e));
                        continue;
                    }
                };
                match last_update.get(&job.id).filter(|u| u.state.is_terminal()) {
                    Some(u) => {
                        done.push(job, input);
                        done_upd.push(u);
                    }
                    None => ins.push(job, input),
                }
                inserted.insert(job.id);
            }
        }
        let mut active = Updates::default();
        let mut finished = Updates::default();
        for id in update_order {
            let u = last_update[&id];
            if u.state.is_terminal() {
                if !inserted.contains(&id) {
                    finished.push(u);
                }
            } else if !failed.iter().any(|(f, _)| *f == id) {
                active.push(u);
            }
        }
        let max_id = ins
            .id
            .iter()
            .chain(&done.id)
            .copied()
            .max()
            .map_or(self.max_id, |m| self.max_id.max(to_u64(m)));
        let days: std::collections::BTreeSet<i64> = finished
            .finished_ms
            .iter()
            .chain(&done_upd.finished_ms)
            .flatten()
            .map(|ms| ms / DAY_MS)
            .filter(|d| !self.days.contains(d))
            .collect();
        let mut tx = self.client.transaction().map_err(err)?;
        for &day in &days {
            create_partition(&mut tx, day).map_err(err)?;
        }
        if !ins.id.is_empty() {
            let input: Vec<&[u8]> = ins.input.iter().map(|b| b.as_ref()).collect();
            tx.execute(
                INSERT_MANY,
                &[
                    &ins.id,
                    &ins.pool,
                    &ins.priority,
                    &ins.key,
                    &ins.max_attempts,
                    &ins.timeout_ms,
                    &ins.created_ms,
                    &ins.owner,
                    &input,
                    &ins.memory_len,
                ],
            )
            .map_err(err)?;
        }
        if !done.id.is_empty() {
            let input: Vec<&[u8]> = done.input.iter().map(|b| b.as_ref()).collect();
            let output = done_upd.outputs();
            tx.execute(
                DONE_INSERT_MANY,
                &[
                    &done.id,
                    &done.pool,
                    &done_upd.state,
                    &done.priority,
                    &done.key,
                    &done.max_attempts,
                    &done.timeout_ms,
                    &done.created_ms,
                    &done_upd.finished_ms,
                    &done_upd.error,
                    &done_upd.attempts,
                    &done.owner,
                    &input,
                    &done.memory_len,
                    &output,
                    &done_upd.memory_len,
                ],
            )
            .map_err(err)?;
        }
        if !active.id.is_empty() {
            tx.execute(UPDATE_MANY, &active.params(&active.outputs()))
                .map_err(err)?;
        }
        if !finished.id.is_empty() {
            let output = finished.outputs();
            let moved: std::collections::HashSet<i64> = tx
                .query(MOVE_MANY, &finished.params(&output))
                .map_err(err)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            // Jobs already in `jobvisor_done`: replaced there.
            if moved.len() < finished.id.len() {
                let mut later = Updates::default();
                for (i, id) in finished.id.iter().enumerate() {
                    if !moved.contains(id) {
                        later.take(&finished, i);
                    }
                }
                tx.execute(DONE_UPDATE_MANY, &later.params(&later.outputs()))
                    .map_err(err)?;
            }
        }
        if max_id > self.max_id {
            tx.execute(
                "UPDATE jobvisor_meta SET value = GREATEST(value, $1) WHERE name = 'max_id'",
                &[&to_i64(max_id)],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;
        self.max_id = max_id;
        self.days.extend(days);
        Ok(())
    }

    /// Answers a query from committed data.
    fn query(&mut self, query: &Query) -> Result<QueryResult, String> {
        self.ensure_connected()?;
        let read = |e: postgres::Error| format!("cannot read the job store: {}", one_line(&e));
        match query {
            Query::Job { id, owner, output } => {
                let row = self
                    .client
                    .query_opt(
                        &format!(
                            "{SELECT_DOC} WHERE id = $1 AND ($2::bigint IS NULL OR owner = $2)"
                        ),
                        &[&to_i64(*id), &owner.map(i64::from)],
                    )
                    .map_err(read)?;
                let Some(row) = row else {
                    return Ok(QueryResult::Job(None));
                };
                let mut doc = doc_from_row(&row, *output)?;
                if *output && row.get::<_, Option<i64>>(10).is_some() {
                    doc.note_error(super::db::MEMORY_OUTPUT_NOT_KEPT.to_string());
                }
                Ok(QueryResult::Job(Some(doc)))
            }
            Query::List {
                pool,
                state,
                limit,
                owner,
                before,
                since_ms,
            } => {
                let sql = format!(
                    "{SELECT_DOC} WHERE ($1::text IS NULL OR pool = $1) \
                     AND ($2::smallint IS NULL OR state = $2) \
                     AND ($3::bigint IS NULL OR owner = $3) AND ($4::bigint IS NULL OR id < $4) \
                     AND ($5::bigint IS NULL OR created_ms >= $5) ORDER BY id DESC LIMIT $6"
                );
                let rows = self
                    .client
                    .query(
                        &sql,
                        &[
                            pool,
                            &state.map(code),
                            &owner.map(i64::from),
                            &before.map(to_i64),
                            &since_ms.map(to_i64),
                            &i64::from(*limit),
                        ],
                    )
                    .map_err(read)?;
                let docs = rows
                    .iter()
                    .map(|r| doc_from_row(r, false))
                    .collect::<Result<_, _>>()?;
                Ok(QueryResult::List(docs))
            }
            Query::Retry { id, owner } => self.retry(*id, *owner).map_err(read),
            Query::Prune {
                finished_before_ms,
                state,
                pool,
                owner,
                limit,
            } => {
                let n = self
                    .client
                    .execute(
                        "DELETE FROM jobvisor_done WHERE id IN (SELECT id FROM jobvisor_done \
                         WHERE finished_ms < $1 \
                         AND ($2::smallint IS NULL OR state = $2) AND ($3::text IS NULL OR pool = $3) \
                         AND ($4::bigint IS NULL OR owner = $4) LIMIT $5)",
                        &[
                            &to_i64(*finished_before_ms),
                            &state.map(code),
                            pool,
                            &owner.map(i64::from),
                            &i64::from(*limit),
                        ],
                    )
                    .map_err(read)?;
                Ok(QueryResult::Pruned(n))
            }
        }
    }

    fn retry(&mut self, id: u64, owner: Option<u32>) -> Result<QueryResult, postgres::Error> {
        let mut tx = self.client.transaction()?;
        let owner = owner.map(i64::from);
        let row = tx.query_opt(
            "SELECT id, pool, state, priority, key, max_attempts, timeout_ms, created_ms, \
             attempts, input, owner, input_memory_len FROM jobvisor_done \
             WHERE id = $1 AND ($2::bigint IS NULL OR owner = $2) FOR UPDATE",
            &[&to_i64(id), &owner],
        )?;
        let Some(row) = row else {
            // Active (not retryable), or unknown.
            let active = tx.query_opt(
                "SELECT state FROM jobvisor_jobs WHERE id = $1 \
                 AND ($2::bigint IS NULL OR owner = $2)",
                &[&to_i64(id), &owner],
            )?;
            return Ok(QueryResult::Retry(match active {
                Some(r) => Retried::NotRetryable(state_from(r.get(0)).unwrap_or(JobState::Queued)),
                None => Retried::NotFound,
            }));
        };
        let state = state_from(row.get(2)).unwrap_or(JobState::Dead);
        if !matches!(
            state,
            JobState::Failed | JobState::Cancelled | JobState::TimedOut | JobState::Dead
        ) {
            return Ok(QueryResult::Retry(Retried::NotRetryable(state)));
        }
        if row.get::<_, Option<i64>>(11).is_some() {
            return Ok(QueryResult::Retry(Retried::InputGone));
        }
        let attempts = attempts_from(row.get(8)).unwrap_or_default();
        let max_attempts = (row.get::<_, i32>(5).max(1) as u32).max(attempts.len() as u32 + 1);
        // Back to the queue table, queued, its attempts kept.
        tx.execute(
            "WITH m AS (DELETE FROM jobvisor_done WHERE id = $1 RETURNING *) \
             INSERT INTO jobvisor_jobs (id, pool, state, priority, key, max_attempts, \
             timeout_ms, created_ms, attempts, owner, input, input_memory_len) \
             SELECT id, pool, $2, priority, key, $3, timeout_ms, created_ms, attempts, owner, \
             input, input_memory_len FROM m",
            &[&to_i64(id), &code(JobState::Queued), &(max_attempts as i32)],
        )?;
        tx.commit()?;
        let input: Vec<u8> = row.get(9);
        Ok(QueryResult::Retry(Retried::Queued(RecoveredJob {
            job: NewJob {
                id,
                pool: row.get(1),
                priority: row.get(3),
                key: row.get(4),
                max_attempts,
                timeout_ms: row.get::<_, Option<i64>>(6).map(to_u64),
                input: input.into(),
                input_source: None,
                created_ms: to_u64(row.get(7)),
                owner: u32::try_from(row.get::<_, i64>(10)).unwrap_or(0),
                spill: false,
                memory: false,
            },
            attempts,
            input_file: None,
        })))
    }

    /// Applies the retention: drops the partitions of `jobvisor_done` older
    /// than every pool's retention (whole days, no row deleted), deletes
    /// the rows of pools whose retention is shorter, and the oldest rows
    /// past `max_finished`, at most `chunk` rows per statement; true if
    /// there may be more.
    fn prune_step(&mut self, retention: &Retention, chunk: u32) -> Result<bool, String> {
        self.ensure_connected()?;
        let err = |e: postgres::Error| one_line(&e);
        let now = super::db::now_ms();
        let cutoff = |d: &Duration| to_i64(now.saturating_sub(d.as_millis() as u64));
        let longest = retention
            .per_pool
            .values()
            .chain([&retention.default])
            .max()
            .copied()
            .unwrap_or(retention.default);
        let all_gone = cutoff(&longest);
        let old: Vec<i64> = self
            .days
            .iter()
            .copied()
            .filter(|d| (d + 1) * DAY_MS <= all_gone)
            .collect();
        for day in old {
            self.client
                .batch_execute(&format!("DROP TABLE IF EXISTS jobvisor_done_d{day}"))
                .map_err(err)?;
            self.days.remove(&day);
        }
        let mut more = false;
        let limit = i64::from(chunk);
        for (pool, keep) in &retention.per_pool {
            let n = self
                .client
                .execute(
                    "DELETE FROM jobvisor_done WHERE id IN (SELECT id FROM jobvisor_done \
                     WHERE pool = $1 AND finished_ms < $2 LIMIT $3)",
                    &[pool, &cutoff(keep), &limit],
                )
                .map_err(err)?;
            more |= n == u64::from(chunk);
        }
        let named: Vec<&str> = retention.per_pool.keys().map(String::as_str).collect();
        let n = self
            .client
            .execute(
                "DELETE FROM jobvisor_done WHERE id IN (SELECT id FROM jobvisor_done \
                 WHERE NOT (pool = ANY($1)) AND finished_ms < $2 LIMIT $3)",
                &[&named, &cutoff(&retention.default), &limit],
            )
            .map_err(err)?;
        more |= n == u64::from(chunk);
        if retention.max_finished < u64::MAX {
            // The planner's estimate first: an exact count only near the cap.
            let estimate: f64 = self
                .client
                .query_one(
                    "SELECT COALESCE(sum(c.reltuples), 0)::float8 FROM pg_inherits i \
                     JOIN pg_class c ON c.oid = i.inhrelid \
                     WHERE i.inhparent = 'jobvisor_done'::regclass",
                    &[],
                )
                .map_err(err)?
                .get(0);
            if estimate >= retention.max_finished as f64 * 0.9 {
                let finished: i64 = self
                    .client
                    .query_one("SELECT count(*) FROM jobvisor_done", &[])
                    .map_err(err)?
                    .get(0);
                let over = to_u64(finished).saturating_sub(retention.max_finished);
                if over > 0 {
                    self.client
                        .execute(
                            "DELETE FROM jobvisor_done WHERE id IN (SELECT id FROM jobvisor_done \
                             ORDER BY finished_ms, id LIMIT $1)",
                            &[&(over.min(u64::from(chunk)) as i64)],
                        )
                        .map_err(err)?;
                    more |= over > u64::from(chunk);
                }
            }
        }
        Ok(more)
    }
}

/// Columns of a batch's inserts.
#[derive(Default)]
struct Inserts {
    id: Vec<i64>,
    pool: Vec<String>,
    priority: Vec<i32>,
    key: Vec<Option<String>>,
    max_attempts: Vec<i32>,
    timeout_ms: Vec<Option<i64>>,
    created_ms: Vec<i64>,
    owner: Vec<i64>,
    input: Vec<Arc<[u8]>>,
    memory_len: Vec<Option<i64>>,
}

impl Inserts {
    fn push(&mut self, job: &NewJob, input: Arc<[u8]>) {
        self.id.push(to_i64(job.id));
        self.pool.push(job.pool.clone());
        self.priority.push(job.priority);
        self.key.push(job.key.clone());
        self.max_attempts
            .push(job.max_attempts.min(i32::MAX as u32) as i32);
        self.timeout_ms.push(job.timeout_ms.map(to_i64));
        self.created_ms.push(to_i64(job.created_ms));
        self.owner.push(i64::from(job.owner));
        self.input.push(input);
        self.memory_len
            .push(job.memory.then(|| to_i64(job.input_len())));
    }
}

/// Columns of a batch's updates.
#[derive(Default)]
struct Updates {
    id: Vec<i64>,
    state: Vec<i16>,
    attempts: Vec<String>,
    output: Vec<Option<Arc<[u8]>>>,
    error: Vec<Option<String>>,
    finished_ms: Vec<Option<i64>>,
    memory_len: Vec<Option<i64>>,
}

impl Updates {
    /// The outputs as the statements take them.
    fn outputs(&self) -> Vec<Option<&[u8]>> {
        self.output.iter().map(|o| o.as_deref()).collect()
    }

    /// The parameters of `UPDATE_MANY`, `MOVE_MANY` and `DONE_UPDATE_MANY`
    /// (`outputs` a `Vec`: the array parameter's own type).
    #[allow(clippy::ptr_arg)]
    fn params<'a>(
        &'a self,
        outputs: &'a Vec<Option<&'a [u8]>>,
    ) -> [&'a (dyn postgres::types::ToSql + Sync); 7] {
        [
            &self.id,
            &self.state,
            &self.attempts,
            outputs,
            &self.error,
            &self.finished_ms,
            &self.memory_len,
        ]
    }

    /// Copies update `i` of `from`.
    fn take(&mut self, from: &Updates, i: usize) {
        self.id.push(from.id[i]);
        self.state.push(from.state[i]);
        self.attempts.push(from.attempts[i].clone());
        self.output.push(from.output[i].clone());
        self.error.push(from.error[i].clone());
        self.finished_ms.push(from.finished_ms[i]);
        self.memory_len.push(from.memory_len[i]);
    }

    fn push(&mut self, u: &JobUpdate) {
        self.id.push(to_i64(u.id));
        self.state.push(code(u.state));
        self.attempts.push(attempts_text(&u.attempts));
        self.output.push(u.output.clone());
        self.error.push(u.error.clone());
        self.finished_ms.push(
            u.state
                .is_terminal()
                .then(|| to_i64(u.finished_ms.unwrap_or_else(super::db::now_ms))),
        );
        self.memory_len.push(u.output_memory_len.map(to_i64));
    }
}

/// A job's input as bytes: in memory, or read from the client's file (on
/// this thread: the event loop never reads it).
fn input_bytes(job: &NewJob) -> Result<Arc<[u8]>, InsertFailure> {
    if job.memory {
        return Ok(Arc::default());
    }
    let Some(src) = &job.input_source else {
        return Ok(Arc::clone(&job.input));
    };
    let len = usize::try_from(src.len)
        .map_err(|_| InsertFailure::Input("the input is too large".into()))?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(len)
        .map_err(|_| InsertFailure::Store(format!("cannot allocate {len} bytes for the input")))?;
    buf.resize(len, 0);
    src.file.read_exact_at(&mut buf, 0).map_err(|e| {
        InsertFailure::Input(format!(
            "its input cannot be read from the file it was submitted from ({e}); submit it again"
        ))
    })?;
    Ok(buf.into())
}

fn doc_from_row(row: &postgres::Row, with_output: bool) -> Result<JobDoc, String> {
    let id = to_u64(row.get(0));
    let state = state_from(row.get(2)).ok_or_else(|| format!("job {id}: unknown state"))?;
    let attempts = attempts_from(row.get(8)).map_err(|e| format!("job {id}: {e}"))?;
    Ok(JobDoc {
        id,
        pool: row.get(1),
        state,
        priority: row.get(3),
        key: row.get(4),
        created_ms: to_u64(row.get(5)),
        finished_ms: row.get::<_, Option<i64>>(6).map(to_u64),
        attempts,
        output: if with_output {
            row.get::<_, Option<Vec<u8>>>(9).map(Bytes)
        } else {
            None
        },
        error: row.get(7),
    })
}

/// The latest [`Op::Retention`].
struct Retention {
    per_pool: BTreeMap<String, Duration>,
    default: Duration,
    max_finished: u64,
}

/// Pruning runs at most this often, one chunk per statement.
const PRUNE_EVERY: Duration = if cfg!(test) {
    Duration::from_millis(100)
} else {
    Duration::from_secs(10)
};
const PRUNE_CHUNK: u32 = super::PRUNE_CHUNK;

/// The store thread's body: batches of ops in one transaction each, like
/// the SQLite committer (see the module docs of `store`).
pub(super) fn run(
    mut pg: Pg,
    ops: mpsc::Receiver<Msg>,
    done: mpsc::Sender<Completion>,
    waker: Arc<mio::Waker>,
    latency: Arc<super::latency::CommitLatency>,
) -> Result<(), StoreError> {
    // Updates of failed batches, retried first.
    let mut retry: VecDeque<(u64, Op)> = VecDeque::new();
    let mut backoff = Duration::from_millis(100);
    let mut retry_at: Option<Instant> = None;
    let mut retention = Retention {
        per_pool: BTreeMap::new(),
        default: super::DEFAULT_RETENTION,
        max_finished: u64::MAX,
    };
    let mut prune_at = Instant::now() + PRUNE_EVERY;
    let mut closing = false;
    loop {
        let deadline = retry_at.unwrap_or(prune_at);
        let first = match ops.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(m) => Some(m),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        };
        let mut batch: Vec<(u64, Op)> = retry.drain(..).collect();
        let mut take = |m: Msg, batch: &mut Vec<(u64, Op)>| match m {
            Msg::Op { seq, op } => batch.push((seq, op)),
            Msg::Close => closing = true,
            #[cfg(test)]
            Msg::Test(_) => {}
        };
        if let Some(m) = first {
            take(m, &mut batch);
            while batch.len() < MAX_BATCH_OPS {
                match ops.try_recv() {
                    Ok(m) => take(m, &mut batch),
                    Err(_) => break,
                }
            }
        }
        if batch.is_empty() && !closing {
            if Instant::now() >= prune_at {
                let step = pg.prune_step(&retention, PRUNE_CHUNK);
                pg.suspect |= step.is_err();
                let more = step.unwrap_or(false);
                prune_at = Instant::now()
                    + if more {
                        Duration::from_millis(10)
                    } else {
                        PRUNE_EVERY
                    };
            }
            continue;
        }
        for (_, op) in &batch {
            if let Op::Retention {
                per_pool,
                default,
                max_finished,
            } = op
            {
                retention = Retention {
                    per_pool: per_pool.clone(),
                    default: *default,
                    max_finished: *max_finished,
                };
            }
        }
        let upto = batch.iter().map(|(s, _)| *s).max().unwrap_or(0);
        let mut failed = Vec::new();
        let started = Instant::now();
        let result = pg.apply(&batch, &mut failed);
        pg.suspect |= result.is_err();
        latency.observe(started.elapsed());
        match result {
            Ok(()) => {
                backoff = Duration::from_millis(100);
                retry_at = None;
                if !failed.is_empty() {
                    let _ = done.send(Completion::InsertsFailed { failed });
                }
                if upto > 0 {
                    let _ = done.send(Completion::Durable { upto });
                }
                for (_, op) in &batch {
                    if let Op::Query { token, query } = op {
                        let result = pg.query(query);
                        pg.suspect |= result.is_err();
                        let _ = done.send(Completion::Query {
                            token: *token,
                            result,
                        });
                    }
                }
            }
            Err(error) => {
                let lost_inserts = batch
                    .iter()
                    .filter_map(|(_, op)| match op {
                        Op::Insert(j) => Some(j.id),
                        _ => None,
                    })
                    .collect();
                for (seq, op) in batch {
                    match op {
                        Op::Update(_) | Op::Retention { .. } => retry.push_back((seq, op)),
                        Op::Query { token, .. } => {
                            let _ = done.send(Completion::Query {
                                token,
                                result: Err(format!(
                                    "job store {} unavailable: {error}",
                                    pg.display()
                                )),
                            });
                        }
                        Op::Insert(_) => {}
                    }
                }
                let _ = done.send(Completion::Failed {
                    upto,
                    lost_inserts,
                    error: format!("job store {}: {error}", pg.display()),
                });
                retry_at = Some(Instant::now() + backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        let _ = waker.wake();
        if closing {
            return if retry.is_empty() {
                Ok(())
            } else {
                Err(StoreError::Postgres {
                    url: pg.display(),
                    what: "the last updates could not be committed",
                    detail: "the server is unreachable".into(),
                })
            };
        }
    }
}
