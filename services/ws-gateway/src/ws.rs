//! WebSocket framing (RFC 6455), server side, owned by the gateway instead of the HTTP
//! dispatcher so that a connection costs only what it uses.
//!
//! The [`Decoder`] is fed whatever a read returned (a slice of a buffer that is not the
//! connection's: see `transport`) and keeps bytes only while a frame is incomplete, so an
//! idle connection holds no read buffer. Fragmented messages are assembled up to the
//! message limit; a frame whose announced length passes the limit is refused before its
//! payload arrives. Control frames may arrive between fragments, as the RFC allows.
//!
//! Server frames are not masked, so a message is encoded once ([`binary`]) and the same
//! bytes are written to every recipient.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// A complete message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A binary message (fragments joined).
    Binary(Bytes),
    /// A text message; its content is not kept, the protocol has no use for it.
    Text,
    /// A ping with its payload (at most 125 bytes).
    Ping(Bytes),
    /// A pong.
    Pong,
    /// A close frame and its status code, if it had one.
    Close(Option<u16>),
}

/// Why the client's byte stream is not acceptable WebSocket.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// A message (or the frame announcing it) is longer than the limit.
    #[error("message larger than {0} bytes")]
    Overflow(usize),
    /// A rule of RFC 6455 was broken.
    #[error("websocket protocol error: {0}")]
    Protocol(&'static str),
    /// Reading the socket failed, or it ended in the middle of a frame.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

const FIN: u8 = 0x80;
const RSV: u8 = 0x70;
const MASKED: u8 = 0x80;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Longest payload of a control frame.
const MAX_CONTROL: usize = 125;
/// Most an incomplete frame reserves up front; beyond it the buffer grows as bytes come.
const MAX_RESERVE: usize = 64 * 1024;

/// A message being assembled from fragments.
#[derive(Debug)]
struct Assembling {
    binary: bool,
    payload: BytesMut,
}

/// Incremental decoder of client frames.
#[derive(Debug)]
pub struct Decoder {
    max_message: usize,
    /// An incomplete frame carried over to the next read; empty (unallocated) otherwise.
    partial: BytesMut,
    /// A fragmented message waiting for its last fragment.
    assembling: Option<Assembling>,
}

/// A frame header parsed from the front of a buffer.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

impl Decoder {
    /// A decoder refusing messages longer than `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Decoder {
            max_message,
            partial: BytesMut::new(),
            assembling: None,
        }
    }

    /// Whether bytes of an unfinished frame or message are held.
    pub fn mid_message(&self) -> bool {
        !self.partial.is_empty() || self.assembling.is_some()
    }

    /// Decodes what `input` completes, appending messages to `out`. After an error the
    /// decoder is unusable; the connection must be closed.
    pub fn feed(&mut self, input: &[u8], out: &mut VecDeque<Message>) -> Result<(), WsError> {
        if self.partial.is_empty() {
            let used = self.decode_from(input, out)?;
            if used < input.len() {
                self.carry(&input[used..])?;
            }
            return Ok(());
        }
        self.partial.extend_from_slice(input);
        let mut partial = std::mem::take(&mut self.partial);
        let used = self.decode_from(&partial, out)?;
        partial.advance(used);
        if !partial.is_empty() {
            self.partial = partial;
        }
        // An empty `partial` is dropped here: the idle connection gives its memory back.
        Ok(())
    }

    /// Keeps the start of an incomplete frame, reserving room for all of it when its
    /// header is already there, so a large frame is not copied once per read.
    fn carry(&mut self, rest: &[u8]) -> Result<(), WsError> {
        let want = match parse_header(rest)? {
            // Bounded: a header alone must not make the connection reserve megabytes.
            Some(h) => (h.header_len + h.payload_len).min(MAX_RESERVE),
            None => rest.len(),
        };
        let mut partial = BytesMut::with_capacity(want.max(rest.len()));
        partial.extend_from_slice(rest);
        self.partial = partial;
        Ok(())
    }

    /// Decodes the complete frames at the front of `buf`; returns how many bytes they took.
    fn decode_from(&mut self, buf: &[u8], out: &mut VecDeque<Message>) -> Result<usize, WsError> {
        let mut used = 0;
        while let Some(header) = parse_header(&buf[used..])? {
            self.check(&header)?;
            let start = used + header.header_len;
            let Some(end) = start.checked_add(header.payload_len) else {
                return Err(WsError::Overflow(self.max_message));
            };
            if end > buf.len() {
                break;
            }
            let payload = unmask(&buf[start..end], header.mask);
            used = end;
            if let Some(message) = self.frame(header, payload)? {
                out.push_back(message);
            }
        }
        Ok(used)
    }

    /// Rules that can be checked from the header alone, before the payload arrives.
    fn check(&self, h: &Header) -> Result<(), WsError> {
        if h.opcode >= OP_CLOSE {
            if !h.fin {
                return Err(WsError::Protocol("fragmented control frame"));
            }
            if h.payload_len > MAX_CONTROL {
                return Err(WsError::Protocol("control frame longer than 125 bytes"));
            }
            return Ok(());
        }
        let so_far = self.assembling.as_ref().map_or(0, |a| a.payload.len());
        if so_far.saturating_add(h.payload_len) > self.max_message {
            return Err(WsError::Overflow(self.max_message));
        }
        Ok(())
    }

    fn frame(&mut self, h: Header, payload: BytesMut) -> Result<Option<Message>, WsError> {
        match h.opcode {
            OP_CONTINUATION => {
                let Some(mut assembling) = self.assembling.take() else {
                    return Err(WsError::Protocol("continuation frame without a message"));
                };
                assembling.payload.extend_from_slice(&payload);
                if !h.fin {
                    self.assembling = Some(assembling);
                    return Ok(None);
                }
                Ok(Some(finish(assembling.binary, assembling.payload)))
            }
            OP_TEXT | OP_BINARY => {
                if self.assembling.is_some() {
                    return Err(WsError::Protocol("new message before the last one ended"));
                }
                let binary = h.opcode == OP_BINARY;
                if h.fin {
                    return Ok(Some(finish(binary, payload)));
                }
                self.assembling = Some(Assembling { binary, payload });
                Ok(None)
            }
            OP_CLOSE => close_code(&payload).map(|code| Some(Message::Close(code))),
            OP_PING => Ok(Some(Message::Ping(payload.freeze()))),
            OP_PONG => Ok(Some(Message::Pong)),
            _ => Err(WsError::Protocol("unknown opcode")),
        }
    }
}

