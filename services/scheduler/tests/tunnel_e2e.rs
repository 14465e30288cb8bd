//! TCP tunnels end to end: a real nats-server, a real gateway, the real scheduler, a real
//! agent and real TCP servers on the agent's side; the operator's end is `schedctl tunnel`
//! as a process or the WebSocket API directly.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use testkit::NatsServer;
use testkit::agent::AgentToml;
use testkit::http;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

const KEY: &str = "tunnel-api-key-0123456789";
const READ_KEY: &str = "tunnel-read-key-0123456789";

struct Fleet {
    _nats: NatsServer,
    gateway: ws_gateway::Handle,
    sched: scheduler::Handle,
    dir: tempfile::TempDir,
}

impl Fleet {
    async fn start(idle: Duration) -> Fleet {
        Fleet::start_with(idle, 32).await
    }

    /// With at most `per_key` streams per API key.
    async fn start_with(idle: Duration, per_key: usize) -> Fleet {
        Fleet::start_full(idle, per_key, None).await
    }

    /// With the gateway announcing a fixed heartbeat interval of `beat_ms` (agents started
    /// with [`Fleet::agent_paced`] follow it).
    async fn start_full(idle: Duration, per_key: usize, beat_ms: Option<u32>) -> Fleet {
        let nats = NatsServer::start().unwrap();
        let url = nats.url();
        let mut gw = testkit::gateway::config(&url, "gw-tunnel");
        if let Some(ms) = beat_ms {
            gw.heartbeat.base_ms = ms;
            gw.heartbeat.step_ms = 0;
            gw.heartbeat.max_ms = ms;
        }
        // Tunnels need a frame rate far above the default 50/s per connection.
        gw.rate_per_sec = 20_000;
        gw.rate_burst = 20_000;
        let gateway = testkit::gateway::start(gw).await;
        let dir = tempfile::tempdir().unwrap();
        let mut config =
            scheduler::Config::new(&url, vec![KEY.to_owned()], dir.path().join("s.redb"));
        config.api_keys =
            scheduler::auth::parse_keys(&format!("ops:operator:{KEY},dashboard:read:{READ_KEY}"))
                .unwrap();
        config.command_key = std::sync::Arc::new(
            messages::command::CommandSigner::from_pem(testkit::ws::TEST_COMMAND_KEY).unwrap(),
        );
        config.tunnel_idle = idle;
        config.tunnel_max_per_key = per_key;
        let sched = scheduler::spawn(config, TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
        http::wait_status(sched.addr(), "/readyz", 200).await;
        Fleet {
            _nats: nats,
            gateway,
            sched,
            dir,
        }
    }

    /// A real agent `node` that may tunnel to `allow`, online.
    async fn agent(&self, node: &str, allow: &[SocketAddr]) -> agent::AgentHandle {
        self.agent_with(
            node,
            allow,
            "heartbeat_secs = 1\ntunnel_frames_per_sec = 20000",
        )
        .await
    }

    /// Following the gateway's heartbeat interval; tunnel frames paced at `frames_per_sec`,
    /// or at the agent's default.
    async fn agent_paced(
        &self,
        node: &str,
        allow: &[SocketAddr],
        frames_per_sec: Option<u32>,
    ) -> agent::AgentHandle {
        let pace = frames_per_sec
            .map(|f| format!("tunnel_frames_per_sec = {f}"))
            .unwrap_or_default();
        self.agent_with(node, allow, &pace).await
    }

    /// With `extra` lines of configuration.
    async fn agent_with(
        &self,
        node: &str,
        allow: &[SocketAddr],
        extra: &str,
    ) -> agent::AgentHandle {
        let allow: Vec<String> = allow.iter().map(|a| format!("\"{a}\"")).collect();
        let dir = self.dir.path();
        let text = AgentToml::new(node)
            .gateway(format!("ws://{}/ws", self.gateway.addr()))
            .line(format!("tunnel_allow = [{}]", allow.join(", ")))
            .line(extra)
            .render(dir);
        let config =
            agent::AgentConfig::from_toml(&text, &dir.join(format!("{node}.toml")), |_| None)
                .unwrap();
        let handle = agent::start(config).await.unwrap();
        http::eventually(self.sched.addr(), &format!("/v1/agents/{node}"), KEY, |v| {
            v["state"] == "online"
        })
        .await;
        handle
    }

    async fn stop(self) {
        self.sched.shutdown().await.unwrap();
        self.gateway.shutdown().await.unwrap();
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a tunnel WebSocket with `key`; `Err` is the HTTP status and JSON body of a refusal.
async fn open(
    api: SocketAddr,
    node: &str,
    remote: SocketAddr,
    key: &str,
) -> Result<Ws, (u16, serde_json::Value)> {
    let mut req = format!("ws://{api}/v1/agents/{node}/tunnel?remote={remote}")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            Err((
                resp.status().as_u16(),
                serde_json::from_slice(&body).unwrap_or_default(),
            ))
        }
        Err(e) => panic!("tunnel connect: {e}"),
    }
}

/// An echo server; returns its address.
async fn echo_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Reads binary messages until `n` bytes arrived.
async fn read_bytes(ws: &mut Ws, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => got.extend_from_slice(&b),
            Ok(Some(Ok(_))) => {}
            other => panic!("reading the tunnel: {other:?}"),
        }
    }
    got
}

