//! The opt-in HTTP listener (`daemon.metrics_listen`, or a TCP socket
//! named `metrics` passed by systemd): `/metrics` (the Prometheus text),
//! `/` (a read-only status page that refreshes itself), `/status.json`
//! (what the page shows) and the page's script and style.
//!
//! It runs on threads of its own and is a client of the control socket
//! like `jobvisorctl` (as the daemon's uid, so an admin): the event loop
//! never waits on a browser or a scraper, and sees these requests as it
//! sees any other. Hostile clients are bounded: at most
//! [`MAX_CONNECTIONS`] are served at once (the next ones wait in the
//! kernel's accept queue until a slot frees, at most [`DEADLINE`]), a
//! request head of at most [`MAX_HEAD`] bytes, [`DEADLINE`] to send it and
//! to read the answer, `GET` and `HEAD` only, `Connection: close`. Nothing a client
//! sends is used but the method and the path, and the path only to pick one
//! of the fixed pages.

use ipc_proto::control::{JobDoc, JobState, Request, Response, StatusReport};
use jobvisor_client::Connection;
use serde_json::{json, Value};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// HTTP connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Largest request head read (request line and headers).
pub const MAX_HEAD: usize = 8 << 10;
/// Time a client has to send its request head, and to take the answer.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// Recent and failed jobs on the status page.
const PAGE_JOBS: u32 = 20;

const PAGE: &str = include_str!("http/page.html");
const SCRIPT: &str = include_str!("http/page.js");
const STYLE: &str = include_str!("http/page.css");

/// Serves `listener` on a thread of its own until the process exits,
/// asking the daemon at `socket` for what it shows.
pub fn start(listener: TcpListener, socket: PathBuf) -> io::Result<()> {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let slots = Arc::new(Slots::default());
    std::thread::Builder::new()
        .name("jobvisor-http".into())
        .spawn(move || loop {
            // Accept only with a slot free: the others wait in the
            // kernel's queue, not in threads of ours.
            slots.take();
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(_) => {
                    slots.give();
                    // EMFILE and the like: the next accept may succeed.
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let (slots2, socket) = (Arc::clone(&slots), socket.clone());
            let spawned = std::thread::Builder::new()
                .name("jobvisor-http-conn".into())
                .spawn(move || {
                    serve(stream, &socket);
                    slots2.give();
                });
            if spawned.is_err() {
                slots.give();
            }
        })?;
    crate::info!("serving metrics and the status page on http://{addr}/");
    Ok(())
}

/// Connections being served, at most [`MAX_CONNECTIONS`].
#[derive(Default)]
struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    /// Waits for a free slot and takes it.
    fn take(&self) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used >= MAX_CONNECTIONS {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += 1;
    }

    fn give(&self) {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *used -= 1;
        self.freed.notify_one();
    }
}

/// One answer.
struct Answer {
    status: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Answer {
    fn text(status: &'static str, body: &str) -> Answer {
        Answer {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
        }
    }
}

fn serve(mut stream: TcpStream, socket: &std::path::Path) {
    let start = Instant::now();
    let (method, path) = match read_head(&mut stream, start) {
        Ok(Some(m)) => m,
        Ok(None) => return,
        Err(answer) => return respond(&mut stream, &answer, false, start),
    };
    let head_only = method == "HEAD";
    let answer = if method != "GET" && !head_only {
        Answer::text("405 Method Not Allowed", "only GET and HEAD\n")
    } else {
        route(&path, socket)
    };
    respond(&mut stream, &answer, head_only, start);
}

/// Reads the request head; `Ok(None)` if the client went away, `Err` for
/// an answer to give instead (too large, too slow, malformed).
fn read_head(stream: &mut TcpStream, start: Instant) -> Result<Option<(String, String)>, Answer> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            break;
        }
        if buf.len() >= MAX_HEAD {
            return Err(Answer::text(
                "431 Request Header Fields Too Large",
                "request head too large\n",
            ));
        }
        let left = DEADLINE.saturating_sub(start.elapsed());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Err(Answer::text("408 Request Timeout", "request too slow\n"));
        }
        let want = chunk.len().min(MAX_HEAD - buf.len());
        match stream.read(&mut chunk[..want]) {
            Ok(0) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Answer::text("408 Request Timeout", "request too slow\n"))
            }
            Err(_) => return Ok(None),
        }
    }
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end_matches('\r').split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(p), Some(v)) if v.starts_with("HTTP/1.") && !m.is_empty() => {
            let path = p.split(['?', '#']).next().unwrap_or("/");
            Ok(Some((m.to_string(), path.to_string())))
        }
        _ => Err(Answer::text("400 Bad Request", "malformed request line\n")),
    }
}

