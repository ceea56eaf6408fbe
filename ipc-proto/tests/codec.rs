//! Round-trip and malformed-input tests of frames and messages.

use ipc_proto::control::{ErrorKind, Request, Response};
use ipc_proto::worker::{FromWorker, Job, Payload, ToWorker};
use ipc_proto::{decode, encode_frame, Bytes, FrameDecoder, FrameError, MAX_FRAME_LEN};

fn samples_to_worker() -> Vec<ToWorker> {
    vec![
        ToWorker::Job(Job {
            id: 1,
            attempt: 1,
            deadline_ms: None,
            input: Payload::Inline(Bytes(Vec::new())),
        }),
        ToWorker::Job(Job {
            id: u64::MAX,
            attempt: 3,
            deadline_ms: Some(1_700_000_000_000),
            input: Payload::Inline(Bytes((0..=255u8).cycle().take(100_000).collect())),
        }),
        ToWorker::Job(Job {
            id: 7,
            attempt: 2,
            deadline_ms: None,
            input: Payload::Shm {
                offset: 4096,
                len: 1 << 30,
            },
        }),
        ToWorker::Cancel { id: 9 },
        ToWorker::Shutdown,
    ]
}

fn samples_from_worker() -> Vec<FromWorker> {
    vec![
        FromWorker::Ready {
            protocol_version: ipc_proto::PROTOCOL_VERSION,
            pid: 1234,
        },
        FromWorker::Done {
            id: 5,
            output: Payload::Inline(Bytes(b"hello".to_vec())),
        },
        FromWorker::Failed {
            id: 6,
            error: "boom: ünïcode".into(),
        },
        FromWorker::Raised {
            id: 8,
            error: "Traceback (most recent call last):\nValueError: boom".into(),
            output: Payload::Shm {
                offset: 1 << 20,
                len: 300,
            },
        },
    ]
}

#[test]
fn round_trip_through_one_stream() {
    let mut wire = Vec::new();
    for m in samples_to_worker() {
        encode_frame(&m, &mut wire).unwrap();
    }
    // Feed the stream in awkward chunk sizes.
    for chunk in [1usize, 3, 7, 4096, usize::MAX] {
        let mut dec = FrameDecoder::new(MAX_FRAME_LEN);
        let mut got = Vec::new();
        for piece in wire.chunks(chunk.min(wire.len())) {
            dec.extend(piece);
            while let Some(f) = dec.next_frame().unwrap() {
                got.push(decode::<ToWorker>(f).unwrap());
            }
        }
        dec.finish().unwrap();
        assert_eq!(got, samples_to_worker(), "chunk size {chunk}");
    }
}

#[test]
fn round_trip_from_worker_and_control() {
    for m in samples_from_worker() {
        let mut wire = Vec::new();
        encode_frame(&m, &mut wire).unwrap();
        assert_eq!(decode::<FromWorker>(&wire[4..]).unwrap(), m);
    }
    let reqs = vec![
        Request::Hello {
            protocol_version: 1,
        },
        Request::Status { pool: None },
        Request::Scale {
            pool: "echo".into(),
            workers: 4,
        },
        Request::Shutdown { now: true },
    ];
    for m in reqs {
        let mut wire = Vec::new();
        encode_frame(&m, &mut wire).unwrap();
        assert_eq!(decode::<Request>(&wire[4..]).unwrap(), m);
    }
    let r = Response::Error {
        kind: ErrorKind::NotFound,
        message: "no pool".into(),
    };
    let mut wire = Vec::new();
    encode_frame(&r, &mut wire).unwrap();
    assert_eq!(decode::<Response>(&wire[4..]).unwrap(), r);
}

#[test]
fn truncated_stream_is_reported() {
    let mut wire = Vec::new();
    encode_frame(&ToWorker::Shutdown, &mut wire).unwrap();
    encode_frame(&ToWorker::Cancel { id: 300 }, &mut wire).unwrap();
    let mut dec = FrameDecoder::new(1024);
    dec.extend(&wire[..wire.len() - 1]);
    assert!(dec.next_frame().unwrap().is_some());
    assert!(dec.next_frame().unwrap().is_none());
    assert!(matches!(dec.finish(), Err(FrameError::Truncated { .. })));
    // A truncated payload inside a whole frame is a decode error.
    let mut bad = Vec::new();
    encode_frame(
        &FromWorker::Failed {
            id: 1,
            error: "abcdef".into(),
        },
        &mut bad,
    )
    .unwrap();
    let payload = &bad[4..bad.len() - 2];
    assert!(decode::<FromWorker>(payload).is_err());
}

