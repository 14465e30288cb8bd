//! Relays: the wire contract of the one connection a relay agent holds to a gateway
//! (`docs/protocol.md` section 12.13, ADR 0015).
//!
//! A relay carries its downstream agents' connections as byte streams, frp-style: every
//! TCP connection a downstream opens to the relay becomes one stream on the relay's single
//! upstream connection, and the gateway serves each stream exactly as it serves a socket
//! (HTTP upgrade with the downstream's own token, TLS when the gateway has it, then the
//! ordinary frame protocol). The relay never parses what it carries, so it can read nothing
//! and alter nothing that TLS protects. This module owns the multiplexing frames and the
//! limits both ends enforce; the stream machinery is `servicekit::mux`.
//!
//! Each frame is one binary WebSocket message: a kind byte, the stream id (u32, big-endian)
//! and a kind-specific rest.

/// Path a relay upgrades on, with its own agent token, instead of `/ws`.
pub const PATH: &str = "/relay";

/// Largest `Data` payload, bytes.
pub const MAX_CHUNK: usize = 32 * 1024;

/// Initial credit each way per stream, bytes: a sender has at most this much not yet
/// granted back in flight.
pub const WINDOW: u32 = 256 * 1024;

/// Most streams open at once on one relay connection (the gateway refuses more).
pub const MAX_STREAMS: usize = 4096;

/// Length of the fixed part of every frame: kind byte and stream id.
pub const HEADER_LEN: usize = 5;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Relay -> gateway: a new stream (a downstream connected). Empty rest.
    Open = 1,
    /// Both ways: bytes of a stream; the rest is 1 to [`MAX_CHUNK`] bytes.
    Data = 2,
    /// Both ways: the stream ended (no half-close); the rest is an optional UTF-8 reason.
    Close = 3,
    /// Both ways: the sender delivered this many more bytes onward; rest is a u32 (BE).
    Window = 4,
}

/// One decoded frame, borrowing its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A new stream.
    Open {
        /// Stream id, chosen by the relay, never reused on one connection.
        stream: u32,
    },
    /// Bytes.
    Data {
        /// Stream id.
        stream: u32,
        /// Payload.
        data: &'a [u8],
    },
    /// The stream ended.
    Close {
        /// Stream id.
        stream: u32,
        /// Why, for logs (may be empty).
        reason: &'a str,
    },
    /// Credit.
    Window {
        /// Stream id.
        stream: u32,
        /// Bytes granted.
        grant: u32,
    },
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelayFrameError {
    /// Shorter than the header or than its kind needs.
    #[error("relay frame too short ({0} bytes)")]
    Short(usize),
    /// Unknown kind byte.
    #[error("unknown relay frame kind {0}")]
    UnknownKind(u8),
    /// A data frame with no bytes or more than [`MAX_CHUNK`].
    #[error("relay data frame of {0} bytes (1 to {MAX_CHUNK} allowed)")]
    DataLength(usize),
    /// Bytes after a fixed-size frame, or a close reason that is not UTF-8.
    #[error("malformed relay {0} frame")]
    Malformed(&'static str),
}

impl<'a> Frame<'a> {
    /// The stream the frame belongs to.
    pub fn stream(&self) -> u32 {
        match *self {
            Frame::Open { stream }
            | Frame::Data { stream, .. }
            | Frame::Close { stream, .. }
            | Frame::Window { stream, .. } => stream,
        }
    }

    /// Decodes one frame; never panics on any input.
    pub fn decode(bytes: &'a [u8]) -> Result<Frame<'a>, RelayFrameError> {
        let (head, rest) = bytes
            .split_at_checked(HEADER_LEN)
            .ok_or(RelayFrameError::Short(bytes.len()))?;
        let stream = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
        match head[0] {
            1 if rest.is_empty() => Ok(Frame::Open { stream }),
            1 => Err(RelayFrameError::Malformed("open")),
            2 if rest.is_empty() || rest.len() > MAX_CHUNK => {
                Err(RelayFrameError::DataLength(rest.len()))
            }
            2 => Ok(Frame::Data { stream, data: rest }),
            3 => std::str::from_utf8(rest)
                .map(|reason| Frame::Close { stream, reason })
                .map_err(|_| RelayFrameError::Malformed("close")),
            4 => {
                let grant: [u8; 4] = rest
                    .try_into()
                    .map_err(|_| RelayFrameError::Malformed("window"))?;
                Ok(Frame::Window {
                    stream,
                    grant: u32::from_be_bytes(grant),
                })
            }
            other => Err(RelayFrameError::UnknownKind(other)),
        }
    }

    /// Encodes the frame. A data payload longer than [`MAX_CHUNK`] is the caller's bug; it
    /// is encoded anyway and the peer refuses it.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, rest): (Kind, &[u8]) = match self {
            Frame::Open { .. } => (Kind::Open, &[]),
            Frame::Data { data, .. } => (Kind::Data, data),
            Frame::Close { reason, .. } => (Kind::Close, reason.as_bytes()),
            Frame::Window { .. } => (Kind::Window, &[]),
        };
        let mut out = Vec::with_capacity(HEADER_LEN + rest.len() + 4);
        out.push(kind as u8);
        out.extend_from_slice(&self.stream().to_be_bytes());
        out.extend_from_slice(rest);
        if let Frame::Window { grant, .. } = self {
            out.extend_from_slice(&grant.to_be_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn frames_round_trip() {
        for frame in [
            Frame::Open { stream: 1 },
            Frame::Data {
                stream: 7,
                data: b"GET /ws",
            },
            Frame::Close {
                stream: u32::MAX,
                reason: "eof",
            },
            Frame::Close {
                stream: 2,
                reason: "",
            },
            Frame::Window {
                stream: 3,
                grant: 131_072,
            },
        ] {
            assert_eq!(Frame::decode(&frame.encode()).unwrap(), frame);
        }
    }

    #[test]
    fn documented_layout() {
        // docs/protocol.md 12.13: kind, stream id big-endian, rest.
        assert_eq!(
            Frame::Window {
                stream: 0x0102_0304,
                grant: 0x10
            }
            .encode(),
            [4, 1, 2, 3, 4, 0, 0, 0, 0x10]
        );
        assert_eq!(
            Frame::Data {
                stream: 1,
                data: b"ab"
            }
            .encode(),
            [2, 0, 0, 0, 1, b'a', b'b']
        );
    }

    #[test]
    fn bad_frames_are_refused_not_panicked_on() {
        assert_eq!(Frame::decode(&[1, 0, 0]), Err(RelayFrameError::Short(3)));
        assert_eq!(
            Frame::decode(&[9, 0, 0, 0, 1]),
            Err(RelayFrameError::UnknownKind(9))
        );
        assert_eq!(
            Frame::decode(&[2, 0, 0, 0, 1]),
            Err(RelayFrameError::DataLength(0))
        );
        let mut big = vec![2, 0, 0, 0, 1];
        big.resize(HEADER_LEN + MAX_CHUNK + 1, 0);
        assert_eq!(
            Frame::decode(&big),
            Err(RelayFrameError::DataLength(MAX_CHUNK + 1))
        );
        assert!(Frame::decode(&[4, 0, 0, 0, 1, 0, 0]).is_err());
        assert!(Frame::decode(&[1, 0, 0, 0, 1, 0]).is_err());
        assert!(Frame::decode(&[3, 0, 0, 0, 1, 0xff]).is_err());
        for len in 0..12 {
            for kind in 0..6u8 {
                let mut v = vec![kind];
                v.resize(len.max(1), 0xab);
                let _ = Frame::decode(&v);
            }
        }
    }
}
