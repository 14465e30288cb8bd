//! ws-api against a real nats-server, two real gateway replicas and two ws-api replicas,
//! with real WebSocket clients and real HTTP requests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use futures_util::StreamExt;
use messages::envelope::{AckEnvelope, DeliveredEnvelope, Origin};
use messages::payload::{self, ErrorBody};
use messages::{
    BodyCodec, ClientKind, ErrorCode, Frame, FrameKind, GatewayId, Route, SocketId, UserId, headers,
};
use serde_json::json;
use testkit::NatsServer;
use testkit::http::{self, Response};
use testkit::ws::{Received, TEST_SECRET, TestClient, token};

const KEY: &str = "test-api-key-0123456789";

fn gateway_config(nats: &str, name: &str) -> ws_gateway::Config {
    testkit::gateway::config(nats, name)
}

async fn gateway(nats: &str, name: &str) -> ws_gateway::Handle {
    testkit::gateway::start(gateway_config(nats, name)).await
}

fn api_config(nats: &str) -> ws_api::Config {
    let mut config = ws_api::Config::new(nats, vec![KEY.to_owned()]);
    config.open_room_prefixes = vec!["public.".into()];
    config.max_body_bytes = 4096;
    config
}

async fn api(config: ws_api::Config) -> ws_api::Handle {
    let handle = ws_api::spawn(config, TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    wait_status(handle.addr(), "/readyz", 200).await;
    handle
}

/// Polls `path` until it answers `want`.
async fn wait_status(addr: SocketAddr, path: &str, want: u16) {
    http::wait_status(addr, path, want).await;
}

/// Polls until `check` accepts the JSON at `path`.
async fn eventually(
    addr: SocketAddr,
    path: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    http::eventually(addr, path, KEY, check).await
}

async fn push(addr: SocketAddr, body: serde_json::Value) -> Response {
    http::post_json(addr, "/v1/push", KEY, &body).await.unwrap()
}

async fn expect_push(c: &mut TestClient, body: &[u8]) -> Frame {
    let f = c.frame().await;
    assert_eq!(f.kind, FrameKind::Push, "{f:?}");
    assert_eq!(&f.body[..], body);
    f
}

#[tokio::test]
async fn the_push_api_reaches_exactly_the_right_clients_across_replicas() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let (gw_a, gw_b) = tokio::join!(gateway(&url, "gw-a"), gateway(&url, "gw-b"));
    let (api_1, api_2) = tokio::join!(api(api_config(&url)), api(api_config(&url)));
    let mut alice_a = TestClient::connect(gw_a.addr(), &token("alice", None, &[]))
        .await
        .unwrap();
    let mut alice_b = TestClient::connect(gw_b.addr(), &token("alice", None, &[]))
        .await
        .unwrap();
    let mut bob_b = TestClient::connect(gw_b.addr(), &token("bob", None, &[]))
        .await
        .unwrap();
    let mut carol_a = TestClient::connect(gw_a.addr(), &token("carol", None, &[]))
        .await
        .unwrap();

    // Both replicas see the presence (shared through KV).
    for api in [&api_1, &api_2] {
        let v = eventually(api.addr(), "/v1/users/alice", |v| {
            v["sockets"].as_array().is_some_and(|s| s.len() == 2)
        })
        .await;
        assert_eq!(v["online"], true);
        assert_eq!(v["gateways"], json!(["gw-a", "gw-b"]));
        eventually(api.addr(), "/v1/stats", |v| v["sessions"] == 4).await;
    }

    // Users: both of alice's sockets.
    let r = push(
        api_1.addr(),
        json!({"target": {"users": ["alice"]}, "body": {"hello": "alice"}, "route": "greet"}),
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.json());
    assert_eq!(r.json()["targeted"], 2);
    let f = expect_push(&mut alice_a, br#"{"hello":"alice"}"#).await;
    assert_eq!(
        (f.flags.codec(), f.route.as_str()),
        (BodyCodec::Json, "greet")
    );
    expect_push(&mut alice_b, br#"{"hello":"alice"}"#).await;

    // Sockets: routed to bob's gateway only.
    let bob_id = bob_b.welcome.socket_id.to_string();
    let r = push(
        api_2.addr(),
        json!({"target": {"sockets": [bob_id]}, "body_base64": "AAEC/w==", "codec": "raw"}),
    )
    .await;
    assert_eq!((r.status, r.json()["targeted"].clone()), (202, json!(1)));
    expect_push(&mut bob_b, &[0, 1, 2, 255]).await;

    // Room: server-side membership for carol, then a room push.
    let r = http::post_json(
        api_1.addr(),
        "/v1/rooms/lobby/members",
        KEY,
        &json!({"user_id": "carol"}),
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.json()["sockets"].clone()), (200, json!(1)));
    eventually(api_2.addr(), "/v1/rooms/lobby/members", |v| {
        v["members"].as_array().is_some_and(|m| m.len() == 1)
    })
    .await;
    // The gateway applies membership asynchronously: retry until carol gets one.
    let mut n = 0;
    loop {
        n += 1;
        push(
            api_2.addr(),
            json!({"target": {"room": "lobby"}, "body": n}),
        )
        .await;
        if let Received::Frame(f) = carol_a.recv_within(Duration::from_millis(200)).await {
            assert_eq!(f.kind, FrameKind::Push);
            break;
        }
        assert!(n < 25, "room membership never took effect");
    }

    // Everyone.
    let r = push(
        api_1.addr(),
        json!({"target": {"all": true}, "body": "all"}),
    )
    .await;
    assert_eq!(r.json()["targeted"], 4);
    for c in [&mut alice_a, &mut alice_b, &mut bob_b] {
        expect_push(c, br#""all""#).await;
    }
    // carol may have one straggler room push from the retry loop before the broadcast.
    loop {
        let f = carol_a.frame().await;
        if &f.body[..] == br#""all""# {
            break;
        }
    }
    // Nobody got anything else.
    for (user, c) in [("alice", &mut alice_a), ("bob", &mut bob_b)] {
        push(
            api_1.addr(),
            json!({"target": {"users": [user]}, "body": "end"}),
        )
        .await;
        expect_push(c, br#""end""#).await;
    }
    for h in [api_1, api_2] {
        h.shutdown().await.unwrap();
    }
    for h in [gw_a, gw_b] {
        h.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn joins_are_authorised_by_token_claims_and_open_prefixes() {
    let nats = NatsServer::start().unwrap();
    let gw = gateway(&nats.url(), "gw-rooms").await;
    let api = api(api_config(&nats.url())).await;
    let mut c = TestClient::connect(gw.addr(), &token("dave", None, &["games"]))
        .await
        .unwrap();
    let join = |id: u64, room: &str| {
        Frame::new(FrameKind::Join)
            .with_msg_id(id)
            .with_route(Route::new(room).unwrap())
    };

    c.send(&join(1, "games")).await;
    let f = c.frame().await;
    assert_eq!((f.kind, f.msg_id), (FrameKind::Ack, 1), "{f:?}");
    c.send(&join(2, "secret")).await;
    let f = c.frame().await;
    assert_eq!((f.kind, f.msg_id), (FrameKind::Error, 2));
    let body: ErrorBody = payload::decode_body(f.flags.codec(), &f.body).unwrap();
    assert_eq!(body.code, ErrorCode::Forbidden.code());
    c.send(&join(3, "public.chat")).await;
    let f = c.frame().await;
    assert_eq!((f.kind, f.msg_id), (FrameKind::Ack, 3));

    let v = eventually(api.addr(), "/v1/users/dave", |v| {
        v["sockets"][0]["rooms"]
            .as_array()
            .is_some_and(|r| r.len() == 2)
    })
    .await;
    assert_eq!(v["sockets"][0]["rooms"], json!(["games", "public.chat"]));
    push(
        api.addr(),
        json!({"target": {"room": "games"}, "body": "in games"}),
    )
    .await;
    expect_push(&mut c, br#""in games""#).await;

    // Leave is always allowed and cleans the membership.
    c.send(
        &Frame::new(FrameKind::Leave)
            .with_msg_id(4)
            .with_route(Route::new("games").unwrap()),
    )
    .await;
    let f = c.frame().await;
    assert_eq!((f.kind, f.msg_id), (FrameKind::Ack, 4));
    eventually(api.addr(), "/v1/rooms/games/members", |v| {
        v["members"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    api.shutdown().await.unwrap();
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn receipts_count_targeted_delivered_and_acked() {
    let nats = NatsServer::start().unwrap();
    let gw = gateway(&nats.url(), "gw-receipts").await;
    let api = api(api_config(&nats.url())).await;
    let mut c = TestClient::connect(gw.addr(), &token("erin", None, &[]))
        .await
        .unwrap();
    eventually(api.addr(), "/v1/users/erin", |v| v["online"] == true).await;
    let r = push(
        api.addr(),
        json!({"target": {"users": ["erin"]}, "body": "ack me", "receipt": true}),
    )
    .await;
    let id = r.json()["push_id"].as_str().unwrap().to_owned();
    let f = expect_push(&mut c, br#""ack me""#).await;
    assert!(f.flags.receipt());
    assert_eq!(f.msg_id.to_string(), id);
    c.send(&Frame::new(FrameKind::Ack).with_msg_id(f.msg_id))
        .await;
    let v = eventually(api.addr(), &format!("/v1/pushes/{id}"), |v| {
        v["acked"] == 1 && v["delivered"] == 1
    })
    .await;
    assert_eq!(v["targeted"], 1);
    // Untracked and malformed ids are told apart.
    assert_eq!(
        http::get(api.addr(), "/v1/pushes/12345", KEY)
            .await
            .unwrap()
            .status,
        404
    );
    assert_eq!(
        http::get(api.addr(), "/v1/pushes/nope", KEY)
            .await
            .unwrap()
            .status,
        400
    );
    api.shutdown().await.unwrap();
    gw.shutdown().await.unwrap();
}

/// A broadcast is acked by every client within a second, all for one push id: two
/// replicas sharing the events must count every ack (this once lost most of them to
/// compare-and-set contention on the push's key).
#[tokio::test]
async fn a_burst_of_acks_for_one_push_is_counted_exactly_across_replicas() {
    let nats = NatsServer::start().unwrap();
    let a = api(api_config(&nats.url())).await;
    let b = api(api_config(&nats.url())).await;
    let r = push(
        a.addr(),
        json!({"target": {"all": true}, "body": "to everyone", "receipt": true}),
    )
    .await;
    assert_eq!(r.status, 202, "{:?}", r.json());
    let id = r.json()["push_id"].as_str().unwrap().to_owned();
    let bus = async_nats::connect(nats.url()).await.unwrap();
    const ACKS: u64 = 2_000;
    let push_id: u64 = id.parse().unwrap();
    let gateway = GatewayId::new("gw-x").unwrap();
    for i in 0..ACKS {
        let ack = AckEnvelope {
            origin: Origin {
                socket_id: SocketId(i + 1),
                user_id: UserId::new("acker").unwrap(),
                gateway: gateway.clone(),
                kind: ClientKind::App,
            },
            push_id,
            trace: None,
        };
        bus.publish_with_headers("ws.evt.app.ack", ack.to_headers(), bytes::Bytes::new())
            .await
            .unwrap();
    }
    let delivered = DeliveredEnvelope {
        push_id,
        count: 1500,
        gateway,
    };
    bus.publish_with_headers(
        "ws.evt.app.delivered",
        delivered.to_headers(),
        bytes::Bytes::new(),
    )
    .await
    .unwrap();
    bus.flush().await.unwrap();
    // Either replica answers with the total once both have flushed.
    for replica in [&a, &b] {
        eventually(replica.addr(), &format!("/v1/pushes/{id}"), |v| {
            v["acked"] == ACKS && v["delivered"] == 1500
        })
        .await;
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn client_frames_reach_product_services_untouched() {
    let nats = NatsServer::start().unwrap();
    let bus = async_nats::connect(nats.url()).await.unwrap();
    let mut product = bus.subscribe("app.>").await.unwrap();
    bus.flush().await.unwrap();
    let gw = gateway(&nats.url(), "gw-up").await;
    let api = api(api_config(&nats.url())).await;
    let mut c = TestClient::connect(gw.addr(), &token("fred", None, &[]))
        .await
        .unwrap();
    let body = vec![0xc1, 0x00, 0xff, 0x7b];
    c.send(
        &Frame::new(FrameKind::Publish)
            .with_msg_id(7)
            .with_route(Route::new("orders.create").unwrap())
            .with_body(BodyCodec::MsgPack, body.clone()),
    )
    .await;
    let msg = tokio::time::timeout(Duration::from_secs(10), product.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.subject.as_str(), "app.orders.create");
    assert_eq!(&msg.payload[..], &body[..]);
    let h = msg.headers.as_ref().unwrap();
    assert_eq!(headers::get(h, headers::USER_ID), Some("fred"));
    assert_eq!(
        headers::get(h, headers::SOCKET_ID),
        Some(c.welcome.socket_id.to_string().as_str())
    );
    let hops: Vec<String> = headers::hops(h).into_iter().map(|(n, _)| n).collect();
    assert_eq!(hops, ["gw-in", "gw-pub", "svc-in", "svc-pub"]);
    api.shutdown().await.unwrap();
    gw.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_requests_get_clear_json_errors() {
    let nats = NatsServer::start().unwrap();
    let api = api(api_config(&nats.url())).await;
    let addr = api.addr();
    let no_key = http::request(
        addr,
        "POST",
        "/v1/push",
        &[("content-type", "application/json")],
        b"{}",
    )
    .await
    .unwrap();
    assert_eq!(
        (no_key.status, no_key.json()["error"].clone()),
        (401, json!("unauthorized"))
    );
    let wrong_key = http::post_json(addr, "/v1/push", "not-the-key-at-all-000", &json!({}))
        .await
        .unwrap();
    assert_eq!(wrong_key.status, 401);
    let cases = [
        (
            json!({"target": {"users": ["a"], "all": true}, "body": 1}),
            400,
            "bad_target",
        ),
        (json!({"target": {}, "body": 1}), 400, "bad_target"),
        (
            json!({"target": {"planets": ["x"]}, "body": 1}),
            400,
            "malformed_json",
        ),
        (json!({"target": {"users": ["a"]}}), 400, "missing_body"),
        (
            json!({"target": {"sockets": ["12x"]}, "body": 1}),
            400,
            "malformed_id",
        ),
        (
            json!({"target": {"users": ["a.b"]}, "body": 1}),
            400,
            "malformed_id",
        ),
        (
            json!({"target": {"users": ["a"]}, "body": "x".repeat(5000)}),
            413,
            "body_too_large",
        ),
    ];
    for (body, status, error) in cases {
        let r = push(addr, body.clone()).await;
        assert_eq!(
            (r.status, r.json()["error"].clone()),
            (status, json!(error)),
            "{body}"
        );
        assert!(r.json()["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    let auth = format!("Bearer {KEY}");
    let r = http::request(
        addr,
        "POST",
        "/v1/push",
        &[("authorization", &auth), ("content-type", "text/plain")],
        b"hi",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 415);
    let r = http::request(
        addr,
        "POST",
        "/v1/push",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        b"{",
    )
    .await
    .unwrap();
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("malformed_json"))
    );
    // Raw bodies take their target from the query.
    let r = http::request(
        addr,
        "POST",
        "/v1/push?all=1&route=x",
        &[
            ("authorization", &auth),
            ("content-type", "application/octet-stream"),
        ],
        b"\x00\x01",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 202);
    let r = http::request(
        addr,
        "POST",
        "/v1/push?planet=1",
        &[
            ("authorization", &auth),
            ("content-type", "application/msgpack"),
        ],
        b"\x90",
    )
    .await
    .unwrap();
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (400, json!("unknown_parameter"))
    );
    let doc = http::request(addr, "GET", "/v1/openapi.json", &[], b"")
        .await
        .unwrap();
    assert_eq!(doc.status, 200);
    assert_eq!(doc.json()["openapi"], "3.1.0");
    assert!(doc.json()["paths"]["/v1/push"].is_object());
    api.shutdown().await.unwrap();
}

#[tokio::test]
async fn presence_follows_connects_disconnects_and_a_killed_gateway() {
    let nats = NatsServer::start().unwrap();
    let url = nats.url();
    let mut cfg = api_config(&url);
    cfg.presence_ttl = Duration::from_secs(2);
    cfg.sweep = Duration::from_millis(300);
    let api = api(cfg).await;
    let live = gateway(&url, "gw-live").await;

    // A real gateway process that will be killed with SIGKILL: no disconnect events.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut doomed =
        std::process::Command::new(testkit::process::binary("ws-gateway", "ws-gateway"))
            .env("WS_GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
            .env("WS_GATEWAY_NATS_URL", &url)
            .env("WS_GATEWAY_INSTANCE", "gw-doomed")
            .env("WS_GATEWAY_JWT_HS256_SECRET", TEST_SECRET)
            .env("WS_GATEWAY_PRESENCE_SYNC_MS", "300")
            .env("WS_GATEWAY_WORKERS", "1")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
    let doomed_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_status(doomed_addr, "/readyz", 200).await;

    let ghost = TestClient::connect(doomed_addr, &token("ghost", None, &[]))
        .await
        .unwrap();
    let keeper = TestClient::connect(live.addr(), &token("keeper", None, &[]))
        .await
        .unwrap();
    let leaver = TestClient::connect(live.addr(), &token("leaver", None, &[]))
        .await
        .unwrap();
    for user in ["ghost", "keeper", "leaver"] {
        eventually(api.addr(), &format!("/v1/users/{user}"), |v| {
            v["online"] == true
        })
        .await;
    }

    // A clean disconnect removes the session at once (no TTL involved).
    // Every step is bounded so a hang names itself instead of eating the runner's timeout.
    let step = Duration::from_secs(30);
    tokio::time::timeout(step, leaver.close())
        .await
        .expect("closing a client hung");
    eventually(api.addr(), "/v1/users/leaver", |v| v["online"] == false).await;

    // A killed gateway's sessions expire within TTL + sweep; live ones stay.
    doomed.kill().unwrap();
    doomed.wait().unwrap();
    eventually(api.addr(), "/v1/users/ghost", |v| v["online"] == false).await;
    let v = http::get(api.addr(), "/v1/users/keeper", KEY)
        .await
        .unwrap()
        .json();
    assert_eq!(
        v["online"], true,
        "live sessions are refreshed by heartbeat batches: {v}"
    );
    drop(ghost);
    drop(keeper);
    tokio::time::timeout(step, api.shutdown())
        .await
        .expect("ws-api shutdown hung")
        .unwrap();
    tokio::time::timeout(step, live.shutdown())
        .await
        .expect("gateway shutdown hung")
        .unwrap();
}

/// A live session whose record is lost (a last-seen refresh lost on the bus, and the sweep)
/// comes back from the gateway's next batch: ws-api asks the gateway to announce it again,
/// and the announcement carries its rooms and original connect time.
#[tokio::test]
async fn a_live_session_whose_record_was_lost_is_restored_with_its_rooms() {
    let nats = NatsServer::start().unwrap();
    let gw = gateway(&nats.url(), "gw-resync").await;
    let api = api(api_config(&nats.url())).await;
    let mut c = TestClient::connect(gw.addr(), &token("erin", None, &["games"]))
        .await
        .unwrap();
    c.send(
        &Frame::new(FrameKind::Join)
            .with_msg_id(1)
            .with_route(Route::new("games").unwrap()),
    )
    .await;
    let f = c.frame().await;
    assert_eq!((f.kind, f.msg_id), (FrameKind::Ack, 1), "{f:?}");
    let before = eventually(api.addr(), "/v1/users/erin", |v| {
        v["sockets"][0]["rooms"] == json!(["games"])
    })
    .await;
    let socket = before["sockets"][0]["socket_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The record disappears as if swept after lost refreshes; the client never left.
    let bus = async_nats::connect(nats.url()).await.unwrap();
    let kv = async_nats::jetstream::new(bus)
        .get_key_value("ws_sessions")
        .await
        .unwrap();
    kv.delete(format!("s.{socket}")).await.unwrap();
    eventually(api.addr(), "/v1/users/erin", |v| v["online"] == false).await;

    // Within the settle time (10 s from the socket's id) and a batch or two, it is back.
    let after = eventually(api.addr(), "/v1/users/erin", |v| v["online"] == true).await;
    let restored = &after["sockets"][0];
    assert_eq!(restored["socket_id"], socket.as_str());
    assert_eq!(restored["rooms"], json!(["games"]));
    assert_eq!(
        restored["connected_at_ms"], before["sockets"][0]["connected_at_ms"],
        "the original connect time, not the announce's"
    );
    push(
        api.addr(),
        json!({"target": {"room": "games"}, "body": "still here"}),
    )
    .await;
    expect_push(&mut c, br#""still here""#).await;
    api.shutdown().await.unwrap();
    gw.shutdown().await.unwrap();
}
