//! The peer client: a subscriber on nats-server's own WebSocket listener, for comparing raw
//! fan-out against the gateway. It speaks just enough of the NATS client protocol over
//! WebSocket: read `INFO`, send `CONNECT` + `SUB` + `PING`, treat the `PONG` as "the
//! subscription is live" (the analogue of the gateway's welcome), then parse `MSG` lines
//! and their payloads out of the byte stream and answer `PING`s.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::client::{BoxError, Ws};

/// Subject the peer subscribers listen on.
pub(crate) const SUBJECT: &str = "bench.all";

/// One protocol event parsed out of the stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// A message payload.
    Msg(Vec<u8>),
    /// The server pings: answer PONG.
    Ping,
    /// The server answered our PING.
    Pong,
    /// `-ERR ...`.
    Err(String),
}

/// Incremental parser of the server -> client protocol.
#[derive(Debug, Default)]
pub(crate) struct Parser {
    buf: Vec<u8>,
}

impl Parser {
    /// Feeds bytes; returns the complete events they finish.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Vec<Event> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut pos = 0;
        loop {
            let rest = &self.buf[pos..];
            let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                break;
            };
            let line = &rest[..eol];
            if line.starts_with(b"MSG ") || line.starts_with(b"HMSG ") {
                let text = String::from_utf8_lossy(line);
                let size: usize = text
                    .split_whitespace()
                    .last()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                // HMSG: headers and payload are one block of `size` bytes; the payload
                // follows the headers' blank line.
                let hdr: usize = if line.starts_with(b"HMSG ") {
                    text.split_whitespace()
                        .rev()
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0)
                } else {
                    0
                };
                let need = eol + 2 + size + 2;
                if rest.len() < need {
                    break;
                }
                let block = &rest[eol + 2..eol + 2 + size];
                out.push(Event::Msg(block.get(hdr..).unwrap_or_default().to_vec()));
                pos += need;
                continue;
            }
            if line == b"PING" {
                out.push(Event::Ping);
            } else if line == b"PONG" {
                out.push(Event::Pong);
            } else if line.starts_with(b"-ERR") {
                out.push(Event::Err(String::from_utf8_lossy(line).into_owned()));
            }
            pos += eol + 2;
        }
        self.buf.drain(..pos);
        out
    }
}

/// Connects to nats-server's WebSocket listener at `url` from `source`, subscribes to
/// [`SUBJECT`], and returns once the server has answered the PING after the SUB.
pub(crate) async fn connect(url: &str, source: Ipv4Addr) -> Result<(Ws, Parser), BoxError> {
    let request = url.into_client_request()?;
    let host = request.uri().host().ok_or("url without host")?.to_owned();
    let port = request.uri().port_u16().unwrap_or(80);
    let target = SocketAddr::new(host.parse::<IpAddr>()?, port);
    let socket = TcpSocket::new_v4()?;
    if target.ip().is_loopback() {
        socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    }
    let stream = socket.connect(target).await?;
    stream.set_nodelay(true)?;
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        request,
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
        Some(config),
    )
    .await?;
    let hello = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1,\"name\":\"loadtest\"}}\r\nSUB {SUBJECT} 1\r\nPING\r\n"
    );
    ws.send(Message::Binary(hello.into_bytes().into())).await?;
    let mut parser = Parser::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await?
            .ok_or("closed before PONG")??;
        let bytes = match msg {
            Message::Binary(b) => b.to_vec(),
            Message::Text(t) => t.as_bytes().to_vec(),
            Message::Close(c) => return Err(format!("closed before PONG: {c:?}").into()),
            _ => continue,
        };
        for e in parser.feed(&bytes) {
            match e {
                Event::Pong => return Ok((ws, parser)),
                Event::Ping => {
                    ws.send(Message::Binary(b"PONG\r\n".to_vec().into()))
                        .await?;
                }
                Event::Err(e) => return Err(e.into()),
                Event::Msg(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_split_messages_and_pings() {
        let mut p = Parser::default();
        assert!(p.feed(b"INFO {}\r\nMSG bench.all 1 5\r\nhel").is_empty());
        assert_eq!(
            p.feed(b"lo\r\nPING\r\n"),
            vec![Event::Msg(b"hello".to_vec()), Event::Ping]
        );
        assert_eq!(
            p.feed(b"HMSG s 1 12 14\r\nNATS/1.0\r\n\r\nhi\r\nPONG\r\n"),
            vec![Event::Msg(b"hi".to_vec()), Event::Pong]
        );
    }
}