fn finish(binary: bool, payload: BytesMut) -> Message {
    if binary {
        Message::Binary(payload.freeze())
    } else {
        Message::Text
    }
}

/// Parses the header at the front of `buf`; `None` when more bytes are needed.
fn parse_header(buf: &[u8]) -> Result<Option<Header>, WsError> {
    let (Some(&b0), Some(&b1)) = (buf.first(), buf.get(1)) else {
        return Ok(None);
    };
    if b0 & RSV != 0 {
        return Err(WsError::Protocol(
            "reserved bits set (no extension was negotiated)",
        ));
    }
    if b1 & MASKED == 0 {
        return Err(WsError::Protocol("client frames must be masked"));
    }
    let opcode = b0 & 0x0F;
    let (payload_len, len_bytes) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (usize::from(u16::from_be_bytes([b[0], b[1]])), 2),
            None => return Ok(None),
        },
        127 => match buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
            Some(b) => {
                let len = u64::from_be_bytes(b);
                if len >> 63 != 0 {
                    return Err(WsError::Protocol("payload length with the top bit set"));
                }
                (usize::try_from(len).unwrap_or(usize::MAX), 8)
            }
            None => return Ok(None),
        },
        n => (usize::from(n), 0),
    };
    let mask_at = 2 + len_bytes;
    let Some(mask) = buf
        .get(mask_at..mask_at + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
    else {
        return Ok(None);
    };
    Ok(Some(Header {
        fin: b0 & FIN != 0,
        opcode,
        mask,
        header_len: mask_at + 4,
        payload_len,
    }))
}

fn unmask(masked: &[u8], mask: [u8; 4]) -> BytesMut {
    let mut out = BytesMut::with_capacity(masked.len());
    let mut chunks = masked.chunks_exact(4);
    for chunk in &mut chunks {
        out.put_slice(&[
            chunk[0] ^ mask[0],
            chunk[1] ^ mask[1],
            chunk[2] ^ mask[2],
            chunk[3] ^ mask[3],
        ]);
    }
    for (i, b) in chunks.remainder().iter().enumerate() {
        out.put_u8(b ^ mask[i]);
    }
    out
}

