//! `top`: a live view of the daemon in the terminal, like `pm2 monit` or
//! `htop`: pools (state, workers, queue, rates) and their workers (pid,
//! state, uptime, CPU, RSS, jobs, restarts). It polls `status` every
//! `--interval` and redraws early (at most 10 times a second) when the
//! `events` stream says something happened. `q`, Esc or Ctrl-C quits.
//!
//! Plain ANSI only (alternate screen, cursor moves, 8 colours, off with
//! `NO_COLOR`), so it works over ssh in any terminal. The terminal is
//! restored on every way out: a key, an error (the daemon went away: exit
//! 3), SIGTERM or SIGHUP. When stdout is not a terminal it prints one
//! snapshot and exits (with `--json`, the `status` document).
//!
//! CPU is read from `/proc/PID/stat` of each worker (the daemon and this
//! command are on one host: the control socket is a Unix socket).

use super::render::{human_duration, human_size};
use super::style::{Colour, Style};
use super::{Ctx, Failure, Out};
use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyModifiers};
use crossterm::{cursor, execute, queue, terminal};
use ipc_proto::control::{PoolStatus, Request, Response, StatusReport, WorkerState};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Shortest time between two redraws prompted by events.
const MIN_REDRAW: Duration = Duration::from_millis(100);

/// What one screen needs besides the status report.
#[derive(Debug, Default)]
pub struct Rates {
    /// Jobs finished per second, per pool, over the last interval.
    pub done_per_sec: HashMap<String, f64>,
    /// CPU use per worker pid, percent of one core, over the last interval.
    pub cpu: HashMap<u32, f64>,
}

/// Counters of the previous sample, to turn into rates.
#[derive(Default)]
struct Sample {
    at: Option<Instant>,
    done: HashMap<String, u64>,
    cpu_ticks: HashMap<u32, u64>,
}

impl Sample {
    /// Rates since the previous sample; remembers this one.
    fn next(&mut self, report: &StatusReport, now: Instant) -> Rates {
        let elapsed = self.at.map(|t| now.duration_since(t).as_secs_f64());
        let mut rates = Rates::default();
        let mut done = HashMap::new();
        let mut ticks = HashMap::new();
        let hz = clock_ticks_per_sec();
        for p in &report.pools {
            let n = p.succeeded + p.failed;
            if let (Some(dt), Some(before)) = (elapsed, self.done.get(&p.name)) {
                if dt > 0.0 {
                    rates
                        .done_per_sec
                        .insert(p.name.clone(), n.saturating_sub(*before) as f64 / dt);
                }
            }
            done.insert(p.name.clone(), n);
            for pid in p.workers.iter().filter_map(|w| w.pid) {
                let Some(t) = cpu_ticks(pid) else { continue };
                if let (Some(dt), Some(before)) = (elapsed, self.cpu_ticks.get(&pid)) {
                    if dt > 0.0 && hz > 0.0 {
                        let pct = t.saturating_sub(*before) as f64 / hz / dt * 100.0;
                        rates.cpu.insert(pid, pct);
                    }
                }
                ticks.insert(pid, t);
            }
        }
        *self = Sample {
            at: Some(now),
            done,
            cpu_ticks: ticks,
        };
        rates
    }
}

fn clock_ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |v| v as f64)
}

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: fields count from the
    // last ')'. utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The screen as lines of at most `width` columns (colours do not count),
/// at most `height` of them.
pub fn screen(
    report: &StatusReport,
    rates: &Rates,
    daemon_pid: u32,
    width: usize,
    height: usize,
    style: Style,
) -> Vec<String> {
    let mut lines: Vec<(String, Option<Colour>)> = Vec::new();
    let workers: usize = report.pools.iter().map(|p| p.workers.len()).sum();
    let ready = report
        .pools
        .iter()
        .flat_map(|p| &p.workers)
        .filter(|w| matches!(w.state, WorkerState::Ready | WorkerState::Busy))
        .count();
    let queued: u64 = report.pools.iter().map(|p| p.queued).sum();
    let running: u64 = report.pools.iter().map(|p| p.running).sum();
    lines.push((
        format!(
            "jobvisord pid {daemon_pid}: {} pools, {ready}/{workers} workers ready, {queued} queued, {running} running   (q quits)",
            report.pools.len()
        ),
        None,
    ));
    lines.push((String::new(), None));
    for p in &report.pools {
        pool_lines(&mut lines, p, rates);
    }
    if report.pools.is_empty() {
        lines.push(("no pools configured".into(), None));
    }
    lines
        .into_iter()
        .take(height)
        .map(|(l, colour)| {
            let cut: String = l.chars().take(width).collect();
            match colour {
                Some(c) => style.paint(c, &cut),
                None => cut,
            }
        })
        .collect()
}

