//! Supervision commands: `status`, and the one-answer commands `scale`,
//! `restart`, `reload`, `shutdown`.

use super::render::{human_duration, human_size};
use super::style::{Colour, Style};
use super::{Ctx, Failure, Out};
use ipc_proto::control::{
    NodeStatus, PoolState, PoolStatus, Request, Response, StatusReport, WorkerState,
};
use serde_json::json;
use std::fmt::Write as _;

/// `status [POOL]`.
pub fn status(ctx: &Ctx, pool: Option<String>) -> Result<u8, Failure> {
    let mut conn = ctx.connect("status")?;
    match conn
        .call(&Request::Status { pool })
        .map_err(|e| Failure::client("status", e))?
    {
        Response::Status(report) => {
            let warnings = store_warnings(&mut conn);
            let mut out = Out::new();
            if ctx.json {
                let mut doc = status_json(&report);
                doc["warnings"] = json!(warnings);
                out.line(&doc.to_string())?;
            } else {
                out.bytes(status_text(&report, Style::stdout()).as_bytes())?;
                let style = Style::stdout();
                for w in &warnings {
                    out.bytes(
                        format!(
                            "{}\n",
                            style.paint(crate::style::Colour::Yellow, &format!("warning: {w}"))
                        )
                        .as_bytes(),
                    )?;
                }
            }
            out.flush()?;
            Ok(0)
        }
        Response::Error { kind, message } => Err(Failure::daemon("status", kind, &message)),
        other => Err(Failure::unexpected("status", &other)),
    }
}

/// The store's warnings (a PostgreSQL transaction holding back cleanup);
/// none from a daemon that does not know the request.
fn store_warnings(conn: &mut crate::client::Connection) -> Vec<String> {
    match conn.call(&Request::StoreWarnings) {
        Ok(Response::Warnings(w)) => w,
        _ => Vec::new(),
    }
}

/// `status --cluster`: the nodes sharing the daemon's store.
pub fn nodes(ctx: &Ctx) -> Result<u8, Failure> {
    let mut conn = ctx.connect("status")?;
    match conn
        .call(&Request::Nodes)
        .map_err(|e| Failure::client("status", e))?
    {
        Response::Nodes(nodes) => {
            let mut out = Out::new();
            if ctx.json {
                out.line(&nodes_json(&nodes).to_string())?;
            } else {
                out.bytes(nodes_text(&nodes).as_bytes())?;
            }
            out.flush()?;
            Ok(0)
        }
        Response::Error { kind, message } => Err(Failure::daemon("status", kind, &message)),
        other => Err(Failure::unexpected("status", &other)),
    }
}

fn nodes_json(nodes: &[NodeStatus]) -> serde_json::Value {
    nodes
        .iter()
        .map(|n| {
            json!({
                "id": n.id,
                "host": n.host,
                "pid": n.pid,
                "started_ms": n.started_ms,
                "heartbeat_age_ms": n.heartbeat_age_ms,
                "alive": n.alive,
                "workers": n.workers,
                "running": n.running,
                "held": n.held,
                "leader": n.leader,
            })
        })
        .collect()
}

fn nodes_text(nodes: &[NodeStatus]) -> String {
    let mut s = String::from(
        "NODE  HOST                  PID      STATE   HEARTBEAT  WORKERS  RUNNING  HELD\n",
    );
    for n in nodes {
        let _ = writeln!(
            s,
            "{:<5} {:<21} {:<8} {:<7} {:<10} {:<8} {:<8} {}",
            n.id,
            n.host,
            n.pid,
            match (n.alive, n.leader) {
                (true, true) => "leader",
                (true, false) => "alive",
                (false, _) => "gone",
            },
            format!("{} ago", human_duration(n.heartbeat_age_ms)),
            n.workers,
            n.running,
            n.held
        );
    }
    s
}

/// A request answered by `Ok { message }` or an error.
pub fn simple(ctx: &Ctx, what: &str, req: Request) -> Result<u8, Failure> {
    let mut conn = ctx.connect(what)?;
    simple_on(ctx, &mut conn, what, req)?;
    Ok(0)
}