#[test]
fn oversized_frame_is_refused_before_allocating() {
    let mut dec = FrameDecoder::new(1024);
    dec.extend(&(u32::MAX).to_le_bytes());
    assert_eq!(
        dec.next_frame(),
        Err(FrameError::TooLarge {
            len: u32::MAX as usize,
            max: 1024
        })
    );
    // The decoder did not grow to the announced size.
    assert!(dec.unfilled().len() < 1 << 20);
    let mut dec = FrameDecoder::new(1024);
    dec.extend(&1025u32.to_le_bytes());
    assert!(matches!(dec.next_frame(), Err(FrameError::TooLarge { .. })));
    let mut dec = FrameDecoder::new(1024);
    dec.extend(&1024u32.to_le_bytes());
    assert_eq!(dec.next_frame(), Ok(None));
}

#[test]
fn garbage_and_unknown_variants_are_errors_not_panics() {
    // Unknown enum variant index.
    assert!(decode::<ToWorker>(&[99]).is_err());
    assert!(decode::<FromWorker>(&[4, 0]).is_err());
    assert!(decode::<Request>(&[250, 1]).is_err());
    // Empty payload.
    assert!(decode::<ToWorker>(&[]).is_err());
    // Trailing bytes after a valid message.
    let mut wire = Vec::new();
    encode_frame(&ToWorker::Shutdown, &mut wire).unwrap();
    let mut payload = wire[4..].to_vec();
    payload.push(0);
    assert!(decode::<ToWorker>(&payload).is_err());
    // A byte string claiming far more bytes than the frame holds: an error,
    // and no allocation of the claimed size.
    let mut forged = vec![0u8]; // FromWorker::Done
    forged.push(5); // id
    forged.push(0); // Payload::Inline
    forged.push(252); // varint u32 marker
    forged.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(decode::<FromWorker>(&forged).is_err());
    // Invalid UTF-8 in a string.
    let bad_utf8 = [2u8, 1, 2, 0xff, 0xfe];
    assert!(decode::<FromWorker>(&bad_utf8).is_err());
    // Pseudo-random garbage never panics.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..20_000 {
        let n = (x % 40) as usize;
        let mut buf = Vec::with_capacity(n);
        for _ in 0..n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.push(x as u8);
        }
        let _ = decode::<ToWorker>(&buf);
        let _ = decode::<FromWorker>(&buf);
        let _ = decode::<Request>(&buf);
        let _ = decode::<Response>(&buf);
        let mut dec = FrameDecoder::new(64);
        dec.extend(&buf);
        while let Ok(Some(_)) = dec.next_frame() {}
    }
}

#[test]
fn large_frame_reassembles() {
    let big = ToWorker::Job(Job {
        id: 1,
        attempt: 1,
        deadline_ms: None,
        input: Payload::Inline(Bytes(vec![0xAB; 3 << 20])),
    });
    let mut wire = Vec::new();
    encode_frame(&big, &mut wire).unwrap();
    let mut dec = FrameDecoder::new(MAX_FRAME_LEN);
    let mut off = 0;
    let mut got = None;
    while off < wire.len() {
        let spare = dec.unfilled();
        let n = spare.len().min(wire.len() - off).min(100_000);
        spare[..n].copy_from_slice(&wire[off..off + n]);
        dec.filled(n);
        off += n;
        if let Some(f) = dec.next_frame().unwrap() {
            got = Some(decode::<ToWorker>(f).unwrap());
        }
    }
    assert_eq!(got, Some(big));
}

