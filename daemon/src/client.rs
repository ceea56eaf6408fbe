//! The client side of the control protocol: connect, greet, request,
//! read responses. Blocking; used by `jobvisorctl` and the tests.

use ipc_proto::control::{Request, Response};
use ipc_proto::{decode, encode_frame, FrameDecoder};
use std::io::{Read, Write};
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
}

/// A greeted connection to the daemon.
pub struct Connection {
    stream: UnixStream,
    decoder: FrameDecoder,
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
            daemon_pid: 0,
        };
        c.send(&Request::Hello {
            protocol_version: ipc_proto::PROTOCOL_VERSION,
        })?;
        match c.recv()? {
            Response::Hello { pid, .. } => c.daemon_pid = pid,
            Response::Error { message, .. } => return Err(ClientError::Broken(message)),
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

    /// Reads one response.
    pub fn recv(&mut self) -> Result<Response, ClientError> {
        loop {
            if let Some(f) = self
                .decoder
                .next_frame()
                .map_err(|e| ClientError::Broken(e.to_string()))?
            {
                return decode(f).map_err(|e| ClientError::Broken(e.to_string()));
            }
            let n = self
                .stream
                .read(self.decoder.unfilled())
                .map_err(|e| ClientError::Broken(e.to_string()))?;
            if n == 0 {
                return Err(ClientError::Broken(
                    "the daemon closed the connection".into(),
                ));
            }
            self.decoder.filled(n);
        }
    }

    /// Sends a request and reads its response.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        self.send(req)?;
        self.recv()
    }
}
