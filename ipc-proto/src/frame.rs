//! Framing: `u32` little-endian payload length, then the payload.
//!
//! [`FrameDecoder`] accumulates bytes read by the caller (into
//! [`FrameDecoder::unfilled`], so reads land in place without a copy) and
//! yields whole frames. The declared length is checked against the maximum
//! *before* any buffer grows, so an oversized or garbage length prefix is a
//! [`FrameError::TooLarge`], never an allocation; and the buffer grows only
//! with the bytes that actually arrive (at most doubling), never to a
//! declared length, so a peer that announces a large frame and stalls holds
//! no more memory than it sent.

/// Hard upper bound of any frame's payload (64 MiB). Larger payloads travel
/// through the shared-memory arena, never inline.
pub const MAX_FRAME_LEN: usize = 64 << 20;

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// How many spare bytes [`FrameDecoder::unfilled`] offers at least.
const READ_CHUNK: usize = 64 << 10;

/// A framing violation. Any of these makes the stream unusable: the peer is
/// broken or hostile and the connection must be dropped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix announces more than the configured maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// Declared payload length.
        len: usize,
        /// Maximum accepted payload length.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({have} of {want} bytes)")]
    Truncated {
        /// Bytes of the partial frame present.
        have: usize,
        /// Bytes the frame needed (header included).
        want: usize,
    },
}

/// Incremental frame splitter for a byte stream.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of unconsumed data in `buf`.
    start: usize,
    /// End of valid data in `buf`.
    end: usize,
    max_len: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames whose payload exceeds `max_len`
    /// (clamped to [`MAX_FRAME_LEN`]).
    pub fn new(max_len: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            end: 0,
            max_len: max_len.min(MAX_FRAME_LEN),
        }
    }

    /// The maximum payload length this decoder accepts.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Changes the maximum payload length (clamped to [`MAX_FRAME_LEN`]),
    /// e.g. from a small pre-greeting limit to the full one.
    pub fn set_max_len(&mut self, max_len: usize) {
        self.max_len = max_len.min(MAX_FRAME_LEN);
    }

    /// Bytes of memory the buffer holds (for accounting and tests).
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Spare space to read into; call [`FrameDecoder::filled`] with the number
    /// of bytes written. Grows the buffer only as far as a frame that passed
    /// the length check needs.
    pub fn unfilled(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            // Give back the memory of an earlier large frame.
            if self.buf.len() > 4 * READ_CHUNK {
                self.buf = Vec::new();
            }
        } else if self.start > 0 && self.start >= self.buf.len() / 2 {
            // Move the partial frame to the front so the buffer does not creep.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let pending = self.end - self.start;
        let frame_rest = match self.declared_len() {
            Some(len) if len <= self.max_len => (HEADER_LEN + len).saturating_sub(pending),
            _ => 0,
        };
        // Grow with what has arrived, never from the declared length alone:
        // at most as much again as the partial frame already holds, so a
        // peer that announces 64 MiB and sends nothing more costs one chunk,
        // and a real large frame still lands in O(log n) reallocations.
        let min_spare = READ_CHUNK.max(frame_rest.min(pending));
        if self.buf.len() - self.end < min_spare {
            self.buf.resize(self.end + min_spare, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Marks `n` bytes of [`FrameDecoder::unfilled`] as read.
    pub fn filled(&mut self, n: usize) {
        self.end += n;
        debug_assert!(self.end <= self.buf.len());
    }

    /// Appends bytes (for callers that already hold them in a buffer).
    pub fn extend(&mut self, data: &[u8]) {
        let mut rest = data;
        while !rest.is_empty() {
            let spare = self.unfilled();
            let n = spare.len().min(rest.len());
            spare[..n].copy_from_slice(&rest[..n]);
            self.filled(n);
            rest = &rest[n..];
        }
    }

    fn declared_len(&self) -> Option<usize> {
        let pending = &self.buf[self.start..self.end];
        if pending.len() < HEADER_LEN {
            return None;
        }
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&pending[..HEADER_LEN]);
        Some(u32::from_le_bytes(h) as usize)
    }

    /// The next complete frame's payload, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        let Some(len) = self.declared_len() else {
            return Ok(None);
        };
        if len > self.max_len {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_len,
            });
        }
        if self.end - self.start < HEADER_LEN + len {
            return Ok(None);
        }
        let from = self.start + HEADER_LEN;
        self.start = from + len;
        if self.start == self.end {
            // Everything consumed: reset cheaply without moving bytes. The
            // returned slice stays valid because nothing is overwritten
            // before the next `unfilled` call.
            let (s, e) = (from, from + len);
            self.start = 0;
            self.end = 0;
            return Ok(Some(&self.buf[s..e]));
        }
        Ok(Some(&self.buf[from..from + len]))
    }

    /// Bytes buffered that do not yet form a whole frame.
    pub fn pending(&self) -> usize {
        self.end - self.start
    }

    /// Call at end of stream: an error if a partial frame is left over.
    pub fn finish(&self) -> Result<(), FrameError> {
        let have = self.pending();
        if have == 0 {
            return Ok(());
        }
        let want = self.declared_len().map_or(HEADER_LEN, |l| HEADER_LEN + l);
        Err(FrameError::Truncated { have, want })
    }
}