fn pool_lines(lines: &mut Vec<(String, Option<Colour>)>, p: &PoolStatus, rates: &Rates) {
    let ready = p
        .workers
        .iter()
        .filter(|w| matches!(w.state, WorkerState::Ready | WorkerState::Busy))
        .count();
    let rate = rates
        .done_per_sec
        .get(&p.name)
        .map_or("-".to_string(), |r| format!("{r:.1}/s"));
    let colour = match p.state.as_str() {
        "failed" => Some(Colour::Red),
        "paused" | "stopping" => Some(Colour::Yellow),
        _ => Some(Colour::Green),
    };
    lines.push((
        format!(
            "{}  {}  workers {ready}/{}  queued {}  running {}  done {rate}  succeeded {}  failed {}",
            p.name,
            p.state.as_str(),
            p.desired_workers,
            p.queued,
            p.running,
            p.succeeded,
            p.failed
        ),
        colour,
    ));
    if let Some(e) = &p.last_error {
        let first = e.lines().next().unwrap_or("");
        lines.push((format!("  last error: {first}"), Some(Colour::Red)));
    }
    lines.push((
        format!(
            "  {:>4}  {:>8}  {:<9} {:>8}  {:>6}  {:>10}  {:>8}  {:>8}",
            "ID", "PID", "STATE", "UPTIME", "CPU%", "RSS", "JOBS", "RESTARTS"
        ),
        Some(Colour::Dim),
    ));
    for w in &p.workers {
        let (pid, uptime, rss) = match w.pid {
            Some(pid) => (
                pid.to_string(),
                human_duration(w.uptime_ms),
                human_size(w.rss_bytes),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let cpu = w
            .pid
            .and_then(|pid| rates.cpu.get(&pid))
            .map_or("-".to_string(), |c| format!("{c:.1}"));
        lines.push((
            format!(
                "  {:>4}  {pid:>8}  {:<9} {uptime:>8}  {cpu:>6}  {rss:>10}  {:>8}  {:>8}",
                w.id,
                w.state.as_str(),
                w.jobs_done,
                w.restarts
            ),
            None,
        ));
    }
    lines.push((String::new(), None));
}

fn status(conn: &mut crate::client::Connection) -> Result<StatusReport, Failure> {
    match conn
        .call(&Request::Status { pool: None })
        .map_err(|e| Failure::client("top", e))?
    {
        Response::Status(r) => Ok(r),
        Response::Error { kind, message } => Err(Failure::daemon("top", kind, &message)),
        other => Err(Failure::unexpected("top", &other)),
    }
}

/// The terminal in raw mode on the alternate screen, restored on drop.
struct Terminal;

impl Terminal {
    fn enter() -> Result<Terminal, Failure> {
        let fail =
            |e: std::io::Error| Failure::new(1, format!("top: cannot set up the terminal: {e}"));
        terminal::enable_raw_mode().map_err(fail)?;
        let t = Terminal;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )
        .map_err(fail)?;
        Ok(t)
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = execute!(
            std::io::stdout(),
            cursor::Show,
            terminal::LeaveAlternateScreen
        );
        let _ = terminal::disable_raw_mode();
    }
}

/// `top`.
pub fn run(ctx: &Ctx, interval_ms: u64) -> Result<u8, Failure> {
    let mut conn = ctx.connect("top")?;
    if ctx.json {
        return crate::supervise::status(ctx, None);
    }
    let style = Style::stdout();
    if !std::io::stdout().is_terminal() {
        // One snapshot, rates over a short first interval.
        let mut sample = Sample::default();
        sample.next(&status(&mut conn)?, Instant::now());
        std::thread::sleep(Duration::from_millis(interval_ms.min(1000)));
        let report = status(&mut conn)?;
        let rates = sample.next(&report, Instant::now());
        let mut out = Out::new();
        for l in screen(
            &report,
            &rates,
            conn.daemon_pid,
            usize::MAX,
            usize::MAX,
            style,
        ) {
            out.line(&l)?;
        }
        out.flush()?;
        return Ok(0);
    }
    // SIGTERM and SIGHUP (the ssh session closed) end the loop, so that
    // the terminal is restored.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
        let _ = signal_hook::flag::register(sig, Arc::clone(&stop));
    }
    let events = follow_events(ctx);
    let _term = Terminal::enter()?;
    let interval = Duration::from_millis(interval_ms);
    let mut sample = Sample::default();
    let mut next_poll = Instant::now();
    let mut dirty = false;
    let mut last_draw = Instant::now() - MIN_REDRAW;
    let mut rates = Rates::default();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(0);
        }
        let now = Instant::now();
        let polled = now >= next_poll || (dirty && now >= last_draw + MIN_REDRAW);
        if polled {
            let report = status(&mut conn)?;
            let r = sample.next(&report, now);
            // Early redraws keep the last rates (a rate over 0.1 s jumps).
            if now >= next_poll || rates.done_per_sec.is_empty() {
                rates = r;
                next_poll = now + interval;
            }
            draw(&report, &rates, conn.daemon_pid, style)?;
            last_draw = now;
            dirty = false;
        }
        while events.try_recv().is_ok() {
            dirty = true;
        }
        let wait = if dirty {
            (last_draw + MIN_REDRAW).saturating_duration_since(Instant::now())
        } else {
            next_poll.saturating_duration_since(Instant::now())
        }
        .min(MIN_REDRAW);
        if event::poll(wait).map_err(|e| Failure::new(1, format!("top: {e}")))? {
            match event::read().map_err(|e| Failure::new(1, format!("top: {e}")))? {
                Event::Key(KeyEvent {
                    code, modifiers, ..
                }) => {
                    let ctrl_c =
                        code == KeyCode::Char('c') && modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(code, KeyCode::Char('q') | KeyCode::Esc) {
                        return Ok(0);
                    }
                }
                Event::Resize(..) => dirty = true,
                _ => {}
            }
        }
    }
}

