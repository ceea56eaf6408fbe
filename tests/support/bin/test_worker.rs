//! `jobvisor-test-worker MODE [ARGS…]`: a worker with misbehaviours on
//! demand, for the black-box tests. Built with the real `worker` library.
//!
//! Modes:
//! - `echo`: output = input.
//! - `say`: prints `said INPUT` on stdout and `warned INPUT` on stderr,
//!   then echoes.
//! - `chaos PCT`: aborts (SIGABRT) on the first attempt of about PCT % of
//!   inputs (chosen by a hash of the input), echoes otherwise.
//! - `sleep`: input = milliseconds; sleeps that long, giving up early when
//!   cancelled. `sleep-stubborn`: never looks at cancellation.
//! - `garbage`: on the first attempt, input `garbage` makes it write garbage
//!   on its result pipe and input `oversized` a frame header announcing
//!   4 GiB; otherwise echo.
//! - `memhog`: input = MiB to allocate and keep; output `ok`.
//! - `mutex DIR`: input = `key:ms`; holds `DIR/key` (mkdir) while sleeping;
//!   a failed mkdir means two jobs with one key ran at once: it is recorded
//!   in `DIR/violations`.
//! - `sem DIR LIMIT`: input = ms; holds a token file in `DIR/tokens` while
//!   sleeping; more than LIMIT tokens at once is recorded in
//!   `DIR/violations`.
//! - `pid`: output = the worker's pid.
//! - `fail`: the job fails with the input as error text.
//! - `badshm`: on the first attempt answers with a shared-memory reference
//!   far outside its arena; echoes otherwise.
//! - `done-then-die`: on the first attempt writes the input into the
//!   arena's output region, answers `Done` with that reference and aborts
//!   at once; echoes otherwise.
//! - `fail-big`: input = MiB; the job fails with an error text that long
//!   (`BEGIN`, then two-byte `é`s, then `END`).
//! - `stop-spawns COMM` (not a worker: a hostile process for the security
//!   tests, run as a pool's user): sends SIGSTOP to every new process it is
//!   allowed to signal, guessing pids from `/proc/sys/kernel/ns_last_pid`.
//!   One still named COMM once stopped (a child of the daemon between its
//!   credential change and its `execve`) is kept stopped and printed as
//!   `held PID`; any other is continued at once. Runs until killed.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn record_violation(dir: &std::path::Path, what: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("violations"))
    {
        let _ = writeln!(f, "{what}");
    }
}

fn sleep_ms(ctx: &worker::JobContext, ms: u64, stubborn: bool) -> Result<(), String> {
    let end = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < end {
        if !stubborn && ctx.is_cancelled() {
            return Err("cancelled".into());
        }
        std::thread::sleep(Duration::from_millis(2).min(end - Instant::now()));
    }
    Ok(())
}

