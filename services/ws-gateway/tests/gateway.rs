//! Gateway integration tests: a real nats-server, real replicas on port 0, real WebSocket
//! clients over TCP. No timing assertions: every wait has a generous timeout.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use messages::envelope::PushEnvelope;
use messages::payload::{
    self, ErrorBody, GatewayControl, HeartbeatAck, Reconnect, RoomRequest, SessionEvent,
};
use messages::{
    BodyCodec, CloseCode, ErrorCode, Frame, FrameKind, RoomId, Route, SocketId, TraceContext,
    headers,
};
use testkit::ws::{ConnectError, Received, TestClient, token, token_with};
use testkit::{NatsCluster, NatsServer};

fn error_of(frame: &Frame) -> ErrorBody {
    assert_eq!(frame.kind, FrameKind::Error, "{frame:?}");
    payload::decode_body(frame.flags.codec(), &frame.body).unwrap()
}

async fn expect_push(client: &mut TestClient, body: &[u8]) -> Frame {
    let frame = client.frame().await;
    assert_eq!(frame.kind, FrameKind::Push, "{frame:?}");
    assert_eq!(&frame.body[..], body);
    frame
}

#[tokio::test]
async fn tokens_are_checked_before_the_upgrade() {
    let nats = NatsServer::start().unwrap();
    let gw = start(config(&nats.url(), "gw-auth")).await;
    let addr = gw.addr();

    let status = |r: Result<TestClient, ConnectError>| match r {
        Err(ConnectError::Status(s)) => s,
        Ok(_) => 101,
        Err(e) => panic!("{e:?}"),
    };
    assert_eq!(
        status(TestClient::connect_with(addr, None, "", None).await),
        401,
        "missing"
    );
    assert_eq!(
        status(TestClient::connect(addr, "not-a-jwt").await),
        401,
        "malformed"
    );
    let expired = token_with(&serde_json::json!({"sub": "a", "exp": 1_000_000}));
    assert_eq!(
        status(TestClient::connect(addr, &expired).await),
        401,
        "expired"
    );
    let wrong_key = {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let claims = serde_json::json!({"sub": "a", "exp": 4_000_000_000u64});
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(&[7u8; 40]),
        )
        .unwrap()
    };
    assert_eq!(
        status(TestClient::connect(addr, &wrong_key).await),
        401,
        "wrong signature"
    );

    // Header and query parameter both work; the welcome names the user and a minted id.
    let a = TestClient::connect(addr, &token("alice", None, &[]))
        .await
        .unwrap();
    assert_eq!(a.welcome.user_id.as_str(), "alice");
    assert_eq!(a.welcome.gateway.as_str(), "gw-auth");
    let query = format!("token={}&codec=json", token("bob", None, &[]));
    let b = TestClient::connect_with(addr, None, &query, None)
        .await
        .unwrap();
    assert_eq!(b.welcome.user_id.as_str(), "bob");
    assert_ne!(a.welcome.socket_id, b.welcome.socket_id);
    assert_eq!(
        a.welcome.socket_id.parts().worker,
        b.welcome.socket_id.parts().worker
    );
    assert!(metric(addr, "ws_gateway_rejected_total{reason=\"unauthorized\"}").await >= 4.0);
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn heartbeat_interval_grows_and_resets_and_silence_times_out() {
    let nats = NatsServer::start().unwrap();
    let mut cfg = config(&nats.url(), "gw-hb");
    cfg.heartbeat = payload::HeartbeatParams {
        base_ms: 1000,
        step_ms: 500,
        max_ms: 2000,
        grow_after: 2,
        grace_ms: 1000,
    };
    let gw = start(cfg).await;
    let mut c = TestClient::connect(gw.addr(), &token("hb", None, &[]))
        .await
        .unwrap();
    assert_eq!(c.welcome.heartbeat.base_ms, 1000);

    let beat = async |c: &mut TestClient, id: u64| -> u32 {
        c.send(&Frame::new(FrameKind::Heartbeat).with_msg_id(id))
            .await;
        match c.recv().await {
            Received::Frame(f) if f.kind == FrameKind::HeartbeatAck => {
                assert_eq!(f.msg_id, id);
                payload::decode_body::<HeartbeatAck>(f.flags.codec(), &f.body)
                    .unwrap()
                    .next_interval_ms
            }
            other => panic!("{other:?}"),
        }
    };
    // Prompt beats are on time: +500 after every 2, capped at 2000.
    let grown: Vec<u32> = {
        let mut v = vec![];
        for id in 1..=6 {
            v.push(beat(&mut c, id).await);
        }
        v
    };
    assert_eq!(grown, vec![1000, 1500, 1500, 2000, 2000, 2000]);
    // A beat later than the interval (+10 %) but inside the grace resets to the base.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(beat(&mut c, 7).await, 1000);

    // Silence past interval + grace closes with the heartbeat-timeout code.
    assert_eq!(c.closed().await, Some(CloseCode::HeartbeatTimeout.code()));
    assert!(
        metric(
            gw.addr(),
            "ws_gateway_closes_total{reason=\"heartbeat_timeout\"}"
        )
        .await
            >= 1.0
    );
    assert!(metric(gw.addr(), "ws_gateway_heartbeat_late_total").await >= 1.0);
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn publish_bodies_reach_the_bus_byte_identical_with_headers() {
    let nats = NatsServer::start().unwrap();
    let bus = bus_client(&nats.url()).await;
    let mut sub = bus.subscribe("ws.msg.app.>").await.unwrap();
    let mut connects = bus.subscribe("ws.evt.app.connect").await.unwrap();
    bus.flush().await.unwrap();
    let gw = start(config(&nats.url(), "gw-up")).await;
    let mut c = TestClient::connect(gw.addr(), &token("carol", None, &[]))
        .await
        .unwrap();

    let event: SessionEvent = payload::from_bus(&next(&mut connects).await.payload).unwrap();
    assert_eq!(event.socket_id, c.welcome.socket_id);
    assert_eq!(event.user_id.as_str(), "carol");

    // Neither MessagePack nor JSON nor UTF-8.
    let body: Vec<u8> = vec![0xc1, 0xff, 0x00, 0xfe, b'{', 0x80, 0x00, 0xc1];
    let trace = TraceContext {
        trace_id: [0x11; 16],
        span_id: [0x22; 8],
        flags: 1,
    };
    let frame = Frame::new(FrameKind::Publish)
        .with_msg_id(42)
        .with_route(Route::new("orders.create").unwrap())
        .with_body(BodyCodec::MsgPack, body.clone())
        .with_trace(Some(trace));
    c.send(&frame).await;

    let msg = next(&mut sub).await;
    assert_eq!(msg.subject.as_str(), "ws.msg.app.orders.create");
    assert_eq!(
        &msg.payload[..],
        &body[..],
        "body must pass through untouched"
    );
    let h = msg.headers.as_ref().unwrap();
    assert_eq!(
        headers::get(h, headers::SOCKET_ID),
        Some(c.welcome.socket_id.to_string().as_str())
    );
    assert_eq!(headers::get(h, headers::USER_ID), Some("carol"));
    assert_eq!(headers::get(h, headers::GATEWAY_ID), Some("gw-up"));
    assert_eq!(headers::get(h, headers::MSG_ID), Some("42"));
    assert_eq!(headers::get(h, headers::ROUTE), Some("orders.create"));
    assert_eq!(headers::get(h, headers::CODEC), Some("msgpack"));
    assert_eq!(headers::get(h, headers::OPERATION), Some("publish"));
    assert_eq!(TraceContext::extract(h), Some(trace));
    let hops: Vec<String> = headers::hops(h).into_iter().map(|(name, _)| name).collect();
    assert_eq!(hops, vec!["gw-in", "gw-pub"]);

    // The client gets an ack for its message id once the bus has it.
    let ack = c.frame().await;
    assert_eq!((ack.kind, ack.msg_id), (FrameKind::Ack, 42));
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn pushes_reach_exactly_the_right_sockets_across_two_replicas() {
    let nats = NatsServer::start().unwrap();
    let bus = bus_client(&nats.url()).await;
    let (a, b) = tokio::join!(
        start(config(&nats.url(), "gw-a")),
        start(config(&nats.url(), "gw-b"))
    );
    let mut alice_a = TestClient::connect(a.addr(), &token("alice", None, &[]))
        .await
        .unwrap();
    let mut alice_b = TestClient::connect(b.addr(), &token("alice", None, &[]))
        .await
        .unwrap();
    let mut bob_b = TestClient::connect(b.addr(), &token("bob", None, &[]))
        .await
        .unwrap();
    let mut carol_a = TestClient::connect(a.addr(), &token("carol", None, &[]))
        .await
        .unwrap();
    let mut agent_a = TestClient::connect(a.addr(), &token("node-1", Some("agent"), &[]))
        .await
        .unwrap();
    assert_ne!(
        alice_a.welcome.socket_id.parts().worker,
        alice_b.welcome.socket_id.parts().worker
    );

    // To a user: both of alice's sockets, on both replicas, nobody else.
    let receipt = PushEnvelope {
        receipt: true,
        ..test_push(1)
    };
    push_envelope(&bus, "ws.user.alice", &receipt, b"to-alice").await;
    let f = expect_push(&mut alice_a, b"to-alice").await;
    assert_eq!((f.msg_id, f.route.as_str()), (1, "test.push"));
    assert!(f.flags.receipt());
    expect_push(&mut alice_b, b"to-alice").await;

    // To one socket through its gateway's subject.
    let to_bob = PushEnvelope {
        sockets: vec![bob_b.welcome.socket_id],
        ..test_push(2)
    };
    push_envelope(&bus, "ws.gw.gw-b.push", &to_bob, b"to-bob").await;
    expect_push(&mut bob_b, b"to-bob").await;

    // To a room: membership comes from control messages (ws-api decides), on both replicas.
    let lobby = RoomId::new("lobby").unwrap();
    for (gw, client) in [("gw-b", &mut bob_b), ("gw-a", &mut carol_a)] {
        let join = GatewayControl::Join {
            socket_id: client.welcome.socket_id,
            room: lobby.clone(),
            msg_id: 50,
        };
        control(&bus, gw, &join).await;
        // The ack arrives once the replica's room subscription is live.
        let ack = client.frame().await;
        assert_eq!((ack.kind, ack.msg_id), (FrameKind::Ack, 50));
    }
    push(&bus, "ws.room.lobby", 51, b"to-lobby").await;
    expect_push(&mut bob_b, b"to-lobby").await;
    expect_push(&mut carol_a, b"to-lobby").await;

    // Broadcast: every app socket; agents are not app users.
    push(&bus, "ws.all", 100, b"to-all").await;
    for c in [&mut alice_a, &mut alice_b, &mut bob_b, &mut carol_a] {
        expect_push(c, b"to-all").await;
    }
    // Exclusion header (e.g. the sender of a chat message).
    let not_carol = PushEnvelope {
        exclude: vec![carol_a.welcome.socket_id],
        ..test_push(101)
    };
    push_envelope(&bus, "ws.room.lobby", &not_carol, b"not-carol").await;
    expect_push(&mut bob_b, b"not-carol").await;

    // Nobody got anything else: a final user push is each client's very next frame.
    for (user, c) in [
        ("alice", &mut alice_a),
        ("alice", &mut alice_b),
        ("bob", &mut bob_b),
        ("carol", &mut carol_a),
    ] {
        let sentinel = format!("end-{user}");
        push(&bus, &format!("ws.user.{user}"), 999, sentinel.as_bytes()).await;
        let f = c.frame().await;
        assert_eq!(
            &f.body[..],
            sentinel.as_bytes(),
            "{user} got an unexpected frame"
        );
    }
    agent_a.expect_silence(Duration::from_millis(200)).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn join_and_leave_go_to_the_services_and_take_effect_by_control_message() {
    let nats = NatsServer::start().unwrap();
    let bus = bus_client(&nats.url()).await;
    let mut joins = bus.subscribe("ws.evt.app.join").await.unwrap();
    let mut leaves = bus.subscribe("ws.evt.app.leave").await.unwrap();
    bus.flush().await.unwrap();
    let gw = start(config(&nats.url(), "gw-rooms")).await;
    let mut c = TestClient::connect(gw.addr(), &token("dave", None, &["games"]))
        .await
        .unwrap();
    let mut other = TestClient::connect(gw.addr(), &token("erin", None, &[]))
        .await
        .unwrap();

    c.send(
        &Frame::new(FrameKind::Join)
            .with_msg_id(5)
            .with_route(Route::new("games").unwrap()),
    )
    .await;
    let request: RoomRequest = payload::from_bus(&next(&mut joins).await.payload).unwrap();
    assert_eq!(
        (request.room.as_str(), request.msg_id, request.socket_id),
        ("games", 5, c.welcome.socket_id)
    );
    assert_eq!(request.gateway.as_str(), "gw-rooms");

    // A refusal becomes an error frame naming the request.
    let refuse = GatewayControl::Refuse {
        socket_id: c.welcome.socket_id,
        msg_id: 5,
        code: 403,
        reason: "no".into(),
    };
    control(&bus, "gw-rooms", &refuse).await;
    let f = c.frame().await;
    assert_eq!(
        (f.msg_id, error_of(&f).code),
        (5, ErrorCode::Forbidden.code())
    );

    // An acceptance adds the socket; the ack comes once the room subscription is live.
    for (client, msg_id) in [(&c, 6), (&other, 0)] {
        let join = GatewayControl::Join {
            socket_id: client.welcome.socket_id,
            room: RoomId::new("games").unwrap(),
            msg_id,
        };
        control(&bus, "gw-rooms", &join).await;
    }
    let ack = c.frame().await;
    assert_eq!((ack.kind, ack.msg_id), (FrameKind::Ack, 6));
    push(&bus, "ws.room.games", 7, b"in-room").await;
    expect_push(&mut c, b"in-room").await;
    expect_push(&mut other, b"in-room").await;

    // Leave: forwarded, then applied by control; later room pushes skip the socket.
    c.send(
        &Frame::new(FrameKind::Leave)
            .with_msg_id(8)
            .with_route(Route::new("games").unwrap()),
    )
    .await;
    let request: RoomRequest = payload::from_bus(&next(&mut leaves).await.payload).unwrap();
    assert_eq!(request.msg_id, 8);
    let leave = GatewayControl::Leave {
        socket_id: c.welcome.socket_id,
        room: RoomId::new("games").unwrap(),
        msg_id: 8,
    };
    control(&bus, "gw-rooms", &leave).await;
    let ack = c.frame().await;
    assert_eq!((ack.kind, ack.msg_id), (FrameKind::Ack, 8));
    push(&bus, "ws.room.games", 9, b"after-leave").await;
    expect_push(&mut other, b"after-leave").await;
    push(&bus, "ws.user.dave", 10, b"sentinel").await;
    expect_push(&mut c, b"sentinel").await;

    // A join without a valid room is refused locally.
    c.send(&Frame::new(FrameKind::Join).with_msg_id(11)).await;
    let f = c.frame().await;
    assert_eq!(
        (f.msg_id, error_of(&f).code),
        (11, ErrorCode::BadRoute.code())
    );
    gw.shutdown().await.unwrap();
}

/// The next frame; anything else fails the test with the gateway's own account of what it
/// did (this test once timed out under a loaded CI machine, cause not found).
async fn frame_or_explain(c: &mut TestClient, gw: std::net::SocketAddr, expected: u64) -> Frame {
    loop {
        match c.recv().await {
            Received::Frame(f) if f.kind == FrameKind::HeartbeatAck => {}
            Received::Frame(f) => return f,
            other => {
                let (_, metrics) = http_get(gw, "/metrics").await;
                let relevant: Vec<&str> = metrics
                    .lines()
                    .filter(|l| !l.starts_with('#') && !l.contains("_bucket"))
                    .collect();
                panic!(
                    "waiting for push {expected}: got {other:?}; gateway metrics:\n{}",
                    relevant.join("\n")
                );
            }
        }
    }
}

#[tokio::test]
async fn a_slow_consumer_is_closed_while_others_keep_receiving() {
    let nats = NatsServer::start().unwrap();
    let bus = bus_client(&nats.url()).await;
    let mut cfg = config(&nats.url(), "gw-slow");
    cfg.outbound_queue = 64;
    cfg.write_timeout = Duration::from_secs(2);
    let gw = start(cfg).await;
    // A tiny receive buffer and a client that never reads.
    let mut slow =
        TestClient::connect_with(gw.addr(), Some(&token("slow", None, &[])), "", Some(4096))
            .await
            .unwrap();
    let mut fast = TestClient::connect(gw.addr(), &token("fast", None, &[]))
        .await
        .unwrap();
    let body = vec![b'x'; 16 * 1024];
    let mut received = 0;
    for i in 0..400u64 {
        push(&bus, "ws.user.slow", i, &body).await;
        push(&bus, "ws.user.fast", i, b"tick").await;
        let f = frame_or_explain(&mut fast, gw.addr(), i).await;
        assert_eq!(f.msg_id, i);
        received += 1;
        if metric(
            gw.addr(),
            "ws_gateway_closes_total{reason=\"slow_consumer\"}",
        )
        .await
            >= 1.0
        {
            break;
        }
    }
    assert!(
        metric(
            gw.addr(),
            "ws_gateway_closes_total{reason=\"slow_consumer\"}"
        )
        .await
            >= 1.0
    );
    // The fast client kept getting everything while the slow one was being cut off.
    for i in 1000..1010u64 {
        push(&bus, "ws.user.fast", i, b"after").await;
        assert_eq!(frame_or_explain(&mut fast, gw.addr(), i).await.msg_id, i);
    }
    assert!(received > 0);
    // The slow client eventually sees the close (or a reset) once it reads again.
    let code = slow.closed().await;
    assert!(
        code.is_none() || code == Some(CloseCode::SlowConsumer.code()),
        "{code:?}"
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_session_the_bus_does_not_confirm_is_refused_with_a_retryable_close() {
    let nats = NatsServer::start().unwrap();
    let gw = start(config(&nats.url(), "gw-stall")).await;
    // A stalled server: the connection looks up, but the user subscription is never
    // confirmed. A welcome now would promise pushes that cannot arrive.
    nats.pause();
    let refused = TestClient::connect(gw.addr(), &token("stalled", None, &[])).await;
    nats.resume();
    match refused {
        Err(ConnectError::Other(why)) => assert!(
            why.contains(&format!("Close(Some({}))", CloseCode::NotReady.code())),
            "{why}"
        ),
        other => panic!("expected a 4003 close instead of a welcome, got {other:?}"),
    }
    // Once the bus answers again the same user is served, and pushes reach it.
    let bus = bus_client(&nats.url()).await;
    let mut c = TestClient::connect(gw.addr(), &token("stalled", None, &[]))
        .await
        .unwrap();
    push(&bus, "ws.user.stalled", 1, b"after").await;
    assert_eq!(c.frame().await.msg_id, 1);
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_service_that_saw_the_connect_event_reaches_the_user_from_any_cluster_node() {
    // The gateway on node 1, the service on node 3. The connect event leaves node 1 after
    // the user subscription's interest (same route, in order), so a push the service sends
    // once it has seen the event cannot miss, however loaded the machine is. (A push sent
    // merely after the client's welcome may, by up to a route hop: protocol.md, 7.1.)
    let cluster = NatsCluster::start(3).unwrap();
    let gw = start(config(&cluster.node(0).unwrap().url(), "gw-cluster")).await;
    let bus = bus_client(&cluster.node(2).unwrap().url()).await;
    let connect_subject = "ws.evt.app.connect";
    let mut connects = bus.subscribe(connect_subject).await.unwrap();
    // Our own subscription is subject to the same propagation: wait until node 1 routes
    // the subject here before the first client connects.
    let node1 = bus_client(&cluster.node(0).unwrap().url()).await;
    loop {
        node1.publish(connect_subject, "".into()).await.unwrap();
        node1.flush().await.unwrap();
        if tokio::time::timeout(
            Duration::from_millis(100),
            futures_util::StreamExt::next(&mut connects),
        )
        .await
        .is_ok()
        {
            break;
        }
    }
    let mut missed = Vec::new();
    for i in 0..100u64 {
        let user = format!("early-{i}");
        let mut c = TestClient::connect(gw.addr(), &token(&user, None, &[]))
            .await
            .unwrap();
        // Skip stray warm-up messages until this user's event.
        loop {
            let event = next(&mut connects).await;
            if payload::from_bus::<SessionEvent>(&event.payload)
                .is_ok_and(|e| e.user_id.as_str() == user)
            {
                break;
            }
        }
        push(&bus, &format!("ws.user.{user}"), i + 1, b"right away").await;
        match c.recv_within(Duration::from_secs(2)).await {
            Received::Frame(f) if f.msg_id == i + 1 => {}
            other => missed.push((i, format!("{other:?}"))),
        }
        c.close().await;
    }
    assert!(
        missed.is_empty(),
        "pushes missed after the connect event: {missed:?}"
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_and_oversized_frames_get_errors_and_the_right_close() {
    let nats = NatsServer::start().unwrap();
    let mut cfg = config(&nats.url(), "gw-bad");
    cfg.limits.max_body_len = 1024;
    let gw = start(cfg).await;
    let mut c = TestClient::connect(gw.addr(), &token("mallory", None, &[]))
        .await
        .unwrap();

    // Frames that decode but are not acceptable: an error frame each naming the frame;
    // the connection stays usable. (Frames that do not decode close it: tests/protocol.rs.)
    c.send(&Frame::new(FrameKind::Push).with_msg_id(4)).await;
    assert_eq!(
        error_of(&c.frame().await).code,
        ErrorCode::UnexpectedFrame.code()
    );
    c.send(&Frame::new(FrameKind::Publish).with_msg_id(5)).await;
    assert_eq!(error_of(&c.frame().await).code, ErrorCode::BadRoute.code());
    c.send(&Frame::new(FrameKind::Heartbeat).with_msg_id(6))
        .await;
    assert!(matches!(c.recv().await, Received::Frame(f) if f.kind == FrameKind::HeartbeatAck));

    // A body over the limit: error frame (id 0: the frame did not decode), then close 4501.
    let big = Frame::new(FrameKind::Publish)
        .with_msg_id(7)
        .with_route(Route::new("x").unwrap())
        .with_body(BodyCodec::Raw, vec![0u8; 1100]);
    c.send(&big).await;
    let f = c.frame().await;
    assert_eq!(
        (f.msg_id, error_of(&f).code),
        (0, ErrorCode::TooLarge.code())
    );
    assert_eq!(c.closed().await, Some(CloseCode::FrameTooLarge.code()));

    // A WebSocket message beyond what any frame may be is cut at the WebSocket layer.
    let mut d = TestClient::connect(gw.addr(), &token("mallory", None, &[]))
        .await
        .unwrap();
    d.send_raw(vec![0u8; 64 * 1024]).await;
    assert_eq!(d.closed().await, Some(CloseCode::FrameTooLarge.code()));

    // A wrong protocol version closes with its own code.
    let mut e = TestClient::connect(gw.addr(), &token("mallory", None, &[]))
        .await
        .unwrap();
    e.send_raw(vec![9, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).await;
    assert_eq!(e.closed().await, Some(CloseCode::UnsupportedVersion.code()));
    assert!(metric(gw.addr(), "ws_gateway_frame_errors_total").await >= 3.0);
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_rate_limit_drops_with_errors_then_closes_abusers() {
    let nats = NatsServer::start().unwrap();
    let mut cfg = config(&nats.url(), "gw-rate");
    cfg.rate_per_sec = 1;
    cfg.rate_burst = 5;
    let gw = start(cfg).await;
    let mut c = TestClient::connect(gw.addr(), &token("spammer", None, &[]))
        .await
        .unwrap();
    for id in 1..=30u64 {
        c.send(&Frame::new(FrameKind::Heartbeat).with_msg_id(id))
            .await;
    }
    let mut acks = 0;
    let mut limited = 0;
    let code = loop {
        match c.recv().await {
            Received::Frame(f) if f.kind == FrameKind::HeartbeatAck => acks += 1,
            Received::Frame(f) => {
                assert_eq!(error_of(&f).code, ErrorCode::RateLimited.code());
                limited += 1;
            }
            Received::Close(code) => break code,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, Some(CloseCode::RateLimited.code()));
    assert!(
        (5..=6).contains(&acks),
        "the burst passes: {acks} acks, {limited} limited"
    );
    assert!(limited >= 5, "drops are reported: {limited}");
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_drains_with_spread_reconnects_and_reports_disconnects() {
    let nats = NatsServer::start().unwrap();
    let bus = bus_client(&nats.url()).await;
    let mut disconnects = bus.subscribe("ws.evt.app.disconnect").await.unwrap();
    bus.flush().await.unwrap();
    let gw = start(config(&nats.url(), "gw-drain")).await;
    let mut clients = vec![];
    for i in 0..5 {
        clients.push(
            TestClient::connect(gw.addr(), &token(&format!("u{i}"), None, &[]))
                .await
                .unwrap(),
        );
    }
    let addr = gw.addr();
    let shutdown = tokio::spawn(gw.shutdown());
    for c in &mut clients {
        let f = c.frame().await;
        assert_eq!(f.kind, FrameKind::Reconnect);
        let body: Reconnect = payload::decode_body(f.flags.codec(), &f.body).unwrap();
        assert!(
            body.delay_ms <= 200,
            "within the drain window: {}",
            body.delay_ms
        );
        assert_eq!(c.closed().await, Some(CloseCode::Shutdown.code()));
    }
    shutdown.await.unwrap().unwrap();
    let mut seen = vec![];
    for _ in 0..5 {
        let event: SessionEvent = payload::from_bus(&next(&mut disconnects).await.payload).unwrap();
        assert_eq!(event.close_code, Some(CloseCode::Shutdown.code()));
        seen.push(event.socket_id);
    }
    seen.sort();
    let mut expected: Vec<SocketId> = clients.iter().map(|c| c.welcome.socket_id).collect();
    expected.sort();
    assert_eq!(seen, expected);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn clients_stay_connected_through_a_nats_restart() {
    let mut nats = NatsServer::start().unwrap();
    let mut cfg = config(&nats.url(), "gw-outage");
    cfg.heartbeat.grace_ms = 60_000;
    // Kept through the outage, however long (the default sends them elsewhere).
    cfg.bus_loss_shed = None;
    let gw = start(cfg).await;
    let mut c = TestClient::connect(gw.addr(), &token("frank", None, &[]))
        .await
        .unwrap();

    nats.kill();
    wait_ready(gw.addr(), false).await;
    // The socket is still served, and a publish that cannot reach the bus is reported.
    c.send(
        &Frame::new(FrameKind::Publish)
            .with_msg_id(1)
            .with_route(Route::new("x.y").unwrap()),
    )
    .await;
    let f = c.frame().await;
    assert_eq!(
        (f.msg_id, error_of(&f).code),
        (1, ErrorCode::Unavailable.code())
    );
    c.send(&Frame::new(FrameKind::Heartbeat).with_msg_id(2))
        .await;
    assert!(matches!(c.recv().await, Received::Frame(f) if f.kind == FrameKind::HeartbeatAck));
    // New clients are refused while not ready.
    assert!(matches!(
        TestClient::connect(gw.addr(), &token("late", None, &[])).await,
        Err(ConnectError::Status(503))
    ));
    assert!(metric(gw.addr(), "ws_gateway_nats_publish_errors_total").await >= 1.0);

    nats.start_again().unwrap();
    wait_ready(gw.addr(), true).await;
    // The user subscription came back with the connection: pushes reach the old socket.
    let bus = bus_client(&nats.url()).await;
    let mut n = 0;
    loop {
        n += 1;
        push(&bus, "ws.user.frank", n, b"back").await;
        if let Received::Frame(f) = c.recv_within(Duration::from_millis(300)).await {
            assert_eq!(&f.body[..], b"back");
            break;
        }
        assert!(n < 30, "pushes never resumed");
    }
    gw.shutdown().await.unwrap();
}

/// A replica cut off from NATS past `bus_loss_shed` sends its clients to other replicas:
/// a reconnect frame within the drain window, then close 4003 (not ready, retryable); it
/// refuses new clients until the bus is back, then takes them again.
#[tokio::test]
async fn a_replica_cut_off_from_nats_sends_its_clients_elsewhere_and_takes_them_back_after() {
    let mut nats = NatsServer::start().unwrap();
    let mut cfg = config(&nats.url(), "gw-shed");
    cfg.heartbeat.grace_ms = 60_000;
    cfg.bus_loss_shed = Some(Duration::from_millis(500));
    cfg.drain_window = Duration::from_millis(200);
    let gw = start(cfg).await;
    let mut clients = vec![];
    for i in 0..3 {
        clients.push(
            TestClient::connect(gw.addr(), &token(&format!("s{i}"), None, &[]))
                .await
                .unwrap(),
        );
    }
    nats.kill();
    wait_ready(gw.addr(), false).await;
    for c in &mut clients {
        let f = c.frame().await;
        assert_eq!(f.kind, FrameKind::Reconnect, "{f:?}");
        let body: Reconnect = payload::decode_body(f.flags.codec(), &f.body).unwrap();
        assert!(
            body.delay_ms <= 200,
            "within the drain window: {}",
            body.delay_ms
        );
        assert!(body.reason.contains("bus"), "{body:?}");
        assert_eq!(c.closed().await, Some(CloseCode::NotReady.code()));
    }
    assert!(matches!(
        TestClient::connect(gw.addr(), &token("late", None, &[])).await,
        Err(ConnectError::Status(503))
    ));
    nats.start_again().unwrap();
    wait_ready(gw.addr(), true).await;
    let mut back = TestClient::connect(gw.addr(), &token("s0", None, &[]))
        .await
        .unwrap();
    // Served normally again, and not sent away by the outage that is over.
    let bus = bus_client(&nats.url()).await;
    let mut n = 0;
    loop {
        n += 1;
        push(&bus, "ws.user.s0", n, b"again").await;
        if let Received::Frame(f) = back.recv_within(Duration::from_millis(300)).await {
            assert_eq!((f.kind, &f.body[..]), (FrameKind::Push, &b"again"[..]));
            break;
        }
        assert!(n < 30, "pushes never reached the returning client");
    }
    gw.shutdown().await.unwrap();
}

/// A silent partition (no FIN, no RST: the path just stops carrying bytes) between a
/// replica and NATS is noticed by keepalives alone, and the replica then sends its clients
/// elsewhere; once the path heals it is ready again.
#[tokio::test]
async fn a_silent_partition_from_nats_is_noticed_and_the_clients_sent_elsewhere() {
    let nats = NatsServer::start().unwrap();
    let target = format!("127.0.0.1:{}", nats.port()).parse().unwrap();
    let proxy = testkit::cutproxy::CutProxy::start(target).await.unwrap();
    let mut cfg = config(&format!("nats://{}", proxy.addr()), "gw-silent");
    cfg.heartbeat.grace_ms = 120_000;
    cfg.bus_loss_shed = Some(Duration::from_millis(500));
    cfg.drain_window = Duration::from_millis(200);
    let gw = start(cfg).await;
    let mut c = TestClient::connect(gw.addr(), &token("quiet", None, &[]))
        .await
        .unwrap();
    proxy.cut();
    // Keepalives every 5 s, a connection given up after 10-15 s, then the 0.5 s grace.
    let f = loop {
        match c.recv_within(Duration::from_secs(60)).await {
            Received::Frame(f) if f.kind == FrameKind::HeartbeatAck => {}
            Received::Frame(f) => break f,
            other => panic!("expected a reconnect frame, got {other:?}"),
        }
    };
    assert_eq!(f.kind, FrameKind::Reconnect, "{f:?}");
    assert_eq!(c.closed().await, Some(CloseCode::NotReady.code()));
    proxy.heal();
    wait_ready(gw.addr(), true).await;
    TestClient::connect(gw.addr(), &token("quiet", None, &[]))
        .await
        .unwrap();
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_client_that_goes_away_is_reported_without_a_gateway_close() {
    let nats = NatsServer::start().unwrap();
    let bus = bus_client(&nats.url()).await;
    let mut disconnects = bus.subscribe("ws.evt.app.disconnect").await.unwrap();
    bus.flush().await.unwrap();
    let gw = start(config(&nats.url(), "gw-peer")).await;
    let polite = TestClient::connect(gw.addr(), &token("polite", None, &[]))
        .await
        .unwrap();
    let rude = TestClient::connect(gw.addr(), &token("rude", None, &[]))
        .await
        .unwrap();
    let (polite_id, rude_id) = (polite.welcome.socket_id, rude.welcome.socket_id);
    polite.close().await;
    drop(rude);
    let mut seen = vec![];
    for _ in 0..2 {
        let event: SessionEvent = payload::from_bus(&next(&mut disconnects).await.payload).unwrap();
        assert_eq!(event.close_code, None, "the peer closed, not the gateway");
        assert!(event.reason.is_some());
        seen.push(event.socket_id);
    }
    seen.sort();
    let mut expected = vec![polite_id, rude_id];
    expected.sort();
    assert_eq!(seen, expected);
    assert_eq!(
        metric(
            gw.addr(),
            "ws_gateway_closes_total{reason=\"protocol_error\"}"
        )
        .await,
        0.0
    );
    assert_eq!(metric(gw.addr(), "ws_gateway_connections").await, 0.0);
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_connection_limit_refuses_before_the_upgrade() {
    let nats = NatsServer::start().unwrap();
    let mut cfg = config(&nats.url(), "gw-full");
    cfg.max_connections = 2;
    let gw = start(cfg).await;
    let _a = TestClient::connect(gw.addr(), &token("a", None, &[]))
        .await
        .unwrap();
    let _b = TestClient::connect(gw.addr(), &token("b", None, &[]))
        .await
        .unwrap();
    assert!(matches!(
        TestClient::connect(gw.addr(), &token("c", None, &[])).await,
        Err(ConnectError::Status(503))
    ));
    assert_eq!(
        metric(gw.addr(), "ws_gateway_rejected_total{reason=\"capacity\"}").await,
        1.0
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn client_acks_go_upstream_as_receipts_for_the_push_id() {
    let nats = NatsServer::start().unwrap();
    let bus = bus_client(&nats.url()).await;
    let mut acks = bus.subscribe("ws.evt.app.ack").await.unwrap();
    bus.flush().await.unwrap();
    let gw = start(config(&nats.url(), "gw-ack")).await;
    let mut c = TestClient::connect(gw.addr(), &token("gina", None, &[]))
        .await
        .unwrap();
    let please_ack = PushEnvelope {
        receipt: true,
        ..test_push(4242)
    };
    push_envelope(&bus, "ws.user.gina", &please_ack, b"please-ack").await;
    let f = expect_push(&mut c, b"please-ack").await;
    assert!(f.flags.receipt());
    c.send(&Frame::new(FrameKind::Ack).with_msg_id(f.msg_id))
        .await;
    let receipt = next(&mut acks).await;
    let h = receipt.headers.as_ref().unwrap();
    assert_eq!(headers::get(h, headers::MSG_ID), Some("4242"));
    assert_eq!(
        headers::get(h, headers::SOCKET_ID),
        Some(c.welcome.socket_id.to_string().as_str())
    );
    assert_eq!(headers::get(h, headers::USER_ID), Some("gina"));
    assert_eq!(headers::get(h, headers::OPERATION), Some("ack"));
    assert!(receipt.payload.is_empty());
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_join_nobody_answers_times_out_with_an_error() {
    let nats = NatsServer::start().unwrap();
    let mut cfg = config(&nats.url(), "gw-timeout");
    cfg.request_timeout = Duration::from_millis(300);
    let gw = start(cfg).await;
    let mut c = TestClient::connect(gw.addr(), &token("hal", None, &[]))
        .await
        .unwrap();
    c.send(
        &Frame::new(FrameKind::Join)
            .with_msg_id(9)
            .with_route(Route::new("void").unwrap()),
    )
    .await;
    let f = c.frame().await;
    assert_eq!(
        (f.msg_id, error_of(&f).code),
        (9, ErrorCode::Timeout.code())
    );
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_connection_is_closed_when_its_token_expires() {
    let nats = NatsServer::start().unwrap();
    let gw = start(config(&nats.url(), "gw-exp")).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let short = token_with(&serde_json::json!({"sub": "ivy", "exp": now + 2}));
    let mut c = TestClient::connect(gw.addr(), &short).await.unwrap();
    assert_eq!(c.closed().await, Some(CloseCode::Unauthorized.code()));
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_refresh_with_a_new_token_for_the_same_identity_extends_the_session() {
    let nats = NatsServer::start().unwrap();
    let gw = start(config(&nats.url(), "gw-refresh")).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let short = token_with(&serde_json::json!({"sub": "ivy", "exp": now + 2}));
    let mut c = TestClient::connect(gw.addr(), &short).await.unwrap();
    let refresh = |id: u64, token: String| {
        Frame::new(FrameKind::Refresh)
            .with_msg_id(id)
            .with_body(BodyCodec::Raw, token.into_bytes())
    };
    // Another user's token, an expired one and garbage: refused, nothing changes.
    let refusals = [
        token_with(&serde_json::json!({"sub": "mallory", "exp": now + 600})),
        token_with(&serde_json::json!({"sub": "ivy", "exp": now - 600})),
        "not a token".to_owned(),
    ];
    for (i, token) in refusals.into_iter().enumerate() {
        let id = 10 + i as u64;
        c.send(&refresh(id, token)).await;
        let f = c.frame().await;
        assert_eq!((f.kind, f.msg_id), (FrameKind::Error, id), "{f:?}");
        let body: ErrorBody = payload::decode_body(f.flags.codec(), &f.body).unwrap();
        assert_eq!(body.code, ErrorCode::Forbidden.code(), "{body:?}");
    }
    // The same identity with a later expiry: acked, and the session outlives the old one.
    let long = token_with(&serde_json::json!({"sub": "ivy", "exp": now + 600}));
    c.send(&refresh(20, long)).await;
    let f = c.frame().await;
    assert_eq!((f.kind, f.msg_id), (FrameKind::Ack, 20), "{f:?}");
    c.expect_silence(Duration::from_secs(3)).await;
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn presence_batches_vouch_for_every_held_socket_even_idle_ones() {
    let nats = NatsServer::start().unwrap();
    let bus = bus_client(&nats.url()).await;
    let mut batches = bus.subscribe("ws.evt.app.heartbeat").await.unwrap();
    bus.flush().await.unwrap();
    let mut cfg = config(&nats.url(), "gw-presence");
    cfg.presence_sync = Duration::from_millis(200);
    let gw = start(cfg).await;
    let idle = TestClient::connect(gw.addr(), &token("idle", None, &[]))
        .await
        .unwrap();
    // Two batches in a row list the socket although it never sends a frame.
    let mut listed = 0;
    while listed < 2 {
        let batch: messages::payload::HeartbeatBatch =
            payload::from_bus(&next(&mut batches).await.payload).unwrap();
        assert_eq!(batch.gateway.as_str(), "gw-presence");
        // Each socket is listed with the time the gateway vouched for it: the batch's.
        assert!(
            batch.seen.iter().all(|(_, at)| *at == batch.at_ms),
            "{batch:?}"
        );
        if batch
            .seen
            .iter()
            .any(|(id, _)| *id == idle.welcome.socket_id)
        {
            listed += 1;
        }
    }
    gw.shutdown().await.unwrap();
}
