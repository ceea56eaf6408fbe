//! The jobvisor wire protocol: frames, messages and their codec.
//!
//! A frame is a `u32` little-endian payload length followed by the payload,
//! one bincode-2-encoded message. This crate knows frames and messages and
//! nothing about policy: it never touches a file descriptor, never blocks,
//! and never decides what a message means. The daemon and the worker library
//! compose it with their own I/O.
//!
//! Architecture invariant: bincode is used only inside [`codec`]; every other
//! module (and every other crate) sees plain serde types, so the codec can be
//! replaced without touching a message definition.
#![deny(missing_docs)]

pub mod arena;
pub mod codec;
pub mod control;
pub mod frame;
pub mod worker;

pub use codec::{decode, encode_frame, CodecError};
pub use frame::{FrameDecoder, FrameError, MAX_FRAME_LEN};

/// Version of both the worker and the control protocol. A peer announcing a
/// different version is refused at the handshake.
pub const PROTOCOL_VERSION: u32 = 1;

/// Worker protocol 2: version 1 plus descriptors. Fd 3 is a Unix stream
/// socket; a worker that announces this version in `Ready` may be sent
/// inputs as memfds ([`worker::Payload::Fd`]) and output buffers
/// ([`worker::ToWorker::JobOut`]), attached to the frames with
/// `SCM_RIGHTS`. A worker announcing 1 never gets a descriptor.
pub const WORKER_PROTOCOL_FDS: u32 = 2;

/// A pool's `inline_limit` when its configuration does not say: payloads
/// above it go through the worker's shared-memory arena. The daemon's
/// default, and the worker library's when `JOBVISOR_INLINE_LIMIT` is unset.
pub const DEFAULT_INLINE_LIMIT: u64 = 64 << 10;

/// Owned bytes that serialize as one length-prefixed byte string (not as a
/// sequence of `u8`), and that decode by borrowing from the frame buffer
/// first, so a forged length can never allocate more than the frame holds.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Bytes(v)
    }
}

impl From<&[u8]> for Bytes {
    fn from(v: &[u8]) -> Self {
        Bytes(v.to_vec())
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl serde::Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A UTF-8 string field that decodes by borrowing (see [`Bytes`]).
pub(crate) mod borrowed_string {
    use serde::Deserialize;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        let s: std::borrow::Cow<'de, str> = Deserialize::deserialize(d)?;
        Ok(s.into_owned())
    }
}