fn text(input: &[u8]) -> String {
    String::from_utf8_lossy(input).trim().to_string()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().cloned().unwrap_or_default();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    match mode.as_str() {
        "echo" => worker::run(|input| Ok(input.to_vec())),
        "say" => worker::run(|input| {
            let t = text(input);
            println!("said {t}");
            eprintln!("warned {t}");
            Ok(input.to_vec())
        }),
        "chaos" => {
            let pct: u64 = arg(1).parse().unwrap_or(1);
            worker::run_with(move |ctx, input| {
                if ctx.attempt() == 1 && fnv(input) % 10_000 < pct * 100 {
                    std::process::abort();
                }
                Ok(input.to_vec())
            })
        }
        "sleep" | "sleep-stubborn" => {
            let stubborn = mode == "sleep-stubborn";
            worker::run_with(move |ctx, input| {
                let ms: u64 = text(input).parse().map_err(|e| format!("bad ms: {e}"))?;
                sleep_ms(ctx, ms, stubborn)?;
                Ok(format!("slept {ms}").into_bytes())
            })
        }
        "garbage" => worker::run_with(|ctx, input| {
            if ctx.attempt() == 1 && (input == b"garbage" || input == b"oversized") {
                let bytes: &[u8] = if input == b"garbage" {
                    b"\x05\x00\x00\x00\xff\xfe\xfd\xfc\xfb"
                } else {
                    b"\xff\xff\xff\xff"
                };
                // SAFETY: writes a byte slice to fd 4, which the daemon gave
                // us; the library has nothing buffered at this point.
                unsafe {
                    libc::write(4, bytes.as_ptr().cast(), bytes.len());
                }
                std::thread::sleep(Duration::from_secs(30));
            }
            Ok(input.to_vec())
        }),
        "memhog" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            worker::run(move |input| {
                let mib: usize = text(input).parse().map_err(|e| format!("bad MiB: {e}"))?;
                let mut v = vec![0u8; mib << 20];
                for i in (0..v.len()).step_by(4096) {
                    v[i] = 1;
                }
                hoard.push(v);
                Ok(b"ok".to_vec())
            })
        }
        "mutex" => {
            let dir = PathBuf::from(arg(1));
            worker::run_with(move |ctx, input| {
                let t = text(input);
                let (key, ms) = t.split_once(':').ok_or("want key:ms")?;
                let ms: u64 = ms.parse().map_err(|e| format!("bad ms: {e}"))?;
                let lock = dir.join(format!("key-{key}"));
                let held = std::fs::create_dir(&lock).is_ok();
                if !held {
                    record_violation(&dir, &format!("key {key} held twice (job {})", ctx.id()));
                }
                let r = sleep_ms(ctx, ms, false);
                if held {
                    let _ = std::fs::remove_dir(&lock);
                }
                r.map(|_| b"ok".to_vec())
            })
        }
        "sem" => {
            let dir = PathBuf::from(arg(1));
            let limit: usize = arg(2).parse().unwrap_or(1);
            let tokens = dir.join("tokens");
            let _ = std::fs::create_dir_all(&tokens);
            worker::run_with(move |ctx, input| {
                let ms: u64 = text(input).parse().map_err(|e| format!("bad ms: {e}"))?;
                let me = tokens.join(format!("{}-{}", std::process::id(), ctx.id()));
                std::fs::write(&me, b"").map_err(|e| e.to_string())?;
                let n = std::fs::read_dir(&tokens).map(|d| d.count()).unwrap_or(0);
                if n > limit {
                    record_violation(&dir, &format!("{n} holders at once (limit {limit})"));
                }
                let r = sleep_ms(ctx, ms, false);
                let _ = std::fs::remove_file(&me);
                r.map(|_| b"ok".to_vec())
            })
        }
        // Tries to shrink its arena (fd 5) to nothing, then echoes; the
        // input "shrink" gets what ftruncate said instead.
        "shrink" => worker::run(|input| {
            // SAFETY: plain system call on fd 5, the arena the daemon gave us.
            let r = unsafe { libc::ftruncate(5, 0) };
            let said = match r {
                0 => "done".to_string(),
                _ => format!("refused ({})", std::io::Error::last_os_error()),
            };
            Ok(match input {
                b"shrink" => format!("ftruncate: {said}").into_bytes(),
                _ => input.to_vec(),
            })
        }),
        "fail-big" => worker::run(|input| {
            let mib: usize = text(input).parse().map_err(|e| format!("bad MiB: {e}"))?;
            let mut e = String::with_capacity((mib << 20) + 8);
            e.push_str("BEGIN");
            while e.len() + 2 <= (mib << 20) {
                e.push('é');
            }
            e.push_str("END");
            Err(e)
        }),
        "stop-spawns" => stop_spawns(&arg(1)),
        "pid" => worker::run(|_| Ok(std::process::id().to_string().into_bytes())),
        "fail" => worker::run(|input| Err(text(input))),
        "badshm" => worker::run_with(|ctx, input| {
            if ctx.attempt() == 1 {
                let mut frame = Vec::new();
                let lie = ipc_proto::worker::FromWorker::Done {
                    id: ctx.id(),
                    output: ipc_proto::worker::Payload::Shm {
                        offset: u64::MAX - 10,
                        len: 100,
                    },
                };
                ipc_proto::encode_frame(&lie, &mut frame).expect("encodes");
                // SAFETY: writes a byte slice to fd 4, which the daemon gave
                // us; the library has nothing buffered at this point.
                unsafe {
                    libc::write(4, frame.as_ptr().cast(), frame.len());
                }
                std::thread::sleep(Duration::from_secs(30));
            }
            Ok(input.to_vec())
        }),
        "half-then-die" => worker::run_with_output(|ctx, input, out| {
            // The first attempt writes half its output (into the client's
            // output buffer, with protocol 2) and dies mid-way.
            out.size_hint(input.len());
            if ctx.attempt() == 1 {
                out.write_all(&input[..input.len() / 2]);
                out.write_all(b"garbage from a dying attempt");
                std::process::abort();
            }
            out.write_all(input);
            Ok(())
        }),
        "fd-lie" => worker::run_with(|ctx, input| {
            if ctx.attempt() == 1 {
                // Claims an output in an output buffer far larger than any
                // (worker protocol 2), whether or not the job came with one.
                let mut frame = Vec::new();
                let lie = ipc_proto::worker::FromWorker::Done {
                    id: ctx.id(),
                    output: ipc_proto::worker::Payload::Fd { len: 1 << 40 },
                };
                ipc_proto::encode_frame(&lie, &mut frame).expect("encodes");
                // SAFETY: writes a byte slice to fd 4, which the daemon gave
                // us; the library has nothing buffered at this point.
                unsafe {
                    libc::write(4, frame.as_ptr().cast(), frame.len());
                }
                std::thread::sleep(Duration::from_secs(30));
            }
            Ok(input.to_vec())
        }),
        "done-then-die" => worker::run_with(|ctx, input| {
            if ctx.attempt() == 1 {
                // Puts the output in the arena's output region itself,
                // answers `Done` with that reference, and dies at once:
                // the daemon copies the output after its worker is gone.
                let size: u64 = std::env::var("JOBVISOR_SHM_SIZE")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .expect("JOBVISOR_SHM_SIZE");
                let offset = ipc_proto::arena::ArenaLayout::split(size).output.start;
                let mut done = 0;
                while done < input.len() {
                    // SAFETY: writes from a live byte slice into fd 5, the
                    // arena the daemon gave us (its output half is ours).
                    let n = unsafe {
                        libc::pwrite(
                            5,
                            input[done..].as_ptr().cast(),
                            input.len() - done,
                            (offset + done as u64) as libc::off_t,
                        )
                    };
                    assert!(n > 0, "pwrite to the arena failed");
                    done += n as usize;
                }
                let mut frame = Vec::new();
                let answer = ipc_proto::worker::FromWorker::Done {
                    id: ctx.id(),
                    output: ipc_proto::worker::Payload::Shm {
                        offset,
                        len: input.len() as u64,
                    },
                };
                ipc_proto::encode_frame(&answer, &mut frame).expect("encodes");
                let mut sent = 0;
                while sent < frame.len() {
                    // SAFETY: writes a byte slice to fd 4, which the daemon
                    // gave us; the library has nothing buffered now.
                    let n = unsafe {
                        libc::write(4, frame[sent..].as_ptr().cast(), frame.len() - sent)
                    };
                    assert!(n > 0, "write to fd 4 failed");
                    sent += n as usize;
                }
                std::process::abort();
            }
            Ok(input.to_vec())
        }),
        other => {
            eprintln!("jobvisor-test-worker: unknown mode {other:?}");
            ExitCode::from(2)
        }
    }
}

