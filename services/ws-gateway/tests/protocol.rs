//! The rules of docs/protocol.md that a client author relies on, checked the way such a
//! client meets them: a real WebSocket client over TCP against a real gateway on a real
//! nats-server. Each test names the section it holds the gateway to.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use messages::payload::{self, ErrorBody, GatewayControl, HeartbeatAck};
use messages::{BodyCodec, CloseCode, ErrorCode, Frame, FrameKind, RoomId, Route, headers};
use testkit::NatsServer;
use testkit::ws::{Received, TestClient, token};

fn error_of(frame: &Frame) -> ErrorBody {
    assert_eq!(frame.kind, FrameKind::Error, "{frame:?}");
    payload::decode_body(frame.flags.codec(), &frame.body).unwrap()
}

/// A 12-byte frame of `kind` with message id 3, to be spoiled byte by byte.
fn base(kind: FrameKind) -> Vec<u8> {
    Frame::new(kind).with_msg_id(3).encode().to_vec()
}

/// Section 8: every decoder error, and a text message, is answered with an error frame
/// (message id 0, the error's code) and the connection is closed with the error's close code.
#[tokio::test]
async fn every_decoder_error_closes_with_its_code_after_an_error_frame_with_id_0() {
    let nats = NatsServer::start().unwrap();
    let gw = start(config(&nats.url(), "gw-decode")).await;

    let with = |i: usize, v: u8| {
        let mut b = base(FrameKind::Heartbeat);
        b[i] = v;
        b
    };
    let route = |route: &[u8]| {
        let mut b = base(FrameKind::Publish);
        b[3] = u8::try_from(route.len()).unwrap();
        b.extend_from_slice(route);
        b
    };
    let mut zero_trace = with(2, 0x08);
    zero_trace.extend_from_slice(&[0; 25]);
    let mut too_big = route(b"x");
    too_big.extend(std::iter::repeat_n(0u8, 64 * 1024 + 1));
    let bad_frame = ErrorCode::BadFrame.code();
    let bad_route = ErrorCode::BadRoute.code();
    let protocol = CloseCode::ProtocolError.code();
    let cases: Vec<(&str, Option<Vec<u8>>, u16, u16)> = vec![
        ("unknown kind", Some(with(1, 99)), bad_frame, protocol),
        ("kind 0", Some(with(1, 0)), bad_frame, protocol),
        (
            "reserved flag 0x20",
            Some(with(2, 0x20)),
            bad_frame,
            protocol,
        ),
        (
            "reserved flag 0x80",
            Some(with(2, 0x80)),
            bad_frame,
            protocol,
        ),
        ("codec 3", Some(with(2, 0x03)), bad_frame, protocol),
        (
            "all-zero trace context",
            Some(zero_trace),
            bad_frame,
            protocol,
        ),
        (
            "truncated",
            Some(base(FrameKind::Heartbeat)[..11].to_vec()),
            bad_frame,
            protocol,
        ),
        (
            "route over the limit",
            Some(route(&[b'a'; 200])),
            bad_route,
            protocol,
        ),
        ("bad route byte", Some(route(b"a*b")), bad_route, protocol),
        (
            "empty route token",
            Some(route(b"a..b")),
            bad_route,
            protocol,
        ),
        ("leading dot", Some(route(b".a")), bad_route, protocol),
        (
            "version 9",
            Some(with(0, 9)),
            ErrorCode::UnsupportedVersion.code(),
            CloseCode::UnsupportedVersion.code(),
        ),
        (
            "body over the limit",
            Some(too_big),
            ErrorCode::TooLarge.code(),
            CloseCode::FrameTooLarge.code(),
        ),
        ("text message", None, bad_frame, protocol),
    ];
    for (i, (case, bytes, code, close)) in cases.into_iter().enumerate() {
        let user = format!("buggy-{i}");
        let mut c = TestClient::connect(gw.addr(), &token(&user, None, &[]))
            .await
            .unwrap();
        match bytes {
            Some(bytes) => c.send_raw(bytes).await,
            None => c.send_text("hello?").await,
        }
        let f = c.frame().await;
        assert_eq!(
            (f.msg_id, error_of(&f).code),
            (0, code),
            "{case}: the error frame"
        );
        assert_eq!(c.closed().await, Some(close), "{case}: the close code");
    }
    gw.shutdown().await.unwrap();
}

