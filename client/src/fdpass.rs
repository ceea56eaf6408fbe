//! Large payloads on the control socket: file descriptors passed with
//! `SCM_RIGHTS` next to the frames that describe them
//! ([`Request::SubmitFd`](ipc_proto::control::Request::SubmitFd),
//! [`Response::JobFd`](ipc_proto::control::Response::JobFd)).
//!
//! Framing rule, used by both sides: a descriptor is attached to the first
//! byte of the frame that refers to it, one per frame. A `recvmsg` returns
//! a message's descriptors with its first bytes and stops at the end of
//! that message (it may start with earlier bytes, never go on to later
//! ones), so a reader that collects the descriptors of every `recvmsg` into
//! a FIFO finds, for each such frame, its descriptor at the head of the
//! FIFO when the frame has been decoded. Every read of a control socket goes
//! through [`recv`]: a plain `read` would make the kernel close descriptors
//! it carries.

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags, UnixAddr};
use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

/// A reader keeps at most this many received, not yet claimed descriptors;
/// more is a protocol violation (frames carry one each).
pub const MAX_PENDING_FDS: usize = 8;

/// Reads into `buf` like `read`, moving any descriptors that came with the
/// bytes to the back of `fds` (close-on-exec). Errors with `InvalidData`
/// when descriptors were truncated or `fds` would exceed
/// [`MAX_PENDING_FDS`].
pub fn recv(sock: impl AsFd, buf: &mut [u8], fds: &mut VecDeque<OwnedFd>) -> io::Result<usize> {
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; MAX_PENDING_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<UnixAddr>(
            sock.as_fd().as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => break m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let n = msg.bytes;
    // Take ownership of every received descriptor first, so that none
    // leaks whatever is wrong with the message.
    let cmsgs = msg
        .cmsgs()
        .map_err(|_| bad("too many file descriptors in one message"))?;
    let mut received = Vec::new();
    for c in cmsgs {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel just installed `fd` in our table for
                // us (SCM_RIGHTS); nothing else owns it.
                received.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if fds.len() + received.len() > MAX_PENDING_FDS {
        return Err(bad("more file descriptors than frames that claim them"));
    }
    fds.extend(received);
    Ok(n)
}

/// Writes `bytes` (at least one) with `fd` attached to the first byte.
/// Returns how many bytes were written (the rest goes out with plain
/// writes; the descriptor is sent once the first byte is).
pub fn send(sock: impl AsFd, bytes: &[u8], fd: &impl AsFd) -> io::Result<usize> {
    send_fds(sock, bytes, &[fd.as_fd()])
}

/// Like [`send`], with several descriptors attached to the first byte (in
/// this order).
pub fn send_fds(
    sock: impl AsFd,
    bytes: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> io::Result<usize> {
    debug_assert!(!bytes.is_empty());
    let raw: Vec<std::os::fd::RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    loop {
        match sendmsg::<UnixAddr>(
            sock.as_fd().as_raw_fd(),
            &[IoSlice::new(bytes)],
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => return Ok(n),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// A sealed memfd holding `data`: the receiver may rely on its size and
/// contents never changing.
pub fn sealed_memfd(name: &std::ffi::CStr, data: &[u8]) -> io::Result<OwnedFd> {
    sealed_memfd_filled(name, |mut file| file.write_all(data)).map(Into::into)
}

/// A memfd that `fill` writes from its offset 0, then sealed against any
/// change and rewound (readers that use the shared offset start at the
/// beginning).
pub fn sealed_memfd_filled(
    name: &std::ffi::CStr,
    fill: impl FnOnce(&std::fs::File) -> io::Result<()>,
) -> io::Result<std::fs::File> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    let file = std::fs::File::from(fd);
    fill(&file)?;
    seal(&file)?;
    std::io::Seek::rewind(&mut &file)?;
    Ok(file)
}

/// The seals of a memfd (`F_GET_SEALS`); `None` for a descriptor that
/// cannot carry seals (anything but a memfd or another shmem file).
pub fn seals(fd: &impl AsFd) -> Option<nix::fcntl::SealFlag> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    let bits = fcntl(fd.as_fd(), FcntlArg::F_GET_SEALS).ok()?;
    Some(SealFlag::from_bits_retain(bits))
}

/// `F_SEAL_FUTURE_WRITE` (Linux 5.1): no new write through any descriptor
/// or writable mapping; mappings made before keep writing. (Not in nix.)
pub const F_SEAL_FUTURE_WRITE: i32 = 0x0010;

/// Whether a memfd may be handed to another process to map for reading
/// without a copy: sealed against shrinking (a mapping never faults) and
/// against writes through the receiver (`F_SEAL_WRITE`, or
/// `F_SEAL_FUTURE_WRITE`, with which its owner may still write through a
/// mapping it made before).
pub fn shareable_for_reading(fd: &impl AsFd) -> bool {
    use nix::fcntl::SealFlag;
    seals(fd).is_some_and(|s| {
        s.contains(SealFlag::F_SEAL_SHRINK)
            && (s.contains(SealFlag::F_SEAL_WRITE) || s.bits() & F_SEAL_FUTURE_WRITE != 0)
    })
}

/// Checks a client's output buffer: a memfd open read-write, sealed
/// against shrinking but open to writes (so whoever writes the output into
/// it, mapping it, never faults, and may grow it unless `F_SEAL_GROW`).
pub fn check_output_buffer(fd: &impl AsFd) -> Result<(), String> {
    use nix::fcntl::{OFlag, SealFlag};
    const HOW: &str = "pass a memfd opened read-write, sealed with F_SEAL_SHRINK only";
    let flags = nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| format!("cannot inspect the output buffer's descriptor: {e}"))?;
    if OFlag::from_bits_retain(flags) & OFlag::O_ACCMODE != OFlag::O_RDWR {
        return Err(format!(
            "the output buffer is not open for reading and writing; {HOW}"
        ));
    }
    let Some(seals) = seals(fd) else {
        return Err(format!("the output buffer is not a memfd; {HOW}"));
    };
    if !seals.contains(SealFlag::F_SEAL_SHRINK) {
        return Err(format!(
            "the output buffer is not sealed against shrinking; {HOW}"
        ));
    }
    if seals.contains(SealFlag::F_SEAL_WRITE) || seals.bits() & F_SEAL_FUTURE_WRITE != 0 {
        return Err(format!("the output buffer is sealed against writes; {HOW}"));
    }
    Ok(())
}

/// Seals a memfd against any change of size or contents.
pub fn seal(fd: &impl AsFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    fcntl(
        fd.as_fd(),
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(())
}

/// Takes a payload descriptor received from a peer that should hold at
/// least `len` bytes. Only regular files and memfds are accepted (a pipe or
/// a socket could block the reader forever).
pub fn payload_file(fd: OwnedFd, len: u64, what: &str) -> Result<(std::fs::File, usize), String> {
    // Open for reading at all? (A write-only or `O_PATH` descriptor would
    // only fail later, in the store's copy or a worker's arena fill.)
    let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| format!("cannot inspect the {what}'s file descriptor: {e}"))?;
    let flags = nix::fcntl::OFlag::from_bits_retain(flags);
    if flags.contains(nix::fcntl::OFlag::O_PATH)
        || flags & nix::fcntl::OFlag::O_ACCMODE == nix::fcntl::OFlag::O_WRONLY
    {
        return Err(format!(
            "the {what}'s file descriptor is not open for reading; pass a file opened for reading"
        ));
    }
    let file = std::fs::File::from(fd);
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat the {what}'s file descriptor: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!(
            "the {what}'s file descriptor is not a regular file or memfd; pass a file"
        ));
    }
    if meta.len() < len {
        return Err(format!(
            "the {what} file holds {} bytes, fewer than the {len} announced (did it shrink?)",
            meta.len()
        ));
    }
    let len = usize::try_from(len).map_err(|_| format!("the {what} is too large"))?;
    Ok((file, len))
}

