//! Everything that speaks SQL: opening and validating `jobs.db` (migrating
//! an older schema), the schema, recovery, batch writes, queries and the
//! pruning statements. The payload files' I/O is in `files.rs`; this module
//! checks them (there, with the recorded length) where a row says so.
//!
//! Schema version 4 (version 3 added `owner`, the submitter's uid, for
//! authorization; version 4 `input_memory_len`). Where a payload lives:
//! - Inputs up to [`INLINE_INPUT_MAX`] bytes: the `jobs.input` column.
//! - Larger inputs: `job_inputs`. SQLite rewrites a whole row on every
//!   update, and a job is updated several times, so a large input stored
//!   inline would be written again each time.
//! - Inputs and outputs of at least
//!   [`FILE_PAYLOAD_MIN`](super::FILE_PAYLOAD_MIN) bytes: a payload file;
//!   the row's `input_file_len` / `output_file_len` (NULL otherwise) says so
//!   and records the length, which recovery and [`Query::Job`] check.
//! - Smaller outputs: the `jobs.output` column (written once, with the
//!   final state).
//! - Large inputs of a `payloads = "memory"` pool: nowhere on disk. The
//!   row's `input_memory_len` records the length, and recovery ends such a
//!   job `dead` ([`MEMORY_INPUT_LOST`]).
//!
//! Version 1 had no `*_file_len` columns: it is migrated in place by adding
//! them (`ALTER TABLE`, NULL for every existing row, so its payloads stay
//! where they are) and setting `user_version` to 2, in one transaction.
//!
//! Layout choices, all for the write path:
//! - `id` is the rowid (`INTEGER PRIMARY KEY`), so inserts append.
//! - Blobs are the last columns, so reading a job's metadata never walks a
//!   large payload's overflow pages. (In a store migrated from version 1 the
//!   two small `*_file_len` columns come after the blobs; listings never
//!   read them, only recovery, [`Query::Job`] and the payload files'
//!   bookkeeping do.)
//! - Two partial indexes, each as small as its reader allows, because every
//!   index entry costs the write path (plain indexes on `state` and `pool`
//!   cost about a quarter of the write throughput): `jobs_active (state, id)` over queued and
//!   running jobs only, for recovery and for listing those states, and
//!   `jobs_finished (pool, finished_ms)` over finished jobs only, for
//!   pruning. A new job enters the first, leaves it when it finishes and
//!   enters the second. Listing by pool or by a terminal state walks the
//!   table newest first and stops at the limit; that is slow only for a
//!   rare pool or state in a large store, and only for `jobvisorctl jobs`.

mod manage;
mod write;

pub(super) use write::{PendingInsert, PendingUpdate};
#[cfg(test)]
pub(super) use write::{INSERT_MANY, UPDATE_MANY};

use super::files::{Kind, Payloads, ReadError};
use super::{JobUpdate, NewJob, Query, QueryResult, Recovered, RecoveredJob, StoreError};
use crate::private_dir::{PrivateDir, Strictness};
use ipc_proto::control::{Attempt, JobDoc, JobState, Outcome};
use ipc_proto::Bytes;
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{
    params, Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior,
};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The schema this build reads and writes (`PRAGMA user_version`).
pub(super) const SCHEMA_VERSION: i64 = 4;
/// `PRAGMA application_id` of a jobvisor store: "JVST".
pub(super) const APPLICATION_ID: i64 = 0x4A56_5354;
/// Page size of a new store.
const PAGE_SIZE: i64 = 16384;
/// Inputs up to this size are stored in the `jobs` row itself.
pub(super) const INLINE_INPUT_MAX: usize = 1024;
/// Error of a job whose input was only in memory when the daemon stopped.
pub(super) const MEMORY_INPUT_LOST: &str =
    "input lost: payloads = memory, and the daemon stopped before the job ended; submit it again";
/// Noted on the document of a job whose large output was only handed to
/// the clients waiting for it when it ended.
pub(super) const MEMORY_OUTPUT_NOT_KEPT: &str =
    "output not kept: payloads = memory (a large output goes only to the clients waiting on the job when it ends)";
/// Error of an attempt cut short by a daemon restart.
pub(super) const LOST_ON_RESTART: &str = "daemon restarted while the job was running";

/// A new store. (A store migrated from version 1 has the two `*_file_len`
/// columns last, after the blobs; every statement names its columns.)
const SCHEMA: &str = "
CREATE TABLE jobs (
    id              INTEGER PRIMARY KEY,
    pool            TEXT    NOT NULL,
    state           INTEGER NOT NULL,
    priority        INTEGER NOT NULL,
    key             TEXT,
    max_attempts    INTEGER NOT NULL,
    timeout_ms      INTEGER,
    created_ms      INTEGER NOT NULL,
    finished_ms     INTEGER,
    error           TEXT,
    attempts        TEXT    NOT NULL,
    input_file_len  INTEGER,
    output_file_len INTEGER,
    owner           INTEGER NOT NULL DEFAULT 0,
    input_memory_len INTEGER,
    output_memory_len INTEGER,
    output          BLOB,
    input           BLOB
);
CREATE INDEX jobs_active ON jobs(state, id) WHERE state < 2;
CREATE INDEX jobs_finished ON jobs(pool, finished_ms) WHERE finished_ms IS NOT NULL;
CREATE TABLE job_inputs (id INTEGER PRIMARY KEY, input BLOB NOT NULL);
CREATE TRIGGER jobs_delete_input AFTER DELETE ON jobs WHEN old.input IS NULL
BEGIN
    DELETE FROM job_inputs WHERE id = old.id;
END;
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO meta VALUES ('max_id', 0);
";