/// Waits for the WebSocket to close; returns the close reason.
async fn closed(ws: &mut Ws) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => {
                return frame.map(|f| f.reason.to_string()).unwrap_or_default();
            }
            Ok(Some(Ok(_))) => {}
            Ok(None) | Ok(Some(Err(_))) => return String::new(),
            Err(_) => panic!("the tunnel did not close"),
        }
    }
}

async fn audit_has(api: SocketAddr, check: impl Fn(&serde_json::Value) -> bool) {
    http::eventually(api, "/v1/audit?limit=1000", KEY, |v| {
        v["entries"]
            .as_array()
            .is_some_and(|entries| entries.iter().any(&check))
    })
    .await;
}

fn heartbeats(handle: &agent::AgentHandle) -> u64 {
    handle
        .metrics()
        .encode(None)
        .lines()
        .find(|l| l.starts_with("agent_heartbeats_sent_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn schedctl_tunnel_carries_an_http_request_to_a_server_on_the_agent_side() {
    let fleet = Fleet::start(Duration::from_secs(60)).await;
    let api = fleet.sched.addr();
    // A one-page HTTP server on the agent's side.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let web = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut tcp = tokio::io::BufReader::new(tcp);
                let mut line = String::new();
                let mut request_line = String::new();
                loop {
                    line.clear();
                    if tcp.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if request_line.is_empty() {
                        request_line = line.trim().to_owned();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let body = format!("hello from the agent side: {request_line}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.get_mut().write_all(resp.as_bytes()).await;
            });
        }
    });
    let mut node = fleet.agent("edge-1", &[web]).await;

    let (mut schedctl, local) = schedctl_tunnel(api, "edge-1", web).await;

    for _ in 0..2 {
        let mut tcp = tokio::net::TcpStream::connect(local).await.unwrap();
        tcp.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut resp))
            .await
            .unwrap()
            .unwrap();
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
        assert!(
            resp.ends_with("hello from the agent side: GET /status HTTP/1.1"),
            "{resp}"
        );
    }
    audit_has(api, |e| {
        e["action"] == "tunnel.open" && e["detail"]["outcome"] == "opened" && e["actor"] == "ops"
    })
    .await;
    audit_has(api, |e| {
        e["action"] == "tunnel.close" && e["target"] == "agent/edge-1"
    })
    .await;
    // Both streams closed: nothing left counted against the caps.
    schedctl.kill().await.unwrap();
    node.stop();
    node.join().await.unwrap();
    fleet.stop().await;
}

