//! How answers look: the JSON documents of the CLI contract and the
//! human one-liners and tables. Pure functions, no I/O.

use base64::Engine as _;
use ipc_proto::control::{Attempt, Event, JobDoc, JobState};
use serde_json::{json, Value};
use std::time::{Duration, UNIX_EPOCH};

/// A job's output as the pair (`output`, `output_b64`): valid UTF-8 goes in
/// `output`, anything else in `output_b64` (standard base64); no output at
/// all leaves both null.
pub fn output_fields(output: Option<&[u8]>) -> (Value, Value) {
    match output {
        None => (Value::Null, Value::Null),
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) => (Value::String(s.to_owned()), Value::Null),
            Err(_) => (
                Value::Null,
                Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
            ),
        },
    }
}

fn attempt_json(a: &Attempt) -> Value {
    json!({
        "n": a.n,
        "worker": a.worker,
        "pid": a.pid,
        "started_ms": a.started_ms,
        "ended_ms": a.ended_ms,
        "outcome": a.outcome.map(|o| o.as_str()),
        "error": a.error,
    })
}

/// The job document; `with_output` false leaves out `output`/`output_b64`
/// (as `jobs` and `wait` print it).
pub fn job_json(doc: &JobDoc, with_output: bool) -> Value {
    let mut v = json!({
        "id": doc.id,
        "pool": doc.pool,
        "state": doc.state.as_str(),
        "priority": doc.priority,
        "key": doc.key,
        "created_ms": doc.created_ms,
        "finished_ms": doc.finished_ms,
        "attempts": doc.attempts.iter().map(attempt_json).collect::<Vec<_>>(),
    });
    let m = v.as_object_mut().expect("a JSON object");
    if with_output {
        let (out, b64) = output_fields(doc.output.as_deref());
        m.insert("output".into(), out);
        m.insert("output_b64".into(), b64);
    }
    m.insert("error".into(), json!(doc.error));
    v
}

/// One `map --json` line: the job's place in the input and its result.
pub fn map_json(index: u64, doc: &JobDoc) -> Value {
    let (out, b64) = output_fields(doc.output.as_deref());
    json!({
        "id": doc.id,
        "index": index,
        "state": doc.state.as_str(),
        "output": out,
        "output_b64": b64,
        "error": doc.error,
    })
}

/// `<state>: <error>`, or just `<state>` when there is no error text; a
/// multi-line error (a traceback) by its last line (see [`error_summary`]).
pub fn state_and_error(doc: &JobDoc) -> String {
    match &doc.error {
        Some(e) => format!(
            "{}: {}",
            doc.state.as_str(),
            one_line(error_summary(e), usize::MAX)
        ),
        None => doc.state.as_str().to_owned(),
    }
}

/// The line of an error text that says what happened: its last non-empty
/// line (a Python traceback ends with `ValueError: boom`, after the
/// "Traceback (most recent call last):" and the stack).
pub fn error_summary(error: &str) -> &str {
    error
        .lines()
        .map(str::trim_end)
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("")
}

/// A failed job as `submit --wait` and `result` print it on stderr: one
/// line `job ID STATE: <last line>`, then, for a multi-line error, every
/// line of it indented (without trailing blank lines).
pub fn failure_text(doc: &JobDoc) -> String {
    let mut s = format!("job {} {}", doc.id, state_and_error(doc));
    if let Some(e) = doc.error.as_deref().filter(|e| e.trim_end().contains('\n')) {
        for line in e.trim_end().lines() {
            s.push_str("\n  ");
            s.push_str(line.trim_end());
        }
    }
    s
}

/// The one line `submit --wait`, `wait` and `map` print when the pool of a
/// job they wait for has failed (a crash loop): its first and last lines
/// when the error spans several (a worker's traceback).
pub fn pool_failed_line(pool: &str, error: &str) -> String {
    let first = error.lines().map(str::trim).find(|l| !l.is_empty());
    let last = error_summary(error).trim();
    let why = match first {
        Some(first) if first != last => format!("{first} … {last}"),
        _ => last.to_owned(),
    };
    format!(
        "pool {pool} failed: {}; fix its command, then `jobvisorctl reload`",
        one_line(&why, usize::MAX)
    )
}