/// Section 3: flag bit 4 (`0x10`) is the receipt bit, not a reserved one; a client frame
/// with it set decodes (clients should not set it, and the gateway ignores it).
#[tokio::test]
async fn the_receipt_bit_is_not_a_reserved_flag() {
    let nats = NatsServer::start().unwrap();
    let gw = start(config(&nats.url(), "gw-receipt-bit")).await;
    let mut c = TestClient::connect(gw.addr(), &token("rita", None, &[]))
        .await
        .unwrap();
    let mut beat = base(FrameKind::Heartbeat);
    beat[2] = 0x10;
    c.send_raw(beat).await;
    match c.recv().await {
        Received::Frame(f) if f.kind == FrameKind::HeartbeatAck => {}
        other => panic!("expected a heartbeat ack, got {other:?}"),
    }
    gw.shutdown().await.unwrap();
}

/// Sections 4 and 7.3: message id 0 asks for no ack; errors about such a frame are still
/// sent, with id 0, and the connection stays. Acks have an empty body (codec raw).
#[tokio::test]
async fn id_0_gets_no_ack_but_its_errors_and_acks_have_empty_bodies() {
    let nats = NatsServer::start().unwrap();
    let bus = bus_client(&nats.url()).await;
    let mut sub = bus.subscribe("ws.msg.app.>").await.unwrap();
    bus.flush().await.unwrap();
    let gw = start(config(&nats.url(), "gw-id0")).await;
    let mut c = TestClient::connect(gw.addr(), &token("zed", None, &[]))
        .await
        .unwrap();

    let publish = |id: u64, route: &str| {
        Frame::new(FrameKind::Publish)
            .with_msg_id(id)
            .with_route(Route::new(route).unwrap())
            .with_body(BodyCodec::Json, b"{}".to_vec())
    };
    // Fire and forget: it reaches the bus, and the next frame the client gets is the
    // answer to its heartbeat, not an ack.
    c.send(&publish(0, "orders.new")).await;
    assert_eq!(
        next(&mut sub).await.subject.as_str(),
        "ws.msg.app.orders.new"
    );
    c.send(&Frame::new(FrameKind::Heartbeat)).await;
    match c.recv().await {
        Received::Frame(f) if f.kind == FrameKind::HeartbeatAck => {
            let _: HeartbeatAck = payload::decode_body(f.flags.codec(), &f.body).unwrap();
        }
        other => panic!("expected only a heartbeat ack, got {other:?}"),
    }

    // A refusal is reported even for id 0 (with id 0), and the connection stays.
    c.send(&Frame::new(FrameKind::Publish)).await;
    let f = c.frame().await;
    assert_eq!(
        (f.msg_id, error_of(&f).code),
        (0, ErrorCode::BadRoute.code())
    );

    // With an id: an ack with that id and an empty body, codec raw.
    c.send(&publish(5, "orders.new")).await;
    let ack = c.frame().await;
    assert_eq!((ack.kind, ack.msg_id), (FrameKind::Ack, 5));
    assert!(ack.body.is_empty(), "ack body: {:?}", ack.body);
    assert_eq!(ack.flags.codec(), BodyCodec::Raw);
    gw.shutdown().await.unwrap();
}