/// Proves the tables have the columns this build uses.
const CHECK_COLUMNS: &str = "
SELECT id, pool, state, priority, key, max_attempts, timeout_ms, created_ms,
       finished_ms, error, attempts, input_file_len, output_file_len, owner,
       input_memory_len, output_memory_len, output, input
       FROM jobs LIMIT 0;
SELECT id, input FROM job_inputs LIMIT 0;
SELECT value FROM meta WHERE key = 'max_id';
";

/// Proves a version 3 store has the columns the migration expects.
const CHECK_COLUMNS_V3: &str = "
SELECT id, pool, state, priority, key, max_attempts, timeout_ms, created_ms,
       finished_ms, error, attempts, input_file_len, output_file_len, owner, output, input
       FROM jobs LIMIT 0;
SELECT id, input FROM job_inputs LIMIT 0;
SELECT value FROM meta WHERE key = 'max_id';
";

/// Proves a version 2 store has the columns the migration expects.
const CHECK_COLUMNS_V2: &str = "
SELECT id, pool, state, priority, key, max_attempts, timeout_ms, created_ms,
       finished_ms, error, attempts, input_file_len, output_file_len, output, input
       FROM jobs LIMIT 0;
SELECT id, input FROM job_inputs LIMIT 0;
SELECT value FROM meta WHERE key = 'max_id';
";

/// Proves a version 1 store has the columns the migration expects.
const CHECK_COLUMNS_V1: &str = "
SELECT id, pool, state, priority, key, max_attempts, timeout_ms, created_ms,
       finished_ms, error, attempts, output, input FROM jobs LIMIT 0;
SELECT id, input FROM job_inputs LIMIT 0;
SELECT value FROM meta WHERE key = 'max_id';
";

/// Version 1 to 2: payloads may live in files. Existing rows keep theirs
/// in the database (both new columns NULL).
const MIGRATE_V1_V2: &str = "
ALTER TABLE jobs ADD COLUMN input_file_len INTEGER;
ALTER TABLE jobs ADD COLUMN output_file_len INTEGER;
PRAGMA user_version = 2;
";

/// Version 2 to 3: jobs have an owner (the submitter's uid). Existing rows
/// become root's: only admins see them.
const MIGRATE_V2_V3: &str = "
ALTER TABLE jobs ADD COLUMN owner INTEGER NOT NULL DEFAULT 0;
PRAGMA user_version = 3;
";

/// Version 3 to 4: a large input may live only in the daemon's memory
/// (`payloads = "memory"`): the row records its length, to say at the next
/// start that it is lost.
const MIGRATE_V3_V4: &str = "
ALTER TABLE jobs ADD COLUMN input_memory_len INTEGER;
ALTER TABLE jobs ADD COLUMN output_memory_len INTEGER;
PRAGMA user_version = 4;
";

pub(super) const INSERT_JOB: &str =
    "INSERT INTO jobs (id, pool, state, priority, key, max_attempts, \
     timeout_ms, created_ms, finished_ms, error, attempts, input_file_len, \
     output_file_len, output, input, owner, input_memory_len, output_memory_len) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)";
const INSERT_INPUT: &str = "INSERT INTO job_inputs (id, input) VALUES (?1, ?2)";
pub(super) const UPDATE_JOB: &str =
    "UPDATE jobs SET state = ?2, attempts = ?3, output = ?4, error = ?5, \
     finished_ms = ?6, output_file_len = ?7, output_memory_len = ?8 WHERE id = ?1";
/// A job that succeeded no longer needs its input file (it is never
/// dispatched again).
const DROP_INPUT_FILE: &str =
    "UPDATE jobs SET input_file_len = NULL WHERE id = ?1 AND input_file_len IS NOT NULL";
const UPDATE_MAX_ID: &str = "UPDATE meta SET value = ?1 WHERE key = 'max_id'";

/// Columns of a [`JobDoc`], in [`doc_from_row`]'s order.
macro_rules! select_doc {
    ($($rest:literal),*) => {
        concat!(
            "SELECT id, pool, state, priority, key, created_ms, finished_ms, error, attempts",
            $($rest),*
        )
    };
}
// `?4`, the owner filter, is NULL for an admin (every job) and a uid
// otherwise; every listing binds it.
pub(super) const SELECT_JOB: &str =
    select_doc!(", output, output_file_len, output_memory_len FROM jobs WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)");
/// A job without its output (for `wait`): no blob read, no file checked.
pub(super) const SELECT_JOB_META: &str =
    select_doc!(", NULL, NULL, NULL FROM jobs WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)");