fn simple_on(
    ctx: &Ctx,
    conn: &mut crate::client::Connection,
    what: &str,
    req: Request,
) -> Result<(), Failure> {
    match conn.call(&req).map_err(|e| Failure::client(what, e))? {
        Response::Ok { message } => {
            let mut out = Out::new();
            if ctx.json {
                out.line(&json!({ "ok": true, "message": message }).to_string())?;
            } else {
                out.line(&message)?;
            }
            out.flush()?;
            Ok(())
        }
        Response::Error { kind, message } => Err(Failure::daemon(what, kind, &message)),
        other => Err(Failure::unexpected(what, &other)),
    }
}

/// `shutdown [--now]`: with `wait`, returns once the daemon has exited
/// (it closes every connection as it goes), as `systemctl stop` does.
pub fn shutdown(ctx: &Ctx, now: bool, wait: bool) -> Result<u8, Failure> {
    let mut conn = ctx.connect("shutdown")?;
    simple_on(ctx, &mut conn, "shutdown", Request::Shutdown { now })?;
    if wait {
        // Anything but the end of the connection is not expected; the end
        // (or a reset) is the daemon's exit.
        while conn.recv().is_ok() {}
    }
    Ok(0)
}

/// `reload`: with `wait`, returns once no worker of a running pool is
/// starting, stopping or waiting out a backoff (a rolling replacement is
/// done, added pools are up, removed ones gone); exit 5 if a pool that had
/// not failed before fails meanwhile.
pub fn reload(ctx: &Ctx, wait: bool) -> Result<u8, Failure> {
    let mut conn = ctx.connect("reload")?;
    let failed_before: Vec<String> = if wait {
        status_of(&mut conn, "reload", None)?
            .pools
            .into_iter()
            .filter(|p| p.state == PoolState::Failed)
            .map(|p| p.name)
            .collect()
    } else {
        Vec::new()
    };
    simple_on(ctx, &mut conn, "reload", Request::Reload)?;
    if !wait {
        return Ok(0);
    }
    loop {
        let report = status_of(&mut conn, "reload", None)?;
        if let Some(p) = report
            .pools
            .iter()
            .find(|p| p.state == PoolState::Failed && !failed_before.contains(&p.name))
        {
            return Err(Failure::new(5, format!("reload: {}", failed_pool_text(p))));
        }
        let settled = report.pools.iter().all(|p| {
            p.state == PoolState::Failed
                || (matches!(p.state, PoolState::Running | PoolState::Paused)
                    && p.workers.len() as u32 == p.desired_workers
                    && p.workers
                        .iter()
                        .all(|w| matches!(w.state, WorkerState::Ready | WorkerState::Busy)))
        });
        if settled {
            return Ok(0);
        }
        std::thread::sleep(RESTART_POLL);
    }
}

fn status_of(
    conn: &mut crate::client::Connection,
    what: &str,
    pool: Option<String>,
) -> Result<StatusReport, Failure> {
    match conn
        .call(&Request::Status { pool })
        .map_err(|e| Failure::client(what, e))?
    {
        Response::Status(r) => Ok(r),
        Response::Error { kind, message } => Err(Failure::daemon(what, kind, &message)),
        other => Err(Failure::unexpected(what, &other)),
    }
}

/// How often `restart` and `reload` look at the pools while they wait.
const RESTART_POLL: std::time::Duration = std::time::Duration::from_millis(20);

