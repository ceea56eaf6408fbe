//! `prune [--before WHEN] [--state S] [--pool P]`: deletes finished jobs,
//! in requests of at most `MAX_PRUNE` jobs each (so the store commits
//! other work in between), until one deletes fewer. `metrics`: the
//! Prometheus text, as the daemon wrote it (`--json` does not apply).

use super::args::{parse_since, parse_state};
use super::{Ctx, Failure, Out};
use ipc_proto::control::{Request, Response, MAX_PRUNE};
use serde_json::json;

/// `prune`.
pub fn prune(
    ctx: &Ctx,
    before: Option<String>,
    state: Option<String>,
    pool: Option<String>,
) -> Result<u8, Failure> {
    let finished_before_ms = match before {
        Some(b) => {
            parse_since("--before", &b).map_err(|e| Failure::usage(format!("prune: {e}")))?
        }
        None => u64::MAX,
    };
    let state = match state {
        Some(s) => {
            let st = parse_state(&s).map_err(|e| Failure::usage(format!("prune: {e}")))?;
            if !st.is_terminal() {
                return Err(Failure::usage(format!(
                    "prune: --state {s}: only finished jobs are pruned (succeeded, failed, cancelled, timed_out, dead)"
                )));
            }
            Some(st)
        }
        None => None,
    };
    let mut conn = ctx.connect("prune")?;
    let mut total = 0u64;
    loop {
        let req = Request::Prune {
            finished_before_ms,
            state,
            pool: pool.clone(),
            limit: MAX_PRUNE,
        };
        match conn.call(&req).map_err(|e| Failure::client("prune", e))? {
            Response::Pruned { count } => {
                total += count;
                if count < u64::from(MAX_PRUNE) {
                    break;
                }
            }
            Response::Error { kind, message } => {
                return Err(Failure::daemon("prune", kind, &message))
            }
            other => return Err(Failure::unexpected("prune", &other)),
        }
    }
    let mut out = Out::new();
    if ctx.json {
        out.line(&json!({ "pruned": total }).to_string())?;
    } else {
        let s = if total == 1 { "" } else { "s" };
        out.line(&format!("pruned {total} finished job{s}"))?;
    }
    out.flush()?;
    Ok(0)
}

/// `metrics`.
pub fn metrics(ctx: &Ctx) -> Result<u8, Failure> {
    let mut conn = ctx.connect("metrics")?;
    match conn
        .call(&Request::Metrics)
        .map_err(|e| Failure::client("metrics", e))?
    {
        Response::Metrics { text } => {
            let mut out = Out::new();
            out.bytes(text.as_bytes())?;
            out.flush()?;
            Ok(0)
        }
        Response::Error { kind, message } => Err(Failure::daemon("metrics", kind, &message)),
        other => Err(Failure::unexpected("metrics", &other)),
    }
}
