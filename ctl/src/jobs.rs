//! Job commands with one request each: `submit`, `wait`, `result`,
//! `cancel`, `jobs`.

use super::args::{job_options, parse_state, SubmitArgs};
use super::render::{
    failure_text, job_json, jobs_table, pool_failed_line, state_and_error, state_exit_code,
};
use super::{warn, Ctx, Failure, Out};
use ipc_proto::control::{
    ErrorKind, JobDoc, JobState, PayloadMode, Request, Response, SubmitPayload, FD_PAYLOAD_MIN,
};
use ipc_proto::Bytes;
use serde_json::json;
use std::io::{Read, Write};
use std::time::{SystemTime, UNIX_EPOCH};

/// Room left in a frame for everything of a `Submit` but the input: enum
/// tags, varint lengths and the options take a few dozen bytes; the pool
/// name and key are counted separately.
const SUBMIT_HEADROOM: usize = 1024;

/// The largest input a submit to `pool` with `key` can carry in one frame.
pub fn max_input_len(pool: &str, key: Option<&str>) -> usize {
    ipc_proto::control::MAX_REQUEST_LEN - SUBMIT_HEADROOM - pool.len() - key.map_or(0, str::len)
}

/// The error for an input over [`max_input_len`] (exit 2); `len` when
/// known (stdin is read only one byte past the limit).
pub fn too_large(what: &str, len: Option<u64>, max: usize) -> Failure {
    let size = match len {
        Some(n) => format!("is {n} bytes, over"),
        None => "exceeds".to_owned(),
    };
    Failure::usage(format!(
        "{what} {size} the limit of {max} bytes a job's input may have; \
         pass a path to the data instead of the data"
    ))
}

/// A stream (stdin, a pipe) is read into memory for at most this many
/// bytes (a memfd: RAM).
const MAX_STREAM_INPUT: u64 = 4 << 30;

/// `submit`'s input, as it will travel.
enum Input {
    /// In the `Submit` frame.
    Inline(Vec<u8>),
    /// As a file descriptor next to a `SubmitFd` frame: the user's file
    /// itself, or a sealed memfd; never copied through the socket.
    Fd(std::fs::File, u64),
}

/// Reads `submit`'s input: `--input`, `--input-file`, `-` (stdin) or none.
/// Inputs of [`FD_PAYLOAD_MIN`] bytes or more are passed as descriptors.
fn read_input(a: &SubmitArgs, max_inline: usize) -> Result<Input, Failure> {
    if let Some(s) = &a.stdin {
        if s != "-" {
            return Err(Failure::usage(format!(
                "submit: unexpected argument '{s}'; pass '-' to read the input from stdin, \
                 --input-file {s} to read it from a file"
            )));
        }
        return read_stream(std::io::stdin().lock(), "the input on stdin", |e| {
            Failure::usage(format!("submit: cannot read stdin: {e}"))
        });
    }
    if let Some(p) = &a.input_file {
        let cannot =
            |e: std::io::Error| Failure::usage(format!("submit: cannot read {}: {e}", p.display()));
        let f = std::fs::File::open(p).map_err(cannot)?;
        let meta = f.metadata().map_err(cannot)?;
        if meta.is_file() && meta.len() >= FD_PAYLOAD_MIN {
            // The daemon reads the file itself, from the descriptor.
            return Ok(Input::Fd(f, meta.len()));
        }
        // Small, or a pipe, a FIFO, a character device: read like stdin.
        return read_stream(f, &p.display().to_string(), cannot);
    }
    let buf = a.input.clone().unwrap_or_default().into_bytes();
    if buf.len() as u64 >= FD_PAYLOAD_MIN {
        // Too big for a request: it goes as a sealed memfd, like stdin.
        return read_stream(&buf[..], "--input", |e| {
            Failure::usage(format!("submit: --input: {e}"))
        });
    }
    if buf.len() > max_inline {
        return Err(too_large(
            "submit: --input",
            Some(buf.len() as u64),
            max_inline,
        ));
    }
    Ok(Input::Inline(buf))
}

