//! A raw WebSocket client for the hostile clients: the HTTP upgrade written by hand, client
//! frames encoded by hand (so they can be wrong on purpose: garbage, a length over the
//! limit, a text message) and server frames parsed from a byte buffer. tungstenite cannot
//! serve here: it refuses to send what the gateway must refuse, and a client that stops
//! reading needs the socket itself.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::client::BoxError;

/// WebSocket opcodes (RFC 6455, 5.2).
pub(super) mod op {
    /// A text message (not part of the protocol: the gateway must refuse it).
    pub(crate) const TEXT: u8 = 0x1;
    /// A binary message (one protocol frame).
    pub(crate) const BINARY: u8 = 0x2;
    /// Close.
    pub(crate) const CLOSE: u8 = 0x8;
    /// Ping.
    pub(crate) const PING: u8 = 0x9;
}

/// The longest response head the upgrade reads before giving up.
const MAX_HEAD: usize = 8192;

/// Where to connect: the gateway's address and the `/ws` path's `Host`.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// Gateway address.
    pub addr: SocketAddr,
    /// `host:port` for the `Host` header.
    pub host: String,
    /// Request path (`/ws`).
    pub path: String,
}

impl Target {
    /// Parses a `ws://host:port/path` URL with a literal IP address (loopback runs).
    pub(crate) fn parse(url: &str) -> Result<Self, BoxError> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or("hostile clients need a ws:// URL")?;
        let (host, path) = rest.split_once('/').unwrap_or((rest, "ws"));
        Ok(Target {
            addr: host.parse()?,
            host: host.to_owned(),
            path: format!("/{path}"),
        })
    }
}

/// A TCP connection from `source` (a 127.0.0.x address), with a small receive buffer when
/// `rcvbuf` is given (a client that stops reading fills it sooner).
pub(super) async fn tcp(
    target: &Target,
    source: Ipv4Addr,
    rcvbuf: Option<u32>,
) -> Result<TcpStream, BoxError> {
    let socket = TcpSocket::new_v4()?;
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size)?;
    }
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let stream = socket.connect(target.addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The upgrade request, with the token in the `Authorization` header.
pub(super) fn upgrade_request(target: &Target, token: &str) -> Vec<u8> {
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n",
        target.path, target.host
    )
    .into_bytes()
}

/// Sends the upgrade and reads the response head; returns the status and whatever bytes
/// came after the head (the start of the first frames).
pub(super) async fn upgrade(
    stream: &mut TcpStream,
    target: &Target,
    token: &str,
) -> Result<(u16, Vec<u8>), BoxError> {
    stream.write_all(&upgrade_request(target, token)).await?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        if let Some(end) = find_head_end(&buf) {
            let status = status_of(&buf[..end]).ok_or("unreadable status line")?;
            return Ok((status, buf[end..].to_vec()));
        }
        if buf.len() > MAX_HEAD {
            return Err("response head too long".into());
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err("closed during the upgrade".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The end of an HTTP head (just after the blank line), if it is complete.
pub(super) fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The status code of an HTTP response head.
pub(super) fn status_of(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// A masked client frame with FIN set. `announced` overrides the payload length written in
/// the header (a frame that claims more than it carries).
pub(super) fn client_frame(opcode: u8, payload: &[u8], announced: Option<u64>) -> Vec<u8> {
    let len = announced.unwrap_or(payload.len() as u64);
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | (opcode & 0x0f));
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u64::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    // A fixed key is as good as any: the mask is not a secret, only mandatory.
    let key = [0x37, 0xfa, 0x21, 0x3d];
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

/// A server frame read from the front of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ServerFrame {
    /// Opcode.
    pub opcode: u8,
    /// Unmasked payload.
    pub payload: Vec<u8>,
}

impl ServerFrame {
    /// The close code of a close frame (none for other frames or an empty close).
    pub(super) fn close_code(&self) -> Option<u16> {
        if self.opcode != op::CLOSE {
            return None;
        }
        let b = self.payload.get(..2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
}

/// Parses one server frame from the front of `buf`; `None` until it is complete. Returns
/// the frame and the bytes it took.
pub(super) fn parse_server_frame(buf: &[u8]) -> Option<(ServerFrame, usize)> {
    let b0 = *buf.first()?;
    let b1 = *buf.get(1)?;
    let (len, mut at) = match b1 & 0x7f {
        126 => (
            u64::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])),
            4,
        ),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mask = if b1 & 0x80 != 0 {
        let key: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(key)
    } else {
        None
    };
    let len = usize::try_from(len).ok()?;
    let end = at.checked_add(len)?;
    let mut payload = buf.get(at..end)?.to_vec();
    if let Some(key) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    Some((
        ServerFrame {
            opcode: b0 & 0x0f,
            payload,
        },
        end,
    ))
}

/// Takes every complete server frame off the front of `buf`.
pub(super) fn drain_frames(buf: &mut Vec<u8>) -> Vec<ServerFrame> {
    let mut frames = Vec::new();
    let mut taken = 0;
    while let Some((frame, n)) = parse_server_frame(&buf[taken..]) {
        frames.push(frame);
        taken += n;
    }
    buf.drain(..taken);
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_frame_parses_back_with_its_mask_removed() {
        for len in [0usize, 5, 125, 126, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let bytes = client_frame(op::BINARY, &payload, None);
            let (frame, n) = parse_server_frame(&bytes).unwrap_or_else(|| panic!("len {len}"));
            assert_eq!(n, bytes.len());
            assert_eq!(frame.opcode, op::BINARY);
            assert_eq!(frame.payload, payload);
        }
    }

    #[test]
    fn close_codes_and_heads_are_read() {
        let mut buf = vec![0x88, 0x02, 0x11, 0x94, 0x82];
        let frames = drain_frames(&mut buf);
        assert_eq!(frames[0].close_code(), Some(4500));
        assert_eq!(buf, vec![0x82]);
        let head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\nxx";
        let end = find_head_end(head).unwrap_or(0);
        assert_eq!(&head[end..], b"xx");
        assert_eq!(status_of(&head[..end]), Some(101));
        assert!(Target::parse("ws://127.0.0.1:19081/ws").is_ok());
    }
}