/// A peer that announces the largest frame and then sends a trickle holds
/// only about what it sent: the buffer never grows to a declared length.
#[test]
fn a_declared_length_allocates_nothing_until_the_bytes_arrive() {
    let mut dec = FrameDecoder::new(MAX_FRAME_LEN);
    let mut sent = 0usize;
    let header = (MAX_FRAME_LEN as u32).to_le_bytes();
    dec.extend(&header);
    sent += header.len();
    assert!(dec.next_frame().unwrap().is_none());
    assert!(dec.capacity() <= 128 << 10, "{} bytes held", dec.capacity());
    // 1 MiB of the 64 MiB: at most about twice that is held.
    let chunk = vec![7u8; 4096];
    for _ in 0..256 {
        dec.extend(&chunk);
        sent += chunk.len();
        assert!(dec.next_frame().unwrap().is_none());
    }
    assert!(
        dec.capacity() <= 2 * sent + (64 << 10),
        "{} bytes held after {sent} received",
        dec.capacity()
    );
}

/// A decoder's limit can be raised after a greeting: a frame over the small
/// limit is refused before, accepted after.
#[test]
fn the_limit_can_be_raised() {
    let mut wire = Vec::new();
    encode_frame(&Request::Wait { ids: vec![1; 1000] }, &mut wire).unwrap();
    let mut dec = FrameDecoder::new(256);
    dec.extend(&wire);
    assert!(matches!(dec.next_frame(), Err(FrameError::TooLarge { .. })));
    let mut dec = FrameDecoder::new(256);
    dec.set_max_len(MAX_FRAME_LEN);
    dec.extend(&wire);
    assert!(dec.next_frame().unwrap().is_some());
}

/// The descriptor-carrying variants were appended: the wire indices of the
/// older ones (documented in docs/PROTOCOL.md) did not move.
#[test]
fn descriptor_variants_come_last_and_keep_older_indices() {
    use ipc_proto::control::{JobDoc, JobOptions, JobState};
    let tag = |r: &Request| {
        let mut wire = Vec::new();
        encode_frame(r, &mut wire).unwrap();
        assert_eq!(decode::<Request>(&wire[4..]).unwrap(), *r);
        wire[4]
    };
    assert_eq!(tag(&Request::Wait { ids: vec![1] }), 7);
    assert_eq!(tag(&Request::Events), 11);
    let fd = Request::SubmitFd {
        pool: "echo".into(),
        len: 64 << 20,
        options: JobOptions::default(),
        wait: true,
    };
    assert_eq!(tag(&fd), 12);
    let mut wire = Vec::new();
    let doc = JobDoc {
        id: 3,
        pool: "echo".into(),
        state: JobState::Succeeded,
        priority: 0,
        key: None,
        created_ms: 1,
        finished_ms: Some(2),
        attempts: vec![],
        output: None,
        error: None,
    };
    let r = Response::JobFd {
        doc,
        output_len: 5 << 20,
    };
    encode_frame(&r, &mut wire).unwrap();
    assert_eq!(wire[4], 8, "JobFd after Event (7)");
    assert_eq!(decode::<Response>(&wire[4..]).unwrap(), r);
}

/// The byte-exact examples of the messages added later (docs/PROTOCOL.md
/// section 6 and 13 show them): appended variants keep the earlier indices.
#[test]
fn appended_variants_have_the_documented_bytes() {
    let mut wire = Vec::new();
    encode_frame(
        &FromWorker::Raised {
            id: 7,
            error: "boom".into(),
            output: Payload::Inline(Bytes(b"E".to_vec())),
        },
        &mut wire,
    )
    .unwrap();
    assert_eq!(
        wire,
        [0x0a, 0, 0, 0, 0x03, 0x07, 0x04, b'b', b'o', b'o', b'm', 0x00, 0x01, b'E']
    );
    let mut wire = Vec::new();
    encode_frame(
        &Response::PoolFailed {
            pool: "py".into(),
            error: "x".into(),
        },
        &mut wire,
    )
    .unwrap();
    assert_eq!(wire, [0x06, 0, 0, 0, 0x09, 0x02, b'p', b'y', 0x01, b'x']);
    assert_eq!(
        decode::<Response>(&wire[4..]).unwrap(),
        Response::PoolFailed {
            pool: "py".into(),
            error: "x".into()
        }
    );
}