/// `restart POOL`: with `wait`, returns once the pool has as many ready
/// workers as it wants, none of them one of the old processes; exit 5 if
/// the pool fails instead (its error says why).
pub fn restart(ctx: &Ctx, pool: String, wait: bool) -> Result<u8, Failure> {
    let mut conn = ctx.connect("restart")?;
    let old_pids = if wait {
        worker_pids(&mut conn, &pool)?
    } else {
        Vec::new()
    };
    simple_on(
        ctx,
        &mut conn,
        "restart",
        Request::Restart { pool: pool.clone() },
    )?;
    if !wait {
        return Ok(0);
    }
    loop {
        let report = status_of(&mut conn, "restart", Some(pool.clone()))?;
        let Some(p) = report.pools.into_iter().next() else {
            return Err(Failure::new(4, format!("restart: pool {pool} is gone")));
        };
        if p.state == PoolState::Failed {
            return Err(Failure::new(
                5,
                format!("restart: {}", failed_pool_text(&p)),
            ));
        }
        let ready: Vec<u32> = p
            .workers
            .iter()
            .filter(|w| matches!(w.state, WorkerState::Ready | WorkerState::Busy))
            .filter_map(|w| w.pid)
            .filter(|pid| !old_pids.contains(pid))
            .collect();
        if ready.len() as u32 >= p.desired_workers {
            return Ok(0);
        }
        std::thread::sleep(RESTART_POLL);
    }
}

/// The pids of `pool`'s workers.
fn worker_pids(conn: &mut crate::client::Connection, pool: &str) -> Result<Vec<u32>, Failure> {
    Ok(status_of(conn, "restart", Some(pool.to_owned()))?
        .pools
        .iter()
        .flat_map(|p| p.workers.iter().filter_map(|w| w.pid))
        .collect())
}

fn status_json(r: &StatusReport) -> serde_json::Value {
    json!({
        "pools": r.pools.iter().map(|p| json!({
            "name": p.name,
            "state": p.state.as_str(),
            "desired_workers": p.desired_workers,
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
                "jobs_done": w.jobs_done,
                "rss_bytes": w.rss_bytes,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()
    })
}

/// `pool P failed: why` of a failed pool, once (the daemon's `last_error`
/// already starts with `pool P failed: `).
fn failed_pool_text(p: &PoolStatus) -> String {
    let head = format!("pool {} failed: ", p.name);
    let why = p.last_error.as_deref().unwrap_or("no reason recorded");
    format!("{head}{}", why.strip_prefix(&head).unwrap_or(why))
}

fn pool_text(s: &mut String, p: &PoolStatus, style: Style) {
    let ready = p
        .workers
        .iter()
        .filter(|w| matches!(w.state, WorkerState::Ready | WorkerState::Busy))
        .count();
    let _ = writeln!(
        s,
        "pool {}: {}, {}/{} workers ready, queued {}, running {}, succeeded {}, failed {}",
        p.name,
        style.state(p.state.as_str()),
        ready,
        p.desired_workers,
        p.queued,
        p.running,
        p.succeeded,
        p.failed
    );
    if let Some(e) = &p.last_error {
        // A worker's last output (a traceback) spans lines: indented.
        let e = e.trim_end().replace('\n', "\n    ");
        let _ = writeln!(s, "  {} {e}", style.paint(Colour::Red, "last error:"));
    }
    let _ = writeln!(
        s,
        "  {:>4}  {:>8}  {:<9} {:>9}  {:>8}  {:>9}  {:>9}",
        "ID", "PID", "STATE", "UPTIME", "RESTARTS", "JOBS", "RSS"
    );
    for w in &p.workers {
        let _ = writeln!(
            s,
            "  {:>4}  {:>8}  {} {:>9}  {:>8}  {:>9}  {:>9}",
            w.id,
            w.pid.map_or("-".to_string(), |p| p.to_string()),
            style.state_cell(w.state.as_str(), 9),
            if w.pid.is_some() {
                human_duration(w.uptime_ms)
            } else {
                "-".into()
            },
            w.restarts,
            w.jobs_done,
            human_size(w.rss_bytes)
        );
    }
}

fn status_text(r: &StatusReport, style: Style) -> String {
    let mut s = String::new();
    if r.pools.is_empty() {
        s.push_str("no pools configured\n");
    }
    for p in &r.pools {
        pool_text(&mut s, p, style);
    }
    s
}