/// Reads a stream: small, into memory for an inline `Submit`; from
/// [`FD_PAYLOAD_MIN`] bytes on, on into a sealed memfd passed as a
/// descriptor (the kernel moving the rest), up to [`MAX_STREAM_INPUT`].
fn read_stream(
    mut src: impl Read,
    what: &str,
    cannot: impl Fn(std::io::Error) -> Failure,
) -> Result<Input, Failure> {
    let mut buf = Vec::new();
    (&mut src)
        .take(FD_PAYLOAD_MIN)
        .read_to_end(&mut buf)
        .map_err(&cannot)?;
    if (buf.len() as u64) < FD_PAYLOAD_MIN {
        return Ok(Input::Inline(buf));
    }
    let fd = nix::sys::memfd::memfd_create(
        c"jobvisor-input",
        nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(|e| Failure::usage(format!("submit: cannot create a memfd for {what}: {e}")))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(&buf).map_err(&cannot)?;
    drop(buf);
    std::io::copy(&mut src.take(MAX_STREAM_INPUT + 1), &mut file).map_err(&cannot)?;
    let len = file.metadata().map_err(&cannot)?.len();
    if len > MAX_STREAM_INPUT {
        return Err(too_large(
            &format!("submit: {what}"),
            None,
            MAX_STREAM_INPUT as usize,
        ));
    }
    crate::fdpass::seal(&file).map_err(&cannot)?;
    Ok(Input::Fd(file, len))
}

/// `submit POOL …`: prints the id, or with `--wait` the result.
pub fn submit(ctx: &Ctx, a: SubmitArgs) -> Result<u8, Failure> {
    let options = job_options(&a.opts, a.key.clone())?;
    let input = read_input(&a, max_input_len(&a.pool, a.key.as_deref()))?;
    let mut conn = ctx.connect("submit")?;
    let payloads = a.payloads.as_deref().map(|m| match m {
        "memory" => PayloadMode::Memory,
        _ => PayloadMode::Durable,
    });
    let sent = match (input, payloads) {
        (Input::Inline(input), None) => conn.send(&Request::Submit {
            pool: a.pool,
            input: Bytes(input),
            options,
            wait: a.wait,
        }),
        (Input::Fd(file, len), None) => conn.send_with_fd(
            &Request::SubmitFd {
                pool: a.pool,
                len,
                options,
                wait: a.wait,
            },
            &file,
        ),
        (Input::Inline(input), Some(mode)) => conn.send(&Request::SubmitWith {
            pool: a.pool,
            input: SubmitPayload::Inline(Bytes(input)),
            options,
            wait: a.wait,
            payloads: Some(mode),
            output_buffer: false,
        }),
        (Input::Fd(file, len), Some(mode)) => conn.send_with_fd(
            &Request::SubmitWith {
                pool: a.pool,
                input: SubmitPayload::Fd { len },
                options,
                wait: a.wait,
                payloads: Some(mode),
                output_buffer: false,
            },
            &file,
        ),
    };
    sent.map_err(|e| Failure::client("submit", e))?;
    let id = match conn.recv().map_err(|e| Failure::client("submit", e))? {
        Response::Submitted { id } => id,
        Response::Error { kind, message } => return Err(Failure::daemon("submit", kind, &message)),
        other => return Err(Failure::unexpected("submit", &other)),
    };
    let mut out = Out::new();
    if !a.wait {
        if ctx.json {
            out.line(&json!({ "id": id }).to_string())?;
        } else {
            out.line(&id.to_string())?;
        }
        out.flush()?;
        return Ok(0);
    }
    let lost = |e| {
        let mut f = Failure::client("submit", e);
        if let Some(m) = &mut f.msg {
            m.push_str(&format!(
                "; job {id} was accepted: see 'jobvisorctl result {id}' later"
            ));
        }
        f
    };
    let answer = conn.recv_with_fd().map_err(lost)?;
    if let (Response::PoolFailed { pool, error }, _) = &answer {
        return Err(Failure::new(
            ErrorKind::Rejected.exit_code(),
            format!("{} (job {id} stays queued)", pool_failed_line(pool, error)),
        ));
    }
    finished_answer(ctx, "submit", answer, &mut out)
}

/// Prints the answer to `submit --wait` or `result`: a finished job, or
/// the daemon's error. A large output (a [`Response::JobFd`]) is streamed
/// from its descriptor to stdout without being loaded.
fn finished_answer(
    ctx: &Ctx,
    what: &str,
    answer: (Response, Option<std::os::fd::OwnedFd>),
    out: &mut Out,
) -> Result<u8, Failure> {
    match answer {
        (Response::Job(doc), _) => finished_job(ctx, &doc, out),
        (Response::JobFd { doc, output_len }, Some(fd))
            if !ctx.json && doc.state == JobState::Succeeded =>
        {
            let file = std::fs::File::from(fd);
            let last = last_byte(&file, output_len);
            out.copy_from(file, output_len)?;
            end_line_on_a_terminal(out, last)?;
            out.flush()?;
            Ok(0)
        }
        // A failed job's output (a `Raised` worker's detail) is for
        // programs: without --json only its error is shown, unread.
        (Response::JobFd { doc, .. }, _) if !ctx.json => finished_job(ctx, &doc, out),
        (Response::JobFd { doc, output_len }, Some(fd)) => {
            let doc = crate::client::job_with_output(doc, fd, output_len)
                .map_err(|e| Failure::new(1, format!("{what}: {e}")))?;
            finished_job(ctx, &doc, out)
        }
        (Response::Error { kind, message }, _) => Err(Failure::daemon(what, kind, &message)),
        (other, _) => Err(Failure::unexpected(what, &other)),
    }
}

/// Prints a finished job as `submit --wait` and `result` do: the raw output
/// (or the document with `--json`); a job that did not succeed exits 1 with
/// its error on stderr (one line, then a multi-line error's lines), never
/// its output.
fn finished_job(ctx: &Ctx, doc: &JobDoc, out: &mut Out) -> Result<u8, Failure> {
    if ctx.json {
        out.line(&job_json(doc, true).to_string())?;
        out.flush()?;
        return Ok(state_exit_code(doc.state));
    }
    if doc.state == JobState::Succeeded {
        if let (None, Some(error)) = (&doc.output, &doc.error) {
            // Succeeded, but its stored output is gone (a payload file
            // removed behind the daemon's back): not an empty output.
            return Err(Failure::new(
                1,
                format!("job {} succeeded but its output is lost: {error}", doc.id),
            ));
        }
        let output = doc.output.as_deref().unwrap_or_default();
        out.bytes(output)?;
        end_line_on_a_terminal(out, output.last().copied())?;
        out.flush()?;
        return Ok(0);
    }
    Err(Failure::new(1, failure_text(doc)))
}

/// On a terminal, an output that does not end its last line gets a newline,
/// so that the shell's prompt does not follow it on the same line. (Piped
/// or redirected, the bytes stay exactly the job's.)
fn end_line_on_a_terminal(out: &mut Out, last: Option<u8>) -> Result<(), Failure> {
    use std::io::IsTerminal;
    if last.is_some_and(|b| b != b'\n') && std::io::stdout().is_terminal() {
        out.bytes(b"\n")?;
    }
    Ok(())
}

/// The last byte of the first `len` bytes of `file` (read at its offset).
fn last_byte(file: &std::fs::File, len: u64) -> Option<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = [0u8];
    let at = len.checked_sub(1)?;
    (file.read_at(&mut b, at).ok()? == 1).then_some(b[0])
}