pub(super) const LIST_ALL: &str = select_doc!(
    " FROM jobs WHERE (?4 IS NULL OR owner = ?4) \
     AND (?5 IS NULL OR id < ?5) AND (?6 IS NULL OR created_ms >= ?6) ORDER BY id DESC LIMIT ?1"
);
pub(super) const LIST_POOL: &str = select_doc!(
    " FROM jobs WHERE pool = ?2 AND (?4 IS NULL OR owner = ?4) \
     AND (?5 IS NULL OR id < ?5) AND (?6 IS NULL OR created_ms >= ?6) ORDER BY id DESC LIMIT ?1"
);
// `state < 2` is what lets SQLite use the partial index `jobs_active`;
// `INDEXED BY` makes it use it (or fail at prepare time, caught by a test),
// rather than walk the whole table to avoid a sort.
pub(super) const LIST_ACTIVE: &str = select_doc!(
    " FROM jobs INDEXED BY jobs_active WHERE state = ?3 AND state < 2 \
     AND (?4 IS NULL OR owner = ?4) \
     AND (?5 IS NULL OR id < ?5) AND (?6 IS NULL OR created_ms >= ?6) ORDER BY id DESC LIMIT ?1"
);
pub(super) const LIST_POOL_ACTIVE: &str = select_doc!(
    " FROM jobs INDEXED BY jobs_active WHERE pool = ?2 AND state = ?3 AND state < 2 \
     AND (?4 IS NULL OR owner = ?4) \
     AND (?5 IS NULL OR id < ?5) AND (?6 IS NULL OR created_ms >= ?6) ORDER BY id DESC LIMIT ?1"
);
pub(super) const LIST_FINISHED: &str = select_doc!(
    " FROM jobs WHERE state = ?3 AND (?4 IS NULL OR owner = ?4) \
     AND (?5 IS NULL OR id < ?5) AND (?6 IS NULL OR created_ms >= ?6) ORDER BY id DESC LIMIT ?1"
);
pub(super) const LIST_POOL_FINISHED: &str = select_doc!(
    " FROM jobs WHERE pool = ?2 AND state = ?3 AND (?4 IS NULL OR owner = ?4) \
     AND (?5 IS NULL OR id < ?5) AND (?6 IS NULL OR created_ms >= ?6) \
     ORDER BY id DESC LIMIT ?1"
);
/// Jobs to requeue at startup.
pub(super) const SELECT_ACTIVE: &str =
    "SELECT id, pool, state, priority, key, max_attempts, timeout_ms, \
     created_ms, attempts, COALESCE(input, (SELECT input FROM job_inputs WHERE id = jobs.id)), \
     input_file_len, owner, input_memory_len FROM jobs INDEXED BY jobs_active WHERE state < 2 ORDER BY id";
/// Which payload files a row references.
pub(super) const SELECT_FILES: &str =
    "SELECT input_file_len, output_file_len FROM jobs WHERE id = ?1";

/// Pools that have finished jobs: a loose index scan over `jobs_finished`
/// (one index seek per pool, however many jobs).
pub(super) const FINISHED_POOLS: &str = "
WITH RECURSIVE p(pool) AS (
    SELECT (SELECT MIN(pool) FROM jobs WHERE finished_ms IS NOT NULL)
    UNION ALL
    SELECT (SELECT MIN(pool) FROM jobs WHERE finished_ms IS NOT NULL AND pool > p.pool)
    FROM p WHERE p.pool IS NOT NULL
)
SELECT pool FROM p WHERE pool IS NOT NULL";
pub(super) const OLDEST_FINISHED: &str =
    "SELECT MIN(finished_ms) FROM jobs WHERE pool = ?1 AND finished_ms IS NOT NULL";
// Deletions return the payload files of the deleted rows, to be removed
// once the deletion has committed.
pub(super) const DELETE_EXPIRED: &str = "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs \
     WHERE pool = ?1 AND finished_ms IS NOT NULL AND finished_ms < ?2 AND state >= 2 LIMIT ?3) \
     RETURNING id, input_file_len, output_file_len";
pub(super) const COUNT_FINISHED: &str = "SELECT COUNT(*) FROM jobs WHERE finished_ms IS NOT NULL";
// `NOT INDEXED`: walking the table in rowid order finds the oldest finished
// jobs at once; going through an index would sort every finished job.
pub(super) const DELETE_OLDEST: &str =
    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs NOT INDEXED \
     WHERE finished_ms IS NOT NULL AND state >= 2 ORDER BY id LIMIT ?1) \
     RETURNING id, input_file_len, output_file_len";

/// The connection and what the store thread keeps next to it.
pub(super) struct Db {
    conn: Connection,
    path: PathBuf,
    /// Largest id ever committed (mirrors the `meta` row).
    max_id: u64,
    /// Scratch buffer for encoding attempts, reused across ops.
    json: Vec<u8>,
    /// Where the large payloads are.
    payloads: Payloads,
    /// Held while the store is open (`jobs.lock`, see [`lock_file`]).
    _lock: Flock<File>,
    /// The state directory, open and checked (lock and database files are
    /// created through it).
    _dir: PrivateDir,
}

/// What recovery does to a row.
enum Change {
    /// Back to `queued` (its running attempt closed as lost).
    Requeue { id: u64, attempts: Vec<Attempt> },
    /// `dead`, finished now.
    Dead {
        id: u64,
        attempts: Vec<Attempt>,
        error: String,
    },
}

/// Payload files committed rows no longer reference (those of deleted
/// rows, of ended jobs' inputs, of replaced outputs, and outputs of updates
/// that matched no row), to dispose of once the transaction has committed
/// (see [`Payloads::remove_deleted`]).
pub(super) type DeletedFiles = Vec<(u64, Kind)>;

