//! Shared-memory tests of the serving loop: a real memfd, mapped by the test
//! (playing the daemon) and by the worker's [`Arena`], and the worker served
//! on a thread over socket pairs.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ipc_proto::worker::{FromWorker, Job, JobId, Payload, ToWorker};
use ipc_proto::{decode, encode_frame, FrameDecoder, MAX_FRAME_LEN};
use nix::sys::memfd::{memfd_create, MFdFlags};

use crate::{serve_with_output, Arena, JobContext, Output, ServeConfig, ServeError, Stop};

const DEADLINE: Duration = Duration::from_secs(20);
const KIB: usize = 1024;
/// A small arena: input region 0..32 KiB, output region 32..64 KiB.
const ARENA: usize = 64 * KIB;
const LIMIT: usize = KIB;
const OUT_START: u64 = 32 * 1024;

#[path = "../tests/support/mem.rs"]
mod mem;
use mem::{pattern, release_of, Mem};

/// A fresh memfd arena of `size` bytes and the daemon's mapping of it.
fn new_arena(size: usize) -> (OwnedFd, Mem) {
    let fd = memfd_create("jobvisor-unit-arena", MFdFlags::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&fd, size as i64).unwrap();
    let mem = Mem::map(&fd, size);
    (fd, mem)
}

/// The worker's own mapping of the arena `fd`.
fn worker_arena(fd: &OwnedFd) -> Arena {
    // SAFETY: the test plays a daemon that follows the protocol.
    unsafe { Arena::map(fd.as_fd()) }.unwrap()
}

/// The daemon's side of a worker served on a thread, with an arena.
struct Daemon {
    jobs: Option<UnixStream>,
    results: UnixStream,
    decoder: FrameDecoder,
    done: Receiver<Result<Stop, ServeError>>,
    mem: Mem,
    /// The worker's mapping's base address, to check zero-copy inputs.
    worker_base: usize,
}

type Handler = Box<dyn FnMut(&JobContext, &[u8], &mut Output) -> Result<(), String> + Send>;

impl Daemon {
    fn start(handler: Handler) -> Daemon {
        Daemon::start_with(ARENA, |c| c, handler)
    }