/// Sections 7.4 and 12.3: a join request on the bus carries the `ws-room` header; the
/// services' acceptance becomes an ack with an empty body; a service's join with msg_id 0
/// is not acked.
#[tokio::test]
async fn join_requests_carry_ws_room_and_the_join_ack_is_empty() {
    let nats = NatsServer::start().unwrap();
    let bus = bus_client(&nats.url()).await;
    let mut joins = bus.subscribe("ws.evt.app.join").await.unwrap();
    let mut leaves = bus.subscribe("ws.evt.app.leave").await.unwrap();
    bus.flush().await.unwrap();
    let gw = start(config(&nats.url(), "gw-room-hdr")).await;
    let mut c = TestClient::connect(gw.addr(), &token("ruth", None, &[]))
        .await
        .unwrap();
    c.send(
        &Frame::new(FrameKind::Join)
            .with_msg_id(8)
            .with_route(Route::new("chat.lobby").unwrap()),
    )
    .await;
    let request = next(&mut joins).await;
    let h = request.headers.as_ref().unwrap();
    assert_eq!(headers::get(h, headers::ROOM), Some("chat.lobby"));
    assert_eq!(headers::get(h, headers::OPERATION), Some("join"));
    let room = RoomId::new("chat.lobby").unwrap();
    for msg_id in [0, 8] {
        let join = GatewayControl::Join {
            socket_id: c.welcome.socket_id,
            room: room.clone(),
            msg_id,
        };
        control(&bus, "gw-room-hdr", &join).await;
    }
    let ack = c.frame().await;
    assert_eq!(
        (ack.kind, ack.msg_id),
        (FrameKind::Ack, 8),
        "no ack for msg_id 0"
    );
    assert!(ack.body.is_empty());
    assert_eq!(ack.flags.codec(), BodyCodec::Raw);

    c.send(
        &Frame::new(FrameKind::Leave)
            .with_msg_id(9)
            .with_route(Route::new("chat.lobby").unwrap()),
    )
    .await;
    let request = next(&mut leaves).await;
    let h = request.headers.as_ref().unwrap();
    assert_eq!(headers::get(h, headers::ROOM), Some("chat.lobby"));
    gw.shutdown().await.unwrap();
}

/// Sections 1.1 and 7.2: WebSocket pings (and unsolicited pongs) are answered by the
/// WebSocket layer but do not keep a session alive; only frames of the protocol do.
#[tokio::test]
async fn websocket_pings_do_not_keep_a_session_alive() {
    let nats = NatsServer::start().unwrap();
    let mut cfg = config(&nats.url(), "gw-pings");
    cfg.heartbeat.base_ms = 300;
    cfg.heartbeat.max_ms = 300;
    cfg.heartbeat.grace_ms = 300;
    let gw = start(cfg).await;
    let mut c = TestClient::connect(gw.addr(), &token("pinger", None, &[]))
        .await
        .unwrap();
    let mut pongs = 0;
    let code = 'outer: {
        // Far longer than interval + grace, at a ping every 50 ms.
        for _ in 0..200 {
            c.send_ping(b"still here").await;
            c.send_pong(b"unasked").await;
            let (got, next) = c.pongs_until_frame_within(Duration::from_millis(50)).await;
            pongs += got.len();
            match next {
                Received::Timeout => {}
                Received::Close(code) => break 'outer code,
                other => panic!("expected nothing but pongs and a close, got {other:?}"),
            }
        }
        panic!("pings kept the session alive");
    };
    assert_eq!(code, Some(CloseCode::HeartbeatTimeout.code()));
    assert!(pongs > 0, "pings are answered");
    gw.shutdown().await.unwrap();
}