impl Db {
    /// Opens `state_dir/jobs.db`, creating it (and the directory) if needed,
    /// checks that it is a jobvisor store this build can use (migrating an
    /// older schema), and creates `payload_dir` if needed.
    pub fn open(state_dir: &Path, payload_dir: &Path) -> Result<Db, StoreError> {
        let path = state_dir.join("jobs.db");
        let existed = state_dir.is_dir();
        // Owned by us and writable by nobody else, or refused; created 0700.
        let dir = PrivateDir::open(
            state_dir,
            "daemon.state_dir",
            true,
            Strictness::NoForeignWrite,
        )
        .map_err(|e| StoreError::Untrusted(e.0))?;
        check_access(&dir, state_dir)?;
        let lock = lock_file(&dir, "jobs.lock", &state_dir.join("jobs.lock"), || {
            StoreError::InUse { path: path.clone() }
        })?;
        // SQLite opens by path (it resolves any path it is given, so a
        // `/proc/self/fd/N/…` path would not pin the directory either),
        // never through a link in any component (`SQLITE_OPEN_NOFOLLOW`);
        // the files exist 0600 first (SQLite gives `-wal` and `-shm` the
        // database's mode). Once it has them open, the path is checked to
        // still lead to the directory we checked (see below).
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let conn = Connection::open_with_flags(&path, flags)
            .map_err(|e| sqlite_error(&path, "cannot open the database", e))?;
        let mut db = Db {
            conn,
            path,
            max_id: 0,
            json: Vec::with_capacity(1024),
            payloads: Payloads::new(payload_dir),
            _lock: lock,
            _dir: dir,
        };
        db.init()?;
        // The database and its WAL are open now (SQLite keeps them open):
        // they must be the files of the directory we checked, not of one
        // swapped in under the same path meanwhile.
        if !db._dir.is_at(state_dir) {
            return Err(StoreError::Untrusted(format!(
                "state_dir {} changed while jobvisord opened it (another directory was put in its place); check who can write to its parent directory, then restart jobvisord",
                state_dir.display()
            )));
        }
        // Only now: a refused store is left as it was.
        db.payloads.open()?;
        // SQLite syncs the directory when it creates the WAL; syncing it (and
        // its parent, which a new state directory changed) here too makes
        // the files' directory entries durable before the first ack.
        // Best effort: some file systems refuse to fsync a directory.
        let _ = db._dir.sync();
        if !existed {
            if let Some(d) = state_dir.parent().and_then(|p| std::fs::File::open(p).ok()) {
                let _ = d.sync_all();
            }
        }
        Ok(db)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn payloads(&self) -> &Payloads {
        &self.payloads
    }

    /// Largest job id committed so far.
    pub fn max_id(&self) -> u64 {
        self.max_id
    }

    fn err(&self, what: &'static str) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |e| sqlite_error(&self.path, what, e)
    }

    fn not_a_store(&self, detail: impl Into<String>) -> StoreError {
        StoreError::NotAStore {
            path: self.path.clone(),
            detail: detail.into(),
        }
    }

    /// Validates the file, then configures the connection and creates the
    /// schema if the file is new. Nothing is written to a file that fails
    /// validation (not even the journal mode).
    fn init(&mut self) -> Result<(), StoreError> {
        // The first statement reads the header: a file that is not SQLite
        // fails here with "file is not a database".
        let app_id: i64 = self
            .conn
            .pragma_query_value(None, "application_id", |r| r.get(0))
            .map_err(self.err("cannot read the database header"))?;
        let version: i64 = self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(self.err("cannot read the schema version"))?;
        let objects: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM sqlite_schema", [], |r| r.get(0))
            .map_err(self.err("cannot read the schema"))?;
        let fresh = version == 0 && objects == 0;
        if !fresh {
            if app_id != APPLICATION_ID {
                return Err(self.not_a_store("an SQLite database of another program"));
            }
            if version > SCHEMA_VERSION {
                return Err(StoreError::TooNew {
                    path: self.path.clone(),
                    found: version,
                    supported: SCHEMA_VERSION,
                });
            }
            if version < 1 {
                return Err(self.not_a_store(format!("unknown schema version {version}")));
            }
            // Checked before anything is written (the migrations come once
            // the connection is configured).
            let check = match version {
                1 => Some(CHECK_COLUMNS_V1),
                2 => Some(CHECK_COLUMNS_V2),
                3 => Some(CHECK_COLUMNS_V3),
                _ => None,
            };
            if let Some(check) = check {
                if let Err(e) = self.conn.execute_batch(check) {
                    return Err(self.not_a_store(format!("schema version {version} but {e}")));
                }
            }
        }

        if fresh {
            // Only possible before the first write. Larger pages than the
            // default 4 KiB mean fewer B-tree splits and levels: about 10%
            // less CPU per op in the throughput test.
            self.conn
                .pragma_update(None, "page_size", PAGE_SIZE)
                .map_err(self.err("cannot set the page size"))?;
        }
        let mode: String = self
            .conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(self.err("cannot enable WAL mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Sqlite {
                path: self.path.clone(),
                what: "cannot enable WAL mode",
                source: rusqlite::Error::InvalidQuery,
            });
        }
        // FULL: a commit is on disk (WAL fsynced) before it returns, which is
        // what "durable" promises. NORMAL could lose the last commits on
        // power loss.
        self.conn
            .execute_batch(
                "PRAGMA synchronous = FULL;
                 PRAGMA cache_size = -32768;
                 PRAGMA temp_store = MEMORY;
                 PRAGMA journal_size_limit = 67108864;",
            )
            .map_err(self.err("cannot configure the connection"))?;
        // Only another process (an operator's `sqlite3`) can hold a lock.
        self.conn
            .busy_timeout(Duration::from_secs(5))
            .map_err(self.err("cannot configure the connection"))?;
        self.conn.set_prepared_statement_cache_capacity(32);

        if fresh {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| sqlite_error(&self.path, "cannot create the schema", e))?;
            tx.execute_batch(SCHEMA)
                .and_then(|()| tx.pragma_update(None, "application_id", APPLICATION_ID))
                .and_then(|()| tx.pragma_update(None, "user_version", SCHEMA_VERSION))
                .and_then(|()| tx.commit())
                .map_err(|e| sqlite_error(&self.path, "cannot create the schema", e))?;
        } else {
            if version == 1 {
                self.migrate(MIGRATE_V1_V2, "cannot migrate the schema to version 2")?;
            }
            if version <= 2 {
                self.migrate(MIGRATE_V2_V3, "cannot migrate the schema to version 3")?;
            }
            if version <= 3 {
                self.migrate(MIGRATE_V3_V4, "cannot migrate the schema to version 4")?;
            }
            if let Err(e) = self.conn.execute_batch(CHECK_COLUMNS) {
                return Err(self.not_a_store(format!("schema version {version} but {e}")));
            }
        }