fn route(path: &str, socket: &std::path::Path) -> Answer {
    let asset = |content_type, body: &str| Answer {
        status: "200 OK",
        content_type,
        body: body.as_bytes().to_vec(),
    };
    match path {
        "/" | "/index.html" => asset("text/html; charset=utf-8", PAGE),
        "/page.js" => asset("text/javascript; charset=utf-8", SCRIPT),
        "/page.css" => asset("text/css; charset=utf-8", STYLE),
        "/metrics" => match ask(socket, &Request::Metrics) {
            Ok(Response::Metrics { text }) => Answer {
                status: "200 OK",
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: text.into_bytes(),
            },
            other => unavailable(other),
        },
        "/status.json" => match status_json(socket) {
            Ok(v) => Answer {
                status: "200 OK",
                content_type: "application/json",
                body: v.to_string().into_bytes(),
            },
            Err(e) => unavailable(Err(e)),
        },
        _ => Answer::text("404 Not Found", "not found; try / or /metrics\n"),
    }
}

fn unavailable(r: Result<Response, String>) -> Answer {
    let why = match r {
        Ok(other) => format!("unexpected answer from jobvisord: {other:?}"),
        Err(e) => e,
    };
    Answer::text("503 Service Unavailable", &format!("{why}\n"))
}

fn respond(stream: &mut TcpStream, a: &Answer, head_only: bool, start: Instant) {
    let left = DEADLINE
        .saturating_sub(start.elapsed())
        .max(Duration::from_millis(100));
    let _ = stream.set_write_timeout(Some(left));
    let mut head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         X-Content-Type-Options: nosniff\r\nContent-Security-Policy: default-src 'self'\r\n",
        a.status,
        a.content_type,
        a.body.len()
    );
    if a.status.starts_with("405") {
        head.push_str("Allow: GET, HEAD\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    if stream.write_all(head.as_bytes()).is_ok() && !head_only {
        let _ = stream.write_all(&a.body);
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// One request on a fresh control connection, one answer.
fn ask(socket: &std::path::Path, req: &Request) -> Result<Response, String> {
    let mut c = Connection::connect(socket).map_err(|e| e.to_string())?;
    c.call(req).map_err(|e| e.to_string())
}

/// A `Jobs` listing.
fn jobs(c: &mut Connection, state: Option<JobState>, limit: u32) -> Result<Vec<JobDoc>, String> {
    c.send(&Request::Jobs {
        pool: None,
        state,
        limit: Some(limit),
        before: None,
        since_ms: None,
    })
    .map_err(|e| e.to_string())?;
    let mut docs = Vec::new();
    loop {
        match c.recv().map_err(|e| e.to_string())? {
            Response::Job(d) => docs.push(d),
            Response::End => return Ok(docs),
            Response::Error { message, .. } => return Err(message),
            other => return Err(format!("unexpected answer from jobvisord: {other:?}")),
        }
    }
}

/// What the page shows: pools and workers, recent jobs and failed ones
/// (ids, pools, states, times, error lines: never inputs or outputs).
fn status_json(socket: &std::path::Path) -> Result<Value, String> {
    let mut c = Connection::connect(socket).map_err(|e| e.to_string())?;
    let report = match c.call(&Request::Status { pool: None }) {
        Ok(Response::Status(r)) => r,
        Ok(other) => return Err(format!("unexpected answer from jobvisord: {other:?}")),
        Err(e) => return Err(e.to_string()),
    };
    let recent = jobs(&mut c, None, PAGE_JOBS)?;
    let mut failed = Vec::new();
    for st in [JobState::Failed, JobState::Dead, JobState::TimedOut] {
        failed.extend(jobs(&mut c, Some(st), PAGE_JOBS)?);
    }
    failed.sort_by_key(|d| std::cmp::Reverse(d.id));
    failed.truncate(PAGE_JOBS as usize);
    Ok(json!({
        "pools": pools_json(&report),
        "recent": recent.iter().map(job_json).collect::<Vec<_>>(),
        "failed": failed.iter().map(job_json).collect::<Vec<_>>(),
    }))
}

fn pools_json(r: &StatusReport) -> Value {
    r.pools
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "state": p.state.as_str(),
                "workers_wanted": p.desired_workers,
                "queued": p.queued,
                "running": p.running,
                "succeeded": p.succeeded,
                "failed": p.failed,
                "last_error": p.last_error,
                "workers": p.workers.iter().map(|w| json!({
                    "id": w.id,
                    "pid": w.pid,
                    "state": w.state.as_str(),
                    "uptime_ms": w.uptime_ms,
                    "restarts": w.restarts,
                    "jobs": w.jobs_done,
                    "rss_bytes": w.rss_bytes,
                })).collect::<Vec<_>>(),
            })
        })
        .collect()
}

fn job_json(d: &JobDoc) -> Value {
    json!({
        "id": d.id,
        "pool": d.pool,
        "state": d.state.as_str(),
        "attempts": d.attempts.len(),
        "created_ms": d.created_ms,
        "finished_ms": d.finished_ms,
        // Its last non-empty line, as `jobs` shows it.
        "error": d.error.as_deref().map(|e| {
            e.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").chars().take(200).collect::<String>()
        }),
    })
}