    fn start_with(
        size: usize,
        configure: impl FnOnce(ServeConfig) -> ServeConfig,
        handler: Handler,
    ) -> Daemon {
        let (fd, mem) = new_arena(size);
        let arena = worker_arena(&fd);
        let worker_base = arena.ptr_at(0) as usize;
        let config = configure(
            ServeConfig::default()
                .arena(Some(arena))
                .inline_limit(LIMIT),
        );
        let (jobs, worker_jobs) = UnixStream::pair().unwrap();
        let (worker_results, results) = UnixStream::pair().unwrap();
        let (tx, done) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(serve_with_output(
                worker_jobs,
                worker_results,
                config,
                handler,
            ));
        });
        let mut d = Daemon {
            jobs: Some(jobs),
            results,
            decoder: FrameDecoder::new(MAX_FRAME_LEN),
            done,
            mem,
            worker_base,
        };
        assert!(matches!(d.recv(), FromWorker::Ready { .. }));
        d
    }

    fn send(&mut self, msgs: &[ToWorker]) {
        let mut buf = Vec::new();
        for m in msgs {
            encode_frame(m, &mut buf).unwrap();
        }
        self.jobs.as_ref().unwrap().write_all(&buf).unwrap();
    }

    /// The next message within `timeout`, or `None`.
    fn recv_within(&mut self, timeout: Duration) -> Option<FromWorker> {
        let until = Instant::now() + timeout;
        loop {
            if let Some(frame) = self.decoder.next_frame().unwrap() {
                return Some(decode(frame).unwrap());
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.results.set_read_timeout(Some(left)).unwrap();
            match self.results.read(self.decoder.unfilled()) {
                Ok(0) => panic!("worker closed its result stream"),
                Ok(n) => self.decoder.filled(n),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn recv(&mut self) -> FromWorker {
        self.recv_within(DEADLINE)
            .expect("no message from the worker")
    }

    /// Job `id` with `input` written at `offset` of the input region.
    fn shm_job(&self, id: JobId, offset: u64, input: &[u8]) -> ToWorker {
        job(id, self.mem.put(offset, input))
    }

    /// The next message, which must be `Done` for `id`: its payload, and
    /// the bytes (read from the output region for `Shm`, which must lie in
    /// it).
    fn done(&mut self, want: JobId) -> (Payload, Vec<u8>) {
        match self.recv() {
            FromWorker::Done { id, output } if id == want => {
                let bytes = self.mem.bytes(&output);
                (output, bytes)
            }
            other => panic!("expected Done for job {want}, got {other:?}"),
        }
    }

    fn release(&mut self, payload: &Payload) {
        let release = release_of(payload)
            .unwrap_or_else(|| panic!("not a shared-memory payload: {payload:?}"));
        self.send(&[release]);
    }

    fn outcome(&self) -> Result<Stop, ServeError> {
        self.done
            .recv_timeout(DEADLINE)
            .expect("serve did not return")
    }

    fn protocol_error(&self) -> String {
        match self.outcome() {
            Err(e @ ServeError::Protocol(_)) => {
                assert_eq!(e.exit_code(), 2);
                e.to_string()
            }
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }
}

fn job(id: JobId, input: Payload) -> ToWorker {
    ToWorker::Job(Job {
        id,
        attempt: 1,
        deadline_ms: None,
        input,
    })
}

fn inline_job(id: JobId, input: &[u8]) -> ToWorker {
    job(id, Payload::Inline(input.into()))
}

/// Input = decimal length of the output wanted; output = `pattern(len, id)`
/// returned as a `Vec` (the `run`/`run_with` path).
fn vec_handler() -> Handler {
    let mut h = crate::serve::vec_handler(|ctx: &JobContext, input: &[u8]| {
        let len: usize = std::str::from_utf8(input).unwrap().parse().unwrap();
        Ok(pattern(len, ctx.id() as u8))
    });
    Box::new(move |ctx, input, out| h(ctx, input, out))
}

/// Same, written with `Output::reserve` in one go (the known-size path).
fn reserve_handler() -> Handler {
    Box::new(|ctx, input, out| {
        let len: usize = std::str::from_utf8(input).unwrap().parse().unwrap();
        out.reserve(len)
            .copy_from_slice(&pattern(len, ctx.id() as u8));
        Ok(())
    })
}

/// Same, appended in chunks of 1000 bytes (the append-as-you-go path).
fn append_handler() -> Handler {
    Box::new(|ctx, input, out| {
        let len: usize = std::str::from_utf8(input).unwrap().parse().unwrap();
        for chunk in pattern(len, ctx.id() as u8).chunks(1000) {
            out.write_all(chunk);
        }
        Ok(())
    })
}

/// The three handlers above, named: the same outputs by each output path.
fn every_handler() -> [(&'static str, Handler); 3] {
    [
        ("vec", vec_handler()),
        ("reserve", reserve_handler()),
        ("append", append_handler()),
    ]
}

fn want(len: usize) -> Vec<u8> {
    len.to_string().into_bytes()
}

#[test]
fn shm_input_is_read_in_place() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = Arc::clone(&seen);
    let mut d = Daemon::start(Box::new(move |_, input, out| {
        seen2
            .lock()
            .unwrap()
            .push((input.as_ptr() as usize, input.len()));
        out.write_all(&(input.iter().map(|&b| u64::from(b)).sum::<u64>()).to_le_bytes());
        Ok(())
    }));
    let input = pattern(10_000, 7);
    let sum: u64 = input.iter().map(|&b| u64::from(b)).sum();
    let j = d.shm_job(1, 4096, &input);
    d.send(&[j]);
    assert_eq!(d.done(1).1, sum.to_le_bytes());
    // Empty, at the very end of the input region: valid.
    let j = d.shm_job(2, OUT_START, b"");
    d.send(&[j, inline_job(3, b"abc")]);
    assert_eq!(d.done(2).1, 0u64.to_le_bytes());
    assert_eq!(d.done(3).1, 294u64.to_le_bytes());
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen[0],
        (d.worker_base + 4096, 10_000),
        "not the mapping itself"
    );
    assert_eq!(seen[1].1, 0);
    d.send(&[ToWorker::Shutdown]);
    assert!(matches!(d.outcome(), Ok(Stop::Shutdown)));
}

#[test]
fn outputs_over_the_limit_come_back_in_the_output_region() {
    for (name, handler) in every_handler() {
        let mut d = Daemon::start(handler);
        let mut id = 0;
        for len in [0, 1, LIMIT - 1, LIMIT, LIMIT + 1, 5000, 20_000, 32 * KIB] {
            id += 1;
            d.send(&[inline_job(id, &want(len))]);
            let (payload, bytes) = d.done(id);
            assert_eq!(bytes, pattern(len, id as u8), "{name}: {len} bytes");
            match payload {
                Payload::Inline(_) => assert!(len <= LIMIT, "{name}: {len} bytes inline"),
                Payload::Shm { offset, .. } => {
                    assert!(len > LIMIT, "{name}: {len} bytes in shm");
                    assert_eq!(offset % 64, 0);
                    d.release(&payload);
                }
                Payload::Fd { .. } => panic!("{name}: a descriptor output, never asked for"),
            }
        }
        d.send(&[ToWorker::Shutdown]);
        assert!(matches!(d.outcome(), Ok(Stop::Shutdown)), "{name}");
    }
}

#[test]
fn reserve_writes_in_place_and_shrinking_goes_inline() {
    let reserved_at = Arc::new(Mutex::new(0usize));
    let reserved_at2 = Arc::clone(&reserved_at);
    let mut d = Daemon::start(Box::new(move |ctx, _, out| {
        match ctx.id() {
            // Known size: the returned buffer is the arena slot itself.
            1 => {
                let dst = out.reserve(5000);
                *reserved_at2.lock().unwrap() = dst.as_ptr() as usize;
                dst.fill(b'x');
                assert!(out.is_shared());
            }
            // A hint over the limit, then appends: in place too.
            2 => {
                out.size_hint(3000);
                assert!(out.is_shared());
                out.write_all(&[b'a'; 1500]);
                out.write_all(&[b'b'; 1500]);
            }
            // Reserved big, then cut under the limit: inline after all.
            3 => {
                out.reserve(8000).fill(b'y');
                out.truncate(10);
            }
            // An error after writing into the arena frees the slot.
            4 => {
                out.reserve(30_000).fill(0);
                return Err("changed my mind".into());
            }
            _ => {
                // `std::io::Write` works too.
                write!(out, "{}", "z".repeat(20_000)).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }));
    d.send(&[inline_job(1, b"")]);
    let (p1, bytes) = d.done(1);
    let Payload::Shm { offset, len: 5000 } = p1 else {
        panic!("{p1:?}")
    };
    assert_eq!(
        *reserved_at.lock().unwrap(),
        d.worker_base + offset as usize
    );
    assert_eq!(bytes, vec![b'x'; 5000]);
    d.release(&p1);
    d.send(&[inline_job(2, b"")]);
    let (p2, bytes) = d.done(2);
    assert_eq!(&bytes[..1500], &[b'a'; 1500]);
    assert_eq!(&bytes[1500..], &[b'b'; 1500]);
    d.release(&p2);
    d.send(&[inline_job(3, b"")]);
    assert_eq!(
        d.done(3),
        (Payload::Inline(vec![b'y'; 10].into()), vec![b'y'; 10])
    );
    d.send(&[inline_job(4, b"")]);
    assert!(matches!(d.recv(), FromWorker::Failed { id: 4, .. }));
    // 20 KiB would not fit beside a leaked 30 KiB slot of a 32 KiB region.
    d.send(&[inline_job(5, b"")]);
    let (p5, bytes) = d.done(5);
    assert!(matches!(p5, Payload::Shm { len: 20_000, .. }), "{p5:?}");
    assert_eq!(bytes, vec![b'z'; 20_000]);
    d.release(&p5);
    d.send(&[ToWorker::Shutdown]);
    assert!(matches!(d.outcome(), Ok(Stop::Shutdown)));
}

#[test]
fn release_frees_the_slot_for_reuse() {
    let mut d = Daemon::start(vec_handler());
    d.send(&[inline_job(1, &want(20_000))]);
    let (p1, b1) = d.done(1);
    assert_eq!(b1, pattern(20_000, 1));
    d.release(&p1);
    // 2 × 20 KiB do not fit in 32 KiB: only the release makes room.
    d.send(&[inline_job(2, &want(20_000))]);
    let (p2, b2) = d.done(2);
    assert_eq!(b2, pattern(20_000, 2));
    let (Payload::Shm { offset: o1, .. }, Payload::Shm { offset: o2, .. }) = (&p1, &p2) else {
        panic!("{p1:?} {p2:?}")
    };
    assert_eq!(o1, o2, "the released space is reused");
    d.release(&p2);
    d.send(&[ToWorker::Shutdown]);
    assert!(matches!(d.outcome(), Ok(Stop::Shutdown)));
}

#[test]
fn release_of_a_range_not_handed_out_is_a_protocol_error() {
    // Never handed out.
    let mut d = Daemon::start(vec_handler());
    d.send(&[ToWorker::Release {
        offset: OUT_START,
        len: 5000,
    }]);
    let e = d.protocol_error();
    assert!(e.contains("not an output this worker handed out"), "{e}");

    // Right offset, wrong length.
    let mut d = Daemon::start(vec_handler());
    d.send(&[inline_job(1, &want(5000))]);
    let (p, _) = d.done(1);
    let Payload::Shm { offset, len } = p else {
        panic!("{p:?}")
    };
    d.send(&[ToWorker::Release {
        offset,
        len: len - 1,
    }]);
    let e = d.protocol_error();
    assert!(e.contains("the output there is 5000 bytes"), "{e}");

    // Released twice.
    let mut d = Daemon::start(vec_handler());
    d.send(&[inline_job(1, &want(5000))]);
    let (p, _) = d.done(1);
    d.release(&p);
    d.release(&p);
    let e = d.protocol_error();
    assert!(e.contains("Release of 5000 bytes"), "{e}");
}

#[test]
fn bad_shm_input_references_are_protocol_errors() {
    let ran = Arc::new(Mutex::new(0));
    for (offset, len, what) in [
        (OUT_START, 10, "in the output region"),
        (OUT_START - 10, 20, "straddling the regions"),
        (1 << 40, 1, "beyond the arena"),
        (u64::MAX, 2, "overflowing"),
        (10, u64::MAX, "overflowing length"),
    ] {
        let ran2 = Arc::clone(&ran);
        let mut d = Daemon::start(Box::new(move |_, _, _| {
            *ran2.lock().unwrap() += 1;
            Ok(())
        }));
        d.send(&[job(1, Payload::Shm { offset, len })]);
        let e = d.protocol_error();
        assert!(
            e.contains("job 1 has a bad shared-memory input"),
            "{what}: {e}"
        );
    }
    assert_eq!(*ran.lock().unwrap(), 0, "a handler ran on a bad reference");
}

#[test]
fn a_full_output_region_waits_for_release() {
    for (name, handler) in every_handler() {
        let mut d = Daemon::start(handler);
        // Prefetched together: job 2 runs right after job 1.
        d.send(&[inline_job(1, &want(20_000)), inline_job(2, &want(20_000))]);
        let (p1, b1) = d.done(1);
        assert!(matches!(p1, Payload::Shm { .. }), "{name}: {p1:?}");
        assert_eq!(b1, pattern(20_000, 1));
        // Job 2 cannot have its output until job 1's is released.
        assert_eq!(d.recv_within(Duration::from_millis(300)), None, "{name}");
        d.release(&p1);
        let (p2, b2) = d.done(2);
        assert!(matches!(p2, Payload::Shm { .. }), "{name}: {p2:?}");
        assert_eq!(b2, pattern(20_000, 2), "{name}");
        d.release(&p2);
        d.send(&[ToWorker::Shutdown]);
        assert!(matches!(d.outcome(), Ok(Stop::Shutdown)), "{name}");
    }
}

#[test]
fn a_wait_for_room_ends_on_timeout_cancel_or_end_of_stream() {
    // Timeout: the output goes inline.
    let mut d = Daemon::start_with(
        ARENA,
        |c| c.release_wait(Duration::from_millis(200)),
        reserve_handler(),
    );
    d.send(&[inline_job(1, &want(20_000)), inline_job(2, &want(20_000))]);
    let (p1, _) = d.done(1);
    let since = Instant::now();
    let (p2, b2) = d.done(2);
    assert!(since.elapsed() >= Duration::from_millis(150));
    assert!(matches!(p2, Payload::Inline(_)), "{p2:?}");
    assert_eq!(b2, pattern(20_000, 2));
    // The region is still usable once released.
    d.release(&p1);
    d.send(&[inline_job(3, &want(20_000))]);
    let (p3, b3) = d.done(3);
    assert!(matches!(p3, Payload::Shm { .. }), "{p3:?}");
    assert_eq!(b3, pattern(20_000, 3));

    // Cancel of the waiting job: it stops waiting; its output is still
    // reported (inline).
    for handler in [vec_handler(), append_handler()] {
        let mut d = Daemon::start(handler);
        d.send(&[inline_job(1, &want(20_000)), inline_job(2, &want(20_000))]);
        d.done(1);
        assert_eq!(d.recv_within(Duration::from_millis(100)), None);
        d.send(&[ToWorker::Cancel { id: 2 }]);
        let (p2, b2) = d.done(2);
        assert!(matches!(p2, Payload::Inline(_)), "{p2:?}");
        assert_eq!(b2, pattern(20_000, 2));
    }

    // End of the job stream: serve returns at once.
    let mut d = Daemon::start(vec_handler());
    d.send(&[inline_job(1, &want(20_000)), inline_job(2, &want(20_000))]);
    d.done(1);
    assert_eq!(d.recv_within(Duration::from_millis(100)), None);
    let since = Instant::now();
    d.jobs = None;
    assert!(matches!(d.outcome(), Ok(Stop::Eof)));
    assert!(since.elapsed() < Duration::from_secs(5));
}

#[test]
fn an_output_larger_than_the_output_region() {
    for (name, handler) in every_handler() {
        let mut d = Daemon::start(handler);
        // Over 32 KiB: inline, since it fits in a frame.
        d.send(&[inline_job(1, &want(40_000))]);
        let (p, b) = d.done(1);
        assert!(matches!(p, Payload::Inline(_)), "{name}: {p:?}");
        assert_eq!(b, pattern(40_000, 1), "{name}");
        // Nothing was left allocated: a full-region output still fits.
        d.send(&[inline_job(2, &want(32 * KIB))]);
        let (p, b) = d.done(2);
        assert!(matches!(p, Payload::Shm { .. }), "{name}: {p:?}");
        assert_eq!(b, pattern(32 * KIB, 2), "{name}");
        d.release(&p);
        d.send(&[ToWorker::Shutdown]);
        assert!(matches!(d.outcome(), Ok(Stop::Shutdown)));
    }

    // Over the frame limit too: the job fails, the worker goes on.
    let mut d = Daemon::start(Box::new(|ctx, _, out| {
        if ctx.id() == 1 {
            out.reserve(MAX_FRAME_LEN).fill(1);
        } else {
            out.write_all(b"still here");
        }
        Ok(())
    }));
    d.send(&[inline_job(1, b""), inline_job(2, b"")]);
    match d.recv() {
        FromWorker::Failed { id: 1, error } => assert_eq!(
            error,
            format!(
                "output of {MAX_FRAME_LEN} bytes exceeds shm_size/2 (32768 bytes) and the frame limit"
            )
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(d.done(2).1, b"still here");
}

#[test]
fn without_an_arena_everything_is_inline() {
    let (jobs, worker_jobs) = UnixStream::pair().unwrap();
    let (worker_results, mut results) = UnixStream::pair().unwrap();
    results.set_read_timeout(Some(DEADLINE)).unwrap();
    let config = ServeConfig::default().inline_limit(LIMIT);
    let server = thread::spawn(move || {
        serve_with_output(worker_jobs, worker_results, config, append_handler())
    });
    let mut buf = Vec::new();
    encode_frame(&inline_job(1, &want(5000)), &mut buf).unwrap();
    (&jobs).write_all(&buf).unwrap();
    let mut decoder = FrameDecoder::new(MAX_FRAME_LEN);
    let mut msgs = Vec::new();
    while msgs.len() < 2 {
        if let Some(frame) = decoder.next_frame().unwrap() {
            msgs.push(decode::<FromWorker>(frame).unwrap());
            continue;
        }
        let n = results.read(decoder.unfilled()).unwrap();
        assert!(n > 0);
        decoder.filled(n);
    }
    assert!(matches!(msgs[0], FromWorker::Ready { .. }));
    assert_eq!(
        msgs[1],
        FromWorker::Done {
            id: 1,
            output: Payload::Inline(pattern(5000, 1).into())
        }
    );
    buf.clear();
    encode_frame(
        &ToWorker::Release {
            offset: OUT_START,
            len: 5000,
        },
        &mut buf,
    )
    .unwrap();
    (&jobs).write_all(&buf).unwrap();
    // A Release without an arena: protocol error.
    match server.join().unwrap() {
        Err(ServeError::Protocol(why)) => assert!(why.contains("no shared-memory arena"), "{why}"),
        other => panic!("{other:?}"),
    }
}
