//! Figures for history and recovery (ADR 0017, docs/benchmarks.md), not assertions: run
//! with `--ignored --nocapture` (release build) and read the printed table.
//!
//! One process with a gateway and a ws-api replica, nats-server beside it (JetStream on
//! its temp dir), one WebSocket client with positions in both rooms:
//! - the cost of history on the push path: the same pushes (HTTP, 8 in flight) to a room
//!   without history and to one with it, in alternating rounds of the same run; CPU of this
//!   process (ws-api, gateway, HTTP client, WebSocket client) and of nats-server, per push;
//! - JetStream storage per 1,000 pushes (the stream's bytes, 100-byte bodies);
//! - time to recover 300 missed pushes: from sending the join with the position to the
//!   300th replayed push read, beside a plain join in the same run.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use messages::payload::{self, JoinSince, Recovery};
use messages::{BodyCodec, Frame, FrameKind, Route, subject};
use serde_json::json;
use testkit::NatsServer;
use testkit::http;
use testkit::ws::{TestClient, token};

const KEY: &str = "test-api-key-0123456789";

fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
}

/// Pushes `n` bodies of ~100 bytes to `room`, `lanes` requests in flight.
async fn push_many(api: SocketAddr, room: &'static str, n: u64, lanes: u64) {
    let mut tasks = Vec::new();
    for lane in 0..lanes {
        tasks.push(tokio::spawn(async move {
            let mut i = lane;
            while i < n {
                let body = json!({"target": {"room": room}, "route": "m",
                                  "body": {"n": i, "pad": "x".repeat(80)}});
                let r = http::post_json(api, "/v1/push", KEY, &body).await.unwrap();
                assert_eq!(r.status, 202);
                i += lanes;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn drain(c: &mut TestClient, n: u64) {
    for _ in 0..n {
        let f = c.frame().await;
        assert_eq!(f.kind, FrameKind::Push, "{f:?}");
    }
}

async fn join(c: &mut TestClient, room: &str, id: u64, since: Option<JoinSince>) -> Frame {
    let mut frame = Frame::new(FrameKind::Join)
        .with_msg_id(id)
        .with_route(Route::new(room).unwrap());
    if let Some(since) = since {
        frame = frame.with_body(
            BodyCodec::MsgPack,
            payload::encode_body(BodyCodec::MsgPack, &since).unwrap(),
        );
    }
    c.send(&frame).await;
    c.frame().await
}

#[tokio::test]
#[ignore = "figures for docs/benchmarks.md; run with --ignored --nocapture"]
async fn history_figures() {
    let nats = NatsServer::start().unwrap();
    let nats_pid = nats.pid().unwrap();
    let url = nats.url();
    let mut gw_config = testkit::gateway::config(&url, "gw-fig");
    gw_config.outbound_queue = 2048;
    gw_config.max_replay = 1000;
    gw_config.rate_per_sec = 100_000;
    gw_config.rate_burst = 100_000;
    let gw = testkit::gateway::start(gw_config).await;
    let mut config = ws_api::Config::new(url.clone(), vec![KEY.to_owned()]);
    config.history.room_prefixes = vec!["hist.".into()];
    config.history.max_per_stream = 10_000;
    config.room_policy = ws_api::config::RoomPolicy::Open;
    let api = ws_api::spawn(config, TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
    http::wait_status(api.addr(), "/readyz", 200).await;
    let me = std::process::id();

    // 1. CPU per push, alternating rounds.
    let mut c = TestClient::connect_with(
        gw.addr(),
        Some(&token("fig", None, &[])),
        "positions=1",
        None,
    )
    .await
    .unwrap();
    assert_eq!(join(&mut c, "plain.a", 1, None).await.kind, FrameKind::Ack);
    assert_eq!(join(&mut c, "hist.a", 2, None).await.kind, FrameKind::Ack);
    const ROUND: u64 = 3000;
    // Warm-up (connections, caches, the stream's first file block).
    push_many(api.addr(), "plain.a", 500, 8).await;
    drain(&mut c, 500).await;
    push_many(api.addr(), "hist.a", 500, 8).await;
    drain(&mut c, 500).await;
    let mut rows = Vec::new();
    for round in 0..4 {
        let room = if round % 2 == 0 { "plain.a" } else { "hist.a" };
        let (p0, n0, t0) = (cpu_secs(me), cpu_secs(nats_pid), Instant::now());
        push_many(api.addr(), room, ROUND, 8).await;
        drain(&mut c, ROUND).await;
        let wall = t0.elapsed().as_secs_f64();
        let proc_us = (cpu_secs(me) - p0) * 1e6 / ROUND as f64;
        let nats_us = (cpu_secs(nats_pid) - n0) * 1e6 / ROUND as f64;
        rows.push((room, proc_us, nats_us, ROUND as f64 / wall));
    }
    println!("| round | room | process CPU µs/push | nats-server CPU µs/push | pushes/s |");
    for (i, (room, p, n, rate)) in rows.iter().enumerate() {
        println!("| {} | {room} | {p:.0} | {n:.0} | {rate:.0} |", i + 1);
    }

    // 2. Storage per 1,000 pushes: a fresh room, 1,000 pushes of the same ~100-byte body.
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let mut stream = js.get_stream(subject::HISTORY_STREAM).await.unwrap();
    let before = stream.info().await.unwrap().state.bytes;
    push_many(api.addr(), "hist.storage", 1000, 8).await;
    let after = stream.info().await.unwrap().state.bytes;
    let body_len = serde_json::to_vec(&json!({"n": 500, "pad": "x".repeat(80)}))
        .unwrap()
        .len();
    println!(
        "storage: {} bytes per 1,000 pushes ({} per push; body {} bytes)",
        after - before,
        (after - before) / 1000,
        body_len
    );

    // 3. Recovering 300 missed pushes, five times, beside a plain join.
    let mut recover_ms = Vec::new();
    let mut plain_ms = Vec::new();
    for i in 0..5u64 {
        let room = format!("hist.r{i}");
        let room: &'static str = Box::leak(room.into_boxed_str());
        let mut a = TestClient::connect_with(
            gw.addr(),
            Some(&token("rec", None, &[])),
            "positions=1",
            None,
        )
        .await
        .unwrap();
        join(&mut a, room, 1, None).await;
        push_many(api.addr(), room, 1, 1).await;
        let first = a.frame().await.position.unwrap();
        a.close().await;
        push_many(api.addr(), room, 300, 8).await;
        let mut b = TestClient::connect_with(
            gw.addr(),
            Some(&token("rec", None, &[])),
            "positions=1",
            None,
        )
        .await
        .unwrap();
        let t0 = Instant::now();
        let since = JoinSince {
            epoch: first.epoch,
            offset: first.offset,
        };
        let ack = join(&mut b, room, 1, Some(since)).await;
        let r: Recovery = payload::decode_body(ack.flags.codec(), &ack.body).unwrap();
        assert!(r.recovered, "{r:?}");
        drain(&mut b, 300).await;
        recover_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        let t1 = Instant::now();
        assert_eq!(join(&mut b, "plain.b", 2, None).await.kind, FrameKind::Ack);
        plain_ms.push(t1.elapsed().as_secs_f64() * 1e3);
        b.close().await;
    }
    recover_ms.sort_by(f64::total_cmp);
    plain_ms.sort_by(f64::total_cmp);
    println!(
        "recover 300: median {:.1} ms (min {:.1}, max {:.1}); plain join: median {:.2} ms",
        recover_ms[2], recover_ms[0], recover_ms[4], plain_ms[2]
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), c.close()).await;
    api.shutdown().await.unwrap();
    gw.shutdown().await.unwrap();
}
