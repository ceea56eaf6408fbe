//! The batch write path: one transaction per batch, its rows written by
//! multi-row statements.
//!
//! Per row, most of SQLite's cost in a single-row statement is the
//! statement itself (open the cursors, run the program's prologue, halt,
//! reset), not the row: a batch of tiny jobs spent more of the store
//! thread's time there than in the B-tree. So inserts go 64 rows to an
//! `INSERT … VALUES (…), (…)`, and plain final updates 64 to an
//! `UPDATE … FROM (VALUES …)`; what is left over goes 8, then 1, at a time
//! (each size is one prepared statement, kept in the connection's cache).
//! Updates whose outcome the store must know row by row (an output written
//! to a payload file: did a row take it? an input file to drop) stay
//! single-row statements; they are the large-payload jobs, where a
//! statement's cost does not matter.

use super::*;
use std::ops::Range;
use std::sync::LazyLock;

/// Rows per statement, largest first.
const CHUNKS: [usize; 3] = [64, 8, 1];

/// Columns of [`INSERT_JOB`], in its order.
const INSERT_COLUMNS: usize = 18;
/// Values of one row of [`UPDATE_MANY`]: the id, then [`UPDATE_JOB`]'s
/// `?2`..`?7` in its order.
const UPDATE_COLUMNS: usize = 8;

/// `INSERT_JOB` with `n` rows, for each size of [`CHUNKS`].
pub(in crate::store) static INSERT_MANY: LazyLock<[String; 3]> = LazyLock::new(|| {
    CHUNKS.map(|n| {
        let head = INSERT_JOB
            .split_once(" VALUES ")
            .expect("INSERT_JOB has VALUES")
            .0;
        format!("{head} VALUES {}", rows_sql(n, INSERT_COLUMNS))
    })
});

/// [`UPDATE_JOB`] for `n` jobs at once, for each size of [`CHUNKS`]: the
/// planner walks the `VALUES` and finds each row by its rowid (checked by a
/// test of the query plans).
pub(in crate::store) static UPDATE_MANY: LazyLock<[String; 3]> = LazyLock::new(|| {
    CHUNKS.map(|n| {
        format!(
            "UPDATE jobs SET state = v.column2, attempts = v.column3, output = v.column4, \
             error = v.column5, finished_ms = v.column6, output_file_len = v.column7, \
             output_memory_len = v.column8 \
             FROM (VALUES {}) AS v WHERE jobs.id = v.column1",
            rows_sql(n, UPDATE_COLUMNS)
        )
    })
});

/// `(?, …), (?, …)`: `n` rows of `columns` anonymous parameters.
fn rows_sql(n: usize, columns: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(", "));
    vec![row; n].join(", ")
}

/// Splits `rows` into runs of the sizes of [`CHUNKS`], each with the index
/// of its size there.
fn chunks<T>(mut rows: &[T]) -> impl Iterator<Item = (usize, &[T])> {
    std::iter::from_fn(move || {
        let k = CHUNKS.iter().position(|&n| n <= rows.len())?;
        let (chunk, rest) = rows.split_at(CHUNKS[k]);
        rows = rest;
        Some((k, chunk))
    })
}

/// A job to insert, with the last update of the same batch folded in.
#[derive(Debug)]
pub(in crate::store) struct PendingInsert {
    pub job: NewJob,
    pub update: Option<JobUpdate>,
    /// The input is in its payload file (written before the transaction).
    pub input_file: bool,
    /// The output is in its payload file (likewise).
    pub output_file: bool,
}

impl PendingInsert {
    /// The folded update ends the job with success, and its input is large
    /// enough for a payload file: the row stores no input at all and no
    /// file is written (it is never dispatched again, so nothing would
    /// read it; one that ended otherwise keeps its input for a `retry`).
    pub fn input_dropped(&self) -> bool {
        self.update
            .as_ref()
            .is_some_and(|u| u.state == JobState::Succeeded)
            && self.job.input_in_file()
    }
}

/// An update of a job stored before this batch.
#[derive(Debug)]
pub(in crate::store) struct PendingUpdate {
    pub update: JobUpdate,
    /// The output is in its payload file (written before the transaction).
    pub output_file: bool,
}

