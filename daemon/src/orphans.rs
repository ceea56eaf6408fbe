//! No survivors: descendants of a worker that left its process group
//! (`setsid`, a double fork) die with their worker, and none outlives the
//! daemon.
//!
//! The reaper SIGKILLs an exited worker's process group, which misses a
//! descendant that moved to a session of its own. Such a process is
//! re-parented to the daemon, a child subreaper, as soon as its parent dies
//! (at the latest when the worker itself dies). So every child of the
//! daemon that is not a live worker is an adopted orphan, and this module
//! decides, when asked, which of them may live.
//!
//! # Attribution
//! An adopted orphan may live only while it belongs to a live worker, and
//! it belongs to the worker whose *session* it is in: every worker leads a
//! session of its own (`setsid` in `spawn.rs`), so its descendants are in
//! that session unless they left it. That is something the process cannot
//! forge: `setsid` only creates a new session (whose id is the caller's own
//! pid, never a worker's), and `setpgid` only moves within the caller's
//! session, so no process can claim the session of another worker. A
//! session id also cannot name the wrong process: the kernel keeps a pid
//! number reserved while a session or group of that id has a member, so
//! while an orphan is in session S, no new worker can be given pid S. The
//! environment (`JOBVISOR_POOL`/`JOBVISOR_WORKER_ID`) is *not* used: any
//! process can `execve` itself with whatever environment it likes.
//!
//! A process that left its worker's session cannot be attributed to any
//! worker, and is killed. An orphan still in the session of a worker that
//! has exited is killed too. One still in a live worker's session is left
//! alone (a worker may legitimately run background processes); it is
//! judged again when that worker exits.
//!
//! The kill is race-free: the victims are the daemon's own unreaped
//! children, whose pids cannot be reused until the daemon waits for them;
//! a victim that leads its process group has that group killed as well
//! (the group id is reserved while its leader is unreaped).
//!
//! # When
//! Off the hot path, with no polling and no timer: [`sweep`] runs after the
//! reaper collected an exited worker or an adopted orphan. The latter
//! matters: when a killed orphan dies, *its* children are re-parented to
//! the daemon, and the sweep after its reaping catches them, down to the
//! last descendant. The cost is reading `/proc/self/task/*/children` and
//! the `stat` of each child that is not a known live worker (none, usually).
//! At exit, [`kill_all_and_reap`] kills every remaining child and waits for
//! each, including those adopted while it waits.
//!
//! Where cgroups can be delegated (systemd `Delegate=yes`), a cgroup per
//! worker with `cgroup.kill` would not need attribution at all; that is not
//! done here (see docs/ARCHITECTURE.md).

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

/// What `/proc/PID/stat` says about a process.
struct Stat {
    state: char,
    pgrp: u32,
    session: u32,
}

fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything: the
    // fields start after the last ')'.
    let mut f = text.rsplit_once(')')?.1.split_whitespace();
    let state = f.next()?.chars().next()?;
    let _ppid = f.next()?;
    let pgrp = f.next()?.parse().ok()?;
    let session = f.next()?.parse().ok()?;
    Some(Stat {
        state,
        pgrp,
        session,
    })
}

/// The daemon's children, from `/proc/self/task/*/children` (every thread:
/// the kernel gives adopted orphans to a thread of its choosing), or, on a
/// kernel without that file, from a scan of `/proc`.
fn children() -> Vec<u32> {
    let mut out = Vec::new();
    let mut have_file = false;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            if let Ok(text) = std::fs::read_to_string(t.path().join("children")) {
                have_file = true;
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    if have_file {
        return out;
    }
    let me = std::process::id().to_string();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().nth(1)? == me));
            if ppid == Some(true) {
                out.push(pid);
            }
        }
    }
    out
}

fn kill_child(pid: u32, st: &Stat) {
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    if st.pgrp == pid {
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
}

/// Kills every child of the daemon that is neither a live worker nor in a
/// live worker's session; `live_worker(pid)` says whether `pid` is a
/// worker that has not exited. Returns the pids killed (for the log).
pub fn sweep(live_worker: impl Fn(u32) -> bool) -> Vec<u32> {
    let mut killed = Vec::new();
    for pid in children() {
        if live_worker(pid) {
            continue;
        }
        let Some(st) = stat(pid) else {
            continue; // gone meanwhile
        };
        if st.state == 'Z' || st.state == 'X' || live_worker(st.session) {
            continue; // exited (reaped next), or attributed to a live worker
        }
        kill_child(pid, &st);
        killed.push(pid);
    }
    killed
}

/// At exit, once every worker is gone: kills every child left and reaps
/// it, until the daemon has no child at all (each reaped one may have
/// handed its own children to the daemon meanwhile). SIGKILL cannot be
/// caught, so this waits only for the kernel to finish the kills.
pub fn kill_all_and_reap() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    loop {
        let killed = sweep(|_| false);
        if !killed.is_empty() {
            crate::warn!("killed worker descendants left at exit: pids {killed:?}");
        }
        match waitpid(None::<Pid>, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::StillAlive) => return,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return, // ECHILD: no child left
        }
    }
}
