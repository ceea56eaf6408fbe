//! Worker protocol 2 tests of the serving loop: descriptors on a real
//! socket pair (the test plays the daemon, attaching memfds to frames with
//! `SCM_RIGHTS`), the worker served on a thread.

use std::fs::File;
use std::io::{IoSlice, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::Duration;

use ipc_proto::worker::{FromWorker, Job, Payload, ToWorker};
use ipc_proto::{decode, encode_frame, FrameDecoder, MAX_FRAME_LEN, WORKER_PROTOCOL_FDS};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};

use crate::fds::FdSocket;
use crate::serve::serve_stream;
use crate::{handlers, ServeConfig, ServeError, Stop};

const LIMIT: usize = 1024;

/// The daemon's side of a protocol-2 worker (echo) served on a thread.
struct Daemon {
    jobs: UnixStream,
    results: UnixStream,
    decoder: FrameDecoder,
    done: Receiver<Result<Stop, ServeError>>,
}

impl Daemon {
    fn start() -> Daemon {
        let (jobs, worker_jobs) = UnixStream::pair().unwrap();
        let (worker_results, results) = UnixStream::pair().unwrap();
        let (tx, done) = mpsc::channel();
        thread::spawn(move || {
            let stream = FdSocket(File::from(OwnedFd::from(worker_jobs)));
            let config = ServeConfig::default().inline_limit(LIMIT);
            let _ = tx.send(serve_stream(
                stream,
                worker_results,
                config,
                WORKER_PROTOCOL_FDS,
                handlers::echo_into,
            ));
        });
        results
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut d = Daemon {
            jobs,
            results,
            decoder: FrameDecoder::new(MAX_FRAME_LEN),
            done,
        };
        let ready = d.recv();
        assert!(
            matches!(ready, FromWorker::Ready { protocol_version, .. } if protocol_version == WORKER_PROTOCOL_FDS),
            "{ready:?}"
        );
        d
    }