impl PendingUpdate {
    /// Whether the store needs this update's own outcome (see the module
    /// documentation): then it is a statement of its own.
    fn alone(&self) -> bool {
        self.output_file || (self.update.drop_input_file && self.update.state.is_terminal())
    }
}

/// One row of `jobs` to insert, its attempts in the batch's text buffer.
struct InsertRow<'a> {
    p: &'a PendingInsert,
    state: JobState,
    attempts: Range<usize>,
    error: Option<&'a str>,
    finished: Option<i64>,
    input: Option<&'a [u8]>,
    input_file_len: Option<i64>,
    output: Option<&'a [u8]>,
    output_file_len: Option<i64>,
    /// `payloads = "memory"`: the length of the input kept only in memory.
    input_memory_len: Option<i64>,
    /// Likewise for a large output, handed only to waiting clients.
    output_memory_len: Option<i64>,
}

impl Db {
    /// Applies one batch in one transaction and commits it. On error the
    /// transaction is rolled back: nothing of the batch is stored. The
    /// payload files the rows reference must already be on disk.
    ///
    /// Returns the files the committed rows no longer reference: inputs of
    /// jobs that ended, and outputs written for updates that matched no row
    /// (their insert was lost), for the caller to dispose of.
    pub fn write(
        &mut self,
        inserts: &[PendingInsert],
        updates: &[PendingUpdate],
        now_ms: u64,
    ) -> rusqlite::Result<DeletedFiles> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let result = self
            .write_rows(inserts, updates, now_ms)
            .and_then(|done| self.conn.execute_batch("COMMIT").map(|()| done));
        match result {
            Ok((max_id, unreferenced)) => {
                self.max_id = max_id;
                Ok(unreferenced)
            }
            Err(e) => {
                self.rollback();
                Err(e)
            }
        }
    }

    /// Ends a failed transaction, if SQLite has not already done so.
    pub(super) fn rollback(&self) {
        if !self.conn.is_autocommit() {
            // If even ROLLBACK fails, SQLite rolls back when the next BEGIN
            // finds a hot journal; nothing more to do here.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }

    /// Executes the batch's statements; returns the new id high-water mark
    /// and the files the rows no longer reference (see [`Db::write`]).
    fn write_rows(
        &mut self,
        inserts: &[PendingInsert],
        updates: &[PendingUpdate],
        now_ms: u64,
    ) -> rusqlite::Result<(u64, DeletedFiles)> {
        let Db {
            conn, json, max_id, ..
        } = self;
        json.clear();
        let mut new_max = *max_id;
        let mut unreferenced = DeletedFiles::new();

        let mut rows = Vec::with_capacity(inserts.len());
        for p in inserts {
            rows.push(insert_row(p, json, now_ms)?);
            new_max = new_max.max(p.job.id);
        }
        for (k, chunk) in chunks(&rows) {
            let mut stmt = conn.prepare_cached(&INSERT_MANY[k])?;
            for (i, row) in chunk.iter().enumerate() {
                bind_insert(&mut stmt, i * INSERT_COLUMNS, row, json)?;
            }
            stmt.raw_execute()?;
        }
        // Inputs too large for the row: in `job_inputs`.
        if rows.iter().any(|r| r.input.is_some_and(too_long)) {
            let mut insert_input = conn.prepare_cached(INSERT_INPUT)?;
            for row in rows.iter().filter(|r| r.input.is_some_and(too_long)) {
                insert_input.execute(params![to_sql_u64(row.p.job.id), row.input])?;
            }
        }

        json.clear();
        let mut plain = Vec::with_capacity(updates.len());
        for p in updates.iter().filter(|p| !p.alone()) {
            let start = json.len();
            encode_attempts(json, &p.update.attempts)?;
            plain.push((&p.update, start..json.len()));
        }
        for (k, chunk) in chunks(&plain) {
            let mut stmt = conn.prepare_cached(&UPDATE_MANY[k])?;
            for (i, (u, attempts)) in chunk.iter().enumerate() {
                let at = i * UPDATE_COLUMNS;
                let (output, output_file_len) = output_columns(u, false);
                stmt.raw_bind_parameter(at + 1, to_sql_u64(u.id))?;
                stmt.raw_bind_parameter(at + 2, state_code(u.state))?;
                stmt.raw_bind_parameter(at + 3, text(&json[attempts.clone()]))?;
                stmt.raw_bind_parameter(at + 4, output)?;
                stmt.raw_bind_parameter(at + 5, u.error.as_deref())?;
                stmt.raw_bind_parameter(at + 6, finished_ms(u.state, u.finished_ms, now_ms))?;
                stmt.raw_bind_parameter(at + 7, output_file_len)?;
                stmt.raw_bind_parameter(at + 8, u.output_memory_len.map(to_sql_u64))?;
            }
            stmt.raw_execute()?;
        }
        if updates.iter().any(PendingUpdate::alone) {
            let mut update = conn.prepare_cached(UPDATE_JOB)?;
            let mut drop_input = conn.prepare_cached(DROP_INPUT_FILE)?;
            for p in updates.iter().filter(|p| p.alone()) {
                let u = &p.update;
                json.clear();
                encode_attempts(json, &u.attempts)?;
                let (output, output_file_len) = output_columns(u, p.output_file);
                let changed = update.execute(params![
                    to_sql_u64(u.id),
                    state_code(u.state),
                    text(json),
                    output,
                    u.error,
                    finished_ms(u.state, u.finished_ms, now_ms),
                    output_file_len,
                    u.output_memory_len.map(to_sql_u64),
                ])?;
                if changed == 0 && p.output_file {
                    unreferenced.push((u.id, Kind::Output));
                }
                if changed > 0
                    && u.drop_input_file
                    && u.state.is_terminal()
                    && drop_input.execute([to_sql_u64(u.id)])? > 0
                {
                    unreferenced.push((u.id, Kind::Input));
                }
            }
        }
        if new_max > *max_id {
            conn.prepare_cached(UPDATE_MAX_ID)?
                .execute([to_sql_u64(new_max)])?;
        }
        Ok((new_max, unreferenced))
    }
}

/// An input kept in `job_inputs` rather than in the row.
fn too_long(input: &[u8]) -> bool {
    input.len() > INLINE_INPUT_MAX
}

/// The column values of an insert (its attempts appended to `json`).
fn insert_row<'a>(
    p: &'a PendingInsert,
    json: &mut Vec<u8>,
    now_ms: u64,
) -> rusqlite::Result<InsertRow<'a>> {
    let job = &p.job;
    let start = json.len();
    let (state, error, finished) = match &p.update {
        Some(u) => {
            encode_attempts(json, &u.attempts)?;
            (
                u.state,
                u.error.as_deref(),
                finished_ms(u.state, u.finished_ms, now_ms),
            )
        }
        None => {
            json.extend_from_slice(b"[]");
            (JobState::Queued, None, None)
        }
    };
    let (output, output_file_len) = match &p.update {
        Some(u) => output_columns(u, p.output_file),
        None => (None, None),
    };
    let dropped = p.input_dropped();
    // An input from a client's file goes to its payload file unless the
    // id's row already references payload files (`plan_files` does not
    // replace them): then this insert fails on the id anyway. Fail it here,
    // without reading the client's file into memory for a row never stored.
    if job.input_source.is_some() && !p.input_file && !dropped && !job.memory {
        return Err(rusqlite::Error::ToSqlConversionFailure(
            format!(
                "job {}: input file not copied to a payload file (id already stored?)",
                job.id
            )
            .into(),
        ));
    }
    let (input, input_file_len) = match &job.input_source {
        // Inserted already ended: its large input is not kept.
        _ if dropped => (None, None),
        // Kept by the daemon only.
        _ if job.memory => (None, None),
        Some(src) => (None, Some(to_sql_u64(src.len))),
        None => in_file(Some(&job.input[..]), p.input_file),
    };
    Ok(InsertRow {
        p,
        state,
        attempts: start..json.len(),
        error,
        finished,
        input,
        input_file_len,
        output,
        output_file_len,
        input_memory_len: job.memory.then(|| to_sql_u64(job.input_len())),
        output_memory_len: p
            .update
            .as_ref()
            .and_then(|u| u.output_memory_len)
            .map(to_sql_u64),
    })
}