/// `result ID`.
pub fn result(ctx: &Ctx, id: u64) -> Result<u8, Failure> {
    let mut conn = ctx.connect("result")?;
    conn.send(&Request::Result { id })
        .map_err(|e| Failure::client("result", e))?;
    let answer = conn
        .recv_with_fd()
        .map_err(|e| Failure::client("result", e))?;
    if let (Response::Job(doc) | Response::JobFd { doc, .. }, _) = &answer {
        if !ctx.json && !doc.state.is_terminal() {
            return Err(Failure::new(
                1,
                format!(
                    "job {id} is still {}; use 'jobvisorctl wait {id}'",
                    doc.state.as_str()
                ),
            ));
        }
    }
    finished_answer(ctx, "result", answer, &mut Out::new())
}

/// `cancel ID…` or `cancel --pool P [--state S]`. One id: the daemon's
/// answer, or its error as the failure. Several: a line per job, each
/// error on stderr, and the exit code of the first error (0 if none).
pub fn cancel(
    ctx: &Ctx,
    ids: Vec<u64>,
    pool: Option<String>,
    state: Option<String>,
) -> Result<u8, Failure> {
    let Some(pool) = pool else {
        return per_id(ctx, "cancel", ids, |id| Request::Cancel { id });
    };
    let mut conn = ctx.connect("cancel")?;
    let mut out = Out::new();
    let states = match state.as_deref() {
        None => vec![JobState::Queued, JobState::Running],
        Some(s) => match parse_state(s).map_err(|e| Failure::usage(format!("cancel: {e}")))? {
            st @ (JobState::Queued | JobState::Running) => vec![st],
            _ => {
                return Err(Failure::usage(format!(
                    "cancel: --state {s}: only queued or running jobs can be cancelled"
                )))
            }
        },
    };
    let mut cancelled = Vec::new();
    let mut code = 0;
    for st in states {
        // A listing is capped: list again while a full one made progress.
        loop {
            let ids = list_ids(&mut conn, &pool, st)?;
            let full = ids.len() as u32 >= CANCEL_LIST_LIMIT;
            let before = cancelled.len();
            for id in ids {
                match conn
                    .call(&Request::Cancel { id })
                    .map_err(|e| Failure::client("cancel", e))?
                {
                    Response::Error { kind, message } => {
                        // Ended meanwhile (`Failed`: "already succeeded") or
                        // pruned (`NotFound`): nothing left to cancel, not an
                        // error of this command.
                        use ipc_proto::control::ErrorKind::{Failed, NotFound};
                        if !matches!(kind, Failed | NotFound) {
                            warn(&format!("cancel: job {id}: {message}"));
                            if code == 0 {
                                code = Failure::daemon("cancel", kind, &message).code;
                            }
                        }
                    }
                    _ => cancelled.push(id),
                }
            }
            if !full || cancelled.len() == before {
                break;
            }
        }
    }
    if ctx.json {
        out.line(&json!({ "pool": pool, "cancelled": cancelled }).to_string())?;
    } else {
        out.line(&format!(
            "cancelled {} jobs of pool {pool}",
            cancelled.len()
        ))?;
    }
    out.flush()?;
    Ok(code)
}

