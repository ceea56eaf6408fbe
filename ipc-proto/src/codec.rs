//! The one place that knows the payload encoding: bincode 2
//! (`config::standard()`, varint integers, with a decode limit).

use crate::frame::{FrameError, HEADER_LEN, MAX_FRAME_LEN};
use serde::{de::DeserializeOwned, Serialize};

/// Encoding or decoding failure of one message.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The payload is not a valid message of the expected type.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The encoded message would not fit in a frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

/// Appends one frame holding `msg` to `out`. Several frames may be
/// accumulated in one buffer and written with one system call.
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let at = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    if let Err(e) = bincode::serde::encode_into_std_write(msg, out, config()) {
        out.truncate(at);
        return Err(CodecError::Malformed(e.to_string()));
    }
    let len = out.len() - at - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        out.truncate(at);
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        }
        .into());
    }
    out[at..at + HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// Size in bytes of `msg`'s payload (without the frame header).
pub fn encoded_len<T: Serialize>(msg: &T) -> Result<usize, CodecError> {
    let mut counter = Counter(0);
    bincode::serde::encode_into_std_write(msg, &mut counter, config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    Ok(counter.0)
}

struct Counter(usize);
impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Decodes one frame payload. Trailing bytes after the message are an error:
/// a frame holds exactly one message.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let (msg, used) = bincode::serde::borrow_decode_from_slice::<T, _>(payload, config())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::Malformed(format!(
            "{} trailing bytes after the message",
            payload.len() - used
        )));
    }
    Ok(msg)
}