        let meta: i64 = self
            .conn
            .query_row("SELECT value FROM meta WHERE key = 'max_id'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.err("cannot read the id high-water mark"))?
            .unwrap_or(0);
        let max_row: Option<i64> = self
            .conn
            .query_row("SELECT MAX(id) FROM jobs", [], |r| r.get(0))
            .map_err(self.err("cannot read the largest job id"))?;
        self.max_id = from_sql_u64(meta.max(max_row.unwrap_or(0)));
        Ok(())
    }

    /// Migrates the store one version up in place, in one transaction: a
    /// crash leaves it at the version before, to be migrated at the next
    /// start.
    fn migrate(&mut self, sql: &str, what: &'static str) -> Result<(), StoreError> {
        let fail = |e| sqlite_error(&self.path, what, e);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(fail)?;
        tx.execute_batch(sql)
            .and_then(|()| tx.commit())
            .map_err(fail)
    }

    /// Which payload files the committed row of job `id` references, as
    /// `(input, output)`; none if there is no such row.
    fn referenced_files(&self, id: u64) -> rusqlite::Result<(bool, bool)> {
        let lens: Option<(Option<i64>, Option<i64>)> = self
            .conn
            .prepare_cached(SELECT_FILES)?
            .query_row([to_sql_u64(id)], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(lens.map_or((false, false), |(i, o)| (i.is_some(), o.is_some())))
    }

    /// Whether the committed row of job `id` references its `kind` payload
    /// file.
    pub fn references(&self, id: u64, kind: Kind) -> rusqlite::Result<bool> {
        let (input, output) = self.referenced_files(id)?;
        Ok(match kind {
            Kind::Input => input,
            Kind::Output => output,
        })
    }

    /// Whether the committed row of job `id` references a payload file.
    pub fn references_any(&self, id: u64) -> rusqlite::Result<bool> {
        let (input, output) = self.referenced_files(id)?;
        Ok(input || output)
    }

    /// Removes the payload files that no row references: left by a crash
    /// between writing them and committing the rows, or by a job's output
    /// replaced by an update. Returns how many. (Runs at open, before
    /// anything else can write files.)
    pub fn sweep_payloads(&self) -> Result<usize, StoreError> {
        let dir = self.payloads.dir();
        let files = self.payloads.list().map_err(|source| StoreError::Access {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut removed = 0;
        for (id, kind) in files {
            let referenced = self
                .references(id, kind)
                .map_err(self.err("cannot check the payload files"))?;
            // Housekeeping: a file that cannot be removed now is tried
            // again at the next start.
            if !referenced && self.payloads.remove(id, kind).is_ok() {
                removed += 1;
            }
        }
        if removed > 0 {
            let _ = self.payloads.sync_dir();
        }
        Ok(removed)
    }

    /// Requeues (or declares dead) the jobs that were running when the
    /// daemon died, in one transaction, and returns what the daemon needs.
    ///
    /// A job whose input file is missing or damaged cannot run: it is
    /// declared dead, with an error naming the file.
    pub fn recover(&mut self, now_ms: u64) -> Result<Recovered, StoreError> {
        let path = self.path.clone();
        let fail = |e| sqlite_error(&path, "recovery failed", e);
        let not_a_store = |detail: String| StoreError::NotAStore {
            path: path.clone(),
            detail,
        };
        let Db { conn, payloads, .. } = self;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(fail)?;
        let mut jobs = Vec::new();
        let mut changed = Vec::new();
        {
            let mut stmt = tx.prepare(SELECT_ACTIVE).map_err(fail)?;
            let mut rows = stmt.query([]).map_err(fail)?;
            while let Some(row) = rows.next().map_err(fail)? {
                let id = from_sql_u64(row.get(0).map_err(fail)?);
                let state = state_from_code(row.get(2).map_err(fail)?)
                    .ok_or_else(|| not_a_store(format!("job {id} has an unknown state")))?;
                let attempts = parse_attempts(row.get_ref(8).map_err(fail)?)
                    .map_err(|e| not_a_store(format!("job {id}: {e}")))?;
                let file_len: Option<i64> = row.get(10).map_err(fail)?;
                let input_file = file_len.map(from_sql_u64);
                let mut unusable = None;
                let in_memory: Option<i64> = row.get(12).map_err(fail)?;
                let input: Arc<[u8]> = match (file_len, row.get_ref(9).map_err(fail)?) {
                    // Its input was only in the memory of the daemon that
                    // stopped: never rerun without it.
                    _ if in_memory.is_some() => {
                        unusable = Some(MEMORY_INPUT_LOST.to_string());
                        Arc::default()
                    }
                    // Checked, not read: the daemon reads it into a
                    // worker's arena when the job runs.
                    (Some(len), _) => {
                        match payloads.check(id, Kind::Input, from_sql_u64(len)) {
                            Ok(()) => Arc::default(),
                            // Maybe the disk's fault, maybe passing:
                            // refuse to start rather than lose the job.
                            Err(ReadError::Io(path, source)) => {
                                return Err(StoreError::Payload {
                                    path,
                                    what: "cannot read a queued job's input",
                                    source,
                                })
                            }
                            Err(e) => {
                                unusable = Some(format!("input {e}; the job cannot run"));
                                Arc::default()
                            }
                        }
                    }
                    (None, ValueRef::Blob(b)) => Arc::from(b),
                    (None, _) => return Err(not_a_store(format!("job {id} has no input"))),
                };
                let job = NewJob {
                    id,
                    pool: row.get(1).map_err(fail)?,
                    priority: row.get(3).map_err(fail)?,
                    key: row.get(4).map_err(fail)?,
                    max_attempts: row.get(5).map_err(fail)?,
                    timeout_ms: row
                        .get::<_, Option<i64>>(6)
                        .map_err(fail)?
                        .map(from_sql_u64),
                    input,
                    input_source: None,
                    created_ms: from_sql_u64(row.get(7).map_err(fail)?),
                    owner: row.get(11).map_err(fail)?,
                    spill: false,
                    memory: false,
                };
                let mut attempts = attempts;
                if state == JobState::Running {
                    if let Some(last) = attempts.last_mut().filter(|a| a.outcome.is_none()) {
                        last.ended_ms = Some(now_ms);
                        last.outcome = Some(Outcome::Lost);
                        last.error = Some(LOST_ON_RESTART.to_string());
                    }
                }
                if let Some(error) = unusable {
                    changed.push(Change::Dead {
                        id,
                        attempts,
                        error,
                    });
                    continue;
                }
                if state == JobState::Running {
                    if attempts.len() >= job.max_attempts.max(1) as usize {
                        let error = LOST_ON_RESTART.to_string();
                        changed.push(Change::Dead {
                            id,
                            attempts,
                            error,
                        });
                        continue;
                    }
                    let attempts = attempts.clone();
                    changed.push(Change::Requeue { id, attempts });
                }
                jobs.push(RecoveredJob {
                    job,
                    attempts,
                    input_file,
                });
            }
        }
        {
            let mut dead = tx
                .prepare(
                    // Dead: its input file is not needed any more.
                    "UPDATE jobs SET state = ?2, attempts = ?3, finished_ms = ?4, error = ?5, \
                     input_file_len = NULL WHERE id = ?1",
                )
                .map_err(fail)?;
            let mut requeue = tx
                .prepare("UPDATE jobs SET state = ?2, attempts = ?3 WHERE id = ?1")
                .map_err(fail)?;
            let json = |attempts| {
                serde_json::to_string(attempts)
                    .map_err(|e| fail(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))
            };
            for change in &changed {
                match change {
                    Change::Requeue { id, attempts } => requeue.execute(params![
                        to_sql_u64(*id),
                        state_code(JobState::Queued),
                        json(attempts)?
                    ]),
                    Change::Dead {
                        id,
                        attempts,
                        error,
                    } => dead.execute(params![
                        to_sql_u64(*id),
                        state_code(JobState::Dead),
                        json(attempts)?,
                        to_sql_u64(now_ms),
                        error
                    ]),
                }
                .map_err(fail)?;
            }
        }
        let mut counts: BTreeMap<String, HashMap<JobState, u64>> = BTreeMap::new();
        {
            let mut stmt = tx
                .prepare("SELECT pool, state, COUNT(*) FROM jobs GROUP BY pool, state")
                .map_err(fail)?;
            let mut rows = stmt.query([]).map_err(fail)?;
            while let Some(row) = rows.next().map_err(fail)? {
                let pool: String = row.get(0).map_err(fail)?;
                let code: i64 = row.get(1).map_err(fail)?;
                let state = state_from_code(code)
                    .ok_or_else(|| not_a_store(format!("unknown state code {code}")))?;
                let n = from_sql_u64(row.get(2).map_err(fail)?);
                counts.entry(pool).or_default().insert(state, n);
            }
        }
        tx.commit().map_err(fail)?;
        let dead_inputs: DeletedFiles = changed
            .iter()
            .filter_map(|change| match change {
                Change::Dead { id, .. } => Some((*id, Kind::Input)),
                Change::Requeue { .. } => None,
            })
            .collect();
        payloads.remove_deleted(&dead_inputs);
        Ok(Recovered {
            jobs,
            next_id: self.max_id + 1,
            id_end: u64::MAX,
            counts,
        })
    }

    /// Answers a query from committed data.
    pub fn query(&self, query: &Query) -> Result<QueryResult, String> {
        let run = || -> rusqlite::Result<Result<QueryResult, String>> {
            match query {
                Query::Job { id, owner, output } => {
                    let sql = if *output { SELECT_JOB } else { SELECT_JOB_META };
                    let mut stmt = self.conn.prepare_cached(sql)?;
                    let found = stmt
                        .query_row(params![to_sql_u64(*id), owner], |row| {
                            Ok((
                                doc_from_row(row, true),
                                row.get::<_, Option<i64>>(10)?,
                                row.get::<_, Option<i64>>(11)?,
                            ))
                        })
                        .optional()?;
                    let found = found.map(|(doc, file, in_memory)| {
                        let doc = doc.map(|mut doc| {
                            if in_memory.is_some() && *output {
                                doc.note_error(MEMORY_OUTPUT_NOT_KEPT.to_string());
                            }
                            doc
                        });
                        (doc, file)
                    });
                    Ok(match found {
                        None => Ok(QueryResult::Job(None)),
                        Some((Err(e), _)) => Err(e),
                        Some((Ok(mut doc), Some(len))) => {
                            let len = from_sql_u64(len);
                            match self.payloads.check(doc.id, Kind::Output, len) {
                                Ok(()) => Ok(QueryResult::JobWithOutputFile(doc, len)),
                                Err(e) => {
                                    doc.note_error(format!("output {e}"));
                                    Ok(QueryResult::Job(Some(doc)))
                                }
                            }
                        }
                        Some((Ok(doc), None)) => Ok(QueryResult::Job(Some(doc))),
                    })
                }
                Query::Retry { id, owner } => self.retry(*id, *owner).map(Ok),
                Query::CancelQueued { .. } => Ok(Err(
                    "cancelling through the store is for a PostgreSQL store".to_string(),
                )),
                Query::Warnings => Ok(Ok(QueryResult::Warnings(Vec::new()))),
                Query::QueueCounts => Ok(Ok(QueryResult::QueueCounts(Vec::new()))),
                Query::Nodes => Ok(Err(
                    "the SQLite store has no other nodes; a cluster needs [store] url = \"postgres://…\""
                        .to_string(),
                )),
                Query::Prune {
                    finished_before_ms,
                    state,
                    pool,
                    owner,
                    limit,
                } => self
                    .prune(*finished_before_ms, *state, pool.as_deref(), *owner, *limit)
                    .map(|n| Ok(QueryResult::Pruned(n))),
                Query::List {
                    pool,
                    state,
                    limit,
                    owner,
                    before,
                    since_ms,
                } => {
                    let sql = match (pool, state.map(JobState::is_terminal)) {
                        (None, None) => LIST_ALL,
                        (Some(_), None) => LIST_POOL,
                        (None, Some(false)) => LIST_ACTIVE,
                        (Some(_), Some(false)) => LIST_POOL_ACTIVE,
                        (None, Some(true)) => LIST_FINISHED,
                        (Some(_), Some(true)) => LIST_POOL_FINISHED,
                    };
                    let mut stmt = self.conn.prepare_cached(sql)?;
                    stmt.raw_bind_parameter(1, i64::from(*limit))?;
                    if let Some(pool) = pool {
                        stmt.raw_bind_parameter(2, pool)?;
                    }
                    if let Some(state) = state {
                        stmt.raw_bind_parameter(3, state_code(*state))?;
                    }
                    stmt.raw_bind_parameter(4, owner)?;
                    stmt.raw_bind_parameter(5, before.map(to_sql_u64))?;
                    stmt.raw_bind_parameter(6, since_ms.map(to_sql_u64))?;
                    let mut rows = stmt.raw_query();
                    let mut docs = Vec::new();
                    while let Some(row) = rows.next()? {
                        match doc_from_row(row, false) {
                            Ok(doc) => docs.push(doc),
                            Err(e) => return Ok(Err(e)),
                        }
                    }
                    Ok(Ok(QueryResult::List(docs)))
                }
            }
        };
        run().unwrap_or_else(|e| Err(format!("cannot read the job store: {e}")))
    }

    /// Runs `f` in its own `BEGIN IMMEDIATE` transaction and commits.
    fn in_tx<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> rusqlite::Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match f(&self.conn).and_then(|t| self.conn.execute_batch("COMMIT").map(|()| t)) {
            Ok(t) => Ok(t),
            Err(e) => {
                self.rollback();
                Err(e)
            }
        }
    }

    /// Pools that have finished jobs.
    pub fn finished_pools(&self) -> rusqlite::Result<Vec<String>> {
        let mut stmt = self.conn.prepare_cached(FINISHED_POOLS)?;
        let pools = stmt.query_map([], |r| r.get(0))?;
        pools.collect()
    }

    /// When the oldest finished job of `pool` finished, if it has any.
    pub fn oldest_finished(&self, pool: &str) -> rusqlite::Result<Option<u64>> {
        let mut stmt = self.conn.prepare_cached(OLDEST_FINISHED)?;
        let ms: Option<i64> = stmt.query_row([pool], |r| r.get(0))?;
        Ok(ms.map(from_sql_u64))
    }

    /// Deletes up to `limit` finished jobs of `pool` that finished before
    /// `cutoff_ms`, in one transaction; returns how many, and their payload
    /// files (for the caller to remove).
    pub fn delete_expired(
        &self,
        pool: &str,
        cutoff_ms: u64,
        limit: u32,
    ) -> rusqlite::Result<(usize, DeletedFiles)> {
        self.in_tx(|conn| {
            let mut stmt = conn.prepare_cached(DELETE_EXPIRED)?;
            let deleted = deleted_files(stmt.query(params![pool, to_sql_u64(cutoff_ms), limit])?);
            deleted
        })
    }

    /// Number of finished jobs in the store.
    pub fn count_finished(&self) -> rusqlite::Result<u64> {
        let n: i64 = self
            .conn
            .prepare_cached(COUNT_FINISHED)?
            .query_row([], |r| r.get(0))?;
        Ok(from_sql_u64(n))
    }

    /// Deletes the `limit` oldest (by id) finished jobs, in one
    /// transaction; returns how many, and their payload files.
    pub fn delete_oldest_finished(&self, limit: u32) -> rusqlite::Result<(usize, DeletedFiles)> {
        self.in_tx(|conn| {
            let mut stmt = conn.prepare_cached(DELETE_OLDEST)?;
            let deleted = deleted_files(stmt.query([limit])?);
            deleted
        })
    }

    /// For tests: SQLite's query plan for `sql`, one step per line.
    #[cfg(test)]
    pub fn plan(&self, sql: &str) -> rusqlite::Result<String> {
        let mut stmt = self.conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))?;
        let mut rows = stmt.raw_query();
        let mut steps = Vec::new();
        while let Some(row) = rows.next()? {
            steps.push(row.get::<_, String>(3)?);
        }
        Ok(steps.join("\n"))
    }