/// Binds `row` to the parameters after `at`, in [`INSERT_JOB`]'s order.
fn bind_insert(
    stmt: &mut rusqlite::CachedStatement<'_>,
    at: usize,
    row: &InsertRow<'_>,
    json: &[u8],
) -> rusqlite::Result<()> {
    let job = &row.p.job;
    stmt.raw_bind_parameter(at + 1, to_sql_u64(job.id))?;
    stmt.raw_bind_parameter(at + 2, job.pool.as_str())?;
    stmt.raw_bind_parameter(at + 3, state_code(row.state))?;
    stmt.raw_bind_parameter(at + 4, job.priority)?;
    stmt.raw_bind_parameter(at + 5, job.key.as_deref())?;
    stmt.raw_bind_parameter(at + 6, job.max_attempts)?;
    stmt.raw_bind_parameter(at + 7, job.timeout_ms.map(to_sql_u64))?;
    stmt.raw_bind_parameter(at + 8, to_sql_u64(job.created_ms))?;
    stmt.raw_bind_parameter(at + 9, row.finished)?;
    stmt.raw_bind_parameter(at + 10, row.error)?;
    stmt.raw_bind_parameter(at + 11, text(&json[row.attempts.clone()]))?;
    stmt.raw_bind_parameter(at + 12, row.input_file_len)?;
    stmt.raw_bind_parameter(at + 13, row.output_file_len)?;
    stmt.raw_bind_parameter(at + 14, row.output)?;
    stmt.raw_bind_parameter(at + 15, row.input.filter(|i| !too_long(i)))?;
    stmt.raw_bind_parameter(at + 16, job.owner)?;
    stmt.raw_bind_parameter(at + 17, row.input_memory_len)?;
    stmt.raw_bind_parameter(at + 18, row.output_memory_len)?;
    Ok(())
}