/// Exit code for a job's final state: 0 only for success.
pub fn state_exit_code(state: JobState) -> u8 {
    if state == JobState::Succeeded {
        0
    } else {
        1
    }
}

/// `ms` since the Unix epoch as RFC 3339 UTC with milliseconds.
pub fn format_ts(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// One event as a JSON object (absent fields are null).
pub fn event_json(e: &Event) -> Value {
    json!({
        "ts_ms": e.ts_ms,
        "event": e.event,
        "pool": e.pool,
        "worker": e.worker,
        "pid": e.pid,
        "job": e.job,
        "state": e.state.map(|s| s.as_str()),
        "detail": e.detail,
    })
}

/// One event as a human line:
/// `2026-11-25T12:00:00.123Z job_finished pool=echo worker=1 pid=123 job=42 state=succeeded detail`.
pub fn event_line(e: &Event) -> String {
    use std::fmt::Write as _;
    let mut s = format!("{} {}", format_ts(e.ts_ms), e.event);
    if let Some(p) = &e.pool {
        let _ = write!(s, " pool={p}");
    }
    if let Some(w) = e.worker {
        let _ = write!(s, " worker={w}");
    }
    if let Some(p) = e.pid {
        let _ = write!(s, " pid={p}");
    }
    if let Some(j) = e.job {
        let _ = write!(s, " job={j}");
    }
    if let Some(st) = e.state {
        let _ = write!(s, " state={}", st.as_str());
    }
    if let Some(d) = &e.detail {
        let _ = write!(s, " {}", one_line(d, usize::MAX));
    }
    s
}

/// `s` on one line (line breaks and other control characters become
/// spaces), cut to `max` characters with an ellipsis.
pub fn one_line(s: &str, max: usize) -> String {
    let s = s.trim_end();
    let mut out = String::with_capacity(s.len().min(max.saturating_add(3)));
    for (n, c) in s.chars().enumerate() {
        if n == max {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

/// A compact duration: `4.2s`, `3m12s`, `5h2m`, `2d3h`.
pub fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    if s >= 86400 {
        format!("{}d{}h", s / 86400, s % 86400 / 3600)
    } else if s >= 3600 {
        format!("{}h{}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{}.{}s", s, ms % 1000 / 100)
    }
}

/// A compact size: `-` for zero, KiB below a MiB, MiB above.
pub fn human_size(b: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if b == 0 {
        "-".into()
    } else if (b as f64) < MIB {
        format!("{:.0}KiB", b as f64 / 1024.0)
    } else {
        format!("{:.1}MiB", b as f64 / MIB)
    }
}

/// Widest error text shown in the `jobs` table (the JSON has it whole).
const TABLE_ERROR_WIDTH: usize = 80;

/// The human `jobs` table: `ID POOL STATE ATTEMPTS AGE ERROR`, ages
/// relative to `now_ms`.
/// How long a job has run: from its first attempt's start to its end (or
/// to now while it runs); `-` if it never started.
fn run_time(d: &JobDoc, now_ms: u64) -> String {
    let Some(first) = d.attempts.first() else {
        return "-".into();
    };
    let end = d
        .finished_ms
        .or(d.attempts.last().and_then(|a| a.ended_ms))
        .filter(|_| d.state.is_terminal())
        .unwrap_or(now_ms);
    human_duration(end.saturating_sub(first.started_ms))
}

/// The `jobs` table: id, pool, state (in its colour), attempts, age, run
/// time and the error's last line.
pub fn jobs_table(docs: &[JobDoc], now_ms: u64, style: crate::style::Style) -> String {
    use std::fmt::Write as _;
    let id_w = docs
        .iter()
        .map(|d| d.id.to_string().len())
        .chain([2])
        .max()
        .unwrap_or(2);
    let pool_w = docs
        .iter()
        .map(|d| d.pool.chars().count())
        .chain([4])
        .max()
        .unwrap_or(4);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>id_w$}  {:<pool_w$}  {:<9}  {:>8}  {:>6}  {:>6}  ERROR",
        "ID", "POOL", "STATE", "ATTEMPTS", "AGE", "RUN"
    );
    for d in docs {
        let error = d.error.as_deref().map_or(String::new(), |e| {
            one_line(error_summary(e), TABLE_ERROR_WIDTH)
        });
        let line = format!(
            "{:>id_w$}  {:<pool_w$}  {}  {:>8}  {:>6}  {:>6}  {}",
            d.id,
            d.pool,
            style.state_cell(d.state.as_str(), 9),
            d.attempts.len(),
            human_duration(now_ms.saturating_sub(d.created_ms)),
            run_time(d, now_ms),
            error
        );
        let _ = writeln!(s, "{}", line.trim_end());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc_proto::control::Outcome;
    use ipc_proto::Bytes;

    fn doc(state: JobState, output: Option<&[u8]>, error: Option<&str>) -> JobDoc {
        JobDoc {
            id: 42,
            pool: "echo".into(),
            state,
            priority: 0,
            key: None,
            created_ms: 1_000,
            finished_ms: Some(2_000),
            attempts: vec![Attempt {
                n: 1,
                worker: 0,
                pid: 123,
                started_ms: 1_500,
                ended_ms: Some(2_000),
                outcome: Some(Outcome::Succeeded),
                error: None,
            }],
            output: output.map(Bytes::from),
            error: error.map(str::to_owned),
        }
    }

    #[test]
    fn utf8_output_is_text() {
        let v = job_json(
            &doc(JobState::Succeeded, Some("héllo\n".as_bytes()), None),
            true,
        );
        assert_eq!(v["output"], "héllo\n");
        assert_eq!(v["output_b64"], Value::Null);
        assert_eq!(v["state"], "succeeded");
        assert_eq!(v["error"], Value::Null);
    }

    #[test]
    fn binary_output_is_base64() {
        let v = job_json(
            &doc(JobState::Succeeded, Some(&[0xff, 0x00, 0xfe]), None),
            true,
        );
        assert_eq!(v["output"], Value::Null);
        assert_eq!(v["output_b64"], "/wD+");
        // Truncated UTF-8 is not UTF-8.
        let v = job_json(
            &doc(JobState::Succeeded, Some(&"é".as_bytes()[..1]), None),
            true,
        );
        assert_eq!(v["output_b64"], "ww==");
    }

    #[test]
    fn empty_and_absent_output() {
        let v = job_json(&doc(JobState::Succeeded, Some(b""), None), true);
        assert_eq!(v["output"], "");
        assert_eq!(v["output_b64"], Value::Null);
        let v = job_json(&doc(JobState::Failed, None, Some("boom")), true);
        assert_eq!(v["output"], Value::Null);
        assert_eq!(v["output_b64"], Value::Null);
        assert_eq!(v["error"], "boom");
    }

    #[test]
    fn job_document_shape() {
        let v = job_json(&doc(JobState::Succeeded, Some(b"x"), None), true);
        assert_eq!(
            v.to_string(),
            r#"{"id":42,"pool":"echo","state":"succeeded","priority":0,"key":null,"created_ms":1000,"finished_ms":2000,"attempts":[{"n":1,"worker":0,"pid":123,"started_ms":1500,"ended_ms":2000,"outcome":"succeeded","error":null}],"output":"x","output_b64":null,"error":null}"#
        );
        // Without output (jobs, wait): the fields are absent, not null.
        let v = job_json(&doc(JobState::Succeeded, Some(b"x"), None), false);
        let m = v.as_object().unwrap();
        assert!(!m.contains_key("output") && !m.contains_key("output_b64"));
        assert!(m.contains_key("error"));
    }

    #[test]
    fn map_line_shape() {
        let v = map_json(7, &doc(JobState::Succeeded, Some(&[0x80]), None));
        assert_eq!(
            v.to_string(),
            r#"{"id":42,"index":7,"state":"succeeded","output":null,"output_b64":"gA==","error":null}"#
        );
    }

    const TRACEBACK: &str = "Traceback (most recent call last):\n  File \"jobs.py\", line 3, in f\n    raise ValueError(f\"boom {n}\")\nValueError: boom 7\n\n";

    #[test]
    fn failure_lines() {
        assert_eq!(
            state_and_error(&doc(JobState::TimedOut, None, Some("took 30s\tkilled"))),
            "timed_out: took 30s killed"
        );
        assert_eq!(
            state_and_error(&doc(JobState::Failed, None, Some(TRACEBACK))),
            "failed: ValueError: boom 7"
        );
        assert_eq!(error_summary("\n \n"), "");
        assert_eq!(
            failure_text(&doc(JobState::Failed, Some(b"pickled"), Some(TRACEBACK))),
            "job 42 failed: ValueError: boom 7\n  Traceback (most recent call last):\n    File \"jobs.py\", line 3, in f\n      raise ValueError(f\"boom {n}\")\n  ValueError: boom 7"
        );
        assert_eq!(
            failure_text(&doc(JobState::Failed, None, Some("boom\n"))),
            "job 42 failed: boom"
        );
        assert_eq!(
            pool_failed_line("py", "worker 0: exit status 1 before Ready: Traceback (most recent call last):\n  File \"<frozen runpy>\"\nModuleNotFoundError: No module named 'jobvisor'"),
            "pool py failed: worker 0: exit status 1 before Ready: Traceback (most recent call last): … ModuleNotFoundError: No module named 'jobvisor'; fix its command, then `jobvisorctl reload`"
        );
        assert_eq!(
            pool_failed_line("p", "command not found"),
            "pool p failed: command not found; fix its command, then `jobvisorctl reload`"
        );
        assert_eq!(
            state_and_error(&doc(JobState::Cancelled, None, None)),
            "cancelled"
        );
    }

    #[test]
    fn events_render() {
        let e = Event {
            ts_ms: 1_795_608_000_123,
            event: "job_finished".into(),
            pool: Some("echo".into()),
            worker: Some(1),
            pid: Some(123),
            job: Some(42),
            state: Some(JobState::Succeeded),
            detail: Some("done".into()),
        };
        assert_eq!(
            event_line(&e),
            "2026-11-25T12:00:00.123Z job_finished pool=echo worker=1 pid=123 job=42 \
             state=succeeded done"
        );
        assert_eq!(
            event_json(&e).to_string(),
            r#"{"ts_ms":1795608000123,"event":"job_finished","pool":"echo","worker":1,"pid":123,"job":42,"state":"succeeded","detail":"done"}"#
        );
        let bare = Event {
            ts_ms: 0,
            event: "reloaded".into(),
            pool: None,
            worker: None,
            pid: None,
            job: None,
            state: None,
            detail: None,
        };
        assert_eq!(event_line(&bare), "1970-01-01T00:00:00.000Z reloaded");
        assert_eq!(event_json(&bare)["state"], Value::Null);
    }

    #[test]
    fn one_line_cuts_and_flattens() {
        assert_eq!(one_line("a\nb\r\n", 10), "a b");
        assert_eq!(one_line("abcdef", 3), "abc…");
        assert_eq!(one_line("abc", 3), "abc");
    }

    #[test]
    fn table_aligns() {
        let mut a = doc(JobState::Failed, None, Some("boom"));
        a.id = 7;
        let mut b = doc(JobState::Failed, None, Some(TRACEBACK));
        b.id = 8;
        let t = jobs_table(
            &[a, b, doc(JobState::Succeeded, None, None)],
            3_500,
            crate::style::Style::plain(),
        );
        assert_eq!(
            t,
            "ID  POOL  STATE      ATTEMPTS     AGE     RUN  ERROR\n\
             \x207  echo  failed            1    2.5s    0.5s  boom\n\
             \x208  echo  failed            1    2.5s    0.5s  ValueError: boom 7\n\
             42  echo  succeeded         1    2.5s    0.5s\n"
        );
    }

    #[test]
    fn run_time_is_from_the_first_start_to_the_end_or_now() {
        let done = doc(JobState::Succeeded, None, None);
        assert_eq!(run_time(&done, 9_000), human_duration(500));
        let mut running = doc(JobState::Running, None, None);
        running.finished_ms = None;
        running.attempts[0].ended_ms = None;
        assert_eq!(run_time(&running, 4_500), human_duration(3_000));
        let mut queued = doc(JobState::Queued, None, None);
        queued.attempts.clear();
        assert_eq!(run_time(&queued, 4_500), "-");
    }

    #[test]
    fn exit_code_of_states() {
        assert_eq!(state_exit_code(JobState::Succeeded), 0);
        for st in JobState::ALL {
            if st != JobState::Succeeded {
                assert_eq!(state_exit_code(st), 1, "{st:?}");
            }
        }
    }
}
