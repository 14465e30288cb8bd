//! The long-poll figures of docs/benchmarks.md: memory per idle session and fan-out
//! deliveries per server CPU-second, long-polling beside WebSocket in the same run, each on
//! a fresh release gateway process (so neither inherits the other's allocator state).
//! A benchmark, not a test: it asserts only that every delivery arrived.
//!
//! ```text
//! cargo build --release -p ws-gateway
//! cargo nextest run -p ws-gateway --test longpoll_bench --run-ignored only --no-capture
//! ```
//! Knobs: `SESSIONS` (2000), `MESSAGES` (20 broadcast pushes), `SIZE` (256 bytes),
//! `GW_BIN` (default `target/release/ws-gateway`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use messages::longpoll::decode_batch;
use messages::{Frame, FrameKind, Limits};
use testkit::NatsServer;
use testkit::ws::{TEST_SECRET, TestClient, token};

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Gateway {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    async fn start(nats: &str) -> Gateway {
        let bin = std::env::var("GW_BIN").map_or_else(
            |_| testkit::workspace_root().join("target/release/ws-gateway"),
            std::path::PathBuf::from,
        );
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&bin)
            .env("WS_GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
            .env("WS_GATEWAY_NATS_URL", nats)
            .env("WS_GATEWAY_INSTANCE", "gw-bench")
            .env("WS_GATEWAY_JWT_HS256_SECRET", TEST_SECRET)
            .env("WS_GATEWAY_WORKERS", "1")
            .env("WS_GATEWAY_MAX_CONNECTIONS_PER_IP", "0")
            .env("WS_GATEWAY_HEARTBEAT_BASE_MS", "60000")
            .env("WS_GATEWAY_HEARTBEAT_MAX_MS", "60000")
            .env("WS_GATEWAY_HEARTBEAT_GRACE_MS", "60000")
            .env("WS_GATEWAY_LONGPOLL_WAIT_MS", "20000")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (build it: cargo build --release -p ws-gateway)",
                    bin.display()
                )
            });
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_ready(addr, true).await;
        Gateway { child, addr }
    }

    fn proc_field(&self, file: &str) -> String {
        std::fs::read_to_string(format!("/proc/{}/{file}", self.child.id())).unwrap()
    }

    fn rss_kb(&self) -> u64 {
        self.proc_field("status")
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// User + system CPU seconds so far.
    fn cpu_s(&self) -> f64 {
        let stat = self.proc_field("stat");
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 of stat (utime, stime), counted after the command name.
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        ticks as f64 / 100.0
    }
}

struct Figures {
    idle_kb: f64,
    deliveries: u64,
    wall_s: f64,
    cpu_s: f64,
    responses: u64,
}

async fn broadcast(bus: &async_nats::Client, messages: usize, size: usize) {
    let body = vec![b'x'; size];
    for i in 0..messages {
        push(bus, "ws.all", i as u64 + 1, &body).await;
    }
}