    /// Sends one frame with `fds` attached to its first byte.
    fn send(&self, msg: &ToWorker, fds: &[&OwnedFd]) {
        let mut buf = Vec::new();
        encode_frame(msg, &mut buf).unwrap();
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
        let n = sendmsg::<UnixAddr>(
            self.jobs.as_raw_fd(),
            &[IoSlice::new(&buf)],
            cmsgs,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert_eq!(n, buf.len());
    }

    fn recv(&mut self) -> FromWorker {
        loop {
            if let Some(frame) = self.decoder.next_frame().unwrap() {
                return decode(frame).unwrap();
            }
            let n = self.results.read(self.decoder.unfilled()).unwrap();
            assert!(n > 0, "worker closed its result stream");
            self.decoder.filled(n);
        }
    }
}

fn job(id: u64, input: Payload) -> Job {
    Job {
        id,
        attempt: 1,
        deadline_ms: None,
        input,
    }
}

/// A memfd holding `data`, with `seals` added.
fn memfd(data: &[u8], seals: SealFlag) -> OwnedFd {
    let fd = memfd_create(
        "jobvisor-unit",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .unwrap();
    let file = File::from(fd);
    file.write_all_at(data, 0).unwrap();
    let fd = OwnedFd::from(file);
    if !seals.is_empty() {
        fcntl(&fd, FcntlArg::F_ADD_SEALS(seals)).unwrap();
    }
    fd
}

fn sealed_input(data: &[u8]) -> OwnedFd {
    memfd(
        data,
        SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE,
    )
}

fn read_all(fd: &OwnedFd, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    File::from(fd.try_clone().unwrap())
        .read_exact_at(&mut buf, 0)
        .unwrap();
    buf
}

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

#[test]
fn descriptor_inputs_and_output_buffers_round_trip_without_copies_back() {
    let mut d = Daemon::start();
    // One output buffer, reused (as the Python client does) across jobs of
    // growing and shrinking sizes, with inputs in fresh sealed memfds and
    // one reused input memfd.
    let out = memfd(b"", SealFlag::F_SEAL_SHRINK);
    let reused = sealed_input(&bytes(3 << 20, 9));
    let mut id = 0;
    for len in [0, LIMIT, LIMIT + 1, 1 << 20, 3 << 20, 5000] {
        id += 1;
        let data = bytes(len, id as u8);
        let input = sealed_input(&data);
        let len64 = len as u64;
        d.send(
            &ToWorker::JobOut(job(id, Payload::Fd { len: len64 })),
            &[&input, &out],
        );
        match d.recv() {
            FromWorker::Done {
                id: got,
                output: Payload::Inline(b),
            } => {
                assert_eq!(got, id);
                assert!(len <= LIMIT, "{len} bytes came back inline");
                assert_eq!(b.0, data);
            }
            FromWorker::Done {
                id: got,
                output: Payload::Fd { len: l },
            } => {
                assert_eq!((got, l), (id, len64));
                assert!(len > LIMIT, "{len} bytes came back in the buffer");
                assert_eq!(read_all(&out, len), data, "{len} bytes");
            }
            other => panic!("{len} bytes: {other:?}"),
        }
        // The reused input, read from its mapping of the job before.
        id += 1;
        let len = 2 << 20;
        d.send(
            &ToWorker::JobOut(job(id, Payload::Fd { len: len as u64 })),
            &[&reused, &out],
        );
        let FromWorker::Done {
            output: Payload::Fd { len: l },
            ..
        } = d.recv()
        else {
            panic!("no descriptor output");
        };
        assert_eq!(l, len as u64);
        assert_eq!(read_all(&out, len), bytes(3 << 20, 9)[..len]);
    }
    // The buffer grew as needed, never past what was asked (twice the last
    // length at most).
    let size = File::from(out.try_clone().unwrap())
        .metadata()
        .unwrap()
        .len();
    assert!((3 << 20..=6 << 20).contains(&size), "{size}");
    // A plain Job with a descriptor input answers through the arena's
    // rules (no arena here: inline).
    let data = bytes(4000, 1);
    let input = sealed_input(&data);
    d.send(
        &ToWorker::Job(job(100, Payload::Fd { len: 4000 })),
        &[&input],
    );
    assert!(
        matches!(d.recv(), FromWorker::Done { id: 100, output: Payload::Inline(b) } if b.0 == data)
    );
    d.send(&ToWorker::Shutdown, &[]);
    assert!(matches!(d.done.recv().unwrap(), Ok(Stop::Shutdown)));
}

#[test]
fn an_input_memfd_that_could_change_fails_its_job_only() {
    let mut d = Daemon::start();
    for (seals, what) in [
        (SealFlag::empty(), "unsealed"),
        (SealFlag::F_SEAL_WRITE, "shrinkable"),
        (SealFlag::F_SEAL_SHRINK, "writable"),
    ] {
        let input = memfd(&bytes(5000, 3), seals);
        d.send(&ToWorker::Job(job(1, Payload::Fd { len: 5000 })), &[&input]);
        match d.recv() {
            FromWorker::Failed { id: 1, error } => assert!(
                error.contains("not sealed against shrinking and writing"),
                "{what}: {error}"
            ),
            other => panic!("{what}: {other:?}"),
        }
    }
    // Shorter than announced.
    let input = sealed_input(b"abc");
    d.send(&ToWorker::Job(job(2, Payload::Fd { len: 4 })), &[&input]);
    match d.recv() {
        FromWorker::Failed { id: 2, error } => {
            assert!(error.contains("smaller than the payload"), "{error}")
        }
        other => panic!("{other:?}"),
    }
    // The worker is fine afterwards.
    let input = sealed_input(b"fine");
    d.send(&ToWorker::Job(job(3, Payload::Fd { len: 4 })), &[&input]);
    assert!(
        matches!(d.recv(), FromWorker::Done { id: 3, output: Payload::Inline(b) } if b.0 == b"fine")
    );
}

#[test]
fn a_frame_without_its_descriptors_is_a_protocol_error() {
    let d = Daemon::start();
    d.send(
        &ToWorker::JobOut(job(1, Payload::Inline(b"x".to_vec().into()))),
        &[],
    );
    match d.done.recv_timeout(Duration::from_secs(20)).unwrap() {
        Err(ServeError::Protocol(why)) => assert!(why.contains("without its"), "{why}"),
        other => panic!("{other:?}"),
    }
    let _ = d.jobs.as_fd();
}
