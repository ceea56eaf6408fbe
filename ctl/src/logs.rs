//! `logs POOL[/N] [-f] [-n LINES] [--since WHEN]`: the output the daemon
//! kept of a pool's workers, one line each with its time, worker and
//! stream; `-f` then follows new lines until interrupted (or until the
//! daemon stops: exit 0 on its `End`, 3 if the connection is lost).
//!
//! `--json` prints one array of line objects, or with `-f` one object per
//! line (a stream), flushed at once.

use super::render::format_ts;
use super::style::{Colour, Style};
use super::{Ctx, Failure, Out};
use ipc_proto::control::{LogLine, LogStream, Request, Response};
use serde_json::{json, Value};

/// Splits `POOL` or `POOL/N`.
pub fn parse_target(s: &str) -> Result<(String, Option<u32>), String> {
    match s.rsplit_once('/') {
        None if !s.is_empty() => Ok((s.to_string(), None)),
        Some((pool, n)) if !pool.is_empty() => match n.parse::<u32>() {
            Ok(n) => Ok((pool.to_string(), Some(n))),
            Err(_) => Err(format!(
                "invalid worker '{n}' in '{s}': write POOL or POOL/N with N a worker id (see `jobvisorctl status`)"
            )),
        },
        _ => Err(format!("invalid '{s}': write POOL or POOL/N")),
    }
}

/// One line as JSON.
pub fn line_json(l: &LogLine) -> Value {
    json!({
        "ts_ms": l.time_ms,
        "pool": l.pool,
        "worker": l.worker,
        "stream": l.stream.as_str(),
        "line": l.line,
    })
}

/// One line for a human: `TIME POOL/N text`, with stderr lines tagged
/// `[stderr]` and the daemon's notes `[jobvisord]`.
pub fn line_text(l: &LogLine, style: Style) -> String {
    let tag = match l.stream {
        LogStream::Stdout => String::new(),
        LogStream::Stderr => format!("{} ", style.paint(Colour::Red, "[stderr]")),
        LogStream::Daemon => format!("{} ", style.paint(Colour::Cyan, "[jobvisord]")),
    };
    format!(
        "{} {} {tag}{}",
        style.paint(Colour::Dim, &format_ts(l.time_ms)),
        style.paint(Colour::Dim, &format!("{}/{}", l.pool, l.worker)),
        l.line
    )
}

/// `logs`.
pub fn run(
    ctx: &Ctx,
    target: &str,
    follow: bool,
    lines: u32,
    since_ms: Option<u64>,
) -> Result<u8, Failure> {
    let (pool, worker) = parse_target(target).map_err(Failure::usage)?;
    let mut conn = ctx.connect("logs")?;
    conn.send(&Request::Logs {
        pool,
        worker,
        lines,
        since_ms,
        follow,
    })
    .map_err(|e| Failure::client("logs", e))?;
    let style = Style::stdout();
    let mut out = Out::new();
    let mut listing = Vec::new();
    loop {
        match conn.recv().map_err(|e| Failure::client("logs", e))? {
            Response::LogLine(l) => {
                if ctx.json && !follow {
                    listing.push(line_json(&l));
                    continue;
                }
                if ctx.json {
                    out.line(&line_json(&l).to_string())?;
                } else {
                    out.line(&line_text(&l, style))?;
                }
                // Followed lines show up as they come; the kept ones in
                // one go.
                if follow && !conn.has_buffered() {
                    out.flush()?;
                }
            }
            Response::End => {
                if ctx.json && !follow {
                    out.line(&Value::Array(listing).to_string())?;
                }
                out.flush()?;
                return Ok(0);
            }
            Response::Error { kind, message } => {
                return Err(Failure::daemon("logs", kind, &message))
            }
            other => return Err(Failure::unexpected("logs", &other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(parse_target("echo"), Ok(("echo".into(), None)));
        assert_eq!(parse_target("echo/3"), Ok(("echo".into(), Some(3))));
        assert!(parse_target("echo/x")
            .unwrap_err()
            .contains("invalid worker 'x'"));
        assert!(parse_target("/3").is_err());
        assert!(parse_target("").is_err());
    }

    #[test]
    fn lines_render() {
        let l = LogLine {
            time_ms: 0,
            pool: "echo".into(),
            worker: 1,
            stream: LogStream::Stderr,
            line: "boom".into(),
        };
        assert_eq!(
            line_text(&l, Style::plain()),
            "1970-01-01T00:00:00.000Z echo/1 [stderr] boom"
        );
        assert_eq!(
            line_json(&l),
            json!({"ts_ms": 0, "pool": "echo", "worker": 1, "stream": "stderr", "line": "boom"})
        );
    }
}
