//! History and recovery (ADR 0017) against a real nats-server with JetStream, a real
//! gateway, two ws-api replicas and real WebSocket clients: offsets stay contiguous with
//! two replicas pushing to one room at once, a rejoin replays what was missed in order and
//! without duplicates while pushes keep coming, a gap beyond the window or another epoch
//! is answered `recovered: false`, the user stream recovers at connect, and nobody
//! recovers a room they may not join.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use messages::frame::StreamRef;
use messages::payload::{self, ErrorBody, JoinSince, Recovery};
use messages::{BodyCodec, ErrorCode, Frame, FrameKind, RoomId, Route};
use serde_json::json;
use testkit::NatsServer;
use testkit::http;
use testkit::ws::{TestClient, token};

const KEY: &str = "test-api-key-0123456789";
/// The gateway's replay cap in these tests.
const MAX_REPLAY: u64 = 40;

async fn gateway(nats: &str) -> ws_gateway::Handle {
    let mut config = testkit::gateway::config(nats, "gw-h");
    config.max_replay = MAX_REPLAY;
    testkit::gateway::start(config).await
}

async fn api(nats: &str) -> ws_api::Handle {
    let mut config = ws_api::Config::new(nats, vec![KEY.to_owned()]);
    config.history.room_prefixes = vec!["chat.".into()];
    config.history.users = true;
    config.history.max_per_stream = 500;
    let handle = ws_api::spawn(config, TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    http::wait_status(handle.addr(), "/readyz", 200).await;
    handle
}

async fn push_room(api: SocketAddr, room: &str, n: u64) {
    let r = http::post_json(
        api,
        "/v1/push",
        KEY,
        &json!({"target": {"room": room}, "body": {"n": n}, "route": "msg"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 202, "{:?}", r.json());
}

async fn push_user(api: SocketAddr, user: &str, n: u64) {
    let r = http::post_json(
        api,
        "/v1/push",
        KEY,
        &json!({"target": {"users": [user]}, "body": {"n": n}}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 202, "{:?}", r.json());
}

async fn connect(gw: SocketAddr, user: &str, rooms: &[&str], query: &str) -> TestClient {
    TestClient::connect_with(gw, Some(&token(user, None, rooms)), query, None)
        .await
        .unwrap()
}

/// Joins `room` (with a recovery position when `since` is given); returns the ack frame.
async fn join(c: &mut TestClient, room: &str, msg_id: u64, since: Option<JoinSince>) -> Frame {
    let mut frame = Frame::new(FrameKind::Join)
        .with_msg_id(msg_id)
        .with_route(Route::new(room).unwrap());
    if let Some(since) = since {
        frame = frame.with_body(
            BodyCodec::MsgPack,
            payload::encode_body(BodyCodec::MsgPack, &since).unwrap(),
        );
    }
    c.send(&frame).await;
    let f = c.frame().await;
    assert_eq!(f.msg_id, msg_id, "{f:?}");
    f
}

/// The next push: its `n` and position.
async fn next_push(c: &mut TestClient) -> (u64, u64, u64, StreamRef) {
    let f = c.frame().await;
    assert_eq!(f.kind, FrameKind::Push, "{f:?}");
    let body: serde_json::Value = serde_json::from_slice(&f.body).unwrap();
    let p = f.position.expect("a positioned push");
    (body["n"].as_u64().unwrap(), p.epoch, p.offset, p.stream)
}

fn recovery_of(f: &Frame) -> Recovery {
    assert_eq!(f.kind, FrameKind::Ack, "{f:?}");
    payload::decode_body(f.flags.codec(), &f.body).unwrap()
}

#[tokio::test]
async fn two_replicas_pushing_at_once_give_one_contiguous_offset_sequence() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let gw = gateway(&url).await;
    let (a, b) = tokio::join!(api(&url), api(&url));
    let mut c = connect(gw.addr(), "alice", &["chat.race"], "positions=1").await;
    let ack = join(&mut c, "chat.race", 1, None).await;
    assert_eq!(ack.kind, FrameKind::Ack);
    let room = StreamRef::Room(RoomId::new("chat.race").unwrap());

    // Each replica pushes 100 as fast as it can, both at once, several requests in flight.
    let pushes = |api: SocketAddr, base: u64| async move {
        let mut tasks = Vec::new();
        for lane in 0..4 {
            tasks.push(tokio::spawn(async move {
                for i in 0..25 {
                    push_room(api, "chat.race", base + lane * 25 + i).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    };
    tokio::join!(pushes(a.addr(), 0), pushes(b.addr(), 1000));

    let mut seen = std::collections::HashSet::new();
    let mut epoch = None;
    for expected in 1..=200 {
        let (n, e, offset, stream) = next_push(&mut c).await;
        assert_eq!(stream, room);
        assert_eq!(offset, expected, "offsets are contiguous and in order");
        assert_eq!(*epoch.get_or_insert(e), e, "one epoch");
        assert!(seen.insert(n), "push {n} twice");
    }
    c.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_rejoin_replays_what_was_missed_in_order_then_the_live_stream() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let gw = gateway(&url).await;
    let (a, b) = tokio::join!(api(&url), api(&url));
    let rooms = ["chat.lobby"];

    let mut c = connect(gw.addr(), "bob", &rooms, "positions=1").await;
    join(&mut c, "chat.lobby", 1, None).await;
    for n in 1..=10 {
        push_room(a.addr(), "chat.lobby", n).await;
    }
    let mut last = (0, 0);
    for expected in 1..=10 {
        let (n, epoch, offset, _) = next_push(&mut c).await;
        assert_eq!((n, offset), (expected, expected));
        last = (epoch, offset);
    }
    c.close().await;

    // Missed while away: 20 pushes from both replicas.
    for n in 11..=30 {
        let api = if n % 2 == 0 { a.addr() } else { b.addr() };
        push_room(api, "chat.lobby", n).await;
    }
    // Pushes keep coming while the client rejoins and its replay runs.
    let live = tokio::spawn({
        let b = b.addr();
        async move {
            for n in 31..=60 {
                push_room(b, "chat.lobby", n).await;
            }
        }
    });
    let mut c = connect(gw.addr(), "bob", &rooms, "positions=1").await;
    let since = JoinSince {
        epoch: last.0,
        offset: last.1,
    };
    let recovery = recovery_of(&join(&mut c, "chat.lobby", 2, Some(since)).await);
    assert!(recovery.recovered, "{recovery:?}");
    assert_eq!(recovery.epoch, last.0);
    assert!(recovery.offset >= 30, "{recovery:?}");
    live.await.unwrap();
    for expected in 11..=60 {
        let (n, epoch, offset, _) = next_push(&mut c).await;
        assert_eq!(
            (n, offset, epoch),
            (expected, expected, last.0),
            "in order, once"
        );
    }
    c.expect_silence(Duration::from_millis(300)).await;
    c.close().await;

    // Up to date: recovered, nothing replayed.
    let mut c = connect(gw.addr(), "bob", &rooms, "positions=1").await;
    let since = JoinSince {
        epoch: last.0,
        offset: 60,
    };
    let recovery = recovery_of(&join(&mut c, "chat.lobby", 3, Some(since)).await);
    assert_eq!(
        recovery,
        Recovery {
            recovered: true,
            epoch: last.0,
            offset: 60
        }
    );
    c.expect_silence(Duration::from_millis(300)).await;
    c.close().await;

    // A gap longer than the replay cap: not recovered, nothing replayed, live continues.
    for n in 61..=(61 + MAX_REPLAY) {
        push_room(a.addr(), "chat.lobby", n).await;
    }
    let mut c = connect(gw.addr(), "bob", &rooms, "positions=1").await;
    let recovery = recovery_of(&join(&mut c, "chat.lobby", 4, Some(since)).await);
    assert!(!recovery.recovered, "{recovery:?}");
    assert_eq!(recovery.offset, 61 + MAX_REPLAY);
    push_room(a.addr(), "chat.lobby", 999).await;
    let (n, _, offset, _) = next_push(&mut c).await;
    assert_eq!((n, offset), (999, 62 + MAX_REPLAY));

    // Another epoch (a recreated stream, or a made-up position): not recovered.
    let stale = JoinSince {
        epoch: last.0 ^ 1,
        offset: 100,
    };
    let recovery = recovery_of(&join(&mut c, "chat.lobby", 5, Some(stale)).await);
    assert!(!recovery.recovered);
    c.expect_silence(Duration::from_millis(300)).await;

    // The gateway counts the answers and the replayed pushes (20 missed + up to 30 held).
    let metrics = http::get(gw.addr(), "/metrics", "").await.unwrap();
    let metrics = String::from_utf8_lossy(&metrics.body);
    let value = |line: &str| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with(line))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{line} not in {metrics}"))
    };
    assert_eq!(
        value("ws_gateway_recoveries_total{reason=\"recovered\"}"),
        2
    );
    assert_eq!(
        value("ws_gateway_recoveries_total{reason=\"not_recovered\"}"),
        2
    );
    assert!(value("ws_gateway_pushes_replayed_total") >= 20);
}

#[tokio::test]
async fn the_user_stream_recovers_at_connect_before_the_welcome_is_acted_on() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let gw = gateway(&url).await;
    let a = api(&url).await;

    let mut c = connect(gw.addr(), "carol", &[], "positions=1").await;
    assert_eq!(c.welcome.recovery, None);
    push_user(a.addr(), "carol", 1).await;
    let (_, epoch, offset, stream) = next_push(&mut c).await;
    assert_eq!((offset, stream), (1, StreamRef::User));
    c.close().await;
    for n in 2..=6 {
        push_user(a.addr(), "carol", n).await;
    }
    let mut c = connect(gw.addr(), "carol", &[], &format!("since={epoch}:1")).await;
    assert_eq!(
        c.welcome.recovery,
        Some(Recovery {
            recovered: true,
            epoch,
            offset: 6
        })
    );
    for expected in 2..=6 {
        let (n, _, offset, _) = next_push(&mut c).await;
        assert_eq!((n, offset), (expected, expected));
    }
    // A malformed position is refused at the handshake.
    let bad =
        TestClient::connect_with(gw.addr(), Some(&token("carol", None, &[])), "since=x", None)
            .await;
    assert!(
        matches!(bad, Err(testkit::ws::ConnectError::Status(400))),
        "{bad:?}"
    );
}

#[tokio::test]
async fn nobody_recovers_a_room_they_may_not_join() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let gw = gateway(&url).await;
    let a = api(&url).await;

    let mut member = connect(gw.addr(), "dave", &["chat.secret"], "positions=1").await;
    join(&mut member, "chat.secret", 1, None).await;
    for n in 1..=5 {
        push_room(a.addr(), "chat.secret", n).await;
    }
    let (_, epoch, _, _) = next_push(&mut member).await;

    // Eve's token does not name the room: her join with a position is refused, and she
    // gets none of its history.
    let mut eve = connect(gw.addr(), "eve", &[], "positions=1").await;
    let f = join(
        &mut eve,
        "chat.secret",
        7,
        Some(JoinSince { epoch, offset: 0 }),
    )
    .await;
    assert_eq!(f.kind, FrameKind::Error, "{f:?}");
    let err: ErrorBody = payload::decode_body(f.flags.codec(), &f.body).unwrap();
    assert_eq!(err.code, ErrorCode::Forbidden.code());
    eve.expect_silence(Duration::from_millis(500)).await;
    // Her live pushes were not held behind the refused join.
    push_user(a.addr(), "eve", 1).await;
    let (n, _, _, stream) = next_push(&mut eve).await;
    assert_eq!((n, stream), (1, StreamRef::User));
}

#[tokio::test]
async fn a_gap_the_stream_no_longer_keeps_or_a_purge_is_not_recovered() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let gw = gateway(&url).await;
    let mut config = ws_api::Config::new(url.clone(), vec![KEY.to_owned()]);
    config.history.room_prefixes = vec!["chat.".into()];
    config.history.max_per_stream = 5;
    let a = ws_api::spawn(config, TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    http::wait_status(a.addr(), "/readyz", 200).await;
    let rooms = ["chat.small"];

    let mut c = connect(gw.addr(), "fay", &rooms, "positions=1").await;
    join(&mut c, "chat.small", 1, None).await;
    push_room(a.addr(), "chat.small", 1).await;
    let (_, epoch, offset, _) = next_push(&mut c).await;
    c.close().await;
    // Ten more: the stream keeps only the last five (7-11), so offset 2 is gone although
    // the gap (10) is within the replay cap.
    for n in 2..=11 {
        push_room(a.addr(), "chat.small", n).await;
    }
    let mut c = connect(gw.addr(), "fay", &rooms, "positions=1").await;
    let since = JoinSince { epoch, offset };
    let recovery = recovery_of(&join(&mut c, "chat.small", 2, Some(since)).await);
    assert_eq!(
        recovery,
        Recovery {
            recovered: false,
            epoch,
            offset: 11
        }
    );
    c.expect_silence(Duration::from_millis(300)).await;
    // Within what is kept: recovered.
    let recovery = recovery_of(
        &join(
            &mut c,
            "chat.small",
            3,
            Some(JoinSince { epoch, offset: 8 }),
        )
        .await,
    );
    assert!(recovery.recovered);
    for expected in 9..=11 {
        let (n, _, o, _) = next_push(&mut c).await;
        assert_eq!((n, o), (expected, expected));
    }
    c.close().await;

    // The room's history is purged: ws-api's remembered tail is refused by the stream, it
    // starts a new epoch at offset 1, and the old position is not trusted.
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let stream = js
        .get_stream(messages::subject::HISTORY_STREAM)
        .await
        .unwrap();
    stream
        .purge()
        .filter(messages::subject::history_room(
            &RoomId::new("chat.small").unwrap(),
        ))
        .await
        .unwrap();
    let mut c = connect(gw.addr(), "fay", &rooms, "positions=1").await;
    join(&mut c, "chat.small", 1, None).await;
    push_room(a.addr(), "chat.small", 12).await;
    let (n, new_epoch, offset, _) = next_push(&mut c).await;
    assert_eq!((n, offset), (12, 1));
    assert_ne!(new_epoch, epoch);
    c.close().await;
    let mut c = connect(gw.addr(), "fay", &rooms, "positions=1").await;
    let recovery = recovery_of(
        &join(
            &mut c,
            "chat.small",
            1,
            Some(JoinSince { epoch, offset: 11 }),
        )
        .await,
    );
    assert_eq!(
        recovery,
        Recovery {
            recovered: false,
            epoch: new_epoch,
            offset: 1
        }
    );
}
