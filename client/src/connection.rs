//! The client side of the control protocol: connect, greet, request,
//! read responses. Blocking; used by `jobvisorctl` and the tests.

use crate::fdpass;
use ipc_proto::control::{Request, Response};
use ipc_proto::{decode, encode_frame, FrameDecoder};
use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect (daemon not running, wrong path, permissions).
    #[error("cannot connect to {path}: {source}; is jobvisord running? (start it, or pass --socket / set JOBVISOR_SOCKET)")]
    Unreachable {
        /// Socket path tried.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The connection broke or the daemon answered nonsense.
    #[error("lost the connection to jobvisord: {0}")]
    Broken(String),
    /// The daemon refused the connection (e.g. too many connections).
    #[error("jobvisord refused the connection: {message}")]
    Refused {
        /// Why, as a kind (its exit code).
        kind: ipc_proto::control::ErrorKind,
        /// The daemon's message.
        message: String,
    },
}

/// A greeted connection to the daemon.
pub struct Connection {
    stream: UnixStream,
    decoder: FrameDecoder,
    /// Descriptors received with frames not yet decoded (see [`fdpass`]).
    fds: VecDeque<OwnedFd>,
    /// The daemon's pid, from its Hello.
    pub daemon_pid: u32,
}

impl Connection {
    /// Connects to `path` and performs the Hello exchange.
    pub fn connect(path: &Path) -> Result<Connection, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Unreachable {
            path: path.to_path_buf(),
            source,
        })?;
        let mut c = Connection {
            stream,
            decoder: FrameDecoder::new(ipc_proto::MAX_FRAME_LEN),
            fds: VecDeque::new(),
            daemon_pid: 0,
        };
        // A daemon over its connection caps answers a refusal and closes
        // before reading anything, so our Hello may meet a closed socket:
        // the refusal is read all the same.
        let sent = c.send(&Request::Hello {
            protocol_version: ipc_proto::PROTOCOL_VERSION,
        });
        let answer = c.recv();
        if let (Err(e), Err(_)) = (&sent, &answer) {
            return Err(ClientError::Broken(e.to_string()));
        }
        match answer? {
            Response::Hello { pid, .. } => c.daemon_pid = pid,
            Response::Error { kind, message } => {
                return Err(ClientError::Refused { kind, message })
            }
            other => {
                return Err(ClientError::Broken(format!(
                    "unexpected answer to Hello: {other:?}"
                )))
            }
        }
        Ok(c)
    }

    /// Sends one request.
    pub fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        let mut buf = Vec::new();
        encode_frame(req, &mut buf).map_err(|e| ClientError::Broken(e.to_string()))?;
        self.stream
            .write_all(&buf)
            .map_err(|e| ClientError::Broken(e.to_string()))
    }

    /// Sends one request whose payload is the file behind `fd`
    /// ([`Request::SubmitFd`]), attached to the frame's first byte.
    pub fn send_with_fd(&mut self, req: &Request, fd: &impl AsFd) -> Result<(), ClientError> {
        let mut buf = Vec::new();
        encode_frame(req, &mut buf).map_err(|e| ClientError::Broken(e.to_string()))?;
        let n = fdpass::send(&self.stream, &buf, fd)
            .map_err(|e| ClientError::Broken(format!("cannot pass the input's descriptor: {e}")))?;
        self.stream
            .write_all(&buf[n..])
            .map_err(|e| ClientError::Broken(e.to_string()))
    }

    /// Reads one response; a [`Response::JobFd`] comes back as the
    /// [`Response::Job`] it stands for, its output read from the descriptor.
    pub fn recv(&mut self) -> Result<Response, ClientError> {
        let (resp, fd) = self.recv_with_fd()?;
        inline_output(resp, fd)
    }

    /// Reads one response as sent: a [`Response::JobFd`] comes with the
    /// descriptor holding its output, to be streamed without loading it.
    pub fn recv_with_fd(&mut self) -> Result<(Response, Option<OwnedFd>), ClientError> {
        loop {
            if let Some(f) = self
                .decoder
                .next_frame()
                .map_err(|e| ClientError::Broken(e.to_string()))?
            {
                let resp: Response = decode(f).map_err(|e| ClientError::Broken(e.to_string()))?;
                let fd = claim_fd(&resp, &mut self.fds)?;
                return Ok((resp, fd));
            }
            fill(&self.stream, &mut self.decoder, &mut self.fds)?;
        }
    }

    /// Whether response bytes are buffered already (a caller streaming
    /// responses flushes its own output when none are).
    pub fn has_buffered(&self) -> bool {
        self.decoder.pending() > 0
    }

    /// Sends a request and reads its response.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        self.send(req)?;
        self.recv()
    }

    /// Splits the connection into a writing and a reading half, for
    /// pipelining requests from one thread while another reads responses.
    /// Both halves share the socket; responses already buffered stay with
    /// the reading half.
    pub fn split(self) -> Result<(RequestWriter, ResponseReader), ClientError> {
        let write = self
            .stream
            .try_clone()
            .map_err(|e| ClientError::Broken(format!("cannot clone the control socket: {e}")))?;
        Ok((
            RequestWriter {
                stream: write,
                buf: Vec::new(),
            },
            ResponseReader {
                stream: self.stream,
                decoder: self.decoder,
                fds: self.fds,
            },
        ))
    }
}