async fn websocket_run(
    nats: &str,
    bus: &async_nats::Client,
    n: usize,
    m: usize,
    size: usize,
) -> Figures {
    let gw = Gateway::start(nats).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = gw.rss_kb();
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        clients.push(
            TestClient::connect(gw.addr, &token(&format!("w{i}"), None, &[]))
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_kb = (gw.rss_kb() - before) as f64 / n as f64;
    let got = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for mut c in clients {
        let got = Arc::clone(&got);
        readers.push(tokio::spawn(async move {
            let mut seen = 0;
            while seen < m {
                if c.frame().await.kind == FrameKind::Push {
                    seen += 1;
                    got.fetch_add(1, Ordering::Relaxed);
                }
            }
            c
        }));
    }
    let (cpu0, t0) = (gw.cpu_s(), Instant::now());
    broadcast(bus, m, size).await;
    let mut kept = Vec::new();
    for r in readers {
        kept.push(r.await.unwrap());
    }
    let (wall_s, cpu_s) = (t0.elapsed().as_secs_f64(), gw.cpu_s() - cpu0);
    Figures {
        idle_kb,
        deliveries: got.load(Ordering::Relaxed),
        wall_s,
        cpu_s,
        responses: 0,
    }
}

async fn longpoll_run(
    nats: &str,
    bus: &async_nats::Client,
    n: usize,
    m: usize,
    size: usize,
) -> Figures {
    let gw = Gateway::start(nats).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = gw.rss_kb();
    let http = servicekit::http_client::client(servicekit::http_client::ClientOptions {
        timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    })
    .unwrap();
    let base = format!("http://{}/lp", gw.addr);
    let got = Arc::new(AtomicU64::new(0));
    let responses = Arc::new(AtomicU64::new(0));
    let mut pollers = Vec::new();
    for i in 0..n {
        let tok = token(&format!("l{i}"), None, &[]);
        let hs = http
            .get(format!("{base}?token={tok}"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let hs: serde_json::Value = serde_json::from_slice(&hs).unwrap();
        let url = format!("{base}?sid={}&token={tok}", hs["sid"].as_str().unwrap());
        let (http, got, responses) = (http.clone(), Arc::clone(&got), Arc::clone(&responses));
        // Each session polls for ever, as a client does; pushes are counted.
        pollers.push(tokio::spawn(async move {
            let mut seen = 0;
            while seen < m {
                let r = http.get(&url).send().await.unwrap();
                assert_eq!(r.status().as_u16(), 200);
                let body = r.bytes().await.unwrap();
                responses.fetch_add(1, Ordering::Relaxed);
                for f in decode_batch(&body, 1 << 20).unwrap() {
                    let frame =
                        Frame::decode(&bytes::Bytes::copy_from_slice(f), &Limits::default())
                            .unwrap();
                    if frame.kind == FrameKind::Push {
                        seen += 1;
                        got.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Idle: every session handshaken, its welcome taken, a poll waiting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_kb = (gw.rss_kb() - before) as f64 / n as f64;
    let responses_before = responses.load(Ordering::Relaxed);
    let (cpu0, t0) = (gw.cpu_s(), Instant::now());
    broadcast(bus, m, size).await;
    for p in pollers {
        p.await.unwrap();
    }
    let (wall_s, cpu_s) = (t0.elapsed().as_secs_f64(), gw.cpu_s() - cpu0);
    Figures {
        idle_kb,
        deliveries: got.load(Ordering::Relaxed),
        wall_s,
        cpu_s,
        responses: responses.load(Ordering::Relaxed) - responses_before,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly"]
async fn longpoll_figures() {
    let (n, m, size) = (
        knob("SESSIONS", 2000),
        knob("MESSAGES", 20),
        knob("SIZE", 256),
    );
    let nats = NatsServer::start().unwrap();
    let bus = bus_client(&nats.url()).await;
    let ws = websocket_run(&nats.url(), &bus, n, m, size).await;
    let lp = longpoll_run(&nats.url(), &bus, n, m, size).await;
    let expected = (n * m) as u64;
    assert_eq!((ws.deliveries, lp.deliveries), (expected, expected));
    println!("{n} sessions, {m} broadcast pushes of {size} bytes ({expected} deliveries each)");
    println!("| figure | WebSocket | long-polling |");
    println!("|---|---|---|");
    println!(
        "| RSS per idle session | {:.1} KB | {:.1} KB |",
        ws.idle_kb, lp.idle_kb
    );
    println!(
        "| fan-out wall time | {:.2} s | {:.2} s |",
        ws.wall_s, lp.wall_s
    );
    println!(
        "| deliveries/s (wall) | {:.0} | {:.0} |",
        expected as f64 / ws.wall_s,
        expected as f64 / lp.wall_s
    );
    println!("| gateway CPU-s | {:.2} | {:.2} |", ws.cpu_s, lp.cpu_s);
    println!(
        "| deliveries per gateway CPU-second (per core) | {:.0} | {:.0} |",
        expected as f64 / ws.cpu_s.max(0.01),
        expected as f64 / lp.cpu_s.max(0.01)
    );
    println!(
        "| poll responses during the fan-out | - | {} |",
        lp.responses
    );
}