    /// For tests: runs arbitrary SQL on the store's own connection.
    #[cfg(test)]
    pub fn execute_batch(&self, sql: &str) -> rusqlite::Result<()> {
        self.conn.execute_batch(sql)
    }
}

/// Counts the rows a `DELETE … RETURNING id, input_file_len,
/// output_file_len` deleted and collects their payload files.
fn deleted_files(mut rows: rusqlite::Rows<'_>) -> rusqlite::Result<(usize, DeletedFiles)> {
    let mut n = 0;
    let mut files = Vec::new();
    while let Some(row) = rows.next()? {
        n += 1;
        let id = from_sql_u64(row.get(0)?);
        if row.get_ref(1)? != ValueRef::Null {
            files.push((id, Kind::Input));
        }
        if row.get_ref(2)? != ValueRef::Null {
            files.push((id, Kind::Output));
        }
    }
    Ok((n, files))
}

/// Checks access ourselves first: SQLite would only say "unable to open
/// database file", where the user needs to hear "Permission denied".
fn check_access(dir: &PrivateDir, path: &Path) -> Result<(), StoreError> {
    use nix::unistd::{access, AccessFlags};
    access(path, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|errno| StoreError::Access {
        path: path.to_path_buf(),
        source: io::Error::from(errno),
    })?;
    // The database exists (0600) before SQLite opens it, and files of an
    // older run that any user could read are made owner-only.
    for name in ["jobs.db", "jobs.db-wal", "jobs.db-shm"] {
        let exists = dir
            .stat(name)
            .map_err(|source| StoreError::Access {
                path: path.join(name),
                source,
            })?
            .is_some();
        if exists || name == "jobs.db" {
            let file = dir
                .open_or_create(name)
                .map_err(|source| StoreError::Access {
                    path: path.join(name),
                    source,
                })?;
            nix::sys::stat::fchmod(&file, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .map_err(|errno| StoreError::Access {
                    path: path.join(name),
                    source: io::Error::from(errno),
                })?;
        }
    }
    Ok(())
}

/// Takes an exclusive `flock` on `name` in `dir` (created 0600 if needed;
/// `path` names it in errors); `in_use` is the error when another process
/// holds it. (`jobs.lock` in the state directory, released by the kernel
/// when the process dies, refuses a second daemon on the same store.)
pub(super) fn lock_file(
    dir: &PrivateDir,
    name: &str,
    path: &Path,
    in_use: impl FnOnce() -> StoreError,
) -> Result<Flock<File>, StoreError> {
    let file = dir
        .open_or_create(name)
        .map_err(|source| StoreError::Access {
            path: path.to_path_buf(),
            source,
        })?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == Errno::EWOULDBLOCK {
            in_use()
        } else {
            StoreError::Access {
                path: path.to_path_buf(),
                source: io::Error::from(errno),
            }
        }
    })
}