/// The writing half of a [`Connection`]: requests are encoded into a buffer
/// and written with one system call per [`RequestWriter::flush`], so a
/// client can pipeline thousands of small requests cheaply.
pub struct RequestWriter {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl RequestWriter {
    /// Encodes one request into the buffer (nothing is sent yet).
    pub fn queue(&mut self, req: &Request) -> Result<(), ClientError> {
        encode_frame(req, &mut self.buf).map_err(|e| ClientError::Broken(e.to_string()))
    }

    /// Bytes queued and not yet written.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Writes everything queued (blocking while the daemon does not read).
    pub fn flush(&mut self) -> Result<(), ClientError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let res = self.stream.write_all(&self.buf);
        self.buf.clear();
        res.map_err(|e| ClientError::Broken(e.to_string()))
    }
}

/// The reading half of a [`Connection`]. Besides the blocking
/// [`ResponseReader::recv`], it offers [`ResponseReader::try_next`] (only
/// what is already buffered) and [`ResponseReader::fill`] (one read), so a
/// caller can act on "nothing more pending right now", e.g. flush its output
/// or `poll` the socket together with other descriptors.
pub struct ResponseReader {
    stream: UnixStream,
    decoder: FrameDecoder,
    fds: VecDeque<OwnedFd>,
}

impl ResponseReader {
    /// The next response if a whole one is already buffered; never blocks.
    pub fn try_next(&mut self) -> Result<Option<Response>, ClientError> {
        match self
            .decoder
            .next_frame()
            .map_err(|e| ClientError::Broken(e.to_string()))?
        {
            Some(f) => {
                let resp: Response = decode(f).map_err(|e| ClientError::Broken(e.to_string()))?;
                let fd = claim_fd(&resp, &mut self.fds)?;
                inline_output(resp, fd).map(Some)
            }
            None => Ok(None),
        }
    }

    /// One `read` from the socket into the buffer (blocks until data or end
    /// of stream arrives). The end of the stream is an error.
    pub fn fill(&mut self) -> Result<(), ClientError> {
        fill(&self.stream, &mut self.decoder, &mut self.fds)
    }

    /// Reads one response, blocking as needed.
    pub fn recv(&mut self) -> Result<Response, ClientError> {
        loop {
            if let Some(r) = self.try_next()? {
                return Ok(r);
            }
            self.fill()?;
        }
    }
}

impl AsFd for ResponseReader {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

/// One read from the control socket into `decoder` (with the descriptors
/// that came along, see [`fdpass`]); the end of the stream is an error.
fn fill(
    stream: &UnixStream,
    decoder: &mut FrameDecoder,
    fds: &mut VecDeque<OwnedFd>,
) -> Result<(), ClientError> {
    let n = fdpass::recv(stream, decoder.unfilled(), fds)
        .map_err(|e| ClientError::Broken(e.to_string()))?;
    if n == 0 {
        return Err(ClientError::Broken(
            "the daemon closed the connection".into(),
        ));
    }
    decoder.filled(n);
    Ok(())
}

/// The descriptor a decoded response carries, if its kind carries one.
fn claim_fd(resp: &Response, fds: &mut VecDeque<OwnedFd>) -> Result<Option<OwnedFd>, ClientError> {
    match resp {
        Response::JobFd { .. } => fds.pop_front().map(Some).ok_or_else(|| {
            ClientError::Broken("a job's output was announced without its descriptor".into())
        }),
        _ => Ok(None),
    }
}

/// Turns a [`Response::JobFd`] into the [`Response::Job`] it stands for.
fn inline_output(resp: Response, fd: Option<OwnedFd>) -> Result<Response, ClientError> {
    match (resp, fd) {
        (Response::JobFd { doc, output_len }, Some(fd)) => job_with_output(doc, fd, output_len)
            .map(Response::Job)
            .map_err(ClientError::Broken),
        (resp, _) => Ok(resp),
    }
}

/// The job document of a [`Response::JobFd`], its output read from the
/// descriptor that came with it.
pub fn job_with_output(
    mut doc: ipc_proto::control::JobDoc,
    fd: OwnedFd,
    output_len: u64,
) -> Result<ipc_proto::control::JobDoc, String> {
    let output = fdpass::read_payload(fd, output_len, "output")
        .map_err(|e| format!("cannot read job {}'s output: {e}", doc.id))?;
    doc.output = Some(ipc_proto::Bytes(output));
    Ok(doc)
}