/// Section 9.1: a close a service requests carries the service's code and reason (cut to
/// 123 bytes); a code the gateway does not know is sent as 4503.
#[tokio::test]
async fn a_service_close_keeps_its_reason() {
    let nats = NatsServer::start().unwrap();
    let bus = bus_client(&nats.url()).await;
    let gw = start(config(&nats.url(), "gw-kick")).await;
    let mut a = TestClient::connect(gw.addr(), &token("kim", None, &[]))
        .await
        .unwrap();
    let mut b = TestClient::connect(gw.addr(), &token("lee", None, &[]))
        .await
        .unwrap();
    let close = |client: &TestClient, code: u16, reason: &str| GatewayControl::Close {
        socket_id: client.welcome.socket_id,
        code,
        reason: reason.to_owned(),
    };
    control(
        &bus,
        "gw-kick",
        &close(&a, 4502, "session revoked by admin"),
    )
    .await;
    assert_eq!(
        a.close_frame().await,
        Some((4502, "session revoked by admin".to_owned()))
    );
    let long = "x".repeat(300);
    control(&bus, "gw-kick", &close(&b, 4999, &long)).await;
    assert_eq!(b.close_frame().await, Some((4503, "x".repeat(123))));
    gw.shutdown().await.unwrap();
}

/// Section 1.2: the WebSocket endpoint is `/ws`; other paths are not upgraded.
#[tokio::test]
async fn the_websocket_endpoint_is_ws() {
    let nats = NatsServer::start().unwrap();
    let gw = start(config(&nats.url(), "gw-path")).await;
    assert!(
        TestClient::connect(gw.addr(), &token("pat", None, &[]))
            .await
            .is_ok()
    );
    let (status, _) = http_get(gw.addr(), "/socket").await;
    assert_eq!(status, 404);
    gw.shutdown().await.unwrap();
}

/// Section 1.2: a plain `GET /ws` (no upgrade) is authenticated like a handshake and then
/// answered 426 `upgrade_required` with `Upgrade: websocket`; a bad or missing token gets
/// the handshake's 401.
#[tokio::test]
async fn a_plain_get_on_ws_is_authenticated_then_answered_426() {
    let nats = NatsServer::start().unwrap();
    let gw = start(config(&nats.url(), "gw-plain")).await;
    let good = format!("/ws?token={}", token("pat", None, &[]));
    let r = testkit::http::request(gw.addr(), "GET", &good, &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 426);
    assert_eq!(r.json()["error"], "upgrade_required");
    for path in ["/ws?token=not-a-jwt", "/ws"] {
        let r = testkit::http::request(gw.addr(), "GET", path, &[], b"")
            .await
            .unwrap();
        assert_eq!(
            (r.status, r.json()["error"].clone()),
            (401, "unauthorized".into())
        );
    }
    gw.shutdown().await.unwrap();
}

/// A WebSocket client written by hand over a raw socket, for what library clients never
/// send: fragments with a ping between them, unmasked frames, reserved bits.
mod raw {
    use std::net::SocketAddr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    pub(crate) struct Raw {
        stream: TcpStream,
        buf: Vec<u8>,
    }

    impl Raw {
        /// Handshake on `/ws` with `token`; panics unless the answer is 101.
        pub(crate) async fn connect(addr: SocketAddr, token: &str) -> Raw {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let request = format!(
                "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                 Authorization: Bearer {token}\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut raw = Raw {
                stream,
                buf: Vec::new(),
            };
            let end = loop {
                if let Some(i) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                raw.fill().await;
            };
            let head = String::from_utf8_lossy(&raw.buf[..end]).to_string();
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            // RFC 6455's example key has this accept value.
            assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
            raw.buf.drain(..end);
            raw
        }

        async fn fill(&mut self) {
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(testkit::ws::WAIT, self.stream.read(&mut chunk))
                .await
                .expect("the gateway sent nothing")
                .unwrap();
            assert!(n > 0, "the connection ended");
            self.buf.extend_from_slice(&chunk[..n]);
        }