/// Most jobs one `cancel --pool` listing asks for.
const CANCEL_LIST_LIMIT: u32 = 100_000;

/// The ids of `pool`'s jobs in state `st` (the daemon says if there is no
/// such pool).
fn list_ids(
    conn: &mut crate::client::Connection,
    pool: &str,
    st: JobState,
) -> Result<Vec<u64>, Failure> {
    conn.send(&Request::Jobs {
        pool: Some(pool.to_owned()),
        state: Some(st),
        limit: Some(CANCEL_LIST_LIMIT),
        before: None,
        since_ms: None,
    })
    .map_err(|e| Failure::client("cancel", e))?;
    let mut ids = Vec::new();
    loop {
        match conn.recv().map_err(|e| Failure::client("cancel", e))? {
            Response::Job(doc) => ids.push(doc.id),
            Response::End => return Ok(ids),
            Response::Error { kind, message } => {
                return Err(Failure::daemon("cancel", kind, &message))
            }
            other => return Err(Failure::unexpected("cancel", &other)),
        }
    }
}

/// `what` (`cancel`, `retry`) for each id, one request each on one
/// connection: each answer printed, each error on its own line; the exit
/// code is the first error's (a single id: its error is the failure).
pub fn per_id(
    ctx: &Ctx,
    what: &str,
    ids: Vec<u64>,
    req: impl Fn(u64) -> Request,
) -> Result<u8, Failure> {
    let mut conn = ctx.connect(what)?;
    let mut out = Out::new();
    if let [id] = ids[..] {
        one_job_request(ctx, &mut conn, &mut out, what, &req(id))?;
        out.flush()?;
        return Ok(0);
    }
    let mut code = 0;
    for id in ids {
        if let Err(f) = one_job_request(ctx, &mut conn, &mut out, what, &req(id)) {
            if let Some(msg) = &f.msg {
                warn(msg);
            }
            if code == 0 {
                code = f.code;
            }
        }
    }
    out.flush()?;
    Ok(code)
}

