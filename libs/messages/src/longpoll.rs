//! HTTP long-polling, the fallback transport (docs/protocol.md section 1.4): the batch
//! format that carries several protocol frames in one HTTP body, the session id (`sid`)
//! that names both the socket and the gateway holding it, and the typed messages a
//! replica forwards over the bus to the replica that owns a session (`ws.lp.<worker>`), so
//! no sticky load balancing is needed.
//!
//! A batch is a sequence of records, each a 4-byte big-endian length followed by that many
//! bytes of one frame (section 2), exactly the bytes a WebSocket message would carry.

use serde::{Deserialize, Serialize};

use crate::ids::{ClientKind, SocketId, UserId};

/// Length of a record's length prefix.
pub const RECORD_HEADER: usize = 4;

/// Path of the long-polling endpoint.
pub const PATH: &str = "/lp";

/// Appends one record carrying `frame` to `out`.
pub fn put_record(out: &mut Vec<u8>, frame: &[u8]) {
    // A frame is bounded by the gateway's frame limit, far below 4 GiB.
    let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(frame);
}

/// A batch of `frames`.
pub fn encode_batch<'a>(frames: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for frame in frames {
        put_record(&mut out, frame);
    }
    out
}

/// Why a batch is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The body ends inside a length prefix or a record.
    #[error("batch truncated at byte {at}: a record needs {needed} bytes, {got} left")]
    Truncated {
        /// Offset of the record.
        at: usize,
        /// Bytes the record announced (with its prefix).
        needed: usize,
        /// Bytes left.
        got: usize,
    },
    /// A record is longer than the frame limit.
    #[error("record at byte {at} is {len} bytes, over the frame limit of {max}")]
    TooLarge {
        /// Offset of the record.
        at: usize,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Splits a batch into its frames (each a slice of `batch`), checking every record before
/// returning any, so a broken batch is refused whole. `max_frame` bounds each record.
pub fn decode_batch(batch: &[u8], max_frame: usize) -> Result<Vec<&[u8]>, BatchError> {
    let mut frames = Vec::new();
    let mut at = 0;
    while at < batch.len() {
        let rest = &batch[at..];
        let Some(prefix) = rest
            .get(..RECORD_HEADER)
            .and_then(|p| <[u8; 4]>::try_from(p).ok())
        else {
            return Err(BatchError::Truncated {
                at,
                needed: RECORD_HEADER,
                got: rest.len(),
            });
        };
        let len = usize::try_from(u32::from_be_bytes(prefix)).unwrap_or(usize::MAX);
        if len > max_frame {
            return Err(BatchError::TooLarge {
                at,
                len,
                max: max_frame,
            });
        }
        let end = RECORD_HEADER.saturating_add(len);
        let Some(frame) = rest.get(RECORD_HEADER..end) else {
            return Err(BatchError::Truncated {
                at,
                needed: end,
                got: rest.len(),
            });
        };
        frames.push(frame);
        at += end;
    }
    Ok(frames)
}

/// A long-poll session id: the socket id (which names the gateway through its worker id,
/// section 11) and 128 random bits that make it unguessable. Written
/// `<socket id, decimal>.<32 lowercase hex digits>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sid {
    /// The session's socket id.
    pub socket: SocketId,
    /// The secret part.
    pub secret: [u8; 16],
}

/// A `sid` that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed sid: expected <socket id>.<32 hex digits>")]
pub struct SidError;