/// The `stop-spawns` mode: see the module docs.
fn stop_spawns(comm: &str) -> ExitCode {
    use std::io::Read;
    let me = std::process::id() as i32;
    let mut held: Vec<i32> = Vec::new();
    let mut last = std::fs::File::open("/proc/sys/kernel/ns_last_pid").expect("ns_last_pid");
    let mut buf = [0u8; 32];
    let stdout = std::io::stdout();
    loop {
        use std::io::Seek;
        let _ = last.rewind();
        let n = last.read(&mut buf).unwrap_or(0);
        let Ok(top) = std::str::from_utf8(&buf[..n])
            .unwrap_or("")
            .trim()
            .parse::<i32>()
        else {
            continue;
        };
        for pid in (top - 4).max(2)..=top + 2 {
            if pid == me || held.contains(&pid) {
                continue;
            }
            // SAFETY: kill with integer arguments.
            if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
                continue; // not ours to signal (still root's), or no such pid
            }
            // Wait (briefly) until it has stopped, then see what it is.
            let end = Instant::now() + Duration::from_millis(20);
            let mut stopped_as = None;
            while Instant::now() < end {
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    break;
                };
                let name = stat
                    .split_once('(')
                    .and_then(|(_, r)| r.rsplit_once(')'))
                    .map(|(c, _)| c.to_string());
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next());
                if matches!(state, Some("T") | Some("t")) {
                    stopped_as = name;
                    break;
                }
                if matches!(state, Some("Z") | Some("X")) {
                    break;
                }
                std::thread::yield_now();
            }
            if stopped_as.as_deref() == Some(comm) {
                held.push(pid);
                let mut out = stdout.lock();
                let _ = writeln!(out, "held {pid}");
                let _ = out.flush();
            } else {
                // SAFETY: kill with integer arguments.
                unsafe {
                    libc::kill(pid, libc::SIGCONT);
                }
            }
        }
    }
}
