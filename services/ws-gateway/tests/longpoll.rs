//! HTTP long-polling against real replicas: a real nats-server, two gateways on port 0,
//! plain HTTP requests and a real WebSocket for the upgrade. No timing assertions.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use messages::longpoll::{decode_batch, encode_batch};
use messages::payload::{self, Welcome};
use messages::{Frame, FrameKind, Limits, Route, UserId};
use testkit::NatsServer;
use testkit::http::{Response, request};
use testkit::ws::token;
use tokio_tungstenite::tungstenite;

fn frames_of(r: &Response) -> Vec<Frame> {
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    decode_batch(&r.body, 1 << 20)
        .unwrap()
        .into_iter()
        .map(|f| Frame::decode(&bytes::Bytes::copy_from_slice(f), &Limits::default()).unwrap())
        .collect()
}

async fn handshake(addr: SocketAddr, user: &str) -> serde_json::Value {
    let path = format!("/lp?codec=json&token={}", token(user, None, &[]));
    let r = request(addr, "GET", &path, &[], b"").await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

async fn poll(addr: SocketAddr, sid: &str, user: &str) -> Response {
    let path = format!("/lp?sid={sid}&token={}", token(user, None, &[]));
    request(addr, "GET", &path, &[], b"").await.unwrap()
}

async fn post(addr: SocketAddr, sid: &str, user: &str, frames: &[Frame]) -> Response {
    let encoded: Vec<Vec<u8>> = frames.iter().map(|f| f.encode().to_vec()).collect();
    let body = encode_batch(encoded.iter().map(|f| &f[..]));
    post_raw(addr, sid, user, &body).await
}

async fn post_raw(addr: SocketAddr, sid: &str, user: &str, body: &[u8]) -> Response {
    let path = format!("/lp?sid={sid}");
    let auth = format!("Bearer {}", token(user, None, &[]));
    request(addr, "POST", &path, &[("authorization", &auth)], body)
        .await
        .unwrap()
}

/// Polls until a frame of `kind` arrives (heartbeat acks and the like are skipped).
async fn poll_for(addr: SocketAddr, sid: &str, user: &str, kind: FrameKind) -> Frame {
    for _ in 0..20 {
        for frame in frames_of(&poll(addr, sid, user).await) {
            if frame.kind == kind {
                return frame;
            }
        }
    }
    panic!("no {kind} frame");
}

fn error_of(r: &Response) -> String {
    r.json()["error"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_long_poll_session_works_through_either_replica_and_refuses_strangers() {
    let nats = NatsServer::start().unwrap();
    let mut cfg = config(&nats.url(), "gw-lp-1");
    cfg.longpoll_wait = Duration::from_millis(500);
    let gw1 = start(cfg.clone()).await;
    cfg.instance = messages::GatewayId::new("gw-lp-2").unwrap();
    let gw2 = start(cfg).await;
    let (a1, a2) = (gw1.addr(), gw2.addr());
    let bus = bus_client(&nats.url()).await;

    // Seed 002's handshake, then the welcome as the first frame of the first poll.
    let hs = handshake(a1, "alice").await;
    let sid = hs["sid"].as_str().unwrap().to_owned();
    assert_eq!(hs["upgrades"], serde_json::json!(["websocket"]));
    assert_eq!(hs["pingInterval"], 10_000);
    assert_eq!(hs["pingTimeout"], 20_000);
    let welcome = poll_for(a1, &sid, "alice", FrameKind::Welcome).await;
    let welcome: Welcome = payload::decode_body(welcome.flags.codec(), &welcome.body).unwrap();
    assert_eq!(welcome.user_id.as_str(), "alice");
    assert!(sid.starts_with(&format!("{}.", welcome.socket_id.0)));

    // A push to the user reaches the session; the poll went to the other replica and was
    // forwarded to the owner over the bus.
    let user = messages::subject::user(&UserId::new("alice").unwrap());
    push(&bus, &user, 41, b"hello").await;
    let pushed = poll_for(a2, &sid, "alice", FrameKind::Push).await;
    assert_eq!((pushed.msg_id, &pushed.body[..]), (41, &b"hello"[..]));

    // A publish POSTed to the other replica reaches the bus, and its ack the next poll.
    let mut upstream = bus.subscribe("ws.msg.app.>").await.unwrap();
    bus.flush().await.unwrap();
    let publish = Frame::new(FrameKind::Publish)
        .with_msg_id(7)
        .with_route(Route::new("chat.send").unwrap())
        .with_body(messages::BodyCodec::Json, b"{}".to_vec());
    let heartbeat = Frame::new(FrameKind::Heartbeat);
    let r = post(a2, &sid, "alice", &[heartbeat, publish]).await;
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    let msg = next(&mut upstream).await;
    assert_eq!(msg.subject.as_str(), "ws.msg.app.chat.send");
    assert_eq!(&msg.payload[..], b"{}");
    let ack = poll_for(a1, &sid, "alice", FrameKind::Ack).await;
    assert_eq!(ack.msg_id, 7);

    // Someone else's token with alice's sid: refused here and through the forward.
    for addr in [a1, a2] {
        let r = poll(addr, &sid, "mallory").await;
        assert_eq!((r.status, error_of(&r)), (403, "forbidden".into()));
        let r = post(addr, &sid, "mallory", &[Frame::new(FrameKind::Heartbeat)]).await;
        assert_eq!(r.status, 403);
    }
    // The right user with a guessed secret learns nothing more than "unknown".
    let (id, _) = sid.split_once('.').unwrap();
    let guessed = format!("{id}.{}", "0".repeat(32));
    for addr in [a1, a2] {
        let r = poll(addr, &guessed, "alice").await;
        assert_eq!((r.status, error_of(&r)), (404, "unknown_session".into()));
    }
    let r = poll(a1, "not-a-sid", "alice").await;
    assert_eq!((r.status, error_of(&r)), (400, "bad_sid".into()));
    let r = request(a1, "GET", &format!("/lp?sid={sid}"), &[], b"")
        .await
        .unwrap();
    assert_eq!((r.status, error_of(&r)), (401, "unauthorized".into()));

    // Bodies: oversized refused before it is read, broken batches refused whole.
    let r = post_raw(a1, &sid, "alice", &vec![0u8; 256 * 1024 + 1]).await;
    assert_eq!((r.status, error_of(&r)), (413, "too_large".into()));
    let r = post_raw(a2, &sid, "alice", &[0, 0, 0, 20, 1]).await;
    assert_eq!((r.status, error_of(&r)), (400, "bad_batch".into()));
    let r = post_raw(a1, &sid, "alice", &[0, 2, 0, 0]).await;
    assert_eq!((r.status, error_of(&r)), (413, "too_large".into()));

    // DELETE ends it like a WebSocket close 1000; the next poll says so.
    let path = format!("/lp?sid={sid}&token={}", token("alice", None, &[]));
    let r = request(a2, "DELETE", &path, &[], b"").await.unwrap();
    assert_eq!(r.status, 204);
    let mut closed = None;
    for _ in 0..20 {
        let r = poll(a1, &sid, "alice").await;
        if r.status == 410 {
            closed = Some(r.json());
            break;
        }
    }
    let closed = closed.expect("410 after DELETE");
    assert_eq!(closed["code"], 1000);
    gw1.shutdown().await.unwrap();
    gw2.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_session_whose_poll_does_not_come_back_is_closed_as_a_slow_consumer() {
    let nats = NatsServer::start().unwrap();
    let mut cfg = config(&nats.url(), "gw-lp-slow");
    cfg.longpoll_wait = Duration::from_millis(500);
    cfg.write_timeout = Duration::from_millis(300);
    let gw = start(cfg).await;
    let bus = bus_client(&nats.url()).await;
    let hs = handshake(gw.addr(), "sloth").await;
    let sid = hs["sid"].as_str().unwrap().to_owned();
    // Nobody polls: the welcome is held, the push behind it cannot be written.
    let user = messages::subject::user(&UserId::new("sloth").unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;
    push(&bus, &user, 1, b"x").await;
    wait_for(gw.addr(), "ws_gateway_connections ", 0.0).await;
    let mut codes = vec![];
    for _ in 0..5 {
        let r = poll(gw.addr(), &sid, "sloth").await;
        if r.status == 410 {
            codes.push(r.json()["code"].as_u64().unwrap());
            break;
        }
    }
    assert_eq!(codes, vec![4002], "closed as a slow consumer");
    gw.shutdown().await.unwrap();
}

async fn wait_for(addr: SocketAddr, metric_prefix: &str, want: f64) {
    for _ in 0..200 {
        if metric(addr, metric_prefix).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{metric_prefix} never reached {want}");
}

#[tokio::test]
async fn a_websocket_takes_the_session_over_on_its_own_replica_only() {
    let nats = NatsServer::start().unwrap();
    let mut cfg = config(&nats.url(), "gw-up-1");
    cfg.longpoll_wait = Duration::from_millis(500);
    let gw1 = start(cfg.clone()).await;
    cfg.instance = messages::GatewayId::new("gw-up-2").unwrap();
    let gw2 = start(cfg).await;
    let bus = bus_client(&nats.url()).await;
    let hs = handshake(gw1.addr(), "carol").await;
    let sid = hs["sid"].as_str().unwrap().to_owned();
    poll_for(gw1.addr(), &sid, "carol", FrameKind::Welcome).await;
    let user = messages::subject::user(&UserId::new("carol").unwrap());
    // Held for the poll when the WebSocket arrives: it must come out on the WebSocket.
    push(&bus, &user, 1, b"before").await;

    let ws_url = |addr: SocketAddr| {
        format!(
            "ws://{addr}/ws?sid={sid}&token={}",
            token("carol", None, &[])
        )
    };
    // The other replica cannot take a socket it does not hold.
    match tokio_tungstenite::connect_async(ws_url(gw2.addr())).await {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status().as_u16(), 421),
        other => panic!("expected 421, got {other:?}"),
    }
    // Someone else's token cannot take it either.
    let foreign = format!(
        "ws://{}/ws?sid={sid}&token={}",
        gw1.addr(),
        token("mallory", None, &[])
    );
    match tokio_tungstenite::connect_async(foreign).await {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status().as_u16(), 403),
        other => panic!("expected 403, got {other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url(gw1.addr()))
        .await
        .unwrap();
    let r = poll(gw1.addr(), &sid, "carol").await;
    assert_eq!((r.status, error_of(&r)), (409, "upgraded".into()));
    push(&bus, &user, 2, b"after").await;
    let mut bodies = vec![];
    while bodies.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let tungstenite::Message::Binary(bytes) = msg {
            let frame = Frame::decode(&bytes, &Limits::default()).unwrap();
            if frame.kind == FrameKind::Push {
                bodies.push(frame.body.to_vec());
            }
        }
    }
    assert_eq!(bodies, vec![b"before".to_vec(), b"after".to_vec()]);
    // Same session: a heartbeat over the WebSocket is answered there.
    ws.send(tungstenite::Message::Binary(
        Frame::new(FrameKind::Heartbeat).encode().to_vec().into(),
    ))
    .await
    .unwrap();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let tungstenite::Message::Binary(bytes) = msg
            && Frame::decode(&bytes, &Limits::default()).unwrap().kind == FrameKind::HeartbeatAck
        {
            break;
        }
    }
    assert_eq!(
        metric(gw1.addr(), "ws_gateway_longpoll_upgraded_total").await,
        1.0
    );
    gw1.shutdown().await.unwrap();
    gw2.shutdown().await.unwrap();
}