        /// Sends one frame: `first` is FIN/RSV/opcode, masked unless `unmasked`.
        pub(crate) async fn send(&mut self, first: u8, payload: &[u8], unmasked: bool) {
            let mask = [1u8, 2, 3, 4];
            let mut out = vec![first];
            let len = payload.len();
            let bit = if unmasked { 0 } else { 0x80 };
            if len < 126 {
                out.push(bit | len as u8);
            } else {
                out.push(bit | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            if unmasked {
                out.extend_from_slice(payload);
            } else {
                out.extend_from_slice(&mask);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            }
            self.stream.write_all(&out).await.unwrap();
        }

        /// The next frame from the gateway: opcode and payload.
        pub(crate) async fn recv(&mut self) -> (u8, Vec<u8>) {
            loop {
                if self.buf.len() >= 2 {
                    assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
                    let (len, at) = match self.buf[1] & 0x7f {
                        126 if self.buf.len() >= 4 => (
                            usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]])),
                            4,
                        ),
                        127 if self.buf.len() >= 10 => (
                            u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                            10,
                        ),
                        126 | 127 => (usize::MAX, 0),
                        n => (usize::from(n), 2),
                    };
                    if len != usize::MAX && self.buf.len() >= at + len {
                        let opcode = self.buf[0] & 0x0f;
                        let payload = self.buf[at..at + len].to_vec();
                        self.buf.drain(..at + len);
                        return (opcode, payload);
                    }
                }
                self.fill().await;
            }
        }

        /// Skips frames until a close; returns its code.
        pub(crate) async fn close_code(&mut self) -> u16 {
            loop {
                let (opcode, payload) = self.recv().await;
                if opcode == 0x8 {
                    return u16::from_be_bytes([payload[0], payload[1]]);
                }
            }
        }
    }
}

/// Section 1.1: a protocol frame may arrive as a fragmented WebSocket message, with
/// control frames between the fragments; the gateway reassembles it.
#[tokio::test]
async fn a_fragmented_message_is_one_frame_and_pings_between_fragments_are_answered() {
    let nats = NatsServer::start().unwrap();
    let gw = start(config(&nats.url(), "gw-frag")).await;
    let mut raw = raw::Raw::connect(gw.addr(), &token("frag", None, &[])).await;
    let (opcode, welcome) = raw.recv().await;
    assert_eq!(opcode, 0x2);
    assert_eq!(
        Frame::decode(&bytes::Bytes::from(welcome), &Default::default())
            .unwrap()
            .kind,
        FrameKind::Welcome
    );

    let heartbeat = Frame::new(FrameKind::Heartbeat).with_msg_id(5).encode();
    let (a, b) = heartbeat.split_at(5);
    raw.send(0x02, a, false).await; // binary, not final
    raw.send(0x89, b"between", false).await; // ping
    raw.send(0x80, b, false).await; // final continuation
    let (opcode, pong) = raw.recv().await;
    assert_eq!((opcode, pong.as_slice()), (0xA, &b"between"[..]));
    let (opcode, ack) = raw.recv().await;
    assert_eq!(opcode, 0x2);
    let ack = Frame::decode(&bytes::Bytes::from(ack), &Default::default()).unwrap();
    assert_eq!((ack.kind, ack.msg_id), (FrameKind::HeartbeatAck, 5));
    gw.shutdown().await.unwrap();
}

/// Section 1.1: a WebSocket-level violation (here an unmasked client frame, reserved
/// bits, a stray continuation) closes the connection with 4500.
#[tokio::test]
async fn websocket_violations_close_with_4500() {
    let nats = NatsServer::start().unwrap();
    let gw = start(config(&nats.url(), "gw-rfc")).await;
    let frame = Frame::new(FrameKind::Heartbeat).with_msg_id(1).encode();
    for (name, first, unmasked) in [
        ("unmasked", 0x82, true),
        ("reserved bit", 0xC2, false),
        ("stray continuation", 0x80, false),
    ] {
        let mut raw = raw::Raw::connect(gw.addr(), &token("rfc", None, &[])).await;
        raw.send(first, &frame, unmasked).await;
        assert_eq!(
            raw.close_code().await,
            CloseCode::ProtocolError.code(),
            "{name}"
        );
    }
    gw.shutdown().await.unwrap();
}