/// Reads the first `len` bytes of a payload descriptor received from a
/// peer: a regular file or memfd (a pipe or socket is refused: it could
/// block the reader); one that holds fewer bytes is an error. Reads at
/// offset 0 (`pread`), whatever the descriptor's own offset.
pub fn read_payload(fd: OwnedFd, len: u64, what: &str) -> Result<Vec<u8>, String> {
    let (file, len) = payload_file(fd, len, what)?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(len)
        .map_err(|_| format!("cannot allocate {len} bytes for the {what}"))?;
    buf.resize(len, 0);
    file.read_exact_at(&mut buf, 0).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            format!("the {what} file ended before {len} bytes (did it shrink?)")
        } else {
            format!("cannot read the {what}'s file descriptor: {e}")
        }
    })?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn descriptors_travel_with_their_frame_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let one = sealed_memfd(c"one", b"first payload").unwrap();
        let two = sealed_memfd(c"two", b"second").unwrap();
        assert_eq!(send(&a, b"AAAA", &one).unwrap(), 4);
        (&a).write_all(b"plain").unwrap();
        assert_eq!(send(&a, b"BB", &two).unwrap(), 2);
        // A read that returns a descriptor ends with the message that
        // carried it (earlier plain bytes may come along, later ones never).
        let mut fds = VecDeque::new();
        let mut buf = [0u8; 64];
        for (bytes, fds_so_far) in [(&b"AAAA"[..], 1), (b"plainBB", 2)] {
            let n = recv(&b, &mut buf, &mut fds).unwrap();
            assert_eq!(&buf[..n], bytes);
            assert_eq!(
                fds.len(),
                fds_so_far,
                "after {:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let first = read_payload(fds.pop_front().unwrap(), 13, "input").unwrap();
        assert_eq!(first, b"first payload");
        let second = read_payload(fds.pop_front().unwrap(), 6, "input").unwrap();
        assert_eq!(second, b"second");
    }

    #[test]
    fn sealed_memfd_cannot_change() {
        let fd = sealed_memfd(c"x", b"abc").unwrap();
        let file = std::fs::File::from(fd);
        assert!((&file).write_all(b"zz").is_err());
        assert!(file.set_len(1).is_err());
        assert_eq!(read_payload(file.into(), 3, "input").unwrap(), b"abc");
    }

    #[test]
    fn short_or_unsuitable_payloads_are_refused() {
        let fd = sealed_memfd(c"short", b"abc").unwrap();
        let err = read_payload(fd, 4, "input").unwrap_err();
        assert!(err.contains("fewer than the 4 announced"), "{err}");
        let (r, _w) = nix::unistd::pipe().unwrap();
        let err = read_payload(r, 1, "input").unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        // The same check stands before a large input is kept as a file.
        let fd = sealed_memfd(c"short", b"abc").unwrap();
        let err = payload_file(fd, 4, "input").unwrap_err();
        assert!(err.contains("fewer than the 4 announced"), "{err}");
        let (r, _w) = nix::unistd::pipe().unwrap();
        let err = payload_file(r, 1, "input").unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        // Write-only and O_PATH descriptors of a regular file.
        let path = std::env::temp_dir().join(format!("jv-fdpass-{}", std::process::id()));
        std::fs::write(&path, b"abcd").unwrap();
        let w = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let err = payload_file(w.into(), 4, "input").unwrap_err();
        assert!(err.contains("not open for reading"), "{err}");
        let o = nix::fcntl::open(
            &path,
            nix::fcntl::OFlag::O_PATH,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        let err = payload_file(o, 4, "input").unwrap_err();
        assert!(err.contains("not open for reading"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn read_is_exact_at_any_offset_and_size() {
        // With the descriptor's own offset moved: reads start at 0
        // regardless.
        for n in [0usize, 1, 4095, 4097, (5 << 20) + 3] {
            let data: Vec<u8> = (0..n).map(|i| (i * 7 + n) as u8).collect();
            let fd = sealed_memfd(c"data", &data).unwrap();
            let mut f = std::fs::File::from(fd);
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(n as u64 / 2)).unwrap();
            let got = read_payload(f.into(), n as u64, "input").unwrap();
            assert!(got == data, "{n} bytes");
        }
    }

    #[test]
    fn too_many_unclaimed_descriptors_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        let fd = sealed_memfd(c"x", b"x").unwrap();
        for _ in 0..=MAX_PENDING_FDS {
            send(&a, b"x", &fd).unwrap();
        }
        let mut fds = VecDeque::new();
        let mut buf = [0u8; 1];
        let mut err = None;
        for _ in 0..=MAX_PENDING_FDS {
            if let Err(e) = recv(&b, &mut buf, &mut fds) {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err.unwrap().kind(), io::ErrorKind::InvalidData);
        assert!(fds.len() <= MAX_PENDING_FDS);
    }
}