#[tokio::test]
async fn a_port_off_the_allowlist_is_refused_and_audited_and_read_keys_cannot_tunnel() {
    let fleet = Fleet::start_with(Duration::from_secs(60), 1).await;
    let api = fleet.sched.addr();
    let allowed = echo_server().await;
    let other = echo_server().await;
    let mut node = fleet.agent("edge-2", &[allowed]).await;

    let (status, body) = open(api, "edge-2", other, KEY).await.err().unwrap();
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "tunnel_not_allowed", "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("not on this agent's tunnel_allow"),
        "{body}"
    );
    audit_has(api, |e| {
        e["action"] == "tunnel.open"
            && e["detail"]["outcome"] == "refused"
            && e["detail"]["reason"] == "not_allowed"
            && e["detail"]["remote"] == other.to_string()
    })
    .await;

    // A read-only key is refused before anything reaches the agent.
    let (status, body) = open(api, "edge-2", allowed, READ_KEY).await.err().unwrap();
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "forbidden", "{body}");

    // The allowed port works with an operator key.
    let mut ws = open(api, "edge-2", allowed, KEY).await.unwrap();
    ws.send(Message::binary(b"ping".to_vec())).await.unwrap();
    assert_eq!(read_bytes(&mut ws, 4).await, b"ping");
    // The refusals freed their slots; the open stream holds the key's only one.
    let (status, body) = open(api, "edge-2", allowed, KEY).await.err().unwrap();
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "too_many_tunnels", "{body}");
    ws.close(None).await.unwrap();
    let mut again = tokio::time::Instant::now();
    let mut ws = loop {
        match open(api, "edge-2", allowed, KEY).await {
            Ok(ws) => break ws,
            Err((429, _)) if again.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    again = tokio::time::Instant::now();
    ws.send(Message::binary(b"pong".to_vec())).await.unwrap();
    assert_eq!(read_bytes(&mut ws, 4).await, b"pong");
    assert!(again.elapsed() < Duration::from_secs(5));
    node.stop();
    node.join().await.unwrap();
    fleet.stop().await;
}

#[tokio::test]
async fn a_slow_reader_does_not_stall_another_stream_or_the_heartbeats() {
    let fleet = Fleet::start(Duration::from_secs(60)).await;
    let api = fleet.sched.addr();
    let echo = echo_server().await;
    let mut node = fleet.agent("edge-3", &[echo]).await;

    // Stream A: the operator writes megabytes and never reads the echo.
    let slow = open(api, "edge-3", echo, KEY).await.unwrap();
    let (mut slow_tx, _slow_rx) = slow.split();
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 32 * 1024];
        let mut sent = 0usize;
        while sent < 64 << 20 {
            if slow_tx.send(Message::binary(chunk.clone())).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    // Let it fill every buffer on the way.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!writer.is_finished(), "the slow stream was not held back");

    // Stream B: small echoes keep their round trip.
    let beats_before = heartbeats(&node);
    let mut fast = open(api, "edge-3", echo, KEY).await.unwrap();
    let mut worst = Duration::ZERO;
    for i in 0..50u32 {
        let msg = format!("echo {i}").into_bytes();
        let t = Instant::now();
        fast.send(Message::binary(msg.clone())).await.unwrap();
        assert_eq!(read_bytes(&mut fast, msg.len()).await, msg);
        worst = worst.max(t.elapsed());
    }
    println!("50 echoes beside a stalled stream: worst round trip {worst:?}");
    assert!(worst < Duration::from_secs(1), "worst echo {worst:?}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Heartbeats went on (1 s interval), on the same connection (no reconnect).
    assert!(heartbeats(&node) >= beats_before + 2, "heartbeats stalled");
    let rtts = node.metrics().heartbeat_rtts();
    assert!(
        rtts.iter()
            .rev()
            .take(2)
            .all(|r| *r < Duration::from_millis(500)),
        "heartbeat round trips beside a stalled stream: {rtts:?}"
    );
    assert_eq!(node.metrics().sessions(), 1, "the agent reconnected");
    assert!(!writer.is_finished(), "the slow stream was not held back");
    writer.abort();
    node.stop();
    node.join().await.unwrap();
    fleet.stop().await;
}

/// A server that reports when its peer closed, and can close on request.
async fn watched_server() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<&'static str>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            let _ = tx.send("eof");
                            return;
                        }
                        Ok(n) if &buf[..n] == b"bye" => {
                            let _ = tcp.write_all(b"bye to you").await;
                            // Dropping closes the remote end.
                            let _ = tx.send("server closed");
                            return;
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    (addr, rx)
}

async fn next(events: &mut tokio::sync::mpsc::UnboundedReceiver<&'static str>) -> &'static str {
    tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn closing_either_end_closes_the_other_and_idle_streams_time_out() {
    let fleet = Fleet::start(Duration::from_secs(2)).await;
    let api = fleet.sched.addr();
    let (server, mut events) = watched_server().await;
    let mut node = fleet.agent("edge-4", &[server]).await;

    // The operator closes: the remote connection sees EOF.
    let mut ws = open(api, "edge-4", server, KEY).await.unwrap();
    ws.send(Message::binary(b"hi".to_vec())).await.unwrap();
    ws.close(None).await.unwrap();
    assert_eq!(next(&mut events).await, "eof");

    // The remote closes: the operator's WebSocket closes after the last bytes.
    let mut ws = open(api, "edge-4", server, KEY).await.unwrap();
    ws.send(Message::binary(b"bye".to_vec())).await.unwrap();
    assert_eq!(read_bytes(&mut ws, 10).await, b"bye to you");
    assert_eq!(next(&mut events).await, "server closed");
    let reason = closed(&mut ws).await;
    assert!(reason.starts_with("closed"), "{reason}");

    // Idle: nothing either way for the idle timeout closes both ends.
    let started = Instant::now();
    let mut ws = open(api, "edge-4", server, KEY).await.unwrap();
    let reason = closed(&mut ws).await;
    assert!(reason.starts_with("idle"), "{reason}");
    assert!(started.elapsed() >= Duration::from_millis(1900));
    assert_eq!(next(&mut events).await, "eof");
    audit_has(api, |e| {
        e["action"] == "tunnel.close" && e["detail"]["reason"] == "idle"
    })
    .await;
    node.stop();
    node.join().await.unwrap();
    fleet.stop().await;
}

/// Starts `schedctl tunnel` to `remote` on `node`; returns the process and its listener.
async fn schedctl_tunnel(
    api: SocketAddr,
    node: &str,
    remote: SocketAddr,
) -> (tokio::process::Child, SocketAddr) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_schedctl"))
        .args([
            "--url",
            &format!("http://{api}"),
            "--key",
            KEY,
            "tunnel",
            node,
        ])
        .args(["--remote", &remote.to_string(), "--local", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    tokio::time::timeout(Duration::from_secs(10), out.read_line(&mut first))
        .await
        .unwrap()
        .unwrap();
    let local = first
        .strip_prefix("listening on ")
        .and_then(|r| r.split_once(": "))
        .map(|(a, _)| a.parse().unwrap())
        .unwrap_or_else(|| panic!("schedctl said {first:?}"));
    (child, local)
}

/// `n` incompressible bytes, like the encrypted streams tunnels mostly carry (the agent
/// deflates large frames that shrink).
fn noise(n: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// A server that writes `n` bytes to every connection and closes it.
async fn source_server(n: usize) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let chunk = noise(64 * 1024);
                let mut left = n;
                while left > 0 {
                    let k = left.min(chunk.len());
                    if tcp.write_all(&chunk[..k]).await.is_err() {
                        return;
                    }
                    left -= k;
                }
            });
        }
    });
    addr
}