fn sqlite_error(path: &Path, what: &'static str, e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => StoreError::NotAStore {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        _ => StoreError::Sqlite {
            path: path.to_path_buf(),
            what,
            source: e,
        },
    }
}

/// The OS's text for an error, without Rust's " (os error N)" suffix.
pub(super) fn os_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => Errno::from_raw(code).desc().to_string(),
        None => e.to_string(),
    }
}

/// What to do about an [`StoreError::Access`].
pub(super) fn access_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => {
            "make state_dir writable by this user or set daemon.state_dir"
        }
        Some(libc::ENOSPC | libc::EDQUOT) => "free some disk space or set daemon.state_dir",
        _ => "check state_dir or set daemon.state_dir",
    }
}

/// Milliseconds since the Unix epoch.
pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Stable on-disk codes of [`JobState`]; terminal states are `>= 2`.
pub(super) fn state_code(state: JobState) -> i64 {
    match state {
        JobState::Queued => 0,
        JobState::Running => 1,
        JobState::Succeeded => 2,
        JobState::Failed => 3,
        JobState::Cancelled => 4,
        JobState::TimedOut => 5,
        JobState::Dead => 6,
    }
}

fn state_from_code(code: i64) -> Option<JobState> {
    Some(match code {
        0 => JobState::Queued,
        1 => JobState::Running,
        2 => JobState::Succeeded,
        3 => JobState::Failed,
        4 => JobState::Cancelled,
        5 => JobState::TimedOut,
        6 => JobState::Dead,
        _ => return None,
    })
}

