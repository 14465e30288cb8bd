//! Limits that must hold against a hostile client: connections per user and per source
//! address, the replica's connection maximum, an upgrade request that never ends, rooms per
//! socket, and WebSocket pings (which count against the frame rate, even a flood paced to
//! get a token at every refill, and cannot queue pongs). Real clients over TCP against a real
//! gateway on a real nats-server; no timing assertions.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::*;
use messages::payload::{self, ErrorBody, GatewayControl};
use messages::{CloseCode, ErrorCode, Frame, FrameKind, RoomId, Route};
use testkit::NatsServer;
use testkit::ws::{ConnectError, Received, TestClient, token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn error_of(frame: &Frame) -> ErrorBody {
    assert_eq!(frame.kind, FrameKind::Error, "{frame:?}");
    payload::decode_body(frame.flags.codec(), &frame.body).unwrap()
}

/// Connects until the gateway admits the client (a closed connection's slot is given back
/// when its session has ended, a moment after the client saw the close).
async fn connect_eventually(addr: std::net::SocketAddr, token: &str) -> TestClient {
    for _ in 0..100 {
        match TestClient::connect(addr, token).await {
            Ok(c) => return c,
            Err(ConnectError::Status(429)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => panic!("{e:?}"),
        }
    }
    panic!("the slot was never given back");
}

#[tokio::test]
async fn connections_per_user_are_capped_with_429() {
    let nats = NatsServer::start().unwrap();
    let mut cfg = config(&nats.url(), "gw-per-user");
    cfg.max_connections_per_user = 2;
    let gw = start(cfg).await;
    let alice = token("alice", None, &[]);
    let a1 = TestClient::connect(gw.addr(), &alice).await.unwrap();
    let _a2 = TestClient::connect(gw.addr(), &alice).await.unwrap();
    assert!(matches!(
        TestClient::connect(gw.addr(), &alice).await,
        Err(ConnectError::Status(429))
    ));
    // Another user, and the same id as an agent (another identity), are not affected.
    let _b = TestClient::connect(gw.addr(), &token("bob", None, &[]))
        .await
        .unwrap();
    let _agent = TestClient::connect(gw.addr(), &token("alice", Some("agent"), &[]))
        .await
        .unwrap();
    assert_eq!(
        metric(
            gw.addr(),
            "ws_gateway_rejected_total{reason=\"user_limit\"}"
        )
        .await,
        1.0
    );
    // A closed connection gives its slot back.
    a1.close().await;
    let _a3 = connect_eventually(gw.addr(), &alice).await;
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn connections_per_source_address_are_capped_with_429() {
    let nats = NatsServer::start().unwrap();
    let mut cfg = config(&nats.url(), "gw-per-ip");
    cfg.max_connections_per_ip = 2;
    let gw = start(cfg).await;
    let here: IpAddr = "127.0.0.1".parse().unwrap();
    let there: IpAddr = "127.0.0.2".parse().unwrap();
    let t = |u: &str| token(u, None, &[]);
    let _c1 = TestClient::connect_from(gw.addr(), &t("u1"), here)
        .await
        .unwrap();
    let _c2 = TestClient::connect_from(gw.addr(), &t("u2"), here)
        .await
        .unwrap();
    assert!(matches!(
        TestClient::connect_from(gw.addr(), &t("u3"), here).await,
        Err(ConnectError::Status(429))
    ));
    let _c4 = TestClient::connect_from(gw.addr(), &t("u4"), there)
        .await
        .unwrap();
    assert_eq!(
        metric(gw.addr(), "ws_gateway_rejected_total{reason=\"ip_limit\"}").await,
        1.0
    );
    gw.shutdown().await.unwrap();
}

/// Over the maximum, every client gets a 503 promptly and its connection is closed by the
/// gateway (no keep-alive holding an accept slot), however many try at once.
#[tokio::test]
async fn clients_beyond_the_connection_maximum_get_503_and_a_closed_connection() {
    let nats = NatsServer::start().unwrap();
    let mut cfg = config(&nats.url(), "gw-max");
    cfg.max_connections = 2;
    cfg.workers = 2;
    let gw = start(cfg).await;
    let _a = TestClient::connect(gw.addr(), &token("a", None, &[]))
        .await
        .unwrap();
    let _b = TestClient::connect(gw.addr(), &token("b", None, &[]))
        .await
        .unwrap();
    let addr = gw.addr();
    let attempts: Vec<_> = (0..64)
        .map(|i| {
            tokio::spawn(async move {
                let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                let request = format!(
                    "GET /ws HTTP/1.1\r\nHost: test\r\nConnection: Upgrade, keep-alive\r\n\
                     Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                     Authorization: Bearer {}\r\n\r\n",
                    token(&format!("late-{i}"), None, &[])
                );
                stream.write_all(request.as_bytes()).await.unwrap();
                // Reads to the end: returns only because the gateway closes the connection.
                let mut response = String::new();
                tokio::time::timeout(
                    Duration::from_secs(10),
                    stream.read_to_string(&mut response),
                )
                .await
                .expect("the gateway closes a refused connection")
                .unwrap();
                response
            })
        })
        .collect();
    for attempt in attempts {
        let response = attempt.await.unwrap();
        assert!(response.starts_with("HTTP/1.1 503"), "{response}");
        assert!(response.contains("\"capacity\""), "{response}");
    }
    assert_eq!(
        metric(gw.addr(), "ws_gateway_rejected_total{reason=\"capacity\"}").await,
        64.0
    );
    gw.shutdown().await.unwrap();
}

/// A slowloris upgrade (the request head one byte at a time, never finished) does not
/// hold a connection: the HTTP layer answers 408 once its request timeout (actix-http's
/// 5 s default) has passed, and closes.
#[tokio::test]
async fn an_upgrade_request_that_never_ends_is_answered_408_and_closed() {
    let nats = NatsServer::start().unwrap();
    let gw = start(config(&nats.url(), "gw-slowloris")).await;
    let mut stream = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: test\r\n")
        .await
        .unwrap();
    let (mut r, mut w) = stream.into_split();
    let dribble = tokio::spawn(async move {
        while w.write_all(b"X").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(15), r.read_to_string(&mut response))
        .await
        .expect("the gateway ends a request head that never completes")
        .unwrap();
    dribble.abort();
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn rooms_per_socket_are_capped_counting_pending_joins() {
    let nats = NatsServer::start().unwrap();
    let bus = bus_client(&nats.url()).await;
    let mut cfg = config(&nats.url(), "gw-rooms-cap");
    cfg.max_rooms_per_socket = 2;
    cfg.request_timeout = Duration::from_secs(60);
    let gw = start(cfg).await;
    let mut c = TestClient::connect(gw.addr(), &token("joiner", None, &[]))
        .await
        .unwrap();
    let join = |id: u64, room: &str| {
        Frame::new(FrameKind::Join)
            .with_msg_id(id)
            .with_route(Route::new(room).unwrap())
    };
    // Two joins wait for the services; a third is refused at once.
    c.send(&join(1, "r1")).await;
    c.send(&join(2, "r2")).await;
    c.send(&join(3, "r3")).await;
    let f = c.frame().await;
    assert_eq!(
        (f.msg_id, error_of(&f).code),
        (3, ErrorCode::RateLimited.code())
    );
    // The services accept the first two: the socket is in two rooms.
    for (id, room) in [(1, "r1"), (2, "r2")] {
        let ctl = GatewayControl::Join {
            socket_id: c.welcome.socket_id,
            room: RoomId::new(room).unwrap(),
            msg_id: id,
        };
        control(&bus, "gw-rooms-cap", &ctl).await;
        let ack = c.frame().await;
        assert_eq!((ack.kind, ack.msg_id), (FrameKind::Ack, id));
    }
    c.send(&join(4, "r3")).await;
    let f = c.frame().await;
    assert_eq!(
        (f.msg_id, error_of(&f).code),
        (4, ErrorCode::RateLimited.code())
    );
    // Joining a room it is already in is not a new room.
    c.send(&join(5, "r1")).await;
    // A membership a service adds is capped too.
    let ctl = GatewayControl::Join {
        socket_id: c.welcome.socket_id,
        room: RoomId::new("r9").unwrap(),
        msg_id: 6,
    };
    control(&bus, "gw-rooms-cap", &ctl).await;
    let f = c.frame().await;
    assert_eq!(
        (f.msg_id, error_of(&f).code),
        (6, ErrorCode::RateLimited.code())
    );
    gw.shutdown().await.unwrap();
}

/// Pings take tokens from the frame rate limit: a ping flood is cut off like a frame flood
/// (close 4004), and pings over the limit get no pong.
#[tokio::test]
async fn a_ping_flood_is_rate_limited_and_closed() {
    let nats = NatsServer::start().unwrap();
    let mut cfg = config(&nats.url(), "gw-ping-flood");
    cfg.rate_per_sec = 1;
    cfg.rate_burst = 5;
    let gw = start(cfg).await;
    let mut c = TestClient::connect(gw.addr(), &token("flooder", None, &[]))
        .await
        .unwrap();
    for i in 0..50u32 {
        c.send_ping(&i.to_be_bytes()).await;
    }
    let (pongs, next) = c.pongs_until_frame().await;
    assert!(
        matches!(next, Received::Close(Some(code)) if code == CloseCode::RateLimited.code()),
        "{next:?}"
    );
    assert!(
        pongs.len() <= 6,
        "only pings within the burst are answered: {} pongs",
        pongs.len()
    );
    gw.shutdown().await.unwrap();
}

/// A flood paced at a few times the rate gets a token at every refill; it must still be
/// cut with 4004 (it used to be kept open for good: each admitted ping cleared the count
/// of dropped ones), and a well-behaved client on the same gateway keeps receiving.
#[tokio::test]
async fn a_paced_ping_flood_is_closed_while_a_normal_client_keeps_receiving() {
    let nats = NatsServer::start().unwrap();
    let bus = bus_client(&nats.url()).await;
    let mut cfg = config(&nats.url(), "gw-paced-flood");
    cfg.rate_per_sec = 10;
    cfg.rate_burst = 5;
    let gw = start(cfg).await;
    let mut normal = TestClient::connect(gw.addr(), &token("normal", None, &[]))
        .await
        .unwrap();
    let mut flooder = TestClient::connect(gw.addr(), &token("flooder", None, &[]))
        .await
        .unwrap();
    // 50 pings a second (5x the rate) for at most 5 s, reading between them.
    let mut ended = None;
    for i in 0..250u32 {
        flooder.send_ping(&i.to_be_bytes()).await;
        match flooder
            .pongs_until_frame_within(Duration::from_millis(20))
            .await
        {
            (_, Received::Timeout) => {}
            (_, other) => {
                ended = Some(other);
                break;
            }
        }
    }
    assert!(
        matches!(ended, Some(Received::Close(Some(code))) if code == CloseCode::RateLimited.code()),
        "{ended:?}"
    );
    let subject = messages::subject::user(&messages::UserId::new("normal").unwrap());
    for i in 1..=3u64 {
        push(&bus, &subject, i, b"still here").await;
        assert_eq!(normal.frame().await.msg_id, i);
    }
    gw.shutdown().await.unwrap();
}

/// A client that pings without reading cannot make the gateway queue pongs: only the
/// latest ping is answered once the socket drains (RFC 6455, 5.5.3), and the session is
/// fine afterwards.
#[tokio::test]
async fn pongs_are_coalesced_for_a_client_that_does_not_read() {
    let nats = NatsServer::start().unwrap();
    let mut cfg = config(&nats.url(), "gw-pong-queue");
    cfg.rate_per_sec = 10_000_000;
    cfg.rate_burst = 10_000_000;
    // The client stops reading for a while on purpose; that alone must not close it.
    cfg.write_timeout = Duration::from_secs(120);
    let gw = start(cfg).await;
    let mut c =
        TestClient::connect_with(gw.addr(), Some(&token("silent", None, &[])), "", Some(4096))
            .await
            .unwrap();
    // About 12 MB of pongs if each were answered: far more than the socket buffers hold.
    const PINGS: u32 = 100_000;
    let mut payload = [0u8; 125];
    for i in 0..PINGS {
        payload[..4].copy_from_slice(&i.to_be_bytes());
        c.send_ping(&payload).await;
    }
    c.send(&Frame::new(FrameKind::Heartbeat)).await;
    let (pongs, next) = c.pongs_until_frame().await;
    assert!(
        matches!(&next, Received::Frame(f) if f.kind == FrameKind::HeartbeatAck),
        "{next:?}"
    );
    let last = pongs.last().expect("the latest ping is answered");
    assert_eq!(
        last[..4],
        (PINGS - 1).to_be_bytes(),
        "the last pong answers the last ping"
    );
    assert!(
        pongs.len() < PINGS as usize,
        "pongs were coalesced: {} for {PINGS} pings",
        pongs.len()
    );
    gw.shutdown().await.unwrap();
}