/// Reads `addr` to EOF; returns bytes and seconds.
async fn drain(addr: SocketAddr) -> (usize, f64) {
    let t = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        let n = tcp.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    (total, t.elapsed().as_secs_f64())
}

/// p50 and p99 of `rounds` 64-byte echoes over one connection to `addr`, microseconds.
async fn echoes(addr: SocketAddr, rounds: usize) -> (u128, u128) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let msg = [0x42u8; 64];
    let mut back = [0u8; 64];
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        tcp.write_all(&msg).await.unwrap();
        tcp.read_exact(&mut back).await.unwrap();
        samples.push(t.elapsed().as_micros());
    }
    samples.sort_unstable();
    (samples[rounds / 2], samples[rounds * 99 / 100])
}

/// The figures in docs/benchmarks.md ("TCP tunnels"): one 200 MB transfer and 1,000 small
/// echoes through `schedctl tunnel`, beside a direct loopback connection to the same
/// servers in the same run; then heartbeat round trips while idle and while a bulk transfer
/// runs, on the tunnelling agent and on a reference agent without tunnels (which tells the
/// connection's own delay from the machine's). Run in release (see the document).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly"]
async fn tunnel_figures() {
    const BYTES: usize = 200 << 20;
    // Beats every 100 ms: 200 samples in a 20 s window make a p99 that is not the max;
    // TUNNEL_FIGURES_WINDOW_SECS=60 gives 600, a p99 that one stray beat moves less.
    const BEAT_MS: u32 = 100;
    let window_secs = std::env::var("TUNNEL_FIGURES_WINDOW_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let window_len = Duration::from_secs(window_secs);
    let fleet = Fleet::start_full(Duration::from_secs(60), 32, Some(BEAT_MS)).await;
    let api = fleet.sched.addr();
    let source = source_server(BYTES).await;
    let echo = echo_server().await;
    let sink = sink_server().await;
    let mut fast = fleet
        .agent_paced("bench-1", &[source, echo, sink], Some(20_000))
        .await;
    let mut paced = fleet.agent_paced("paced-1", &[source], None).await;
    let mut reference = fleet.agent_paced("ref-1", &[], None).await;
    let (_bulk, bulk_local) = schedctl_tunnel(api, "bench-1", source).await;
    let (_small, echo_local) = schedctl_tunnel(api, "bench-1", echo).await;
    let (_slow, slow_local) = schedctl_tunnel(api, "paced-1", source).await;
    let (_down, sink_local) = schedctl_tunnel(api, "bench-1", sink).await;

    let (direct_bytes, direct_s) = drain(source).await;
    let (tunnel_bytes, tunnel_s) = drain(bulk_local).await;
    assert_eq!((direct_bytes, tunnel_bytes), (BYTES, BYTES));
    let mib = |b: usize, s: f64| b as f64 / (1024.0 * 1024.0) / s;
    println!(
        "200 MiB transfer: direct {:.1} MiB/s ({direct_s:.2} s), tunnel {:.1} MiB/s ({tunnel_s:.2} s)",
        mib(direct_bytes, direct_s),
        mib(tunnel_bytes, tunnel_s)
    );

    let (d50, d99) = echoes(echo, 1000).await;
    let (t50, t99) = echoes(echo_local, 1000).await;
    println!(
        "1,000 64-byte echoes: direct p50 {d50} us p99 {d99} us; tunnel p50 {t50} us p99 {t99} us"
    );

    let agents = [
        ("bench-1 (tunnel at 20,000 frames/s)", &fast),
        ("paced-1 (tunnel at the default pace)", &paced),
        ("ref-1 (no tunnel)", &reference),
    ];
    // Every beat of the three agents during `len`, sorted, in microseconds. An agent keeps
    // only its latest 256 round trips (25.6 s of beats), so they are read every 10 s.
    let collect = async |len: Duration| {
        let mut out = vec![Vec::new(); agents.len()];
        let mut seen = agents.map(|(_, a)| a.metrics().heartbeat_rtt_count());
        let until = tokio::time::Instant::now() + len;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            tokio::time::sleep(left.min(Duration::from_secs(10))).await;
            for (((_, a), from), v) in agents.iter().zip(seen.iter_mut()).zip(out.iter_mut()) {
                let m = a.metrics();
                let count = m.heartbeat_rtt_count();
                let n = usize::try_from(count - *from).unwrap();
                let all = m.heartbeat_rtts();
                v.extend(
                    all[all.len().saturating_sub(n)..]
                        .iter()
                        .map(Duration::as_micros),
                );
                *from = count;
            }
            if left <= Duration::from_secs(10) {
                break;
            }
        }
        for v in &mut out {
            v.sort_unstable();
        }
        out
    };
    let idle = collect(window_len).await;
    let (moved_fast, busy_fast) =
        tokio::join!(drain_for(bulk_local, window_len), collect(window_len));
    let (moved_paced, busy_paced) =
        tokio::join!(drain_for(slow_local, window_len), collect(window_len));
    let (moved_down, busy_down) =
        tokio::join!(fill_for(sink_local, window_len), collect(window_len));

    let show = |v: &[u128]| {
        let at = |q: usize| v.get((v.len() * q / 100).min(v.len().saturating_sub(1)));
        format!(
            "{:>4} beats, p50 {:>5} us, p99 {:>5} us, max {:>6} us",
            v.len(),
            at(50).copied().unwrap_or(0),
            at(99).copied().unwrap_or(0),
            v.last().copied().unwrap_or(0)
        )
    };
    println!(
        "heartbeat round trips ({BEAT_MS} ms interval, {} s windows); MiB moved: up through bench-1 {:.1}, up through paced-1 {:.1}, down through bench-1 {:.1}",
        window_len.as_secs(),
        moved_fast as f64 / (1024.0 * 1024.0),
        moved_paced as f64 / (1024.0 * 1024.0),
        moved_down as f64 / (1024.0 * 1024.0),
    );
    for (i, (name, _)) in agents.iter().enumerate() {
        println!("{name}");
        println!("  idle:                   {}", show(&idle[i]));
        println!("  bulk through bench-1:   {}", show(&busy_fast[i]));
        println!("  bulk through paced-1:   {}", show(&busy_paced[i]));
        println!("  bulk down to bench-1:   {}", show(&busy_down[i]));
    }
    for a in [&mut fast, &mut paced, &mut reference] {
        a.stop();
    }
    for mut a in [fast, paced, reference] {
        a.join().await.unwrap();
    }
    fleet.stop().await;
}

/// Writes incompressible bytes to `addr` for `window`; returns bytes written.
async fn fill_for(addr: SocketAddr, window: Duration) -> usize {
    let until = tokio::time::Instant::now() + window;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let chunk = noise(64 * 1024);
    let mut total = 0;
    loop {
        match tokio::time::timeout_at(until, tcp.write_all(&chunk)).await {
            Ok(Ok(())) => total += chunk.len(),
            Ok(Err(e)) => panic!("fill: {e}"),
            Err(_) => return total,
        }
    }
}

/// A server that reads and discards everything sent to it.
async fn sink_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

/// Reads from `addr` for `window`, connecting again whenever a transfer ends; returns bytes.
async fn drain_for(addr: SocketAddr, window: Duration) -> usize {
    let until = tokio::time::Instant::now() + window;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    while tokio::time::Instant::now() < until {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        loop {
            match tokio::time::timeout_at(until, tcp.read(&mut buf)).await {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => total += n,
                Ok(Err(e)) => panic!("drain: {e}"),
                Err(_) => return total,
            }
        }
    }
    total
}