/// The status code of a close frame's payload. RFC 6455 7.4: codes below 1000, the
/// reserved 1004-1006 and 1015, and the unassigned 1016-2999 are not sent on the wire.
fn close_code(payload: &[u8]) -> Result<Option<u16>, WsError> {
    match payload {
        [] => Ok(None),
        [_] => Err(WsError::Protocol("close frame with a one-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(WsError::Protocol("invalid close code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(WsError::Protocol("close reason is not UTF-8"));
            }
            Ok(Some(code))
        }
    }
}

/// Longest header of an unmasked frame.
pub const MAX_HEADER: usize = 10;

/// Appends the header of an unmasked, final frame of `len` payload bytes.
fn put_header(out: &mut BytesMut, opcode: u8, len: usize) {
    out.put_u8(FIN | opcode);
    if len < 126 {
        // Fits the seven-bit length, by the test above.
        out.put_u8(len as u8);
    } else if let Ok(len16) = u16::try_from(len) {
        out.put_u8(126);
        out.put_u16(len16);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
}

/// Appends the header of a binary message of `len` bytes; the caller appends the payload.
/// This is how a push is built: header and frame in one buffer, written to every
/// recipient as it is.
pub fn put_binary_header(out: &mut BytesMut, len: usize) {
    put_header(out, OP_BINARY, len);
}

/// An unmasked frame: header and payload in one buffer.
fn encode(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + MAX_HEADER);
    put_header(&mut out, opcode, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// A binary message carrying `payload`, ready to be written to any number of sockets.
pub fn binary(payload: &[u8]) -> Bytes {
    encode(OP_BINARY, payload)
}

/// A pong answering a ping with `payload`.
pub fn pong(payload: &[u8]) -> Bytes {
    encode(OP_PONG, &payload[..payload.len().min(MAX_CONTROL)])
}

/// A close frame with `code` and `reason` (cut to what fits a control frame).
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(MAX_CONTROL - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(OP_CLOSE, &payload)
}

/// A close frame with no status code (the echo of a peer's close).
pub fn close_empty() -> Bytes {
    encode(OP_CLOSE, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame as a client library would send it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![if fin { FIN } else { 0 } | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(MASKED | len as u8);
        } else if len <= 0xFFFF {
            out.push(MASKED | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(MASKED | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn decode_all(decoder: &mut Decoder, input: &[u8]) -> Result<Vec<Message>, WsError> {
        let mut out = VecDeque::new();
        decoder.feed(input, &mut out)?;
        Ok(out.into_iter().collect())
    }

    #[test]
    fn frames_split_at_every_byte_decode_the_same_and_leave_no_buffer() {
        let big = vec![7u8; 70_000];
        let mut wire = client_frame(true, OP_BINARY, b"hello");
        wire.extend(client_frame(true, OP_PING, b"p"));
        wire.extend(client_frame(true, OP_BINARY, &big));
        wire.extend(client_frame(true, OP_BINARY, &[1u8; 300]));
        let expected = vec![
            Message::Binary(Bytes::from_static(b"hello")),
            Message::Ping(Bytes::from_static(b"p")),
            Message::Binary(Bytes::from(big.clone())),
            Message::Binary(Bytes::from(vec![1u8; 300])),
        ];
        for chunk in [1, 2, 3, 7, 100, 4096, wire.len()] {
            let mut decoder = Decoder::new(100_000);
            let mut out = VecDeque::new();
            for piece in wire.chunks(chunk) {
                decoder.feed(piece, &mut out).unwrap();
            }
            assert_eq!(
                out.into_iter().collect::<Vec<_>>(),
                expected,
                "chunk {chunk}"
            );
            assert!(!decoder.mid_message());
            assert_eq!(decoder.partial.capacity(), 0, "chunk {chunk}");
        }
    }

    #[test]
    fn fragments_are_joined_with_control_frames_between_them() {
        let mut wire = client_frame(false, OP_BINARY, b"ab");
        wire.extend(client_frame(true, OP_PING, b""));
        wire.extend(client_frame(false, OP_CONTINUATION, b"cd"));
        wire.extend(client_frame(true, OP_CONTINUATION, b"e"));
        let mut decoder = Decoder::new(10);
        assert_eq!(
            decode_all(&mut decoder, &wire).unwrap(),
            vec![
                Message::Ping(Bytes::new()),
                Message::Binary(Bytes::from_static(b"abcde"))
            ]
        );
    }

    #[test]
    fn a_long_message_is_refused_from_its_header_or_its_fragments() {
        let mut decoder = Decoder::new(10);
        // Only the header of an 11-byte frame: refused before the payload arrives.
        let frame = client_frame(true, OP_BINARY, &[0u8; 11]);
        assert!(matches!(
            decode_all(&mut decoder, &frame[..6]),
            Err(WsError::Overflow(10))
        ));
        let mut decoder = Decoder::new(10);
        let mut wire = client_frame(false, OP_BINARY, &[0u8; 6]);
        wire.extend(client_frame(true, OP_CONTINUATION, &[0u8; 5]));
        assert!(matches!(
            decode_all(&mut decoder, &wire),
            Err(WsError::Overflow(10))
        ));
        // A 2^63-byte length is a protocol error, not an allocation.
        let mut huge = vec![FIN | OP_BINARY, MASKED | 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert!(matches!(
            decode_all(&mut Decoder::new(10), &huge),
            Err(WsError::Protocol(_))
        ));
    }

    #[test]
    fn broken_frames_are_protocol_errors() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("unmasked", vec![FIN | OP_BINARY, 1, 0]),
            ("rsv", {
                let mut f = client_frame(true, OP_BINARY, b"x");
                f[0] |= 0x40;
                f
            }),
            ("opcode", client_frame(true, 0x3, b"x")),
            ("fragmented ping", client_frame(false, OP_PING, b"x")),
            ("long ping", client_frame(true, OP_PING, &[0; 126])),
            (
                "stray continuation",
                client_frame(true, OP_CONTINUATION, b"x"),
            ),
            ("interleaved", {
                let mut f = client_frame(false, OP_BINARY, b"x");
                f.extend(client_frame(true, OP_BINARY, b"y"));
                f
            }),
            ("close 1 byte", client_frame(true, OP_CLOSE, &[3])),
            (
                "close 1005",
                client_frame(true, OP_CLOSE, &1005u16.to_be_bytes()),
            ),
            (
                "close bad utf8",
                client_frame(true, OP_CLOSE, &[3, 232, 0xff]),
            ),
        ];
        for (name, wire) in cases {
            let result = decode_all(&mut Decoder::new(100), &wire);
            assert!(
                matches!(result, Err(WsError::Protocol(_))),
                "{name}: {result:?}"
            );
        }
    }

    #[test]
    fn text_close_and_pong_are_reported() {
        let mut wire = client_frame(true, OP_TEXT, "hé".as_bytes());
        wire.extend(client_frame(true, OP_PONG, b"x"));
        wire.extend(client_frame(true, OP_CLOSE, &[0x03, 0xe8, b'o', b'k']));
        wire.extend(client_frame(true, OP_CLOSE, &[]));
        assert_eq!(
            decode_all(&mut Decoder::new(100), &wire).unwrap(),
            vec![
                Message::Text,
                Message::Pong,
                Message::Close(Some(1000)),
                Message::Close(None)
            ]
        );
    }

    #[test]
    fn server_frames_are_unmasked_with_the_shortest_length() {
        assert_eq!(&binary(b"ab")[..], &[FIN | OP_BINARY, 2, b'a', b'b']);
        let mid = binary(&[0u8; 200]);
        assert_eq!(&mid[..4], &[FIN | OP_BINARY, 126, 0, 200]);
        assert_eq!(mid.len(), 204);
        let big = binary(&vec![0u8; 70_000]);
        assert_eq!(big[1], 127);
        assert_eq!(big.len(), 70_010);
        let close = close(4001, &"é".repeat(100));
        assert_eq!(close[1] as usize, close.len() - 2);
        assert!(close.len() - 2 <= 125);
        assert_eq!(&close[2..4], &4001u16.to_be_bytes());
        assert_eq!(&pong(b"x")[..], &[FIN | OP_PONG, 1, b'x']);
    }
}