/// One request about one job: its answer printed, or its error as the
/// failure.
fn one_job_request(
    ctx: &Ctx,
    conn: &mut crate::client::Connection,
    out: &mut Out,
    what: &str,
    req: &Request,
) -> Result<(), Failure> {
    match conn.call(req).map_err(|e| Failure::client(what, e))? {
        Response::Ok { message } => {
            if ctx.json {
                out.line(&json!({ "ok": true, "message": message }).to_string())?;
            } else {
                out.line(&message)?;
            }
        }
        // A daemon may answer with the job as it now is.
        Response::Job(doc) => {
            if ctx.json {
                out.line(&job_json(&doc, false).to_string())?;
            } else {
                out.line(&format!("job {} {}", doc.id, doc.state.as_str()))?;
            }
        }
        Response::Error { kind, message } => return Err(Failure::daemon(what, kind, &message)),
        other => return Err(Failure::unexpected(what, &other)),
    }
    Ok(())
}

/// What `wait` exits with: 0 only if every job succeeded; 4 if an id was
/// unknown; another refusal's code; else 1 if a job did not succeed.
#[derive(Debug, Default)]
pub struct WaitTally {
    not_found: bool,
    other_error: Option<u8>,
    not_succeeded: bool,
}

impl WaitTally {
    /// Counts a finished job.
    pub fn job(&mut self, state: JobState) {
        if state != JobState::Succeeded {
            self.not_succeeded = true;
        }
    }

    /// Counts a refusal (for one id, or the whole request).
    pub fn error(&mut self, kind: ErrorKind) {
        if kind == ErrorKind::NotFound {
            self.not_found = true;
        } else {
            self.other_error.get_or_insert(kind.exit_code());
        }
    }

    /// The exit code.
    pub fn code(&self) -> u8 {
        if self.not_found {
            4
        } else if let Some(c) = self.other_error {
            c
        } else if self.not_succeeded {
            1
        } else {
            0
        }
    }
}

