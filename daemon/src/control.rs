//! The control socket: binding it safely, and the per-client connection
//! state (frame decoder, output buffer) the reactor drives.
//!
//! Binding never steals a live daemon's socket: an existing path is probed
//! with `connect`; only `ECONNREFUSED` (nobody listening: a stale socket
//! left by a dead daemon) lets us unlink and rebind. A path that exists but
//! is not a socket is refused, not deleted. The socket is created under a
//! restrictive umask and then set to `socket_mode`, so there is no window
//! where others could connect.

use ipc_proto::control::{Request, Response};
use ipc_proto::{decode, encode_frame, FrameDecoder};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

/// Largest request a client may send (submits carry input inline).
pub const MAX_REQUEST: usize = ipc_proto::MAX_FRAME_LEN;

/// Binds the control socket at `path` with permissions `mode`.
pub fn bind(path: &Path, mode: u32) -> anyhow::Result<mio::net::UnixListener> {
    use anyhow::Context;
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).with_context(|| {
                format!(
                    "cannot create the control socket's directory {}",
                    dir.display()
                )
            })?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                anyhow::bail!(
                    "control socket path {} exists and is not a socket; move it away or set daemon.control_socket",
                    path.display()
                );
            }
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => anyhow::bail!(
                    "control socket {} is in use by a running daemon; stop it first or set another daemon.control_socket",
                    path.display()
                ),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).with_context(|| {
                        format!("cannot remove stale control socket {}", path.display())
                    })?;
                    crate::info!("removed stale control socket {}", path.display());
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot probe existing control socket {}", path.display())
                    })
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot inspect {}", path.display()));
        }
    }
    // Create the socket owner-only, then widen to the configured mode.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let res = mio::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = res.with_context(|| format!("cannot bind control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod control socket {}", path.display()))?;
    Ok(listener)
}

/// One connected control client.
pub struct Client {
    /// The socket.
    pub stream: mio::net::UnixStream,
    decoder: FrameDecoder,
    out: Vec<u8>,
    /// Bytes of `out` already written.
    written: usize,
    /// `Hello` received and accepted.
    pub greeted: bool,
    /// Close once `out` is flushed.
    pub closing: bool,
    /// Currently registered for writable events.
    pub want_write: bool,
    /// Not read from until its output drains (backpressure).
    pub paused: bool,
}

/// Result of reading from a client.
pub enum ReadOutcome {
    /// Requests decoded (possibly none yet).
    Requests(Vec<Request>),
    /// The client hung up (after the returned requests).
    Closed(Vec<Request>),
    /// The client violated the protocol; drop it.
    Broken(String),
}

impl Client {
    /// Wraps an accepted stream.
    pub fn new(stream: mio::net::UnixStream) -> Client {
        Client {
            stream,
            decoder: FrameDecoder::new(MAX_REQUEST),
            out: Vec::new(),
            written: 0,
            greeted: false,
            closing: false,
            want_write: false,
            paused: false,
        }
    }

    /// Reads everything available and decodes whole requests.
    pub fn read(&mut self) -> ReadOutcome {
        let mut reqs = Vec::new();
        loop {
            match self.stream.read(self.decoder.unfilled()) {
                Ok(0) => {
                    if let Err(e) = self.drain(&mut reqs) {
                        return ReadOutcome::Broken(e);
                    }
                    return ReadOutcome::Closed(reqs);
                }
                Ok(n) => {
                    self.decoder.filled(n);
                    if let Err(e) = self.drain(&mut reqs) {
                        return ReadOutcome::Broken(e);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return ReadOutcome::Requests(reqs)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return ReadOutcome::Broken(e.to_string()),
            }
        }
    }

    fn drain(&mut self, reqs: &mut Vec<Request>) -> Result<(), String> {
        while let Some(frame) = self.decoder.next_frame().map_err(|e| e.to_string())? {
            reqs.push(decode::<Request>(frame).map_err(|e| e.to_string())?);
        }
        Ok(())
    }

    /// Queues a response.
    pub fn send(&mut self, resp: &Response) {
        if let Err(e) = encode_frame(resp, &mut self.out) {
            crate::warn!("cannot encode a control response: {e}");
            self.closing = true;
        }
    }

    /// Writes as much of the queued output as the socket takes. Returns
    /// `Ok(true)` when everything is written.
    pub fn flush(&mut self) -> io::Result<bool> {
        while self.written < self.out.len() {
            match self.stream.write(&self.out[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.written = 0;
        Ok(true)
    }

    /// Bytes queued but not yet written.
    pub fn pending_output(&self) -> usize {
        self.out.len() - self.written
    }
}
