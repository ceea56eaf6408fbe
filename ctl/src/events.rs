//! `events`: the live stream, one line per event, flushed at once so that
//! `jobvisorctl events | grep …` sees each event as it happens.
//!
//! Ends with exit 0 when the daemon ends the stream (`End`, e.g. at
//! shutdown), with 3 when the connection is lost without it; Ctrl-C keeps
//! its default action (the process dies of SIGINT).

use super::render::{event_json, event_line};
use super::{Ctx, Failure, Out};
use ipc_proto::control::{Request, Response};

/// `events`.
pub fn run(ctx: &Ctx) -> Result<u8, Failure> {
    let mut conn = ctx.connect("events")?;
    conn.send(&Request::Events)
        .map_err(|e| Failure::client("events", e))?;
    let mut out = Out::new();
    loop {
        match conn.recv().map_err(|e| Failure::client("events", e))? {
            Response::Event(e) => {
                if ctx.json {
                    out.line(&event_json(&e).to_string())?;
                } else {
                    out.line(&event_line(&e))?;
                }
                out.flush()?;
            }
            Response::End => return Ok(0),
            Response::Error { kind, message } => {
                return Err(Failure::daemon("events", kind, &message))
            }
            other => return Err(Failure::unexpected("events", &other)),
        }
    }
}