/// `wait ID…`: one line per job as it finishes.
pub fn wait(ctx: &Ctx, ids: Vec<u64>) -> Result<u8, Failure> {
    let mut conn = ctx.connect("wait")?;
    conn.send(&Request::Wait { ids })
        .map_err(|e| Failure::client("wait", e))?;
    let mut out = Out::new();
    let mut tally = WaitTally::default();
    loop {
        match conn.recv().map_err(|e| Failure::client("wait", e))? {
            Response::Job(doc) => {
                tally.job(doc.state);
                if ctx.json {
                    out.line(&job_json(&doc, false).to_string())?;
                } else {
                    out.line(&format!("{} {}", doc.id, state_and_error(&doc)))?;
                }
                out.flush()?;
            }
            Response::Error { kind, message } => {
                tally.error(kind);
                warn(&format!("wait: {message}"));
            }
            Response::End => break,
            // Its jobs cannot run for now: say so rather than hang.
            Response::PoolFailed { pool, error } => {
                return Err(Failure::new(
                    ErrorKind::Rejected.exit_code(),
                    pool_failed_line(&pool, &error),
                ))
            }
            other => return Err(Failure::unexpected("wait", &other)),
        }
    }
    Ok(tally.code())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `jobs [--pool P] [--state S] [--since WHEN] [--before ID] [--limit N]`.
pub fn list(ctx: &Ctx, a: crate::args::JobsArgs) -> Result<u8, Failure> {
    let crate::args::JobsArgs {
        pool,
        state,
        limit,
        since,
        before,
    } = a;
    let state = match state {
        Some(s) => Some(parse_state(&s).map_err(|e| Failure::usage(format!("jobs: {e}")))?),
        None => None,
    };
    let since_ms = since
        .map(|s| crate::args::parse_since("--since", &s))
        .transpose()
        .map_err(|e| Failure::usage(format!("jobs: {e}")))?;
    let mut conn = ctx.connect("jobs")?;
    conn.send(&Request::Jobs {
        pool: pool.clone(),
        state,
        limit: Some(limit),
        before,
        since_ms,
    })
    .map_err(|e| Failure::client("jobs", e))?;
    let mut out = Out::new();
    let mut docs = Vec::new();
    loop {
        match conn.recv().map_err(|e| Failure::client("jobs", e))? {
            Response::Job(doc) => docs.push(doc),
            Response::End => break,
            Response::Error { kind, message } => {
                return Err(Failure::daemon("jobs", kind, &message))
            }
            other => return Err(Failure::unexpected("jobs", &other)),
        }
    }
    if ctx.json {
        // A listing is one JSON document (an array), so that it can be
        // piped to a JSON tool; streams (`events`, `map`) are a line each.
        let all: Vec<serde_json::Value> = docs.iter().map(|d| job_json(d, false)).collect();
        out.line(&serde_json::Value::Array(all).to_string())?;
    } else if docs.is_empty() {
        out.line("no jobs")?;
    } else {
        out.bytes(jobs_table(&docs, now_ms(), crate::style::Style::stdout()).as_bytes())?;
    }
    out.flush()?;
    if docs.len() as u64 >= u64::from(limit) && !ctx.json {
        // Not a silent cap: say how to get the next page.
        let last = docs.last().map_or(0, |d| d.id);
        let mut next = format!("jobvisorctl jobs --before {last}");
        if let Some(p) = &pool {
            next.push_str(&format!(" --pool {p}"));
        }
        if let Some(s) = state {
            next.push_str(&format!(" --state {}", s.as_str()));
        }
        if limit != crate::args::DEFAULT_JOBS_LIMIT {
            next.push_str(&format!(" --limit {limit}"));
        }
        if since_ms.is_some() {
            next.push_str(" --since …");
        }
        warn(&format!(
            "jobs: showing {} jobs, there may be more; next page: {next}",
            docs.len()
        ));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_exit_codes() {
        let mut t = WaitTally::default();
        assert_eq!(t.code(), 0);
        t.job(JobState::Succeeded);
        assert_eq!(t.code(), 0);
        t.job(JobState::Failed);
        assert_eq!(t.code(), 1);
        t.error(ErrorKind::NotFound);
        assert_eq!(t.code(), 4);
        let mut t = WaitTally::default();
        t.error(ErrorKind::Rejected);
        t.job(JobState::Cancelled);
        assert_eq!(t.code(), 5);
        t.error(ErrorKind::NotFound);
        assert_eq!(t.code(), 4);
    }

    #[test]
    fn the_largest_input_fits_in_a_frame() {
        let pool = "p".repeat(100);
        let key = "k".repeat(300);
        let max = max_input_len(&pool, Some(&key));
        let req = Request::Submit {
            pool,
            input: Bytes(vec![7; max]),
            options: ipc_proto::control::JobOptions {
                timeout_ms: Some(u64::MAX),
                max_attempts: Some(u32::MAX),
                priority: i32::MIN,
                key: Some(key),
            },
            wait: true,
        };
        let len = ipc_proto::codec::encoded_len(&req).unwrap();
        assert!(len <= ipc_proto::MAX_FRAME_LEN, "{len}");
    }

    #[test]
    fn too_large_is_a_usage_error() {
        let f = too_large("submit: --input", Some(10), 5);
        assert_eq!(f.code, 2);
        assert!(f
            .msg
            .unwrap()
            .starts_with("submit: --input is 10 bytes, over the limit of 5 bytes"));
        let f = too_large("submit: the input on stdin", None, 5);
        assert!(f
            .msg
            .unwrap()
            .starts_with("submit: the input on stdin exceeds the limit of 5 bytes"));
    }
}