impl Sid {
    /// Parses the written form.
    pub fn parse(s: &str) -> Result<Sid, SidError> {
        let (id, secret) = s.split_once('.').ok_or(SidError)?;
        if id.is_empty() || id.len() > 20 || !id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SidError);
        }
        let socket = SocketId(id.parse::<u64>().map_err(|_| SidError)?);
        if secret.len() != 32 {
            return Err(SidError);
        }
        let mut bytes = [0u8; 16];
        for (i, pair) in secret.as_bytes().chunks_exact(2).enumerate() {
            let hex = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            let (Some(hi), Some(lo)) = (hex(pair[0]), hex(pair[1])) else {
                return Err(SidError);
            };
            bytes[i] = hi << 4 | lo;
        }
        Ok(Sid {
            socket,
            secret: bytes,
        })
    }

    /// Whether `other`'s secret equals this one, in time independent of where they differ.
    pub fn secret_matches(&self, other: &[u8; 16]) -> bool {
        self.secret
            .iter()
            .zip(other)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl std::fmt::Display for Sid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.", self.socket.0)?;
        for b in self.secret {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// What a forwarded request asks of the owning replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LpOp {
    /// `POST /lp`: frames for the session (the body is a batch).
    Send,
    /// `GET /lp`: wait for frames.
    Poll,
    /// `DELETE /lp`: end the session.
    Close,
}

/// A long-poll request that reached a replica other than the session's owner, forwarded
/// on `ws.lp.<worker>` (request/reply). The forwarding replica has verified the token;
/// the owner checks the sid's secret and that the identity is the session's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LpForward {
    /// The operation.
    pub op: LpOp,
    /// The sid as the client sent it.
    pub sid: String,
    /// The token's user id.
    pub user_id: UserId,
    /// The token's client kind.
    pub kind: ClientKind,
    /// The request body (a batch for `send`, empty otherwise).
    #[serde(with = "serde_bytes", default)]
    pub body: Vec<u8>,
}

/// The owner's answer to an [`LpForward`]: the HTTP response the client gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LpAnswer {
    /// HTTP status.
    pub status: u16,
    /// Whether `body` is JSON (an error or a handshake); a batch otherwise.
    #[serde(default)]
    pub json: bool,
    /// Response body.
    #[serde(with = "serde_bytes", default)]
    pub body: Vec<u8>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn batches_round_trip_and_broken_ones_are_refused_whole() {
        let frames: [&[u8]; 3] = [b"abcdefghijkl", b"", &[1u8; 300]];
        let batch = encode_batch(frames);
        assert_eq!(&batch[..4], &[0, 0, 0, 12]);
        assert_eq!(decode_batch(&batch, 1000).unwrap(), frames.to_vec());
        assert_eq!(decode_batch(&[], 10).unwrap(), Vec::<&[u8]>::new());
        assert_eq!(
            decode_batch(&batch[..batch.len() - 1], 1000),
            Err(BatchError::Truncated {
                at: 20,
                needed: 304,
                got: 303
            })
        );
        assert_eq!(
            decode_batch(&[0, 0], 10),
            Err(BatchError::Truncated {
                at: 0,
                needed: 4,
                got: 2
            })
        );
        assert!(matches!(
            decode_batch(&batch, 100),
            Err(BatchError::TooLarge { len: 300, .. })
        ));
        // A huge announced length is refused from the prefix, not allocated.
        assert!(matches!(
            decode_batch(&[0xff, 0xff, 0xff, 0xff], 100),
            Err(BatchError::TooLarge { .. })
        ));
    }

    #[test]
    fn sids_round_trip_and_reject_anything_else() {
        let sid = Sid {
            socket: SocketId(137_465_797_017_604_096),
            secret: [0xab; 16],
        };
        let text = sid.to_string();
        assert_eq!(text, format!("137465797017604096.{}", "ab".repeat(16)));
        assert_eq!(Sid::parse(&text).unwrap(), sid);
        assert!(sid.secret_matches(&[0xab; 16]));
        assert!(!sid.secret_matches(&[0xac; 16]));
        for bad in [
            "",
            "1",
            "1.",
            ".abababababababababababababababab",
            "x.abababababababababababababababab",
            "1.ABABABABABABABABABABABABABABABAB",
            "1.ababababababababababababababab",
            "1.abababababababababababababababab00",
            "99999999999999999999999.abababababababababababababababab",
        ] {
            assert_eq!(Sid::parse(bad), Err(SidError), "{bad:?}");
        }
    }

    #[test]
    fn forwarded_requests_are_msgpack_maps() {
        let fwd = LpForward {
            op: LpOp::Send,
            sid: "1.00".into(),
            user_id: UserId::new("alice").unwrap(),
            kind: ClientKind::App,
            body: vec![1, 2],
        };
        let bytes = rmp_serde::to_vec_named(&fwd).unwrap();
        assert_eq!(rmp_serde::from_slice::<LpForward>(&bytes).unwrap(), fwd);
        let answer = LpAnswer {
            status: 200,
            json: false,
            body: vec![],
        };
        let bytes = rmp_serde::to_vec_named(&answer).unwrap();
        assert_eq!(rmp_serde::from_slice::<LpAnswer>(&bytes).unwrap(), answer);
    }
}