/// A second connection streaming `events`; each one sends a `()` (the
/// stream ends quietly if the daemon refuses it or goes away: `top` then
/// just polls).
fn follow_events(ctx: &Ctx) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    if let Ok(mut c) = ctx.connect("top") {
        if c.send(&Request::Events).is_ok() {
            std::thread::spawn(move || {
                while let Ok(Response::Event(_)) = c.recv() {
                    if tx.send(()).is_err() {
                        break;
                    }
                }
            });
        }
    }
    rx
}

fn draw(report: &StatusReport, rates: &Rates, pid: u32, style: Style) -> Result<(), Failure> {
    let (w, h) = terminal::size().unwrap_or((80, 24));
    let lines = screen(report, rates, pid, w as usize, h as usize, style);
    let mut out = std::io::stdout().lock();
    let io = |e: std::io::Error| Failure::new(1, format!("top: cannot write to the terminal: {e}"));
    queue!(
        out,
        cursor::MoveTo(0, 0),
        terminal::Clear(terminal::ClearType::All)
    )
    .map_err(io)?;
    for (i, l) in lines.iter().enumerate() {
        queue!(out, cursor::MoveTo(0, i as u16)).map_err(io)?;
        out.write_all(l.as_bytes()).map_err(io)?;
    }
    out.flush().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc_proto::control::{PoolState, WorkerStatus};

    fn report() -> StatusReport {
        StatusReport {
            pools: vec![PoolStatus {
                name: "echo".into(),
                state: PoolState::Running,
                desired_workers: 2,
                queued: 3,
                running: 1,
                succeeded: 10,
                failed: 2,
                last_error: Some("worker 1: exit status 1\nmore".into()),
                workers: vec![
                    WorkerStatus {
                        id: 0,
                        pid: Some(42),
                        state: WorkerState::Busy,
                        uptime_ms: 192_000,
                        restarts: 1,
                        jobs_done: 7,
                        rss_bytes: 12 << 20,
                    },
                    WorkerStatus {
                        id: 1,
                        pid: None,
                        state: WorkerState::Backoff,
                        uptime_ms: 0,
                        restarts: 3,
                        jobs_done: 0,
                        rss_bytes: 0,
                    },
                ],
            }],
        }
    }

    #[test]
    fn screen_shows_pools_and_workers_within_bounds() {
        let mut rates = Rates::default();
        rates.done_per_sec.insert("echo".into(), 2.5);
        rates.cpu.insert(42, 12.25);
        let lines = screen(&report(), &rates, 7, 200, 100, Style::plain());
        let text = lines.join("\n");
        assert!(lines[0]
            .starts_with("jobvisord pid 7: 1 pools, 1/2 workers ready, 3 queued, 1 running"));
        assert!(text.contains("echo  running  workers 1/2  queued 3  running 1  done 2.5/s  succeeded 10  failed 2"), "{text}");
        assert!(
            text.contains("  last error: worker 1: exit status 1\n"),
            "{text}"
        );
        assert!(text.contains("busy"), "{text}");
        assert!(text.contains("12.2") && text.contains("12.0MiB"), "{text}");
        let narrow = screen(&report(), &rates, 7, 20, 3, Style::plain());
        assert_eq!(narrow.len(), 3);
        assert!(narrow.iter().all(|l| l.chars().count() <= 20));
    }

    #[test]
    fn cpu_ticks_of_this_process() {
        assert!(cpu_ticks(std::process::id()).is_some());
        assert!(cpu_ticks(u32::MAX).is_none());
    }
}