/// A payload's column values: the bytes for the database, or (if it is in
/// its file) the length to record instead.
pub(super) fn in_file(payload: Option<&[u8]>, file: bool) -> (Option<&[u8]>, Option<i64>) {
    match payload {
        Some(p) if file => (None, Some(to_sql_u64(p.len() as u64))),
        p => (p, None),
    }
}

/// An update's `(output, output_file_len)` columns: the length of the
/// payload file the daemon wrote itself ([`JobUpdate::output_file_len`]),
/// else as [`in_file`] (`file`: the store wrote the output to its file).
fn output_columns(update: &JobUpdate, file: bool) -> (Option<&[u8]>, Option<i64>) {
    match update.output_file_len {
        Some(len) => (None, Some(to_sql_u64(len))),
        None => in_file(update.output.as_deref(), file),
    }
}

/// Appends `attempts` as JSON to `buf`.
fn encode_attempts(buf: &mut Vec<u8>, attempts: &[Attempt]) -> rusqlite::Result<()> {
    serde_json::to_writer(&mut *buf, attempts)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_use_the_largest_statements_first() {
        let rows: Vec<u32> = (0..64 + 64 + 8 + 8 + 3).collect();
        let sizes: Vec<(usize, usize)> = chunks(&rows).map(|(k, c)| (k, c.len())).collect();
        assert_eq!(
            sizes,
            [(0, 64), (0, 64), (1, 8), (1, 8), (2, 1), (2, 1), (2, 1)]
        );
        let joined: Vec<u32> = chunks(&rows).flat_map(|(_, c)| c.iter().copied()).collect();
        assert_eq!(joined, rows);
        assert_eq!(chunks::<u32>(&[]).count(), 0);
    }

    #[test]
    fn statements_have_one_parameter_per_column_and_row() {
        for (k, n) in CHUNKS.iter().enumerate() {
            assert_eq!(INSERT_MANY[k].matches('?').count(), n * INSERT_COLUMNS);
            assert_eq!(UPDATE_MANY[k].matches('?').count(), n * UPDATE_COLUMNS);
        }
        assert_eq!(INSERT_JOB.matches('?').count(), INSERT_COLUMNS);
        assert_eq!(UPDATE_JOB.matches('?').count(), UPDATE_COLUMNS);
    }
}