/// `finished_ms` is kept for terminal states only, so that "has a
/// `finished_ms`" (the partial index) means "is finished".
fn finished_ms(state: JobState, finished: Option<u64>, now_ms: u64) -> Option<i64> {
    state
        .is_terminal()
        .then(|| to_sql_u64(finished.unwrap_or(now_ms)))
}

/// SQLite integers are `i64`; ids and times never come near the limit, and
/// clamping beats failing a whole batch over one absurd timeout.
pub(super) fn to_sql_u64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn from_sql_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn text(bytes: &[u8]) -> ToSqlOutput<'_> {
    ToSqlOutput::Borrowed(ValueRef::Text(bytes))
}

fn parse_attempts(value: ValueRef<'_>) -> Result<Vec<Attempt>, String> {
    match value {
        ValueRef::Text(t) | ValueRef::Blob(t) => {
            serde_json::from_slice(t).map_err(|e| format!("unreadable attempts ({e})"))
        }
        ValueRef::Null => Ok(Vec::new()),
        _ => Err("attempts of the wrong type".to_string()),
    }
}

/// A [`JobDoc`] from a row of the `select_doc!` columns (plus `output` as
/// column 9 when `with_output`).
fn doc_from_row(row: &Row<'_>, with_output: bool) -> Result<JobDoc, String> {
    let get = |e: rusqlite::Error| format!("unreadable job row ({e})");
    let id = from_sql_u64(row.get(0).map_err(get)?);
    let code: i64 = row.get(2).map_err(get)?;
    let state = state_from_code(code).ok_or_else(|| format!("job {id}: unknown state {code}"))?;
    let attempts =
        parse_attempts(row.get_ref(8).map_err(get)?).map_err(|e| format!("job {id}: {e}"))?;
    let output = if with_output {
        row.get::<_, Option<Vec<u8>>>(9).map_err(get)?.map(Bytes)
    } else {
        None
    };
    Ok(JobDoc {
        id,
        pool: row.get(1).map_err(get)?,
        state,
        priority: row.get(3).map_err(get)?,
        key: row.get(4).map_err(get)?,
        created_ms: from_sql_u64(row.get(5).map_err(get)?),
        finished_ms: row.get::<_, Option<i64>>(6).map_err(get)?.map(from_sql_u64),
        attempts,
        output,
        error: row.get(7).map_err(get)?,
    })
}
